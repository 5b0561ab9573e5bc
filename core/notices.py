"""The library's notes, warnings and progress bars, on stderr (stdout carries data alone).

The CLI names the command and silences notes with -q through `configure` (cli.console does it
for every command); a Python caller gets `vecpipe: ...` lines unless it configures its own.
"""
from __future__ import annotations

import sys

_state = {"prefix": "vecpipe", "quiet": False}


def configure(prefix: str, quiet: bool = False) -> None:
    _state["prefix"] = prefix
    _state["quiet"] = quiet


def prefix() -> str:
    return _state["prefix"]


def info(message: str) -> None:
    """A summary or note (silenced by quiet)."""
    if not _state["quiet"]:
        print(f"{_state['prefix']}: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if not _state["quiet"]:
        print(f"{_state['prefix']}: warning: {message}", file=sys.stderr, flush=True)


def progress(total: int | None = None, desc: str = "", unit: str = "rec"):
    """A tqdm bar on stderr when stderr is a terminal and not quiet; else a silent counter."""
    from tqdm import tqdm

    disable = _state["quiet"] or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False)
