"""Build a vector index (usearch HNSW) from an embeddings stream, or append to one."""
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

CALIBRATION_ROWS = 10_000
READ_BATCH_ROWS = 8192  # usearch adds in parallel; bigger batches keep its threads busy


def run(inputs: options.Inputs = None,
        output: Annotated[str, typer.Option(
            "-o", "--output", help="The index folder to write (replaced atomically; through a "
                                   "symlink, the link's target folder is replaced and the "
                                   "link kept), or to extend with --append.",
            metavar="DIR")] = ...,
        metric: Annotated[Optional[str], typer.Option(
            "--metric", help="cos|ip|l2sq|hamming. Default: cos for float vectors, hamming for "
                             "packed bits. With --dtype b1, cos/ip/l2sq name the metric of "
                             "rescoring.", show_default=False)] = None,
        dtype: Annotated[Optional[str], typer.Option(
            "--dtype", help="f32|f16|bf16|i8|b1. Default: follows the input (float32 -> f32, "
                            "float16 -> f16, int8 codes -> i8, packed bits -> b1). i8/b1 on "
                            "float input quantize here (the compress codec, fitted on the first "
                            f"{CALIBRATION_ROWS:,} vectors, recorded in the manifest).",
            show_default=False)] = None,
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
        flat: Annotated[bool, typer.Option(
            "--flat", help="No HNSW graph: keep the vectors alone and search them exactly "
                           "(usearch's SIMD brute force). With --dtype b1 the smallest index "
                           "(48 B per 384-dim vector; the graph adds ~140 B); pair it with "
                           "--keep-vectors and `search --rescore`.")] = False,
        store: Annotated[Optional[List[str]], typer.Option(
            "--store", help="Keep this field for output and --filter (repeat, or a,b). `id` is "
                            "always kept.", metavar="FIELD", show_default=False)] = None,
        store_all: Annotated[bool, typer.Option(
            "--store-all", help="Keep every field but the vectors.")] = False,
        keep_vectors: Annotated[bool, typer.Option(
            "--keep-vectors", help="Also keep the full-precision vectors (full.npy, memory-"
                                   "mapped) for `search --rescore`.")] = False,
        append: Annotated[bool, typer.Option(
            "--append", help="Add to the existing index at -o (same model/dim/codec).")] = False,
        on_duplicate: Annotated[str, typer.Option(
            "--on-duplicate", help="error|skip|replace: an id already indexed (or repeated in "
                                   "the input) fails, keeps the first, or replaces it.")
        ] = "error",
        query_prompt: Annotated[Optional[str], typer.Option(
            "--query-prompt", help="Prompt that `search` puts before query texts (default: "
                                   "the model's `query` prompt if it has one).",
            metavar="TEXT", show_default=False)] = None,
        model: Annotated[Optional[str], typer.Option(
            "-m", "--model", help="The model that made the vectors, recorded for `search` when "
                                  "the input carries no metadata (JSONL); checked otherwise.",
            metavar="MODEL", show_default=False)] = None,
        threads: Annotated[int, typer.Option(
            "--threads", min=0, help="usearch threads (0 = all cores).")] = 0,
        shard: Annotated[Optional[str], typer.Option(
            "--shard", help="Index only shard I of N (I/N, or auto from Slurm/torchrun/"
                            "Kubernetes) into DIR/part-0000I-of-0000N.idx; a complete one is "
                            "skipped. `merge --index --link DIR/part-*` serves them as one.",
            metavar="I/N")] = None,
        input_format: options.InputFormat = "auto",
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Build a usearch HNSW index folder (or, with --flat, an exactly searched one) from
    embedding records (`id`, `embedding`, other fields). The folder is written under a
    temporary name beside DIR and renamed into place, so an interrupted build leaves the
    previous index intact. Keys are row numbers; ids and
    --store'd fields go to rows.parquet, the model/prompt/codec to manifest.json so that
    `search` embeds queries the same way.

    \b
    Example:
      vecpipe embed docs.jsonl | vecpipe index -o idx --store title
      vecpipe index docs.arrow --dtype b1 --keep-vectors -o idx   # then: search --rescore 10
      vecpipe index docs.arrow --dtype b1 --flat --keep-vectors -o idx   # no graph: 32x < f32
      vecpipe embed new.jsonl | vecpipe index -o idx --append --on-duplicate replace
      vecpipe index corpus.arrow --shard 3/8 -o idx/   # idx/part-00003-of-00008.idx
    """
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.core.index_store import IndexBuilder
    from vecpipe.formats.readers import RecordStream, shown_name
    from vecpipe.formats.shards import parse_shard

    part = parse_shard(shard)
    if part is not None:
        output = shard_index_path(output, part)
        counted = {"--metric": metric, "--dtype": dtype, "--connectivity": connectivity,
                   "--expansion-add": expansion_add, "--expansion-search": expansion_search,
                   "--flat": flat, "--store": store, "--store-all": store_all,
                   "--keep-vectors": keep_vectors, "--on-duplicate": on_duplicate,
                   "--query-prompt": query_prompt, "--model": model,
                   "--input-format": input_format, "--force": force}  # not --threads, -q
        if complete_index(output, inputs, counted, part, append):
            console.info(f"{output} is already complete: skipped")
            return
    stream = RecordStream(inputs, input_format, batch_rows=READ_BATCH_ROWS, force=force)
    plan = plan_index(stream, output, metric, dtype, connectivity, expansion_add,
                      expansion_search, flat, store, store_all, keep_vectors, append,
                      query_prompt, model, force)
    plan.shard = part
    builder_args = dict(on_duplicate=on_duplicate, threads=threads)
    if plan.base is not None:
        builder = IndexBuilder(output, base=plan.base, **builder_args)
    else:
        builder = IndexBuilder(output, plan.spec, fields=plan.fields, **builder_args)
    with builder, console.progress(desc="index", unit="vec") as bar:
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
    added = builder.count - (plan.base.count if plan.base else 0)
    console.info(f"{builder.count:,} vectors in {output} ({added:,} added"
                 + (f", {builder.skipped:,} duplicates skipped" if builder.skipped else "")
                 + (f", {builder.replaced:,} replaced" if builder.replaced else "")
                 + f"; {builder.spec.dtype}, {builder.spec.metric}"
                 + (", flat" if builder.spec.flat else "") + ")")


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
        import numpy as np

        from vecpipe.core.codec import Codec

        buffered, sample, rows = [], [], 0
        for item in items:
            buffered.append(item)
            sample.append(_column_vectors(item, "embedding"))
            rows += item.batch.num_rows
            if rows >= CALIBRATION_ROWS:
                break
        normalize = self.spec.metadata.get("normalized", "true") != "false"
        self.encoder = Codec.fit(np.concatenate(sample), to=self.fit_codec, normalize=normalize,
                                 model=self.spec.metadata.get("model"))
        self.spec.metadata.update(self.encoder.metadata())
        yield from buffered
        yield from items

    def _convert(self, item) -> dict:
        import pyarrow as pa

        from vecpipe.formats import schema as names
        from vecpipe.core.index_store import to_index_codes

        batch = item.batch
        vectors = _column_vectors(item, names.EMBEDDING)
        full = None
        if self.kind == "float":
            _check_finite(vectors, item)
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
        return dict(ids=ids, vectors=vectors, stored=stored, full=full, source=item.source,
                    first_record=item.first_record)

    def _ids(self, batch, item) -> list:
        import pyarrow as pa

        from vecpipe.formats import schema as names
        from vecpipe.formats.errors import DataError

        id_column = names.find_id_column(batch.schema)
        if id_column is None:
            first = self.next_record
            self.next_record += batch.num_rows
            return [str(n) for n in range(first, first + batch.num_rows)]
        column = batch.column(id_column)
        if column.null_count:
            bad = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise DataError(f"record has no {id_column}", source=item.source,
                            record=item.first_record + int(bad))
        if not pa.types.is_string(column.type):
            column = column.cast(pa.string())
        return column.to_pylist()


def shard_index_path(folder: str, shard) -> str:
    """DIR/part-0000I-of-0000N.idx: one index folder per shard."""
    import os

    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, shard.part_name("idx"))


def complete_index(path: str, inputs, options: dict, shard, append: bool = False) -> bool:
    """Whether the index part `path` is intact and was built from these inputs (their content)
    and options. When not (or with --append), say why and record the build about to start."""
    import os

    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.core.index_store import MANIFEST, open_index
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
        raise


def _column_vectors(item, name):
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError

    if name not in item.batch.schema.names:
        raise DataError(f"record has no {name!r} field", source=item.source,
                        record=item.first_record, hint="make vectors with `vecpipe embed` first")
    try:
        return names.vectors_to_numpy(item.batch.column(name), name)
    except DataError as err:
        if err.record is not None:
            err.record += item.first_record - 1
        raise err.located(item.source)


def _check_finite(vectors, item) -> None:
    import numpy as np

    from vecpipe.formats.errors import DataError

    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataError("vector holds NaN or infinity", source=item.source,
                        record=item.first_record + int(np.argmin(finite)))


def plan_index(stream, output, metric, dtype, connectivity, expansion_add, expansion_search,
               flat, store, store_all, keep_vectors, append, query_prompt, model,
               force) -> IndexPlan:
    """Validate everything that can be checked before reading vectors; no output yet."""
    from vecpipe.formats import schema as names
    from vecpipe.core.codec import codec_from_meta
    from vecpipe.formats.errors import DataError
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
    kind = _vector_kind(schema.field(names.EMBEDDING).type, meta, codec)
    if append:
        return _append_plan(stream, output, meta, kind, codec, metric, dtype, flat, store,
                            store_all, keep_vectors, query_prompt, force)
    fields = _stored_fields(schema, store, store_all)
    spec, fit_codec = _new_spec(kind, codec, meta, metric, dtype, keep_vectors, schema)
    spec.connectivity, spec.expansion_add, spec.expansion_search = \
        connectivity, expansion_add, expansion_search
    spec.flat = flat
    spec.query_prompt = query_prompt
    return IndexPlan(stream, spec, fields, None, kind, codec, fit_codec=fit_codec,
                     keep_vectors=keep_vectors)


def _model_meta(model, meta, force) -> dict:
    """The model keys for -m; refuses a model other than the one the stream records."""
    from vecpipe.cli.models import load_model
    from vecpipe.formats.schema import check_compatible

    loaded = load_model(model)
    given = {"model": loaded.name}
    if loaded.sha:
        given["model_sha"] = loaded.sha
    check_compatible(meta, given, "the input", f"-m {model}", keys=("model",), force=force)
    return {key: value for key, value in given.items() if key not in meta}


def _vector_kind(arrow_type, meta, codec) -> str:
    import pyarrow as pa

    from vecpipe.formats.errors import DataError

    if pa.types.is_fixed_size_binary(arrow_type):
        return "bits"
    value_type = getattr(arrow_type, "value_type", None)
    if value_type is None:
        raise DataError(f"'embedding' has type {arrow_type}, expected a list of numbers")
    if pa.types.is_floating(value_type):
        return "float"
    if pa.types.is_int8(value_type):
        return "int8"
    if pa.types.is_uint8(value_type):
        if codec is None or codec.to != "uint8":
            raise DataError("uint8 vectors without a uint8 codec in the metadata",
                            hint="index float vectors, or the output of `vecpipe compress`")
        return "uint8"
    if pa.types.is_uint16(value_type) and meta.get("dtype") == "bfloat16" and codec is not None:
        return "bfloat16"
    raise DataError(f"'embedding' holds {value_type} values; expected float, int8 codes or "
                    "packed bits")


_KIND_DTYPE = {"float": "f32", "int8": "i8", "uint8": "i8", "bfloat16": "bf16", "bits": "b1"}


def _new_spec(kind, codec, meta, metric, dtype, keep_vectors, schema):
    """IndexSpec and the codec target to fit (for i8/b1 on float input, else None)."""
    import pyarrow as pa

    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_store import FLOAT_METRICS, IndexSpec

    value_type = getattr(schema.field("embedding").type, "value_type", None)
    default = "f16" if kind == "float" and value_type == pa.float16() else _KIND_DTYPE[kind]
    dtype = dtype or default
    if kind != "float" and dtype != default:
        raise UsageError(f"the input holds {kind} codes, which index as --dtype {default} only",
                         hint="index the float vectors to choose another dtype")
    if keep_vectors and kind != "float":
        raise UsageError("--keep-vectors needs float input vectors; this input holds codes",
                         hint="index the float vectors with --dtype i8|b1 --keep-vectors")
    reduced = codec is not None and (codec.out_dim != codec.input_dim or
                                     codec.pca_components is not None)
    if keep_vectors and reduced:
        # the stream holds only the reduced vectors, which the index holds anyway: kept, they
        # would rescore nothing, and rescoring compares them with full-size queries
        raise UsageError(f"--keep-vectors keeps full vectors for rescoring, but this input "
                         f"was reduced from {codec.input_dim} to {codec.out_dim} dimensions "
                         f"({codec.describe()}): the full vectors are not in it",
                         hint="index the uncompressed vectors with --dtype i8|b1 "
                              "--keep-vectors, or drop --keep-vectors")
    if dtype == "b1":
        score_metric = metric if metric in FLOAT_METRICS else None
        usearch_metric = "hamming"
        if metric not in (None, "hamming", *FLOAT_METRICS):
            raise UsageError(f"unknown metric {metric!r}")
    else:
        if metric == "hamming":
            raise UsageError("--metric hamming needs packed bits (--dtype b1)")
        score_metric = metric or "cos"
        # scalar codes are not centred on zero, so a dot product of codes ranks poorly
        usearch_metric = "cos" if dtype == "i8" and score_metric == "ip" else score_metric
    fit_codec = {"i8": "int8", "b1": "binary"}.get(dtype) if kind == "float" else None
    if fit_codec and codec is not None:
        raise UsageError(f"the input is already compressed ({codec.describe()}); --dtype "
                         f"{dtype} would compress it twice",
                         hint="compress the float vectors in one step")
    arrow_type = schema.field("embedding").type
    if kind == "bits":  # packed bits: dim counts bits
        dim = codec.out_dim if codec is not None else arrow_type.byte_width * 8
    else:               # i8/b1 fitted here keep every dimension (b1: one sign bit each)
        dim = arrow_type.list_size
    spec = IndexSpec(dim=dim, metric=usearch_metric, dtype=dtype, score_metric=score_metric,
                     metadata=meta,
                     full={"dim": arrow_type.list_size, "dtype": "float16"
                           if value_type == pa.float16() else "float32"} if keep_vectors else None)
    return spec, fit_codec


def _stored_fields(schema, store, store_all) -> list:
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError

    id_column = names.find_id_column(schema)
    others = [n for n in schema.names if n not in (names.EMBEDDING, id_column)]
    if store_all:
        if store:
            raise UsageError("give --store or --store-all, not both")
        return [names.ID, *others]
    wanted = [name.strip() for item in store or [] for name in item.split(",") if name.strip()]
    missing = [name for name in wanted if name not in schema.names]
    if missing:
        raise DataError(f"--store {missing[0]}: no such field (fields: {', '.join(others)})")
    if names.EMBEDDING in wanted:
        raise UsageError("the vectors are stored anyway; --store names other fields")
    return [names.ID, *dict.fromkeys(n for n in wanted if n not in (names.ID, id_column))]


def _append_plan(stream, output, meta, kind, codec, metric, dtype, flat, store, store_all,
                 keep_vectors, query_prompt, force) -> IndexPlan:
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.core.index_store import open_index
    from vecpipe.formats.readers import shown_name

    base = open_index(output, verify=True)  # its files are copied into the new index
    if store or store_all or query_prompt is not None:
        raise UsageError("--append keeps the index's stored fields and query prompt; "
                         "--store/--store-all/--query-prompt apply to new indexes")
    for name, given, kept in (("--metric", metric, (base.metric, base.score_metric)),
                              ("--dtype", dtype, (base.dtype,))):
        if given is not None and given not in kept:
            raise UsageError(f"{name} {given} differs from the index's {kept[0]}")
    if flat and not base.flat:
        raise UsageError("the index has an HNSW graph; --flat applies to new indexes")
    if keep_vectors and base.full_spec is None:
        raise UsageError("the index keeps no full vectors; --keep-vectors applies to new "
                         "indexes")
    keep_vectors = base.full_spec is not None
    if keep_vectors and kind != "float":
        raise DataError("the index keeps full vectors, so appended records need float vectors")
    quantize_here = kind == "float" and codec is None and base.codec is not None
    keys = ("model",) if quantize_here else names.IDENTITY_KEYS
    names.check_compatible(base.metadata, meta, output, shown_name(stream.inputs[0]), keys=keys,
                          force=force)
    if kind != "float" and base.dtype != _KIND_DTYPE[kind]:
        raise DataError(f"the input holds {kind} codes, the index is {base.dtype}")
    return IndexPlan(stream, None, base.fields, base, kind, codec,
                     encoder=base.codec if quantize_here else None, keep_vectors=keep_vectors)
