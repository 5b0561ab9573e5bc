"""Build a vector index (usearch HNSW) from an embeddings stream, or append to one."""
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

CALIBRATION_ROWS = 10_000
READ_BATCH_ROWS = 8192  # usearch adds in parallel; bigger batches keep its threads busy


def run(inputs: options.Inputs = None,
        output: options.OutputFolder = ...,
        metric: options.Metric = None,
        dtype: options.StorageDtype = None,
        connectivity: Annotated[Optional[int], typer.Option(
            "--connectivity", min=2, help="HNSW edges per node (M); usearch's default 16.",
            metavar="M", show_default=False)] = None,
        expansion_add: Annotated[Optional[int], typer.Option(
            "--expansion-add", min=1, help="HNSW candidate list while building (default 128).",
            metavar="N", show_default=False)] = None,
        expansion_search: Annotated[Optional[int], typer.Option(
            "--expansion-search", min=1, help="HNSW candidate list while searching, recorded "
                                              "as the default for `search --ef` (default 64).",
            metavar="N", show_default=False)] = None,
        library: Annotated[Optional[str], typer.Option(
            "--library", metavar="LIB", show_default=False,
            help="The HNSW graph's library: usearch (default: a core dependency, memory-mapped "
                 "whole, deletes in place, any --dtype) or faiss (faiss-cpu, `pip install "
                 "vecpipe[faiss]`: f32/f16 only, 2-3x the queries per second and half the "
                 "build time of usearch on 100k-1M MiniLM vectors; replacing or deleting "
                 "rows builds its graph again). Recorded in the manifest; search follows "
                 "it.")] = None,
        flat: Annotated[bool, typer.Option(
            "--flat", help="No HNSW graph: keep the vectors alone and search them exactly "
                           "(usearch's SIMD brute force). With --dtype b1 the smallest index "
                           "(48 B per 384-dim vector; the graph adds ~140 B); pair it with "
                           "--keep-vectors and `search --rescore`.")] = False,
        fields: options.Fields = None,
        all_fields: options.AllFields = False,
        old_store: options.alias(Optional[List[str]], "--store", "--fields", "fields",
                                 lambda value: {"fields": options.field_list(value)}) = None,
        old_store_all: options.alias(bool, "--store-all", "--all-fields", "all_fields") = False,
        keep_vectors: Annotated[bool, typer.Option(
            "--keep-vectors", help="Also keep the full-precision vectors (full.npy, memory-"
                                   "mapped) for `search --rescore`.")] = False,
        codec_file: options.CodecFile = None,
        append: Annotated[bool, typer.Option(
            "--append", help="Add to the existing index at -o (same model/dim/codec and text "
                             "fields embedded).")] = False,
        on_duplicate: options.OnDuplicate = "error",
        lexical: Annotated[bool, typer.Option(
            "--lexical", help="A BM25 index of the records' text (bm25s) instead of vectors: "
                              "no `embedding` needed; `search` takes text queries. Defaults "
                              "as BEIR's BM25 in bm25s: lowercase, English stopwords and "
                              "Snowball stemmer, lucene, k1 1.5, b 0.75.")] = False,
        text_fields: options.TextField = None,
        stemmer: Annotated[Optional[str], typer.Option(
            "--stemmer", metavar="LANG", show_default=False,
            help="--lexical: the Snowball stemmer (PyStemmer) of a language (english, "
                 "german..., or en, de...), or none. [default: english]")] = None,
        stopwords: Annotated[Optional[str], typer.Option(
            "--stopwords", metavar="LANG", show_default=False,
            help="--lexical: bm25s's stopword list (en, en_plus, de, fr, es, it, pt, nl, "
                 "ru, sv, no, da, tr, zh, ko), or none. [default: en]")] = None,
        k1: Annotated[Optional[float], typer.Option(
            "--k1", min=0, show_default=False,
            help="--lexical: BM25 term-frequency saturation. [default: 1.5]")] = None,
        b: Annotated[Optional[float], typer.Option(
            "--b", min=0, max=1, show_default=False,
            help="--lexical: BM25 length normalisation, 0 (none) to 1. [default: 0.75]")] = None,
        bm25_method: Annotated[Optional[str], typer.Option(
            "--bm25-method", metavar="METHOD", show_default=False,
            help="--lexical: lucene|robertson|atire|bm25l|bm25+ (bm25s's variants). "
                 "[default: lucene]")] = None,
        delete: Annotated[Optional[str], typer.Option(
            "--delete", metavar="IDS", show_default=False,
            help="Delete these ids from the index at -o: a file (- for stdin) of ids, one a "
                 "line, or records with an `id` field (JSONL, Arrow, Parquet, CSV). Alone it "
                 "reads no records; with --append the rows go first, then the input is added, "
                 "in one atomic swap. Ids the index lacks are counted, not an error.")] = None,
        query_prompt: options.QueryPrompt = None,
        model: options.Model = None,
        threads: options.Threads = 0,
        shard: options.Shard = None,
        input_format: options.InputFormat = "auto",
        force: options.Force = False,
        dry_run: options.DryRun = False,
        progress: options.Progress = False,
        quiet: options.Quiet = False):
    """Build a usearch HNSW index folder (or, with --flat, an exactly searched one) from
    embedding records (`id`, `embedding`, other fields). The folder is written under a
    temporary name beside DIR and renamed into place, so an interrupted build leaves the
    previous index intact. Keys are row numbers; ids and
    --fields go to rows.parquet, the model/prompt/codec to manifest.json so that
    `search` embeds queries the same way.

    \b
    Example:
      vecpipe embed docs.jsonl | vecpipe index -o idx --fields title
      vecpipe index docs.arrow --dtype b1 --keep-vectors -o idx   # then: search --rescore 10
      vecpipe index docs.arrow --dtype b1 --flat --keep-vectors -o idx   # no graph: 32x < f32
      vecpipe compress docs.arrow --dtype binary --bits 4 -o planes.arrow
      vecpipe index planes.arrow -o idx   # plane 1 in the graph, planes 2-4 rescore
      vecpipe compress docs.arrow --dtype pq --pq-m 48 --save-codec pq.json -o /dev/null
      vecpipe index docs.arrow --codec pq.json --keep-vectors -o idx   # search --rescore 4
      vecpipe embed new.jsonl | vecpipe index -o idx --append --on-duplicate last
      vecpipe index --delete gone.txt -o idx   # gone.txt: one id a line
      vecpipe index changed.arrow --append --on-duplicate last --delete gone.txt -o idx
      vecpipe index corpus.arrow --shard 3/8 -o idx/   # idx/part-00003-of-00008.idx
      vecpipe index corpus.jsonl --lexical --text-field title --text-field text -o idx-bm25
    """
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.core import notices
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream, shown_name
    from vecpipe.formats.shards import parse_shard

    options.show_progress(progress)
    store, store_all = fields, all_fields
    dtype = options.index_dtype(dtype)
    on_duplicate = options.index_duplicates(on_duplicate)
    part = parse_shard(shard)
    ids = _delete_ids(delete, inputs, append, part)
    lexical_options = {"--text-field": text_fields, "--stemmer": stemmer,
                       "--stopwords": stopwords, "--k1": k1, "--b": b, "--bm25-method": bm25_method}
    if lexical or (append and lexical_index(output)):
        return index_lexical(inputs, output, append, ids, on_duplicate, store, store_all,
                             lexical_options, {
                                 "--metric": metric, "--dtype": dtype, "--flat": flat,
                                 "--keep-vectors": keep_vectors, "--connectivity": connectivity,
                                 "--library": library,
                                 "--expansion-add": expansion_add,
                                 "--expansion-search": expansion_search,
                                 "--query-prompt": query_prompt, "-m/--model": model,
                                 "--shard": shard, "--codec": codec_file}, input_format,
                             dry_run)
    given = [name for name, value in lexical_options.items() if value is not None]
    if given:
        raise UsageError(f"{given[0]} applies to a lexical index (--lexical)")
    if ids is not None and not append:
        return _delete_only(output, ids, threads, dry_run, {
            "--metric": metric, "--dtype": dtype, "--connectivity": connectivity,
            "--library": library,
            "--expansion-add": expansion_add, "--expansion-search": expansion_search,
            "--flat": flat, "--fields": store, "--all-fields": store_all,
            "--keep-vectors": keep_vectors, "--query-prompt": query_prompt, "--model": model,
            "--codec": codec_file})
    encoder = _load_codec(codec_file)
    if part is not None:
        output = shard_index_path(output, part, create=not dry_run)
        counted = {"--metric": metric, "--dtype": dtype, "--connectivity": connectivity,
                   "--expansion-add": expansion_add, "--expansion-search": expansion_search,
                   **({"--library": library} if library else {}),
                   "--flat": flat, "--fields": store, "--all-fields": store_all,
                   "--keep-vectors": keep_vectors, "--on-duplicate": on_duplicate,
                   "--query-prompt": query_prompt, "--model": model,
                   "--input-format": input_format, "--force": force,
                   "--codec": encoder.identity() if encoder else None}  # not --threads, -q
        if not dry_run and complete_index(output, inputs, counted, part, append):
            console.info(f"{output} is already complete: skipped")
            return
    stream = RecordStream(inputs, input_format, batch_rows=READ_BATCH_ROWS,
                          check=input_check(force, documents=True))
    plan = plan_index(stream, output, metric, dtype, connectivity, expansion_add,
                      expansion_search, flat, store, store_all, keep_vectors, append,
                      query_prompt, model, force, encoder, library)
    plan.shard = part
    if part is not None and plan.spec is not None and plan.spec.tokens:
        raise UsageError("--shard: an index keeping token vectors is built whole (for now)")
    if dry_run:
        return print_plan(plan, stream, output)
    builder_args = dict(on_duplicate=on_duplicate, threads=threads, delete=ids)
    builder = start_builder(output, plan, **builder_args)
    count = notices.input_records(stream.inputs, input_format) if part is None else None
    with builder, console.progress(desc="index", unit="vec", count=count) as bar:
        for batch in plan.batches():
            _add(builder, batch)
            bar.update(len(batch["ids"]))
        if plan.rows_read == 0:
            raise DataError("empty input: no records to index",
                            source=shown_name(stream.inputs[0]))
        if part is not None and builder.count == 0:
            raise DataError(f"shard {part.index}/{part.count} holds none of the input's "
                            f"{plan.rows_read:,} records, and an index needs one",
                            hint="use fewer shards")
    added = builder.count - (plan.base.count - builder.deleted if plan.base else 0)
    console.info(f"{builder.count:,} vectors in {output} ({added:,} added"
                 + (_deleted_counts(builder.deleted, builder.not_found) if ids is not None
                    else "")
                 + (f", {builder.skipped:,} duplicates skipped" if builder.skipped else "")
                 + (f", {builder.replaced:,} replaced" if builder.replaced else "")
                 + f"; {builder.spec.dtype}"
                 + (f" {builder.spec.planes} planes" if builder.spec.planes > 1 else "")
                 + f", {'cos' if builder.spec.unit_ip else builder.spec.metric}"
                 + (", flat" if builder.spec.flat else "")
                 + (", faiss" if builder.spec.library == "faiss" else "") + ")")


OPTION_OF = {"metric": "--metric", "dtype": "--dtype", "keep_vectors": "--keep-vectors",
             "hnsw": "--connectivity/--expansion-*", "on_duplicate": "--on-duplicate",
             "library": "--library"}


def flagged(err):
    """A core ParameterError worded with the option that set the parameter."""
    from vecpipe.formats.errors import UsageError

    return UsageError(f"{OPTION_OF[err.parameter]}: {err.message}", source=err.source,
                      hint=err.hint)


def start_builder(output: str, plan: "IndexPlan", **builder_args):
    """The IndexBuilder of a plan: a new index (`plan.spec`) or a copy of `plan.base`."""
    from vecpipe.core.index_build import IndexBuilder
    from vecpipe.formats.errors import ParameterError

    try:
        if plan.base is not None:
            return IndexBuilder(output, base=plan.base, **builder_args)
        return IndexBuilder(output, plan.spec, fields=plan.fields, **builder_args)
    except ParameterError as err:
        raise flagged(err) from None


def _delete_ids(delete, inputs, append, part) -> list | None:
    """The ids of --delete (None without it), read whole before anything is built: a bad
    file leaves the index as it was."""
    from vecpipe.core.index_delete import read_ids
    from vecpipe.formats.errors import UsageError
    from vecpipe.formats.readers import check_one_stdin

    if delete is None:
        return None
    if part is not None:
        raise UsageError("--delete applies to one index folder, not to --shard parts",
                         hint="merge the parts into one index (vecpipe merge --index) and "
                              "delete from it")
    if inputs and not append:
        raise UsageError("--delete with input records needs --append (without it the index "
                         "would be built anew from the input)")
    if append:
        check_one_stdin([*(inputs or ["-"]), delete])
    return read_ids(delete)


def _delete_only(output: str, ids: list, threads: int, dry_run: bool,
                 new_index_options: dict) -> None:
    """`index --delete IDS -o DIR` alone: the index loses those rows, reading no records. No
    row to delete: the folder is left untouched (a rerun changes nothing)."""
    from vecpipe.cli import console
    from vecpipe.core.index_build import IndexBuilder
    from vecpipe.core.index_delete import kept_rows
    from vecpipe.core.index_open import open_index
    from vecpipe.formats.errors import DataError, UsageError

    given = [name for name, value in new_index_options.items() if value not in (None, False)]
    if given:
        raise UsageError(f"{given[0]} applies to indexing records; --delete alone keeps the "
                         "rest of the index as it is")
    base = open_index(output, verify=True)
    if base.layout == "linked":
        raise UsageError("cannot delete from a linked multi-shard index",
                         hint="delete from the indexes it links and link them again, or "
                              "merge them into one (vecpipe merge --index) and delete there")
    _, deleted, missing = kept_rows(base.ids(), ids)
    if deleted == base.count:
        raise DataError(f"deleting all {base.count:,} rows would leave an empty index, and an "
                        "index needs one", source=output,
                        hint="remove the folder instead, or add records in the same run "
                             "with --append")
    if dry_run:
        return console.print_plan("index --dry-run: the checks passed; this run would", {
            "output": output, "action": "delete" if deleted else "nothing",
            "rows_now": base.count, "deleted": deleted, "ids_not_in_index": missing,
            "rows_after": base.count - deleted, "layout": base.layout})
    if deleted and base.layout == "lexical":  # re-scored without the deleted rows
        from vecpipe.core.lexical import LexicalBuilder

        with LexicalBuilder(output, base=base, delete=ids):
            pass
    elif deleted:
        with IndexBuilder(output, base=base, delete=ids, threads=threads):
            pass
    console.info(f"{base.count - deleted:,} vectors in {output} ("
                 + _deleted_counts(deleted, missing)[2:] + ("" if deleted else "; unchanged")
                 + ")")


def _deleted_counts(deleted: int, missing: int) -> str:
    """', N deleted, M ids not in the index' (a note: the ids may be gone already)."""
    return f", {deleted:,} deleted" + (
        f", {missing:,} id{'' if missing == 1 else 's'} not in the index" if missing else "")


class IndexPlan:
    """What the input holds and how it becomes index batches."""

    def __init__(self, stream, spec, fields, base, kind, input_codec, encoder=None,
                 fit_codec=None, keep_vectors=False):
        self.stream, self.spec, self.fields, self.base = stream, spec, fields, base
        self.kind = kind                # float | int8 | uint8 | bfloat16 | bits
        self.input_codec = input_codec  # the codec of the input's vectors, if compressed
        self.encoder = encoder          # a codec to apply here (fitted here, or the base's)
        self.fit_codec = fit_codec      # "int8"/"binary": fit `encoder` on the first rows
        self.keep_vectors = keep_vectors
        self.rows_read = 0
        self.next_record = 1            # for inputs without ids: the record number is the id
        self.shard = None               # --shard: keep only this shard's records

    def batches(self):
        """Dicts of IndexBuilder.add arguments, one per input batch."""
        items = iter(self.stream)
        if self.fit_codec:
            items = self._calibrated(items)
        for item in items:  # the codec is fitted on the whole input: the same for every shard
            if item.batch.num_rows:
                self.rows_read += item.batch.num_rows
                batch = self._convert(item)
                yield batch if self.shard is None else _in_shard(batch, self.shard)

    def _calibrated(self, items):
        """Buffer the first CALIBRATION_ROWS vectors, fit the codec on them, then go on."""
        from vecpipe.core.codec import fit_on_first

        items = iter(items)
        normalize = self.spec.metadata.get("normalized", "true") != "false"
        self.encoder, buffered = fit_on_first(
            items, CALIBRATION_ROWS, lambda item: _column_vectors(item, "embedding"),
            self.fit_codec, normalize=normalize, model=self.spec.metadata.get("model"))
        self.spec.metadata.update(self.encoder.metadata())
        yield from buffered
        yield from items

    def _convert(self, item) -> dict:
        import pyarrow as pa

        from vecpipe.formats import schema as names
        from vecpipe.core.index_format import to_index_codes

        batch = item.batch
        vectors = _column_vectors(item, names.EMBEDDING,
                                  "vector" if self.kind == "float" else None)
        full = None
        if self.kind == "float":
            full = vectors if self.keep_vectors else None
            if self.encoder is not None:
                vectors = to_index_codes(self.encoder, self.encoder.encode(vectors))
        else:
            vectors = to_index_codes(self.input_codec, vectors)
        ids = self._ids(batch, item)
        stored = pa.table([pa.array(ids, pa.string())] +
                          [batch.column(name) if name in batch.schema.names
                           else pa.nulls(batch.num_rows) for name in self.fields[1:]],
                          names=self.fields)
        extra = {}
        if self.spec is not None and self.spec.tokens:
            from vecpipe.core.multivector import read_tokens

            extra["tokens"] = read_tokens(item, self.spec.tokens["dim"])
        return dict(ids=ids, vectors=vectors, stored=stored, full=full, source=item.source,
                    first_record=item.first_record, **extra)

    def _ids(self, batch, item) -> list:
        from vecpipe.formats import schema as names

        id_column = names.find_id_column(batch.schema)
        if id_column is None:
            first = self.next_record
            self.next_record += batch.num_rows
            return names.batch_ids(batch, None, first).to_pylist()
        return names.batch_ids(batch, id_column, item.first_record, source=item.source
                               ).to_pylist()


def print_plan(plan: IndexPlan, stream, output: str) -> None:
    """--dry-run: the build's checks passed (the first batch's vectors and ids too); say what
    it would make, writing nothing."""
    import os

    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.readers import shown_name

    first = stream.peek()
    if first is not None and first.batch.num_rows:
        plan._convert(first)  # vectors finite and of one dim, ids present
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent) and plan.shard is None:
        raise DataError("no such folder for the index", source=parent)
    shape = plan.base if plan.base is not None else plan.spec  # both have dim, metric...
    console.print_plan("index --dry-run: the checks passed; this build would", {
        "inputs": [shown_name(path) for path in stream.inputs], "output": output,
        "action": "append" if plan.base is not None else
        "replace" if os.path.exists(output) else "create",
        "rows_now": None if plan.base is None else plan.base.count,
        "stored_fields": plan.fields, "vectors": plan.kind, "dim": shape.dim,
        "metric": shape.metric, "dtype": shape.dtype, "planes": shape.planes,
        "layout": shape.layout, "library": None if shape.flat else shape.library,
        "keep_vectors": plan.keep_vectors, "model": shape.metadata.get("model"),
        "shard": None if plan.shard is None else f"{plan.shard.index}/{plan.shard.count}"})


def shard_index_path(folder: str, shard, create: bool = True) -> str:
    """DIR/part-0000I-of-0000N.idx: one index folder per shard."""
    import os

    if create:
        os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, shard.part_name("idx"))


def complete_index(path: str, inputs, options: dict, shard, append: bool = False) -> bool:
    """Whether the index part `path` is intact and was built from these inputs (their content)
    and options. When not (or with --append), say why and record the build about to start."""
    import os

    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.core.index_format import MANIFEST
    from vecpipe.core.index_open import open_index
    from vecpipe.formats.parts import Job, folder_part_job, folder_part_status, start_folder_part

    if append:  # the part is then what its last job made plus this input
        options = dict(options, **{"--append": folder_part_job(path)})
    job = Job(list(inputs or ["-"]), options, shard)
    manifest = os.path.join(path, MANIFEST)
    if not append:
        try:
            intact = os.path.isdir(path) and open_index(path, verify=True) is not None
        except DataError:
            intact = False
        done, why = folder_part_status(path, job, manifest, intact)
        if done:
            return True
        if why:
            console.info(f"{path}: {why}: making it again")
    start_folder_part(path, job, manifest)
    return False


def _in_shard(batch: dict, shard) -> dict:
    """The rows of a converted batch that belong to `shard` (record ids hashed as `embed
    --shard` does); `kept` maps them back to their records for error messages."""
    from vecpipe.formats.shards import shard_mask

    kept = shard_mask(batch["ids"], shard).nonzero()[0]
    full = batch["full"]
    return dict(batch, ids=[batch["ids"][row] for row in kept], vectors=batch["vectors"][kept],
                stored=batch["stored"].take(kept), full=None if full is None else full[kept],
                kept=kept)


def _add(builder, batch: dict) -> None:
    """builder.add; an error in a shard's rows names the input record it came from."""
    from vecpipe.formats.errors import DataError

    kept = batch.pop("kept", None)
    try:
        builder.add(**batch)
    except DataError as err:
        if kept is not None and err.record is not None:
            err.record = batch["first_record"] + int(kept[err.record - batch["first_record"]])
        if err.message.startswith("duplicate id"):
            err.hint = "--on-duplicate first keeps the first, last the last"
        raise


def _column_vectors(item, name, nonfinite=None):
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError

    if name not in item.batch.schema.names:
        raise DataError(f"record has no {name!r} field", source=item.source,
                        record=item.first_record, hint="make vectors with `vecpipe embed` first")
    return names.checked_vectors(item, name, nonfinite)


def plan_index(stream, output, metric, dtype, connectivity, expansion_add, expansion_search,
               flat, store, store_all, keep_vectors, append, query_prompt, model,
               force, encoder=None, library=None) -> IndexPlan:
    """Validate everything that can be checked before reading vectors; no output yet."""
    from vecpipe.formats import schema as names
    from vecpipe.core.codec import codec_from_meta
    from vecpipe.core.index_spec import spec_for_input, use_library, vector_kind
    from vecpipe.formats.errors import DataError, ParameterError, UsageError
    from vecpipe.formats.readers import shown_name

    schema = stream.schema
    if schema is None:
        raise DataError("empty input: no records to index", source=shown_name(stream.inputs[0]))
    if names.EMBEDDING not in schema.names:
        raise DataError(f"input has no {names.EMBEDDING!r} field (fields: "
                        f"{', '.join(schema.names)})", source=shown_name(stream.inputs[0]),
                        hint="make vectors with `vecpipe embed` first")
    meta = dict(stream.metadata)
    if model is not None:
        meta.update(_model_meta(model, meta, force))
    codec = codec_from_meta(meta, source=shown_name(stream.inputs[0]))
    arrow_type = schema.field(names.EMBEDDING).type
    kind = vector_kind(arrow_type, meta, codec)
    if append:
        if encoder is not None:
            raise UsageError("--append encodes new records with the index's own codec; "
                             "--codec applies to new indexes")
        return _append_plan(stream, output, meta, kind, codec, metric, dtype, flat, store,
                            store_all, keep_vectors, query_prompt, force, library)
    fields = _stored_fields(schema, store, store_all, shown_name(stream.inputs[0]))
    tokens = _token_spec(schema, meta, shown_name(stream.inputs[0]), encoder, dtype)
    if meta.get("fde") and metric is None:
        metric = "ip"  # FDE inner products approximate Chamfer similarity; cos would not
    try:
        if encoder is not None:
            spec, fit_codec = _encoded_spec(encoder, kind, arrow_type, codec, meta, metric,
                                            dtype, keep_vectors, shown_name(stream.inputs[0]))
        else:
            spec, fit_codec = spec_for_input(kind, arrow_type, codec, meta, metric, dtype,
                                             keep_vectors)
    except ParameterError as err:
        raise flagged(err) from None
    spec.connectivity, spec.expansion_add, spec.expansion_search = \
        connectivity, expansion_add, expansion_search
    spec.flat = flat or spec.flat  # pq codes have no graph: always flat
    spec.query_prompt = query_prompt
    spec.tokens = tokens
    if library is not None:
        try:
            use_library(spec, library, coded=(codec or encoder) is not None)
        except ParameterError as err:
            raise flagged(err) from None
    return IndexPlan(stream, spec, fields, None, kind, codec, encoder=encoder,
                     fit_codec=fit_codec, keep_vectors=keep_vectors)


def _token_spec(schema, meta, source, encoder, dtype) -> dict | None:
    """{"dim": N} when the input is FDEs (compress --fde) with their token vectors: the index
    keeps them (tokens.npy) so search --rescore can score by exact Chamfer; else None."""
    from vecpipe.core.fde import config_from_meta
    from vecpipe.core.multivector import TOKEN_VECTORS
    from vecpipe.formats.errors import DataError, UsageError

    config = config_from_meta(meta, source)
    if config is None:
        return None
    if meta.get("fde_side") == "query":
        raise DataError("these are query-side FDEs (bucket sums); an index holds documents",
                        source=source, hint="compress the documents with --fde-side document")
    if encoder is not None or dtype not in (None, "f32"):
        raise UsageError("an index of FDEs keeps them float32: leave out --codec and --dtype")
    return {"dim": config.token_dim} if TOKEN_VECTORS in schema.names else None


def _load_codec(path):
    """The codec of --codec FILE (None without it)."""
    from vecpipe.core.codec import Codec

    return Codec.load(path) if path else None


def _encoded_spec(encoder, kind, arrow_type, codec, meta, metric, dtype, keep_vectors,
                  source):
    """--codec: the spec of an index of `encoder`'s codes made from float input vectors, which
    it keeps whole (not reduced) with --keep-vectors."""
    import pyarrow as pa

    from vecpipe.core.index_spec import spec_for_input, vector_kind
    from vecpipe.formats.errors import DataError, UsageError

    if kind != "float" or codec is not None:
        raise UsageError("--codec encodes float vectors; this input is already compressed"
                         + (f" ({codec.describe()})" if codec is not None else ""),
                         source=source, hint="index the compressed records without --codec")
    if dtype is not None:
        raise UsageError("--codec decides what the index stores; drop --dtype")
    if arrow_type.list_size != encoder.input_dim:
        raise DataError(f"the vectors have {arrow_type.list_size} dimensions, the codec "
                        f"encodes {encoder.input_dim}", source=source)
    meta.update(encoder.metadata())
    codes_type = encoder.arrow_type()
    spec, fit_codec = spec_for_input(vector_kind(codes_type, meta, encoder), codes_type,
                                     encoder, meta, metric)
    if keep_vectors:
        spec.full = {"dim": encoder.input_dim, "dtype": "float16"
                     if arrow_type.value_type == pa.float16() else "float32"}
    return spec, fit_codec


def _model_meta(model, meta, force) -> dict:
    """The model keys for -m; refuses a model other than the one the stream records."""
    from vecpipe.cli.models import load_model
    from vecpipe.core.space import VectorSpace, check_model

    loaded = load_model(model)
    check_model(meta, loaded, "the input", model, keys=("model",), force=force)
    given = VectorSpace.of_model(loaded).meta()
    return {key: value for key, value in given.items() if key not in meta}


def _stored_fields(schema, store, store_all, source: str) -> list:
    """The stored fields, checked against the first batch's schema (so that a typo stops a
    pipe from a slow embed at its first batch, not at its end)."""
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError

    from vecpipe.core.multivector import TOKEN_VECTORS

    id_column = names.find_id_column(schema)
    others = [n for n in schema.names if n not in (names.EMBEDDING, id_column, TOKEN_VECTORS)]
    if store_all:
        if store:
            raise UsageError("give --fields or --all-fields, not both")
        return [names.ID, *others]
    wanted = [name.strip() for item in store or [] for name in item.split(",") if name.strip()]
    missing = [name for name in wanted if name not in schema.names]
    if missing:
        raise DataError(f"--fields {missing[0]}: no such field (fields: {', '.join(others)})",
                        source=source, record=1)
    if names.EMBEDDING in wanted or TOKEN_VECTORS in wanted:
        raise UsageError("the vectors are stored anyway; --fields names other fields")
    return [names.ID, *dict.fromkeys(n for n in wanted if n not in (names.ID, id_column))]


def _append_plan(stream, output, meta, kind, codec, metric, dtype, flat, store, store_all,
                 keep_vectors, query_prompt, force, library=None) -> IndexPlan:
    from vecpipe.core.space import DOCUMENT_KEYS, TEXT_KEY, check_same_documents
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.core.index_open import open_index
    from vecpipe.core.index_spec import KIND_DTYPE
    from vecpipe.formats.readers import shown_name

    base = open_index(output, verify=True)  # its files are copied into the new index
    if base.layout == "linked":
        raise UsageError("cannot append to a linked multi-shard index",
                         hint="index the new records on their own and link them in with "
                              "`vecpipe merge --index --link`")
    if store or store_all or query_prompt is not None:
        raise UsageError("--append keeps the index's stored fields and query prompt; "
                         "--fields/--all-fields/--query-prompt apply to new indexes")
    for name, given, kept in (("--metric", metric, (base.metric, base.score_metric)),
                              ("--dtype", dtype, (base.dtype,))):
        if given is not None and given not in kept:
            raise UsageError(f"{name} {given} differs from the index's {kept[0]}")
    if flat and not base.flat:
        raise UsageError("the index has an HNSW graph; --flat applies to new indexes")
    if library is not None and library != base.library:
        raise UsageError(f"--library {library} differs from the index's {base.library}")
    if keep_vectors and base.full_spec is None:
        raise UsageError("the index keeps no full vectors; --keep-vectors applies to new "
                         "indexes")
    keep_vectors = base.full_spec is not None
    if keep_vectors and kind != "float":
        raise DataError("the index keeps full vectors, so appended records need float vectors")
    quantize_here = kind == "float" and codec is None and base.codec is not None
    keys = ("model", TEXT_KEY) if quantize_here else DOCUMENT_KEYS
    check_same_documents(base.metadata, meta, output, shown_name(stream.inputs[0]), keys=keys,
                         force=force)
    if kind != "float" and base.dtype != KIND_DTYPE[kind]:
        raise DataError(f"the input holds {kind} codes, the index is {base.dtype}")
    return IndexPlan(stream, None, base.fields, base, kind, codec,
                     encoder=base.codec if quantize_here else None, keep_vectors=keep_vectors)


# ---- --lexical: a BM25 index of the records' text (core/lexical.py) ---------------------------

LEXICAL_OPTION_OF = {"method": "--bm25-method", "k1": "--k1", "b": "--b",
                     "stopwords": "--stopwords", "stemmer": "--stemmer",
                     "on_duplicate": "--on-duplicate"}


def lexical_index(path: str) -> bool:
    """Whether `path` is an index folder of layout lexical (its manifest read, nothing else)."""
    import json
    import os

    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            return json.load(f).get("layout") == "lexical"
    except (OSError, ValueError, AttributeError):
        return False  # no index, or not readable: the dense path says why


def index_lexical(inputs, output, append, ids, on_duplicate, store, store_all,
                  lexical_options, dense_options, input_format, dry_run) -> None:
    """`index --lexical`: records -> LexicalBuilder (new, or a re-scored copy of the index at
    -o with --append and --delete)."""
    from vecpipe.cli import console
    from vecpipe.core import notices
    from vecpipe.core.lexical import LexicalBuilder, MissingTextField, record_batches
    from vecpipe.formats.errors import DataError, ParameterError, UsageError
    from vecpipe.formats.readers import RecordStream, shown_name

    given = [name for name, value in dense_options.items() if value not in (None, False)]
    if given:
        raise UsageError(f"{given[0]} applies to vector indexes, not to a lexical one")
    if ids is not None and not append:
        return _delete_only(output, ids, 0, dry_run, {})
    stream = RecordStream(inputs, input_format, batch_rows=READ_BATCH_ROWS)
    try:
        base, settings, fields = _lexical_plan(stream, output, append, store, store_all,
                                               lexical_options)
        if dry_run:
            return _print_lexical_plan(stream, output, base, settings, fields)
        builder = LexicalBuilder(output, settings, base=base, on_duplicate=on_duplicate,
                                 fields=fields, delete=ids)
    except ParameterError as err:
        raise UsageError(f"{LEXICAL_OPTION_OF[err.parameter]}: {err.message}",
                         hint=err.hint) from None
    read = 0
    count = notices.input_records(stream.inputs, input_format)
    with builder, console.progress(desc="index", unit="rec", count=count) as bar:
        try:
            for batch in record_batches(stream, settings.text_fields, fields):
                builder.add(**batch)
                read += len(batch["ids"])
                bar.update(len(batch["ids"]))
        except MissingTextField as err:
            err.hint = "--text-field NAME names the field to index (repeat it to join several)"
            raise
        except DataError as err:
            if err.message.startswith("duplicate id"):
                err.hint = "--on-duplicate first keeps the first, last the last"
            raise
        if read == 0 and base is None:
            raise DataError("empty input: no records to index",
                            source=shown_name(stream.inputs[0]))
    added = builder.count - (base.count - builder.deleted if base else 0)
    console.info(f"{builder.count:,} records in {output} ({added:,} added"
                 + (_deleted_counts(builder.deleted, builder.not_found) if ids is not None
                    else "")
                 + (f", {builder.skipped:,} duplicates skipped" if builder.skipped else "")
                 + (f", {builder.replaced:,} replaced" if builder.replaced else "")
                 + f"; lexical, BM25 {settings.method} k1={settings.k1:g} b={settings.b:g})")


def _lexical_plan(stream, output, append, store, store_all, lexical_options):
    """(base index or None, LexicalSettings, stored fields), checked before any record is
    indexed: --append keeps the index's settings and fields."""
    from vecpipe.core.index_open import open_index
    from vecpipe.core.lexical import LexicalSettings
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.readers import shown_name

    text_fields = lexical_options.pop("--text-field")
    if not append:
        schema = stream.schema
        if schema is None:
            raise DataError("empty input: no records to index",
                            source=shown_name(stream.inputs[0]))
        chosen = {"stopwords": "--stopwords", "stemmer": "--stemmer", "k1": "--k1", "b": "--b",
                  "method": "--bm25-method"}
        settings = LexicalSettings.chosen(
            text_fields, **{key: lexical_options[name] for key, name in chosen.items()
                            if lexical_options[name] is not None})
        return None, settings, _stored_fields(schema, store, store_all,
                                              shown_name(stream.inputs[0]))
    base = open_index(output, verify=True)  # its tokens are re-scored into the new index
    if base.layout != "lexical":
        raise UsageError(f"the index at {output} holds vectors (layout {base.layout}); "
                         "--lexical appends to a lexical index")
    given = [name for name, value in lexical_options.items() if value is not None]
    if given or store or store_all:
        raise UsageError(f"--append keeps the index's BM25 settings and stored fields; "
                         f"{given[0] if given else '--fields/--all-fields'} applies to new "
                         "indexes")
    if text_fields and list(text_fields) != base.settings.text_fields:
        raise UsageError(f"--text-field {' '.join(text_fields)} differs from the index's "
                         f"{' '.join(base.settings.text_fields)}")
    return base, base.settings, base.fields


def _print_lexical_plan(stream, output, base, settings, fields) -> None:
    """--dry-run: the first records checked (text, ids); the plan printed, nothing written."""
    import os

    from vecpipe.cli import console
    from vecpipe.core.lexical import record_batches
    from vecpipe.formats.readers import shown_name

    first = stream.peek()
    if first is not None:
        next(record_batches([first], settings.text_fields, fields), None)
    console.print_plan("index --dry-run: the checks passed; this build would", {
        "inputs": [shown_name(path) for path in stream.inputs], "output": output,
        "action": "append" if base is not None else
        "replace" if os.path.exists(output) else "create",
        "rows_now": None if base is None else base.count, "stored_fields": fields,
        "layout": "lexical", "text_fields": settings.text_fields,
        "stopwords": settings.stopwords, "stemmer": settings.stemmer,
        "bm25_method": settings.method, "k1": settings.k1, "b": settings.b})
