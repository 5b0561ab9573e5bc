"""Vectors and scores: normalisation, similarity in every metric, and exact top-k.

Every exact search (search over a stream, eval beir, mine-negatives, the compress report)
ranks through `ExactSearch` and its running `TopK`, so ties and scores agree across commands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from vecpipe.formats.errors import UsageError

if TYPE_CHECKING:
    import numpy as np


def normalized(vectors: "np.ndarray") -> "np.ndarray":
    """Rows scaled to unit length (a view when they already are)."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if len(vectors) and np.allclose(norms, 1.0, atol=1e-4):
        return vectors
    return vectors / np.maximum(norms, 1e-12)


def _unit(vectors: "np.ndarray") -> "np.ndarray":
    """Vectors (along the last axis) scaled to unit length, always divided: scores stay those
    of the float math, not of a shortcut."""
    import numpy as np

    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-30)


def distance_to_score(metric: str, distances, bits: int | None = None):
    """usearch distances -> similarities (larger is better). usearch's cos and ip distances are
    1 - similarity, l2sq is the squared distance, hamming counts differing bits."""
    if metric in ("cos", "ip"):
        return 1.0 - distances
    if metric == "l2sq":
        return -distances
    return 1.0 - distances / bits


def similarity(metric: str, queries, vectors) -> "np.ndarray":
    """Scores of every query against every vector (queries x vectors), in the convention of
    `distance_to_score`; `metric` hamming takes packed-bit (uint8) vectors."""
    import numpy as np

    if metric == "hamming":
        from vecpipe.core.codec import hamming_distances

        bits = vectors.shape[1] * 8
        return (1.0 - hamming_distances(queries, vectors) / bits).astype(np.float32)
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(vectors, dtype=np.float32)
    if metric == "cos":
        return _unit(q) @ _unit(x).T
    if metric == "ip":
        return q @ x.T
    if metric == "l2sq":
        return -((q * q).sum(1)[:, None] - 2 * (q @ x.T) + (x * x).sum(1)[None, :])
    raise UsageError(f"unknown metric {metric!r}")


def paired_similarity(metric: str, queries, candidates) -> "np.ndarray":
    """Scores of query i against its own candidates[i] (queries x candidates x dim)."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(candidates, dtype=np.float32)
    if metric == "cos":
        q, x = _unit(q), _unit(x)
    if metric in ("cos", "ip"):
        return np.einsum("qd,qkd->qk", q, x)
    diff = x - q[:, None, :]
    return -np.einsum("qkd,qkd->qk", diff, diff)


class TopK:
    """The running best `k` (score, row) per query over blocks of scores (exact stream search)."""

    def __init__(self, queries: int, k: int):
        import numpy as np

        self.k = k
        self.scores = np.full((queries, 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((queries, 0), dtype=np.int64)

    def update(self, scores, first_row: int, allowed=None) -> None:
        """`scores`: queries x block; rows are first_row + column; `allowed`: bool per column."""
        import numpy as np

        scores = np.asarray(scores, dtype=np.float32)
        columns = np.arange(scores.shape[1], dtype=np.int64)
        if allowed is not None:
            scores, columns = scores[:, allowed], columns[allowed]
        if scores.shape[1] > self.k:
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            scores, rows = np.take_along_axis(scores, part, 1), columns[part] + first_row
        else:
            rows = np.broadcast_to(columns + first_row, scores.shape)
        merged = sorted_hits(np.concatenate([self.rows, rows], axis=1),
                             np.concatenate([self.scores, scores], axis=1), self.k)
        self.rows, self.scores = merged.rows, merged.scores


@dataclass
class Hits:
    """Search results: `rows` (queries x width, -1 = no hit), `scores` (same shape, sorted
    descending per query, ties by row), `counts` = hits per query."""

    rows: "np.ndarray"
    scores: "np.ndarray"

    @property
    def counts(self):
        return (self.rows >= 0).sum(axis=1)

    def thresholded(self, min_score: float | None) -> "Hits":
        import numpy as np

        if min_score is None:
            return self
        keep = (self.rows >= 0) & (self.scores >= min_score)
        return Hits(np.where(keep, self.rows, -1), np.where(keep, self.scores, -np.inf))


def sorted_hits(rows, scores, width: int) -> Hits:
    """Order candidates by score, ties by row, and keep `width` per query."""
    import numpy as np

    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    if rows.shape[1] == 0:
        return Hits(rows.astype(np.int64), scores)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores),
                       axis=1)[:, :width]
    rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    return Hits(np.where(scores > -np.inf, rows, -1).astype(np.int64), scores)


class ExactSearch:
    """Exact top-k of `queries` over vectors given block by block (a stream, or an array cut
    into blocks). Each block is scored against `query_block` queries at a time (all at once
    with None) by `score` (default: `similarity` in `metric`) and merged into a running best k
    per query; ties go to the lower row. Memory: query_block x block scores."""

    def __init__(self, queries, k: int, metric: str = "ip", query_block: int | None = None,
                 score: Callable | None = None):
        self.queries = queries
        self.score = score or (lambda chunk, vectors: similarity(metric, chunk, vectors))
        self.step = query_block or max(len(queries), 1)
        self.tops = [(start, TopK(len(queries[start:start + self.step]), k))
                     for start in range(0, len(queries), self.step)]

    def add(self, vectors, first_row: int, allowed=None) -> None:
        """Score the vectors whose rows are first_row + i; `allowed`: bool per vector."""
        for start, top in self.tops:
            top.update(self.score(self.queries[start:start + self.step], vectors), first_row,
                       allowed)

    def hits(self) -> Hits:
        """The best k so far: queries x min(k, vectors allowed), best first."""
        import numpy as np

        if not self.tops:
            return Hits(np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
        return Hits(np.concatenate([top.rows for _, top in self.tops]),
                    np.concatenate([top.scores for _, top in self.tops]))


def exact_top_k(queries, corpus, k: int, metric: str = "ip", block_rows: int = 1 << 16,
                allowed=None) -> Hits:
    """Best `k` rows of an in-memory `corpus` per query (an ExactSearch over blocks of
    `block_rows` rows); `allowed`: bool per corpus row."""
    search = ExactSearch(queries, k, metric)
    for start in range(0, len(corpus), block_rows):
        search.add(corpus[start:start + block_rows], start,
                   None if allowed is None else allowed[start:start + block_rows])
    return search.hits()


def top_k(scores, k: int) -> Hits:
    """Best `k` columns per row of a score matrix already computed, best first."""
    top = TopK(len(scores), k)
    top.update(scores, 0)
    return Hits(top.rows, top.scores)
