"""Readers: several inputs (paths or `-`) read in order as one stream of bounded RecordBatches.

The format is sniffed from the first bytes (gzip/zstd unwrapped first), and sniffing reads
ahead instead of seeking, so pipes work. Only CSV and TSV, which no first bytes tell, are
known by their names (`.csv`, `.tsv`, also `.gz`/`.zst`), unless the bytes say Arrow or Parquet.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError, UsageError

DEFAULT_BATCH_ROWS = 1024
INPUT_FORMATS = ("auto", "jsonl", "arrow", "arrow-file", "parquet", "csv", "tsv", "text")
STDIN_NAME = "<stdin>"


def shown_name(path: str) -> str:
    """How messages name an input: `<stdin>` for `-`."""
    return STDIN_NAME if path == "-" else path
_PIPE_BUFFER = 1 << 20
SNIFF_BYTES = 512


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


def _peek(stream, size: int = SNIFF_BYTES):
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


def prepended(head: bytes, stream):
    """`stream` with `head`, bytes already read from it, put back in front (a caller that had
    to look at stdin first hands this to RecordStream as its `stdin`)."""
    return io.BufferedReader(_Prefixed(head, stream), _PIPE_BUFFER)


def open_input(path: str, stdin=None):
    """A buffered binary stream for a path or `-` (`stdin`, else the process's), gzip/zstd
    unwrapped, plus its head bytes.

    Returns (stream, head, compression) where compression is None, "gzip" or "zstd".
    """
    if path == "-":
        raw = stdin if stdin is not None else stdin_binary()
    else:
        try:
            raw = open(path, "rb", buffering=_PIPE_BUFFER)
        except FileNotFoundError:
            raise DataError("no such file", source=path) from None
        except IsADirectoryError:
            raise DataError("is a directory, expected a record file", source=path) from None
        except PermissionError:
            raise DataError("permission denied", source=path) from None
    try:
        opened = _unwrapped(raw)
    except EOFError as err:  # gzip's "Compressed file ended before the end-of-stream marker"
        raise DataError(f"truncated compressed input: {err}",
                        source=STDIN_NAME if path == "-" else path) from None
    except (OSError, zlib.error) as err:
        raise DataError(f"read failed: {_os_cause(err)}",
                        source=STDIN_NAME if path == "-" else path) from None
    if path == "-" and not opened[1] and _is_pipe(raw):
        opened[0].close()
        raise DataError("empty input: nothing arrived on the pipe", source=STDIN_NAME,
                        hint="if the command before it in the pipe failed, its error is above; "
                             "an empty file is read as no records when given by name or with <")
    return opened


def _is_pipe(stream) -> bool:
    """True for a pipe, FIFO or socket, where zero bytes usually mean that the producer died
    before writing, not an empty input (unlike `< empty.jsonl` or `< /dev/null`)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _unwrapped(raw):
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


def sniff(head: bytes, name: str | None = None) -> str | None:
    """The format of a stream from its first bytes; None for an empty input. `name` (the
    input's) is cited when the format is not recognized."""
    if head.startswith(b"ARROW1"):
        return "arrow-file"
    if head.startswith(b"\xff\xff\xff\xff") or head.startswith(b"\x00\x00\x00\x00"):
        return "arrow"
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        return None if len(head) < SNIFF_BYTES else "jsonl"
    if text.startswith(b"{"):
        return "jsonl"
    raise DataError(f"unrecognized input format (starts with {head[:16]!r})", source=name,
                    hint="name the format with --input-format jsonl|arrow|parquet|csv|tsv|text")


_DELIMITED_NAMES = {".csv": "csv", ".tsv": "tsv"}
_COMPRESSED_NAMES = (".gz", ".zst", ".zstd")


def named_format(path: str) -> str | None:
    """"csv" or "tsv" for a path named so (a compression suffix stripped first), else None."""
    name = path.lower()
    for suffix in _COMPRESSED_NAMES:
        name = name.removesuffix(suffix)
    return _DELIMITED_NAMES.get(os.path.splitext(name)[1])


def input_format_of(head: bytes, path: str, name: str | None = None) -> str | None:
    """The format of an input: Arrow or Parquet by their first bytes, else CSV/TSV by the
    name, else sniffed (see `sniff`)."""
    named = named_format(path) if path != "-" else None
    try:
        sniffed = sniff(head, name)
    except DataError:
        if named is None:
            raise
        return named
    return named if named is not None and sniffed == "jsonl" else sniffed


def check_one_stdin(paths) -> None:
    """Refuse `-` named more than once: stdin can be read only once."""
    if list(paths).count("-") > 1:
        raise UsageError("stdin (-) can be read only once")


class RecordStream:
    """Several inputs read in order as one stream of SourceBatches of at most `batch_rows` rows.

    `schema` and `metadata` open the first non-empty input on demand. `check(first_meta, meta,
    first_name, name)` runs on the `vecpipe.*` metadata of each later input (commands pass
    core.space's vector-space check; None compares nothing). JSONL batches carry the
    schema widened so far (a field null at first or first seen later), so a batch's schema can
    be wider than `schema`. `text_fields`: in JSONL, a value there that is not a string becomes
    null, for a command that skips records without text (embed --skip-invalid). `unsniffed`:
    the format of an input that looks like none of the sniffed ones (search reads such queries
    as `text` lines) instead of an error. `stdin`: a binary stream read for `-` instead of the
    process's stdin.
    """

    def __init__(self, inputs: list[str] | None, input_format: str | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS,
                 check: Callable[[dict, dict, str, str], None] | None = None,
                 text_fields: tuple[str, ...] = (), unsniffed: str | None = None,
                 stdin=None):
        self.inputs = list(inputs) if inputs else ["-"]
        check_one_stdin(self.inputs)
        if input_format not in (None, *INPUT_FORMATS):
            raise UsageError(f"unknown input format {input_format!r}")
        self.input_format = None if input_format == "auto" else input_format
        self.batch_rows = batch_rows
        self.check = check
        self.text_fields = tuple(text_fields)
        self.unsniffed = unsniffed
        self.stdin = stdin
        self._iter = self._batches()
        self._pending: list[SourceBatch] = []
        self._schema = None
        self._started = False
        self.formats: dict[str, str] = {}
        self.widest_schema = None  # `schema` widened by every batch read so far


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

    def peek(self) -> SourceBatch | None:
        """The first batch, left to be read (None when every input is empty)."""
        if self.schema is None:
            return None
        return self._pending[0] if self._pending else None

    def __iter__(self) -> Iterator[SourceBatch]:
        while self._pending:
            yield self._pending.pop(0)
        yield from self._iter

    def _batches(self) -> Iterator[SourceBatch]:
        first_meta, first_name = None, None
        for path in self.inputs:
            name = STDIN_NAME if path == "-" else str(path)
            for batch_schema, batches in self._read_one(path, name):
                meta = names.read_meta(batch_schema)
                if first_name is None:
                    first_meta, first_name = meta, name
                    self._schema = batch_schema
                elif self.check is not None:
                    self.check(first_meta, meta, first_name, name)
                record = 1
                for batch in batches:
                    for start in range(0, max(batch.num_rows, 1), self.batch_rows):
                        piece = batch.slice(start, self.batch_rows)
                        if piece.num_rows or batch.num_rows == 0:
                            self._widen(piece.schema)
                            yield SourceBatch(piece, name, record)
                        record += piece.num_rows
        self._started = True

    def _widen(self, schema) -> None:
        from vecpipe.formats.jsonl import widened_schema

        if self.widest_schema is None:
            self.widest_schema = schema
        elif schema is not self.widest_schema:
            self.widest_schema = widened_schema(self.widest_schema, schema)

    def _read_one(self, path: str, name: str):
        """Yield (schema, batch iterator) for one input; nothing for an empty input."""
        if not isinstance(path, str):  # a formats.files.FileTree: one record per file
            self.formats[name] = "files"
            yield from path.read(self.batch_rows)
            return
        stream, head, compression = open_input(path, self.stdin)
        try:
            fmt = self.input_format or input_format_of(head, path, name)
        except DataError:
            if self.unsniffed is None:
                stream.close()
                raise
            fmt = self.unsniffed
        if fmt is None:
            stream.close()
            return
        self.formats[name] = fmt + (f"+{compression}" if compression else "")
        seekable_path = None if (compression or path == "-") else path
        try:
            yield from read_opened(stream, fmt, name, seekable_path, self.batch_rows,
                                   self.text_fields)
        finally:
            stream.close()


def read_opened(stream, fmt: str, name: str, seekable_path: str | None = None,
                batch_rows: int = DEFAULT_BATCH_ROWS, text_fields: tuple[str, ...] = ()):
    """(schema, batch iterator) pairs of a stream already opened and sniffed with `open_input`
    (for callers that look at the head bytes first, e.g. to tell a TREC file from records).
    `seekable_path`: the plain file behind the stream, for memory-mapped Arrow/Parquet reads."""
    read = functools.partial(_read_jsonl, text_fields=text_fields) if fmt == "jsonl" \
        else _READERS[fmt]
    for schema, batches in _located(read(stream, name, seekable_path, batch_rows), name):
        yield schema, _located(batches, name)


def _located(items, name: str):
    """`items`, with read failures (bad UTF-8, a truncated gzip, I/O errors) as DataErrors
    naming the input: the batches are read after the (schema, batches) pair is handed out."""
    try:
        yield from items
    except DataError as err:
        raise err.located(name)
    except UnicodeDecodeError as err:
        raise DataError(f"invalid UTF-8 ({err.reason})", source=name) from None
    except EOFError as err:  # gzip's "Compressed file ended before the end-of-stream marker"
        raise DataError(f"truncated compressed input: {err}", source=name) from None
    except (OSError, zlib.error) as err:
        raise DataError(f"read failed: {_os_cause(err)}", source=name) from None


def _os_cause(err: Exception) -> str:
    return (getattr(err, "strerror", None) or str(err)) if getattr(err, "errno", None) \
        else str(err)


def _arrow_error(name: str, err: Exception, record: int) -> DataError:
    return DataError(f"truncated or corrupt Arrow data: {err}", source=name, record=record)


UNTERMINATED = "stream ended without an end-of-stream marker: the producer failed"


class _EndWatch:
    """A file object for pyarrow that notes whether a read hit the end of `stream`.

    pyarrow's stream reader takes a plain EOF at a message boundary for a normal end; only the
    end-of-stream marker means the producer finished. pyarrow reads exactly the bytes of each
    frame and nothing past the marker, so a read that comes back short means the input ended
    before (or without) the marker.
    """

    closed = False

    def __init__(self, stream):
        self._stream = stream
        self.hit_end = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if size is None or size < 0 or len(data) < size:
            self.hit_end = True
        return data


def open_arrow_stream(stream, name: str):
    """(schema, batch iterator) of an Arrow IPC stream that must end with its end-of-stream
    marker: the one checked reader of IPC streams. A stream cut short (a producer that failed
    or was killed) is a DataError at the record after the last complete batch, never an end."""
    import pyarrow as pa

    watch = _EndWatch(stream)
    try:
        reader = pa.ipc.open_stream(watch)
    except (pa.ArrowInvalid, OSError) as err:
        raise (DataError(UNTERMINATED, source=name, record=1) if watch.hit_end
               else _arrow_error(name, err, 1)) from None

    def batches():
        record = 1
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                if watch.hit_end:
                    raise DataError(UNTERMINATED, source=name, record=record) from None
                return
            except (pa.ArrowInvalid, OSError) as err:
                raise (DataError(UNTERMINATED, source=name, record=record) if watch.hit_end
                       else _arrow_error(name, err, record)) from None
            record += batch.num_rows
            yield batch

    return reader.schema, batches()


def _read_arrow_stream(stream, name, _path, _rows):
    yield open_arrow_stream(stream, name)


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

        from vecpipe.formats.delimited import read_convert_options

        try:
            # one thread: a streaming reader's readahead thread, still running when the
            # process exits, aborts it ("terminate called without an active exception")
            reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=1 << 20,
                                                                         use_threads=False),
                                   parse_options=pcsv.ParseOptions(delimiter=delimiter,
                                                                   newlines_in_values=True),
                                   convert_options=read_convert_options())
        except pa.ArrowInvalid as err:
            raise _delimited_error(err, name, delimiter) from None

        def batches():
            try:
                yield from reader
            except pa.ArrowInvalid as err:
                raise _delimited_error(err, name, delimiter) from None

        yield reader.schema, batches()
    return read


def _delimited_error(err: Exception, name: str, delimiter: str) -> DataError:
    """pyarrow's CSV error as a DataError; a failed producer's last line (ABORTED_LINE) is
    the stream cut short, at its record (pyarrow counts the header as row 1)."""
    import re

    from vecpipe.formats.jsonl import ABORTED_LINE, STREAM_CUT_SHORT

    row = re.search(r"Row #(\d+)", str(err))
    record = int(row.group(1)) - 1 if row else None
    if ABORTED_LINE.strip().decode() in str(err):
        return DataError(STREAM_CUT_SHORT, source=name, record=record)
    return DataError(f"invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {err}", source=name,
                     record=record)


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


def _read_jsonl(stream, name, _path, rows, text_fields=()):
    from vecpipe.formats.jsonl import JsonlBatcher

    batcher = JsonlBatcher(stream, name, rows, text_fields)
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


def fit_batch(item: SourceBatch, schema):
    """`item.batch` aligned to `schema`, which a command fixed from the first records. A batch
    whose schema widened past it (a JSONL field first typed, or first seen, in a later record)
    is a DataError at the first record that needs the wider schema."""
    from vecpipe.formats.jsonl import widened_schema

    try:
        return names.align_batch(item.batch, schema)
    except DataError as err:
        wider = widened_schema(schema, item.batch.schema)
        changed = [f for f in wider if f.name not in schema.names or
                   not f.type.equals(schema.field(f.name).type)]
        if not changed:
            raise err.located(item.source, item.first_record)
        field = changed[0]
        valid = item.batch.column(field.name).is_valid().to_numpy(zero_copy_only=False)
        raise DataError(f"field {field.name!r} first holds {field.type} here, after the "
                        "output's fields were fixed by the first records", source=item.source,
                        record=item.first_record + int(valid.argmax()),
                        hint="convert the input first (vecpipe convert IN -o IN.arrow "
                             "widens the fields), or put a record with this field first") \
            from None


def read_table(inputs: list[str] | None, input_format: str | None = None,
               check: Callable[[dict, dict, str, str], None] | None = None):
    """Everything as one pyarrow Table (for commands that are inherently global), under the
    schema widened by every batch; `check` as RecordStream's."""
    import pyarrow as pa

    stream = RecordStream(inputs, input_format, check=check)
    batches = [item.batch for item in stream]
    if stream.schema is None:
        return None
    schema = stream.widest_schema or stream.schema
    aligned = [names.align_batch(b, schema) for b in batches]
    return pa.Table.from_batches(aligned, schema)
