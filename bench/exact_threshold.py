"""Where exact search is as fast as the HNSW graph (issue 22, "small indexes are exact"): queries
per second of usearch's exact scan of the index (`Index.search(exact=True)`, what `search
--exact` runs) and of HNSW (ef 64) over the first N real vectors, for
several N, with 1,000 queries in one batch and with one query at a time (the CLI's `--query`
case), and HNSW's recall@10 against the exact top 10. Below the crossing, `search` scans
exactly by default (core/index_search.py EXACT_SCAN_BYTES), as Qdrant's full_scan_threshold
does.

    .venv/bin/python bench/exact_threshold.py lines.arrow [--sizes 1000,2000,...] [--repeat 3]

lines.arrow: the embedded text lines of bench/package_text.py (the last 1,000 are the queries).
"""
from __future__ import annotations

import argparse

import numpy as np
from usearch.index import Index, search

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path
from quantization import median_seconds, read, recall


def one_at_a_time(run, queries) -> None:
    for query in queries:
        run(query[None, :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lines")
    parser.add_argument("--sizes", default="1000,2000,5000,10000,20000,50000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    args = parser.parse_args()
    print(machine_line())
    _, lines = read(args.lines)
    corpus, queries = lines[:-1000], lines[-1000:]
    print("\n| vectors | MB (f32) | exact QPS, batch | HNSW QPS, batch | exact QPS, one query "
          "| HNSW QPS, one query | HNSW recall@10 |\n|---:|---:|---:|---:|---:|---:|---:|")
    for size in map(int, args.sizes.split(",")):
        docs = np.ascontiguousarray(corpus[:size])
        index = Index(ndim=docs.shape[1], metric="cos", dtype="f32")
        index.add(np.arange(size), docs)
        index.expansion_search = 64
        truth = search(docs, queries, 10, "cos", exact=True).keys
        found = index.search(queries, 10).keys
        exact_batch = median_seconds(lambda: index.search(queries, 10, exact=True), args.repeat)
        hnsw_batch = median_seconds(lambda: index.search(queries, 10), args.repeat)
        few = queries[:args.single]
        exact_one = median_seconds(lambda: one_at_a_time(
            lambda q: index.search(q, 10, exact=True), few), args.repeat)
        hnsw_one = median_seconds(lambda: one_at_a_time(lambda q: index.search(q, 10), few),
                                  args.repeat)
        print(f"| {size:,} | {docs.nbytes / 1e6:.1f} | {len(queries) / exact_batch:,.0f} | "
              f"{len(queries) / hnsw_batch:,.0f} | {len(few) / exact_one:,.0f} | "
              f"{len(few) / hnsw_one:,.0f} | {recall(truth, found):.4f} |", flush=True)


if __name__ == "__main__":
    main()
