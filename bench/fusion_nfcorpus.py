"""Hybrid retrieval on NFCorpus: BM25, the bundled MiniLM, their RRF, and a weighted sum whose
weights are fitted on the train qrels, all scored on the test split with `eval retrieval`.

Every step is the vecpipe CLI, as a user would run it; intermediate files are kept in --work so
that a rerun only redoes what is missing. The corpus is title + " " + text (MTEB's), each list
100 deep; the dense search is exact (--exact), so that the figures are the model's, not HNSW's.
Every run is scored over all 323 test queries (`--all-queries`: a query without hits scores 0).

    .venv/bin/python bench/fusion_nfcorpus.py [--data ../shared/data/nfcorpus]
        [--work /tmp/vp/fusion-work] [--docs EMBEDDINGS.arrow] [--depth 100]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")
PUBLISHED = {"dense": "0.31594 (MTEB, all-MiniLM-L6-v2)", "bm25": "0.325 (BEIR paper, "
                                                                   "Elasticsearch BM25)"}


def vecpipe(*args, stdout=None) -> float:
    """Run one vecpipe command (stderr shown); its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([VECPIPE, *map(str, args)], check=True, stdout=stdout)
    return time.perf_counter() - started


def made(path: str, *args) -> None:
    """`vecpipe args` unless `path` exists (the command writes it)."""
    if not os.path.exists(path):
        print(f"[{time.strftime('%H:%M:%S')}] vecpipe {' '.join(map(str, args))}",
              file=sys.stderr, flush=True)
        vecpipe(*args)


def scores(run: str, qrels: str) -> dict:
    """Over every judged query: BM25 finds nothing for 15 of NFCorpus's 323 (words no
    document has), which pytrec_eval's default would leave out of its mean only."""
    out = subprocess.run([VECPIPE, "eval", "retrieval", run, "--qrels", qrels, "--cutoffs",
                          "10,100", "--all-queries", "--output-format", "jsonl", "-q"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data",
                                                       "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vp/fusion-work")
    parser.add_argument("--docs", help="corpus embeddings already made (embed --text-field "
                                       "title --text-field text)")
    parser.add_argument("--depth", type=int, default=100)
    args = parser.parse_args()
    print(machine_line())
    data, work = os.path.abspath(args.data), args.work
    os.makedirs(work, exist_ok=True)
    corpus, queries = os.path.join(data, "corpus.jsonl"), os.path.join(data, "queries.jsonl")
    test, train = os.path.join(data, "qrels", "test.tsv"), os.path.join(data, "qrels",
                                                                          "train.tsv")
    w = lambda name: os.path.join(work, name)  # noqa: E731
    docs = args.docs or w("docs.arrow")
    made(docs, "embed", corpus, "--text-field", "title", "--text-field", "text", "-o", docs)
    made(w("queries.arrow"), "embed", queries, "-o", w("queries.arrow"))
    made(w("dense"), "index", docs, "-o", w("dense"))
    made(w("bm25"), "index", "--lexical", corpus, "--text-field", "title", "--text-field",
         "text", "-o", w("bm25"))
    depth = str(args.depth)
    made(w("dense.trec"), "search", w("dense"), w("queries.arrow"), "-k", depth, "--exact",
         "-o", w("dense.trec"))
    made(w("bm25.trec"), "search", w("bm25"), queries, "-k", depth, "-o", w("bm25.trec"))
    made(w("rrf.trec"), "merge", "--fuse", "rrf", w("bm25.trec"), w("dense.trec"),
         "-o", w("rrf.trec"))
    made(w("wsum.trec"), "merge", "--fuse", "wsum", w("bm25.trec"), w("dense.trec"),
         "--fit-qrels", train, "--save-fit", w("fit.json"), "-o", w("wsum.trec"))
    hybrid_seconds = None
    if not os.path.exists(w("hybrid.trec")):
        hybrid_seconds = vecpipe("search", w("dense"), queries, "--hybrid", w("bm25"), "-k",
                                 depth, "--hybrid-depth", depth, "--exact", "-o",
                                 w("hybrid.trec"))
    fit = json.load(open(w("fit.json")))
    rows = [("BM25 (vecpipe index --lexical)", "bm25.trec", PUBLISHED["bm25"]),
            ("dense (all-MiniLM-L6-v2, exact)", "dense.trec", PUBLISHED["dense"]),
            ("RRF k=60 (merge --fuse rrf)", "rrf.trec", ""),
            (f"wsum min-max, weights {fit['weights']} fitted on train "
             f"({fit['fitted_on']} {fit['fitted_score']:.4f})", "wsum.trec", ""),
            ("search --hybrid (RRF in one command)", "hybrid.trec", "")]
    print("| run | nDCG@10 | Recall@100 | MRR@10 | published nDCG@10 |")
    print("|---|---|---|---|---|")
    for name, run, published in rows:
        found = scores(w(run), test)
        print(f"| {name} | {found['ndcg_at_10']:.5f} | {found['recall_at_100']:.5f} | "
              f"{found['mrr_at_10']:.5f} | {published} |")
    if hybrid_seconds is not None:
        print(f"\nsearch --hybrid over {queries}: {hybrid_seconds:.1f} s wall")


if __name__ == "__main__":
    main()
