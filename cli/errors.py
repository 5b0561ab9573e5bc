"""The one error boundary: exceptions become one stderr line and an exit status.

0 success (also when our stdout reader goes away); 1 runtime/data failure; 2 usage; 130 Ctrl-C;
143 SIGTERM (both after the same cleanup).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import traceback

import typer

from vecpipe.core.space import SpaceMismatch
from vecpipe.formats.errors import DataError, Terminated, UsageError, VecpipeError
from vecpipe.formats.writers import STDOUT_NAME, write_error

from vecpipe.cli import console

__all__ = ["DataError", "UsageError", "VecpipeError", "boundary"]


def _debug() -> bool:
    return os.environ.get("VECPIPE_DEBUG", "") not in ("", "0")


def _silence_stdout() -> None:
    """After EPIPE: point fd 1 at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _is_broken_pipe(err: BaseException) -> bool:
    return isinstance(err, BrokenPipeError) or (
        isinstance(err, OSError) and err.errno == errno.EPIPE) or (
        "Broken pipe" in str(err) and type(err).__name__ in ("ArrowIOError", "OSError"))


class _ClosedStdout:
    """sys.stdout when the shell closed it (`>&-`: Python sets it to None). Reports printed to it
    fail as one line, as record streams do, instead of an AttributeError; a command that
    writes to -o never touches it."""

    encoding = "utf-8"

    def _closed(self, *args, **kwargs):
        raise DataError("stdout is closed", source=STDOUT_NAME,
                        hint="redirect stdout to a file or pipe, or use -o FILE")

    write = fileno = _closed
    buffer = property(_closed)

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds the command like Ctrl-C (cleanup runs), then exits 143."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding caller's worker): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _file_names(err: OSError) -> str:
    """`a -> b` for a rename, `a` for one file, "" for none."""
    names = [name for name in (err.filename, getattr(err, "filename2", None)) if name]
    return " -> ".join(map(str, names))


def _report(err: Exception) -> int:
    """Print the one line (and hint) for an exception that is not a VecpipeError; exit status."""
    if isinstance(err, MemoryError):
        console.error("out of memory", "use smaller --batch-size or shard the input")
    elif isinstance(err, OSError):
        # writers name their outputs; an OSError with no file name is a plain print to stdout
        mapped = write_error(err, _file_names(err) or None)
        console.error(str(mapped), getattr(mapped, "hint", None))
    elif isinstance(err, EOFError):
        console.error("the input ended early: a truncated or corrupt compressed file?")
    elif isinstance(err, RecursionError):
        console.error("the input is nested too deeply to process")
    else:
        console.error(f"{type(err).__name__}: {err}",
                      "set VECPIPE_DEBUG=1 for a traceback and report it")
    return 1


def _hint(err: VecpipeError) -> str | None:
    """The error's hint; for mixed vector spaces, with the flag that overrules the check."""
    if isinstance(err, SpaceMismatch):
        return f"{err.hint}; pass --force if you know better"
    return err.hint


def boundary(command: str):
    """Decorate a command function: configure the console and map exceptions to exit codes."""
    def wrap(func):
        @functools.wraps(func)
        def run(*args, **kwargs):
            console.configure(f"vecpipe {command}", bool(kwargs.get("quiet", False)))
            if sys.stdout is None:
                sys.stdout = _ClosedStdout()
            try:
                with _sigterm_as_interrupt():
                    return func(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except VecpipeError as err:
                if _debug():
                    traceback.print_exc()
                console.error(str(err), _hint(err))
                raise typer.Exit(err.exit_code) from None
            except Terminated:
                console.error("terminated")
                raise typer.Exit(143) from None
            except KeyboardInterrupt:
                console.error("interrupted")
                raise typer.Exit(130) from None
            except Exception as err:  # noqa: BLE001 - the boundary is where all errors end
                if _is_broken_pipe(err):
                    _silence_stdout()
                    raise typer.Exit(0) from None
                if _debug():
                    traceback.print_exc()
                raise typer.Exit(_report(err)) from None
        return run
    return wrap
