"""Writers: one RecordWriter for every output format, atomic for files, safe for terminals."""
from __future__ import annotations

import errno
import io
import os
import stat
import sys
import tempfile

from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.jsonl import ABORTED_LINE, batch_to_lines, widened_schema

OUTPUT_FORMATS = ("auto", "arrow", "arrow-file", "jsonl", "parquet", "csv", "tsv")
BINARY_FORMATS = ("arrow", "arrow-file", "parquet")
DELIMITED_FORMATS = ("csv", "tsv")  # one value per cell: no vectors
GZIP_FORMATS = ("jsonl", "csv", "tsv", "trec")  # text formats a `.gz` name compresses
REPORT_FORMATS = ("auto", "table", "jsonl", "json", "csv", "tsv")
KNOWN_FORMATS = ("auto", "arrow", "arrow-file", "jsonl", "parquet", "csv", "tsv", "trec",
                 "table", "json")
ENV_OUTPUT_FORMAT = "VECPIPE_OUTPUT_FORMAT"
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".arrow": "arrow-file", ".feather": "arrow-file", ".ipc": "arrow-file",
    ".arrows": "arrow",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".trec": "trec",  # for commands that write TREC runs (search)
}
GZIP_SUFFIX = ".gz"
_PIPE_BUFFER = 1 << 20
STDOUT_NAME = "<stdout>"
_CAUSES = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EBADF: "output is closed",
    errno.EISDIR: "is a directory, expected a file name",
}


def write_error(err: OSError, target: str | None) -> Exception:
    """The DataError for a failed write to `target` (None: stdout); a broken pipe stays itself
    (the error boundary makes it a quiet exit 0: our reader went away)."""
    if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
        return err
    cause = _CAUSES.get(err.errno) or f"write failed: {err.strerror or err}"
    hint = "free some space, or write elsewhere with -o" if err.errno == errno.ENOSPC else None
    return DataError(cause, source=target or STDOUT_NAME, hint=hint)


def resolve_output_format(output: str | None, output_format: str = "auto",
                          stdout_isatty: bool | None = None, extra: tuple[str, ...] = (),
                          vectors: bool | None = True) -> str:
    """`auto`: from -o's name (`out.jsonl.gz` is gzipped JSONL); a name without one that is
    no plain file (`-o /dev/null`, a FIFO) is treated as a pipe; else VECPIPE_OUTPUT_FORMAT,
    else JSONL on a terminal and, on a pipe, Arrow IPC for a stream that carries vectors and
    JSONL for one without.

    `vectors`: whether the stream carries vectors, which CSV/TSV cannot hold (a usage error);
    None: not known yet (Arrow on a pipe; RecordWriter checks CSV against its schema).
    `extra` names command-specific text formats (e.g. `trec`) that are allowed too.
    """
    to_stdout = output in (None, "-")
    if stdout_isatty is None:  # sys.stdout is None when started with stdout closed (>&-)
        stdout_isatty = to_stdout and sys.stdout is not None and sys.stdout.isatty()
    accepted = OUTPUT_FORMATS + extra
    if output_format not in accepted:
        raise UsageError(f"unknown output format {output_format!r}; choose from "
                         f"{', '.join(accepted)}")
    if output_format == "auto":
        named = None if to_stdout else _named_format(output, accepted)
        if named is not None:
            output_format = named
        else:
            text_ok = vectors is False
            chosen = environment_format(accepted if text_ok else
                                        tuple(f for f in accepted if f not in DELIMITED_FORMATS))
            if chosen is None:
                return "jsonl" if stdout_isatty or vectors is False else "arrow"
            output_format = chosen
    if vectors and output_format in DELIMITED_FORMATS:
        raise vectors_in_text_error(output_format)
    if output_compression(output) and output_format not in GZIP_FORMATS:
        raise UsageError(f"a {GZIP_SUFFIX} name compresses text formats "
                         f"({', '.join(GZIP_FORMATS)}), not {output_format}",
                         hint="drop the .gz (Parquet compresses itself; Arrow takes "
                              "vecpipe compress for smaller vectors)")
    if to_stdout and stdout_isatty and output_format in BINARY_FORMATS:
        raise UsageError(f"refusing to write binary {output_format} to a terminal",
                         hint="redirect stdout, use -o FILE, or --output-format jsonl")
    return output_format


def vectors_in_text_error(fmt: str) -> UsageError:
    return UsageError(f"{fmt.upper()} holds one value per cell, not vectors: this stream "
                      "carries vectors",
                      hint="write .arrow or .parquet (or .jsonl), or drop the vectors first: "
                           "vecpipe convert IN --fields id,text -o OUT." + fmt)


def output_compression(output: str | None) -> str | None:
    """"gzip" for an -o name ending in .gz, else None."""
    if output in (None, "-") or not output.lower().endswith(GZIP_SUFFIX):
        return None
    return "gzip"


def _named_format(output: str, accepted: tuple[str, ...]) -> str | None:
    """The format -o's name says (`.gz` stripped first); None for a name without one that is
    a device or FIFO (written as a pipe); an unknown or unfit name is a usage error."""
    name = output[:-len(GZIP_SUFFIX)] if output_compression(output) else output
    ext = os.path.splitext(name)[1].lower()
    known = [e for e, f in _EXTENSIONS.items() if f in accepted]
    if ext not in _EXTENSIONS:
        if not ext and _is_special_file(output):
            return None
        raise UsageError(f"cannot tell the output format from {output!r}",
                         hint=f"use a name ending in {', '.join(known)} (text formats also "
                              f"+{GZIP_SUFFIX}) or --output-format")
    fmt = _EXTENSIONS[ext]
    if fmt not in accepted:
        raise UsageError(f"this command does not write {fmt} ({output!r})",
                         hint=f"use a name ending in {', '.join(known)} or --output-format")
    return fmt


def _is_special_file(path: str) -> bool:
    """A device, FIFO or socket (`/dev/null`, a named pipe): written in place, as a pipe."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def carries_vectors(schema) -> bool:
    """Whether records of `schema` (None: no records) hold vectors, which decides Arrow or
    JSONL on a pipe: a fixed-size list of numbers, packed bits (fixed-size binary), or an
    `embedding` list of numbers. (A variable list elsewhere, such as mined `scores`, is not.)"""
    import pyarrow as pa

    def numbers(dtype) -> bool:
        return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)

    for field in schema or ():
        t = field.type
        if pa.types.is_fixed_size_binary(t) \
                or (pa.types.is_fixed_size_list(t) and numbers(t.value_type)) \
                or (field.name == names.EMBEDDING and pa.types.is_list(t)
                    and numbers(t.value_type)):
            return True
    return False


def resolve_report_format(output_format: str = "auto",
                          stdout_isatty: bool | None = None) -> str:
    """A report's format: `table`, `jsonl`, `json`, `csv` or `tsv` (a header and a line per
    record); `auto`: VECPIPE_OUTPUT_FORMAT, else a table on a terminal and JSON lines
    otherwise."""
    if output_format not in REPORT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; choose from "
                         f"{', '.join(REPORT_FORMATS)}")
    if output_format != "auto":
        return output_format
    chosen = environment_format(REPORT_FORMATS)
    if chosen is not None:
        return chosen
    if stdout_isatty is None:
        stdout_isatty = sys.stdout is not None and sys.stdout.isatty()
    return "table" if stdout_isatty else "jsonl"


def environment_format(accepted: tuple[str, ...]) -> str | None:
    """VECPIPE_OUTPUT_FORMAT where this command can write it (None: unset, `auto`, or a format
    only other commands write); a name no command knows is a usage error."""
    value = os.environ.get(ENV_OUTPUT_FORMAT, "").strip()
    if value in ("", "auto"):
        return None
    if value not in KNOWN_FORMATS:
        raise UsageError(f"unknown {ENV_OUTPUT_FORMAT} {value!r}; choose from "
                         f"{', '.join(KNOWN_FORMATS)}")
    return value if value in accepted else None


def print_report_records(records: list[dict], report_format: str) -> None:
    """Report records on stdout: one JSON object per line (`jsonl`), one JSON array (`json`),
    or a header and a line per record (`csv`, `tsv`; nested values as JSON text)."""
    import json

    if report_format in DELIMITED_FORMATS:
        from vecpipe.formats.delimited import records_as_delimited

        sys.stdout.write(records_as_delimited(records, report_format).decode())
        sys.stdout.flush()
        return
    if report_format == "json":
        print(json.dumps(records, ensure_ascii=False), flush=True)
        return
    for record in records:
        print(json.dumps(record, ensure_ascii=False), flush=True)


def stdout_binary():
    """stdout as a binary stream with a 1 MiB buffer (sys.stdout.buffer where stdout has no fd,
    as under test runners). Text already printed is flushed first to keep the order."""
    if sys.stdout is None:
        raise DataError("stdout is closed", source=STDOUT_NAME,
                        hint="redirect stdout to a file or pipe, or use -o FILE")
    sys.stdout.flush()
    try:
        return open(sys.stdout.fileno(), "wb", buffering=_PIPE_BUFFER, closefd=False)
    except (io.UnsupportedOperation, AttributeError, ValueError):
        return sys.stdout.buffer


class AtomicFile:
    """A binary file written under a temporary name in the target folder, renamed on commit.

    A symlink is written through: its target is replaced, the link stays. A device, FIFO or
    socket (`-o /dev/null`, a named pipe) is written in place (`direct`): renaming a file onto
    it would replace the node itself, and run as root that removes /dev/null for everyone.
    """

    def __init__(self, path: str):
        self.path = path  # as the user named it, for messages
        self.target, self.direct = _write_target(path)
        folder = os.path.dirname(self.target)
        if not os.path.isdir(folder):
            raise UsageError(f"output folder does not exist: {folder}")
        if os.path.isdir(self.target):  # found now, not by the rename after all the work
            raise DataError("is a directory, expected a file name", source=path)
        self.tmp = None
        try:
            if self.direct:
                self.file = open(self.target, "wb", buffering=_PIPE_BUFFER)
                return
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.target)}.",
                                            suffix=".tmp", dir=folder)
        except OSError as err:
            raise write_error(err, path) from None
        self.file = os.fdopen(fd, "wb", buffering=_PIPE_BUFFER)

    def commit(self) -> None:
        """Close and rename into place; on any failure (the final flush, the rename) the
        temporary file is removed and the error raised (OSError as a DataError)."""
        try:
            self.file.close()
            if not self.direct:
                os.chmod(self.tmp, 0o644 & ~current_umask())
                os.replace(self.tmp, self.target)
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise write_error(err, self.path) from None
            raise

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def _write_target(path: str) -> tuple[str, bool]:
    """(the path to write, whether to write it in place rather than rename onto it)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        return os.path.realpath(path), False  # a new name, or a dangling link's target
    except OSError:
        return os.path.abspath(path), False  # let the write report it, naming the file
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return os.path.realpath(path), False
    return os.path.abspath(path), True


def current_umask() -> int:
    """The process umask (reading it means setting it; set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RecordWriter:
    """Write RecordBatches to `-o PATH` (atomically) or stdout, in one output format.

    The schema is fixed by `schema=` or the first batch; later batches are aligned to it.
    `widen`: a batch with a field that is new, or null in the schema so far, widens the schema
    instead (as a JSONL stream's does): free for JSONL, a rewrite of what a binary file output
    holds so far, and a DataError on a binary stdout (its schema is already out); CSV/TSV
    gain the new columns (a file output is rewritten with them empty before).
    `metadata` (vecpipe keys without prefix) is added to the schema. Use as a context manager:
    the file appears only when the block ends without an exception. Write failures (disk
    full...) are DataErrors naming the output.
    """

    def __init__(self, output: str | None, output_format: str = "auto", schema=None,
                 metadata: dict | None = None, widen: bool = False):
        self.output = None if output in (None, "-") else output
        self.format = resolve_output_format(output, output_format, vectors=None)
        self.metadata = metadata or {}
        self.widen = widen
        self.schema = None
        self.rows = 0
        self._atomic = AtomicFile(self.output) if self.output else None
        self._sink = self._writer = None
        try:
            self._sink = _file_sink(self._atomic, self.output) if self._atomic \
                else stdout_binary()
            if schema is not None:
                self._start(schema)
        except BaseException:  # e.g. Ctrl-C/SIGTERM while pyarrow.parquet imports
            self.abort()
            raise

    def _start(self, schema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = names.with_meta(schema, self.metadata) if self.metadata else schema
        if self.format in DELIMITED_FORMATS and carries_vectors(schema):
            raise vectors_in_text_error(self.format)
        try:
            if self.format in DELIMITED_FORMATS:
                from vecpipe.formats.delimited import header

                self._sink.write(header(self.schema.names, self.format))
            elif self.format == "arrow":
                self._writer = pa.ipc.new_stream(self._sink, self.schema)
            elif self.format == "arrow-file":
                self._writer = pa.ipc.new_file(self._sink, self.schema)
            elif self.format == "parquet":
                self._writer = pq.ParquetWriter(self._sink, self.schema)
        except OSError as err:
            raise write_error(err, self.output) from None

    def write(self, batch, source: str | None = None, first_record: int | None = None) -> None:
        """Write `batch`; `source`/`first_record` (where it was read) locate a widening that
        cannot be written."""
        if self.schema is None:
            self._start(batch.schema)
        if self.widen:
            wider = widened_schema(self.schema, batch.schema)
            if not wider.equals(self.schema, check_metadata=False):
                self._widen_to(wider, batch, source, first_record)
        batch = names.align_batch(batch, self.schema)
        try:
            if self.format == "jsonl":
                self._sink.write(batch_to_lines(batch))
            elif self.format in DELIMITED_FORMATS:
                from vecpipe.formats.delimited import batch_to_delimited

                self._sink.write(batch_to_delimited(batch, self.format))
            elif batch.num_rows or self.format != "parquet":
                self._writer.write_batch(batch)
        except OSError as err:
            raise write_error(err, self.output) from None
        self.rows += batch.num_rows

    def _widen_to(self, schema, batch, source, first_record) -> None:
        if self.format == "jsonl" or (self.format in DELIMITED_FORMATS
                                      and schema.names == self.schema.names):
            self.schema = schema  # nothing written changes (lines carry no types)
            return
        if self._atomic is not None and not self._atomic.direct:
            if self.format in DELIMITED_FORMATS:
                self._rewrite_delimited(schema)
            else:
                self._rewrite(schema)
            return
        changed = next(f for f in schema if f.name not in self.schema.names
                       or not f.type.equals(self.schema.field(f.name).type))
        valid = batch.column(changed.name).is_valid().to_numpy(zero_copy_only=False)
        record = None if first_record is None else first_record + int(valid.argmax())
        raise DataError(f"field {changed.name!r} first holds {changed.type} here, after the "
                        f"{self.format} stream on stdout began with the schema of the first "
                        "records (an Arrow stream has one schema)", source=source,
                        record=record,
                        hint="write JSONL (--output-format jsonl) or a file (-o FILE), or put "
                             "a record with this field first")

    def _rewrite(self, schema) -> None:
        """Write the file so far again under the wider `schema` (rare: once per widening)."""
        old_atomic, old_writer = self._atomic, self._writer
        try:
            old_writer.close()
            old_atomic.file.flush()
        except OSError as err:
            raise write_error(err, self.output) from None
        self._atomic = AtomicFile(self.output)
        self._sink, self._writer = self._atomic.file, None
        try:
            self._start(schema)
            for batch in _written_batches(old_atomic.tmp, self.format):
                self._writer.write_batch(names.align_batch(batch, self.schema))
        except OSError as err:
            raise write_error(err, self.output) from None
        finally:
            old_atomic.abort()

    def _rewrite_delimited(self, schema) -> None:
        """Write the CSV/TSV so far again with the new columns of `schema` (at the end) empty."""
        from vecpipe.formats.delimited import added_columns, header

        old_atomic = self._atomic
        added = len(schema.names) - len(self.schema.names)
        try:
            _finish(self._sink, old_atomic)  # a gzip stream's trailer; else a flush
            old_atomic.file.flush()
            self._atomic = AtomicFile(self.output)
            self._sink = _file_sink(self._atomic, self.output)
            with _open_written(old_atomic.tmp, output_compression(self.output)) as lines:
                for line in added_columns(lines, added, header(schema.names, self.format),
                                          self.format):
                    self._sink.write(line)
        except OSError as err:
            raise write_error(err, self.output) from None
        finally:
            old_atomic.abort()
        self.schema = schema

    def write_table(self, table) -> None:
        for batch in table.to_batches():
            self.write(batch)
        if table.num_rows == 0 and self.schema is None:
            self._start(table.schema)

    def flush(self) -> None:
        """Send what was written so far on (a reader downstream sees each answer at once)."""
        try:
            self._sink.flush()
        except OSError as err:
            raise write_error(err, self.output) from None

    def close(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            _finish(self._sink, self._atomic)
        except OSError as err:
            raise write_error(err, self.output) from None
        if self._atomic:
            self._atomic.commit()

    def abort(self) -> None:
        """Drop a file output; on stdout, stop without writing an end-of-stream marker (or a
        file footer), so a reader downstream sees the stream as cut short; JSONL and CSV/TSV,
        which have no marker, end with ABORTED_LINE instead (not on a terminal).

        The writer is dropped, never closed: closing would write the marker. pyarrow's IPC
        writers write nothing when dropped; a ParquetWriter would close itself in __del__.
        """
        if self._atomic:
            _drop(self._sink, self._atomic)
        elif self._sink is not None:
            try:  # what was produced goes out, so a reader sees a stream without its end
                if self.format in ("jsonl", *DELIMITED_FORMATS) \
                        and not _is_terminal(self._sink):
                    self._sink.write(ABORTED_LINE)
                self._sink.flush()
            except (OSError, ValueError):
                pass
        if hasattr(self._writer, "is_open"):
            self._writer.is_open = False
        self._writer = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def _file_sink(atomic: AtomicFile, output: str):
    """What a file output writes to: the file, or a gzip stream into it for a `.gz` name
    (no name or time in the header: the same records give the same bytes)."""
    if output_compression(output) is None:
        return atomic.file
    import gzip

    return gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=atomic.file,
                         mtime=0)


def _finish(sink, atomic: AtomicFile | None) -> None:
    """Flush what `sink` holds; a gzip stream into a file is closed (its trailer written), the
    file left to the AtomicFile's commit."""
    if atomic is not None and sink is not atomic.file:
        sink.close()
    else:
        sink.flush()


def _drop(sink, atomic: AtomicFile) -> None:
    """Abort a file output; a gzip stream over it is closed first (else it would try to write
    its trailer to the closed file when collected)."""
    if sink is not None and sink is not atomic.file:
        try:
            sink.close()
        except (OSError, ValueError):
            pass
    atomic.abort()


def _open_written(path: str, compression: str | None):
    """A file this module wrote, for reading back (binary lines)."""
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _is_terminal(sink) -> bool:
    try:
        return os.isatty(sink.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


def _written_batches(path: str, fmt: str):
    """The batches of a file this module wrote and closed (for a rewrite)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vecpipe.formats.readers import open_arrow_stream

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches()
    elif fmt == "arrow-file":
        reader = pa.ipc.open_file(pa.memory_map(path))
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        with open(path, "rb") as stream:
            yield from open_arrow_stream(stream, path)[1]


def text_output(output: str | None):
    """A text sink for `-o PATH` (atomic) or stdout; for formats like TREC runs and reports."""
    return _TextOutput(None if output in (None, "-") else output)


class _TextOutput:
    def __init__(self, output: str | None):
        self.output = output
        self._atomic = AtomicFile(output) if output else None
        self._sink = _file_sink(self._atomic, output) if self._atomic else stdout_binary()

    def write(self, text: str) -> None:
        try:
            self._sink.write(text.encode())
        except OSError as err:
            raise write_error(err, self.output) from None

    def flush(self) -> None:
        try:
            self._sink.flush()
        except OSError as err:
            raise write_error(err, self.output) from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                _finish(self._sink, self._atomic)
            except OSError as err:
                if self._atomic:
                    self._atomic.abort()
                raise write_error(err, self.output) from None
            if self._atomic:
                self._atomic.commit()
        elif self._atomic:
            _drop(self._sink, self._atomic)
