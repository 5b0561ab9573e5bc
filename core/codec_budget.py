"""Choosing a codec by memory: every codec that fits a byte budget per vector, fitted on the
calibration rows and measured by recall@k of held-out queries against exact float search.

The candidates: truncation to halving dimensions in float32/float16/int8, PCA to the same
dimensions in int8, binary with 1-4 residual bit planes, and PQ with sub-vectors of 2-32
dimensions (8 bits each). Each is a dict of `Codec.fit` keywords. A row of the result is
Pareto-optimal when no other row is as small and at least as good, one of them strictly.
"""
from __future__ import annotations

import numpy as np

from vecpipe.core.codec import Codec

BINARY_PLANES = (1, 2, 3, 4)
PQ_SUB_DIMS = (2, 4, 8, 16, 32)
MIN_DIMS = 16
HELD_OUT_SHARE = 10      # every 10th calibration row is a held-out query ...
HELD_OUT_MAX = 1000      # ... at most this many


def candidates(input_dim: int, budget: int) -> list[dict]:
    """`Codec.fit` keywords of every codec whose codes fit `budget` bytes per vector."""
    dims = halving_dims(input_dim)
    found = []
    for dim in dims:
        truncated = None if dim == input_dim else dim
        for to, width in (("float32", 4), ("float16", 2), ("int8", 1)):
            if dim * width <= budget and (to != "float32" or truncated):
                found.append({"to": to, "dim": truncated})
        if truncated and dim <= budget:
            found.append({"to": "int8", "pca": dim})
    for planes in BINARY_PLANES:
        if planes * ((input_dim + 7) // 8) <= budget:
            found.append({"to": "binary", "bits": planes})
    for sub in PQ_SUB_DIMS:
        if input_dim % sub == 0 and input_dim // sub <= budget:
            found.append({"to": "pq", "pq_m": input_dim // sub})
    return found


def halving_dims(input_dim: int) -> list[int]:
    dims, dim = [], input_dim
    while dim >= MIN_DIMS:
        dims.append(dim)
        dim //= 2
    return dims


def split_held_out(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out query rows): every HELD_OUT_SHARE-th row, at most HELD_OUT_MAX."""
    picks = np.arange(0, len(sample), HELD_OUT_SHARE)[:HELD_OUT_MAX]
    keep = np.ones(len(sample), dtype=bool)
    keep[picks] = False
    return sample[keep], sample[picks]


def sweep(corpus: np.ndarray, queries: np.ndarray, budget: int, k: int = 10,
          progress=None, **fit_options) -> list[dict]:
    """One row per candidate: its description, bytes per vector, recall@k of `queries`
    (float, asymmetric) against exact float search over `corpus`, and `pareto`. The codecs
    are fitted on `corpus`; `fit_options` go to every `Codec.fit` (normalize, model)."""
    truth = top_rows(queries @ corpus.T, k)
    rows = []
    for options in candidates(corpus.shape[1], budget):
        if progress is not None:
            progress(options)
        codec = Codec.fit(corpus, **options, **fit_options)
        found = top_rows(codec.score(queries, codec.encode(corpus)), k)
        rows.append({"codec": codec.describe(), "bytes": codec.bytes_per_vector,
                     f"recall@{k}": overlap(truth, found), "fit": options})
    return mark_pareto(rows, f"recall@{k}")


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    from vecpipe.core.vectors import top_k

    return top_k(np.asarray(scores, dtype=np.float32), k).rows


def overlap(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean share of each true top k found in the approximate top k."""
    hits = [len(np.intersect1d(t, f)) for t, f in zip(truth, found)]
    return round(float(np.mean(hits)) / truth.shape[1], 4)


def mark_pareto(rows: list[dict], quality: str) -> list[dict]:
    """Rows sorted by bytes then quality (best first), each with `pareto`."""
    rows = sorted(rows, key=lambda row: (row["bytes"], -row[quality]))
    best = -np.inf
    for row in rows:
        row["pareto"] = bool(row[quality] > best)
        best = max(best, row[quality])
    return rows
