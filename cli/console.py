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


def plan_is_table() -> bool:
    """Whether print_plan shows a table (stdout a terminal, or VECPIPE_OUTPUT_FORMAT=table)."""
    from vecpipe.formats.writers import resolve_report_format

    return resolve_report_format("auto") == "table"


def print_plan(title: str, plan: dict) -> None:
    """A --dry-run's plan on stdout: a two-column table on a terminal (lists one item a line,
    strings quoted where blanks matter: the prompt), else one JSON object."""
    import json

    if not plan_is_table():
        print(json.dumps(plan, ensure_ascii=False), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in plan.items():
        if isinstance(value, list):
            value = "\n".join(map(str, value)) if key == "inputs" else ", ".join(map(str, value))
        elif key == "prompt":
            value = repr(value)
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    Console().print(table)


def hits_summary(hits: int, queries: int) -> str:
    """`1 hit for 1 query`, `1,024 hits for 3 queries`: how search and fused runs report."""
    return (f"{hits:,} hit{'' if hits == 1 else 's'} for {queries:,} "
            f"quer{'y' if queries == 1 else 'ies'}")
