"""Maximal marginal relevance (Carbonell & Goldstein, 1998): re-order a query's first-stage hits
so that each next hit is relevant and unlike the hits already chosen.

    mmr(d) = lambda * sim(q, d) - (1 - lambda) * max(sim(d, s) for s already selected)

Both similarities are the index's score metric (`vectors.similarity`: cos -> cosine, ip -> dot
product, l2sq -> minus the squared distance) over the same vectors: the index's kept full
vectors, or its stored ones (codes decoded), and the float query; so sim(q, d) is recomputed,
not the first-stage score (the same number for a float index; for a quantized one, the float
query against the decoded codes, as rescoring has it). Ties go to the better first-stage rank;
lambda 1 keeps the first-stage order (by the recomputed score), lambda 0 asks only for novelty
after the most relevant hit.

The score of each selected hit is its marginal relevance when chosen. From the second pick on
those never rise (the redundancy of every remaining hit only grows); the first pick, which has
nothing to be redundant with, is scored against the least similar pair of candidates instead of
an empty set, so that the scores fall with the rank as a run's must (eval and TREC tools sort by
score) whatever the sign of the similarities.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from vecpipe.formats.errors import ParameterError

if TYPE_CHECKING:
    import numpy as np

    from vecpipe.core.vectors import Hits


def check_lambda(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ParameterError(f"the MMR trade-off lambda must be within [0, 1], not {value}",
                             "mmr")
    return float(value)


# The candidates of a block of queries are held at once (vectors, and their pairwise
# similarities): at most about this many numbers.
_BLOCK_VALUES = 1 << 23


def mmr_order(relevance, pairwise, lam: float, k: int):
    """(positions chosen in order, their MMR scores) among n candidates: `relevance` (n,) =
    sim(q, d), `pairwise` (n x n) = sim(d, d'); at most k picks."""
    import numpy as np

    relevance = np.asarray(relevance, dtype=np.float64)
    n = len(relevance)
    positions, scores = mmr_block(relevance[None, :],
                                  np.asarray(pairwise, dtype=np.float64).reshape(1, n, n),
                                  np.ones((1, n), dtype=bool), lam, k)
    return positions[0][positions[0] >= 0], scores[0][positions[0] >= 0]


def mmr_block(relevance, pairwise, valid, lam: float, k: int):
    """MMR for a block of queries at once: `relevance` (queries x n), `pairwise` (queries x n x
    n), `valid` (queries x n, False = no candidate there). (positions, scores), queries x
    min(k, n), position -1 (score -inf) once a query has no candidate left."""
    import numpy as np

    queries, n = relevance.shape
    picks = min(k, n)
    positions = np.full((queries, picks), -1, dtype=np.int64)
    scores = np.full((queries, picks), -np.inf)
    if picks == 0:
        return positions, scores
    pairs = valid[:, :, None] & valid[:, None, :] & ~np.eye(n, dtype=bool)
    floor = np.where(pairs, pairwise, np.inf).min(axis=(1, 2))
    redundancy = np.where(np.isfinite(floor), floor, 0.0)[:, None].repeat(n, 1)
    available = valid.copy()
    every = np.arange(queries)
    for step in range(picks):
        marginal = np.where(available, lam * relevance - (1.0 - lam) * redundancy, -np.inf)
        pick = np.argmax(marginal, axis=1)  # the first maximum: the better first-stage rank
        best = marginal[every, pick]
        found = best > -np.inf
        positions[found, step], scores[found, step] = pick[found], best[found]
        available[every[found], pick[found]] = False
        similar = pairwise[every, pick]
        redundancy = similar if step == 0 else np.maximum(redundancy, similar)
    return positions, scores


def diversified(queries, hits: "Hits", vectors_of: Callable, metric: str, lam: float,
                k: int):
    """MMR over each query's hits (its first-stage candidates, best first; row -1 = none):
    (Hits of at most k rows per query scored by MMR, sim(q, d) of those rows, NaN where no
    row). `queries`: float vectors comparable with `vectors_of(rows)` (the candidates'
    vectors) in `metric`."""
    import numpy as np

    from vecpipe.core.vectors import Hits

    lam = check_lambda(lam)
    queries = np.asarray(queries, dtype=np.float32)
    valid = hits.rows >= 0
    unique, where = np.unique(hits.rows[valid], return_inverse=True)
    vectors = np.asarray(vectors_of(unique), dtype=np.float32)
    position = np.zeros(hits.rows.shape, dtype=np.int64)
    position[valid] = where.reshape(-1)
    n = hits.rows.shape[1]
    width = min(k, n)
    rows = np.full((len(hits.rows), width), -1, dtype=np.int64)
    scores = np.full((len(hits.rows), width), -np.inf, dtype=np.float32)
    relevance_out = np.full((len(hits.rows), width), np.nan, dtype=np.float32)
    step = max(1, _BLOCK_VALUES // max(1, n * max(n, vectors.shape[-1])))
    for start in range(0, len(hits.rows), step):
        block = slice(start, start + step)
        relevance, pairwise = _similarities(queries[block], vectors, position[block], metric)
        order, marginal = mmr_block(relevance, pairwise, valid[block], lam, k)
        picked = order >= 0
        chosen = np.take_along_axis(position[block], np.where(picked, order, 0), 1)
        rows[block] = np.where(picked, unique[chosen] if len(unique) else -1, -1)
        scores[block] = marginal
        relevance_out[block] = np.where(picked, np.take_along_axis(
            relevance, np.where(picked, order, 0), 1), np.nan)
    return Hits(rows, scores), relevance_out


def _similarities(queries, vectors, positions, metric: str):
    """sim(q, d) (queries x n) and sim(d, d') (queries x n x n) of each query's candidates
    (`positions` into `vectors`), in `metric` as `vectors.similarity` computes it (batched:
    one matrix product per block, not one per query)."""
    import numpy as np

    from vecpipe.core.vectors import _unit

    count, n = positions.shape
    if len(vectors) == 0:
        return np.zeros((count, n)), np.zeros((count, n, n))
    candidates = vectors[positions]                      # queries x n x dim
    queries = np.asarray(queries, dtype=np.float32)
    if metric == "cos":
        candidates, queries = _unit(candidates), _unit(queries)
    pairwise = np.matmul(candidates, candidates.transpose(0, 2, 1))
    relevance = np.einsum("qd,qnd->qn", queries, candidates)
    if metric == "l2sq":
        norms = np.einsum("qnd,qnd->qn", candidates, candidates)
        pairwise = -(norms[:, :, None] + norms[:, None, :] - 2 * pairwise)
        relevance = -((queries * queries).sum(1)[:, None] + norms - 2 * relevance)
    elif metric not in ("cos", "ip"):
        raise ParameterError(f"MMR compares float vectors; the index's metric is {metric}",
                             "mmr")
    return relevance.astype(np.float64), pairwise.astype(np.float64)


def comparable(index, queries):
    """Float queries comparable with `index.query_vectors(...)` in its score metric: when those
    are decoded codes (no full vectors kept), the query is taken through the codec and back, so
    both live in the codes' space (truncated dimensions zero on both sides)."""
    import numpy as np

    from vecpipe.core.index_open import lifted

    queries = np.asarray(queries, dtype=np.float32)
    codec = getattr(index, "codec", None)
    full_spec = getattr(index, "full_spec", None)
    if codec is None or (full_spec is not None and full_spec["dim"] == index.query_dim):
        return queries
    return lifted(codec, codec.project(queries))


def index_mmr(index, queries, hits: "Hits", lam: float, k: int, encoded: bool = False):
    """`diversified` with an opened index's vectors: (Hits, sim(q, d) of them)."""
    if encoded:
        raise ParameterError("MMR compares float query vectors with the stored ones, not "
                             "codes", "mmr")
    return diversified(comparable(index, queries), hits, index.query_vectors,
                       index.score_metric, lam, k)
