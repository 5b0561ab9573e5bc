"""A folder's files as records: one per file matching the glob patterns, read lazily in bounded
batches (`id` = the path relative to the folder, `text` = its UTF-8 contents).

Patterns are relative to the folder and use `/`: `*` and `?` match within one name, `**` a whole
run of folders (none included). As in the shell, a name that starts with `.` (a hidden file, or
a folder such as .git) is matched only by a pattern part that starts with `.` too, so hidden
folders are not even walked unless a pattern names them. Links are followed only when they
resolve inside the folder ("no path escapes"), and each folder is walked once. Files that
cannot be records (not UTF-8, binary, empty, unreadable, not a regular file, a link out of the
folder) are skipped and counted by reason in `FileTree.skipped`.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import stat
import time

from vecpipe.formats.errors import DataError, UsageError

FIELDS = ("id", "text", "path", "bytes", "mtime")
BATCH_BYTES = 16 << 20  # a batch ends past this much text (and at batch_rows files)
NAMES_KEPT = 3          # skipped files named per reason

NOT_UTF8 = "not UTF-8"
BINARY = "binary"
EMPTY = "empty"
UNREADABLE = "unreadable"
NOT_REGULAR = "not a regular file"
LINK_OUT = "link out of the folder"


def check_pattern(pattern: str) -> tuple[str, ...]:
    """The parts of a glob pattern; a pattern that could leave the folder is a UsageError."""
    parts = tuple(part for part in pattern.removeprefix("./").split("/"))
    if not pattern or pattern.startswith("/") or "" in parts or ".." in parts or "." in parts:
        raise UsageError(f"bad glob pattern {pattern!r}: use names and folders relative to the "
                         "folder, joined by '/' (e.g. '**/*.md')")
    return parts


def _part_matches(pattern: str, name: str) -> bool:
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


@functools.lru_cache(maxsize=65536)
def _matches(pattern: tuple, parts: tuple, below: bool) -> bool:
    """Whether the path `parts` matches `pattern`; with `below`, whether a path under the
    folder `parts` could."""
    if not parts:
        return bool(pattern) if below else all(p == "**" for p in pattern)
    if not pattern:
        return False
    head = pattern[0]
    if head == "**":
        return _matches(pattern[1:], parts, below) or (
            not parts[0].startswith(".") and _matches(pattern, parts[1:], below))
    return _part_matches(head, parts[0]) and _matches(pattern[1:], parts[1:], below)


class Skipped:
    """Files skipped, counted by reason, with the first few relative paths of each."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.names: dict[str, list[str]] = {}

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.names.setdefault(reason, [])
        if len(kept) < NAMES_KEPT:
            kept.append(name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """`2 not UTF-8 (a.png, b.pdf), 1 empty (c.md)`; '' when nothing was skipped."""
        return ", ".join(
            f"{count} {reason} ({', '.join(self.names[reason])}"
            f"{', ...' if count > len(self.names[reason]) else ''})"
            for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])))


class FileTree:
    """The files under `root` that match `patterns`, as a record input of
    formats.readers.RecordStream (which calls `read`). Listing reads names only; contents are
    read batch by batch. `skipped` fills in as the files are walked and read."""

    def __init__(self, root: str, patterns):
        self.root = root
        self.patterns = tuple(check_pattern(p) for p in patterns)
        if not self.patterns:
            raise UsageError("a file tree needs at least one glob pattern")
        self.skipped = Skipped()
        self._listing: list[tuple[str, str]] | None = None

    def __str__(self) -> str:
        return self.root

    def __repr__(self) -> str:
        return f"FileTree({self.root!r}, {['/'.join(p) for p in self.patterns]!r})"

    def __getstate__(self):  # a picklable description: the listing is made again
        return {"root": self.root, "patterns": self.patterns}

    def __setstate__(self, state):
        self.root, self.patterns = state["root"], state["patterns"]
        self.skipped, self._listing = Skipped(), None

    def files(self) -> list[tuple[str, str]]:
        """(relative id, path to open) of every matching file, sorted by id; made once."""
        if self._listing is None:
            real_root = self._check_root()
            found: list[tuple[str, str]] = []
            self._walk(self.root, (), real_root, frozenset(), found)
            self._listing = sorted(found)
        return self._listing

    def _check_root(self) -> str:
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:
            raise DataError("no such folder", source=self.root) from None
        except OSError as err:
            raise DataError(f"cannot read folder: {err.strerror}", source=self.root) from None
        if not stat.S_ISDIR(mode):
            raise DataError("not a folder (a glob pattern walks a folder's files)",
                            source=self.root)
        return os.path.realpath(self.root)

    def _matches(self, parts: tuple, below: bool = False) -> bool:
        return any(_matches(pattern, parts, below) for pattern in self.patterns)

    def _walk(self, folder: str, parts: tuple, real_root: str, ancestors: frozenset,
              found: list) -> None:
        try:
            info = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            self.skipped.add(UNREADABLE, "/".join(parts) + "/")
            return
        if (info.st_dev, info.st_ino) in ancestors:  # a link back up: walked already
            return
        ancestors = ancestors | {(info.st_dev, info.st_ino)}
        for entry in entries:
            here = parts + (entry.name,)
            name = "/".join(here)
            try:
                is_dir, is_file, is_link = entry.is_dir(), entry.is_file(), entry.is_symlink()
            except OSError:
                is_dir = is_file = is_link = False
            if not (self._matches(here, below=True) if is_dir else self._matches(here)):
                continue
            if is_link and not _inside(os.path.realpath(entry.path), real_root):
                self.skipped.add(LINK_OUT, name + ("/" if is_dir else ""))
            elif is_dir:
                self._walk(entry.path, here, real_root, ancestors, found)
            elif is_file:
                found.append((name, entry.path))
            else:  # a FIFO would block the read, a device never end
                self.skipped.add(NOT_REGULAR, name)

    def read(self, batch_rows: int):
        """(schema, batch iterator), as formats.readers' readers give; no match is an error."""
        import pyarrow as pa

        if not self.files() and not self.skipped.total:
            shown = ", ".join(repr("/".join(p)) for p in self.patterns)
            raise DataError(f"no file matches {shown}", source=self.root)
        schema = pa.schema([pa.field("id", pa.string()), pa.field("text", pa.string()),
                            pa.field("path", pa.string()), pa.field("bytes", pa.int64()),
                            pa.field("mtime", pa.string())])
        yield schema, self._batches(schema, batch_rows)

    def _batches(self, schema, batch_rows: int):
        import pyarrow as pa

        rows: list[tuple] = []
        size = 0
        for name, path in self.files():
            record = self._record(name, path)
            if record is None:
                continue
            rows.append(record)
            size += record[3]
            if len(rows) >= batch_rows or size >= BATCH_BYTES:
                yield pa.RecordBatch.from_arrays([pa.array(c) for c in zip(*rows)], schema=schema)
                rows, size = [], 0
        if rows:
            yield pa.RecordBatch.from_arrays([pa.array(c) for c in zip(*rows)], schema=schema)

    def _record(self, name: str, path: str):
        """(id, text, path, bytes, mtime) of one file, or None (skipped, and counted)."""
        try:
            handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            self.skipped.add(UNREADABLE, name)
            return None
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode):  # replaced since the walk
                self.skipped.add(NOT_REGULAR, name)
                return None
            with os.fdopen(handle, "rb", closefd=False) as stream:
                data = stream.read()
        except OSError:
            self.skipped.add(UNREADABLE, name)
            return None
        finally:
            os.close(handle)
        text, reason = _decoded(data)
        if reason is not None:
            self.skipped.add(reason, name)
            return None
        mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.st_mtime))
        return name, text, os.path.normpath(path), len(data), mtime


def _decoded(data: bytes) -> tuple[str | None, str | None]:
    """(text, None), or (None, why the bytes are not a text record). A UTF-8 BOM is dropped."""
    if b"\x00" in data:
        return None, BINARY
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, NOT_UTF8
    if not text.strip():
        return None, EMPTY
    return text, None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
