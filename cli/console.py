"""stderr-only messages and progress. stdout carries data alone."""
from __future__ import annotations

import sys

_state = {"quiet": False, "command": "vecpipe", "errors": 0}


def configure(command: str, quiet: bool = False) -> None:
    _state["command"] = command
    _state["quiet"] = quiet


def errors_reported() -> int:
    return _state["errors"]


def is_quiet() -> bool:
    return _state["quiet"]


def command_name() -> str:
    return _state["command"]


def info(message: str) -> None:
    """A summary or note on stderr (silenced by -q)."""
    if not _state["quiet"]:
        print(f"{_state['command']}: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if not _state["quiet"]:
        print(f"{_state['command']}: warning: {message}", file=sys.stderr, flush=True)


def error(message: str, hint: str | None = None) -> None:
    _state["errors"] += 1
    message = " ".join(message.split())  # one line, whatever the cause's text held
    print(f"{_state['command']}: error: {message}", file=sys.stderr, flush=True)
    if hint:
        print(f"hint: {hint}", file=sys.stderr, flush=True)


def progress(total: int | None = None, desc: str = "", unit: str = "rec"):
    """A tqdm bar on stderr when stderr is a terminal and not quiet; else a silent counter."""
    from tqdm import tqdm

    disable = _state["quiet"] or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
