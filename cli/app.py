"""The vecpipe app: an ordered command registry, each command behind the error boundary."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer

from vecpipe.cli import console, options
from vecpipe.formats import __version__
from vecpipe.cli.errors import boundary

try:  # typer vendors its own copy of click (0.2x); older ones use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

# (command name, module under vecpipe.commands). Order is the order of `vecpipe --help`.
COMMANDS: list[tuple[str, str]] = [
    ("embed", "embed"),
    ("index", "index"),
    ("search", "search"),
    ("compress", "compress"),
    ("eval", "eval"),
    ("mine-negatives", "mine_negatives"),
    ("train", "train"),
    ("merge", "merge"),
    ("info", "info"),
    ("convert", "convert"),
    ("models", "models"),
    ("completion", "completion"),
    ("man", "man"),
]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

class _RegistryOrder(typer.core.TyperGroup):
    """List commands in COMMANDS order (typer puts sub-apps like `eval` last), and give click's
    own usage errors (`-k 0`, an unknown option) the one-line form of every other error."""

    def list_commands(self, ctx):
        order = [name for name, _ in COMMANDS]
        return sorted(super().list_commands(ctx),
                      key=lambda n: order.index(n) if n in order else len(order))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as err:  # bare `vecpipe`: the help, as before
            err.show()
            sys.exit(err.exit_code)
        except click_errors.ClickException as err:
            if isinstance(err, click_errors.NoSuchOption):
                _offer_visible_only(err)
            print(usage_line(err), file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            code = 130
        if code == 130 and not console.errors_reported():  # typer caught a Ctrl-C itself
            print("vecpipe: interrupted", file=sys.stderr, flush=True)
        sys.exit(code if isinstance(code, int) else 0)


def _offer_visible_only(err) -> None:
    """Suggest for a mistyped option only names the help shows, not the deprecated hidden
    spellings."""
    ctx = getattr(err, "ctx", None)
    if ctx is None or not err.possibilities:
        return
    hidden = {name for param in ctx.command.params if getattr(param, "hidden", False)
              for name in getattr(param, "opts", ())}
    err.possibilities = [name for name in err.possibilities if name not in hidden]


def usage_line(err) -> str:
    """`vecpipe search: error: <click's message> (see 'vecpipe search --help')`."""
    ctx = getattr(err, "ctx", None)
    path = ctx.command_path if ctx is not None else "vecpipe"
    message = " ".join(err.format_message().split())
    see = f" (see '{path} --help')" if isinstance(err, click_errors.UsageError) else ""
    return f"{path}: error: {message}{see}"


app = typer.Typer(
    name="vecpipe",
    cls=_RegistryOrder,
    help="Composable command-line tools for text embeddings. Each command reads and writes "
         "record streams (JSONL, Arrow IPC, Parquet) so they chain with pipes.",
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"vecpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit.")):
    """Composable command-line tools for text embeddings."""


def _register() -> None:
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"vecpipe.commands.{module_name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        if hasattr(module, "app"):  # a command with subcommands (e.g. eval)
            for sub in module.app.registered_commands:
                sub.callback = options.with_aliases(sub.callback)
            app.add_typer(module.app, name=name, help=summary, context_settings=CONTEXT)
        else:
            command = options.with_aliases(boundary(name)(module.run))
            app.command(name, help=module.run.__doc__, short_help=summary,
                        context_settings=CONTEXT)(command)


_register()


def main() -> None:
    try:
        app(prog_name="vecpipe")
    except KeyboardInterrupt:  # during argument parsing or imports, outside a command
        print("vecpipe: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as done:
        if "pyarrow._csv" not in sys.modules:
            raise
        _exit_past_pyarrow_csv(done.code)


def _exit_past_pyarrow_csv(code) -> None:
    """Exit once a CSV was read without the interpreter's finalization: pyarrow's CSV reader
    leaves a C++ thread that aborts about one such exit in six at static destruction
    ("terminate called without an active exception", exit 134, after all output was
    written). The atexit handlers still run; the streams are flushed first."""
    import atexit

    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream: said already
            pass
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    main()
