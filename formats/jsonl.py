"""JSONL through orjson: lines -> RecordBatches with one stable schema, and batches -> lines."""
from __future__ import annotations

from typing import Iterator

import orjson

from . import schema as names
from .errors import DataError


class JsonlBatcher:
    """Parses a binary line stream into RecordBatches of `rows` records.

    The first batch fixes the schema; later batches are aligned to it. `embedding` columns
    become fixed_size_list<float32> so vectors keep one Arrow type whatever the JSON held.
    """

    def __init__(self, stream, name: str, rows: int):
        self.lines = enumerate(stream, 1)
        self.name = name
        self.rows = rows
        self.schema = None

    def _records(self) -> tuple[list[dict], int] | None:
        records, first_line = [], None
        for lineno, line in self.lines:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise DataError(f"invalid JSON: {err.msg}", source=self.name,
                                record=lineno) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}",
                                source=self.name, record=lineno)
            if first_line is None:
                first_line = lineno
            records.append(record)
            if len(records) == self.rows:
                break
        return (records, first_line) if records else None

    def _to_batch(self, records: list[dict], first_line: int):
        import pyarrow as pa

        try:
            # from_pylist would keep only the first record's keys, silently dropping fields
            # that appear first in a later record of the batch.
            keys = dict.fromkeys(key for record in records for key in record)
            batch = pa.RecordBatch.from_pydict({key: [record.get(key) for record in records]
                                                for key in keys})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            bad, field = _first_inconsistent(records)
            raise DataError(f"field {field!r} has values of different types ({err})",
                            source=self.name, record=first_line + bad) from None
        batch = _vector_columns_to_float32(batch, self.name, first_line)
        if self.schema is not None:
            try:
                batch = names.align_batch(batch, self.schema)
            except DataError as err:
                raise err.located(self.name, first_line)
        return batch

    def first(self):
        got = self._records()
        if got is None:
            return None
        batch = self._to_batch(*got)
        self.schema = batch.schema
        return batch

    def batches(self, first) -> Iterator:
        yield first
        while (got := self._records()) is not None:
            yield self._to_batch(*got)


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


def _vector_columns_to_float32(batch, name: str, first_line: int):
    import pyarrow as pa

    index = batch.schema.get_field_index(names.EMBEDDING)
    if index < 0:
        return batch
    column = batch.column(index)
    if not pa.types.is_list(column.type) and not pa.types.is_null(column.type):
        raise DataError(f"field 'embedding' must be an array of numbers, got {column.type}",
                        source=name, record=first_line)
    if pa.types.is_null(column.type):
        return batch
    try:
        vectors = names.vectors_to_numpy(column)
    except DataError as err:
        raise err.located(name, first_line + (err.record or 1) - 1)
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
