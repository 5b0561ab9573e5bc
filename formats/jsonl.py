"""JSONL through orjson: lines -> RecordBatches with a schema that widens as fields show their
types, and batches -> lines."""
from __future__ import annotations

from typing import Iterator

import orjson

from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError

# A failed producer ends a JSONL stream on a pipe with this line: lines carry no end marker, and
# any JSON reader downstream (vecpipe, jq) fails on it instead of taking the records as complete.
ABORTED_LINE = b"vecpipe: the producer failed; this stream is incomplete\n"
STREAM_CUT_SHORT = "stream cut short: the producer failed"


_BOM = b"\xef\xbb\xbf"


class JsonlBatcher:
    """Parses a binary line stream into RecordBatches of `rows` records.

    The schema widens as records arrive: a field null so far takes the type of its first
    value, and a field first seen later joins (null before); each batch carries the schema
    widened so far. A value that fits neither is a DataError at its line. `embedding` columns
    become fixed_size_list<float32> so vectors keep one Arrow type whatever the JSON held.
    `text_fields`: a value there that is not a string becomes null (for a command that skips
    records without text).
    """

    def __init__(self, stream, name: str, rows: int, text_fields: tuple[str, ...] = ()):
        self.lines = enumerate(_without_bom(stream), 1)
        self.name = name
        self.rows = rows
        self.text_fields = tuple(text_fields)
        self.schema = None
        self.last_line = 0  # of the last record read

    def _records(self) -> tuple[list[dict], list[int]] | None:
        """The next records and the line number of each."""
        records, lines = [], []
        try:
            return self._read_records(records, lines)
        except EOFError as err:  # a truncated gzip: cite the line it cut
            line = (lines[-1] if lines else self.last_line) + 1
            raise DataError(f"truncated compressed input: {err}", source=self.name,
                            record=line) from None

    def _read_records(self, records: list[dict], lines: list[int]):
        for lineno, line in self.lines:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                if line.startswith(ABORTED_LINE.rstrip()):
                    raise DataError(STREAM_CUT_SHORT, source=self.name, record=lineno) from None
                raise DataError(f"invalid JSON: {err.msg}", source=self.name,
                                record=lineno) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}",
                                source=self.name, record=lineno)
            records.append(record)
            lines.append(lineno)
            if len(records) == self.rows:
                break
        if lines:
            self.last_line = lines[-1]
        return (records, lines) if records else None

    def _parse(self, records: list[dict], lines: list[int]):
        """The records as one batch with the types they hold themselves."""
        import pyarrow as pa

        for field in self.text_fields:
            for record in records:
                if not isinstance(record.get(field), (str, type(None))):
                    record[field] = None
        try:
            # from_pylist would keep only the first record's keys, silently dropping fields
            # that appear first in a later record of the batch.
            keys = dict.fromkeys(key for record in records for key in record)
            batch = pa.RecordBatch.from_pydict({key: [record.get(key) for record in records]
                                                for key in keys})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            bad, field = _first_inconsistent(records)
            raise DataError(f"field {field!r} has values of different types ({err})",
                            source=self.name, record=lines[bad]) from None
        return _vector_columns_to_float32(batch, self.name, lines)

    def _to_batch(self, records: list[dict], lines: list[int]):
        batch = self._parse(records, lines)
        if self.schema is None:
            self.schema = batch.schema
            return batch
        self.schema = widened_schema(self.schema, batch.schema)
        self._check_fits(batch, records, lines)
        return names.align_batch(batch, self.schema)

    def _check_fits(self, batch, records: list[dict], lines: list[int]) -> None:
        """Refuse a field whose values cannot take the schema's type, at the first such line."""
        import pyarrow as pa

        for field in batch.schema:
            target = self.schema.field(field.name).type
            if field.type.equals(target) or pa.types.is_null(field.type):
                continue
            try:
                batch.column(field.name).cast(target)
                continue
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
            bad = self._first_misfit(records, lines, field.name, target)
            raise DataError(f"field {field.name!r} changed type from {target} to {field.type}",
                            source=self.name, record=bad)

    def _first_misfit(self, records, lines, field: str, target) -> int:
        """The line of the first record whose `field` cannot take `target` (the error path)."""
        import pyarrow as pa

        for record, line in zip(records, lines):
            if record.get(field) is None:
                continue
            try:
                self._parse([{field: record[field]}], [line]).column(0).cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, DataError):
                return line
        return lines[0]

    def first(self):
        got = self._records()
        if got is None:
            return None
        return self._to_batch(*got)

    def batches(self, first) -> Iterator:
        yield first
        while (got := self._records()) is not None:
            yield self._to_batch(*got)


def _without_bom(stream):
    """The lines of `stream`, a UTF-8 byte order mark at its start skipped."""
    lines = iter(stream)
    first = next(lines, b"")
    yield first[len(_BOM):] if first.startswith(_BOM) else first
    yield from lines


def widened_schema(schema, other):
    """`schema` widened by `other`: a null field takes `other`'s type, a field only in `other`
    is added (at the end); `schema`'s metadata is kept. Other type differences are left to the
    caller (a cast, or an error)."""
    import pyarrow as pa

    fields = [other.field(f.name) if pa.types.is_null(f.type) and f.name in other.names
              else f for f in schema]
    fields += [f for f in other if f.name not in schema.names]
    return pa.schema(fields, metadata=schema.metadata)


def _first_inconsistent(records: list[dict]) -> tuple[int, str]:
    """Index and field of the first record whose value type differs from the first seen."""
    seen: dict[str, type] = {}
    for index, record in enumerate(records):
        for key, value in record.items():
            if value is None:
                continue
            kind = float if isinstance(value, int) and not isinstance(value, bool) else type(value)
            if seen.setdefault(key, kind) is not kind:
                return index, key
    return 0, "?"


def _vector_columns_to_float32(batch, name: str, lines: list[int]):
    import pyarrow as pa

    index = batch.schema.get_field_index(names.EMBEDDING)
    if index < 0:
        return batch
    column = batch.column(index)
    if not pa.types.is_list(column.type) and not pa.types.is_null(column.type):
        raise DataError(f"field 'embedding' must be an array of numbers, got {column.type}",
                        source=name, record=lines[0])
    if pa.types.is_null(column.type):
        return batch
    try:
        vectors = names.checked_vectors(batch, names.EMBEDDING, nonfinite=None, lines=lines)
    except DataError as err:
        raise err.located(name, lines[0])
    vectors = names.numpy_to_vectors(vectors.astype("float32", copy=False))
    return batch.set_column(index, pa.field(names.EMBEDDING, vectors.type), vectors)


def batch_to_lines(batch) -> bytes:
    """One JSON object per row, newline-terminated. Vectors become arrays of numbers; packed bits
    (fixed_size_binary) become arrays of 0-255 ints."""
    import numpy as np
    import pyarrow as pa

    columns = {}
    for field, column in zip(batch.schema, batch.columns):
        t = field.type
        if pa.types.is_fixed_size_list(t) and (pa.types.is_floating(t.value_type)
                                              or pa.types.is_integer(t.value_type)):
            matrix = names.vectors_to_numpy(column, field.name) if column.null_count == 0 else None
            if matrix is not None:
                if matrix.dtype == np.float16:
                    matrix = matrix.astype(np.float32)
                columns[field.name] = list(matrix)
                continue
        if pa.types.is_fixed_size_binary(t) and column.null_count == 0:
            columns[field.name] = [row.tolist() for row in names.vectors_to_numpy(column)]
            continue
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            columns[field.name] = [None if v is None else list(v) for v in column.to_pylist()]
            continue
        columns[field.name] = column.to_pylist()
    keys = list(columns)
    values = [columns[k] for k in keys]
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    return b"".join(orjson.dumps(dict(zip(keys, row)), option=option, default=_default)
                    for row in zip(*values))


def _default(value):
    import datetime
    import decimal

    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
