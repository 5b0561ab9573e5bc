"""Readers: several inputs (paths or `-`) read in order as one stream of bounded RecordBatches.

The format is sniffed from the first bytes (gzip/zstd unwrapped first), never from the name, and
sniffing reads ahead instead of seeking, so pipes work.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Iterator

from . import schema as names
from .errors import DataError, UsageError

DEFAULT_BATCH_ROWS = 1024
INPUT_FORMATS = ("auto", "jsonl", "arrow", "arrow-file", "parquet", "csv", "tsv", "text")
STDIN_NAME = "<stdin>"
_PIPE_BUFFER = 1 << 20
_SNIFF_BYTES = 512


@dataclass
class SourceBatch:
    """A batch and where it came from: record numbers are `first_record + row` (1-based)."""

    batch: "object"  # pyarrow.RecordBatch
    source: str
    first_record: int


class _Prefixed(io.RawIOBase):
    """Bytes already read (`head`) followed by the rest of `stream`: peeking without seeking."""

    def __init__(self, head: bytes, stream):
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head.nbytes:
            n = min(len(buffer), self._head.nbytes)
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        # read1: what is available now; read() would wait for a full buffer (1 MiB) or EOF,
        # stalling every record behind a slow producer (tail -f | vecpipe ...)
        data = getattr(self._stream, "read1", self._stream.read)(len(buffer))
        if not data:
            return 0
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def _peek(stream, size: int = _SNIFF_BYTES):
    """Read enough of the start to sniff (what the producer has sent, up to `size` bytes, and at
    least 8 bytes past leading whitespace unless the input ends); return those bytes and an
    equivalent unread stream."""
    read = getattr(stream, "read1", stream.read)
    head = b""
    while len(head) < size and len(head.lstrip(b"\xef\xbb\xbf \t\r\n")) < 8:
        chunk = read(size - len(head))
        if not chunk:
            break
        head += chunk
    return head, io.BufferedReader(_Prefixed(head, stream), _PIPE_BUFFER)


def stdin_binary():
    """stdin as a binary stream with a 1 MiB buffer (sys.stdin.buffer where stdin has no fd,
    as under test runners)."""
    try:
        return open(sys.stdin.fileno(), "rb", buffering=_PIPE_BUFFER, closefd=False)
    except (io.UnsupportedOperation, AttributeError, ValueError):
        return sys.stdin.buffer


def open_input(path: str):
    """A buffered binary stream for a path or `-`, gzip/zstd unwrapped, plus its head bytes.

    Returns (stream, head, compression) where compression is None, "gzip" or "zstd".
    """
    if path == "-":
        raw = stdin_binary()
    else:
        try:
            raw = open(path, "rb", buffering=_PIPE_BUFFER)
        except FileNotFoundError:
            raise DataError("no such file", source=path) from None
        except IsADirectoryError:
            raise DataError("is a directory, expected a record file", source=path) from None
        except PermissionError:
            raise DataError("permission denied", source=path) from None
    head, stream = _peek(raw)
    if head.startswith(b"\x1f\x8b"):
        import gzip

        head, stream = _peek(gzip.GzipFile(fileobj=stream, mode="rb"))
        return stream, head, "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        import pyarrow as pa

        head, stream = _peek(pa.CompressedInputStream(pa.PythonFile(stream, mode="r"), "zstd"))
        return stream, head, "zstd"
    return stream, head, None


def sniff(head: bytes) -> str | None:
    """The format of a stream from its first bytes; None for an empty input."""
    if head.startswith(b"ARROW1"):
        return "arrow-file"
    if head.startswith(b"\xff\xff\xff\xff") or head.startswith(b"\x00\x00\x00\x00"):
        return "arrow"
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        return None if len(head) < _SNIFF_BYTES else "jsonl"
    if text.startswith(b"{"):
        return "jsonl"
    raise DataError(f"unrecognized input format (starts with {head[:16]!r})",
                    hint="name the format with --input-format jsonl|arrow|parquet|csv|tsv|text")


class RecordStream:
    """Several inputs read in order as one stream of SourceBatches of at most `batch_rows` rows.

    `schema` and `metadata` open the first non-empty input on demand. Inputs whose
    `vecpipe.*` model/dim/codec differ are refused unless `force`.
    """

    def __init__(self, inputs: list[str] | None, input_format: str | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS, force: bool = False):
        self.inputs = list(inputs) if inputs else ["-"]
        if self.inputs.count("-") > 1:
            raise UsageError("stdin (-) can be read only once")
        if input_format not in (None, *INPUT_FORMATS):
            raise UsageError(f"unknown input format {input_format!r}")
        self.input_format = None if input_format == "auto" else input_format
        self.batch_rows = batch_rows
        self.force = force
        self._iter = self._batches()
        self._pending: list[SourceBatch] = []
        self._schema = None
        self._started = False
        self.formats: dict[str, str] = {}

    @property
    def schema(self):
        """The schema of the first input that has one (None when every input is empty)."""
        while self._schema is None and not self._started:
            item = next(self._iter, None)
            if item is None:
                self._started = True
                break
            self._pending.append(item)
        return self._schema

    @property
    def metadata(self) -> dict[str, str]:
        return names.read_meta(self.schema)

    def __iter__(self) -> Iterator[SourceBatch]:
        while self._pending:
            yield self._pending.pop(0)
        yield from self._iter

    def _batches(self) -> Iterator[SourceBatch]:
        first_meta, first_name = None, None
        for path in self.inputs:
            name = STDIN_NAME if path == "-" else path
            for batch_schema, batches in self._read_one(path, name):
                meta = names.read_meta(batch_schema)
                if first_name is None:
                    first_meta, first_name = meta, name
                    self._schema = batch_schema
                else:
                    names.check_compatible(first_meta, meta, first_name, name, force=self.force)
                record = 1
                for batch in batches:
                    for start in range(0, max(batch.num_rows, 1), self.batch_rows):
                        piece = batch.slice(start, self.batch_rows)
                        if piece.num_rows or batch.num_rows == 0:
                            yield SourceBatch(piece, name, record)
                        record += piece.num_rows
        self._started = True

    def _read_one(self, path: str, name: str):
        """Yield (schema, batch iterator) for one input; nothing for an empty input."""
        stream, head, compression = open_input(path)
        fmt = self.input_format or sniff(head)
        if fmt is None:
            stream.close()
            return
        self.formats[name] = fmt + (f"+{compression}" if compression else "")
        seekable_path = None if (compression or path == "-") else path
        try:
            yield from read_opened(stream, fmt, name, seekable_path, self.batch_rows)
        finally:
            stream.close()


def read_opened(stream, fmt: str, name: str, seekable_path: str | None = None,
                batch_rows: int = DEFAULT_BATCH_ROWS):
    """(schema, batch iterator) pairs of a stream already opened and sniffed with `open_input`
    (for callers that look at the head bytes first, e.g. to tell a TREC file from records).
    `seekable_path`: the plain file behind the stream, for memory-mapped Arrow/Parquet reads."""
    try:
        yield from _READERS[fmt](stream, name, seekable_path, batch_rows)
    except DataError as err:
        raise err.located(name)
    except UnicodeDecodeError as err:
        raise DataError(f"invalid UTF-8 ({err.reason})", source=name) from None
    except OSError as err:
        raise DataError(f"read failed: {err}", source=name) from None


def _arrow_error(name: str, err: Exception, record: int) -> DataError:
    return DataError(f"truncated or corrupt Arrow data: {err}", source=name, record=record)


def _read_arrow_stream(stream, name, _path, _rows):
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(stream)
    except (pa.ArrowInvalid, OSError) as err:
        raise _arrow_error(name, err, 1) from None

    def batches():
        record = 1
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as err:
                raise _arrow_error(name, err, record) from None
            record += batch.num_rows
            yield batch

    yield reader.schema, batches()


def _read_arrow_file(stream, name, path, _rows):
    import pyarrow as pa

    try:
        source = pa.memory_map(path) if path else pa.py_buffer(stream.read())
        reader = pa.ipc.open_file(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise _arrow_error(name, err, 1) from None
    yield reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _read_parquet(stream, name, path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path if path else pa.BufferReader(stream.read()))
        schema = pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"corrupt Parquet data: {err}", source=name) from None

    def batches():
        try:
            yield from pf.iter_batches(batch_size=rows)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"corrupt Parquet data: {err}", source=name) from None

    yield schema, batches()


def _read_delimited(delimiter: str):
    def read(stream, name, _path, rows):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        try:
            reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=1 << 20),
                                   parse_options=pcsv.ParseOptions(delimiter=delimiter))
        except pa.ArrowInvalid as err:
            raise DataError(f"invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {err}",
                            source=name) from None

        def batches():
            try:
                yield from reader
            except pa.ArrowInvalid as err:
                raise DataError(f"invalid delimited text: {err}", source=name) from None

        yield reader.schema, batches()
    return read


def _read_text(stream, name, _path, rows):
    import pyarrow as pa

    schema = pa.schema([pa.field(names.TEXT, pa.string())])

    def batches():
        lines = []
        for raw in stream:
            lines.append(raw.decode("utf-8").rstrip("\n").rstrip("\r"))
            if len(lines) == rows:
                yield pa.record_batch([pa.array(lines, pa.string())], schema=schema)
                lines = []
        if lines:
            yield pa.record_batch([pa.array(lines, pa.string())], schema=schema)

    yield schema, batches()


def _read_jsonl(stream, name, _path, rows):
    from .jsonl import JsonlBatcher

    batcher = JsonlBatcher(stream, name, rows)
    first = batcher.first()
    if first is None:
        return
    yield first.schema, batcher.batches(first)


_READERS = {
    "arrow": _read_arrow_stream,
    "arrow-file": _read_arrow_file,
    "parquet": _read_parquet,
    "csv": _read_delimited(","),
    "tsv": _read_delimited("\t"),
    "text": _read_text,
    "jsonl": _read_jsonl,
}


def read_table(inputs: list[str] | None, input_format: str | None = None, force: bool = False):
    """Everything as one pyarrow Table (for commands that are inherently global)."""
    import pyarrow as pa

    stream = RecordStream(inputs, input_format, force=force)
    batches = [item.batch for item in stream]
    if stream.schema is None:
        return None
    aligned = [names.align_batch(b, stream.schema) for b in batches]
    return pa.Table.from_batches(aligned, stream.schema)
