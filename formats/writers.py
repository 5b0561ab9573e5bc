"""Writers: one RecordWriter for every output format, atomic for files, safe for terminals."""
from __future__ import annotations

import io
import os
import sys
import tempfile

from . import schema as names
from .errors import UsageError
from .jsonl import batch_to_lines

OUTPUT_FORMATS = ("auto", "arrow", "arrow-file", "jsonl", "parquet")
BINARY_FORMATS = ("arrow", "arrow-file", "parquet")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".arrow": "arrow-file", ".feather": "arrow-file", ".ipc": "arrow-file",
    ".arrows": "arrow",
    ".parquet": "parquet", ".pq": "parquet",
}
_PIPE_BUFFER = 1 << 20


def resolve_output_format(output: str | None, output_format: str = "auto",
                          stdout_isatty: bool | None = None, extra: tuple[str, ...] = ()) -> str:
    """`auto`: from -o's extension; else Arrow IPC stream on a pipe, JSONL on a terminal.

    `extra` names command-specific text formats (e.g. `trec`) that are allowed too.
    """
    to_stdout = output in (None, "-")
    if stdout_isatty is None:
        stdout_isatty = to_stdout and sys.stdout.isatty()
    if output_format not in OUTPUT_FORMATS and output_format not in extra:
        raise UsageError(f"unknown output format {output_format!r}; choose from "
                         f"{', '.join(OUTPUT_FORMATS + extra)}")
    if output_format == "auto":
        if not to_stdout:
            ext = os.path.splitext(output)[1].lower()
            if ext not in _EXTENSIONS:
                raise UsageError(f"cannot tell the output format from {output!r}",
                                 hint="use a .jsonl/.arrow/.arrows/.parquet name or "
                                      "--output-format")
            return _EXTENSIONS[ext]
        return "jsonl" if stdout_isatty else "arrow"
    if to_stdout and stdout_isatty and output_format in BINARY_FORMATS:
        raise UsageError(f"refusing to write binary {output_format} to a terminal",
                         hint="redirect stdout, use -o FILE, or --output-format jsonl")
    return output_format


def stdout_binary():
    """stdout as a binary stream with a 1 MiB buffer (sys.stdout.buffer where stdout has no fd,
    as under test runners). Text already printed is flushed first to keep the order."""
    sys.stdout.flush()
    try:
        return open(sys.stdout.fileno(), "wb", buffering=_PIPE_BUFFER, closefd=False)
    except (io.UnsupportedOperation, AttributeError, ValueError):
        return sys.stdout.buffer


class AtomicFile:
    """A binary file written under a temporary name in the target folder, renamed on commit."""

    def __init__(self, path: str):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"output folder does not exist: {folder}")
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                        suffix=".tmp", dir=folder)
        self.file = os.fdopen(fd, "wb", buffering=_PIPE_BUFFER)

    def commit(self) -> None:
        self.file.close()
        os.chmod(self.tmp, 0o644 & ~_umask())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RecordWriter:
    """Write RecordBatches to `-o PATH` (atomically) or stdout, in one output format.

    The schema is fixed by `schema=` or the first batch; later batches are aligned to it.
    `metadata` (vecpipe keys without prefix) is added to the schema. Use as a context manager:
    the file appears only when the block ends without an exception.
    """

    def __init__(self, output: str | None, output_format: str = "auto", schema=None,
                 metadata: dict | None = None):
        self.output = None if output in (None, "-") else output
        self.format = resolve_output_format(output, output_format)
        self.metadata = metadata or {}
        self.schema = None
        self.rows = 0
        self._atomic = AtomicFile(self.output) if self.output else None
        self._sink = self._atomic.file if self._atomic else stdout_binary()
        self._writer = None
        if schema is not None:
            try:
                self._start(schema)
            except BaseException:  # e.g. Ctrl-C/SIGTERM while pyarrow.parquet imports
                self.abort()
                raise

    def _start(self, schema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = names.with_meta(schema, self.metadata) if self.metadata else schema
        if self.format == "arrow":
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        elif self.format == "arrow-file":
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        elif self.format == "parquet":
            self._writer = pq.ParquetWriter(self._sink, self.schema)

    def write(self, batch) -> None:
        if self.schema is None:
            self._start(batch.schema)
        batch = names.align_batch(batch, self.schema)
        if self.format == "jsonl":
            self._sink.write(batch_to_lines(batch))
        elif batch.num_rows or self.format != "parquet":
            self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def write_table(self, table) -> None:
        for batch in table.to_batches():
            self.write(batch)
        if table.num_rows == 0 and self.schema is None:
            self._start(table.schema)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._sink.flush()
        if self._atomic:
            self._atomic.commit()

    def abort(self) -> None:
        """Drop a file output; on stdout, stop without writing an end-of-stream marker."""
        if self._atomic:
            self._atomic.abort()
        else:
            try:
                self._sink.flush()
            except OSError:
                pass
        if self._writer is not None:
            try:
                if self._sink is not sys.stdout.buffer:
                    self._sink.close()
                self._writer.close()
            except (OSError, ValueError):
                pass
            if hasattr(self._writer, "is_open"):  # ParquetWriter would retry in __del__
                self._writer.is_open = False
            self._writer = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def text_output(output: str | None):
    """A text sink for `-o PATH` (atomic) or stdout; for formats like TREC runs and reports."""
    return _TextOutput(None if output in (None, "-") else output)


class _TextOutput:
    def __init__(self, output: str | None):
        self._atomic = AtomicFile(output) if output else None
        self._sink = self._atomic.file if self._atomic else stdout_binary()

    def write(self, text: str) -> None:
        self._sink.write(text.encode())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._sink.flush()
            if self._atomic:
                self._atomic.commit()
        elif self._atomic:
            self._atomic.abort()
