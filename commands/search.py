"""Search an index (or an embeddings stream, exactly) with text or vector queries."""
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

TREC_RUN_NAME = "vecpipe"
STREAM_BLOCK_ROWS = 8192


def run(index: Annotated[str, typer.Argument(
            help="An index folder (from `vecpipe index`), or an embeddings file/stream to "
                 "search exactly without an index.", metavar="INDEX", show_default=False)],
        queries: Annotated[Optional[List[str]], typer.Argument(
            help="Query records: text (`text`, or --field) embedded with the index's model and "
                 "query prompt, or vectors (`embedding`). Files or - for stdin (the default).",
            metavar="[QUERIES]...", show_default=False)] = None,
        k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Hits per query.")] = 10,
        exact: Annotated[bool, typer.Option(
            "--exact", help="Brute force instead of the HNSW graph.")] = False,
        ef: Annotated[Optional[int], typer.Option(
            "--ef", min=1, help="HNSW expansion while searching (default: the index's).",
            metavar="N", show_default=False)] = None,
        rescore: Annotated[Optional[int], typer.Option(
            "--rescore", min=1, help="Fetch k*MULT candidates from a compressed index and "
                                     "rescore them with the kept full vectors (or the float "
                                     "query against the codes; i8 indexes do that on k*4 by "
                                     "default).", metavar="MULT",
            show_default=False)] = None,
        min_score: Annotated[Optional[float], typer.Option(
            "--min-score", help="Drop hits scoring below S (fewer than k hits allowed).",
            metavar="S", show_default=False)] = None,
        filter_text: Annotated[Optional[str], typer.Option(
            "--filter", help="Keep hits whose stored fields match, e.g. 'lang == \"en\" and "
                             "year >= 2020' (==, !=, <, <=, >, >=, in [...], not in, is [not] "
                             "null, and, or, not, parentheses).", metavar="EXPR",
            show_default=False)] = None,
        fields: Annotated[Optional[str], typer.Option(
            "--fields", help="Stored fields to add to each hit.", metavar="A,B",
            show_default=False)] = None,
        all_fields: Annotated[bool, typer.Option(
            "--all-fields", help="Add every stored field to each hit.")] = False,
        model: Annotated[Optional[str], typer.Option(
            "-m", "--model", help="Model for text queries (default: the one the index records; "
                                  "another one is refused without --force).", metavar="MODEL",
            show_default=False)] = None,
        prompt: Annotated[Optional[str], typer.Option(
            "--prompt", help="Prompt before each query text (default: the index's query "
                             "prompt, else the model's `query` prompt).", metavar="TEXT",
            show_default=False)] = None,
        prompt_name: Annotated[Optional[str], typer.Option(
            "--prompt-name", help="Use the model's prompt of this name.", metavar="NAME",
            show_default=False)] = None,
        field: Annotated[str, typer.Option(
            "--field", help="The query text field.")] = "text",
        metric: Annotated[Optional[str], typer.Option(
            "--metric", help="cos|ip|l2sq|hamming, for an embeddings-stream INDEX only "
                             "(default cos; hamming for packed bits).", show_default=False)
        ] = None,
        output: options.Output = None,
        output_format: Annotated[str, typer.Option(
            "--output-format", help="auto|arrow|arrow-file|jsonl|parquet|trec (a TREC run: "
                                    "qid Q0 docid rank score run).")] = "auto",
        input_format: options.InputFormat = "auto",
        batch_size: Annotated[int, typer.Option(
            "--batch-size", min=1, help="Queries per search batch.")] = 1024,
        threads: Annotated[int, typer.Option(
            "--threads", min=0, help="usearch threads (0 = all cores).")] = 0,
        device: options.Device = "auto",
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Find the k nearest records for each query. One output row per hit: query_id, rank
    (1-based), id, score (a similarity: larger is better whatever the metric) and the requested
    stored fields; or a TREC run file. Scores: cos -> cosine, ip -> dot product, l2sq -> minus
    the squared distance, hamming -> fraction of equal bits.

    \b
    Example:
      echo "how do I parse JSON?" | vecpipe search idx --input-format text --fields text
      vecpipe search idx queries.jsonl -k 100 --output-format trec -o run.trec
      vecpipe search idx queries.jsonl --filter 'lang == "en" and year >= 2020' --rescore 4
      vecpipe search docs.arrow queries.jsonl   # no index: exact search over the stream
    """
    import os

    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.writers import resolve_output_format

    if index != "-" and not os.path.exists(index):  # before the options that depend on its kind
        raise DataError("no such index folder or embeddings file", source=index)
    if fields and all_fields:
        raise UsageError("give --fields or --all-fields, not both")
    fmt = resolve_output_format(output, output_format, extra=("trec",))
    query_options = dict(model=model, prompt=prompt, prompt_name=prompt_name, field=field,
                         device=device, force=force, input_format=input_format)
    if os.path.isdir(index):
        if metric is not None:
            raise UsageError("--metric applies to an embeddings-stream INDEX; an index folder "
                             "has its own")
        searcher = IndexSearch(index, k, exact, ef, rescore, min_score, filter_text, fields,
                               all_fields, threads)
    else:
        if ef is not None or rescore is not None:
            raise UsageError("--ef and --rescore need an index folder; an embeddings stream "
                             "is searched exactly")
        searcher = StreamSearch(index, k, min_score, filter_text, fields, all_fields, metric)
    reader = QueryReader(queries, searcher, batch_size=batch_size, **query_options)
    write_hits(searcher.results(reader), searcher.schema, output, fmt)


# ---- queries ----------------------------------------------------------------------------------

class QueryReader:
    """Batches of (query ids, vectors, encoded) from text records (embedded here) or vector
    records: float vectors of the query dimension, or codes when the stream carries a codec."""

    def __init__(self, inputs, target, batch_size, model, prompt, prompt_name, field, device,
                 force, input_format):
        from vecpipe.formats.errors import UsageError
        from vecpipe.formats.readers import RecordStream

        if target.source == "-" and (not inputs or "-" in inputs):
            raise UsageError("the searched stream and the queries cannot both come from stdin",
                             hint="name the queries' file")
        self.stream = RecordStream(inputs, input_format, batch_rows=batch_size)
        self.target, self.field, self.force, self.device = target, field, force, device
        self.model_spec, self.prompt, self.prompt_name = model, prompt, prompt_name
        self.model = None
        self.codes = False
        self.next_record = 1
        from vecpipe.core.codec import accepted_query_dims
        self.query_dims, self.expected_dims = accepted_query_dims(target.metadata,
                                                                  target.query_dim)
        self._check_schema()

    def _check_schema(self) -> None:
        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        schema = self.stream.schema
        if schema is None:
            return
        source = self.stream.inputs[0]
        if names.EMBEDDING in schema.names:
            meta = self.stream.metadata
            keys = ("model", "codec") if meta.get("codec") else ("model",)
            names.check_compatible(self.target.metadata, meta, self.target.source, source,
                                   keys=keys, force=self.force)
            self.codes = bool(meta.get("codec"))
            if self.model_spec:
                self._load_model()  # -m with vector queries: still checked against the index
        elif self.field in schema.names:
            self._load_model()
        else:
            raise DataError(f"queries have neither {self.field!r} nor 'embedding' (fields: "
                            f"{', '.join(schema.names)})", source=source,
                            hint="name the text field with --field")

    def _load_model(self) -> None:
        """The query model: -m or the one the index records; a different one is refused."""
        from vecpipe.cli.models import load_model
        from vecpipe.formats.errors import DataError
        from vecpipe.formats.schema import check_compatible

        spec = self.model_spec or self.target.metadata.get("model")
        if spec is None:
            raise DataError("records no model, so text queries cannot be embedded",
                            source=self.target.source,
                            hint="pass -m MODEL (the model that made the vectors)")
        self.model = load_model(spec, device=self.device)
        given = {"model": self.model.name}
        if self.model.sha:
            given["model_sha"] = self.model.sha
        check_compatible(self.target.metadata, given, self.target.source, f"-m {spec}",
                         keys=("model", "model_sha"), force=self.force)
        if self.model.dim != self.target.query_dim:
            raise DataError(f"model {self.model.name} makes {self.model.dim}-dimensional "
                            f"vectors, the searched vectors have {self.target.query_dim}",
                            source=self.target.source)
        self.prompt_text = self._prompt()

    def _prompt(self) -> str:
        if self.prompt is not None or self.prompt_name is not None:
            return self.model.prompt_text(self.prompt, self.prompt_name)
        if self.target.query_prompt is not None:
            return self.target.query_prompt
        return self.model.prompts.get("query", "")

    def __iter__(self):
        for item in self.stream:
            if item.batch.num_rows:
                yield (self._ids(item.batch), *self._vectors(item))

    def _ids(self, batch) -> list:
        import pyarrow as pa

        from vecpipe.formats import schema as names

        column = names.find_id_column(batch.schema) or (
            names.QUERY_ID if names.QUERY_ID in batch.schema.names else None)
        first = self.next_record
        self.next_record += batch.num_rows
        if column is None:
            return [str(n) for n in range(first, first + batch.num_rows)]
        values = batch.column(column)
        values = values if pa.types.is_string(values.type) else values.cast(pa.string())
        return [str(first + i) if v is None else v for i, v in enumerate(values.to_pylist())]

    def _vectors(self, item):
        import numpy as np

        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        batch = item.batch
        if names.EMBEDDING not in batch.schema.names:
            texts = batch.column(self.field).to_pylist()
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t), None)
            if bad is not None:
                raise DataError(f"query {self.field!r} is empty or not text",
                                source=item.source, record=item.first_record + bad)
            return self.model.encode(texts, prompt=self.prompt_text), False
        try:
            vectors = names.vectors_to_numpy(batch.column(names.EMBEDDING))
        except DataError as err:
            if err.record is not None:
                err.record += item.first_record - 1
            raise err.located(item.source)
        if self.codes:
            return self.target.query_codes(vectors, item), True
        if vectors.shape[1] not in self.query_dims:
            raise DataError(f"query vectors have {vectors.shape[1]} dimensions, "
                            f"{self.target.source} expects {self.expected_dims}",
                            source=item.source, record=item.first_record)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise DataError("query vector holds NaN or infinity", source=item.source,
                            record=item.first_record + int(np.argmin(finite)))
        return vectors.astype(np.float32), False


def _output_schema(fields_schema):
    import pyarrow as pa

    return pa.schema([pa.field("query_id", pa.string()), pa.field("rank", pa.int32()),
                      pa.field("id", pa.string()), pa.field("score", pa.float32()),
                      *[f for f in fields_schema if f.name != "id"]])


def _requested_fields(fields, all_fields, available) -> list:
    """`id` plus the stored fields to output, checked against what exists."""
    from vecpipe.formats.errors import DataError

    if all_fields:
        return list(available)
    wanted = [name.strip() for name in (fields or "").split(",") if name.strip()]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DataError(f"--fields {missing[0]}: not stored (stored: {', '.join(available)})",
                        hint="index with --store FIELD or --store-all")
    return ["id", *dict.fromkeys(name for name in wanted if name != "id")]


# ---- searching an index folder ----------------------------------------------------------------

class IndexSearch:
    """Batches of queries against an index folder (memory-mapped), filter evaluated once."""

    def __init__(self, path, k, exact, ef, rescore, min_score, filter_text, fields, all_fields,
                 threads):
        from vecpipe.core.index_store import open_index

        self.index = open_index(path)
        self.source = path
        self.metadata = self.index.metadata
        self.query_prompt = self.index.query_prompt
        self.query_dim = self.index.query_dim
        self.rows = self.index.rows(_requested_fields(fields, all_fields, self.index.fields))
        self.schema = _output_schema(self.rows.schema)
        mask = None
        if filter_text is not None:
            from vecpipe.core.filter_expr import parse

            expression = parse(filter_text)
            expression.check_fields(self.index.fields, "the index")
            mask = expression.mask(self.index.rows(expression.fields))
        self.searcher = self.index.searcher(k, exact=exact, ef=ef, rescore=rescore,
                                            min_score=min_score, mask=mask, threads=threads)

    def query_codes(self, vectors, item):
        """Query codes made by the index's codec (e.g. `compress --codec`) -> index space."""
        from vecpipe.core.index_store import to_index_codes

        codec = self.index.codec
        return to_index_codes(codec, codec.codes_from_matrix(vectors, source=item.source))

    def results(self, reader):
        """(query ids, Hits, table whose row i is index row i) per batch of queries."""
        for ids, vectors, encoded in reader:
            yield ids, self.searcher.search(vectors, encoded=encoded), self.rows


# ---- exact search over an embeddings stream ---------------------------------------------------

class StreamSearch:
    """Exact search over a stream of embedding records: the queries are read first, then the
    stream is scanned once, keeping the best k per query (memory: queries x k records)."""

    QUERY_CHUNK = 1024

    def __init__(self, path, k, min_score, filter_text, fields, all_fields, metric):
        import pyarrow as pa

        from vecpipe.formats import schema as names
        from vecpipe.core.codec import codec_from_meta
        from vecpipe.formats.errors import DataError
        from vecpipe.formats.readers import RecordStream

        # sniffed: --input-format names the queries' format
        self.stream = RecordStream([path], batch_rows=STREAM_BLOCK_ROWS)
        self.source = path
        schema = self.stream.schema
        if schema is None:
            raise DataError("empty input: nothing to search", source=path)
        if names.EMBEDDING not in schema.names:
            raise DataError("not an index folder, and it has no 'embedding' field (fields: "
                            f"{', '.join(schema.names)})", source=path)
        self.metadata = self.stream.metadata
        self.codec = codec_from_meta(self.metadata, source=path)
        vector_type = schema.field(names.EMBEDDING).type
        self.bits = pa.types.is_fixed_size_binary(vector_type)
        self.metric = _stream_metric(metric, self.bits)
        self.k, self.min_score = k, min_score
        self.id_column = names.find_id_column(schema)
        available = [names.ID, *[n for n in schema.names
                                 if n not in (names.EMBEDDING, self.id_column)]]
        self.fields = _requested_fields(fields, all_fields, available)
        self.fields_schema = pa.schema(
            [pa.field(names.ID, pa.string())] + [schema.field(n) for n in self.fields[1:]])
        self.schema = _output_schema(self.fields_schema)
        self.filter = None
        if filter_text is not None:
            from vecpipe.core.filter_expr import parse

            self.filter = parse(filter_text)
            self.filter.check_fields(available, path)
        self.query_prompt = None
        self.query_dim = self.codec.input_dim if self.codec is not None else (
            getattr(vector_type, "list_size", None) or vector_type.byte_width * 8)
        if self.bits and self.codec is None:
            raise DataError("packed bits without a codec: float queries cannot be encoded",
                            source=path, hint="index them, or search the float vectors")

    def query_codes(self, vectors, item):
        from vecpipe.formats.errors import DataError

        raise DataError("query codes are not supported against a stream; give float vectors "
                        "or text", source=item.source, record=item.first_record)

    def results(self, reader):
        import numpy as np

        batches = list(reader)
        if not batches:
            return
        ids = [query_id for batch_ids, _, _ in batches for query_id in batch_ids]
        queries = self._query_space(np.concatenate([vectors for _, vectors, _ in batches]))
        yield (ids, *self._scan(queries))

    def _query_space(self, queries):
        """Float queries in the space of the stream's vectors (its codec applied)."""
        if self.codec is None:
            return queries
        return self.codec.encode(queries) if self.bits else self.codec.project(queries)

    def _scan(self, queries):
        """One pass over the stream: (Hits over stream row numbers, their stored fields)."""
        import numpy as np

        from vecpipe.core.vectors import Hits, TopK

        chunks = [queries[start:start + self.QUERY_CHUNK]
                  for start in range(0, len(queries), self.QUERY_CHUNK)]
        tops = [TopK(len(chunk), self.k) for chunk in chunks]
        kept = KeptRows(self.fields_schema, self.fields, self.id_column)
        first_row = 0
        for item in self.stream:
            batch = item.batch
            if not batch.num_rows:
                continue
            vectors = self._stream_vectors(item)
            allowed = self.filter.mask(batch) if self.filter is not None else None
            for chunk, top in zip(chunks, tops):
                top.update(self._scores(chunk, vectors), first_row, allowed)
            kept.update(batch, first_row, item.first_record,
                        np.concatenate([top.rows for top in tops]))
            first_row += batch.num_rows
        hits = Hits(np.concatenate([top.rows for top in tops]),
                    np.concatenate([top.scores for top in tops])).thresholded(self.min_score)
        return hits, kept.lookup()

    def _stream_vectors(self, item):
        import numpy as np

        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        try:
            vectors = names.vectors_to_numpy(item.batch.column(names.EMBEDDING))
        except DataError as err:
            if err.record is not None:
                err.record += item.first_record - 1
            raise err.located(item.source)
        if self.codec is not None and not self.bits:
            return self.codec.decode(self.codec.codes_from_matrix(vectors, item.source))
        if vectors.dtype.kind == "f":
            finite = np.isfinite(vectors).all(axis=1)
            if not finite.all():
                raise DataError("vector holds NaN or infinity", source=item.source,
                                record=item.first_record + int(np.argmin(finite)))
        if vectors.shape[1] != self.queries_width():
            raise DataError(f"vectors change dimension to {vectors.shape[1]}",
                            source=item.source, record=item.first_record)
        return vectors

    def queries_width(self) -> int:
        return self.codec.code_width if self.codec is not None and self.bits else (
            self.codec.out_dim if self.codec is not None else self.query_dim)

    def _scores(self, queries, vectors):
        from vecpipe.core.vectors import similarity

        return similarity(self.metric, queries, vectors)


class KeptRows:
    """The id and fields of the stream rows that are currently hits (memory: queries x k)."""

    def __init__(self, fields_schema, fields, id_column):
        self.fields_schema, self.fields, self.id_column = fields_schema, fields, id_column
        self.parts = []  # (sorted stream row numbers, table of those rows)

    def update(self, batch, first_row, first_record, hit_rows) -> None:
        import numpy as np
        import pyarrow as pa

        live = np.unique(hit_rows[hit_rows >= 0])
        parts = []
        for rows, table in self.parts:
            alive = np.isin(rows, live)
            if alive.any():
                parts.append((rows[alive], table.filter(pa.array(alive))))
        self.parts = parts
        wanted = live[(live >= first_row) & (live < first_row + batch.num_rows)]
        if len(wanted):
            local = pa.array(wanted - first_row)
            columns = [self._ids(batch, first_record).take(local)]
            columns += [batch.column(name).take(local) for name in self.fields[1:]]
            self.parts.append((wanted, pa.Table.from_arrays(columns,
                                                            schema=self.fields_schema)))

    def _ids(self, batch, first_record):
        import pyarrow as pa

        if self.id_column is None:
            return pa.array([str(n) for n in range(first_record, first_record + batch.num_rows)])
        column = batch.column(self.id_column)
        return column if pa.types.is_string(column.type) else column.cast(pa.string())

    def lookup(self) -> "RowLookup":
        import numpy as np
        import pyarrow as pa

        rows = np.concatenate([rows for rows, _ in self.parts] or [np.zeros(0, np.int64)])
        tables = [table for _, table in self.parts] or [self.fields_schema.empty_table()]
        return RowLookup(rows, pa.concat_tables(tables))


class RowLookup:
    """`take(stream rows)` on a table that holds only some stream rows."""

    def __init__(self, rows, table):
        import numpy as np

        self.order = np.argsort(rows)
        self.sorted_rows = rows[self.order]
        self.table = table

    def take(self, rows):
        import numpy as np
        import pyarrow as pa

        return self.table.take(pa.array(self.order[np.searchsorted(self.sorted_rows, rows)]))


def _stream_metric(metric, bits) -> str:
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_store import METRICS

    if metric is None:
        return "hamming" if bits else "cos"
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; use {'|'.join(METRICS)}")
    if (metric == "hamming") != bits:
        raise UsageError("hamming is the metric of packed bits, and packed bits' only one")
    return metric


# ---- output -----------------------------------------------------------------------------------

def hit_tables(results, schema):
    """(table, queries) per result batch: one row per hit, columns as `schema`."""
    import numpy as np
    import pyarrow as pa

    for query_ids, hits, rows in results:
        found = hits.rows >= 0
        query_index, rank_index = np.nonzero(found)
        stored = rows.take(pa.array(hits.rows[found]))
        columns = [pa.array(np.asarray(query_ids, dtype=object)[query_index], pa.string()),
                   pa.array(rank_index + 1, pa.int32()), stored.column("id"),
                   pa.array(hits.scores[found].astype(np.float32), pa.float32())]
        columns += [stored.column(name) for name in stored.column_names if name != "id"]
        yield pa.Table.from_arrays(columns, schema=schema), len(query_ids)


def write_hits(results, schema, output, fmt) -> None:
    from vecpipe.cli import console
    from vecpipe.formats.writers import RecordWriter, text_output

    queries = hits = 0
    if fmt == "trec":
        with text_output(output) as out:
            for table, count in hit_tables(results, schema):
                out.write(trec_lines(table))
                hits, queries = hits + table.num_rows, queries + count
    else:
        with RecordWriter(output, fmt, schema=schema) as out:
            for table, count in hit_tables(results, schema):
                out.write_table(table)
                hits, queries = hits + table.num_rows, queries + count
    console.info(f"{hits:,} hits for {queries:,} queries")


def trec_lines(table) -> str:
    """TREC run lines: `qid Q0 docid rank score run`. Scores keep 9 significant digits (float32
    round-trips): rounding would create ties that trec_eval breaks by doc id."""
    columns = [table.column(name).to_pylist() for name in ("query_id", "id", "rank", "score")]
    return "".join(f"{q} Q0 {d} {r} {s:.9g} {TREC_RUN_NAME}\n" for q, d, r, s in zip(*columns))
