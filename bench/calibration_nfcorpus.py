"""Relevance filtering on NFCorpus: one global --min-score against one --min-prob of a
calibrator (`eval calibrate`, after Rossi et al. 2024) fitted on the train qrels, both scored
on the test split with set precision, recall and F1 (`eval retrieval --metrics set`).

Every run is the vecpipe CLI: the bundled MiniLM's embeddings (title + " " + text; made with
`embed` unless --docs/--queries name existing ones), an index, one exact search of all queries
--depth deep (train and test queries are disjoint: `eval calibrate` fits on those the train
qrels judge, `eval retrieval` scores those the test qrels judge), the calibrator, and the same
search with --calibrator for its prob column. The threshold sweeps cut those runs in Python
(as search --min-score / --min-prob cut them: checked against the CLI at a few thresholds) and
score each with vecpipe's set metrics over all 323 test queries (a query left with no hits
scores 0: trec_eval -c). Global top-k cut-offs are listed too, as the other global baseline.

    .venv/bin/python bench/calibration_nfcorpus.py [--data ../shared/data/nfcorpus]
        [--work /tmp/vp/cal-work] [--docs DOCS.arrow] [--queries QUERIES.arrow] [--depth 100]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")
RECALLS = (0.05, 0.10, 0.15, 0.20, 0.30)


def made(path: str, *args) -> None:
    """`vecpipe args` unless `path` exists (the command writes it)."""
    if not os.path.exists(path):
        print(f"vecpipe {' '.join(map(str, args))}", file=sys.stderr, flush=True)
        subprocess.run([VECPIPE, *map(str, args), "-q"], check=True)


def read_hits(path: str) -> dict:
    """query id -> [(doc id, score, prob or None)] best first, from search's JSONL."""
    hits: dict = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            hits.setdefault(row["query_id"], []).append((row["id"], row["score"],
                                                         row.get("prob")))
    return hits


def cut(hits: dict, keep) -> dict:
    """A run of the hits `keep(rank, score, prob)` holds (search keeps them in score order)."""
    return {qid: {doc: score for rank, (doc, score, prob) in enumerate(rows, 1)
                  if keep(rank, score, prob)} for qid, rows in hits.items()}


def set_scores(qrels: dict, run: dict) -> dict:
    from vecpipe.core import retrieval_metrics as m

    run = {qid: docs for qid, docs in run.items() if docs}
    means = m.evaluate(qrels, run, (1,), m.SET_METRICS, all_queries=True).means
    judged = list(qrels)
    means["hits"] = sum(len(run.get(qid, {})) for qid in judged) / len(judged)
    means["empty"] = sum(qid not in run for qid in judged) / len(judged)
    return means


def sweep(hits, qrels, family: str, values, keep) -> list[dict]:
    return [{"family": family, "threshold": value, **set_scores(qrels, cut(hits, keep(value)))}
            for value in values]


def cli_scores(work: str, queries: str, qrels: str, depth: int, flag: str, value) -> dict:
    """The CLI's own numbers: search with the threshold | eval retrieval --metrics set."""
    search = subprocess.run([VECPIPE, "search", os.path.join(work, "idx"), queries, "-k",
                             str(depth), "--exact", flag, str(value), "-q",
                             *(["--calibrator", os.path.join(work, "cal.json")]
                               if flag == "--min-prob" else [])],
                            check=True, capture_output=True)
    out = subprocess.run([VECPIPE, "eval", "retrieval", "--qrels", qrels, "--metrics", "set",
                          "--all-queries", "--output-format", "jsonl", "-q"], input=search.stdout,
                         check=True, capture_output=True).stdout
    return json.loads(out.splitlines()[0])


def grid(hits: dict, column: int, points: int = 120) -> list[float]:
    """Thresholds at `points` quantiles of the test hits' scores (1) or probs (2), 3 digits
    (--min-score and --min-prob take them as given): as fine where the hits are dense."""
    import numpy as np

    values = np.array([row[column] for rows in hits.values() for row in rows])
    return sorted({round(float(v), 3) for v in np.quantile(values, np.linspace(0, 1, points))}
                  | {0.5, 0.2})


def reliability(hits: dict, qrels: dict) -> None:
    """Test log loss of prob, and predicted against observed relevance in five prob bins."""
    import numpy as np

    pairs = np.array([(prob, qrels[qid].get(doc, 0) >= 1) for qid, rows in hits.items()
                      if qid in qrels for doc, _score, prob in rows], dtype=np.float64)
    p, y = np.clip(pairs[:, 0], 1e-12, 1 - 1e-12), pairs[:, 1]
    rate = y.mean()
    print(f"test: log loss {-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)):.4f} (base rate "
          f"{-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)):.4f}) over {len(y)} hits\n")
    print("| prob bin | hits | mean prob | relevant share |")
    print("|---|---|---|---|")
    for low, high in ((0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.01)):
        inside = (p >= low) & (p < high)
        print(f"| [{low:g}, {min(high, 1):g}) | {inside.sum()} | {p[inside].mean():.4f} | "
              f"{y[inside].mean():.4f} |")
    print()


def precision_at(rows: list[dict], recall: float) -> float:
    """The best set precision of a family at a set recall of at least `recall`."""
    return max((row["set_precision"] for row in rows if row["set_recall"] >= recall),
               default=float("nan"))


def main() -> None:
    from vecpipe.formats.trec import read_qrels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data",
                                                       "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vp/cal-work")
    parser.add_argument("--docs", help="corpus embeddings already made")
    parser.add_argument("--queries", help="query embeddings already made")
    parser.add_argument("--depth", type=int, default=100)
    args = parser.parse_args()
    print(machine_line())
    data, work, depth = os.path.abspath(args.data), args.work, args.depth
    os.makedirs(work, exist_ok=True)
    w = lambda name: os.path.join(work, name)  # noqa: E731
    train, test = (os.path.join(data, "qrels", f"{split}.tsv") for split in ("train", "test"))
    docs, queries = args.docs or w("docs.arrow"), args.queries or w("queries.arrow")
    made(docs, "embed", os.path.join(data, "corpus.jsonl"), "--text-field", "title",
         "--text-field", "text", "-o", docs)
    made(queries, "embed", os.path.join(data, "queries.jsonl"), "-o", queries)
    made(w("idx"), "index", docs, "-o", w("idx"))
    made(w("run.jsonl"), "search", w("idx"), queries, "-k", depth, "--exact", "-o",
         w("run.jsonl"))
    made(w("cal.json"), "eval", "calibrate", w("run.jsonl"), "--qrels", train, "--space",
         w("idx"), "-o", w("cal.json"))
    made(w("prob.jsonl"), "search", w("idx"), queries, "-k", depth, "--exact", "--calibrator",
         w("cal.json"), "-o", w("prob.jsonl"))
    report(w, queries, test, depth, read_qrels(test).qrels, read_hits(w("prob.jsonl")))


def report(w, queries, test, depth, qrels, hits) -> None:
    families = {
        "--min-score S": sweep(hits, qrels, "--min-score", grid(hits, 1),
                               lambda s: lambda rank, score, prob: score >= s),
        "--min-prob P": sweep(hits, qrels, "--min-prob", grid(hits, 2),
                              lambda p: lambda rank, score, prob: prob >= p),
        "-k K": sweep(hits, qrels, "-k", [1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100],
                      lambda k: lambda rank, score, prob: rank <= k)}
    for family, flag, value in (("--min-score S", "--min-score", 0.5),
                                ("--min-prob P", "--min-prob", 0.2)):
        mine = next(row for row in families[family] if row["threshold"] == value)
        theirs = cli_scores(w(""), queries, test, depth, flag, value)
        assert all(abs(mine[key] - theirs[key]) < 1e-12 for key in ("set_precision",
                   "set_recall", "set_f1")), (flag, value, mine, theirs)
    fit = json.load(open(w("cal.json")))["fit"]
    print(f"\ncalibrator: {fit['queries']} train queries, top {depth}, {fit['relevant']} of "
          f"{fit['hits']} hits relevant; train log loss {fit['log_loss']:.4f} (base rate "
          f"{fit['base_rate_log_loss']:.4f}); increasing for {fit['increasing_queries']:.0%} "
          "of train queries\n")
    reliability(hits, qrels)
    print("| cut | best set F1 | at | set P | set R | hits/query | empty queries |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in families.items():
        best = max(rows, key=lambda row: row["set_f1"])
        print(f"| {name} | {best['set_f1']:.4f} | {best['threshold']:g} | "
              f"{best['set_precision']:.4f} | {best['set_recall']:.4f} | {best['hits']:.1f} | "
              f"{best['empty']:.1%} |")
    print("\nbest set precision at set recall >= r:\n")
    print("| cut | " + " | ".join(f"R >= {r:.2f}" for r in RECALLS) + " |")
    print("|---|" + "---|" * len(RECALLS))
    for name, rows in families.items():
        print(f"| {name} | " + " | ".join(f"{precision_at(rows, r):.4f}" for r in RECALLS)
              + " |")
    print("\nthe sweeps (every 8th threshold of score and prob):\n")
    print("| cut | threshold | set P | set R | set F1 | hits/query | empty queries |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in families.items():
        for row in rows[::8] if name != "-k K" else rows:
            print(f"| {name} | {row['threshold']:g} | {row['set_precision']:.4f} | "
                  f"{row['set_recall']:.4f} | {row['set_f1']:.4f} | {row['hits']:.1f} | "
                  f"{row['empty']:.1%} |")


if __name__ == "__main__":
    main()
