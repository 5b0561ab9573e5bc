"""Convert record streams between JSONL, Arrow IPC (stream/file), Parquet, CSV/TSV and text."""
from typing import Annotated, Optional

import typer

from vecpipe.cli import options


def run(inputs: options.Inputs = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        fields: options.Fields = None,
        select: options.alias(Optional[str], "--select", "--fields", "fields",
                              lambda value: {"fields": options.comma_list(value)}) = None,
        limit: Annotated[Optional[int], typer.Option(
            "--limit", min=0, help="Stop after N records.")] = None,
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Convert record streams between formats, keeping vecpipe.* metadata where the output
    format can carry it (Arrow, Parquet; JSONL carries plain records).

    \b
    Example:
      vecpipe convert corpus.jsonl -o corpus.arrow
      vecpipe convert docs.parquet --fields id,text --limit 100 | vecpipe info
    """
    from vecpipe.cli import console
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.writers import RecordWriter, carries_vectors, resolve_output_format

    stream = RecordStream(inputs, input_format, check=input_check(force))
    columns = fields
    schema = stream.schema
    schema = None if schema is None else selected_schema(schema, columns)
    output_format = resolve_output_format(output, output_format, vectors=carries_vectors(schema))
    with RecordWriter(output, output_format, widen=True, schema=schema) as out:
        for item in stream:
            if limit is not None and out.rows >= limit:
                break
            batch = item.batch
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
