"""The one error boundary: exceptions become one stderr line and an exit status.

0 success (also when our stdout reader goes away); 1 runtime/data failure; 2 usage; 130 Ctrl-C.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback

import typer

from vecpipe.formats.errors import DataError, UsageError, VecpipeError

from . import console

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


def boundary(command: str):
    """Decorate a command function: configure the console and map exceptions to exit codes."""
    def wrap(func):
        @functools.wraps(func)
        def run(*args, **kwargs):
            console.configure(f"vecpipe {command}", bool(kwargs.get("quiet", False)))
            try:
                return func(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except VecpipeError as err:
                if _debug():
                    traceback.print_exc()
                console.error(str(err), err.hint)
                raise typer.Exit(err.exit_code) from None
            except KeyboardInterrupt:
                console.error("interrupted")
                raise typer.Exit(130) from None
            except Exception as err:  # noqa: BLE001 - the boundary is where all errors end
                if _is_broken_pipe(err):
                    _silence_stdout()
                    raise typer.Exit(0) from None
                if _debug():
                    traceback.print_exc()
                if isinstance(err, MemoryError):
                    console.error("out of memory", "use smaller --batch-size or shard the input")
                else:
                    console.error(f"{type(err).__name__}: {err}",
                                  "set VECPIPE_DEBUG=1 for a traceback and report it")
                raise typer.Exit(1) from None
        return run
    return wrap
