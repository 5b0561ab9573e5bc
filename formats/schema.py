"""Column names, `vecpipe.*` schema metadata, and vector column <-> numpy conversions."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

ID = "id"
ID_ALIASES = ("id", "_id")
TEXT = "text"
EMBEDDING = "embedding"
QUERY_ID = "query_id"
RANK = "rank"
SCORE = "score"
PARENT_ID = "parent_id"
CHUNK = "chunk"
CHAR_START = "char_start"
CHAR_END = "char_end"

META_PREFIX = "vecpipe."
META_KEYS = ("model", "model_sha", "dim", "normalized", "prompt", "dtype", "codec", "version",
             "backend", "precision", "embedded_text")


def read_meta(schema: "pa.Schema | None") -> dict[str, str]:
    """The `vecpipe.*` metadata of a schema, keys without the prefix."""
    if schema is None or not schema.metadata:
        return {}
    meta = {}
    for key, value in schema.metadata.items():
        key = key.decode() if isinstance(key, bytes) else key
        if key.startswith(META_PREFIX):
            meta[key[len(META_PREFIX):]] = value.decode() if isinstance(value, bytes) else value
    return meta


def with_meta(schema: "pa.Schema", updates: Mapping[str, object | None]) -> "pa.Schema":
    """A copy of `schema` with `vecpipe.*` keys set (None removes a key); other keys kept."""
    current = dict(schema.metadata or {})
    for key, value in updates.items():
        full = (META_PREFIX + key).encode()
        if value is None:
            current.pop(full, None)
        else:
            current[full] = str(value).encode()
    return schema.with_metadata(current)


def find_id_column(schema: "pa.Schema", preferred: str | None = None) -> str | None:
    """`preferred` if given (must exist), else `id`, else `_id`, else None."""
    if preferred:
        if preferred not in schema.names:
            raise DataError(f"no field {preferred!r}; fields are {', '.join(schema.names)}")
        return preferred
    return next((name for name in ID_ALIASES if name in schema.names), None)


def batch_ids(batch, column: str | None, first_record: int = 1, on_null: str = "error",
              source: str | None = None, null_message: str | None = None) -> "pa.Array":
    """A batch's (or table's) ids as a string array: `column` cast to strings, or the record
    numbers from `first_record` when `column` is None. A null id is, by `on_null`: "error" (a
    DataError at its record, `null_message` or "record has no COLUMN"), "record" (its record
    number) or "keep" (null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column is None:
        return _record_numbers(first_record, batch.num_rows)
    values = batch.column(column)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    if not values.null_count or on_null == "keep":
        return values
    if on_null == "error":
        row = int(values.is_null().to_numpy(zero_copy_only=False).argmax())
        raise DataError(null_message or f"record has no {column}", source=source,
                        record=first_record + row)
    return pc.if_else(values.is_null(), _record_numbers(first_record, len(values)), values)


def _record_numbers(first: int, count: int) -> "pa.Array":
    import pyarrow as pa

    return pa.array([str(n) for n in range(first, first + count)], pa.string())


def checked_vectors(item, field: str = EMBEDDING, nonfinite: str | None = "vector",
                    lines: "list[int] | None" = None) -> "np.ndarray":
    """`field` of a SourceBatch as numpy (`vectors_to_numpy`), errors located at its source and
    record. Float rows holding NaN or infinity are refused as "<nonfinite> holds NaN or
    infinity" (None: not checked). `lines`: the record number of each row (JSONL lines), for
    a plain RecordBatch whose source the caller names."""
    import numpy as np

    batch = getattr(item, "batch", item)
    source = getattr(item, "source", None)

    def record(row: int) -> int:
        return lines[row] if lines is not None else item.first_record + row

    try:
        vectors = vectors_to_numpy(batch.column(field), field)
    except DataError as err:
        if err.record is not None:
            err.record = record(err.record - 1)
        raise err.located(source)
    if nonfinite is not None and vectors.dtype.kind == "f":
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise DataError(f"{nonfinite} holds NaN or infinity", source=source,
                            record=record(int(np.argmin(finite))))
    return vectors


def vectors_to_numpy(column: "pa.Array | pa.ChunkedArray", name: str = EMBEDDING) -> "np.ndarray":
    """A vector column as a 2-D numpy array (rows x dim), without copying where Arrow allows.

    Accepts fixed_size_list and list columns of numbers and fixed_size_binary (packed bits,
    returned as uint8). Rows must all have the same length and no nulls.
    """
    import numpy as np
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros((0, _type_dim(column.type) or 0), dtype=_value_dtype(column.type))
    if column.null_count:
        bad = column.is_null().to_numpy(zero_copy_only=False).argmax() + 1
        raise DataError(f"column {name!r} is null", record=int(bad))
    t = column.type
    if pa.types.is_fixed_size_binary(t):
        flat = np.frombuffer(column.buffers()[1], dtype=np.uint8,
                             count=(column.offset + len(column)) * t.byte_width)
        return flat.reshape(-1, t.byte_width)[column.offset:]
    if pa.types.is_fixed_size_list(t):
        values = column.values.slice(column.offset * t.list_size, len(column) * t.list_size)
        return _values_numpy(values, name).reshape(len(column), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) != 1:
            first_bad = int(np.argmax(lengths != lengths[0])) + 1
            raise DataError(f"column {name!r} has vectors of different lengths "
                            f"({int(lengths[0])} and {int(lengths[first_bad - 1])})",
                            record=first_bad)
        return _values_numpy(column.flatten(), name).reshape(len(column), int(lengths[0]))
    raise DataError(f"column {name!r} has type {t}, expected a list of numbers")


def _values_numpy(values: "pa.Array", name: str) -> "np.ndarray":
    import pyarrow as pa

    t = values.type
    if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
        raise DataError(f"column {name!r} holds {t} values, expected numbers")
    if values.null_count:
        raise DataError(f"column {name!r} holds null values inside a vector")
    return values.to_numpy(zero_copy_only=False)


def _type_dim(t) -> int | None:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_fixed_size_binary(t):
        return t.byte_width
    return None


def _value_dtype(t):
    import numpy as np
    import pyarrow as pa

    if pa.types.is_fixed_size_binary(t):
        return np.uint8
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return t.value_type.to_pandas_dtype()
    return np.float32


def numpy_to_vectors(matrix: "np.ndarray") -> "pa.FixedSizeListArray":
    """A 2-D numpy array as a fixed_size_list column of its dtype (float32, float16, int8...)."""
    import numpy as np
    import pyarrow as pa

    matrix = np.ascontiguousarray(matrix)
    rows, dim = matrix.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)


def numpy_to_packed_bits(matrix: "np.ndarray") -> "pa.FixedSizeBinaryArray":
    """Packed-bit codes (rows x bytes, uint8) as a fixed_size_binary column."""
    import numpy as np
    import pyarrow as pa

    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    rows, width = matrix.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), rows,
                                                [None, pa.py_buffer(matrix.tobytes())])


def align_batch(batch: "pa.RecordBatch", schema: "pa.Schema") -> "pa.RecordBatch":
    """`batch` in the column order and types of `schema`: missing columns become null, types are
    cast where lossless-enough (null -> anything, int -> float); anything else is a DataError."""
    import pyarrow as pa

    if batch.schema.equals(schema, check_metadata=False):
        return batch if batch.schema.metadata == schema.metadata else \
            pa.RecordBatch.from_arrays(batch.columns, schema=schema)
    extra = [name for name in batch.schema.names if name not in schema.names]
    if extra:
        raise DataError(f"field {extra[0]!r} is not in the schema of the first records",
                        hint="records of one stream must share their fields; "
                             "combine differing files with `vecpipe merge`")
    columns = []
    for field in schema:
        if field.name not in batch.schema.names:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"field {field.name!r} changed type from {field.type} "
                                f"to {column.type}") from None
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)
