"""TTE depth (`eval embeddings --depth`, core.vector_stats.tte_depth) on real vectors: its time
and memory in-process, against the n x n cosine-distance matrix the authors' package computes
(scipy cdist), and the largest difference between the two.

    .venv/bin/python bench/depth.py DOCS.arrow [QUERIES.arrow] [--repeat 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np
import pyarrow as pa
from scipy.spatial.distance import cdist

from vecpipe.core.vector_stats import depth_rank_sum_test, tte_depth

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path


def vectors(path: str) -> np.ndarray:
    column = pa.ipc.open_file(path).read_all()["embedding"]
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def median_seconds(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matrix_depth(docs: np.ndarray) -> np.ndarray:
    """The definition through the full matrix, the point itself left out."""
    distances = cdist(docs, docs, "cosine")
    return 2 - (distances.sum(1) - np.diag(distances)) / (len(docs) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs")
    parser.add_argument("queries", nargs="?")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(machine_line())
    docs = vectors(args.docs)
    print(f"tte_depth over {len(docs):,} x {docs.shape[1]}: "
          f"{median_seconds(lambda: tte_depth(docs), args.repeat):.4f} s median")
    tracemalloc.start()
    tte_depth(docs)
    print(f"  peak traced memory {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB")
    tracemalloc.stop()
    print(f"cdist matrix: {median_seconds(lambda: matrix_depth(docs), 3):.2f} s median; max "
          f"|difference| {np.abs(matrix_depth(docs) - tte_depth(docs)).max():.2e}")
    if args.queries:
        queries = vectors(args.queries)
        q, w, p = depth_rank_sum_test(docs, queries)
        print(f"depth test, queries against docs: Q {q:.3f}, W {w:.1f}, p {p:.3g}")


if __name__ == "__main__":
    main()
