"""stderr-only messages and progress for commands. stdout carries data alone.

Notes, warnings and progress are core.notices' (so the library's own notes carry the command's
name and obey -q); errors are the CLI's alone.
"""
from __future__ import annotations

import sys

from vecpipe.core import notices
from vecpipe.core.notices import info, progress, warn  # noqa: F401 - the commands' console API

_errors = {"count": 0}


def configure(command: str, quiet: bool = False) -> None:
    notices.configure(command, quiet)


def errors_reported() -> int:
    return _errors["count"]


def error(message: str, hint: str | None = None) -> None:
    _errors["count"] += 1
    message = " ".join(message.split())  # one line, whatever the cause's text held
    print(f"{notices.prefix()}: error: {message}", file=sys.stderr, flush=True)
    if hint:
        print(f"hint: {hint}", file=sys.stderr, flush=True)
