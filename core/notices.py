"""The library's notes, warnings and progress bars, on stderr (stdout carries data alone).

The CLI names the command and silences notes with -q through `configure` (cli.console does it
for every command); a Python caller gets `vecpipe: ...` lines unless it configures its own.
"""
from __future__ import annotations

import sys

_state = {"prefix": "vecpipe", "quiet": False, "forced": False}


def configure(prefix: str, quiet: bool = False) -> None:
    _state["prefix"] = prefix
    _state["quiet"] = quiet
    _state["forced"] = False


def force_progress(on: bool = True) -> None:
    """Show progress bars on stderr even when it is not a terminal (quiet still wins)."""
    _state["forced"] = bool(on)


def prefix() -> str:
    return _state["prefix"]


def info(message: str) -> None:
    """A summary or note (silenced by quiet)."""
    if not _state["quiet"]:
        print(f"{_state['prefix']}: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if not _state["quiet"]:
        print(f"{_state['prefix']}: warning: {message}", file=sys.stderr, flush=True)


def progress(total: int | None = None, desc: str = "", unit: str = "rec", count=None):
    """A tqdm bar on stderr when stderr is a terminal (or progress is forced) and not quiet;
    else a silent counter. `count`: a function that finds the total (it may take a while: it
    runs in a thread, and only for a bar that shows; the bar takes its answer, an int or None,
    at its next update)."""
    import threading

    from tqdm import tqdm

    class Bar(tqdm):
        pending = None

        def update(self, n=1):
            if self.pending is not None and self.pending[0] is not None:
                self.total, self.pending = self.pending[0], None
            return super().update(n)

        def close(self):
            self.pending = None
            super().close()

    tty = sys.stderr.isatty()
    disable = _state["quiet"] or not (tty or _state["forced"])
    # on a terminal the bar gives way to the summary line; in a log the last state stays
    bar = Bar(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
              dynamic_ncols=tty, leave=not tty, mininterval=0.1 if tty else 1.0)
    if count is not None and total is None and not disable:
        found = bar.pending = [None]

        def run():
            try:
                found[0] = count()
            except Exception:  # noqa: BLE001 - no total is a bar without an ETA, not an error
                pass
        threading.Thread(target=run, name="vecpipe-count", daemon=True).start()
    return bar


def input_records(paths, input_format: str | None = "auto"):
    """A function counting the records of plain input files, for a bar's total: Parquet from
    its footer, Arrow files from their batch headers, line formats (JSONL, CSV/TSV, text) by
    their newlines. None for stdin, compressed input or an Arrow stream."""
    def count() -> int | None:
        from vecpipe.formats.readers import open_input, sniff

        total = 0
        for path in paths or ["-"]:
            if not isinstance(path, str) or path == "-":  # stdin, or a folder's files
                return None
            stream, head, compression = open_input(path)
            try:
                fmt = None if input_format in (None, "auto") else input_format
                fmt = fmt or sniff(head, path)
            finally:
                stream.close()
            if fmt is None:
                continue
            if compression:
                return None
            rows = _file_records(path, fmt)
            if rows is None:
                return None
            total += rows
        return total
    return count


def _file_records(path: str, fmt: str) -> int | None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "arrow-file":
        import pyarrow as pa

        reader = pa.ipc.open_file(pa.memory_map(path))
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    if fmt not in ("jsonl", "csv", "tsv", "text"):
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return max(lines - (fmt in ("csv", "tsv")), 0)
