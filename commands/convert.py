"""Convert record streams between JSONL, Arrow IPC (stream/file), Parquet, CSV/TSV and text."""
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: options.Inputs = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        fields: options.Fields = None,
        select: options.alias(Optional[str], "--select", "--fields", "fields",
                              lambda value: {"fields": options.comma_list(value)}) = None,
        filter_text: options.FilterExpr = None,
        rename: Annotated[Optional[List[str]], typer.Option(
            "--rename", help="Rename field OLD to NEW (repeatable); after --filter, before "
                             "--fields.", metavar="OLD=NEW", show_default=False)] = None,
        limit: Annotated[Optional[int], typer.Option(
            "--limit", "--head", min=0, help="Stop after N records.")] = None,
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Convert record streams between formats, keeping vecpipe.* metadata where the output
    format can carry it (Arrow, Parquet; JSONL carries plain records).

    \b
    Example:
      vecpipe convert corpus.jsonl -o corpus.arrow
      vecpipe convert docs.parquet --fields id,text --limit 100 | vecpipe info
      vecpipe convert corpus.jsonl --filter 'year >= 2020' --rename _id=id -o recent.arrow
    """
    from vecpipe.cli import console
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.writers import RecordWriter, carries_vectors, resolve_output_format

    import pyarrow as pa

    renames = parse_renames(rename)
    stream = RecordStream(inputs, input_format, check=input_check(force))
    columns = fields
    schema = stream.schema
    where = None if filter_text is None else checked_filter(filter_text, schema, stream)
    if schema is not None:
        schema = selected_schema(renamed(schema, renames), columns)
    output_format = resolve_output_format(output, output_format, vectors=carries_vectors(schema))
    with RecordWriter(output, output_format, widen=True, schema=schema) as out:
        for item in stream:
            if limit is not None and out.rows >= limit:
                break
            batch = item.batch
            if where is not None:
                batch = batch.filter(pa.array(where.mask(batch)))
            batch = renamed(batch, renames)
            if columns:
                batch = batch.select(columns)
            if limit is not None:
                batch = batch.slice(0, limit - out.rows)
            out.write(batch, item.source, item.first_record)
    console.info(f"{out.rows} records -> {output or 'stdout'} ({out.format})")


def selected_schema(schema, columns):
    """The schema restricted to `columns` (metadata kept); a missing field is an error."""
    if not columns:
        return schema
    from vecpipe.formats.errors import DataError

    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"no field {missing[0]!r}; fields are {', '.join(schema.names)}")
    import pyarrow as pa

    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def parse_renames(specs) -> dict:
    from vecpipe.formats.errors import UsageError

    renames = {}
    for spec in specs or []:
        old, sep, new = spec.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"--rename {spec!r}: use OLD=NEW")
        renames[old] = new
    return renames


def renamed(data, renames: dict):
    """A schema or batch with fields renamed (missing names are an error at the schema)."""
    if not renames:
        return data
    from vecpipe.formats.errors import DataError

    names = data.schema.names if hasattr(data, "schema") else data.names
    missing = [old for old in renames if old not in names]
    if missing:
        raise DataError(f"--rename: no field {missing[0]!r}; fields are {', '.join(names)}")
    new_names = [renames.get(name, name) for name in names]
    if len(set(new_names)) < len(new_names):
        raise DataError(f"--rename gives two fields one name ({', '.join(new_names)})")
    if hasattr(data, "rename_columns"):
        return data.rename_columns(new_names)
    import pyarrow as pa

    return pa.schema([field.with_name(name) for field, name in zip(data, new_names)],
                     metadata=data.metadata)


def checked_filter(text: str, schema, stream):
    from vecpipe.core.filter_expr import parse

    where = parse(text)
    if schema is not None:
        where.check_fields(schema.names, stream.inputs[0] if len(stream.inputs) == 1
                           else "the input")
    return where
