"""Hits grouped by a stored field (chunks back to documents, as Qdrant's group_by): k distinct
groups per query, each with its best `size` hits, scored by the max, sum or mean of those.

A group's sum and mean are over its best `size` hits, its max is its best hit. The candidates
deepen (doubling) for the queries that find fewer than k groups, or a kept group with fewer
hits than it has rows (up to `size`), while more rows remain; the max is exact once k groups
are found (a group not fetched scores at most the last candidate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from vecpipe.core.vectors import Hits
from vecpipe.formats.errors import ParameterError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

GROUP_SCORES = ("max", "sum", "mean")
FIRST_DEPTH = 100   # the least first-stage depth, and k*size times DEPTH_FACTOR above it
DEPTH_FACTOR = 4


@dataclass
class Groups:
    """Kept hits, group by group (best group first, its hits best first): `hits` (queries x
    k*size, -1 = none), `group_scores` beside each hit, `positions` = each hit's column in the
    hits grouped, `counts` = groups found per query (before the cut at k)."""

    hits: Hits
    group_scores: "np.ndarray"
    positions: "np.ndarray"
    counts: "np.ndarray"

    def trimmed(self) -> "Groups":
        width = int(self.hits.counts.max()) if len(self.counts) else 0
        return Groups(Hits(self.hits.rows[:, :width], self.hits.scores[:, :width]),
                      self.group_scores[:, :width], self.positions[:, :width], self.counts)


def check_grouping(k: int, size: int, how: str) -> None:
    if how not in GROUP_SCORES:
        raise ParameterError(f"unknown group score {how!r}; use {'|'.join(GROUP_SCORES)}",
                             "score")
    if size < 1:
        raise ParameterError("a group keeps at least 1 hit", "size")
    if k < 1:
        raise ParameterError("at least 1 group per query", "k")


def first_depth(k: int, size: int) -> int:
    return max(k * size * DEPTH_FACTOR, FIRST_DEPTH)


def group_keys(column: "pa.ChunkedArray | pa.Array") -> "np.ndarray":
    """A stored column as int64 group codes, one per index row (-1: null, in no group)."""
    import numpy as np
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    try:
        encoded = column.dictionary_encode()
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise ParameterError(f"values of type {column.type} cannot be grouped; group by a "
                             "scalar field", "field") from None
    return np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)


def group_hits(hits: Hits, keys, k: int, size: int = 1, how: str = "max") -> Groups:
    """The k best groups of each query's hits (rows index `keys`); a group is scored by its
    best hit (max), or the sum or mean of its best `size`; ties: the group whose best hit
    comes first. Hits in no group (key -1) are left out."""
    import numpy as np

    check_grouping(k, size, how)
    queries, width = len(hits.rows), k * size
    rows = np.full((queries, width), -1, np.int64)
    scores = np.full((queries, width), -np.inf, np.float32)
    group_scores = np.full((queries, width), np.nan, np.float32)
    positions = np.full((queries, width), -1, np.int64)
    query, position = np.nonzero(hits.rows >= 0)
    key = np.asarray(keys)[hits.rows[query, position]]
    query, position, key = query[key >= 0], position[key >= 0], key[key >= 0]
    score = hits.scores[query, position].astype(np.float64)
    order = np.lexsort((position, -score, key, query))
    query, position, key, score = query[order], position[order], key[order], score[order]
    if not len(query):
        return Groups(Hits(rows, scores), group_scores, positions, np.zeros(queries, np.int64))
    group, start = _runs(query, key)
    within = np.arange(len(query)) - start[group]
    kept = within < size
    group_score = _group_scores(score, group, start, kept, how)
    group_query = query[start]
    rank = _ranks(group_query, np.lexsort((position[start], -group_score, group_query)))
    chosen = np.flatnonzero(kept & (rank[group] < k))
    chosen = chosen[np.lexsort((within[chosen], rank[group[chosen]], query[chosen]))]
    into, slot = query[chosen], _ranks(query[chosen], np.arange(len(chosen)))
    rows[into, slot] = hits.rows[into, position[chosen]]
    scores[into, slot] = score[chosen]
    group_scores[into, slot] = group_score[group[chosen]]
    positions[into, slot] = position[chosen]
    return Groups(Hits(rows, scores), group_scores, positions,
                  np.bincount(group_query, minlength=queries))


def _runs(query, key):
    """For sorted (query, key) pairs: each pair's run number and each run's first index."""
    import numpy as np

    new = np.ones(len(query), bool)
    new[1:] = (query[1:] != query[:-1]) | (key[1:] != key[:-1])
    return np.cumsum(new) - 1, np.flatnonzero(new)


def _group_scores(score, group, start, kept, how):
    import numpy as np

    if how == "max":
        return score[start]
    total = np.bincount(group[kept], weights=score[kept], minlength=len(start))
    return total if how == "sum" else total / np.bincount(group[kept], minlength=len(start))


def _ranks(query, order):
    """The 0-based rank of each item within its query when the items are taken in `order`
    (sorted by query first)."""
    import numpy as np

    ranks = np.empty(len(order), np.int64)
    ordered = query[order]
    new = np.ones(len(order), bool)
    new[1:] = ordered[1:] != ordered[:-1]
    firsts = np.flatnonzero(new)
    ranks[order] = np.arange(len(order)) - firsts[np.cumsum(new) - 1]
    return ranks


def deepened_groups(search: Callable[["np.ndarray", int], Hits], hits: Hits, keys, k: int,
                    size: int, how: str, depth: int, total: int) -> Groups:
    """`group_hits` of first-stage `hits` (`depth` asked per query), searching again twice as
    deep, `search(which, depth)` -> Hits of the queries numbered `which`, for those with fewer
    than k groups, until they have k, the search comes back short (no more rows, or none
    passing a filter or a minimum score) or the depth reaches `total` rows."""
    import numpy as np

    keys = np.asarray(keys)
    sizes = np.minimum(np.bincount(keys[keys >= 0]), size)  # the hits each group can keep
    groups = group_hits(hits, keys, k, size, how)
    which = np.flatnonzero(_short(groups, hits, keys, sizes, k, depth, total))
    while len(which):
        depth = min(2 * depth, total)
        hits = search(which, depth)
        part = group_hits(hits, keys, k, size, how)
        groups.hits.rows[which], groups.hits.scores[which] = part.hits.rows, part.hits.scores
        groups.group_scores[which], groups.positions[which] = part.group_scores, part.positions
        groups.counts[which] = part.counts
        which = which[_short(part, hits, keys, sizes, k, depth, total)]
    return groups.trimmed()


def _short(groups: Groups, hits: Hits, keys, sizes, k: int, depth: int, total: int):
    """Queries to search deeper: fewer than k groups, or a kept group with fewer hits than it
    has rows (up to the group size), while the search may still find more."""
    return (_incomplete(groups, keys, sizes) | (groups.counts < k)) \
        & (hits.counts >= depth) & (depth < total)


def _incomplete(groups: Groups, keys, sizes):
    import numpy as np

    rows = groups.hits.rows
    found = np.zeros(len(rows), bool)
    if sizes.max(initial=0) <= 1:
        return found
    for query, kept in enumerate(rows):
        held, counts = np.unique(keys[kept[kept >= 0]], return_counts=True)
        found[query] = bool((counts < sizes[held]).any())
    return found


def group_lines(query_ids: Iterable, values: Iterable, group_scores: Iterable) -> Iterator:
    """Grouped hit rows (a group's hits consecutive) -> one (query id, group value, rank,
    group score) per group, ranks from 1 per query: a TREC run of the groups."""
    last = previous = None
    rank = 0
    for query_id, value, score in zip(query_ids, values, group_scores):
        if (query_id, value) == last:
            continue
        rank = rank + 1 if query_id == previous else 1
        last, previous = (query_id, value), query_id
        yield query_id, str(value), rank, score
