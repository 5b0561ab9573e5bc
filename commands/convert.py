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
            "--limit", "--head", min=0, help="Stop after N records (with --sample: sample "
                                             "the first N that pass --filter).")] = None,
        sample: Annotated[Optional[int], options.sample_option(min=0, show_default=False)]
        = None,
        seed: options.Seed = 0,
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Convert record streams between formats, keeping vecpipe.* metadata where the output
    format can carry it (Arrow, Parquet; JSONL and CSV/TSV carry plain records, and CSV/TSV
    no vectors). Records go through --filter, then --head, then --sample (a uniform sample of
    N of what is left, in one pass over the input, holding only the sample: reservoir
    sampling, in input order, the same for the same --seed, default 0), then --rename and
    --fields.

    \b
    Example:
      vecpipe convert corpus.jsonl -o corpus.arrow
      vecpipe convert docs.parquet --fields id,text --limit 100 | vecpipe info
      vecpipe convert corpus.jsonl --filter 'year >= 2020' --rename _id=id -o recent.arrow
      vecpipe convert corpus.jsonl.gz --sample 1000 --seed 7 --fields id,text -o dev.csv
    """
    import pyarrow as pa
    from vecpipe.cli import console
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.writers import (
        RecordWriter,
        carries_vectors,
        resolve_output_format,
    )

    renames = parse_renames(rename)
    stream = RecordStream(inputs, input_format, check=input_check(force, documents=True))
    columns = fields
    schema = stream.schema
    where = None if filter_text is None else checked_filter(filter_text, schema, stream)
    if schema is not None:
        schema = selected_schema(renamed(schema, renames), columns)
    output_format = resolve_output_format(output, output_format, vectors=carries_vectors(schema))

    def shaped(batch):
        batch = renamed(batch, renames)
        return batch.select(columns) if columns else batch

    reservoir = None if sample is None else Reservoir(sample, seed)
    taken = 0
    with RecordWriter(output, output_format, widen=True, schema=schema) as out:
        for item in stream:
            if limit is not None and taken >= limit:
                break
            batch = item.batch
            if where is not None:
                batch = batch.filter(pa.array(where.mask(batch)))
            if limit is not None:
                batch = batch.slice(0, limit - taken)
            taken += batch.num_rows
            if reservoir is not None:
                reservoir.offer(batch)
            else:
                out.write(shaped(batch), item.source, item.first_record)
        for batch in reservoir.batches() if reservoir is not None else ():
            out.write(shaped(batch))
    shown = "stdout" if output in (None, "-") else output
    kept = "" if reservoir is None else f" (sampled from {reservoir.seen})"
    console.info(f"{out.rows} records{kept} -> {shown} ({out.format})")


class Reservoir:
    """A uniform random sample of `size` records from batches seen once (Algorithm R): record
    k (0-based) draws u_k, one double per record from a generator seeded by `seed` whatever
    the batch sizes, and takes slot floor(u_k * (k + 1)) when that is below `size` (the first
    `size` records fill the slots). Each record ends in the sample with probability
    size / seen. Holds the rows that entered, compacted to the sample at 2 * size rows."""

    def __init__(self, size: int, seed: int):
        import numpy as np

        self.size = size
        self.rng = np.random.default_rng(seed)
        self.slots = np.zeros(size, dtype=np.int64)  # the record number in each slot
        self.seen = 0
        self.held = []  # (record numbers, batch) of the rows that entered the sample
        self.held_rows = 0

    def offer(self, batch) -> None:
        import numpy as np

        count = batch.num_rows
        draws = self.rng.random(count)
        records = np.arange(self.seen, self.seen + count, dtype=np.int64)
        self.seen += count
        slots = np.floor(draws * (records + 1)).astype(np.int64)
        filling = records < self.size
        slots[filling] = records[filling]
        entered = slots < self.size
        for slot, record in zip(slots[entered], records[entered]):  # in order: later wins
            self.slots[slot] = record
        if entered.any():
            self.held.append((records[entered], batch.filter(entered)))
            self.held_rows += int(entered.sum())
        if self.held_rows > 2 * self.size:
            self._compact()

    def sample_records(self):
        """The sampled record numbers, ascending."""
        import numpy as np

        return np.sort(self.slots[:min(self.seen, self.size)])

    def _compact(self) -> None:
        """Keep only the sampled rows, as one batch (under the widest schema of the pieces)."""
        import numpy as np
        import pyarrow as pa
        from vecpipe.formats import schema as names
        from vecpipe.formats.jsonl import widened_schema

        keep = self.sample_records()
        pieces = [(records[inside], batch.filter(inside)) for records, batch in self.held
                  if (inside := np.isin(records, keep)).any()]
        self.held, self.held_rows = [], len(keep)
        if not pieces:
            return
        schema = pieces[0][1].schema
        for _records, batch in pieces[1:]:
            schema = widened_schema(schema, batch.schema)
        table = pa.Table.from_batches([names.align_batch(batch, schema)
                                       for _records, batch in pieces], schema)
        self.held = [(np.concatenate([records for records, _ in pieces]),
                      table.combine_chunks().to_batches()[0] if table.num_rows
                      else pieces[0][1])]

    def batches(self):
        """The sample in input order: the held pieces are in input order already."""
        self._compact()
        for _records, batch in self.held:
            yield batch


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
