"""Merge shards and streams (checking metadata, schemas, duplicates and shard sets), or models."""
import contextlib
import os
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Record files (any mix of formats) or - for stdin (the default); with "
                 "--index, index folders; with --models, model folders (`default` = the "
                 "bundled model).",
            show_default=False, metavar="INPUT")] = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        on_duplicate: options.OnDuplicate = None,
        old_dedupe: options.alias(Optional[str], "--dedupe", "--on-duplicate", "on_duplicate",
                              lambda value: {"on_duplicate": options.old_dedupe(value)}) = None,
        dedupe_near: Annotated[Optional[float], typer.Option(
            "--dedupe-near", help="Drop a record whose embedding's cosine to an earlier kept "
                                  "record's is >= THRESHOLD (exact; holds the kept vectors).",
            metavar="THRESHOLD", show_default=False)] = None,
        against: Annotated[Optional[str], typer.Option(
            "--against", help="With --dedupe-near: also drop records within THRESHOLD of any "
                              "vector of this embedded evaluation corpus or query set "
                              "(train/test contamination; counted on stderr).",
            metavar="EVAL", show_default=False)] = None,
        sort_by: Annotated[Optional[str], typer.Option(
            "--sort-by", help="Sort the merged records by this field (e.g. id). Global: holds "
                              "all records in memory.", metavar="FIELD")] = None,
        expect_shards: Annotated[Optional[int], typer.Option(
            "--expect-shards", help="Fail unless the inputs are exactly N shards (files named "
                                    "part-0000I-of-0000N are checked for gaps and repeats "
                                    "even without this).", metavar="N")] = None,
        index: Annotated[bool, typer.Option(
            "--index", help="The INPUTs are index folders: rebuild one index from them into "
                            "-o (ids must be disjoint, or follow --on-duplicate).")] = False,
        link: Annotated[bool, typer.Option(
            "--link", help="With --index: don't rebuild; write a folder of linked shards "
                           "(files hard-linked) that `search` queries as one index.")] = False,
        models: Annotated[bool, typer.Option(
            "--models", help="Merge the weights of the INPUT models (identical architecture) "
                             "into the folder -o.")] = False,
        weights: Annotated[Optional[str], typer.Option(
            "--weights", help="With --models: one weight per model, e.g. 0.7,0.3 (default "
                              "equal).", metavar="W,W")] = None,
        method: Annotated[str, typer.Option(
            "--method", help="With --models: linear (any number of models) or slerp "
                             "(two models, per tensor); with --base also ties or dare (on "
                             "the task vectors).")] = "linear",
        base: Annotated[Optional[str], typer.Option(
            "--base", help="With --models: merge the task vectors INPUT - BASE (task "
                           "arithmetic: BASE + the weighted sum; `default` = the bundled "
                           "model); needed by --method ties|dare and --search-weights.",
            metavar="MODEL", show_default=False)] = None,
        density: Annotated[Optional[float], typer.Option(
            "--density", help="With --method ties|dare: the fraction of each task vector "
                              "kept (ties: the largest magnitudes, default 0.2; dare: at "
                              "random, rescaled by 1/density, default 0.1).", metavar="D",
            show_default=False)] = None,
        seed: options.Seed = None,
        search_weights: Annotated[bool, typer.Option(
            "--search-weights", help="With --base: try every weight vector of the --weight-grid on "
                                     "the --probe set and keep the best soup (Self "
                                     "Positioning, grid form).")] = False,
        probe: Annotated[Optional[str], typer.Option(
            "--probe", help="With --search-weights: a small BEIR folder (a few hundred "
                            "documents: each grid point embeds it all) scored on its dev "
                            "split (else its only split, else test).", metavar="DIR",
            show_default=False)] = None,
        probe_metric: Annotated[Optional[str], typer.Option(
            "--probe-metric", help="The metric --search-weights maximises (default ndcg@10).",
            metavar="METRIC", show_default=False)] = None,
        grid: Annotated[Optional[str], typer.Option(
            "--weight-grid", help="With --search-weights: the values each model's weight takes "
                           "(every combination is tried; default 0,0.25,0.5,0.75,1).",
            metavar="W,W,...", show_default=False)] = None,
        sgd_steps: Annotated[Optional[int], typer.Option(
            "--sgd-steps", min=1, help="With --search-weights: then move the best grid "
                                       "point by N Adam steps on the probe's contrastive "
                                       "loss (the paper's SGD; kept only if it scores "
                                       "better on the probe).", metavar="N",
            show_default=False)] = None,
        fuse: options.Fuse = None,
        fuse_norm: options.FuseNorm = None,
        rrf_k: options.RrfK = None,
        fuse_weights: options.FuseWeights = None,
        fuse_depth: Annotated[Optional[int], typer.Option(
            "--fuse-depth", min=1, help="With --fuse: keep each query's best N documents "
                                        "(default: every document of any run).", metavar="N",
            show_default=False)] = None,
        fit_qrels: Annotated[Optional[str], typer.Option(
            "--fit-qrels", help="With --fuse wsum: fit the weights on these judgments (training "
                                "qrels; grid search as ranx's optimize_fusion) before fusing.",
            metavar="QRELS", show_default=False)] = None,
        fit_metric: Annotated[Optional[str], typer.Option(
            "--fit-metric", help="The metric --fit-qrels maximises (default ndcg@10).",
            metavar="METRIC", show_default=False)] = None,
        fit_step: Annotated[Optional[float], typer.Option(
            "--fit-step", help="Grid step of the fitted weights, which sum to 1 (default "
                               "0.1).", metavar="STEP", show_default=False)] = None,
        save_fit: Annotated[Optional[str], typer.Option(
            "--save-fit", help="Write the fitted weights to this JSON file, for "
                               "--fuse-weights FILE here or in `search --hybrid`.",
            metavar="FILE", show_default=False)] = None,
        force: options.Force = False,
        quiet: options.Quiet = False):
    """Concatenate record streams into one, in bounded memory: schemas are unified (a field
    missing from an input becomes null; a field with conflicting types is an error), and inputs
    whose vecpipe metadata (model, dim, normalized, codec, the text fields embedded) differ
    are refused unless --force. The output carries the metadata all inputs share. Inputs named
    part-0000I-of-0000N must form complete shard sets. With --index, merge index folders (same
    checks); with --models, average the weights of sentence-transformers models (model soups)
    into a model folder, or with --base merge their task vectors (task arithmetic, TIES, DARE),
    the weights searched on a probe set with --search-weights. With --fuse, the INPUTs are
    runs (search output or TREC run files) of the same queries, fused into one run (query_id,
    rank, id, score; or --output-format trec); the fusion, and weights fitted with
    --fit-qrels, travel in its metadata (Arrow, Parquet).
    --on-duplicate (default: keep every record; with --index, error, as an index holds one row
    per id) holds every id in memory, not the records; last and error read the inputs twice
    (stdin is spooled to a temporary file); with --index the first or last index's copy wins.
    --force merges inputs whose model/dim/normalized/codec/embedded-text metadata differ (the
    output keeps only the metadata they share). --dedupe-near T drops a record whose embedding's
    cosine to an earlier kept record's is >= T (greedy, in input order, after --on-duplicate;
    exact: the kept vectors are held in memory, and time grows as records x kept); --against
    EVAL first drops, and counts, records within T of any EVAL vector (same vector space).

    \b
    Example:
      vecpipe merge shards/part-*.arrow --expect-shards 16 --sort-by id -o corpus.arrow
      vecpipe merge old.parquet new.jsonl --on-duplicate last -o corpus.parquet
      vecpipe merge train.arrow --dedupe-near 0.95 --against test-queries.arrow -o clean.arrow
      vecpipe merge --index idx-a idx-b --on-duplicate last -o idx
      vecpipe merge --index --link idx-2024 idx-2025 -o idx-all   # search idx-all ...
      vecpipe merge --models default tuned/ --weights 0.5,0.5 -o soup/
      vecpipe merge --models tuned-a/ tuned-b/ --base default --search-weights \\
          --probe probe/ -o soup/
      vecpipe merge --fuse rrf bm25.trec dense.jsonl --output-format trec -o hybrid.trec
      vecpipe merge --fuse wsum bm25.trec dense.trec --fit-qrels train.tsv --save-fit w.json
    """
    from vecpipe.formats.errors import UsageError

    soup_options = dict(base=base, density=density, seed=seed,
                        search_weights=search_weights or None, probe=probe,
                        probe_metric=probe_metric, grid=grid, sgd_steps=sgd_steps)
    given = [name for name, value in soup_options.items() if value is not None]
    if given and not models:
        raise UsageError(f"--{given[0].replace('_', '-')} applies only with --models")
    fuse_options = dict(fuse_norm=fuse_norm, rrf_k=rrf_k, fuse_weights=fuse_weights,
                        fuse_depth=fuse_depth, fit_qrels=fit_qrels, fit_metric=fit_metric,
                        fit_step=fit_step, save_fit=save_fit)
    near = near_options(dedupe_near, against, fuse or index or models)
    if fuse is not None:
        if index or models or on_duplicate or sort_by or expect_shards is not None \
                or weights is not None:
            raise UsageError("--fuse merges runs: --index, --models, --on-duplicate, "
                             "--sort-by, --expect-shards and --weights do not apply")
        fuse_runs(inputs or ["-"], output, output_format, fuse, **fuse_options)
        return
    given = [name for name, value in fuse_options.items() if value is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} needs --fuse METHOD")

    if index and models:
        raise UsageError("give --index or --models, not both")
    if link and not index:
        raise UsageError("--link applies to --index")
    if index:
        if sort_by or expect_shards is not None or weights is not None or method != "linear":
            raise UsageError("--sort-by, --expect-shards, --weights and --method do not apply "
                             "to --index")
        merge_indexes(inputs or [], output, on_duplicate, link, force)
        return
    if models:
        if on_duplicate is not None or sort_by or expect_shards is not None:
            raise UsageError("--on-duplicate, --sort-by and --expect-shards apply to record "
                             "streams, not --models")
        merge_models(inputs or [], output, weights, method, **soup_options)
        return
    if weights is not None or method != "linear":
        raise UsageError("--weights and --method apply only with --models")
    merge_streams(inputs or ["-"], output, output_format, input_format, on_duplicate or "keep",
                  sort_by, expect_shards, force, near)


# ---- fusing runs ----------------------------------------------------------------------------

def fuse_runs(paths, output, output_format, method, fuse_norm, rrf_k, fuse_weights,
              fuse_depth, fit_qrels, fit_metric, fit_step, save_fit) -> None:
    """--fuse: the runs read whole (a run is queries x hits ids and scores), fused per query."""
    from vecpipe.cli import console
    from vecpipe.core import fusion as fusing
    from vecpipe.formats.errors import UsageError
    from vecpipe.formats.readers import check_one_stdin, shown_name
    from vecpipe.formats.trec import read_run

    check_one_stdin([*paths, *([fit_qrels] if fit_qrels else [])])
    if save_fit and not fit_qrels:
        raise UsageError("--save-fit needs --fit-qrels")
    fusion = options.fusion(method, fuse_norm, rrf_k, fuse_weights, len(paths))
    names = [shown_name(path) for path in paths]
    runs = [read_run(path) for path in paths]
    described = {**fusion.metadata(), "lists": names}
    if fuse_weights is not None and os.path.isfile(fuse_weights):
        described = {**fusing.read_fit(fuse_weights), **described}
    if fit_qrels:
        fusion, described = fitted_fusion(fusion, runs, names, fit_qrels, fit_metric, fit_step,
                                          save_fit)
    fused = fusing.fuse_runs(fusion, runs, fuse_depth)
    hits = write_run(fused, output, output_format, {"fusion": described})
    console.info(f"fused {len(runs)} runs ({method}, norm {fusion.norm}): "
                 f"{console.hits_summary(hits, len(fused))} -> {output or 'stdout'}")


def fitted_fusion(fusion, runs, names, qrels_path, metric, step, save_fit):
    """wsum weights fitted on `qrels_path`; reported on stderr, saved to `save_fit`."""
    import dataclasses
    import json

    from vecpipe.cli import console
    from vecpipe.core import fusion as fusing
    from vecpipe.core.retrieval_metrics import parse_metric_key
    from vecpipe.formats.errors import ParameterError, UsageError
    from vecpipe.formats.trec import read_qrels
    from vecpipe.formats.writers import AtomicFile

    if fusion.weights is not None:
        raise UsageError("give --fuse-weights or --fit-qrels, not both")
    metric = fusing.DEFAULT_FIT_METRIC if metric is None else metric
    step = fusing.DEFAULT_FIT_STEP if step is None else step
    key = parse_metric_key(metric)
    judgments = read_qrels(qrels_path).qrels
    try:
        fitted = fusing.fit_weights(fusion, runs, judgments, key, step)
    except ParameterError as err:
        raise options.fusion_flagged(err) from None
    fusion = dataclasses.replace(fusion, weights=fitted.weights)
    record = fusing.fit_record(fusion, fitted, names)
    console.info(f"fitted weights {','.join(f'{w:g}' for w in fitted.weights)}: {metric} "
                 f"{fitted.score:.5f} on {fitted.queries:,} judged queries "
                 f"({fitted.trials} trials)")
    if save_fit:
        target = AtomicFile(save_fit)
        target.file.write(json.dumps(record, indent=2).encode() + b"\n")
        target.commit()
    return fusion, record


def write_run(run, output, output_format, metadata) -> int:
    """A run (query -> {doc: score}, best first) as hit rows or TREC lines; the hits written."""
    import json

    import pyarrow as pa

    from vecpipe.formats.trec import trec_lines
    from vecpipe.formats.writers import RecordWriter, resolve_output_format, text_output

    rows = [(qid, rank, doc, score) for qid, docs in run.items()
            for rank, (doc, score) in enumerate(docs.items(), 1)]
    fmt = resolve_output_format(output, output_format, extra=("trec",), vectors=False)
    if fmt == "trec":
        with text_output(output) as out:
            out.write(trec_lines((qid, doc, rank, score) for qid, rank, doc, score in rows))
        return len(rows)
    query_ids, ranks, ids, scores = zip(*rows) if rows else ((), (), (), ())
    table = pa.table({"query_id": pa.array(query_ids, pa.string()),
                      "rank": pa.array(ranks, pa.int32()), "id": pa.array(ids, pa.string()),
                      "score": pa.array(scores, pa.float64())})
    described = {key: json.dumps(value) for key, value in metadata.items()}
    with RecordWriter(output, fmt, schema=table.schema, metadata=described) as out:
        out.write_table(table)
    return len(rows)


# ---- record streams ------------------------------------------------------------------------

@dataclass
class Source:
    """One input: the name shown in messages, the path read, its schema (None when empty), and
    for stdin the open stream (it can be read only once)."""

    name: str
    path: str
    schema: object
    kept: object = None


def merge_streams(paths, output, output_format, input_format, on_duplicate, sort_by,
                  expect_shards, force, near=None) -> None:
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.readers import check_one_stdin
    from vecpipe.formats.writers import RecordWriter, carries_vectors, resolve_output_format

    check_policy(on_duplicate)
    if expect_shards is not None and expect_shards < 1:
        raise UsageError("--expect-shards needs N >= 1")
    check_one_stdin(paths)
    paths = expand_part_folders(paths)
    with flagged_hints():
        merging.check_shard_set(paths, expect_shards)
    if not force:
        check_one_job(paths)
    with spooled_stdin(paths, needed=on_duplicate in ("last", "error")) as readable:
        sources = [open_source(path, shown, input_format) for path, shown in readable]
        present = [s for s in sources if s.schema is not None]
        metas = [(s.name, names.read_meta(s.schema)) for s in present]
        merging.check_metadata(metas, force)
        schema = merging.unify_schemas([(s.name, merging.id_renamed(s.schema))
                                        for s in present])
        common, dropped = merging.common_metadata(metas)
        if dropped:
            console.warn(f"the output drops metadata not shared by all inputs: "
                         f"{', '.join(dropped)}")
        if sort_by and sort_by not in schema.names:
            raise DataError(f"no field {sort_by!r} to sort by; fields are "
                            f"{', '.join(schema.names)}")
        output_format = resolve_output_format(output, output_format,
                                              vectors=carries_vectors(schema))
        with flagged_hints():
            keeper = prepare_dedupe(on_duplicate, sources, input_format)
        finder = prepare_near(near, schema, common, force)
        with RecordWriter(output, output_format, schema=schema, metadata=common) as out, \
                flagged_hints():
            batches = near_batches(kept_batches(sources, input_format, keeper), finder)
            if sort_by:
                out.write_table(sorted_table(batches, schema, sort_by))
            else:
                for batch in batches:
                    out.write(batch)
    dropped_note = f", {keeper.dropped} duplicates dropped" if keeper else ""
    dropped_note += near_note(near, finder)
    console.info(f"{len(paths)} input{'s' if len(paths) != 1 else ''} -> {out.rows} records -> {output or 'stdout'} "
                 f"({out.format}){dropped_note}")


def check_policy(on_duplicate: str) -> None:
    from vecpipe.core.merging import DUPLICATE_POLICIES
    from vecpipe.formats.errors import UsageError

    if on_duplicate not in DUPLICATE_POLICIES:
        raise UsageError(f"unknown --on-duplicate {on_duplicate!r}; choose from "
                         f"{', '.join(DUPLICATE_POLICIES)}")


ON_DUPLICATE_HINT = "--on-duplicate first keeps the first copy, --on-duplicate last the last"


@contextlib.contextmanager
def flagged_hints():
    """Core's shard-set and duplicate-id errors, with the options that answer them as hints."""
    from vecpipe.core.merging import DuplicateId, MissingId, UnnamedShard

    try:
        yield
    except DuplicateId as err:
        err.hint = ON_DUPLICATE_HINT
        raise
    except MissingId as err:
        err.hint = "--on-duplicate first|last|error finds duplicates by id; " \
                   "--on-duplicate keep merges records without one"
        raise
    except UnnamedShard as err:
        err.hint = "with --expect-shards, name every shard part-0000I-of-0000N or none of them"
        raise


def check_one_job(paths) -> None:
    """Parts of `--shard` runs whose inputs or options differ are never merged together."""
    from vecpipe.formats.parts import check_one_job as refuse_mixed_jobs

    refuse_mixed_jobs([path for path in paths if path != "-"])


def expand_part_folders(paths):
    """A folder stands for the part files in it (`embed --shard I/N -o DIR/`), in shard order."""
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.parts import list_parts

    expanded = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            parts = [part for _, part in list_parts(path)]
            if not parts:
                raise DataError("folder holds no part-0000I-of-0000N files", source=path)
            expanded.extend(parts)
        else:
            expanded.append(path)
    return expanded


@contextlib.contextmanager
def spooled_stdin(paths, needed: bool):
    """Yield (path, shown name) pairs; when inputs must be read twice, stdin is first copied to
    a temporary file (removed afterwards) so that it can be."""
    import shutil
    import tempfile

    from vecpipe.formats.readers import STDIN_NAME, stdin_binary

    if not needed or "-" not in paths:
        yield [(path, STDIN_NAME if path == "-" else path) for path in paths]
        return
    with tempfile.NamedTemporaryFile(prefix="vecpipe-merge-stdin-") as spool:
        shutil.copyfileobj(stdin_binary(), spool, 1 << 20)
        spool.flush()
        yield [(spool.name, STDIN_NAME) if path == "-" else (path, path) for path in paths]


def open_source(path: str, shown: str, input_format: str) -> Source:
    """Read an input's schema. Files are reopened later (one open file at a time); stdin keeps
    its stream, with the batch already read still pending in it."""
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([path], input_format)
    with renamed_errors(path, shown):
        schema = stream.schema
    return Source(shown, path, schema, kept=stream if path == "-" else None)


@contextlib.contextmanager
def renamed_errors(path: str, shown: str):
    """Errors in a spooled stdin name <stdin>, not the temporary file."""
    from vecpipe.formats.errors import VecpipeError

    try:
        yield
    except VecpipeError as err:
        if err.source == path:
            err.source = shown
        raise


def source_batches(source: Source, input_format: str):
    """(renamed batch, shown name, first record number) for each batch of one input."""
    from vecpipe.core import merging
    from vecpipe.formats.readers import RecordStream

    if source.schema is None:
        return
    stream = source.kept or RecordStream([source.path], input_format)
    source.kept = None
    with renamed_errors(source.path, source.name):
        for item in stream:
            yield merging.renamed_batch(item.batch), source.name, item.first_record


def all_batches(sources, input_format):
    for source in sources:
        yield from source_batches(source, input_format)


def prepare_dedupe(mode: str, sources, input_format):
    """The keeper for --on-duplicate (None for keep), after the first pass that last/error need."""
    from vecpipe.core import merging

    if mode == "keep":
        return None
    if mode == "first":
        return merging.FirstSeen()
    if mode == "error":
        checker = merging.NoDuplicates()
        for batch, name, first in all_batches(sources, input_format):
            checker.observe_source(merging.batch_ids(batch, name, first), name, first)
        return None
    keeper = merging.LastSeen()
    ordinal = 0
    for batch, name, first in all_batches(sources, input_format):
        keeper.observe(merging.batch_ids(batch, name, first), ordinal)
        ordinal += batch.num_rows
    return keeper


def near_options(threshold, against, elsewhere):
    """(threshold, against) for --dedupe-near, or None; refused where no stream is merged."""
    from vecpipe.formats.errors import UsageError

    if threshold is None:
        if against is not None:
            raise UsageError("--against needs --dedupe-near THRESHOLD")
        return None
    if elsewhere:
        raise UsageError("--dedupe-near applies to record streams, not --fuse, --index or "
                         "--models")
    if not -1 <= threshold <= 1:
        raise UsageError(f"--dedupe-near is a cosine, between -1 and 1; got {threshold}")
    return threshold, against


def prepare_near(near, schema, common, force):
    """The near-duplicate finder, with the --against vectors (in the merged inputs' space)."""
    from vecpipe.core.near_dupes import NearDuplicates, float_vectors
    from vecpipe.core.space import check_same_space
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.readers import read_table

    if near is None:
        return None
    if names.EMBEDDING not in schema.names:
        raise DataError("--dedupe-near compares vectors: the inputs have no `embedding` field")
    threshold, against = near
    if against is None:
        return NearDuplicates(threshold)
    table = read_table([against])
    if table is None or names.EMBEDDING not in table.schema.names:
        raise DataError("--against needs embedded records (an `embedding` field)",
                        source=against)
    check_same_space(common, names.read_meta(table.schema), "the merged inputs", against,
                     force=force)
    vectors = names.vectors_to_numpy(table.column(names.EMBEDDING))
    return NearDuplicates(threshold, float_vectors(vectors, against))


def near_batches(batches, finder):
    """Batches without the records --dedupe-near drops."""
    import pyarrow as pa

    from vecpipe.formats import schema as names

    for batch in batches:
        if finder is not None and batch.num_rows:
            mask = finder.keep(names.vectors_to_numpy(batch.column(names.EMBEDDING)))
            if not mask.all():
                batch = batch.filter(pa.array(mask, pa.bool_()))
        yield batch


def near_note(near, finder) -> str:
    if finder is None:
        return ""
    note = f", {finder.duplicates} near-duplicates (cosine >= {near[0]:g}) dropped"
    if near[1] is not None:
        note += f", {finder.contaminated} within {near[0]:g} of {near[1]} dropped"
    return note


def kept_batches(sources, input_format, keeper):
    """Every batch in input order, filtered by the duplicate-id keeper."""
    import pyarrow as pa

    from vecpipe.core import merging

    ordinal = 0
    for batch, name, first in all_batches(sources, input_format):
        if keeper is not None:
            mask = keeper.keep(merging.batch_ids(batch, name, first), ordinal)
            ordinal += batch.num_rows
            if not all(mask):
                batch = batch.filter(pa.array(mask, pa.bool_()))
        yield batch


def sorted_table(batches, schema, field: str):
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError

    table = pa.Table.from_batches([names.align_batch(b, schema) for b in batches], schema)
    try:
        return table.sort_by([(field, "ascending")])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as err:
        raise DataError(f"cannot sort by {field!r} ({schema.field(field).type}): {err}") \
            from None


# ---- models (weight-space merging) ---------------------------------------------------------

def merge_models(specs, output, weights_text, method, **task_options) -> None:
    """Weighted average (linear) or per-tensor slerp of models with identical architecture;
    with a base, the merge of their task vectors (merge_task_vectors). The first model's
    tokenizer, pooling and normalize modules are kept."""
    from vecpipe.cli import console
    from vecpipe.core import model_soup as soup
    from vecpipe.core.index_format import check_target
    from vecpipe.formats.errors import UsageError

    if output in (None, "-"):
        raise UsageError("--models needs -o DIR for the merged model folder")
    if task_options["base"] is not None:
        merge_task_vectors(specs, output, weights_text, method, **task_options)
        return
    given = [name for name, value in task_options.items() if value is not None]
    if given or method in soup.TASK_METHODS[1:]:
        what = f"--{given[0].replace('_', '-')}" if given else f"--method {method}"
        raise UsageError(f"{what} works on task vectors: give the models' --base")
    if len(specs) < 2:
        raise UsageError("--models needs at least two models")
    weights = parse_weights(weights_text, len(specs))
    if method not in ("linear", "slerp"):
        raise UsageError(f"unknown --method {method!r}; choose linear or slerp (with "
                         f"--base: linear, ties or dare)")
    t = slerp_position(weights) if method == "slerp" else None
    check_target(output, soup.PROVENANCE_FILE, "a merged model")
    loaded = [load_for_merge(spec) for spec in specs]
    states = checked_states(loaded)
    if abs(sum(weights) - 1) > 1e-6 and method == "linear":
        console.warn(f"weights sum to {sum(weights):g}, not 1: the merged weights are scaled")
    merged = soup.merged_state(states, weights, t)
    soup.save_model(loaded, merged, output, {"method": method, "weights": weights})
    console.info(f"merged {len(loaded)} models ({method}, weights "
                 f"{','.join(f'{w:g}' for w in weights)}) -> {output}")


def checked_states(loaded) -> list[dict]:
    """The state dicts of models whose modules and weight shapes match."""
    from vecpipe.core import model_soup as soup

    soup.check_same_modules(loaded)
    states = [model.st.state_dict() for model in loaded]
    soup.compare_state_shapes([(model.name, {k: tuple(v.shape) for k, v in state.items()})
                               for model, state in zip(loaded, states)])
    return states


DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.1}  # TIES' top 20%; DARE's drop rate 0.9
DEFAULT_GRID = "0,0.25,0.5,0.75,1"
DEFAULT_PROBE_METRIC = "ndcg@10"
PROBE_WARN_EMBEDDINGS = 200_000  # document embeddings over the whole grid: ~30 min of CPU


def merge_task_vectors(specs, output, weights_text, method, base, density, seed,
                       search_weights, probe, probe_metric, grid, sgd_steps) -> None:
    """BASE + the merge of the task vectors (model - BASE): task arithmetic, TIES or DARE,
    with given weights or the grid point scoring best on the probe set."""
    from vecpipe.cli import console
    from vecpipe.core import model_soup as soup
    from vecpipe.core.index_format import check_target
    from vecpipe.core.retrieval_metrics import parse_metric_key
    from vecpipe.formats.errors import UsageError

    if not specs:
        raise UsageError("--models --base needs the models whose task vectors are merged")
    density = task_density(method, density, seed)
    search = check_search(weights_text, search_weights, probe, probe_metric, grid, sgd_steps)
    if sgd_steps and method != "linear":
        raise UsageError("--sgd-steps moves task-arithmetic weights: --method linear")
    weights = parse_weights(weights_text, len(specs), 1.0 if method == "ties" else None)
    if search:
        key, values = parse_metric_key(probe_metric or DEFAULT_PROBE_METRIC), \
            parse_grid(grid or DEFAULT_GRID)
    check_target(output, soup.PROVENANCE_FILE, "a merged model")
    probe_set = soup.read_probe(probe) if search else None
    base_model = load_for_merge(base)
    loaded = [load_for_merge(spec) for spec in specs]
    base_state, *states = checked_states([base_model, *loaded])
    recipe = {"method": method, "base": {"name": base_model.name, "sha": base_model.sha},
              **({"density": density} if density is not None else {}),
              **({"seed": seed or 0} if method == "dare" else {})}

    def merge(point):
        return soup.task_state(base_state, states, point, method, density or 1.0, seed or 0)

    if search:
        weights, recipe["search"] = self_positioning(base_model, merge, probe_set, key, values,
                                                     sgd_steps, (base_state, states))
    soup.save_model(loaded, merge(weights), output, {**recipe, "weights": list(weights)})
    console.info(f"merged the task vectors of {len(loaded)} model{'s' * (len(loaded) > 1)} "
                 f"from {base_model.name} ({method}, weights "
                 f"{','.join(f'{w:g}' for w in weights)}) -> {output}")


def task_density(method: str, density, seed):
    from vecpipe.core import model_soup as soup
    from vecpipe.formats.errors import UsageError

    if method not in soup.TASK_METHODS:
        raise UsageError(f"--base merges task vectors: --method {', '.join(soup.TASK_METHODS)}"
                         f", not {method!r}", hint="slerp interpolates two models: drop --base")
    if seed is not None and method != "dare":
        raise UsageError("--seed applies to --method dare (its random drops)")
    if method == "linear":
        if density is not None:
            raise UsageError("--density applies to --method ties or dare")
        return None
    density = DEFAULT_DENSITY[method] if density is None else density
    if not 0 < density <= 1:
        raise UsageError(f"--density must be in (0, 1], not {density:g}")
    return density


def check_search(weights_text, search_weights, probe, probe_metric, grid, sgd_steps) -> bool:
    from vecpipe.formats.errors import UsageError

    if not search_weights:
        if probe or probe_metric or grid or sgd_steps:
            raise UsageError("--probe, --probe-metric, --weight-grid and --sgd-steps need "
                             "--search-weights")
        return False
    if weights_text is not None:
        raise UsageError("give --weights or --search-weights, not both")
    if probe is None:
        raise UsageError("--search-weights needs --probe DIR (a small BEIR folder)")
    return True


def parse_grid(text: str) -> list[float]:
    from vecpipe.formats.errors import UsageError

    try:
        values = sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise UsageError(f"bad --weight-grid {text!r}; use comma-separated numbers, "
                         f"e.g. {DEFAULT_GRID}") from None
    return values


def self_positioning(base_model, merge, probe, key: str, values, sgd_steps, states):
    """The best grid point on the probe, then (with `sgd_steps`) that point moved by SGD,
    kept if it scores better; the weights and the search's record."""
    import copy

    from vecpipe.cli import console
    from vecpipe.core import model_soup as soup

    model = copy.deepcopy(base_model.st)  # the loader's cached model stays as it was
    best, table = searched_weights(model, merge, probe, key, values, len(states[1]))
    found = {"probe": probe.folder, "split": probe.split, "metric": key,
             "table": [{"weights": list(point), key: score} for point, score in table]}
    if sgd_steps:
        moved, losses = soup.optimised_weights(model, *states, best, probe, sgd_steps)
        model.load_state_dict(merge(moved))
        score = soup.probe_score(model, probe, key)
        console.info(f"{sgd_steps} SGD steps from {','.join(f'{w:g}' for w in best)} (loss "
                     f"{losses[0]:.4f} -> {losses[-1]:.4f}): weights "
                     f"{','.join(f'{w:.4g}' for w in moved)}, {key} {score:.4f}")
        found["sgd"] = {"start": list(best), "weights": moved, key: score, "losses": losses}
        if score > dict(table)[best]:
            best = tuple(moved)
    return best, found


def searched_weights(model, merge, probe, key: str, values, count: int):
    """Every grid point merged into `model` and scored on the probe; the best point and the
    (weights, score) table, in grid order."""
    from vecpipe.cli import console
    from vecpipe.core import model_soup as soup

    points = soup.weight_grid(values, count)
    console.info(f"searching {len(points)} weight vectors on {probe.folder} ({probe.split}: "
                 f"{len(probe.queries)} queries, {len(probe.doc_ids)} documents) for {key}")
    if len(probe.doc_ids) * len(points) > PROBE_WARN_EMBEDDINGS:
        console.warn(f"every grid point embeds all {len(probe.doc_ids):,} probe documents: "
                     f"{len(probe.doc_ids) * len(points):,} embeddings; a probe of a few "
                     "hundred documents is enough to rank the points")
    table = []
    for point in points:
        model.load_state_dict(merge(point))
        table.append((point, soup.probe_score(model, probe, key)))
        console.info(f"  weights {','.join(f'{w:g}' for w in point)}: {key} "
                     f"{table[-1][1]:.4f}")
    best = soup.best_point(table)
    console.info(f"best weights {','.join(f'{w:g}' for w in best)}: {key} "
                 f"{dict(table)[best]:.4f}")
    return best, table


def parse_weights(text: str | None, count: int, default: float | None = None) -> list[float]:
    """`--weights 0.7,0.3` (one per model); when not given, `default` each (equal weights
    summing to 1 when None)."""
    from vecpipe.formats.errors import UsageError

    if text is None:
        return [1.0 / count if default is None else default] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"bad --weights {text!r}; use comma-separated numbers, "
                         f"e.g. 0.5,0.5") from None
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values for {count} models")
    return weights


def slerp_position(weights) -> float:
    from vecpipe.formats.errors import UsageError

    if len(weights) != 2:
        raise UsageError("--method slerp merges exactly two models")
    if min(weights) < 0 or sum(weights) <= 0:
        raise UsageError("--method slerp needs non-negative weights, not both 0")
    return weights[1] / sum(weights)


def load_for_merge(spec: str):
    from vecpipe.cli.models import load_model
    from vecpipe.formats.errors import UsageError

    model = load_model(spec, device="cpu", dtype="float32")
    if model.is_fake:
        raise UsageError(f"{spec} is a fake model: it has no weights to merge")
    return model


# ---- indexes -------------------------------------------------------------------------------

INDEX_BLOCK_ROWS = 8192


def merge_indexes(paths, output, on_duplicate, link, force) -> None:
    """One index rebuilt from several (from their stored codes, or their kept full vectors when
    codecs differ), or with `link` a folder of linked shards searched as one."""
    from vecpipe.cli import console
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_format import check_target
    from vecpipe.core.index_open import open_index

    if output in (None, "-"):
        raise UsageError("--index needs -o DIR for the merged index folder")
    if not paths:
        raise UsageError("--index needs the index folders to merge")
    on_duplicate = on_duplicate or "error"  # an index holds one row per id
    options.index_duplicates(on_duplicate)  # refuses keep, as `index` does
    check_target(output)
    if not force:
        check_one_job(paths)
    indexes = [open_index(path, verify=True) for path in paths]  # copied or linked: check them
    lexical = next((path for path, index in zip(paths, indexes) if index.layout == "lexical"),
                   None)
    if lexical is not None:
        raise UsageError(f"{lexical} is a lexical (BM25) index: --index merges vector indexes",
                         hint="index the records again with `vecpipe index --lexical` (or "
                              "--append them), which re-scores the whole corpus")
    plan = plan_index_merge(indexes, force, link)
    if link:
        summary = link_indexes(indexes, plan, output, on_duplicate)
    else:
        summary = rebuild_index(indexes, plan, output, on_duplicate)
    console.info(f"{len(indexes)} indexes -> {output}: {summary}")


@dataclass
class IndexMergePlan:
    """What the merged index is: metadata, query prompt, stored fields (unified schema), the
    full-vector spec (kept only when every input keeps them) and, for a rebuild, the codec the
    inputs' codes must be re-encoded with (None: copy codes as they are)."""

    metadata: dict
    query_prompt: object
    rows_schema: object
    full: object
    shared_codec: bool
    reencode: object = None


def plan_index_merge(indexes, force: bool, link: bool) -> IndexMergePlan:
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.core.index_linked import check_linkable
    from vecpipe.formats.errors import DataError

    first = indexes[0]
    for index in indexes[1:]:
        for what in ("dim", "metric", "dtype", "score_metric"):
            if getattr(index, what) != getattr(first, what):
                raise DataError(f"{what} differs: {first.path} has {getattr(first, what)!r}, "
                                f"{index.path} has {getattr(index, what)!r}",
                                hint="indexes merge only when their vectors are the same kind; "
                                     "rebuild one from the records")
    if link:
        check_linkable(indexes)
    named = [(index.path, dict(index.metadata)) for index in indexes]
    merging.check_metadata([(name, {k: v for k, v in meta.items() if k != "codec"})
                            for name, meta in named], force)
    prompts = {index.query_prompt for index in indexes}
    if len(prompts) > 1 and not force:
        raise DataError(f"query prompt differs: {first.path} has {first.query_prompt!r}, "
                        f"{next(i for i in indexes if i.query_prompt != first.query_prompt).path}"
                        f" has another", hint="pass --force to keep none")
    shared_codec = all(index.codec == first.codec for index in indexes)
    full = first.full_spec if all(index.full_spec == first.full_spec for index in indexes) \
        else None
    if first.full_spec is not None and full is None:
        console.warn("not every index keeps full vectors: the merged index keeps none")
    metadata, _ = merging.common_metadata(named)
    plan = IndexMergePlan(metadata, first.query_prompt if len(prompts) == 1 else None,
                          merging.unify_schemas([(index.path, index.rows().schema)
                                                 for index in indexes]),
                          full, shared_codec)
    if not shared_codec:
        resolve_codecs(indexes, plan, force, link)
    return plan


def resolve_codecs(indexes, plan: IndexMergePlan, force: bool, link: bool) -> None:
    """Inputs quantized with different codecs: linked shards each encode queries their own way
    (with --force); a rebuild re-encodes every input's kept full vectors with the first codec."""
    from vecpipe.formats.errors import DataError

    first, other = indexes[0], next(i for i in indexes if i.codec != indexes[0].codec)
    described = f"{first.path} has {describe_codec(first)}, {other.path} has " \
                f"{describe_codec(other)}"
    if link:
        if not force:
            raise DataError(f"codec differs: {described}",
                            hint="pass --force to link them anyway (each shard encodes queries "
                                 "with its own codec; scores are then only comparable "
                                 "approximately)")
        return
    if first.codec is None or any(index.full_spec is None for index in indexes):
        raise DataError(f"codec differs: {described}; the codes cannot be mixed",
                        hint="index with --keep-vectors so merge can re-encode them, or link "
                             "them with --link --force")
    plan.reencode = first.codec
    plan.metadata.update(first.codec.metadata())
    plan.shared_codec = True


def describe_codec(index) -> str:
    return "no codec" if index.codec is None else index.codec.describe()


def rebuild_index(indexes, plan: IndexMergePlan, output: str, on_duplicate: str) -> str:
    from vecpipe.core.index_build import IndexBuilder
    from vecpipe.core.index_spec import IndexSpec
    from vecpipe.formats.errors import DataError

    first = indexes[0]
    spec = IndexSpec(dim=first.dim, metric=first.metric, dtype=first.dtype,
                     score_metric=first.score_metric, **first.storage_options(),
                     metadata=plan.metadata, query_prompt=plan.query_prompt, full=plan.full,
                     planes=first.planes)
    builder = IndexBuilder(output, spec, on_duplicate=on_duplicate,
                           fields=plan.rows_schema.names)
    try:
        with builder:
            for index in indexes:
                for block in index_blocks(index, plan):
                    builder.add(**block)
    except DataError as err:
        if err.message.startswith("duplicate id"):
            err.hint = ON_DUPLICATE_HINT
        raise
    notes = [f"{builder.skipped:,} duplicates skipped" if builder.skipped else "",
             f"{builder.replaced:,} replaced" if builder.replaced else "",
             "codes re-encoded with the first codec" if plan.reencode is not None else ""]
    return ", ".join([f"{builder.count:,} vectors rebuilt"] + [n for n in notes if n])


def index_blocks(index, plan: IndexMergePlan):
    """IndexBuilder.add arguments for the visible rows of one index, block by block."""
    import numpy as np
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.core.index_format import to_index_codes

    rows_table = index.rows()
    visible = index.visible_mask()
    for start in range(0, index.count, INDEX_BLOCK_ROWS):
        rows = np.arange(start, min(start + INDEX_BLOCK_ROWS, index.count))
        if visible is not None:
            rows = rows[visible[rows]]
        full = None
        if plan.full is not None or plan.reencode is not None:
            full = np.asarray(index.full_vectors()[rows])
        if plan.reencode is not None:
            vectors = to_index_codes(plan.reencode,
                                     plan.reencode.encode(full.astype(np.float32)))
        else:
            vectors = index.stored_vectors(rows)
        stored = pa.Table.from_batches(
            [names.align_batch(batch, plan.rows_schema)
             for batch in rows_table.take(pa.array(rows)).to_batches()], plan.rows_schema)
        yield dict(ids=stored.column(names.ID).to_pylist(), vectors=vectors, stored=stored,
                   full=full if plan.full is not None else None, source=index.path,
                   first_record=start + 1)


def link_indexes(indexes, plan: IndexMergePlan, output: str, on_duplicate: str) -> str:
    """A folder of linked shards (core.index_linked), the rows each shard's duplicates hide
    following `on_duplicate`."""
    from vecpipe.core import merging
    from vecpipe.core.index_linked import write_linked_index

    with flagged_hints():
        hidden = merging.shadowed_rows([index.ids().to_pylist() for index in indexes],
                                       on_duplicate,
                                       [index.path for index in indexes])
    written = write_linked_index(output, indexes, hidden, plan.metadata, plan.query_prompt,
                                 plan.rows_schema.names, plan.full, plan.shared_codec, on_duplicate)
    total, visible, copied = written["rows"], written["count"], written["copied"]
    how = f"{copied} files copied (other file system)" if copied else "files hard-linked"
    return f"{len(indexes)} shards linked, {visible:,} vectors ({total - visible:,} duplicates " \
           f"hidden; {how})"
