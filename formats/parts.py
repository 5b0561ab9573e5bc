"""Part files of a sharded job: `DIR/part-0000I-of-0000N.<ext>` plus a small sidecar.

The sidecar (`.<part>.done.json`: rows, bytes, sha256) is written after the part is renamed into
place, so a part is complete exactly when its sidecar matches the file. A rerun skips complete
parts; a killed job resumes with the parts it had not finished.
"""
from __future__ import annotations

import hashlib
import json
import os

from .errors import UsageError
from .shards import Shard, parse_part_name
from .writers import AtomicFile, resolve_output_format

EXTENSIONS = {"arrow-file": "arrow", "arrow": "arrows", "parquet": "parquet", "jsonl": "jsonl"}


def wants_part_folder(output: str | None) -> bool:
    """`-o DIR/` or an existing folder: write part files into it."""
    return output is not None and (output.endswith(os.sep) or os.path.isdir(output))


def part_path(folder: str, shard: Shard, output_format: str = "auto") -> tuple[str, str]:
    """(path, resolved format) of a shard's part file; `auto` means an Arrow file."""
    fmt = "arrow-file" if output_format == "auto" else output_format
    if fmt not in EXTENSIONS:
        raise UsageError(f"part files cannot be {fmt!r}; use arrow-file, arrow, parquet or jsonl")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, shard.part_name(EXTENSIONS[fmt]))
    return path, resolve_output_format(path, fmt)


def shard_output(output: str | None, shard: Shard | None, output_format: str = "auto",
                 hint: str | None = None) -> tuple[str, str] | None:
    """(part file, format) for `--shard I/N -o DIR/`; None when -o is not a folder. A folder
    without --shard is a usage error (`hint` says what else the command accepts)."""
    if not wants_part_folder(output):
        return None
    if shard is None:
        raise UsageError(f"-o {output} is a folder: part files need --shard I/N", hint=hint)
    return part_path(output, shard, output_format)


def _sidecar(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.done.json")


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def mark_complete(path: str, rows: int) -> None:
    """Record that `path` is a finished part (call after the part file is in place)."""
    facts = {"rows": rows, "bytes": os.path.getsize(path), "sha256": _digest(path)}
    out = AtomicFile(_sidecar(path))
    out.file.write(json.dumps(facts).encode())
    out.commit()


def completed_rows(path: str) -> int | None:
    """Rows of a complete part, or None when it is missing, unfinished or altered."""
    try:
        with open(_sidecar(path), encoding="utf-8") as f:
            facts = json.load(f)
        if os.path.getsize(path) != facts["bytes"] or _digest(path) != facts["sha256"]:
            return None
        return int(facts["rows"])
    except (OSError, ValueError, KeyError):
        return None


def list_parts(folder: str) -> list[tuple[Shard, str]]:
    """The part files in a folder, sorted by shard index (sidecars and temporaries ignored)."""
    found = []
    for name in sorted(os.listdir(folder)):
        shard = parse_part_name(name)
        if shard is not None and not name.startswith("."):
            found.append((shard, os.path.join(folder, name)))
    return sorted(found)
