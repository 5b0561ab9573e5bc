"""Benchmark vecpipe's retrieval metrics (core.retrieval_metrics.evaluate) against pytrec_eval.

A synthetic run (Q queries x D documents each, random scores, ~10 judged documents per query)
is scored by both, all of nDCG/MAP/recall/P at 1,3,5,10,100,1000 (+ MRR@k for vecpipe), and
the largest difference between their means is reported with the medians of --repeat timings.

    .venv/bin/python bench/eval.py [--queries 5000] [--depth 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pytrec_eval

from vecpipe.core import retrieval_metrics as m

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

KS = (1, 3, 5, 10, 100, 1000)


def synthetic(queries: int, depth: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    run, qrels = {}, {}
    for q in range(queries):
        docs = rng.choice(depth * 20, size=depth, replace=False)
        scores = rng.random(depth).round(4)  # rounding makes ties
        run[f"q{q}"] = {f"d{d}": float(s) for d, s in zip(docs, scores)}
        judged = rng.choice(depth * 20, size=10, replace=False)
        qrels[f"q{q}"] = {f"d{d}": int(r) for d, r in zip(judged, rng.integers(0, 3, 10))}
    return run, qrels


def timed(function, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run, qrels = synthetic(args.queries, args.depth)
    measures = {f"{name}.{','.join(map(str, KS))}" for name in ("ndcg_cut", "map_cut", "recall",
                                                                 "P")}

    def reference():
        scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        return {f"{ours}_at_{k}": sum(s[f"{trec}_{k}"] for s in scores.values()) / len(scores)
                for trec, ours in (("ndcg_cut", "ndcg"), ("map_cut", "map"),
                                   ("recall", "recall"), ("P", "precision")) for k in KS}

    ref_seconds, ref_means = timed(reference, args.repeat)
    our_seconds, ours = timed(lambda: m.evaluate(qrels, run, KS), args.repeat)
    worst = max(abs(ours.means[key] - value) for key, value in ref_means.items())
    print(json.dumps({"machine": machine_line(), "queries": args.queries, "depth": args.depth,
                      "pytrec_eval_s": round(ref_seconds, 3), "vecpipe_s": round(our_seconds, 3),
                      "ratio": round(our_seconds / ref_seconds, 2),
                      "max_abs_difference": worst}))


if __name__ == "__main__":
    main()
