"""CSV and TSV: records -> delimited text (RFC 4180 quoting) for streams without vectors, and
the read options that keep ids as text.

A value is written as text: numbers in their shortest round-trip form (a float keeps a `.0`,
so it reads back as a float), booleans as true/false, nested values (lists, structs, maps) and
binary as JSON text. Lines end in `\\n`; a field holding the delimiter, a quote or a line
break is quoted, quotes doubled (RFC 4180). Null is an empty field and an empty string is `""`,
so vecpipe reads each back as it was (Python's csv module reads both as "").
"""
from __future__ import annotations

import orjson

DELIMITERS = {"csv": ",", "tsv": "\t"}
# read as text whatever they look like: "007" is an id, not the number 7
TEXT_COLUMNS = ("id", "_id", "query_id", "parent_id", "doc_id", "text", "query-id",
                "corpus-id")


def header(names, fmt: str) -> bytes:
    return _lines([list(names)], fmt)


def batch_to_delimited(batch, fmt: str) -> bytes:
    """The rows of `batch` as CSV or TSV lines (no header)."""
    columns = [_as_text(column) for column in batch.columns]
    return _lines(zip(*columns), fmt) if columns else b"\n" * batch.num_rows


def _lines(rows, fmt: str) -> bytes:
    delimiter = DELIMITERS[fmt]
    special = (delimiter, '"', "\n", "\r")
    rows = (delimiter.join(_quoted(value, special) for value in row) for row in rows)
    return "".join(f"{row}\n" for row in rows).encode()


def _quoted(value: str | None, special: tuple[str, ...]) -> str:
    if value is None:
        return ""
    if value == "" or any(char in value for char in special):
        return '"' + value.replace('"', '""') + '"'
    return value


def added_columns(lines, count: int, new_header: bytes, fmt: str):
    """The lines of a CSV/TSV this module wrote, under `new_header` and with `count` empty
    columns more at the end of every record. A record ends at a line break outside quotes:
    quotes appear only in quoted fields, doubled inside, so an even count of them so far
    means outside."""
    yield new_header
    lines = iter(lines)
    next(lines, None)  # the old header
    tail = DELIMITERS[fmt].encode() * count
    inside = False
    for line in lines:
        inside ^= line.count(b'"') % 2 == 1
        yield line if inside else line[:-1] + tail + b"\n"


def _as_text(column) -> list:
    """One column's values as strings (None for null: the csv module writes it empty)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column.to_pylist()
    if pa.types.is_dictionary(t):
        return _as_text(column.cast(t.value_type))
    if pa.types.is_floating(t):
        text = column.cast(pa.string())
        integral = pc.match_substring_regex(text, r"^-?\d+$")
        return pc.if_else(integral, pc.binary_join_element_wise(text, ".0", ""),
                          text).to_pylist()
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t) \
            or pa.types.is_temporal(t):
        return column.cast(pa.string()).to_pylist()
    if pa.types.is_null(t):
        return [None] * len(column)
    return [None if value is None else _json(value) for value in _plain_values(column)]


def _plain_values(column) -> list:
    """Python values of a nested or binary column, bytes as lists of 0-255 ints (as in JSONL)."""
    import pyarrow as pa

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type) \
            or pa.types.is_fixed_size_binary(column.type):
        return [None if v is None else list(v) for v in column.to_pylist()]
    return column.to_pylist()


def _json(value) -> str:
    from vecpipe.formats.jsonl import _default

    return orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def read_convert_options():
    """pyarrow.csv options: the id and text columns as strings, other types inferred; an
    empty field is null and `""` an empty string."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    return pcsv.ConvertOptions(column_types={name: pa.string() for name in TEXT_COLUMNS},
                               strings_can_be_null=True, quoted_strings_can_be_null=False)


def records_as_delimited(records: list[dict], fmt: str) -> bytes:
    """Report records (dicts) as a header and one line each: the fields in order of first
    appearance, a missing one empty, nested values as JSON text."""
    fields = list(dict.fromkeys(key for record in records for key in record))

    def cell(value):
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return _json(value)

    rows = [[cell(record.get(name)) for name in fields] for record in records]
    return _lines([fields, *rows], fmt) if fields else b""
