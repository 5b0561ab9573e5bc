"""How fast can an exact hamming scan over packed sign bits go here? usearch's exact `search()`
(what `index --flat --dtype b1` uses) against two numpy alternatives, on real vectors.

    python bench/b1_scan.py lines.arrow --docs 1000000 --queries 200

The codes are the sign bits of the first --docs vectors; the queries are the last --queries
rows. The numpy variants compute the full score matrix only (no top-k), so they are upper bounds.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from usearch.index import search

from search import file_embeddings  # bench/search.py: this folder is on sys.path when run

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path


def sign_bits(path, docs: int, queries: int):
    doc_vectors, query_vectors = file_embeddings(path, queries)
    return np.packbits(doc_vectors[:docs] > 0, axis=1), np.packbits(query_vectors > 0, axis=1)


def blas_scores(codes, queries, block=65536):
    """Hamming order = the order of the dot product of the ±1 vectors: one BLAS matmul a block."""
    signed_queries = np.unpackbits(queries, axis=1).astype(np.float32) * 2 - 1
    scores = np.empty((len(queries), len(codes)), np.float32)
    for start in range(0, len(codes), block):
        signed = np.unpackbits(codes[start:start + block], axis=1).astype(np.float32) * 2 - 1
        scores[:, start:start + block] = signed_queries @ signed.T
    return scores


def popcount_distances(codes, queries, block=16384):
    words, query_words = codes.view(np.uint64), queries.view(np.uint64)
    distances = np.empty((len(queries), len(codes)), np.uint16)
    for start in range(0, len(codes), block):
        xor = query_words[:, None, :] ^ words[None, start:start + block, :]
        distances[:, start:start + block] = np.bitwise_count(xor).sum(-1, dtype=np.uint16)
    return distances


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vectors", help="an embeddings Arrow file")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    codes, queries = sign_bits(args.vectors, args.docs, args.queries)
    runs = [(f"usearch exact search, threads={t}",
             lambda q, t=t: search(codes, q, 10, "hamming", exact=True, threads=t))
            for t in (1, 2)]
    runs += [("numpy ±1 BLAS matmul (scores only)", lambda q: blas_scores(codes, q)),
             ("numpy bitwise_count (distances only)", lambda q: popcount_distances(codes, q))]
    print(f"{len(codes):,} codes of {codes.shape[1]} bytes, {len(queries)} queries")
    for name, run in runs:
        started = time.perf_counter()
        run(queries)
        seconds = time.perf_counter() - started
        print(f"{name}: {len(queries) / seconds:,.0f} QPS, "
              f"{seconds / len(queries) / len(codes) * 1e9:.1f} ns per distance")


if __name__ == "__main__":
    main()
