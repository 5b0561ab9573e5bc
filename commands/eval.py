"""Score retrieval runs, BEIR datasets, STS pairs, MTEB's other tasks, embedding sets (MTEB numbers).

MTEB's other task types: pair classification, reranking, bitext mining, summarization,
classification and clustering, each computed as MTEB's own evaluator (core/task_metrics.py).
"""
import contextvars
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options
from vecpipe.cli.errors import boundary
from vecpipe.core.suite import Units

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)

AllQueries = Annotated[bool, typer.Option(
    "--all-queries", help="Score qrels queries missing from a run as 0 (trec_eval -c) instead "
                          "of leaving them out (pytrec_eval and MTEB).")]

_LABELS = {"ndcg": "nDCG", "map": "MAP", "mrr": "MRR", "recall": "Recall", "precision": "P",
           "set_precision": "set P", "set_recall": "set Recall", "set_f1": "set F1"}


# ---------------------------------------------------------------- eval retrieval

@app.command("retrieval")
@boundary("eval retrieval")
def retrieval(
        runs: Annotated[Optional[List[str]], typer.Argument(
            help="Runs: search output (any record format: query_id, id, score/rank) or TREC run "
                 "files; - for stdin (the default). Several runs are compared with the first.",
            show_default=False, metavar="RUN")] = None,
        qrels: options.Qrels = ...,
        k: options.Cutoffs = None,
        old_k: options.CutoffsK = None,
        metrics: options.Metrics = None,
        qrels_depth: Annotated[int, typer.Option(
            "--qrels-depth", min=1, help="When --qrels is a run: how many of its top hits are "
                                         "relevant (recall@N is then ANN recall@N).")] = 10,
        all_queries: AllQueries = False,
        aggregate: options.Aggregate = None,
        per_query: options.PerQuery = False,
        fail_under: options.FailUnder = None,
        permutations: Annotated[int, typer.Option(
            "--permutations", min=100, help="Sign flips of the paired randomization test.")]
        = 10000,
        seed: options.Seed
        = 0,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        quiet: options.Quiet = False):
    """Score runs against relevance judgments: nDCG@k, MAP@k, MRR@k, Recall@k and P@k exactly
    as pytrec_eval computes them (ties broken by doc id descending; queries missing from a run
    left out unless --all-queries). With several runs: deltas against the first and, per
    metric, p-values of a paired randomization test (seeded) and a paired t-test, all runs'
    means, deltas and tests over one query set: the judged queries that every run answers
    (stderr says how many each run lacks), or with --all-queries every judged query (a
    missing one scores 0, as trec_eval -c and ranx). Fails when no document of a run is in
    the qrels (ids that do not match), warns when under 10% of its top-10 hits are, and when
    a cutoff is deeper than the run. Set metrics (--metrics set: set_precision, set_recall,
    set_f1, as trec_eval's set_P, set_recall, set_F) score each query's whole returned set,
    no cutoff: for thresholded runs (search --min-score, --min-prob); a query left with no
    hits counts only with --all-queries (as 0). Prints a table on a terminal and one JSON
    record per run (MTEB keys: ndcg_at_10...) otherwise.

    \b
    Example:
      vecpipe search idx queries.jsonl | vecpipe eval retrieval --qrels qrels/test.tsv
      vecpipe eval retrieval bm25.trec dense.trec --qrels qrels.txt --cutoffs 10,100
      vecpipe eval retrieval ann.jsonl --qrels exact.jsonl --qrels-depth 10 --metrics recall
      vecpipe eval retrieval run.trec --qrels q.tsv --fail-under ndcg@10=0.3
      vecpipe eval retrieval chunks.jsonl --qrels q.tsv --aggregate parent_id=max
      vecpipe eval retrieval filtered.jsonl --qrels q.tsv --metrics set --all-queries
    """
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.formats.readers import check_one_stdin
    from vecpipe.formats.trec import read_run

    ks, names = m.parse_ks(k), m.parse_metrics(metrics)
    thresholds = _parse_fail_under(fail_under, ks, names)
    by = _parse_aggregate(aggregate)
    runs = list(runs or ["-"])
    check_one_stdin([*runs, qrels])
    judgments = _load_judgments(qrels, qrels_depth)
    qrels_name = "<stdin>" if qrels == "-" else qrels
    results = []
    for path in runs:
        name = "<stdin>" if path == "-" else path
        run = read_run(path, by)
        evaluation = _evaluate_run(run, name, judgments.qrels, ks, names, all_queries)
        _check_judged(run, judgments.qrels, name, qrels_name)
        if set(names) - set(m.SET_METRICS):
            _warn_shallow(run, judgments.qrels, ks, name)
        results.append((name, evaluation))
    if len(results) > 1:
        results = _on_common_queries(results, len(judgments.qrels), qrels_name, all_queries)
    records = _run_records(results, ks, names, permutations, seed)
    if per_query:
        _emit_per_query(_per_query_records(results), output_format)
    else:
        _emit(records, output_format, lambda: _retrieval_table(records, ks, names))
    _check_fail_under(records, thresholds)


def _load_judgments(path: str, depth: int):
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.trec import read_qrels

    judgments = read_qrels(path, depth)
    if not judgments.qrels:
        raise DataError("no judgments", source="<stdin>" if path == "-" else path)
    if judgments.duplicates:
        console.warn(f"{judgments.duplicates} repeated judgments in {path}; the last one counts")
    if judgments.from_run:
        console.info(f"{path} is a run: its top {depth} hits per query count as relevant")
    return judgments


def _evaluate_run(run, name, qrels, ks, names, all_queries):
    from vecpipe.cli import console
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.formats.errors import DataError

    evaluation = m.evaluate(qrels, run, ks, names, all_queries=all_queries)
    if evaluation.queries == 0:
        what = "is empty" if not run else "has no query in common with the qrels"
        raise DataError(f"the run {what}", source=name,
                        hint="check that query ids match the qrels; --all-queries scores "
                             "missing queries as 0")
    if evaluation.missing:
        fate = "scored 0" if all_queries else "left out (pytrec_eval/MTEB; --all-queries " \
                                              "scores them 0)"
        console.warn(f"{name}: {len(evaluation.missing)} of {len(qrels)} qrels queries have no "
                     f"results; {fate}")
    if evaluation.unjudged:
        console.warn(f"{name}: ignored {len(evaluation.unjudged)} queries not in the qrels")
    return evaluation


JUDGED_DEPTH = 10      # the top hits whose judged share is checked
JUDGED_WARN_SHARE = 0.1


def _check_judged(run, qrels, name: str, qrels_name: str) -> None:
    """Fail when no hit of the run is a judged document, warn when few of the top hits are:
    ids that do not match the qrels score 0 and look like a bad model."""
    from vecpipe.cli import console
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.formats.errors import DataError

    judged, hits = m.judged_hits(run, qrels)
    if hits and not judged:
        raise DataError(f"none of the run's documents is judged in {qrels_name}: every metric "
                        "would be 0", source=name,
                        hint="do the document ids match the qrels'? chunk ids (doc#2: search "
                             "the parents), _id vs id, or the qrels of another dataset")
    judged, hits = m.judged_hits(run, qrels, JUDGED_DEPTH)
    if hits and judged < JUDGED_WARN_SHARE * hits:
        console.warn(f"{name}: only {judged} of the {hits} top-{JUDGED_DEPTH} hits "
                     f"({judged / hits:.1%}) are documents judged in {qrels_name}; unjudged "
                     "documents count as not relevant (do the ids match the qrels'?)")


def _warn_shallow(run, qrels, ks, name: str) -> None:
    from vecpipe.cli import console
    from vecpipe.core import retrieval_metrics as m

    depth = m.run_depth(run, qrels)
    deeper = [k for k in ks if k > depth]
    if depth and deeper:
        cutoffs = ", ".join(f"@{k}" for k in deeper)
        console.warn(f"{name}: at most {depth} hits per query: {cutoffs} "
                     f"{'sees' if len(deeper) == 1 else 'see'} no deeper than @{depth} "
                     f"(a deeper run, e.g. search -k {max(ks)}, fills them)")


def _on_common_queries(results, judged: int, qrels_name: str, all_queries: bool):
    """Every run scored on the same queries, so that means, deltas and paired tests agree:
    those that every run answers (pytrec_eval leaves a query a run lacks out), or with
    --all-queries all judged queries (trec_eval -c, ranx: a missing query scores 0)."""
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError

    common = set.intersection(*(set(evaluation.per_query) for _, evaluation in results))
    if not common:
        raise DataError("the runs answer no judged query in common",
                        hint="--all-queries compares on every judged query, a missing one "
                             "scoring 0")
    if all_queries:
        console.info(f"runs compared on all {len(common)} queries judged in {qrels_name} "
                     "(--all-queries: a query a run lacks scores 0)")
    else:
        lacks = ", ".join(f"{name} lacks {len(evaluation.missing)}"
                          for name, evaluation in results)
        message = (f"runs compared on the {len(common)} queries judged in {qrels_name} that "
                   f"every run answers ({lacks} of the {judged} judged)")
        if len(common) < judged:
            console.warn(message + "; --all-queries compares on all of them, a missing one "
                                   "scoring 0")
        else:
            console.info(message)
    return [(name, evaluation.restricted(common)) for name, evaluation in results]


def _run_records(results, ks, names, permutations: int, seed: int) -> list[dict]:
    """One summary record per run; runs after the first carry deltas and paired p-values."""
    from vecpipe.core import retrieval_metrics as m

    base_name, base = results[0]
    records = []
    for name, evaluation in results:
        record = {"run": name, "queries": evaluation.queries, **evaluation.means}
        if m.MAIN_METRIC in evaluation.means:
            record["main_score"] = evaluation.means[m.MAIN_METRIC]
        if evaluation is not base:
            record.update(_compare(base, evaluation, base_name, permutations, seed))
        records.append(record)
    return records


def _compare(base, other, base_name: str, permutations: int, seed: int) -> dict:
    import numpy as np

    from vecpipe.core import retrieval_metrics as m

    common = sorted(set(base.per_query) & set(other.per_query))  # all: see _on_common_queries
    a = np.array([[base.per_query[q][key] for key in base.keys] for q in common]).reshape(
        len(common), len(base.keys))
    b = np.array([[other.per_query[q][key] for key in base.keys] for q in common]).reshape(
        len(common), len(base.keys))
    p_random = m.sign_flip_pvalues(b - a, permutations, seed)
    return {
        "baseline": base_name, "paired_queries": len(common),
        "delta": {key: other.means[key] - base.means[key] for key in base.keys},
        "p_randomization": dict(zip(base.keys, map(float, p_random))),
        "p_ttest": {key: m.paired_t_test(a[:, i], b[:, i]) for i, key in enumerate(base.keys)},
    }


def _per_query_records(results) -> list[dict]:
    return [{"run": name, "query_id": qid, **scores}
            for name, evaluation in results for qid, scores in evaluation.per_query.items()]


def _retrieval_table(records, ks, names):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from vecpipe.core.retrieval_metrics import SET_METRICS, metric_key

    if len(records) == 1:
        record = records[0]
        table = Table()
        table.add_column("metric")
        for k in ks:
            table.add_column(f"@{k}", justify="right")
        for metric in names:
            if metric in SET_METRICS:  # no cutoff: the whole returned set
                table.add_row(_LABELS[metric], f"{record[metric]:.5f}", *[""] * (len(ks) - 1))
                continue
            table.add_row(_LABELS[metric], *(f"{record[metric_key(metric, k)]:.5f}"
                                             for k in ks))
        return Group(Text(f"{record['run']} · {record['queries']} queries"), table)
    table = Table()
    table.add_column("metric")
    table.add_column(_short(records[0]["run"]), justify="right", no_wrap=True)
    for record in records[1:]:
        table.add_column(_short(record["run"]), justify="right", no_wrap=True)
        table.add_column("Δ", justify="right")
        table.add_column("p rand / t", justify="right", no_wrap=True)
    for metric in names:
        for k in [None] if metric in SET_METRICS else ks:
            key = metric if k is None else metric_key(metric, k)
            label = _LABELS[metric] + ("" if k is None else f"@{k}")
            row = [label, f"{records[0][key]:.5f}"]
            for record in records[1:]:
                p_rand, p_t = record["p_randomization"][key], record["p_ttest"][key]
                star = "*" if p_rand < 0.05 else ""
                row += [f"{record[key]:.5f}", f"{record['delta'][key]:+.5f}",
                        f"{_p(p_rand)} / {_p(p_t)}{star}"]
            table.add_row(*row)
    title = (f"{len(records)} runs vs {records[0]['run']}, {records[1]['paired_queries']} "
             f"paired queries (p: paired randomization / t-test; * p < 0.05)")
    return Group(Text(title), table)


def _short(name: str) -> str:
    return os.path.basename(name) or name


def _p(value: float) -> str:
    return "1" if value >= 0.9995 else f"{value:.3f}" if value >= 0.001 else f"{value:.0e}"


# ---------------------------------------------------------------- eval calibrate

@app.command("calibrate")
@boundary("eval calibrate")
def calibrate(
        run: Annotated[str, typer.Argument(
            help="The run to fit on: search output (query_id, id, score) or a TREC run file of "
                 "training queries, searched at least --fit-depth deep; - for stdin.",
            metavar="RUN")] = "-",
        qrels: options.Qrels = ...,
        fit_depth: Annotated[Optional[int], typer.Option(
            "--fit-depth", min=1, help="Top hits per query the calibrator learns from and takes "
                                       "its score statistics over (default: the run's depth); "
                                       "search --calibrator fetches at least as many.",
            metavar="N", show_default=False)] = None,
        space: Annotated[Optional[str], typer.Option(
            "--space", help="The index folder the run searched: its model and metric are saved "
                            "in the calibrator, and search --calibrator checks them.",
            metavar="IDX", show_default=False)] = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        quiet: options.Quiet = False):
    """Fit a relevance calibrator (after Rossi et al. 2024, the "Cosine Adapter"): a map from a
    hit's score to the probability that it is relevant, conditioned on its query through the
    statistics of the query's top --fit-depth scores (features: score, score - top1, (score -
    mean) / std, top1 - mean; a logistic regression fitted by Newton's method, unpenalized
    but for a 1e-6 ridge that keeps a perfectly separable fit finite).
    Hits of judged queries are relevant when judged >= 1, not when unjudged. -o writes the
    calibrator JSON (features, coefficients, depth, provenance and the fit's log loss) for
    `search --calibrator`, whose --min-prob then cuts every query at one probability; without
    -o it goes to stdout as one record (--output-format; a table on a terminal).

    \b
    Example:
      vecpipe search idx train-queries.arrow -k 100 -o train.jsonl
      vecpipe eval calibrate train.jsonl --qrels qrels/train.tsv --space idx -o cal.json
      vecpipe search idx test-queries.arrow --calibrator cal.json --min-prob 0.3
    """
    import json

    from vecpipe.cli import console
    from vecpipe.core import calibration
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.readers import check_one_stdin
    from vecpipe.formats.trec import read_run
    from vecpipe.formats.writers import text_output

    check_one_stdin([run, qrels])
    provenance = _space_provenance(space)
    judgments = _load_judgments(qrels, 10)
    if judgments.from_run:
        raise UsageError("--qrels is a run; calibration needs relevance judgments")
    name = "<stdin>" if run == "-" else run
    hits = read_run(run)
    if not hits:
        raise DataError("the run is empty", source=name)
    depth = fit_depth or m.run_depth(hits, judgments.qrels)
    try:
        calibrator = calibration.fit(hits, judgments.qrels, depth, {
            **provenance, "run": name, "qrels": "<stdin>" if qrels == "-" else qrels})
    except DataError as err:
        raise err.located(source=name) from None
    record = calibrator.to_json()
    if output is None or output == "-":
        _emit([record], output_format, lambda: _calibrator_table(record))
    else:
        with text_output(output) as out:
            out.write(json.dumps(record, indent=2) + "\n")
    fit = calibrator.provenance["fit"]
    console.info(f"calibrator fitted on the top {depth} hits of {fit['queries']} queries "
                 f"({fit['relevant']} of {fit['hits']} relevant): log loss {fit['log_loss']:.4f}"
                 f" (base rate {fit['base_rate_log_loss']:.4f})" + (f" -> {output}"
                                                                     if output else ""))


def _calibrator_table(record: dict):
    from rich.table import Table

    table = Table(title=f"calibrator · top {record['depth']} · {record.get('model') or '-'}")
    table.add_column("feature")
    table.add_column("coefficient", justify="right")
    for name, value in zip([*record["features"], "intercept"],
                           [*record["coefficients"], record["intercept"]]):
        table.add_row(name, f"{value:.5g}")
    return table


def _space_provenance(space: str | None) -> dict:
    """model, model_sha, metric and index of the index folder a run searched (warns without)."""
    from vecpipe.cli import console
    from vecpipe.core.index_format import read_manifest

    if space is None:
        console.warn("no --space: the calibrator records no model, and search cannot check "
                     "that it searches the same vector space")
        return {"model": None, "index": None}
    manifest = read_manifest(space)
    meta = manifest.get("metadata") or {}
    return {"model": meta.get("model"), "model_sha": meta.get("model_sha"),
            "index": os.path.abspath(space), "layout": manifest.get("layout"),
            "metric": manifest.get("score_metric") or manifest.get("metric")}


# ---------------------------------------------------------------- fail-under and output

def _parse_aggregate(spec):
    """FIELD=HOW -> (field, how), or None."""
    from vecpipe.formats.errors import UsageError
    from vecpipe.formats.trec import AGGREGATES

    if spec is None:
        return None
    field, _, how = spec.partition("=")
    if not field.strip() or how.strip() not in AGGREGATES:
        raise UsageError(f"bad --aggregate {spec!r}; use FIELD={'|'.join(AGGREGATES)}, e.g. "
                         "parent_id=max")
    return field.strip(), how.strip()


def _parse_fail_under(specs, ks=None, names=None) -> list[tuple[str, float]]:
    """METRIC=VALUE pairs; retrieval metrics are normalized (ndcg@10 -> ndcg_at_10) and must be
    among those computed."""
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.formats.errors import UsageError

    thresholds = []
    for spec in specs or []:
        metric, sep, value = spec.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not sep or math.isnan(threshold):
            raise UsageError(f"bad --fail-under {spec!r}; use METRIC=VALUE, e.g. ndcg@10=0.3")
        key = metric.strip()
        if ks is not None:
            key = m.set_metric(key) or m.parse_metric_key(key)
            computed = set(m.metric_keys(names, ks))
            if key not in computed:
                raise UsageError(f"--fail-under {spec!r}: {key} is not computed",
                                 hint="add its cutoff to -k and its metric to --metrics")
        thresholds.append((key, threshold))
    return thresholds


def _check_fail_under(records: list[dict], thresholds) -> None:
    from vecpipe.formats.errors import DataError, UsageError

    misses = []
    for key, threshold in thresholds:
        for record in records:
            if key not in record:
                raise UsageError(f"--fail-under: no metric {key!r}; metrics are "
                                 f"{', '.join(k for k in record if isinstance(record[k], float))}")
            value = record[key]
            if value is None or not value >= threshold:
                label = record.get("run") or record.get("dataset") or record.get("input", "")
                shown = "none" if value is None else f"{value:.5f}"
                misses.append(f"{key} = {shown} < {threshold:g}" + (f" ({label})"
                                                                    if label else ""))
    if misses:
        raise DataError("below --fail-under: " + "; ".join(misses))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _emit_per_query(records: list[dict], output_format: str) -> None:
    """--per-query rows in the report format asked for; JSON lines where a table would be
    chosen (a row per query and run, a column per metric, is too wide for a terminal)."""
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    print_report_records([_json_safe(record) for record in records],
                         "jsonl" if report_format == "table" else report_format)


def _emit(records: list[dict], output_format: str, make_table) -> None:
    """--output-format: a rich table (auto on a terminal), JSON lines or one JSON array."""
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    if report_format != "table":
        print_report_records([_json_safe(record) for record in records], report_format)
    else:
        from rich.console import Console

        Console().print(make_table())


# ---------------------------------------------------------------- eval beir

@app.command("beir")
@boundary("eval beir")
def beir(
        dataset: Annotated[str, typer.Argument(
            help="A BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv (gzip ok).",
            metavar="DIR")],
        model: options.Model = None,
        split: options.Split = "test",
        query_prompt: options.QueryPrompt = None,
        query_prompt_name: options.QueryPromptName = None,
        doc_prompt: options.DocPrompt = None,
        doc_prompt_name: options.DocPromptName = None,
        layers: options.Layers = None,
        dim: options.Dim = None,
        pooling: options.Pooling = None,
        max_length: options.MaxLength = None,
        chunk_tokens: options.ChunkTokens = None,
        chunk_overlap: options.ChunkOverlap = 0,
        context_tokens: options.ContextTokens = None,
        context_template: options.ContextTemplate = None,
        late_chunking: options.LateChunking = False,
        aggregate: options.Aggregate = None,
        sweep: Annotated[Optional[List[str]], typer.Option(
            "--grid", help="A 2D Matryoshka table in one run: layers=2,4,6 and/or "
                            "dims=64,128,384 (repeat it, or give both in one value); one "
                            "forward pass per layer count, dims truncate its vectors. A row "
                            "per cell: nDCG@10 and the seconds per 1k documents embedded.",
            metavar="KEY=N,N", show_default=False)] = None,
        k: options.Cutoffs = None,
        old_k: options.CutoffsK = None,
        metrics: options.Metrics = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        exact: options.alias(bool, "--exact", "no flag (exact search is the default)", None)
        = False,
        index_dtype: options.IndexDtype = None,
        ef: options.Ef = None,
        cache: options.Cache = None,
        save_run: Annotated[Optional[str], typer.Option(
            "--save-run", help="Also write the top-1000 run here as a TREC run file (for "
                               "`eval retrieval` comparisons).", metavar="PATH")] = None,
        per_query: options.PerQuery = False,
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        progress: options.Progress = False,
        quiet: options.Quiet = False):
    """Embed a BEIR dataset's corpus (title + " " + text, as MTEB) and the split's queries,
    search exactly by cosine (numpy, corpus in blocks with a running top-k per query: memory
    stays bounded), and score the top max(k) hits like MTEB (nDCG@10 is its main score).
    Texts longer than the model's window are truncated, as MTEB does, and counted on stderr.
    --index-dtype searches a temporary HNSW index instead, to see what an index costs.
    --chunk-tokens splits each document into chunks (plain, situated with --context-tokens,
    or --late-chunking), searches the chunks exactly and scores each document by the max (or
    --aggregate sum|mean) of its chunks' scores (LongEmbed's setting).

    \b
    Example:
      vecpipe eval beir ../shared/data/nfcorpus
      vecpipe eval beir nfcorpus --index-dtype i8 --save-run i8.trec
      vecpipe eval beir scifact -m intfloat/e5-small-v2 --query-prompt 'query: ' \\
          --doc-prompt 'passage: '
      vecpipe eval beir nfcorpus --grid 'layers=2,4,6 dims=64,128,384'
      vecpipe eval beir nfcorpus --chunk-tokens 128 --late-chunking --aggregate max
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    import functools

    from vecpipe.cli import console
    from vecpipe.cli.models import load_model
    from vecpipe.core import retrieval_metrics as m
    from vecpipe.core.space import role_prompt
    from vecpipe.formats.beir import beir_files, beir_qrels
    from vecpipe.formats.errors import UsageError

    options.show_progress(progress)
    ks, names = m.parse_ks(k, m.MTEB_KS), m.parse_metrics(metrics)
    thresholds = _parse_fail_under(fail_under, ks, names)
    if save_mteb and m.MAIN_METRIC not in [m.metric_key(n, k) for n in names for k in ks]:
        raise UsageError("--save-mteb needs the task's main score: keep nDCG@10 in --cutoffs "
                         "and --metrics")
    _check_search_options(index_dtype, ef)
    index_dtype = options.index_dtype(index_dtype, "--index-dtype")
    chunking = options.chunking(chunk_tokens, chunk_overlap, context_tokens,
                                options.unescaped(context_template), late_chunking)
    how = _chunk_aggregate(aggregate, chunking, index_dtype or sweep)
    files = beir_files(dataset, split)
    qrels = beir_qrels(files.qrels)
    queries = _judged_queries(files.queries, qrels)
    started = time.perf_counter()
    load = functools.partial(load_model, model, device=device,
                             trust_remote_code=trust_remote_code, pooling=pooling,
                             max_length=max_length)
    loaded = load(layers=layers)
    query_prompt = role_prompt(loaded, "query", query_prompt, query_prompt_name)
    doc_prompt = role_prompt(loaded, "doc", doc_prompt, doc_prompt_name)
    if sweep:
        _check_sweep_options(layers, dim, index_dtype, save_run, per_query, fail_under)
        cells = _sweep_cells(files, queries, qrels, load, (query_prompt, doc_prompt),
                             _parse_sweep(sweep, loaded), (ks, names, batch_size, cache))
        return _emit(cells, output_format, lambda: _sweep_table(cells))
    _check_fits(dim, loaded)
    _check_chunks_fit(chunking, loaded, doc_prompt or "")
    with _Encoder(loaded, batch_size, cache, dim) as encoder:
        query_vectors = encoder(list(queries.values()), query_prompt or "", "queries")
        if chunking is None:
            top, doc_ids, corpus_seconds = _search_corpus(
                files.corpus, encoder, query_vectors, max(ks), doc_prompt or "", index_dtype,
                ef, loaded.name)
        else:
            top, doc_ids, corpus_seconds, chunk_count = _search_chunked_corpus(
                files.corpus, encoder, query_vectors, max(ks), doc_prompt or "", chunking, how)
    run = {qid: dict(zip(doc_ids.take(rows).to_pylist(), map(float, scores)))
           for qid, rows, scores in zip(queries, *top)}
    if save_run:
        _save_run(save_run, queries, doc_ids, top)
    evaluation = m.evaluate(qrels, run, ks, names)
    seconds = time.perf_counter() - started
    cached = f" ({encoder.hits} texts from the cache)" if cache else ""
    console.info(f"{len(doc_ids)} documents embedded in {corpus_seconds:.1f} s "
                 f"({len(doc_ids) / max(corpus_seconds, 1e-9):.0f}/s), {len(queries)} queries"
                 f"{cached}; {seconds:.1f} s in all")
    encoder.report_truncated()
    record = {"dataset": dataset, "split": split, "model": loaded.name,
              "search": f"hnsw-{index_dtype}" if index_dtype else "exact",
              "corpus": len(doc_ids), "queries": evaluation.queries, **evaluation.means}
    record.update({key: value for key, value in (("layers", layers), ("dim", dim),
                                                 ("pooling", pooling),
                                                 ("max_length", max_length)) if value is not None})
    if chunking is not None:
        record.update(chunking=chunking.describe(), aggregate=how, chunks=chunk_count)
    if m.MAIN_METRIC in evaluation.means:
        record["main_score"] = evaluation.means[m.MAIN_METRIC]
    record["seconds"] = round(seconds, 3)
    record["embed_seconds"] = round(corpus_seconds, 3)  # the corpus's share
    label = f"{os.path.basename(os.path.normpath(dataset))} ({split}) · {loaded.name}"
    emit = (lambda: _emit_per_query(_per_query_records([(dataset, evaluation)]), output_format)
            ) if per_query else (lambda: _emit([record], output_format, lambda: _retrieval_table(
                [record | {"run": label}], ks, names)))
    units = None
    if m.MAIN_METRIC in evaluation.means:
        units = [scores[m.MAIN_METRIC] for _, scores in sorted(evaluation.per_query.items())]
    _finish(record, emit, thresholds, mteb_file, [dataset], _model_identity(loaded), units,
            split)


def _chunk_aggregate(aggregate, chunking, other_search) -> str | None:
    """--aggregate's HOW (or parent_id=HOW), max by default when chunking."""
    from vecpipe.core.chunking import AGGREGATES
    from vecpipe.formats.errors import UsageError

    if chunking is None:
        if aggregate is not None:
            raise UsageError("--aggregate needs --chunk-tokens (documents are scored whole "
                             "without chunks)")
        return None
    if other_search:
        raise UsageError("--chunk-tokens searches the chunks exactly: leave out --index-dtype "
                         "and --grid")
    field, _, how = (aggregate or "max").rpartition("=")
    if field not in ("", "parent_id") or how not in AGGREGATES:
        raise UsageError(f"bad --aggregate {aggregate!r}: use {'|'.join(AGGREGATES)}")
    return how


def _check_chunks_fit(chunking, loaded, doc_prompt: str) -> None:
    """embed's checks of the chunking against the model, worded with the options."""
    from vecpipe.core.embedding import Plan, check_fits
    from vecpipe.formats.errors import ParameterError

    if chunking is None:
        return
    plan = Plan(chunk_tokens=chunking.tokens, chunk_overlap=chunking.overlap,
                context_tokens=chunking.context_tokens, context_template=chunking.template,
                late_chunking=chunking.late, prompt=doc_prompt)
    try:
        check_fits(plan, loaded)
    except ParameterError as err:
        raise options.as_option_error(err) from None


def _check_search_options(index_dtype, ef) -> None:
    from vecpipe.formats.errors import UsageError

    if ef is not None and not index_dtype:
        raise UsageError("--ef applies to --index-dtype searches only")


def _check_fits(dim, loaded) -> None:
    from vecpipe.formats.errors import UsageError

    if dim is not None and dim > loaded.dim:
        raise UsageError(f"--dim {dim} exceeds the model's {loaded.dim} dimensions")


def truncated(vectors, dim: int | None):
    """The first `dim` dimensions of unit vectors, re-normalised (None: as they are)."""
    import numpy as np

    if dim is None or dim >= vectors.shape[1]:
        return vectors
    head = np.ascontiguousarray(vectors[:, :dim])
    head /= np.maximum(np.linalg.norm(head, axis=1, keepdims=True), np.float32(1e-12))
    return head


# ---- eval beir --grid: a 2D Matryoshka table (Starbucks), a row per (layers, dim) cell

def _check_sweep_options(layers, dim, index_dtype, save_run, per_query, fail_under) -> None:
    from vecpipe.formats.errors import UsageError

    given = [flag for flag, value in (("--layers", layers), ("--dim", dim),
                                      ("--index-dtype", index_dtype), ("--save-run", save_run),
                                      ("--per-query", per_query), ("--fail-under", fail_under))
             if value]
    if given:
        raise UsageError(f"--grid makes its own cells by exact search: leave out {given[0]}",
                         hint="name them in --grid layers=...,... dims=...,...")


def _parse_sweep(values: list, loaded) -> dict:
    """{"layers": [...], "dims": [...]} from `layers=2,4,6 dims=64,128` (either may be left
    out: all layers, the full dimension)."""
    from vecpipe.formats.errors import UsageError

    grid = {"layers": [loaded.num_layers], "dims": [loaded.dim]}
    for item in " ".join(values).split():
        key, _, numbers = item.partition("=")
        key = {"dim": "dims", "layer": "layers"}.get(key, key)
        try:
            parsed = [int(n) for n in numbers.split(",")]
        except ValueError:
            parsed = []
        if key not in grid or not parsed or min(parsed) < 1:
            raise UsageError(f"--grid {item!r}: use layers=N,N,... or dims=N,N,...")
        grid[key] = sorted(set(parsed))
    if max(grid["dims"]) > loaded.dim:
        raise UsageError(f"--grid dims {max(grid['dims'])} exceeds the model's {loaded.dim} "
                         "dimensions")
    return grid


def _sweep_cells(files, queries, qrels, load, prompts, grid, settings) -> list:
    """One record per (layers, dim): one forward pass per layer count, the dims truncations
    of its vectors, re-normalised (as --layers with --dim would make them)."""
    from vecpipe.cli import console
    from vecpipe.core import retrieval_metrics as m

    ks, names, batch_size, cache = settings
    cells = []
    for layers in grid["layers"]:
        loaded = load(layers=layers)
        with _Encoder(loaded, batch_size, cache) as encoder:
            full = encoder(list(queries.values()), prompts[0], "queries")
            tops, doc_ids, seconds = _search_corpus(
                files.corpus, encoder, {dim: truncated(full, dim) for dim in grid["dims"]},
                max(ks), prompts[1], None, None, loaded.name)
        console.info(f"layers {layers}: {len(doc_ids)} documents embedded in {seconds:.1f} s")
        for dim in grid["dims"]:
            means = m.evaluate(qrels, _run_of(queries, doc_ids, tops[dim]), ks, names).means
            cells.append({"layers": layers, "dim": dim, "main_score": means.get(m.MAIN_METRIC),
                          "seconds_per_1k_docs": round(seconds / len(doc_ids) * 1000, 3),
                          "model": loaded.name, **means})
    return cells


def _run_of(queries: dict, doc_ids, top) -> dict:
    return {qid: dict(zip(doc_ids.take(rows).to_pylist(), map(float, scores)))
            for qid, rows, scores in zip(queries, *top)}


def _sweep_table(cells):
    from rich.table import Table

    table = Table(title=f"{cells[0]['model']}: layers x dims")
    for name in ("layers", "dim", "nDCG@10", "s / 1k docs"):
        table.add_column(name, justify="right")
    for cell in cells:
        score = "" if cell["main_score"] is None else f"{cell['main_score']:.4f}"
        table.add_row(str(cell["layers"]), str(cell["dim"]), score,
                      f"{cell['seconds_per_1k_docs']:.2f}")
    return table


class _DimSearches:
    """Exact searches of the same vectors truncated to several dims ({dim: query vectors})."""

    def __init__(self, queries: dict, depth: int):
        from vecpipe.core.vectors import ExactSearch

        self.searches = {dim: ExactSearch(vectors, depth, "ip", _QUERY_BLOCK)
                         for dim, vectors in queries.items()}

    def add(self, vectors, first_row: int) -> None:
        for dim, search in self.searches.items():
            search.add(truncated(vectors, dim), first_row)

    def hits(self) -> dict:
        return {dim: search.hits() for dim, search in self.searches.items()}


def _judged_queries(path: str, qrels: dict) -> dict:
    """The texts of the queries the split judges, in qrels order (MTEB drops the others)."""
    from vecpipe.cli import console
    from vecpipe.formats.beir import read_queries
    from vecpipe.formats.errors import DataError

    texts = read_queries(path)
    judged = {qid: texts[qid] for qid in qrels if qid in texts}
    if len(judged) < len(qrels):
        console.warn(f"{len(qrels) - len(judged)} judged queries are not in {path}; left out")
    if not judged:
        raise DataError("no judged query found", source=path)
    return judged


_CORPUS_BLOCK = 8192   # documents embedded and searched at a time
_QUERY_BLOCK = 2048    # queries scored at a time: at most 2048 x 8192 float32 scores (64 MiB)
_BAR_BATCHES = 4       # model batches per move of the corpus bar (seconds on a CPU)


class _Encoder:
    """encoder(texts, prompt, role) -> unit vectors, through the embedding cache when there is
    one (keyed by the model's vector_settings, as `vecpipe embed` keys it: both share
    vectors); counts, per role, the texts embedded and those the model's window truncated."""

    def __init__(self, loaded, batch_size: int, folder: str | None, dim: int | None = None):
        self.loaded, self.batch_size, self.folder = loaded, batch_size, folder
        self.dim = dim  # the first `dim` dimensions, re-normalised (the cache keeps all)
        self.caches: dict = {}
        self.hits = 0
        self.embedded = {"documents": 0, "queries": 0}
        self.truncated = {"documents": 0, "queries": 0}

    def __call__(self, texts: list, prompt: str, role: str = "documents", progress=None):
        """`progress(n)`: called as each n more texts are embedded (cache hits are not)."""
        if self.folder is None:
            return truncated(self._encode(texts, prompt, role, progress), self.dim)
        cache = self._cache(prompt)
        before = cache.hits
        vectors = cache.encode(texts, lambda missed: self._encode(missed, prompt, role,
                                                                  progress))
        self.hits += cache.hits - before
        return truncated(vectors, self.dim)

    def _encode(self, texts: list, prompt: str, role: str, progress=None):
        self.embedded[role] += len(texts)
        self.truncated[role] += self._count_truncated(texts, prompt)
        if progress is None:
            return self.loaded.encode(texts, self.batch_size, prompt)
        return self._encode_in_pieces(texts, prompt, progress)

    def _encode_in_pieces(self, texts: list, prompt: str, progress):
        """The vectors of one encode call, made a few model batches at a time to report
        progress: texts sorted by length first, as encode sorts them, so the batches (and
        their padding) are the ones a single call makes."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        piece = self.batch_size * _BAR_BATCHES
        vectors = np.empty((len(texts), self.loaded.dim), dtype=np.float32)
        for start in range(0, len(order), piece):
            rows = order[start:start + piece]
            vectors[rows] = self.loaded.encode([texts[i] for i in rows], self.batch_size,
                                               prompt)
            progress(len(rows))
        return vectors

    def _count_truncated(self, texts: list, prompt: str) -> int:
        """What `embed` counts, with the model's own count_truncated (a second tokenization:
        a fraction of the model's time)."""
        if self.loaded.is_fake or not self.loaded.max_length:
            return 0
        count = 0
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            count += self.loaded.count_truncated(batch, self.loaded.tokenize(batch, prompt),
                                                 prompt)
        return count

    def report_truncated(self) -> None:
        from vecpipe.cli import console

        if any(self.truncated.values()):
            console.warn(f"{self.truncated['documents']} of {self.embedded['documents']} "
                         f"documents and {self.truncated['queries']} of "
                         f"{self.embedded['queries']} queries were longer than the model's "
                         f"{self.loaded.max_length}-token window and were truncated (scored "
                         "truncated, as MTEB does)")

    def _cache(self, prompt: str):
        from vecpipe.core.cache import CacheFileError, EmbeddingCache, cache_space

        if prompt not in self.caches:
            settings = self.loaded.vector_settings(prompt)
            try:
                self.caches[prompt] = EmbeddingCache(self.folder, cache_space(settings),
                                                     self.loaded.dim, description=settings)
            except CacheFileError as err:
                err.hint = "point --cache at another folder, or delete this file"
                raise
        return self.caches[prompt]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for cache in self.caches.values():
            cache.close()


def _search_corpus(path, encode, query_vectors, depth, prompt, index_dtype, ef, model_name):
    """Embed the corpus block by block and find each query's top `depth` by cosine: exactly
    (running top-k, bounded memory) or, with `index_dtype`, through a temporary HNSW index.
    `query_vectors` a dict {dim: vectors}: exact searches of the vectors cut to each dim.

    Returns ((rows, scores) per query best first (a dict by dim for a dict of queries), doc ids
    as a pyarrow array, seconds spent embedding)."""
    import tempfile

    from vecpipe.core.vectors import ExactSearch

    with tempfile.TemporaryDirectory(prefix="vecpipe-eval-") as tmp:
        if isinstance(query_vectors, dict):
            search = _DimSearches(query_vectors, depth)
        elif index_dtype:
            search = _IndexSearch(query_vectors, depth, index_dtype, ef, model_name, tmp)
        else:
            search = ExactSearch(query_vectors, depth, "ip", _QUERY_BLOCK)

        def add(ids, texts, offset, bar) -> float:
            started = time.perf_counter()
            doc_vectors = encode(texts, prompt, progress=bar.update)
            seconds = time.perf_counter() - started
            if index_dtype:
                search.add(doc_vectors, offset, ids)
            else:
                search.add(doc_vectors, offset)
            return seconds

        doc_ids, embed_seconds = _scan_corpus(path, add)
        hits = search.hits()
    tops = {dim: _found(h) for dim, h in hits.items()} if isinstance(hits, dict) \
        else _found(hits)
    return tops, doc_ids, embed_seconds


def _scan_corpus(path, add):
    """Read the corpus block by block, each block handed to `add(ids, texts, first_row, bar)`,
    which embeds and searches it and returns its seconds embedding. Returns (the doc ids as a
    pyarrow array, the seconds embedding)."""
    import pyarrow as pa

    from vecpipe.cli import console
    from vecpipe.core import notices
    from vecpipe.formats.beir import corpus_batches
    from vecpipe.formats.errors import DataError

    id_chunks, offset, embed_seconds = [], 0, 0.0
    with console.progress(desc="corpus", unit="doc",
                          count=notices.input_records([path])) as bar:
        for ids, texts in corpus_batches(path, _CORPUS_BLOCK):
            if not texts:
                continue
            embed_seconds += add(ids, texts, offset, bar)
            id_chunks.append(ids)
            offset += len(ids)
            if offset > bar.n:  # the block's cache hits
                bar.update(offset - bar.n)
    if not id_chunks:
        raise DataError("the corpus is empty", source=path)
    return pa.concat_arrays(id_chunks), embed_seconds


class _ChunkBlock:
    """One corpus block's chunk vectors and each chunk's document (row in the block)."""

    def __init__(self, vectors, parents):
        self.vectors, self.parents = vectors, parents


def _search_chunked_corpus(path, encode, query_vectors, depth, prompt, chunking, how):
    """_search_corpus over chunks: each block's documents split into chunks (plain, situated
    or late), the chunks scored exactly and each document scored by `how` of its chunks'
    scores (a document's chunks are all in its block, so the top-k stays exact).

    Returns ((rows, scores) per query, doc ids, seconds embedding, chunk count)."""
    import numpy as np

    from vecpipe.core.chunking import aggregate
    from vecpipe.core.vectors import ExactSearch

    search = ExactSearch(query_vectors, depth, query_block=_QUERY_BLOCK,
                         score=lambda queries, block: aggregate(queries @ block.vectors.T,
                                                                block.parents, how))
    chunk_count = 0

    def add(ids, texts, offset, bar) -> float:
        nonlocal chunk_count
        started = time.perf_counter()
        vectors, parents = _chunk_vectors(encode, texts, prompt, chunking, bar)
        seconds = time.perf_counter() - started
        search.add(_ChunkBlock(vectors, np.asarray(parents)), offset)
        chunk_count += len(parents)
        return seconds

    doc_ids, embed_seconds = _scan_corpus(path, add)
    return _found(search.hits()), doc_ids, embed_seconds, chunk_count


def _chunk_vectors(encode, texts, prompt, chunking, bar):
    """(unit vectors of every chunk of `texts`, each chunk's text index). Plain and situated
    chunks go through `encode` (and its cache); late chunks are pooled here, a model batch
    of documents at a time."""
    import numpy as np

    from vecpipe.core.chunking import LateDocument, finish, late_chunk_vectors

    model = encode.loaded
    spans = model.token_spans(texts)
    chunks = chunking.split(spans, [len(text) for text in texts])
    parents = [c.row for c in chunks]
    if not chunking.late:
        embedded = [chunking.embedded_text(texts[c.row], spans[c.row], c) for c in chunks]
        return encode(embedded, prompt), parents
    wanted = [[] for _ in texts]
    for c in chunks:
        wanted[c.row].append((c.first_token, c.end_token))
    by_text = [None] * len(texts)
    longest_first = sorted(range(len(texts)), key=lambda row: -len(texts[row]))
    for start in range(0, len(texts), encode.batch_size):
        rows = longest_first[start:start + encode.batch_size]
        pooled = late_chunk_vectors(model, [LateDocument(texts[r], wanted[r]) for r in rows],
                                    prompt)
        cuts = np.cumsum([len(wanted[r]) for r in rows])[:-1]
        for row, vectors in zip(rows, np.split(pooled, cuts)):
            by_text[row] = vectors
        bar.update(len(rows))
    vectors = finish(np.concatenate(by_text), True, encode.dim)
    encode.embedded["documents"] += len(texts)
    return vectors, parents


def _found(hits):
    """(rows, scores) per query, the empty slots (fewer documents than the depth) left out."""
    found = [r >= 0 for r in hits.rows]
    return ([r[ok] for r, ok in zip(hits.rows, found)],
            [s[ok] for s, ok in zip(hits.scores, found)])


class _IndexSearch:
    """ANN search through a temporary vecpipe index of `dtype` (f32|f16|bf16|i8|b1), built as
    `vecpipe index --dtype` builds it: i8/b1 codes from a codec fitted on the first block."""

    def __init__(self, queries, depth: int, dtype: str, ef, model: str, tmp: str):
        self.queries, self.depth, self.dtype, self.ef, self.model = \
            queries, depth, dtype, ef, model
        self.path = os.path.join(tmp, "index")
        self.builder = self.codec = None

    def _start(self, vectors) -> None:
        from vecpipe.core.codec import FITTED_INDEX_DTYPES, Codec
        from vecpipe.core.index_build import IndexBuilder
        from vecpipe.core.index_spec import IndexSpec

        target = FITTED_INDEX_DTYPES.get(self.dtype)
        metadata = {"model": self.model, "normalized": "true"}
        if target:
            self.codec = Codec.fit(vectors, to=target, normalize=True, model=self.model)
            metadata.update(self.codec.metadata())
        metric = "hamming" if self.dtype == "b1" else "cos"
        spec = IndexSpec(dim=vectors.shape[1], metric=metric, dtype=self.dtype,
                         score_metric="cos", metadata=metadata)
        self.builder = IndexBuilder(self.path, spec)

    def add(self, vectors, first_row: int, ids) -> None:
        import pyarrow as pa

        from vecpipe.core.index_format import to_index_codes

        if self.builder is None:
            self._start(vectors)
        if self.codec is not None:
            vectors = to_index_codes(self.codec, self.codec.encode(vectors))
        self.builder.add(ids.to_pylist(), vectors, pa.table({"id": ids}),
                         first_record=first_row + 1)

    def hits(self):
        from vecpipe.core.index_open import open_index

        self.builder.commit()
        return open_index(self.path).searcher(self.depth, ef=self.ef).search(self.queries)


def _save_run(path: str, queries: dict, doc_ids, top) -> None:
    from vecpipe.formats.trec import write_trec_run
    from vecpipe.formats.writers import text_output

    with text_output(path) as sink:
        write_trec_run(((qid, doc_ids.take(rows).to_pylist(), scores)
                        for qid, rows, scores in zip(queries, *top)), sink)


# ---------------------------------------------------------------- eval sts

_STS_SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


def _pair_and_score(value: str) -> dict:
    """The old `eval sts --fields A,B,SCORE` as --pair A,B --score SCORE."""
    first, second, score = _sts_fields(value)
    return {"pair": f"{first},{second}", "score": score}


@app.command("sts")
@boundary("eval sts")
def sts(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Pairs with a gold score (any record format; - for stdin, the default).",
            show_default=False, metavar="PAIRS")] = None,
        pair: options.Pair = "sentence1,sentence2",
        score: options.Score = "score",
        old_fields: options.alias(Optional[str], "--fields", "--pair A,B --score S", None,
                                  _pair_and_score) = None,
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Correlate similarity with gold scores on sentence pairs: Pearson and Spearman for cosine,
    dot, euclidean and manhattan (MTEB's STS conventions: a distance d scores as -d; vectors
    as the model returns them; cosine_spearman is the main score). Reads all pairs.

    \b
    Example:
      vecpipe eval sts stsb-test.jsonl
      vecpipe eval sts pairs.parquet --pair embedding_a,embedding_b --score label
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    from vecpipe.core import vector_stats as m
    from vecpipe.core.space import check_same_space
    from vecpipe.formats.errors import UsageError
    from vecpipe.formats.readers import read_table

    first, second, score_field = _sts_fields(f"{pair},{score}")
    thresholds = _parse_fail_under(fail_under)
    known = {f"{name}_{corr}" for name in _STS_SIMILARITIES for corr in ("pearson", "spearman")}
    unknown = [key for key, _ in thresholds if key not in known | {"main_score"}]
    if unknown:
        raise UsageError(f"--fail-under: no metric {unknown[0]!r}; use e.g. cosine_spearman")
    table = read_table(inputs, input_format, check=check_same_space)
    source = ", ".join(inputs or ["<stdin>"])
    gold, a, b, model_id = _sts_inputs(table, source, (first, second, score_field), model,
                                       prompt or "", batch_size, device, trust_remote_code)
    record = _report(model_id, pairs=len(gold))
    similarities = m.paired_similarities(a, b)
    for name, similarity in similarities.items():
        record[f"{name}_pearson"] = m.pearson(gold, similarity)
        record[f"{name}_spearman"] = m.spearman(gold, similarity)
    record["main_score"] = record["cosine_spearman"]
    cosine = similarities["cosine"]
    _finish(record, lambda: _emit([record], output_format, lambda: _sts_table(record)),
            thresholds, mteb_file, inputs, model_id,
            Units(lambda rows: m.spearman(gold[rows], cosine[rows]), len(gold)))



def _report(model, **counts) -> dict:
    """A task report's first keys: what was evaluated, then the model (a ModelIdentity) when
    one made the vectors."""
    return {**counts, **({"model": model.name} if model else {})}


@dataclass
class _MtebFile:
    """--save-mteb and the task's identity in the file; `started` times the evaluation."""
    directory: str | None
    task: str | None
    revision: str | None
    languages: str | None
    started: float = field(default_factory=time.perf_counter)

    def save(self, report: dict, inputs, model, split: str = "test") -> None:
        """Write the report as MTEB's TaskResult (nothing without --save-mteb)."""
        from vecpipe.cli import console
        from vecpipe.core import mteb_results
        from vecpipe.formats.errors import UsageError

        if not self.directory:
            return
        if model is None:
            raise UsageError("--save-mteb needs the model: embed text fields with -m, or give "
                             "vectors whose metadata names their model")
        if "main_score" not in report:
            raise UsageError("--save-mteb needs the task's main score: keep nDCG@10 in "
                             "--cutoffs and --metrics")
        task = mteb_results.TaskIdentity(self.task or _input_name(inputs),
                                         self.revision or _inputs_revision(inputs), split,
                                         tuple(_split_list(self.languages))
                                         or mteb_results.UNDETERMINED)
        seconds = time.perf_counter() - self.started
        path = mteb_results.save(self.directory, model, task, report, round(seconds, 3))
        console.info(f"MTEB result: {path}")


_SUITE = contextvars.ContextVar("eval_suite_reports", default=None)
# inside `eval suite`: (model, prompt, text) -> vector, so a suite embeds each text once a model
_SUITE_VECTORS = contextvars.ContextVar("eval_suite_vectors", default=None)


def _finish(record: dict, emit, thresholds, mteb_file: _MtebFile, inputs, model, units=None,
            split: str = "test") -> None:
    """A task's end: the MTEB file, then the report and --fail-under; inside `eval suite`
    the record and its units (per-query or per-experiment main scores, or a function of a row
    selection giving the main score) go to the suite instead."""
    mteb_file.save(record, inputs, model, split)
    reports = _SUITE.get()
    if reports is not None:
        reports.append((record, units))
        return
    emit()
    _check_fail_under([record], thresholds)


def _input_name(inputs) -> str:
    """A task name from the inputs: the first file's or folder's name without extensions."""
    paths = [p for p in (inputs or []) if p != "-"]
    if not paths:
        return "stdin"
    return os.path.basename(os.path.normpath(paths[0])).split(".")[0] or "stdin"


def _inputs_revision(inputs) -> str:
    """The inputs' content as a dataset revision (MTEB's unknown revision for stdin)."""
    import hashlib

    from vecpipe.core.mteb_results import NO_REVISION
    from vecpipe.formats.parts import content_facts

    paths = [p for p in (inputs or []) if p != "-"]
    if not paths or len(paths) < len(inputs or []):
        return NO_REVISION
    digest = hashlib.sha256("".join(content_facts(p)["sha256"] for p in paths).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]

def _sts_fields(text: str) -> tuple[str, str, str]:
    from vecpipe.formats.errors import UsageError

    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"bad --pair/--score {text!r}; give --pair A,B and --score S")
    return parts[0], parts[1], parts[2]


def _sts_inputs(table, source, fields, model, prompt, batch_size, device, trust_remote_code):
    """(gold scores, vectors of side A, of side B, model name or None) from the pairs table."""
    import numpy as np

    _check_fields(table, source, fields, "no pairs", "name the fields with --pair A,B --score S")
    gold = _numbers(table, fields[2], source)
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model = _field_vectors(table, source, fields[:2], embedder, prompt)
    return gold.astype(np.float64), vectors[fields[0]], vectors[fields[1]], model


# ---------------------------------------------------------------- record fields -> vectors

class _Embedder:
    """-m's model for the text fields of eval's labelled-data tasks, loaded on first use."""

    def __init__(self, model, batch_size, device, trust_remote_code):
        self.spec, self.batch_size = model, batch_size
        self.device, self.trust_remote_code = device, trust_remote_code
        self.loaded = None

    def encode(self, texts: list, prompt: str):
        if self.loaded is None:
            from vecpipe.cli.models import load_model

            self.loaded = load_model(self.spec, device=self.device,
                                     trust_remote_code=self.trust_remote_code)
        vectors = _SUITE_VECTORS.get()
        if vectors is None:
            return self.loaded.encode(texts, self.batch_size, prompt or "", normalize=False)
        import numpy as np

        key = (self.spec, self.loaded.sha, prompt or "")
        missing = [text for text in dict.fromkeys(texts) if (key, text) not in vectors]
        if missing:
            encoded = self.loaded.encode(missing, self.batch_size, prompt or "", normalize=False)
            vectors.update({(key, text): vector for text, vector in zip(missing, encoded)})
        return np.stack([vectors[key, text] for text in texts])

    def model(self):
        """The loaded model's identity (None before any text was embedded)."""
        return None if self.loaded is None else _model_identity(self.loaded)


def _model_identity(loaded):
    from vecpipe.core.mteb_results import NO_REVISION, ModelIdentity

    return ModelIdentity(loaded.name, loaded.sha or NO_REVISION, loaded.dim, loaded.max_length)


def _check_fields(table, source, fields, empty: str, hint: str) -> None:
    """Records there, every field present and not null (the first null record named)."""
    import numpy as np

    from vecpipe.formats.errors import DataError

    if table is None or table.num_rows == 0:
        raise DataError(empty, source=source)
    missing = [f for f in fields if f not in table.schema.names]
    if missing:
        raise DataError(f"no field {missing[0]!r}; fields are {', '.join(table.schema.names)}",
                        source=source, hint=hint)
    for field in fields:
        column = table.column(field)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise DataError(f"field {field!r} is null", source=source, record=row)


def _numbers(table, field: str, source: str):
    import pyarrow as pa

    from vecpipe.formats.errors import DataError

    column = table.column(field)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)):
        raise DataError(f"field {field!r} holds {column.type}, expected numbers", source=source)
    return column.to_numpy()


def _kind(type_) -> str | None:
    """text | texts (a list of texts) | vector | vectors (a list of vectors) | None."""
    import pyarrow as pa

    def is_text(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_list(t):
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    def is_number(t):
        return pa.types.is_integer(t) or pa.types.is_floating(t)

    if is_text(type_):
        return "text"
    if is_list(type_):
        inner = type_.value_type
        if is_text(inner):
            return "texts"
        if is_number(inner):
            return "vector"
        if is_list(inner) and is_number(inner.value_type):
            return "vectors"
    return None


def _field_vectors(table, source, fields, embedder: _Embedder, prompts=None):
    """The vectors of record fields: a text field embedded with -m, a vector field used as it is
    (rows x dim); a list of texts or of vectors gives each record its own (items x dim) array.
    All fields text or all vectors, one dimension. `prompts`: one for all, or by field.
    Returns ({field: vectors}, model name: the one -m loaded, else the vectors' metadata)."""
    import numpy as np
    import pyarrow.compute as pc

    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, VecpipeError

    kinds = {}
    for field in fields:
        kinds[field] = _kind(table.schema.field(field).type)
        if kinds[field] is None:
            raise DataError(f"field {field!r} holds {table.schema.field(field).type}, expected "
                            "text or vectors (or lists of them)", source=source)
    if len({kind.startswith("text") for kind in kinds.values()}) > 1:
        listed = " and ".join(repr(f) for f in fields)
        raise DataError(f"fields {listed} must all be text or all vectors", source=source)
    out = {}
    for field in fields:
        column = table.column(field).combine_chunks()
        kind = kinds[field]
        prompt = prompts.get(field, "") if isinstance(prompts, dict) else (prompts or "")
        if kind in ("texts", "vectors"):
            flat = column.flatten()
            if flat.null_count:
                parents = pc.list_parent_indices(column).to_numpy()
                row = int(parents[np.flatnonzero(flat.is_null().to_numpy(
                    zero_copy_only=False))[0]]) + 1
                raise DataError(f"field {field!r} holds a null item", source=source, record=row)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        else:
            flat = column
        try:
            if kind.startswith("text"):
                texts = flat.to_pylist()
                vectors = embedder.encode(texts, prompt) if texts else np.zeros((0, 0))
            else:
                vectors = names.vectors_to_numpy(flat, field)
        except VecpipeError as err:
            if kind == "vectors" and err.record is not None:  # an item -> its record
                err.record = int(pc.list_parent_indices(column).to_numpy()[err.record - 1]) + 1
            raise err.located(source)
        out[field] = (np.split(vectors, np.cumsum(lengths)[:-1]) if kind in ("texts", "vectors")
                      else vectors)
    dims = {field: (v.shape[1] if isinstance(v, np.ndarray) else
                    next((a.shape[1] for a in v if len(a)), None)) for field, v in out.items()}
    known = [(field, dim) for field, dim in dims.items() if dim is not None]
    other = next((item for item in known if item[1] != known[0][1]), None)
    if other is not None:
        raise DataError(f"{known[0][0]} has {known[0][1]} dimensions, {other[0]} {other[1]}",
                        source=source)
    return out, embedder.model() or _vectors_model(table)


def _vectors_model(table):
    """The model vectors' metadata names (None when it names none)."""
    from vecpipe.core.mteb_results import NO_REVISION, ModelIdentity
    from vecpipe.formats import schema as names

    meta = names.read_meta(table.schema)
    if not meta.get("model"):
        return None
    dim = int(meta["dim"]) if str(meta.get("dim", "")).isdigit() else None
    return ModelIdentity(meta["model"], meta.get("model_sha") or NO_REVISION, dim)


def _fail_under_known(specs, known, example: str):
    """--fail-under METRIC=VALUE pairs, each among the `known` metric keys (before any work)."""
    from vecpipe.formats.errors import UsageError

    thresholds = _parse_fail_under(specs)
    unknown = [key for key, _ in thresholds if key not in set(known) | {"main_score"}]
    if unknown:
        raise UsageError(f"--fail-under: no metric {unknown[0]!r}; use e.g. {example}")
    return thresholds


def _split_fields(text: str, count: int, option: str, example: str) -> list[str]:
    from vecpipe.formats.errors import UsageError

    parts = [part.strip() for part in text.split(",")]
    if len(parts) != count or not all(parts):
        raise UsageError(f"bad {option} {text!r}; give {count} comma-separated fields, e.g. "
                         f"{option} {example}")
    return parts


def _report_table(title: str, rows: list, columns: list):
    """A titled rich table: `rows` of already formatted cells under `columns`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return Group(Text(title), table)


def _titled(count: int, noun: str, record: dict) -> str:
    return f"{count} {noun}" + (f" · {record['model']}" if record.get("model") else "")


def _sts_table(record: dict):
    from rich.table import Table

    from rich.console import Group
    from rich.text import Text

    title = f"{record['pairs']} pairs" + (f" · {record['model']}" if record.get("model") else "")
    table = Table()
    for column in ("similarity", "pearson", "spearman"):
        table.add_column(column, justify="left" if column == "similarity" else "right")
    for name in _STS_SIMILARITIES:
        table.add_row(name, f"{record[f'{name}_pearson']:.5f}",
                      f"{record[f'{name}_spearman']:.5f}")
    return Group(Text(title), table)


# ---------------------------------------------------------------- eval pair-classification

def _read_records(inputs, input_format):
    from vecpipe.core.space import check_same_space
    from vecpipe.formats.readers import read_table

    return read_table(inputs, input_format, check=check_same_space), \
        ", ".join(inputs or ["<stdin>"])


@app.command("pair-classification")
@boundary("eval pair-classification")
def pair_classification(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Pairs with a 0/1 label (any record format; - for stdin, the default).",
            show_default=False, metavar="PAIRS")] = None,
        pair: options.Pair = "sentence1,sentence2",
        label: options.Label = "labels",
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Classify pairs as similar (1) or not (0) by thresholding their similarity, as MTEB's
    PairClassification: for cosine, dot, euclidean and manhattan, the best threshold's accuracy,
    the best F1 with its precision and recall (thresholds only between distinct scores, both
    reported), and average precision; then max_<metric> over the four. Main score max_ap (most
    MTEB pair-classification tasks). MTEB also reports similarity_* for the model's own
    similarity function, cosine for most models (then equal to cosine_*), left out here.
    Reads all pairs. MTEB's datasets have the fields sentence1, sentence2 and labels (the
    defaults).

    \b
    Example:
      vecpipe eval pair-classification twitter-semeval.jsonl --fail-under max_ap=0.6
      vecpipe eval pair-classification pairs.arrow --pair embedding1,embedding2 --label same
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    import numpy as np

    from vecpipe.core import task_metrics as tm
    from vecpipe.formats.errors import DataError

    first, second = _split_fields(pair, 2, "--pair", "sentence1,sentence2")
    known = [f"{name}_{metric}" for name in tm.PAIR_SIMILARITIES for metric in tm.PAIR_METRICS]
    thresholds = _fail_under_known(fail_under, known + [f"max_{m}" for m in tm.PAIR_METRICS],
                                   "max_ap")
    table, source = _read_records(inputs, input_format)
    _check_fields(table, source, [first, second, label], "no pairs",
                  "name the fields with --pair A,B --label FIELD")
    labels = _numbers(table, label, source)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DataError(f"field {label!r} holds {labels[bad[0]].item()!r}; labels are 0 or 1",
                        source=source, record=int(bad[0]) + 1)
    if len(set(labels.tolist())) < 2:
        raise DataError(f"every pair has label {int(labels[0])}; scoring needs both 0 and 1",
                        source=source)
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _field_vectors(table, source, [first, second], embedder, prompt)
    record = _report(model_id, pairs=len(labels))
    record.update(tm.pair_classification(vectors[first], vectors[second], labels))
    record["main_score"] = record["max_ap"]
    rows = [[name] + [f"{record[f'{name}_{m}']:.5f}" for m in tm.PAIR_METRICS]
            for name in tm.PAIR_SIMILARITIES]
    ranked = [scores if high else -scores for scores, high in
              tm.pair_similarities(vectors[first], vectors[second]).values()]
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["pairs"], "pairs", record), rows, ["similarity", *tm.PAIR_METRICS])),
            thresholds, mteb_file, inputs, model_id,
            Units(lambda picked: max(tm.average_precision(labels[picked], scores[picked])
                                     for scores in ranked), len(labels)))


# ---------------------------------------------------------------- eval reranking

@app.command("reranking")
@boundary("eval reranking")
def reranking(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="One record per query with its positive and negative candidates (any record "
                 "format; - for stdin, the default).", show_default=False, metavar="RECORDS")]
        = None,
        triple: Annotated[str, typer.Option(
            "--triple", help="The query field and the fields listing its positive and its "
                             "negative candidates: text (and lists of texts) are embedded "
                             "with -m, vectors (and lists of vectors) used as they are.",
            metavar="QUERY,POSITIVE,NEGATIVE")] = "query,positive,negative",
        model: options.Model = None,
        query_prompt: options.QueryPrompt = None,
        doc_prompt: options.DocPrompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Rank each query's candidates by cosine, as MTEB's Reranking tasks (a retrieval task
    over each query's own candidates, positives relevant): nDCG, MAP, MRR, recall and
    precision at MTEB's cutoffs 1,3,5,10,20,100,1000 as pytrec_eval computes them (MTEB rounds
    its means to 5 digits; these are not rounded). Main score map_at_1000 (most MTEB
    reranking tasks). Queries without a positive or without a negative are left out and
    counted, as MTEB filters them. Reads all records.

    \b
    Example:
      vecpipe eval reranking askubuntu-test.jsonl
      vecpipe eval reranking scidocs.jsonl --fail-under map@1000=0.7 --output-format json
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    from vecpipe.core import retrieval_metrics as rm
    from vecpipe.core import task_metrics as tm

    query, positive, negative = _split_fields(triple, 3, "--triple", "query,positive,negative")
    thresholds = _parse_fail_under(fail_under, tm.RERANK_KS, rm.METRICS)
    table, source = _read_records(inputs, input_format)
    _check_fields(table, source, [query, positive, negative], "no queries",
                  "name the fields with --triple QUERY,POSITIVE,NEGATIVE")
    _expect_lists(table, source, [positive, negative])
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _field_vectors(
        table, source, [query, positive, negative], embedder,
        {query: query_prompt or "", positive: doc_prompt or "", negative: doc_prompt or ""})
    try:
        evaluation, left_out = tm.reranking(vectors[query], vectors[positive],
                                            vectors[negative])
    except Exception as err:
        raise _located(err, source)
    record = _report(model_id, queries=evaluation.queries, left_out=left_out)
    record.update(evaluation.means)
    record["main_score"] = record["map_at_1000"]
    shown = (1, 10, 100, 1000)
    rows = [[_LABELS[m]] + [f"{record[rm.metric_key(m, k)]:.5f}" for k in shown]
            for m in rm.METRICS]
    units = [scores["map_at_1000"] for _, scores in sorted(evaluation.per_query.items())]
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["queries"], "queries", record)
        + (f" ({left_out} left out)" if left_out else ""), rows,
        ["metric", *(f"@{k}" for k in shown)])), thresholds, mteb_file, inputs, model_id, units)


def _expect_lists(table, source, fields) -> None:
    from vecpipe.formats.errors import DataError

    for field in fields:
        if _kind(table.schema.field(field).type) not in ("texts", "vectors"):
            raise DataError(f"field {field!r} holds {table.schema.field(field).type}, expected "
                            "a list of texts or of vectors", source=source)


def _located(err, source):
    from vecpipe.formats.errors import VecpipeError

    return err.located(source) if isinstance(err, VecpipeError) else err


# ---------------------------------------------------------------- eval bitext-mining

@app.command("bitext-mining")
@boundary("eval bitext-mining")
def bitext_mining(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Parallel pairs, one translation pair a record (any record format; - for "
                 "stdin, the default).", show_default=False, metavar="PAIRS")] = None,
        pair: options.Pair = "sentence1,sentence2",
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Mine translations, as MTEB's BitextMining: each A finds its nearest B by cosine among
    all B's; right when it is its own record's. Accuracy, and precision, recall and F1
    weighted by support (main score f1). Ties go to the first B. Reads all pairs; holds
    a block of A's against all B's at a time.

    \b
    Example:
      vecpipe eval bitext-mining tatoeba-deu-eng.jsonl
      vecpipe eval bitext-mining flores.parquet --pair deu_Latn,eng_Latn --fail-under f1=0.9
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    from vecpipe.core import task_metrics as tm

    first, second = _split_fields(pair, 2, "--pair", "sentence1,sentence2")
    thresholds = _fail_under_known(fail_under, ("accuracy", "precision", "recall", "f1"), "f1")
    table, source = _read_records(inputs, input_format)
    _check_fields(table, source, [first, second], "no pairs", "name the fields with --pair A,B")
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _field_vectors(table, source, [first, second], embedder, prompt)
    record = _report(model_id, pairs=table.num_rows)
    record.update(tm.bitext_mining(vectors[first], vectors[second]))
    record["main_score"] = record["f1"]
    metrics = ("accuracy", "precision", "recall", "f1")
    found = tm.nearest_neighbours(vectors[first], vectors[second])
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["pairs"], "pairs", record), [[m, f"{record[m]:.5f}"] for m in metrics],
        ["metric", "value"])), thresholds, mteb_file, inputs, model_id,
            Units(lambda picked: tm.weighted_scores(picked, found[picked])["f1"], len(found)))


# ---------------------------------------------------------------- eval summarization

@app.command("summarization")
@boundary("eval summarization")
def summarization(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="One record per text: its machine summaries, their gold scores and its human "
                 "summaries (any record format; - for stdin, the default).",
            show_default=False, metavar="RECORDS")] = None,
        summaries: Annotated[str, typer.Option(
            "--summaries", help="The fields listing the machine and the human (reference) "
                                "summaries: lists of texts (embedded with -m) or of vectors.",
            metavar="MACHINE,HUMAN")] = "machine_summaries,human_summaries",
        score: options.Score = "relevance",
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Score machine summaries against human ones, as MTEB's Summarization (its current
    evaluator, SummEvalSummarization.v2): a machine summary's predicted quality is its highest
    cosine (and dot) to the text's human summaries; per text, Spearman and Pearson of those
    with the gold scores, averaged over texts (main score cosine_spearman). A text whose gold,
    cosine or dot scores are all equal is left out and counted, as MTEB. Reads all records.

    \b
    Example:
      vecpipe eval summarization summeval.jsonl
      vecpipe eval summarization summ.arrow --summaries machine_vecs,human_vecs --score human
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    from vecpipe.core import task_metrics as tm
    from vecpipe.formats.errors import DataError

    machine, human = _split_fields(summaries, 2, "--summaries",
                                   "machine_summaries,human_summaries")
    keys = ("cosine_spearman", "cosine_pearson", "dot_spearman", "dot_pearson")
    thresholds = _fail_under_known(fail_under, keys, "cosine_spearman")
    table, source = _read_records(inputs, input_format)
    _check_fields(table, source, [machine, human, score], "no records",
                  "name the fields with --summaries MACHINE,HUMAN --score FIELD")
    _expect_lists(table, source, [machine, human])
    gold = table.column(score).to_pylist()
    for i, scores in enumerate(gold):
        if not isinstance(scores, list) or not all(isinstance(s, (int, float))
                                                   and not isinstance(s, bool) for s in scores):
            raise DataError(f"field {score!r} holds {scores!r}, expected a list of numbers",
                            source=source, record=i + 1)
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _field_vectors(table, source, [machine, human], embedder, prompt)
    for i, (summaries_i, humans_i, scores_i) in enumerate(zip(vectors[machine], vectors[human],
                                                              gold)):
        if len(summaries_i) != len(scores_i):
            raise DataError(f"{len(summaries_i)} machine summaries but {len(scores_i)} scores",
                            source=source, record=i + 1)
        if len(humans_i) == 0:
            raise DataError(f"field {human!r} is empty", source=source, record=i + 1)
    try:
        scores, left_out = tm.summarization(vectors[machine], vectors[human], gold)
    except Exception as err:
        raise _located(err, source)
    record = _report(model_id, texts=table.num_rows - left_out, left_out=left_out)
    record.update(scores)
    record["main_score"] = record["cosine_spearman"]
    rows = [[name, f"{record[f'{name}_pearson']:.5f}", f"{record[f'{name}_spearman']:.5f}"]
            for name in ("cosine", "dot")]
    machines, humans = vectors[machine], vectors[human]

    def score_on(picked):
        return tm.summarization([machines[i] for i in picked], [humans[i] for i in picked],
                                [gold[i] for i in picked])[0]["cosine_spearman"]

    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["texts"], "texts", record)
        + (f" ({left_out} left out)" if left_out else ""), rows,
        ["similarity", "pearson", "spearman"])), thresholds, mteb_file, inputs, model_id,
            Units(score_on, len(gold)))


# ---------------------------------------------------------------- eval classification

_CLASSIFICATION_KEYS = ("accuracy", "f1", "f1_weighted", "precision", "precision_weighted",
                        "recall", "recall_weighted", "ap", "ap_weighted")
_MULTILABEL_KEYS = ("accuracy", "lrap", "f1", "hamming")


def _record_vectors(table, source, text_fields, vector_field, embedder, prompt, hint,
                    records=None):
    """The vectors of every record: --vector-field as it is, else the --text-field(s) (joined
    with a space, empty parts skipped) embedded with -m. `records`: the input's record number
    (0-based) of each row of `table`, where the table is a selection, for error messages."""
    from vecpipe.formats.errors import VecpipeError

    try:
        return _table_vectors(table, source, text_fields, vector_field, embedder, prompt, hint)
    except VecpipeError as err:
        if records is not None and err.record is not None:
            err.record = records[err.record - 1] + 1
        raise


def _table_vectors(table, source, text_fields, vector_field, embedder, prompt, hint):
    import pyarrow as pa

    if vector_field is not None:
        vectors, model = _field_vectors(table, source, [vector_field], embedder)
        return vectors[vector_field], model
    fields = list(text_fields or ["text"])
    _check_fields(table, source, fields, "no records", hint)
    if len(fields) > 1:
        joined = [" ".join(part for part in parts if part)
                  for parts in zip(*(table.column(f).to_pylist() for f in fields))]
        table = pa.table({"text": joined})
        fields = ["text"]
    vectors, model = _field_vectors(table, source, fields, embedder, prompt)
    return vectors[fields[0]], model


@app.command("classification")
@boundary("eval classification")
def classification(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Labelled records: the test set with --train, or train and test with "
                 "--split-field (any record format; - for stdin, the default).",
            show_default=False, metavar="RECORDS")] = None,
        train: Annotated[Optional[List[str]], typer.Option(
            "--train", help="Labelled records to train the classifiers on (repeatable: read "
                            "as one); the inputs are the test set.", metavar="FILE",
            show_default=False)] = None,
        split_field: Annotated[Optional[str], typer.Option(
            "--split-field", help="Instead of --train: the field saying each record's split, "
                                  "`train` or `test` (other values are left out).",
            metavar="FIELD", show_default=False)] = None,
        label: options.Label = "label",
        text_field: options.TextField = None,
        vector_field: options.VectorField = None,
        experiments: options.Experiments = 10,
        samples_per_label: Annotated[int, typer.Option(
            "--samples-per-label", min=1, help="Training records drawn per label for each "
                                               "experiment (MTEB's default 8; its tasks "
                                               "mostly set 16 or 32).")] = 8,
        seed: options.Seed = 42,
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Train a linear probe on the embeddings, as MTEB's Classification: for each experiment,
    samples-per-label training records of every label (MTEB's seeded reshuffle), a
    scikit-learn LogisticRegression(max_iter=100, random_state=seed) fitted on their vectors,
    every test record predicted; accuracy, F1, precision and recall (macro and weighted), and
    for two labels the average precision of the predictions; the means over the experiments
    (main score accuracy). A list label is a set of labels: MTEB's MultilabelClassification,
    a 5-nearest-neighbour classifier on records drawn while one of their labels is short
    (MTEB's default_rng(seed) draw), scored by subset accuracy, label ranking average precision
    (lrap), macro F1 and the Hamming score (MTEB cuts a test set over 3000 records by
    stratified sampling first; vecpipe scores every test record). Same seed, same numbers as
    MTEB. Only the training records the experiments draw are embedded. Needs scikit-learn (pip
    install 'vecpipe[eval]'). Reads all records. Any labelled set works: e.g. MTEB's Banking77
    as two JSONL files with text and label fields (--train train.jsonl test.jsonl), or one file
    with a split field.

    \b
    Example:
      vecpipe eval classification test.jsonl --train train.jsonl --samples-per-label 32
      vecpipe eval classification all.parquet --split-field split --vector-field embedding
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    import pyarrow as pa

    from vecpipe.core import task_metrics as tm
    from vecpipe.core.space import check_same_space
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.readers import check_one_stdin

    if (train is None) == (split_field is None):
        raise UsageError("give the training records with --train FILE, or a --split-field "
                         "(train/test) in the inputs")
    check_one_stdin(list(inputs or ["-"]) + list(train or []))
    keys = _CLASSIFICATION_KEYS + _MULTILABEL_KEYS
    thresholds = _fail_under_known(fail_under, keys, "accuracy")
    hint = "name the fields with --label FIELD and --text-field FIELD or --vector-field FIELD"
    table, source = _read_records(inputs, input_format)
    fields = [label] + ([vector_field] if vector_field else _text_fields(text_field))
    train_records = test_records = None  # record numbers of the rows, where not 0..n-1
    if split_field is not None:
        _check_fields(table, source, fields + [split_field], "no records", hint)
        split = table.column(split_field).to_pylist()
        train_records, test_records = ([i for i, value in enumerate(split) if value == name]
                                       for name in ("train", "test"))
        for name, rows in (("train", train_records), ("test", test_records)):
            if not rows:
                raise DataError(f"no record has {split_field} = {name!r}", source=source)
        train_table, table, train_source = table.take(train_records), table.take(test_records), \
            source
    else:
        train_table, train_source = _read_records(train, input_format)
        _check_fields(train_table, train_source, fields, "no training records", hint)
        _check_fields(table, source, fields, "no records", hint)
        check_same_space(names.read_meta(train_table.schema), names.read_meta(table.schema),
                         train_source, source)
    label_type = train_table.schema.field(label).type
    multilabel = pa.types.is_list(label_type) or pa.types.is_large_list(label_type)
    train_labels = _class_labels(train_table, label, train_source, multilabel, train_records)
    test_labels = _class_labels(table, label, source, multilabel, test_records)
    if multilabel:
        selections = tm.undersample_multilabel(train_labels, samples_per_label, experiments, seed)
    else:
        selections = tm.undersample(train_labels, samples_per_label, experiments, seed)
    union = sorted(set().union(*selections))
    position = {row: i for i, row in enumerate(union)}
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    drawn = [train_records[row] for row in union] if train_records is not None else union
    train_vectors, model_id = _record_vectors(train_table.take(union), train_source,
                                              text_field, vector_field, embedder, prompt,
                                              hint, drawn)
    test_vectors, test_model = _record_vectors(table, source, text_field, vector_field,
                                               embedder, prompt, hint, test_records)
    if train_vectors.shape[1] != test_vectors.shape[1]:
        raise DataError(f"training vectors have {train_vectors.shape[1]} dimensions, test "
                        f"vectors {test_vectors.shape[1]}", source=source)
    drawn_labels = [train_labels[row] for row in union]
    drawn_rows = [[position[row] for row in rows] for rows in selections]
    try:
        if multilabel:
            scores = tm.multilabel_classification(train_vectors, drawn_labels, test_vectors,
                                                  test_labels, drawn_rows)
        else:
            scores = tm.classification(train_vectors, drawn_labels, test_vectors, test_labels,
                                       drawn_rows, seed)
    except Exception as err:
        raise _located(err, train_source)
    every = {value for labels in (train_labels, test_labels) for item in labels
             for value in (item if multilabel else [item])}
    record = {"train": train_table.num_rows, "test": table.num_rows, "labels": len(every),
              "multilabel": multilabel, "experiments": experiments,
              "samples_per_label": samples_per_label}
    model_id = model_id or test_model
    if model_id:
        record["model"] = model_id.name
    shown = _MULTILABEL_KEYS if multilabel else _CLASSIFICATION_KEYS
    record.update({key: scores[key] for key in shown})
    record["main_score"] = record["accuracy"]
    rows = [[key, "-" if record[key] is None else f"{record[key]:.5f}"] for key in shown]
    units = [experiment["accuracy"] for experiment in scores["scores_per_experiment"]]
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["test"], "test records", record), rows, ["metric", "mean"])),
            thresholds, mteb_file, list(inputs or ["-"]) + list(train or []), model_id, units)


def _class_labels(table, field: str, source: str, multilabel: bool, records) -> list:
    """The label of every row (a tuple of labels for multilabel), checked: one value, or a
    list of values."""
    from vecpipe.formats.errors import DataError

    labels = table.column(field).to_pylist()
    for i, value in enumerate(labels):
        bad = (not isinstance(value, list) or any(isinstance(v, (list, dict)) or v is None
                                                  for v in value)) if multilabel \
            else isinstance(value, (list, dict))
        if bad:
            raise DataError(f"field {field!r} holds {value!r}; a label is "
                            + ("a list of values" if multilabel else "one value"),
                            source=source, record=(i if records is None else records[i]) + 1)
    return [tuple(value) for value in labels] if multilabel else labels


def _text_fields(text_fields) -> list[str]:
    return list(text_fields or ["text"])


# ---------------------------------------------------------------- eval clustering

@app.command("clustering")
@boundary("eval clustering")
def clustering(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Labelled records (any record format; - for stdin, the default).",
            show_default=False, metavar="RECORDS")] = None,
        label: options.Label = "labels",
        text_field: options.TextField = None,
        vector_field: options.VectorField = None,
        experiments: options.Experiments = 10,
        bootstrap_size: Annotated[int, typer.Option(
            "--bootstrap-size", min=1, help="Records drawn with replacement for each "
                                            "experiment (MTEB's max_documents_per_cluster).")]
        = 16_384,
        max_documents: Annotated[Optional[int], typer.Option(
            "--max-documents", min=1, help="First draw this many records without replacement "
                                           "and cluster only those (MTEB's "
                                           "max_document_to_embed). [default: all]",
            show_default=False)] = None,
        kmeans_batch: Annotated[Optional[int], typer.Option(
            "--kmeans-batch", min=1, help="MiniBatchKMeans batch size (MTEB's "
                                          "k_mean_batch_size). [default: 512; --legacy: 500]",
            show_default=False)] = None,
        legacy: Annotated[bool, typer.Option(
            "--legacy", help="MTEB's legacy clustering (the MTEB(eng, v1) tasks): each record "
                             "is a set, its text (or vector) field and its label field lists "
                             "of the same length; every set is clustered whole, no bootstrap "
                             "(--experiments, --bootstrap-size, --max-documents and "
                             "--max-depth do not apply), and V-measure averaged over the "
                             "sets.")] = False,
        max_depth: Annotated[Optional[int], typer.Option(
            "--max-depth", min=1, help="Levels of a hierarchical (list) label to score. "
                                       "[default: all]", show_default=False)] = None,
        seed: options.Seed = 42,
        model: options.Model = None,
        prompt: options.Prompt = None,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        fail_under: options.FailUnder = None,
        save_mteb: options.SaveMteb = None,
        mteb_task: options.MtebTask = None,
        mteb_revision: options.MtebRevision = None,
        mteb_languages: options.MtebLanguages = None,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Cluster the embeddings and compare with the labels, as MTEB's (fast, bootstrapped)
    Clustering: for each experiment, bootstrap-size records drawn with replacement (one
    random.Random(seed) for every draw), clustered by scikit-learn's MiniBatchKMeans (as many
    clusters as labels, k-means++, n_init 1, random_state seed) and scored by V-measure and
    adjusted mutual information; means and standard deviations over the experiments (main
    score v_measure). A list label is a hierarchy scored level by level. --legacy runs MTEB's
    older protocol on sets of records instead. Same seed, same numbers as MTEB. Needs scikit-learn (pip install 'vecpipe[eval]'). Reads all records. Any
    labelled set works, e.g. MTEB's ArxivClusteringS2S as JSONL with sentences and labels
    fields (--text-field sentences).

    \b
    Example:
      vecpipe eval clustering arxiv-s2s.jsonl --text-field sentences
      vecpipe eval clustering news.arrow --vector-field embedding --label topic
      vecpipe eval clustering twentynewsgroups.jsonl --legacy --text-field sentences
    """
    mteb_file = _MtebFile(save_mteb, mteb_task, mteb_revision, mteb_languages)
    from vecpipe.core import task_metrics as tm
    from vecpipe.formats.errors import DataError

    keys = ("v_measure", "v_measure_std") if legacy else ("v_measure", "v_measure_std", "ami",
                                                         "ami_std")
    thresholds = _fail_under_known(fail_under, keys, "v_measure")
    hint = "name the fields with --label FIELD and --text-field FIELD or --vector-field FIELD"
    table, source = _read_records(inputs, input_format)
    fields = [label] + ([vector_field] if vector_field else _text_fields(text_field))
    _check_fields(table, source, fields, "no records", hint)
    if legacy:
        return _clustering_sets(table, source, fields, label, model, prompt, batch_size, device,
                                trust_remote_code, kmeans_batch or 500, seed, output_format,
                                thresholds, (mteb_file, inputs))
    labels = table.column(label).to_pylist()
    for i, value in enumerate(labels):
        if isinstance(value, dict) or value == []:
            raise DataError(f"field {label!r} holds {value!r}; a label is a value or a "
                            "non-empty list of them", source=source, record=i + 1)
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _record_vectors(table, source, text_field, vector_field, embedder,
                                        prompt, hint)
    try:
        scores = tm.clustering(vectors, labels, experiments, bootstrap_size, kmeans_batch or 512,
                               max_documents, max_depth, seed)
    except Exception as err:
        raise _located(err, source)
    first_level = {value[0] if isinstance(value, list) else value for value in labels}
    documents = table.num_rows if max_documents is None else min(max_documents, table.num_rows)
    record = _report(model_id, documents=documents, clusters=len(first_level),
                     levels=scores["levels"], experiments=experiments)
    record.update({key: scores[key] for key in keys})
    record["main_score"] = record["v_measure"]
    rows = [[name, f"{record[name]:.5f}", f"{record[f'{name}_std']:.5f}"]
            for name in ("v_measure", "ami")]
    units = [value for values in scores["v_measures"].values() for value in values]
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["documents"], "documents", record), rows, ["metric", "mean", "std"])),
            thresholds, mteb_file, inputs, model_id, units)


def _clustering_sets(table, source, fields, label, model, prompt, batch_size, device,
                     trust_remote_code, kmeans_batch, seed, output_format, thresholds, saving):
    """eval clustering --legacy: one set a record (lists of inputs and labels)."""
    from vecpipe.core import task_metrics as tm
    from vecpipe.formats.errors import DataError

    field = fields[1]
    if len(fields) > 2:
        raise DataError("--legacy clusters one list field a record; give one --text-field",
                        source=source)
    _expect_lists(table, source, [field])
    labels = table.column(label).to_pylist()
    embedder = _Embedder(model, batch_size, device, trust_remote_code)
    vectors, model_id = _field_vectors(table, source, [field], embedder, prompt)
    for i, (items, set_labels) in enumerate(zip(vectors[field], labels)):
        if not isinstance(set_labels, list) or len(set_labels) != len(items):
            raise DataError(f"field {label!r} must list one label for each of the "
                            f"{len(items)} items of {field!r}", source=source, record=i + 1)
    try:
        scores = tm.clustering_sets(list(zip(vectors[field], labels)), kmeans_batch, seed)
    except Exception as err:
        raise _located(err, source)
    record = _report(model_id, sets=table.num_rows, documents=sum(len(v) for v in labels))
    record.update({key: scores[key] for key in ("v_measure", "v_measure_std")})
    record["main_score"] = record["v_measure"]
    mteb_file, inputs = saving
    _finish(record, lambda: _emit([record], output_format, lambda: _report_table(
        _titled(record["sets"], "sets", record),
        [["v_measure", f"{record['v_measure']:.5f}", f"{record['v_measure_std']:.5f}"]],
        ["metric", "mean", "std"])), thresholds, mteb_file, inputs, model_id,
            scores["v_measures"])


# ---------------------------------------------------------------- eval suite

@app.command("suite")
@boundary("eval suite")
def suite(
        path: Annotated[str, typer.Argument(
            help="The suite file (TOML, or JSON): models, and tasks as eval commands.",
            metavar="SUITE")],
        cache: options.Cache = None,
        save_mteb: options.SaveMteb = None,
        seed: options.Seed = 0,
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        quiet: options.Quiet = False):
    """Run a benchmark: every task of the suite file against every model, one comparison
    table. A task is an eval command (beir, sts, pair-classification, reranking,
    bitext-mining, summarization, classification, clustering) with its arguments, run as that
    command runs it, -m each model in turn; models load once and each text is embedded once
    a model (--cache keeps beir's corpus vectors on disk across runs too). A cell is the task's main score; * marks a difference from the first model with a
    paired-bootstrap p-value under 0.05 (1000 resamples of the task's queries, experiments or
    pairs, seeded by --seed). The last row is MMTEB's Borda rank. --save-mteb files every
    task's result under the task's name. Off a terminal: one JSON record per model.

    \b
    Suite file (TOML; paths relative to it):
      models = ["default", "./finetuned"]     # the first is the baseline
      [[tasks]]
      name = "NFCorpus"                       # its MTEB file's name too
      command = "beir"
      args = ["../shared/data/nfcorpus", "--split", "test"]
      revision = "ec0fa4fe99da2ff19ca1214b7966684033a58814"   # optional
      languages = "eng-Latn"                  # optional

    \b
    Example:
      vecpipe eval suite docs/suites/nfcorpus.toml
      vecpipe eval suite suite.toml --cache .cache --save-mteb results
    """
    from vecpipe.core import suite as s
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.writers import resolve_report_format

    resolve_report_format(output_format)  # a bad choice fails before the tasks, not after
    plan = s.read_suite(path)
    for task in plan.tasks:  # before any task runs
        if {"-m", "--model"} & set(task.args):
            raise DataError(f"task {task.name}: give models in the suite's models, not -m",
                            source=plan.path)
    cache, save_mteb = (os.path.abspath(p) if p else None for p in (cache, save_mteb))
    results = {}  # (task name, model number) -> (record, units)
    token = _SUITE_VECTORS.set({})
    try:
        for task in plan.tasks:
            for number, model in enumerate(plan.models):
                results[task.name, number] = _suite_run(plan, task, model, cache, save_mteb,
                                                        quiet)
    finally:
        _SUITE_VECTORS.reset(token)
    records = _suite_records(plan, results, seed)
    _emit(records, output_format, lambda: _suite_table(plan, records))


def _suite_run(plan, task, model: str, cache, save_mteb, quiet: bool):
    """One task against one model through the task's own command: its (record, units)."""
    import typer.main
    from typer._click.exceptions import ClickException

    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError, UsageError

    group = typer.main.get_command(app)
    command = group.commands[task.command]
    args = [task.command, *task.args, "-m", model, "--mteb-task", task.name]
    args += ["--quiet"] if quiet else []
    takes = {option for param in command.params for option in param.opts}
    args += ["--cache", cache] if cache and "--cache" in takes else []
    args += ["--save-mteb", save_mteb] if save_mteb else []
    args += ["--mteb-revision", task.revision] if task.revision else []
    args += ["--mteb-languages", task.languages] if task.languages else []
    reports, token = [], _SUITE.set([])
    here = os.getcwd()
    try:
        os.chdir(plan.folder)
        status = group.main(args=args, prog_name="vecpipe eval", standalone_mode=False)
        reports = _SUITE.get()
    except ClickException as err:
        raise UsageError(f"task {task.name} in {plan.path}: {err.format_message()}") from None
    finally:
        os.chdir(here)
        _SUITE.reset(token)
        console.configure("vecpipe eval suite", quiet)
    if status:  # the task's command has said why; say where in the suite
        print(f"hint: task {task.name} of {plan.path}, model {model}", file=sys.stderr)
        raise typer.Exit(status)
    if not reports:
        raise DataError(f"task {task.name}: {task.command} gave no report to compare (--grid "
                        "makes a table of its own)", source=plan.path)
    console.info(f"{task.name} · {model}: {reports[0][0]['main_score']:.5f}")
    return reports[0]


def _suite_records(plan, results: dict, seed: int) -> list[dict]:
    """One record per model: its main score and p-value against the first model per task,
    and its Borda rank."""
    from vecpipe.core import suite as s

    numbers = range(len(plan.models))
    scores = [[results[task.name, number][0]["main_score"] for task in plan.tasks]
              for number in numbers]
    ranks = s.borda_ranks(scores)
    records = []
    for number, model, row, rank in zip(numbers, plan.models, scores, ranks):
        p_values = {task.name: None if number == 0 else s.compare(
            results[task.name, 0][1], results[task.name, number][1], seed)
            for task in plan.tasks}
        records.append({"model": model, "model_name": results[plan.tasks[0].name, number][0]
                        .get("model", model), "borda_rank": rank,
                        "scores": {task.name: score for task, score in zip(plan.tasks, row)},
                        "p_values": p_values})
    return records


def _suite_table(plan, records):
    """Tasks down, models across; * where a model differs from the first (p < ALPHA)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from vecpipe.core.suite import ALPHA

    table = Table()
    table.add_column("task")
    for record in records:
        table.add_column(record["model"], justify="right")
    for task in plan.tasks:
        table.add_row(task.name, *(_suite_cell(r["scores"][task.name],
                                               r["p_values"][task.name]) for r in records))
    table.add_row("Borda rank", *(str(r["borda_rank"]) for r in records))
    note = f"main scores; * differs from {records[0]['model']} at p < {ALPHA} (paired bootstrap)"
    return Group(Text(f"{len(plan.tasks)} tasks · {len(records)} models"), table, Text(note))


def _suite_cell(score: float, p_value) -> str:
    from vecpipe.core.suite import ALPHA

    mark = "*" if p_value is not None and p_value < ALPHA else " "
    return f"{score:.5f}{mark}"


# ---------------------------------------------------------------- eval embeddings

@app.command("embeddings")
@boundary("eval embeddings")
def embeddings(
        inputs: Annotated[Optional[List[str]], typer.Argument(
            help="One vector stream to describe, or two to compare (- for stdin, the default).",
            show_default=False, metavar="INPUT [INPUT2]")] = None,
        vector_field: options.VectorField = "embedding",
        old_field: options.alias(Optional[str], "--field", "--vector-field", "vector_field")
        = None,
        sample: Annotated[int, options.sample_option(min=10)] = 5000,
        duplicate_threshold: Annotated[float, typer.Option(
            "--duplicate-threshold", help="Cosine at or above which two rows are near "
                                          "duplicates.")] = 0.95,
        alpha: Annotated[float, typer.Option(
            "--alpha", min=0.0, max=1.0, help="Significance level of the comparison (split "
                                              "over its two tests).")] = 0.01,
        seed: options.Seed = 0,
        fail_on_drift: Annotated[bool, typer.Option(
            "--fail-on-drift", help="With two inputs: exit 1 when they differ (the report is "
                                    "printed first), for cron and make.")] = False,
        depth: Annotated[bool, typer.Option(
            "--depth", help="TTE depth (Seegmiller & Preum 2023) of every row within the first "
                            "input: 2 - its mean cosine distance to the other rows (higher = "
                            "more central). With -o, the first input's rows with a float32 "
                            "depth column, most central first; with two inputs, also the "
                            "paper's depth rank-sum test of the second against the first (Q, "
                            "p-value). Holds all vectors (and for -o the rows) in memory.")]
        = False,
        output: options.Output = None,
        input_format: options.InputFormat = "auto",
        output_format: options.OutputFormat = "auto",
        as_json: options.JsonFlag = False,
        quiet: options.Quiet = False):
    """Describe vectors without labels: RankMe effective rank (exp of the entropy of the
    normalized singular values, over all rows), anisotropy (mean cosine of distinct pairs),
    centroid norm, near-duplicate rate (rows with another row at cosine >= threshold), norm
    statistics, per-dimension variance; pairwise statistics use a seeded sample. With two
    inputs, also whether they differ: on held-out sampled rows, Mann-Whitney rank-sum tests
    compare the projection on the difference of the two mean directions and the cosine to the
    nearest row of the first input. Streams each input once; memory holds the samples.
    --depth adds TTE depth: per input its summary; with -o PATH the first input's rows with a
    depth column, sorted most central first (representative examples at the top); with two
    inputs the depth rank-sum test (one-sided: is the second further out of the first?), which
    then also counts in `differ`.

    \b
    Example:
      vecpipe eval embeddings corpus.arrow
      vecpipe eval embeddings corpus.arrow --depth -o ranked.arrow
      vecpipe eval embeddings last_week.arrow today.arrow --output-format json
      vecpipe eval embeddings last_week.arrow today.arrow --fail-on-drift -q || alert
    """
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.readers import check_one_stdin

    paths = list(inputs or ["-"])
    if len(paths) > 2:
        raise UsageError("give one input to describe or two to compare")
    if fail_on_drift and len(paths) != 2:
        raise UsageError("--fail-on-drift compares two inputs")
    if output is not None and not depth:
        raise UsageError("-o writes the rows ranked by --depth", hint="add --depth")
    if output == "-":
        raise UsageError("-o names a file for the ranked rows: the report goes to stdout")
    check_one_stdin(paths)
    # different seeds: two inputs that overlap get different rows sampled
    summaries = [_summarize(path, vector_field, sample, seed + i, input_format, duplicate_threshold,
                            keep=depth, rows=depth and output is not None and i == 0)
                 for i, path in enumerate(paths)]
    if depth:
        _add_depths(summaries, output)
    records = [{"input": name, **meta_and_report}
               for name, meta_and_report in ((s[0], s[1]) for s in summaries)]
    if len(summaries) == 2:
        records.append(_compare_embeddings(summaries, alpha, seed))
    _emit(records, output_format, lambda: _embeddings_table(records))
    if fail_on_drift and records[-1]["differ"]:
        raise DataError(f"{paths[0]} and {paths[1]} differ (--fail-on-drift, alpha {alpha:g})")


def _summarize(path: str, field: str, sample: int, seed: int, input_format: str,
               duplicate_threshold: float, keep: bool = False, rows: bool = False):
    """(name, report, summary, kept): `keep` holds every vector for --depth, `rows` every batch
    and the stream metadata too (for -o)."""
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError
    from vecpipe.core.vector_stats import EmbeddingSummary
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([path], input_format)
    name = "<stdin>" if path == "-" else path
    # a comparison needs a reference and a held-out sample from the first input: sample 2x
    summary = EmbeddingSummary(sample_size=2 * sample, seed=seed)
    kept = {"vectors": [], "batches": []}
    for item in stream:
        if field not in item.batch.schema.names:
            raise DataError(f"no field {field!r}; fields are {', '.join(item.batch.schema.names)}",
                            source=name, hint="name the vector field with --vector-field")
        column = item.batch.column(field)
        if pa.types.is_fixed_size_binary(column.type):
            raise DataError("packed-bit vectors have no cosine geometry to describe",
                            source=name, hint="describe the float vectors before compress")
        vectors = names.checked_vectors(item, field, nonfinite=None)
        if summary.gram is not None and vectors.shape[1] != len(summary.sums):
            raise DataError(f"vectors change dimension ({len(summary.sums)} then "
                            f"{vectors.shape[1]})", source=name, record=item.first_record)
        summary.add(vectors)
        if keep:
            kept["vectors"].append(_depth_vectors(vectors, name, item.first_record))
        if rows:
            kept["batches"].append(item.batch)
    if summary.rows == 0:
        raise DataError("no vectors", source=name)
    report = summary.report(duplicate_threshold, sample)
    model = stream.metadata.get("model")
    kept["metadata"] = stream.metadata if rows else {}
    return name, ({"model": model} if model else {}) | report, summary, kept


def _depth_vectors(vectors, name: str, first_record: int):
    """float32 copies of a batch's vectors for --depth: codes and zero rows have no cosine."""
    import numpy as np

    from vecpipe.formats.errors import DataError

    if vectors.dtype.kind != "f":
        raise DataError(f"--depth needs float vectors, not {vectors.dtype} codes", source=name,
                        hint="rank the float vectors before compress")
    zero = ~np.any(vectors != 0, axis=1)
    if zero.any():
        raise DataError("a zero vector has no cosine depth", source=name,
                        record=first_record + int(np.argmax(zero)))
    return np.array(vectors, dtype=np.float32)


def _add_depths(summaries, output) -> None:
    """--depth: each input's TTE-depth summary (within itself), the depth test of the second
    input against the first, and -o: the first input's rows ranked by their depth."""
    import numpy as np

    from vecpipe.core.vector_stats import depth_test, tte_depth, value_summary
    from vecpipe.formats.errors import DataError

    vectors = [np.concatenate(kept["vectors"]) for _, _, _, kept in summaries]
    depths = []
    for (name, report, _, _), rows in zip(summaries, vectors):
        if len(rows) < 2:
            raise DataError("--depth needs at least two rows", source=name)
        depths.append(tte_depth(rows))
        report["depth"] = value_summary(depths[-1])
    first = depths[0]
    if len(summaries) == 2:
        second = tte_depth(vectors[1], reference=vectors[0])
        q, w, p = depth_test(first, second)
        summaries[1][3]["depth_test"] = {
            "reference": summaries[0][0], "q": q, "w": w, "p_value": p,
            "first_median": float(np.median(first)), "second_median": float(np.median(second))}
    if output is not None:
        _write_ranked(summaries[0][3], first, output)


def _write_ranked(kept: dict, depths, output: str) -> None:
    """The rows with a float32 `depth` column, deepest first (ties keep input order)."""
    import numpy as np
    import pyarrow as pa

    from vecpipe.cli import console
    from vecpipe.formats.writers import RecordWriter

    table = pa.concat_tables([pa.Table.from_batches([batch]) for batch in kept["batches"]],
                             promote_options="default")
    table = table.append_column("depth", pa.array(depths.astype(np.float32)))
    table = table.take(pa.array(np.argsort(-depths, kind="stable")))
    with RecordWriter(output, "auto", metadata=kept["metadata"]) as out:
        for batch in table.to_batches(max_chunksize=8192):
            out.write(batch)
    console.info(f"{out.rows} rows ranked by depth -> {output} ({out.format})")


def _compare_embeddings(summaries, alpha: float, seed: int) -> dict:
    from vecpipe.cli import console
    from vecpipe.formats.errors import DataError
    from vecpipe.core.vector_stats import corpus_shift

    (name_a, report_a, first, _), (name_b, report_b, second, kept_b) = summaries
    if report_a["dim"] != report_b["dim"]:
        raise DataError(f"{name_a} has {report_a['dim']} dimensions, {name_b} "
                        f"{report_b['dim']}: not comparable")
    if report_a.get("model") != report_b.get("model"):
        console.warn(f"models differ: {report_a.get('model')} vs {report_b.get('model')}")
    result = corpus_shift(first.sample, second.sample, seed)
    if "depth_test" in kept_b:
        result["depth_test"] = kept_b["depth_test"]
    tests = [value for value in result.values() if isinstance(value, dict)]
    differ = any(test["p_value"] < alpha / len(tests) for test in tests)
    if result["shared_rows"]:
        console.info(f"{result['shared_rows']} sampled rows of {name_b} also appear in "
                     f"{name_a}'s sample; left out of the comparison")
    return {"compare": [name_a, name_b], "differ": differ, "alpha": alpha, **result}


_EMBEDDING_ROWS = [
    ("rows", lambda r: f"{r['rows']:,}"),
    ("dim", lambda r: str(r["dim"])),
    ("model", lambda r: r.get("model") or "-"),
    ("RankMe", lambda r: f"{r['rankme']:.1f}"),
    ("anisotropy", lambda r: _fmt(r["anisotropy"])),
    ("centroid norm", lambda r: _fmt(r["centroid_norm"])),
    ("near duplicates", lambda r: f"{r['near_duplicate_rate']:.2%}"),
    ("norm mean ± std", lambda r: f"{r['norm']['mean']:.4f} ± {r['norm']['std']:.4f}"),
    ("norm min/median/max", lambda r: "/".join(f"{r['norm'][key]:.3f}"
                                               for key in ("min", "median", "max"))),
    ("dim variance min/median/max", lambda r: "/".join(f"{r['dim_variance'][key]:.2e}"
                                                       for key in ("min", "median", "max"))),
    ("dims < 1% of mean variance", lambda r: str(r["dim_variance"]["low"])),
]


def _embeddings_table(records):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    described = [r for r in records if "input" in r]
    table = Table()
    table.add_column("statistic")
    for record in described:
        table.add_column(_short(record["input"]), justify="right")
    for label, show in _EMBEDDING_ROWS:
        table.add_row(label, *(show(r) for r in described))
    if "depth" in described[0]:
        table.add_row("TTE depth min/median/max", *("/".join(
            f"{r['depth'][key]:.4f}" for key in ("min", "median", "max")) for r in described))
    first = described[0]
    notes = [f"pairwise statistics on {first['sample']:,} sampled rows; near duplicates: "
             f"cosine >= {first['near_duplicate_threshold']:g}"]
    comparison = next((r for r in records if "compare" in r), None)
    if comparison:
        for test in ("mean_shift", "nearest_cosine"):
            result = comparison[test]
            table.add_row(f"{test.replace('_', ' ')} (median)", _fmt(result["first_median"]),
                          _fmt(result["second_median"]))
            table.add_row("  rank-sum p / AUC", "", f"{_p(result['p_value'])} / "
                                                   f"{result['auc']:.3f}")
        depth = comparison.get("depth_test")
        if depth:
            table.add_row("depth in first (median)", _fmt(depth["first_median"]),
                          _fmt(depth["second_median"]))
            table.add_row("  depth test p / Q", "", f"{_p(depth['p_value'])} / {depth['q']:.3f}")
        verdict = "differ" if comparison["differ"] else "do not differ detectably"
        notes.append(f"the inputs {verdict} (alpha {comparison['alpha']:g}, split over the "
                     f"{'three' if depth else 'two'} rank-sum tests)")
    return Group(table, *(Text(note) for note in notes))


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"
