"""Compress vectors to float16/bfloat16/int8/uint8/binary/pq codes, with truncation or PCA."""
from typing import Annotated, Optional

import typer

from vecpipe.cli import options

DEFAULT_CALIBRATION_ROWS = 10_000
REPORT_QUERIES = 200
REPORT_HELD_OUT_QUERIES = 1000
REPORT_K = 10
REPORT_LATENCY_QUERIES = 100
REPORT_LATENCY_REPEATS = 5


def run(inputs: options.Inputs = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        to: options.StorageDtype = None,
        old_to: options.alias(Optional[str], "--to", "--dtype", "to",
                              lambda value: {"to": options.storage_dtype(value)}) = None,
        dim: options.Dim = None,
        pca: Annotated[Optional[int], typer.Option(
            "--pca", min=1, metavar="N", help="Project on the top N principal components fitted on the "
                                 "calibration rows (after --dim), re-normalise.")] = None,
        pca_center: Annotated[bool, typer.Option(
            "--pca-center", help="With --pca: centred PCA (PCA-RAG, scikit-learn's PCA): subtract "
                                 "the calibration mean, saved with the codec, before "
                                 "projecting (the default keeps the mean direction).")] = False,
        bits: Annotated[Optional[int], typer.Option(
            "--bits", min=1, max=8, metavar="K",
            help="binary: K residual bit planes (BEBR), each the signs of what the planes "
                 "before left, with per-dimension scales fitted on the calibration rows "
                 "[default: 1, sign bits].")] = None,
        pq_m: Annotated[Optional[int], typer.Option(
            "--pq-m", min=1, metavar="M",
            help="pq: cut each vector into M sub-vectors (M must divide the dimensions), each "
                 "coded as its nearest of 2^--pq-bits k-means centroids; scored by look-up "
                 "tables (ADC).")] = None,
        pq_bits: Annotated[Optional[int], typer.Option(
            "--pq-bits", min=1, max=8, metavar="B",
            help="pq: bits per sub-vector code, stored one byte each [default: 8].")] = None,
        opq: Annotated[bool, typer.Option(
            "--opq", help="pq: learn a rotation first (optimised PQ, Ge et al. 2013).")] = False,
        budget: Annotated[Optional[int], typer.Option(
            "--budget", min=1, metavar="BYTES",
            help="With --report: instead of compressing, fit every codec whose codes fit "
                 "BYTES per vector (truncation, float16, int8, PCA, binary planes, pq) on the "
                 "calibration rows and print bytes vs recall@10 of held-out rows (every 10th "
                 "calibration row, or --report-queries), Pareto-optimal rows marked.")] = None,
        calibration_rows: Annotated[Optional[int], typer.Option(
            "--calibration-rows", min=1, show_default=False, metavar="N",
            help="Fit the codec on the first N rows, the only rows held in memory "
                 f"[default: {DEFAULT_CALIBRATION_ROWS:,}].")] = None,
        clip_quantile: Annotated[Optional[float], typer.Option(
            "--clip-quantile", min=0.0, max=0.4999, metavar="Q",
            help="int8/uint8: fit each range on the Q and 1-Q quantiles instead of min/max "
                 "(outliers are clipped, never wrapped).")] = None,
        codec_file: options.CodecFile = None,
        save_codec: Annotated[Optional[str], typer.Option(
            "--save-codec", metavar="FILE", help="Also write the codec to FILE (JSON).")] = None,
        report: Annotated[bool, typer.Option(
            "--report", help="Print bytes/vector, reconstruction error, recall@10 retention "
                             "and exact-search ms/query (codes vs float32) on stderr; recall "
                             "uses calibration rows as queries (in-sample, optimistic) unless "
                             "--report-queries.")] = False,
        report_queries: Annotated[Optional[str], typer.Option(
            "--report-queries", metavar="FILE",
            help="Float vectors of the same model and dimensions (e.g. embedded queries) to "
                 f"measure the report's recall@10 with, as held-out queries (at most "
                 f"{REPORT_HELD_OUT_QUERIES:,}, spread through FILE).")] = None,
        report_json: Annotated[Optional[str], typer.Option(
            "--save-report", metavar="PATH",
            help="Write the report as JSON to PATH (- for stdout when -o takes the records).")]
        = None,
        old_report_json: options.alias(Optional[str], "--report-json", "--save-report",
                                       "report_json") = None,
        fde: Annotated[bool, typer.Option(
            "--fde", help="MUVERA: encode each record's token_vectors (embed --multi-vector) "
                          "as one fixed dimensional encoding in `embedding`, whose inner "
                          "product approximates Chamfer (MaxSim) similarity; token_vectors "
                          "pass through for index to keep (search --rescore scores them "
                          "exactly). Recorded as vecpipe.fde; search encodes queries' token "
                          "vectors the same way.")] = False,
        fde_reps: Annotated[int, typer.Option(
            "--fde-reps", min=1, metavar="R", help="--fde: independent repetitions, "
                                                   "concatenated.")] = 20,
        fde_simhash: Annotated[int, typer.Option(
            "--fde-simhash", min=0, max=16, metavar="K",
            help="--fde: SimHash hyperplanes per repetition (2^K buckets).")] = 5,
        fde_proj_dim: Annotated[Optional[int], typer.Option(
            "--fde-proj-dim", min=1, metavar="P",
            help="--fde: project each token to P dimensions first (AMS sketch) "
                 "[default: none, every dimension].", show_default=False)] = None,
        fde_dim: Annotated[Optional[int], typer.Option(
            "--fde-dim", min=1, metavar="D",
            help="--fde: count-sketch the R * 2^K * P values to D [default: none].",
            show_default=False)] = None,
        fde_seed: Annotated[int, typer.Option(
            "--fde-seed", min=0, metavar="S", help="--fde: the seed of every random "
                                                   "matrix.")] = 42,
        fde_side: Annotated[str, typer.Option(
            "--fde-side", metavar="SIDE",
            help="--fde: document (bucket means, empty buckets filled) or query (bucket "
                 "sums); search encodes query token vectors itself.")] = "document",
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Compress the `embedding` column of a record stream: Matryoshka truncation (--dim), PCA
    (--pca) and quantisation (--dtype: float16/bfloat16 casts, int8/uint8 codes, packed sign
    bits), applied in that order. The codec is fitted on the first --calibration-rows rows (the
    only rows buffered; the rest streams through) and recorded in the output's vecpipe.codec
    metadata, so index and search encode queries the same way. JSONL carries no metadata: keep
    the codec with --save-codec and apply it to queries or more data with --codec.

    \b
    Example:
      vecpipe compress vectors.arrow --dtype int8 --save-codec int8.json -o codes.arrow
      vecpipe compress vectors.arrow --dim 256 --dtype binary --report -o bits.arrow
      vecpipe compress queries.arrow --codec int8.json -o query_codes.arrow
      vecpipe compress vectors.arrow --dtype pq --pq-m 48 -o pq.arrow
      vecpipe compress vectors.arrow --budget 96 --report
      vecpipe compress tokens.arrow --fde --fde-reps 20 --fde-simhash 5 -o fde.arrow
    """
    fde_given = {"--fde-reps": fde_reps != 20, "--fde-simhash": fde_simhash != 5,
                 "--fde-proj-dim": fde_proj_dim is not None, "--fde-dim": fde_dim is not None,
                 "--fde-seed": fde_seed != 42, "--fde-side": fde_side != "document"}
    if fde:
        check_fde_options(fde_side, {"--dtype": to, "--dim": dim, "--pca": pca,
                                     "--codec": codec_file, "--save-codec": save_codec,
                                     "--report": report or None, "--budget": budget,
                                     "--calibration-rows": calibration_rows,
                                     "--report-queries": report_queries,
                                     "--save-report": report_json,
                                     "--clip-quantile": clip_quantile, "--bits": bits,
                                     "--pq-m": pq_m, "--pq-bits": pq_bits,
                                     "--opq": opq or None, "--pca-center": pca_center or None})
        return compress_fde(inputs, output, output_format, input_format, force,
                            dict(reps=fde_reps, simhash=fde_simhash, proj_dim=fde_proj_dim,
                                 final_dim=fde_dim, seed=fde_seed), fde_side)
    if any(fde_given.values()):
        from vecpipe.formats.errors import UsageError

        raise UsageError(f"{next(k for k, v in fde_given.items() if v)} configures --fde")
    from itertools import chain

    from vecpipe.cli import console
    from vecpipe.core.codec import Codec, first_vectors
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.writers import RecordWriter

    code_options = {"bits": bits, "pq_m": pq_m, "pq_bits": pq_bits, "opq": opq or None}
    if budget is not None:
        check_budget_options(report, output, save_codec, codec_file, report_json,
                             {"--dtype": to, "--dim": dim, "--pca": pca, **code_options})
    else:
        check_options(to, dim, pca, calibration_rows, clip_quantile, codec_file, output,
                      report_json, bool(report or report_json), pca_center)
        check_code_options(to, code_options)
    check_report_queries(report_queries, bool(report or report_json), inputs)
    codec = Codec.load(codec_file) if codec_file else None
    stream = RecordStream(inputs, input_format, check=input_check(force, documents=True))
    if stream.schema is None:
        console.info("no records")
        return
    meta = stream.metadata
    check_input(stream.schema, meta, codec, codec_file, force)
    held_out = read_report_queries(report_queries, meta, force) if report_queries else None

    rows = calibration_rows or DEFAULT_CALIBRATION_ROWS
    if budget is not None:
        sample = first_vectors(iter(stream), rows, float_vectors)[1]
        return budget_report(sample, budget, held_out, meta, output_format)
    wants_sample = codec is None or report or report_json
    rest = iter(stream)
    buffered, sample = first_vectors(rest, rows if wants_sample else 1, float_vectors)
    if buffered and not force:
        refuse_codes(float_vectors(buffered[0]), buffered[0])
    if codec is None:
        codec = Codec.fit(sample, to or "float32", dim=dim, pca=pca, clip_quantile=clip_quantile,
                          normalize=meta.get("normalized") != "false", model=meta.get("model"),
                          center=pca_center, bits=bits or 1, pq_m=pq_m, pq_bits=pq_bits or 8,
                          opq=opq)

    check_held_out(held_out, codec)
    stats = CompressionStats(codec) if report or report_json else None
    out_schema = compressed_schema(stream.schema, codec)
    with RecordWriter(output, output_format, schema=out_schema, widen=True) as out:
        for item in chain(buffered, rest):
            vectors = float_vectors(item)
            codes = encode_located(codec, vectors, item)
            if stats is not None:
                stats.add(vectors, codes)
            out.write(replace_embedding(item.batch, codec.to_arrow(codes)), item.source,
                      item.first_record)
    if save_codec:
        write_codec(codec, save_codec)
    console.info(f"{out.rows} vectors -> {codec.describe()} -> {output or 'stdout'} "
                 f"({out.format})")
    if report or report_json:
        facts = build_report(codec, stats, sample, input_bytes(stream.schema, codec), held_out)
        if report:
            print_report(facts)
        if report_json:
            write_report_json(facts, report_json)


# ----- options and input checks ------------------------------------------------------------
def check_options(to, dim, pca, calibration_rows, clip_quantile, codec_file, output,
                  report_json, report, pca_center=False) -> None:
    from vecpipe.core.codec import TARGETS
    from vecpipe.formats.errors import UsageError

    if to is not None and to not in TARGETS:
        raise UsageError(f"unknown --dtype {to!r}; choose from {', '.join(TARGETS)}")
    fitting = {"--dtype": to, "--dim": dim, "--pca": pca, "--clip-quantile": clip_quantile,
               "--pca-center": pca_center or None}
    given = [name for name, value in fitting.items() if value is not None]
    if codec_file and given:
        raise UsageError(f"--codec fixes the whole transform; drop {', '.join(given)}")
    if codec_file and calibration_rows is not None and not report:
        raise UsageError("with --codec, --calibration-rows only sizes the --report sample")
    if pca_center and pca is None and not codec_file:
        raise UsageError("--pca-center centres the PCA: give --pca N too")
    if not codec_file and to is None and dim is None and pca is None:
        raise UsageError("nothing to do: give --dtype, --dim, --pca or --codec FILE")
    if to == "float32" and dim is None and pca is None:
        raise UsageError("--dtype float32 without --dim or --pca changes nothing")
    if report_json == "-" and output in (None, "-"):
        raise UsageError("--save-report - needs -o for the records (stdout carries data)")


def check_fde_options(side: str, others: dict) -> None:
    from vecpipe.core.fde import SIDES
    from vecpipe.formats.errors import UsageError

    if side not in SIDES:
        raise UsageError(f"--fde-side {side!r}: use {'|'.join(SIDES)}")
    given = [name for name, value in others.items() if value is not None]
    if given:
        raise UsageError(f"--fde encodes token vectors; it takes none of {', '.join(given)}")


def compress_fde(inputs, output, output_format, input_format, force, settings: dict,
                 side: str) -> None:
    """--fde: every record's token_vectors -> one FDE in `embedding` (float32)."""
    import pyarrow as pa

    from vecpipe.cli import console
    from vecpipe.core.fde import Fde, FdeConfig
    from vecpipe.core.multivector import META_KEY, TOKEN_VECTORS, read_tokens
    from vecpipe.core.space import input_check
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.writers import RecordWriter

    stream = RecordStream(inputs, input_format, check=input_check(force, documents=True))
    if stream.schema is None:
        console.info("no records")
        return
    source, meta = stream.inputs[0], stream.metadata
    if TOKEN_VECTORS not in stream.schema.names:
        raise DataError(f"records have no {TOKEN_VECTORS!r} column to encode (fields: "
                        f"{', '.join(stream.schema.names)})", source=source,
                        hint="embed them with --multi-vector")
    if meta.get("fde"):
        raise DataError("input holds FDEs already", source=source,
                        hint="encode the token vectors of `embed --multi-vector` output")
    token_dim = _token_dim(stream.schema, meta)
    rest = iter(stream)
    first = next(rest, None)
    if token_dim is None and first is not None:  # JSONL: the first token's width
        tokens, _ = read_tokens(first)
        token_dim = tokens.shape[1] if len(tokens) else None
    if token_dim is None:
        raise DataError("cannot tell the token vectors' dimensions (no tokens in the first "
                        "records)", source=source)
    config = FdeConfig(token_dim=token_dim, **settings)
    encoder = Fde(config)
    schema = stream.schema
    field = pa.field(names.EMBEDDING, pa.list_(pa.float32(), config.out_dim))
    schema = schema.set(schema.get_field_index(names.EMBEDDING), field) \
        if names.EMBEDDING in schema.names else schema.append(field)
    schema = names.with_meta(schema, {"fde": config.to_json(), "fde_side": side,
                                      "dim": config.out_dim, "normalized": "false",
                                      "dtype": "float32", "codec": None,
                                      META_KEY: meta.get(META_KEY)})
    with RecordWriter(output, output_format, schema=schema, widen=True) as out:
        for item in _chained(first, rest):
            tokens, offsets = read_tokens(item, token_dim)
            vectors = names.numpy_to_vectors(encoder.encode(tokens, offsets, side))
            batch = item.batch
            if names.EMBEDDING in batch.schema.names:
                batch = replace_embedding(batch, vectors)
            else:
                batch = pa.RecordBatch.from_arrays([*batch.columns, vectors],
                                                   names=[*batch.schema.names, names.EMBEDDING])
            out.write(batch, item.source, item.first_record)
    console.info(f"{out.rows} token sets -> {config.describe()}, {side} side -> "
                 f"{output or 'stdout'} ({out.format})")


def _chained(first, rest):
    if first is not None:
        yield first
    yield from rest


def _token_dim(schema, meta) -> int | None:
    """The token vectors' width: from the Arrow type, else vecpipe.multi_vector."""
    import json

    from vecpipe.core.multivector import META_KEY, TOKEN_VECTORS

    inner = getattr(schema.field(TOKEN_VECTORS).type, "value_type", None)
    size = getattr(inner, "list_size", None)
    if size:
        return int(size)
    try:
        return int(json.loads(meta.get(META_KEY) or "{}").get("dim"))
    except (TypeError, ValueError, AttributeError):
        return None


def check_code_options(to, code_options: dict) -> None:
    """--bits for binary targets, --pq-* and --opq for pq (with --pq-m)."""
    from vecpipe.core.codec import BIT_TARGETS
    from vecpipe.formats.errors import UsageError

    if code_options["bits"] is not None and to not in BIT_TARGETS:
        raise UsageError("--bits sets the bit planes of --dtype binary|ubinary")
    pq_given = [f"--{name.replace('_', '-')}" for name in ("pq_m", "pq_bits", "opq")
                if code_options[name] is not None]
    if pq_given and to != "pq":
        raise UsageError(f"{', '.join(pq_given)} configure --dtype pq")
    if to == "pq" and code_options["pq_m"] is None:
        raise UsageError("--dtype pq needs --pq-m M, the number of sub-vectors (e.g. 48 for "
                         "384 dimensions: 48 bytes per vector)")


def check_budget_options(report, output, save_codec, codec_file, report_json, fitting) -> None:
    from vecpipe.formats.errors import UsageError

    if not report:
        raise UsageError("--budget sweeps the codecs for a report: give --report too")
    given = [name for name, value in fitting.items() if value is not None]
    given += [name for name, value in (("-o", output), ("--save-codec", save_codec),
                                       ("--codec", codec_file), ("--save-report", report_json))
              if value]
    if given:
        raise UsageError(f"--budget --report writes only the sweep's table; drop "
                         f"{', '.join(given)}", hint="compress with the chosen row's options")


def check_report_queries(path, report: bool, inputs) -> None:
    from vecpipe.formats.errors import UsageError

    if path is None:
        return
    if not report:
        raise UsageError("--report-queries needs --report or --save-report")
    if path == "-" and (not inputs or "-" in inputs):
        raise UsageError("the vectors and --report-queries cannot both come from stdin")


def read_report_queries(path: str, meta, force: bool):
    """(name, float32 query vectors) from FILE, in the input's vector space (model and
    dimensions checked): at most REPORT_HELD_OUT_QUERIES, spread through the file."""
    import numpy as np

    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError
    from vecpipe.core.space import check_same_space
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([path])
    name = stream.inputs[0] if path != "-" else "<stdin>"
    if stream.schema is None or names.EMBEDDING not in stream.schema.names:
        raise DataError("--report-queries: no 'embedding' field", source=name,
                        hint="give float query vectors, e.g. from `vecpipe embed`")
    query_meta = stream.metadata
    if query_meta.get("codec"):
        raise DataError("--report-queries: the vectors are compressed already", source=name,
                        hint="give the float vectors the codec is applied to")
    check_same_space(meta, query_meta, "the input", name, keys=("model", "dim"), force=force)
    vectors = np.concatenate([float_vectors(item) for item in stream])
    if len(vectors) > REPORT_HELD_OUT_QUERIES:
        vectors = vectors[np.linspace(0, len(vectors) - 1, REPORT_HELD_OUT_QUERIES).astype(int)]
    return name, vectors


def check_held_out(held_out, codec) -> None:
    """Before any output: held-out queries have the input's dimensions (JSONL has no dim)."""
    from vecpipe.formats.errors import DataError

    if held_out is not None and held_out[1].shape[1] != codec.input_dim:
        raise DataError(f"--report-queries: vectors have {held_out[1].shape[1]} dimensions, "
                        f"the input {codec.input_dim}", source=held_out[0])


def check_input(schema, meta, codec, codec_file, force) -> None:
    """Refuse what cannot be compressed: no float `embedding`, codes already, another model."""
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.core.codec import codec_from_meta
    from vecpipe.formats.errors import DataError

    if names.EMBEDDING not in schema.names:
        raise DataError(f"no field {names.EMBEDDING!r}; fields are {', '.join(schema.names)}",
                        hint="compress reads vectors written by `vecpipe embed`")
    existing = codec_from_meta(meta)
    if existing is not None:
        raise DataError(f"input is already compressed ({existing.describe()})",
                        hint="compress the float32 vectors, with every step in one call")
    kind = schema.field(names.EMBEDDING).type
    value_type = getattr(kind, "value_type", None)
    if value_type is None or not pa.types.is_floating(value_type):
        raise DataError(f"field 'embedding' is {kind}; compress needs float vectors",
                        hint="codes without vecpipe.codec metadata (JSONL?) cannot be "
                             "compressed again; compress the float32 vectors")
    if codec is not None and not force:
        model = meta.get("model")
        if codec.model and model and codec.model != model:
            raise DataError(f"model differs: the codec in {codec_file} was fitted on "
                            f"{codec.model!r}, the input has {model!r}",
                            hint="vectors of different models are not comparable; pass --force "
                                 "if you know better")


# ----- streaming -----------------------------------------------------------------------------
def float_vectors(item):
    """The batch's embeddings as finite float32 (errors name the file and record)."""
    import numpy as np

    from vecpipe.formats import schema as names

    vectors = names.checked_vectors(item, names.EMBEDDING, "embedding")
    return vectors.astype(np.float32, copy=False)


def refuse_codes(vectors, item) -> None:
    """Codes written as JSONL come back as float numbers with no codec; re-compressing them is
    never meant. Whole numbers beyond +-1 in every value of a batch give them away."""
    import numpy as np

    from vecpipe.formats.errors import DataError

    if len(vectors) and np.abs(vectors).max() > 1 and np.array_equal(vectors, np.rint(vectors)):
        raise DataError("the vectors hold only whole numbers: codes from an earlier compress?",
                        source=item.source, record=item.first_record,
                        hint="JSONL carries no vecpipe.codec metadata; give the codec to whoever "
                             "reads JSONL codes (compress/index/search --codec FILE), compress "
                             "the float32 vectors, or pass --force")


def encode_located(codec, vectors, item):
    from vecpipe.formats.errors import DataError

    try:
        return codec.encode(vectors)
    except DataError as err:
        raise err.located(item.source, item.first_record)


def compressed_schema(schema, codec):
    """The input schema with the `embedding` field holding codes and the metadata updated."""
    import pyarrow as pa

    from vecpipe.formats import schema as names

    index = schema.get_field_index(names.EMBEDDING)
    schema = schema.set(index, pa.field(names.EMBEDDING, codec.arrow_type()))
    return names.with_meta(schema, codec.metadata())


def replace_embedding(batch, codes):
    """The batch with its `embedding` column replaced by `codes` (the writer aligns the rest)."""
    import pyarrow as pa

    from vecpipe.formats import schema as names

    columns = list(batch.columns)
    columns[batch.schema.get_field_index(names.EMBEDDING)] = codes
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def write_codec(codec, path: str) -> None:
    from vecpipe.formats.writers import AtomicFile

    target = AtomicFile(path)
    try:
        target.file.write(codec.to_json().encode() + b"\n")
    except BaseException:
        target.abort()
        raise
    target.commit()


def input_bytes(schema, codec) -> int:
    """Bytes per input vector: dimensions x the width of the input's float type."""
    from vecpipe.formats import schema as names

    return codec.input_dim * schema.field(names.EMBEDDING).type.value_type.bit_width // 8


# ----- the report ----------------------------------------------------------------------------
class CompressionStats:
    """Running reconstruction error over the whole stream (constant memory)."""

    def __init__(self, codec):
        self.codec = codec
        self.rows = 0
        self.error_sq = 0.0
        self.norm_sq = 0.0
        self.cosine_sum = 0.0
        self.kept_sum = 0.0

    def add(self, vectors, codes) -> None:
        import numpy as np

        if not len(vectors):
            return
        reduced = self.codec.project(vectors)
        decoded = self.codec.decode(codes)
        self.rows += len(vectors)
        self.error_sq += float(((reduced - decoded) ** 2).sum(dtype=np.float64))
        self.norm_sq += float((reduced ** 2).sum(dtype=np.float64))
        self.cosine_sum += float(cosines(reduced, decoded).sum(dtype=np.float64))
        self.kept_sum += float(kept_energy(self.codec, vectors).sum(dtype=np.float64))


def cosines(a, b):
    import numpy as np

    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.where(norms > 0, norms, 1)


def kept_energy(codec, vectors):
    """Per row, the share of the squared norm that truncation and PCA keep (1 without them)."""
    import numpy as np

    share = np.ones(len(vectors))
    if codec.dim is not None:
        head = (vectors[:, :codec.dim] ** 2).sum(axis=1)
        share *= head / np.maximum((vectors ** 2).sum(axis=1), 1e-30)
    if codec.pca_components is not None:  # centred PCA: of the centred vector's norm
        before = codec.pca_input(vectors)
        kept = ((before @ codec.pca_components) ** 2).sum(axis=1)
        share *= kept / np.maximum((before ** 2).sum(axis=1), 1e-30)
    return share


def recall_retention(codec, sample, held_out=None, queries: int = REPORT_QUERIES,
                     k: int = REPORT_K):
    """recall@k of compressed search against exact float search over the sample. The queries
    are `held_out` (name, vectors) or, in-sample, rows spread through the sample (each left
    out of its own results): these flatter a codec fitted on the same rows."""
    if sample is None or len(sample) < k + 2:
        return None
    source, query_vectors, picks = report_query_vectors(sample, held_out, queries)
    if len(query_vectors) == 0:
        return None
    codes = codec.encode(sample)
    exact = query_vectors @ sample.T
    asymmetric = codec.score(query_vectors, codes)
    symmetric = symmetric_scores(codec, codec.encode(query_vectors), codes)
    result = {"queries": len(query_vectors), "corpus": len(sample), "k": k,
              "queries_from": source, "in_sample": held_out is None,
              "recall": overlap_at_k(exact, asymmetric, picks, k)}
    if symmetric is not None:
        result["recall_symmetric"] = overlap_at_k(exact, symmetric, picks, k)
    return result


def report_query_vectors(sample, held_out=None, queries: int = REPORT_QUERIES):
    """(where they come from, the report's query vectors, the sample rows they are or None):
    `held_out` (name, vectors), else `queries` rows spread through the sample."""
    import numpy as np

    if held_out is not None:
        return held_out[0], held_out[1], None
    picks = np.unique(np.linspace(0, len(sample) - 1, min(queries, len(sample))).astype(int))
    return "calibration rows", sample[picks], picks


def query_latency(codec, sample, held_out=None, k: int = REPORT_K,
                  queries: int = REPORT_LATENCY_QUERIES, repeats: int = REPORT_LATENCY_REPEATS):
    """Milliseconds per query of exact top-k search, one query at a time (numpy, this
    machine): float32 queries over the float32 sample, and the same queries through the codec
    over the sample's codes (taken as float32 numbers in code coordinates once, as
    `Codec.score` does, without its per-query offset, which changes no ranking). The median
    per-query time of `repeats` alternating runs of each."""
    import numpy as np

    if sample is None or len(sample) < k + 2:
        return None
    query_vectors = report_query_vectors(sample, held_out)[1][:queries]
    if len(query_vectors) == 0:
        return None
    codes = codec.encode(sample)
    matrix = None if codec.to == "pq" else codec.code_matrix(codes)
    searches = {"float32": lambda q: q @ sample.T,
                "codes": (lambda q: codec.score(q, codes)) if matrix is None
                else lambda q: codec.transform(q) @ matrix.T}
    times = {name: [] for name in searches}
    for _ in range(repeats):
        for name, scores in searches.items():
            times[name].append(_time_per_query(scores, query_vectors, k))
    float_ms, codes_ms = (float(np.median(times[name])) * 1000 for name in ("float32", "codes"))
    return {"queries": len(query_vectors), "corpus": len(sample), "k": k, "repeats": repeats,
            "float32_ms": round(float_ms, 4), "codes_ms": round(codes_ms, 4),
            "speedup": round(float_ms / codes_ms, 2) if codes_ms > 0 else None}


def _time_per_query(scores, query_vectors, k: int) -> float:
    """Seconds per query of `top_k(scores(q), k)`, the queries one at a time."""
    import time

    from vecpipe.core.vectors import top_k

    start = time.perf_counter()
    for row in range(len(query_vectors)):
        top_k(scores(query_vectors[row:row + 1]), k)
    return (time.perf_counter() - start) / len(query_vectors)


def symmetric_scores(codec, query_codes, codes):
    """Codes against codes (what an index without rescoring does), or None for float types."""
    import numpy as np

    from vecpipe.core.codec import hamming_distances

    if codec.is_bits:
        return -hamming_distances(query_codes, codes).astype(np.float32)
    if codec.to in ("int8", "uint8"):
        return codec.code_matrix(query_codes) @ codec.code_matrix(codes).T
    return None


def overlap_at_k(exact, approx, picks, k: int) -> float:
    """Mean share of the exact top k found in the approximate top k; `picks`: the sample rows
    that are the queries (in-sample), left out of their own results, or None."""
    import numpy as np

    from vecpipe.core.vectors import top_k

    exact, approx = exact.copy(), approx.astype(np.float32, copy=True)
    if picks is not None:
        rows = np.arange(len(picks))
        exact[rows, picks] = -np.inf  # a query finds itself trivially: leave it out
        approx[rows, picks] = -np.inf
    truth, found = top_k(exact, k).rows, top_k(approx, k).rows
    hits = [len(np.intersect1d(t, f)) for t, f in zip(truth, found)]
    return round(float(np.mean(hits)) / k, 4)


def build_report(codec, stats, sample, before_bytes: int, held_out=None) -> dict:
    rows = max(stats.rows, 1)
    facts = {
        "vectors": stats.rows,
        "codec": codec.describe(),
        "bytes_per_vector": {"before": before_bytes, "after": codec.bytes_per_vector,
                             "ratio": round(before_bytes / codec.bytes_per_vector, 2)},
        "kept_energy": round(stats.kept_sum / rows, 4)
        if codec.dim is not None or codec.pca_components is not None else None,
        "quantization": {
            "relative_error": round((stats.error_sq / max(stats.norm_sq, 1e-30)) ** 0.5, 5),
            "mean_cosine": round(stats.cosine_sum / rows, 5)},
        "retrieval": recall_retention(codec, sample, held_out),
        "query_latency": query_latency(codec, sample, held_out),
    }
    if codec.pca_explained is not None:
        facts["pca_kept_energy_calibration"] = codec.pca_explained
    return facts


def print_report(facts: dict) -> None:
    import sys

    sizes = facts["bytes_per_vector"]
    lines = [f"report: {facts['vectors']} vectors, {facts['codec']}",
             f"  bytes/vector   {sizes['before']} -> {sizes['after']} "
             f"({sizes['ratio']}x smaller)"]
    if facts["kept_energy"] is not None:
        centred = ", centred on the calibration mean" if " centred " in facts["codec"] else ""
        lines.append(f"  kept energy    {facts['kept_energy']} of the squared norm "
                     f"(truncation/PCA{centred})")
    quant = facts["quantization"]
    lines.append(f"  quantization   relative error {quant['relative_error']}, "
                 f"mean cosine {quant['mean_cosine']}")
    retrieval = facts["retrieval"]
    if retrieval is None:
        lines.append("  recall@10      n/a (too few rows to measure)")
    else:
        line = f"  recall@{retrieval['k']}      {retrieval['recall']} float queries vs codes"
        if "recall_symmetric" in retrieval:
            line += f", {retrieval['recall_symmetric']} codes vs codes"
        queries = f"{retrieval['queries']} held-out queries from {retrieval['queries_from']}" \
            if not retrieval["in_sample"] else \
            f"in-sample: calibration rows as queries, {retrieval['queries']} of them"
        lines.append(line + f" ({queries}, over the first {retrieval['corpus']} vectors)")
    latency = facts.get("query_latency")
    if latency is not None:
        lines.append(f"  latency        {latency['codes_ms']} ms/query over the codes vs "
                     f"{latency['float32_ms']} float32 ({latency['speedup']}x; exact top-"
                     f"{latency['k']}, {latency['queries']} queries one at a time over "
                     f"{latency['corpus']} vectors, median of {latency['repeats']})")
    print("\n".join(lines), file=sys.stderr, flush=True)


def write_report_json(facts: dict, path: str) -> None:
    import json

    from vecpipe.formats.writers import text_output

    with text_output(path) as sink:
        sink.write(json.dumps(facts) + "\n")


# ----- the budget sweep ----------------------------------------------------------------------
def budget_report(sample, budget: int, held_out, meta, output_format: str) -> None:
    """Sweep the codecs that fit `budget` (core.codec_budget) and print the table (terminal)
    or JSON lines (pipe), on stdout: the sweep is this run's data."""
    from vecpipe.cli import console
    from vecpipe.core.codec_budget import split_held_out, sweep
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    corpus, queries = (sample, held_out[1]) if held_out else split_held_out(sample)
    if len(queries) == 0 or len(corpus) < 256 + REPORT_K:
        raise DataError(f"the budget sweep needs more calibration rows than {len(sample)}",
                        hint="give at least ~3,000 rows (--calibration-rows)")
    rows = sweep(corpus, queries, budget, REPORT_K,
                 progress=lambda fit: console.info(f"fitting {fit_flags(fit)}"),
                 normalize=meta.get("normalized") != "false", model=meta.get("model"))
    if not rows:
        raise DataError(f"no codec fits {budget} bytes per vector",
                        hint="binary takes dim/8 bytes, pq at least dim/32")
    for row in rows:
        row["options"] = fit_flags(row.pop("fit"))
        row.update(queries=len(queries), corpus=len(corpus))
    if report_format == "table":
        print_budget_table(rows, budget)
    else:
        print_report_records(rows, report_format)


def fit_flags(fit: dict) -> str:
    """`Codec.fit` keywords as compress options, e.g. `--dtype int8 --pca 128`."""
    flags = {"to": "--dtype", "dim": "--dim", "pca": "--pca", "bits": "--bits",
             "pq_m": "--pq-m"}
    return " ".join(f"{flags[key]} {value}" for key, value in fit.items()
                    if value is not None and (key, value) != ("bits", 1))


def print_budget_table(rows: list[dict], budget: int) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"codecs within {budget} B/vector: recall@{REPORT_K} of "
                        f"{first['queries']} held-out queries over {first['corpus']} "
                        "vectors (* Pareto-optimal)", title_justify="left")
    for column in ("", "bytes", f"recall@{REPORT_K}", "codec", "options"):
        table.add_column(column, justify="right" if column in ("bytes", f"recall@{REPORT_K}")
                         else "left")
    for row in rows:
        table.add_row("*" if row["pareto"] else "", str(row["bytes"]),
                      f"{row[f'recall@{REPORT_K}']:.4f}", row["codec"], row["options"])
    Console().print(table)
