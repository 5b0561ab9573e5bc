"""Searching an opened index: `Searcher` plans each batch (ANN, exact, filtered, rescored) for
one folder; `LinkedSearcher` runs one per shard of a linked index and merges their top k.

Scores are similarities, larger is better, whatever the metric: cos -> cosine, ip -> dot
product, l2sq -> minus the squared distance, hamming -> the fraction of equal bits
(`distance_to_score` converts usearch distances). i8 scores are always the float query against
the decoded codes (asymmetric); b1 scores are hamming-based unless rescored. Codes the graph
cannot search are scored through their codec (the float query against what they decode to, in
the score metric): pq codes (ADC) by an exact scan, and several bit planes (Tencent's residual
binarisation) by the first plane's hamming candidates rescored with every plane, or by an exact
scan of every plane when the search is exact.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vecpipe.core.index_build import interruptible
from vecpipe.formats.errors import ParameterError
from vecpipe.core.index_format import FULL, from_index_codes, index_numpy_dtype, index_width
from vecpipe.core.vectors import Hits, distance_to_score, paired_similarity, sorted_hits
from vecpipe.formats.errors import DataError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from vecpipe.core.index_format import IndexReader

_OVERSAMPLE = 2.0          # filtered ANN fetches this many times the expected need
_HNSW_COST = 32            # ~distance computations per HNSW result, vs 1 per row for exact
# i8 codes carry per-dimension scales, so the graph's code-space neighbours are not quite the
# float ones: fetching 4x candidates and rescoring them against the float query took recall@10
# on real MiniLM vectors from 0.86 to 0.97 (bench/search.py).
_SCALAR_CODES_RESCORE = 4
# the first bit plane's hamming neighbours, rescored with all K planes: on 100k real vectors
# k*10 keeps recall@10 0.77 of the exact scan's 0.79 (2 planes) and 0.84 of 0.89 (4 planes)
# at ~2x the scan's speed; k*4 loses 4-10 points more (bench/code_index.py, BENCHMARKS.md)
_PLANES_RESCORE = 10
CODE_SCAN_BLOCK = 16_384   # codes decoded at a time by an exact scan through the codec
# Small indexes are searched exactly unless an ef asks for the graph: up to Qdrant's default
# full_scan_threshold, 10,000 KB of vectors scanned (6,666 float32 384-d vectors). On 2 Sapphire
# Rapids cores the scan matches HNSW's speed only up to ~1,000 vectors, but at 10 MB it still
# answers one query in under 1 ms (batches: ~3,000 queries/s) where the graph loses 1.3-2% of
# the top 10 (bench/exact_threshold.py, BENCHMARKS.md).
EXACT_SCAN_BYTES = 10_000 * 1024
KEEP_FULL_VECTORS = "rebuild the index keeping the full vectors"
ENCODE_KEEPING_FULL = "index the float vectors through the codec, keeping them"


class Searcher:
    """Search one index folder (an OpenIndex) with fixed options, for one batch of queries after another.

    - `k` hits per query (fewer only when fewer rows exist, pass the filter, or reach
      `min_score`).
    - `exact`: brute force in the index space instead of HNSW; indexes of at most
      EXACT_SCAN_BYTES of vectors are searched so unless `ef` is given. `ef`: HNSW
      expansion_search, for this searcher only.
    - `rescore=MULT`: fetch k*MULT candidates, rescore them with the kept full vectors (or, with
      no full vectors, the float query against the decoded codes), keep k. i8 indexes always
      score the float query against the decoded codes, by default on k*4 candidates; multi-bit
      b1 indexes on k*10 first-plane candidates. pq indexes are scanned through their codec;
      `rescore` rescores the scan's top k*MULT with the kept full vectors.
    - `mask`: bool per row (True = allowed). Few allowed rows: exact search over them; many:
      oversampled ANN, post-filtered, and any query left short is redone exactly, so a filter
      that matches >= k rows always returns k hits.
    """

    def __init__(self, index: "IndexReader", k: int, exact: bool = False, ef: int | None = None,
                 rescore: int | None = None, min_score: float | None = None, mask=None,
                 threads: int = 0):
        import numpy as np

        if k < 1:
            raise ParameterError("k (hits per query) must be at least 1", "k")
        self.index, self.k, self.exact, self.min_score, self.threads = \
            index, k, exact, min_score, threads
        self.rescore_source = _rescore_source(index, rescore)
        self.rescore_requested = rescore is not None
        default_multiple = _PLANES_RESCORE if index.planes > 1 else _SCALAR_CODES_RESCORE
        self.want = k * (rescore or (default_multiple if self.rescore_source == "codes"
                                     else 1))
        # an exact search of these codes scores every one through the codec, not the graph
        self.scans_codes = index.codec is not None and index.codec.scored_decoded
        if ef is not None and index.flat:
            raise ParameterError("the search expansion (ef) tunes HNSW search; this index "
                                 "is flat (always exact)", "ef")
        self.ef = ef
        self.allowed = None if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
        if self.allowed is not None and len(self.allowed) == index.count:
            self.allowed = None  # the filter keeps everything
        self._allowed_vectors = None
        self.plan = self._plan()

    def _plan(self) -> str:
        """none | exact | ann | exact-subset | ann-filtered (see the class docstring)."""
        n = self.index.count
        exact = self.exact or self.index.flat or (self.ef is None and self._small())
        if self.allowed is None:
            return "exact" if exact or self.want >= n else "ann"
        m = len(self.allowed)
        if m == 0:
            return "none"
        if exact or m <= self._fetch() * _HNSW_COST or self._fetch() >= n // 2:
            return "exact-subset"
        return "ann-filtered"

    def _small(self) -> bool:
        """At most EXACT_SCAN_BYTES to scan: the index-space vectors, or for codes scanned
        through the codec what they decode to (float32)."""
        import numpy as np

        index = self.index
        if self.scans_codes:
            row_bytes = 4 * index.codec.out_dim
        else:
            row_bytes = index_width(index.dim, index.dtype) * \
                np.dtype(index_numpy_dtype(index.dtype)).itemsize
        return index.count * row_bytes <= EXACT_SCAN_BYTES

    def _fetch(self) -> int:
        """ANN results to fetch so that ~`want` of them pass the filter."""
        n, m = self.index.count, len(self.allowed)
        return min(n, int(math.ceil(self.want * n / m * _OVERSAMPLE)) + self.want)

    def search(self, queries, encoded: bool = False) -> Hits:
        """`queries`: float32 (queries x query_dim), or index-space codes with `encoded`."""
        import numpy as np

        queries = np.asarray(queries)
        if encoded and self.rescore_requested:
            raise ParameterError("rescoring needs float query vectors, not codes", "rescore")
        if encoded and self.index.dtype == "pq":
            raise UsageError("pq codes are searched with float query vectors, not codes",
                             source=self.index.path)
        if self.scans_codes and not encoded and self.plan in ("exact", "exact-subset"):
            candidates = self._code_scan(self.index.checked_queries(queries))
            rescore = self.rescore_source == "full"  # the scan scored the codes already
        else:
            coded = queries if encoded else self.index.encode(queries)
            candidates = self._candidates(self._first_plane(coded))
            rescore = self.rescore_source is not None and not encoded
        if rescore:
            candidates = self._rescored(queries, candidates.rows)
        return sorted_hits(candidates.rows, candidates.scores, self.k) \
            .thresholded(self.min_score)

    def _first_plane(self, coded):
        """The graph holds a multi-bit b1 index's first bit plane: the codes' first columns."""
        if self.index.planes == 1:
            return coded
        return coded[:, :index_width(self.index.dim, self.index.dtype)]

    def _code_scan(self, queries) -> Hits:
        """The exact best of every code (or of the allowed rows), each decoded by the codec
        and scored against the float query in the score metric (for pq the inner product with
        the reconstruction is ADC): k, or `want` when kept full vectors rescore them."""
        import numpy as np

        from vecpipe.core.vectors import ExactSearch

        codec, rows = self.index.codec, self.allowed
        total = self.index.count if rows is None else len(rows)
        count = min(self.want if self.rescore_source == "full" else self.k, total)
        search = ExactSearch(codec.project(queries), count, self.index.score_metric,
                             query_block=256)
        for start in range(0, total, CODE_SCAN_BLOCK):
            stop = min(start + CODE_SCAN_BLOCK, total)
            block = np.arange(start, stop) if rows is None else rows[start:stop]
            codes = from_index_codes(codec, self.index.stored_vectors(block))
            search.add(codec.decode(codes), start)
        hits = search.hits()
        if rows is None:
            return hits
        return Hits(np.where(hits.rows >= 0, rows[np.maximum(hits.rows, 0)], -1), hits.scores)

    def _candidates(self, coded) -> Hits:
        import numpy as np

        n = self.index.count
        if self.plan == "none" or len(coded) == 0:
            return Hits(np.full((len(coded), 0), -1, np.int64),
                        np.zeros((len(coded), 0), np.float32))
        if self.plan == "exact":
            return self._search_graph(coded, min(self.want, n), exact=True)
        if self.plan == "exact-subset":
            return self._exact_subset(coded)
        if self.plan == "ann":
            return self._complete(coded, self._search_graph(coded, self.want, exact=False), n,
                                  lambda q: self._search_graph(q, self.want, exact=True))
        return self._complete(coded, self._ann_filtered(coded), len(self.allowed),
                              self._exact_subset)

    def _complete(self, coded, hits: Hits, available: int, exact) -> Hits:
        """Redo exactly the queries that came back with fewer candidates than exist."""
        import numpy as np

        short = np.flatnonzero(hits.counts < min(self.want, available))
        if len(short) == 0:
            return hits
        redo = exact(coded[short])
        width = max(hits.rows.shape[1], redo.rows.shape[1])
        rows, scores = _padded(hits, width)
        rows[short], scores[short] = _padded(redo, width)
        return Hits(rows, scores)

    def _search_graph(self, coded, count: int, exact: bool) -> Hits:
        if self.index.flat:
            found = self._scan(self.index.flat_vectors(), coded, count)
        else:
            graph = self.index.graph
            # set for each search: searchers with other ef may share the opened index
            graph.expansion_search = self.ef or self.index.manifest["hnsw"]["expansion_search"]
            with interruptible():
                found = graph.search(coded, count, exact=exact, threads=self.threads)
        return self._to_hits(found, count)

    def _to_hits(self, found, count: int, row_of_key=None) -> Hits:
        import numpy as np

        keys, distances, counts = _match_arrays(found, count)
        valid = np.arange(count)[None, :] < counts[:, None]
        keys = np.where(valid, keys, 0)
        rows = np.where(valid, keys if row_of_key is None else row_of_key[keys], -1)
        scores = distance_to_score(self.index.metric, distances, self.index.dim)
        return Hits(rows, np.where(valid, scores, -np.inf).astype(np.float32))

    def _exact_subset(self, coded) -> Hits:
        if self._allowed_vectors is None:
            self._allowed_vectors = self.index.graph_vectors(self.allowed)
        count = min(self.want, len(self.allowed))
        found = self._scan(self._allowed_vectors, coded, count)
        return self._to_hits(found, count, row_of_key=self.allowed)

    def _scan(self, vectors, coded, count: int):
        """usearch's exact brute force over index-space vectors (keys = their positions)."""
        from usearch.index import search

        with interruptible():
            return search(vectors, coded, count, self.index.metric, exact=True,
                          threads=self.threads)

    def _ann_filtered(self, coded) -> Hits:
        import numpy as np

        hits = self._search_graph(coded, self._fetch(), exact=False)
        allowed = np.zeros(self.index.count + 1, dtype=bool)
        allowed[self.allowed] = True
        ok = allowed[hits.rows]  # row -1 reads the sentinel False at the end
        order = np.argsort(~ok, axis=1, kind="stable")[:, :self.want]
        rows = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(hits.rows, order, 1),
                        -1)
        return Hits(rows, np.take_along_axis(hits.scores, order, 1))

    def _rescored(self, queries, rows) -> Hits:
        import numpy as np

        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        if self.rescore_source == "full" and queries.shape[1] != self.index.full_spec["dim"]:
            raise DataError(f"rescoring with {FULL} needs {self.index.full_spec['dim']}-"
                            f"dimensional queries, not {queries.shape[1]} (already truncated)",
                            source=self.index.path, hint="give the untruncated query vectors")
        if self.rescore_source == "codes":
            queries = self.index.codec.project(queries)
        for start in range(0, len(rows), 256):
            block = rows[start:start + 256]
            vectors = self._rescore_vectors(np.where(block >= 0, block, 0))
            scores[start:start + 256] = paired_similarity(
                self.index.score_metric, queries[start:start + 256], vectors)
        return Hits(rows, np.where(rows >= 0, scores, -np.inf))

    def _rescore_vectors(self, rows):
        """Float vectors to rescore with, for a (queries x candidates) block of rows."""
        import numpy as np

        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        if self.rescore_source == "full":
            vectors = np.asarray(self.index.full_vectors()[unique], dtype=np.float32)
        else:
            codec = self.index.codec
            vectors = codec.decode(from_index_codes(codec, self.index.stored_vectors(unique)))
        return vectors[inverse].reshape(*rows.shape, -1)


RANGE_FIRST_DEPTH = 64  # range search's first depth when asked for fewer: rounds cost a search


def range_hits(search, queries: int, min_score: float, max_hits: int, depth: int = 0) -> Hits:
    """Every hit scoring >= `min_score`, at most `max_hits` per query (faiss `range_search`,
    capped): `search(which, k)` -> Hits of the queries numbered `which` for k hits, best first.
    The depth starts at max(depth, RANGE_FIRST_DEPTH) and doubles for the queries whose last hit
    still scores >= min_score, until it comes back short (no more rows, or none passing a
    filter) or max_hits are found. Exact when `search` is; over HNSW each round is as
    approximate as a top-k search that deep."""
    import numpy as np

    if max_hits < 1:
        raise ParameterError("the most hits per query must be at least 1", "max_hits")
    k = min(max(depth, RANGE_FIRST_DEPTH), max_hits)
    which = np.arange(queries)
    rows = np.full((queries, 0), -1, dtype=np.int64)
    scores = np.zeros((queries, 0), dtype=np.float32)
    while len(which):
        hits = search(which, k)
        if hits.rows.shape[1] > rows.shape[1]:
            rows, scores = _padded(Hits(rows, scores), hits.rows.shape[1])
        rows[which], scores[which] = _padded(hits, rows.shape[1])
        last = hits.scores[:, -1] if hits.rows.shape[1] else np.full(len(which), -np.inf)
        deeper = (hits.counts >= k) & (last >= min_score)
        if k >= max_hits:
            break
        which, k = which[deeper], min(2 * k, max_hits)
    hits = sorted_hits(rows, scores, max_hits).thresholded(min_score)
    width = int(hits.counts.max()) if queries else 0
    return Hits(hits.rows[:, :width], hits.scores[:, :width])


def _match_arrays(found, count: int):
    """usearch results as (keys, distances) of queries x count and found counts; usearch answers
    a single query with a trimmed `Matches` instead of `BatchMatches`."""
    import numpy as np

    if hasattr(found, "counts"):
        return (np.asarray(found.keys).reshape(-1, count).astype(np.int64),
                np.asarray(found.distances, dtype=np.float32).reshape(-1, count),
                np.asarray(found.counts).reshape(-1))
    n = len(found.keys)
    keys = np.zeros((1, count), dtype=np.int64)
    distances = np.zeros((1, count), dtype=np.float32)
    keys[0, :n], distances[0, :n] = found.keys, found.distances
    return keys, distances, np.array([n])


def _padded(hits: Hits, width: int):
    import numpy as np

    rows = np.full((len(hits.rows), width), -1, dtype=np.int64)
    scores = np.full((len(hits.rows), width), -np.inf, dtype=np.float32)
    rows[:, :hits.rows.shape[1]] = hits.rows
    scores[:, :hits.rows.shape[1]] = hits.scores
    return rows, scores


def _rescore_source(index: "IndexReader", rescore: int | None) -> str | None:
    """'full' (kept vectors), 'codes' (float query vs decoded codes) or None."""
    from vecpipe.core.codec import SCALAR_TARGETS

    if rescore is not None and rescore < 1:
        raise ParameterError("the rescore multiple must be at least 1", "rescore")
    scalar_codes = index.codec is not None and index.codec.to in SCALAR_TARGETS
    if rescore is None:
        return "codes" if scalar_codes or index.planes > 1 else None
    if index.full_spec is not None:
        if index.full_spec["dim"] != index.query_dim:  # `index` refuses to build these now
            raise DataError(f"{FULL} holds {index.full_spec['dim']}-dimensional vectors, the "
                            f"queries have {index.query_dim}: it kept the reduced vectors of a "
                            "compressed stream, which cannot rescore", source=index.path,
                            hint="search without rescoring, or rebuild the index from the "
                                 "uncompressed vectors")
        return "full"
    if index.dtype == "pq":
        raise ParameterError("a pq index is scanned through its codes already; rescoring "
                             "them needs the full vectors", "rescore",
                             hint=ENCODE_KEEPING_FULL)
    if index.codec is not None:
        return "codes"
    raise ParameterError("the index stores no full-precision vectors to rescore with, and no "
                         "quantized (i8/b1) codes to decode", "rescore",
                         hint=KEEP_FULL_VECTORS)


# "More like these" (Rocchio with no query text; Qdrant's average_vector strategy): the query is
# the liked records' centroid, and with unliked ones that centroid moved away from theirs by the
# difference, 2 * mean(like) - mean(unlike). The plain difference mean(like) - mean(unlike) loses
# where the liked records are: for near-duplicate like and unlike it is mostly noise, and under
# l2sq a difference is not a point among the vectors at all.
LIKE_WEIGHT, UNLIKE_WEIGHT = 2.0, 1.0


class LikeQuery:
    """A query made of stored records: `like` ids (at least one) and optional `unlike` ids,
    looked up among the visible rows (an unknown id is a DataError naming it). `vector`
    (1 x query_dim float32) is searched as a float query, so filters, rescoring and exact
    search apply as to any query; the records themselves are left out of the hits.

    Each record's vector is `query_vectors` (the kept full vectors, else the stored ones
    decoded); under cos they are scaled to unit length first, so each record weighs the same;
    the query is then `LIKE_WEIGHT * mean(like) - UNLIKE_WEIGHT * mean(unlike)` (with no unlike
    ids: mean(like)), scaled to unit length for cos and ip (for ip that changes the scores, not
    the order) and left as it is for l2sq, where it is a point among the vectors.
    """

    def __init__(self, index: "IndexReader", like, unlike=()):
        import numpy as np

        self.index = index
        self.like_rows = rows_of_ids(index, like)
        self.unlike_rows = rows_of_ids(index, unlike)
        if len(self.like_rows) == 0:
            raise UsageError("a query made of stored records needs at least one liked id")
        self.excluded = np.union1d(self.like_rows, self.unlike_rows)
        self.vector = self._vector()

    def _vector(self):
        import numpy as np

        metric = self.index.score_metric
        vectors = self.index.query_vectors(np.concatenate([self.like_rows, self.unlike_rows]))
        vectors = vectors.astype(np.float64)
        if metric == "cos":
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        liked, unliked = vectors[:len(self.like_rows)], vectors[len(self.like_rows):]
        query = liked.mean(axis=0)
        if len(unliked):
            query = LIKE_WEIGHT * query - UNLIKE_WEIGHT * unliked.mean(axis=0)
        if metric in ("cos", "ip"):
            norm = np.linalg.norm(query)
            if not norm > 1e-6 * max(1.0, np.abs(vectors).max()):
                raise DataError("the records' vectors cancel out: no direction to search in",
                                source=self.index.path)
            query = query / norm
        return query[None, :].astype(np.float32)

    def searched_k(self, k: int) -> int:
        """Hits to ask a Searcher for, so that k remain once the records are left out."""
        return k + len(self.excluded)

    def hits(self, searcher, k: int) -> Hits:
        """The top k from `searcher` (built for `searched_k(k)`), the records left out."""
        return without_rows(searcher.search(self.vector), self.excluded, k)


def rows_of_ids(index: "IndexReader", ids) -> "np.ndarray":
    """Row numbers of `ids` (duplicates dropped, order kept) among the visible rows (a linked
    index's shadowed copies are not); an unknown id is a DataError naming it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = list(dict.fromkeys(ids))
    if not ids:
        return np.zeros(0, dtype=np.int64)
    column = index.ids()
    found = pc.is_in(column, value_set=pa.array(ids, column.type))
    found = np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)
    visible = index.visible_mask()
    if visible is not None:
        found &= visible
    rows = np.flatnonzero(found)
    row_of = dict(zip(column.take(pa.array(rows)).to_pylist(), rows.tolist()))
    missing = [value for value in ids if value not in row_of]
    if missing:
        more = f" (and {len(missing) - 1} more unknown)" if len(missing) > 1 else ""
        raise DataError(f"no record has id {missing[0]!r}{more}", source=index.path)
    return np.array([row_of[value] for value in ids], dtype=np.int64)


def without_rows(hits: Hits, rows, k: int) -> Hits:
    """`hits` with `rows` left out, the best k kept per query."""
    import numpy as np

    dropped = np.isin(hits.rows, rows)
    return sorted_hits(np.where(dropped, -1, hits.rows), hits.scores, k)


class LinkedSearcher:
    """One Searcher per shard; results merged into the top k by score (ties by row)."""

    def __init__(self, index: "IndexReader", k: int, mask=None, **options):
        import numpy as np

        self.index, self.k = index, k
        allowed = index.visible_mask()
        if mask is not None:
            allowed &= np.asarray(mask, dtype=bool)
        self.searchers = []
        for number, shard in enumerate(index.shards):
            start, stop = index.offsets[number], index.offsets[number + 1]
            shard_mask = allowed[start:stop]
            self.searchers.append(shard.searcher(
                k, mask=None if shard_mask.all() else shard_mask, **options))

    def search(self, queries, encoded: bool = False):
        import numpy as np

        if encoded and self.index.codec is None and self.index.dtype in ("i8", "b1", "pq"):
            raise UsageError("the shards use different codecs: query with float vectors")
        rows, scores = [], []
        for offset, searcher in zip(self.index.offsets, self.searchers):
            hits = searcher.search(queries, encoded=encoded)
            rows.append(np.where(hits.rows >= 0, hits.rows + offset, -1))
            scores.append(hits.scores)
        return sorted_hits(np.concatenate(rows, axis=1), np.concatenate(scores, axis=1),
                           self.k)
