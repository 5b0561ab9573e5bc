"""Hard-negative mining logic (numpy/pyarrow only), used by `vecpipe mine-negatives`.

Semantics follow sentence-transformers' `util.mine_hard_negatives`, so that with the same
model, exact search and `sampling="top"` the output is the same:

- Queries are grouped by their text; every row of a query adds a positive. Positives are
  de-duplicated by text (sentence-transformers de-duplicates its corpus by text).
- Each query retrieves `range_max + P` nearest corpus texts, P = the largest number of pair
  records any query has. Known positives (by id and by identical text), the query itself (by
  id and by identical text) and repeated texts are set aside. (An exact corpus is searched
  once per distinct text, as sentence-transformers de-duplicates its corpus; an index
  searches every record, so there a repeated text uses up a place.)
- Score filters on the rest: `absolute_margin` (keep a negative only if score <= positive -
  margin), `relative_margin` (score <= positive - |positive| * margin, so 0.05 = "95% of the
  positive"), `max_score`, `min_score`; the positive is the query's *lowest*-scoring positive,
  or, with `margin_per="positive"` (NV-Retriever's TopK-PercPos), each positive in turn: every
  (query, positive) pair is then mined on its own, against its own threshold.
- Then candidates too similar to a positive document (cosine of their vectors >=
  `max_positive_similarity`, LG-ANNA) and, in the command, a guide model's veto (GISTEmbed).
- BEIR judgments graded below the relevance level that makes a positive (0 < grade < level)
  are neither positives nor negatives: they are set aside like known positives.
- Survivors ranked by score: the first `range_max` are the window, its first `range_min` are
  skipped (so `range_min` counts survivors, as in sentence-transformers), and `num_negatives`
  are taken from the rest: the best (`top`) or a seeded random sample (`random`, reported in
  score order).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from vecpipe.formats.beir import BeirFiles

ANCHOR_FIELDS = ("query", "anchor")
POSITIVE = "positive"
POSITIVE_ID = "positive_id"
QUERY_ID = "query_id"
SHAPES = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
SAMPLINGS = ("top", "random")
ON_SHORT = ("drop", "keep")
# Removal reasons in the order the rules apply; each candidate is counted once, by the first.
EXCLUSION_RULES = ("known_positive", "query_itself", "judged_relevant", "duplicate_text")
SCORE_RULES = ("absolute_margin", "relative_margin", "max_score", "min_score")
VECTOR_RULES = ("max_positive_similarity", "guide")
MARGIN_PER = ("query", "positive")


# ---- options --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MiningOptions:
    num_negatives: int = 5
    range_min: int = 0
    range_max: int = 50
    min_score: float | None = None
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 0
    on_short: str = "drop"
    margin_per: str = "query"
    max_positive_similarity: float | None = None


# ---- pairs ----------------------------------------------------------------------------------

@dataclass
class Positive:
    id: str | None
    text: str | None
    source: str | None = None
    record: int | None = None
    row: int | None = None          # corpus row, once resolved


@dataclass
class Query:
    text: str
    ids: list = field(default_factory=list)
    positives: list = field(default_factory=list)
    rows: list = field(default_factory=list)   # corpus rows that are this query (id or text)
    records: int = 0                            # pair records naming this query
    instruction: str | None = None              # a per-record prompt (multi-task data)
    judged: list = field(default_factory=list)  # ids graded below the positive level
    judged_rows: list = field(default_factory=list)

    def add_positive(self, positive: Positive) -> None:
        for known in self.positives:
            if positive.id is not None and known.id == positive.id:
                return
            if positive.id is None and known.id is None and known.text == positive.text:
                return
        self.positives.append(positive)

    def dedupe_positives(self) -> None:
        """One positive per text (after texts are known), first one kept."""
        seen, kept = set(), []
        for positive in self.positives:
            if positive.text not in seen:
                seen.add(positive.text)
                kept.append(positive)
        self.positives = kept


@dataclass
class PairSet:
    """Queries in order of first appearance, each with its positives."""

    anchor_field: str
    queries: list
    rows: int

    @property
    def search_depth_extra(self) -> int:
        """What the search fetches beyond range_max to make room for known positives: the
        most pair records any query has (sentence-transformers' rule, duplicates included)."""
        return max((q.records for q in self.queries), default=0)


class _Grouper:
    def __init__(self):
        self.by_key: dict[tuple, Query] = {}   # (instruction, text)
        self.rows = 0

    def add(self, text, query_id, positive, positive_id, source=None, record=None,
            instruction=None) -> None:
        if not isinstance(text, str) or not text:
            raise DataError("empty or missing query text", source=source, record=record)
        if positive is None and positive_id is None:
            raise DataError("record has neither `positive` nor `positive_id`", source=source,
                            record=record)
        if positive is not None and not isinstance(positive, str):
            raise DataError(f"`positive` must be text, got {type(positive).__name__}",
                            source=source, record=record)
        if instruction is not None and not isinstance(instruction, str):
            raise DataError(f"the prompt field must be text, got {type(instruction).__name__}",
                            source=source, record=record)
        query = self.by_key.get((instruction, text))
        if query is None:
            query = self.by_key[(instruction, text)] = Query(text, instruction=instruction)
        if query_id is not None and str(query_id) not in query.ids:
            query.ids.append(str(query_id))
        query.add_positive(Positive(None if positive_id is None else str(positive_id), positive,
                                    source, record))
        query.records += 1
        self.rows += 1

    def result(self, anchor_field: str) -> PairSet:
        return PairSet(anchor_field, list(self.by_key.values()), self.rows)


def read_pairs(stream, prompt_field: str | None = None) -> PairSet:
    """Group a RecordStream of (query|anchor, positive and/or positive_id[, query_id]) records;
    `prompt_field` names a per-record instruction (queries differ by it as by their text)."""
    schema = stream.schema
    if schema is None:
        raise DataError("no pairs: the input is empty")
    anchor = next((name for name in ANCHOR_FIELDS if name in schema.names), None)
    if anchor is None:
        raise DataError(f"pairs need a `query` or `anchor` field; fields are "
                        f"{', '.join(schema.names)}")
    if POSITIVE not in schema.names and POSITIVE_ID not in schema.names:
        raise DataError(f"pairs need a `positive` or `positive_id` field; fields are "
                        f"{', '.join(schema.names)}")
    if prompt_field is not None and prompt_field not in schema.names:
        raise DataError(f"pairs have no prompt field {prompt_field!r}; fields are "
                        f"{', '.join(schema.names)}")
    grouper = _Grouper()
    wanted = (anchor, QUERY_ID, POSITIVE, POSITIVE_ID, prompt_field)
    for item in stream:
        columns = [item.batch.column(name).to_pylist() if name in item.batch.schema.names
                   else [None] * item.batch.num_rows for name in wanted]
        for offset, (text, query_id, positive, positive_id, instruction) in \
                enumerate(zip(*columns)):
            grouper.add(text, query_id, positive, positive_id, item.source,
                        item.first_record + offset, instruction)
    if not grouper.rows:
        raise DataError("no pairs: the input has no records")
    return grouper.result(anchor)


def beir_pairs(files: "BeirFiles", min_relevance: float = 1) -> PairSet:
    """Queries and positives of a BEIR split, in qrels order. A judgment is a positive when its
    grade is >= `min_relevance` (trec_eval's relevance level); one graded above 0 but below it
    is kept on its query (`judged`) so that it is mined as no negative either."""
    from vecpipe.formats.beir import read_queries
    from vecpipe.formats.trec import judgment_rows

    texts = read_queries(files.queries)
    grouper, judged = _Grouper(), {}
    for record, query_id, doc_id, judgment in judgment_rows(files.qrels):
        if query_id not in texts:
            raise DataError(f"query {query_id!r} is not in {os.path.basename(files.queries)}",
                            source=files.qrels, record=record)
        if judgment >= min_relevance:
            grouper.add(texts[query_id], query_id, None, doc_id, files.qrels, record)
        elif judgment > 0:
            judged.setdefault(texts[query_id], []).append(doc_id)
    if not grouper.rows:
        raise DataError(f"no judgements graded {min_relevance:g} or more in this split",
                        source=files.qrels)
    pairs = grouper.result("query")
    for query in pairs.queries:
        query.judged = judged.get(query.text, [])
    return pairs


# ---- corpus texts ----------------------------------------------------------------------------

def text_key(text: str) -> int:
    """A stable 64-bit integer for a text (seeds the per-query random sample)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def text_codes(texts: "pa.Array") -> "np.ndarray":
    """One integer per record, equal for records with identical text."""
    import pyarrow as pa

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    return texts.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype("int64")


def first_rows(values: list, column: "pa.Array") -> list:
    """For each value, the first row of `column` holding it, or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not values:
        return []
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = column.cast(pa.string())
    return pc.index_in(pa.array(values, pa.string()), value_set=column).to_pylist()


def join_fields(table: "pa.Table", fields: list[str], source: str | None = None) -> "pa.Array":
    """The text of each record: the given fields joined with a space, empty parts skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [name for name in fields if name not in table.schema.names]
    if missing:
        raise DataError(f"corpus has no field {missing[0]!r}; fields are "
                        f"{', '.join(table.schema.names)}", source=source)
    parts = [table.column(name).combine_chunks() for name in fields]
    for name, part in zip(fields, parts):
        if not (pa.types.is_string(part.type) or pa.types.is_large_string(part.type)
                or pa.types.is_null(part.type)):
            raise DataError(f"corpus field {name!r} is {part.type}, expected text", source=source)
    if len(parts) == 1:
        joined = parts[0].cast(pa.string())
    else:
        parts = [pc.if_else(pc.equal(p.cast(pa.string()), ""), None, p.cast(pa.string()))
                 for p in parts]
        joined = pc.binary_join_element_wise(*parts, " ", null_handling="skip")
    if joined.null_count:
        bad = int(pc.index(pc.is_null(joined), True).as_py()) + 1
        raise DataError("corpus record has no text", source=source, record=bad)
    return joined


# ---- the mining rules ------------------------------------------------------------------------

@dataclass
class Candidates:
    """One query's remaining candidates (corpus rows and scores, best first) and the scores of
    its positives (same scale: the retriever's, or the cross-encoder's after rescoring)."""

    rows: "np.ndarray"
    scores: "np.ndarray"
    positive_scores: "np.ndarray"
    # other scorers' (candidate scores, positive scores), e.g. the retriever's after a
    # cross-encoder rescored, kept for distillation
    extra: dict = field(default_factory=dict)

    def keep(self, mask) -> "Candidates":
        """The candidates at `mask` (booleans or positions, in that order)."""
        return Candidates(self.rows[mask], self.scores[mask], self.positive_scores,
                          {name: (found[mask], positives)
                           for name, (found, positives) in self.extra.items()})

    def for_positive(self, index: int) -> "Candidates":
        """The same candidates against one positive only."""
        part = slice(index, index + 1)
        return Candidates(self.rows, self.scores, self.positive_scores[part],
                          {name: (found, positives[part])
                           for name, (found, positives) in self.extra.items()})


@dataclass
class Stats:
    queries: int = 0
    candidates: int = 0
    removed: dict = field(default_factory=lambda: dict.fromkeys(
        EXCLUSION_RULES + SCORE_RULES + VECTOR_RULES, 0))
    beyond_range_max: int = 0
    skipped_range_min: int = 0
    not_sampled: int = 0
    queries_short: int = 0
    queries_without_negatives: int = 0
    queries_dropped: int = 0
    negatives: int = 0
    rows_written: int = 0
    positive_score_sum: float = 0.0
    positive_scores: int = 0
    negative_score_sum: float = 0.0

    def as_dict(self) -> dict:
        return {
            "queries": self.queries, "candidates_seen": self.candidates,
            "removed": dict(self.removed), "beyond_range_max": self.beyond_range_max,
            "skipped_range_min": self.skipped_range_min, "not_sampled": self.not_sampled,
            "queries_short": self.queries_short,
            "queries_without_negatives": self.queries_without_negatives,
            "queries_dropped": self.queries_dropped, "negatives": self.negatives,
            "rows_written": self.rows_written,
            "mean_positive_score": _mean(self.positive_score_sum, self.positive_scores),
            "mean_negative_score": _mean(self.negative_score_sum, self.negatives),
        }


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 6) if count else None


class Miner:
    """The per-query rules, in order, counting every candidate they remove."""

    def __init__(self, options: MiningOptions, codes=None):
        self.options = options
        self.stats = Stats()
        self._codes = codes  # corpus row -> text code (None: the corpus has no text)

    def exclude(self, query: Query, rows, scores, positive_scores) -> Candidates:
        """Drop known positives, the query itself and repeated texts from retrieved candidates
        (`rows` < 0 = no hit). Positives and the query are matched by corpus row (found by id
        or by text beforehand) and, through the text codes, by identical text."""
        import numpy as np

        found = rows >= 0
        rows, scores = rows[found], scores[found]
        self.stats.queries += 1
        self.stats.candidates += len(rows)
        self.stats.positive_scores += len(positive_scores)
        self.stats.positive_score_sum += float(np.sum(positive_scores, dtype=np.float64))
        positive_rows = [p.row for p in query.positives if p.row is not None]
        masks = {"known_positive": np.isin(rows, positive_rows),
                 "query_itself": np.isin(rows, query.rows),
                 "judged_relevant": np.isin(rows, query.judged_rows)}
        if self._codes is not None:
            codes = self._codes[rows]
            masks["known_positive"] |= np.isin(codes, self._codes[positive_rows])
            masks["query_itself"] |= np.isin(codes, self._codes[query.rows])
            masks["judged_relevant"] |= np.isin(codes, self._codes[query.judged_rows])
            masks["duplicate_text"] = ~_first_occurrences(codes)
        return self._apply(Candidates(rows, scores, positive_scores), masks)

    def filter_scores(self, candidates: Candidates) -> Candidates:
        """The margin and absolute score rules against the query's lowest positive score."""
        import numpy as np

        o, scores = self.options, candidates.scores
        masks = {}
        if o.absolute_margin is not None or o.relative_margin is not None:
            weakest = np.min(candidates.positive_scores)
            if o.absolute_margin is not None:
                masks["absolute_margin"] = scores + np.float32(o.absolute_margin) > weakest
            if o.relative_margin is not None:
                threshold = weakest - np.abs(weakest) * np.float32(o.relative_margin)
                masks["relative_margin"] = scores > threshold
        if o.max_score is not None:
            masks["max_score"] = scores > np.float32(o.max_score)
        if o.min_score is not None:
            masks["min_score"] = scores < np.float32(o.min_score)
        return self._apply(candidates, masks)

    def drop(self, candidates: Candidates, mask, rule: str) -> Candidates:
        return self._apply(candidates, {rule: mask})

    def _apply(self, candidates: Candidates, masks: dict) -> Candidates:
        import numpy as np

        removed = np.zeros(len(candidates.rows), dtype=bool)
        for rule, mask in masks.items():
            newly = mask & ~removed
            self.stats.removed[rule] += int(newly.sum())
            removed |= newly
        return candidates.keep(~removed)

    def choose(self, query: Query, candidates: Candidates, key: str | None = None
               ) -> Candidates | None:
        """The rank window and the sample (seeded by `key`, default the query text); None when
        the query (or pair) is dropped for being short."""
        import numpy as np

        o = self.options
        ranked = candidates.keep(np.argsort(-candidates.scores, kind="stable"))
        self.stats.beyond_range_max += max(0, len(ranked.rows) - o.range_max)
        self.stats.skipped_range_min += min(o.range_min, len(ranked.rows))
        ranked = ranked.keep(slice(o.range_min, o.range_max))
        take = min(o.num_negatives, len(ranked.rows))
        if o.sampling == "top":
            picked = np.arange(take)
        else:
            picked = np.sort(query_rng(o.seed, key or query.text).choice(
                len(ranked.rows), take, replace=False))
        self.stats.not_sampled += len(ranked.rows) - take
        chosen = ranked.keep(picked)
        if take < o.num_negatives:
            self.stats.queries_short += 1
            if take == 0:
                self.stats.queries_without_negatives += 1
            if o.on_short == "drop":
                self.stats.queries_dropped += 1
                return None
        self.stats.negatives += take
        self.stats.negative_score_sum += float(np.sum(chosen.scores, dtype=np.float64))
        return chosen


def positive_similarity(candidates: "np.ndarray", positives: "np.ndarray") -> "np.ndarray":
    """Each candidate vector's largest cosine to any of the positive vectors."""
    import numpy as np

    from vecpipe.core.vectors import normalized

    if len(candidates) == 0 or len(positives) == 0:
        return np.full(len(candidates), -np.inf, dtype=np.float32)
    return np.max(normalized(candidates) @ normalized(positives).T, axis=1)


def _first_occurrences(keys) -> "np.ndarray":
    import numpy as np

    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return first


def query_rng(seed: int, text: str):
    """A generator per (seed, query): a query's sample does not depend on batching or order."""
    import numpy as np

    return np.random.default_rng([seed, text_key(text)])


# ---- output row shapes -----------------------------------------------------------------------

@dataclass
class Mined:
    """One query's (or one pair's) outcome: its positives (texts, scores) and chosen negatives;
    `extra` holds other scorers' (positive scores, negative scores) by name."""

    query: str
    positives: list
    positive_scores: list
    negatives: list
    negative_scores: list
    instruction: str | None = None
    extra: dict = field(default_factory=dict)

    def score_sets(self, with_scores: bool) -> list:
        """(positive scores, negative scores) of each score column, the main one first."""
        if not with_scores:
            return []
        return [(self.positive_scores, self.negative_scores), *self.extra.values()]


def shape_schema(shape: str, anchor: str, num_negatives: int, with_scores: bool,
                 extra: tuple = (), prompt_field: str | None = None) -> "pa.Schema":
    """Columns as sentence-transformers' mine_hard_negatives names them; with scores, one more
    column per `extra` scorer (`<name>_scores`, `<name>_score`); the prompt field after the
    anchor."""
    import pyarrow as pa

    text, scores = pa.string(), pa.list_(pa.float64())
    head = [(anchor, text)] + ([(prompt_field, text)] if prompt_field else [])
    named = [f"{name}_scores" for name in extra] if with_scores else []
    if shape == "triplet":
        fields = head + [(POSITIVE, text), ("negative", text)]
        fields += [(name, scores) for name in ["scores", *named]] if with_scores else []
    elif shape == "n-tuple":
        fields = head + [(POSITIVE, text)]
        fields += [(f"negative_{i}", text) for i in range(1, num_negatives + 1)]
        fields += [(name, scores) for name in ["scores", *named]] if with_scores else []
    elif shape == "labeled-pair":
        fields = head + [(POSITIVE, text)]
        fields += [(name[:-1], pa.float64()) for name in ["scores", *named]] if with_scores \
            else [("label", pa.int64())]
    elif shape == "labeled-list":
        fields = head + [(POSITIVE, pa.list_(text))]
        fields += [(name, scores) for name in ["scores", *named]] if with_scores \
            else [("labels", pa.list_(pa.int64()))]
    else:
        raise ValueError(f"unknown row shape {shape!r}; use {'|'.join(SHAPES)}")
    return pa.schema(fields)


def shape_batch(shape: str, schema: "pa.Schema", mined: list, with_scores: bool,
                prompt_field: str | None = None):
    """The rows of `mined` queries in `shape` as a RecordBatch of `schema`."""
    import pyarrow as pa

    columns = {name: [] for name in schema.names}
    anchor = schema.names[0]
    body = schema.names[2:] if prompt_field else schema.names[1:]
    for item in mined:
        for values in _SHAPE_ROWS[shape](item, with_scores):
            row = dict(zip(body, values))
            row[anchor] = item.query
            if prompt_field:
                row[prompt_field] = item.instruction
            for name in schema.names:
                columns[name].append(row.get(name))
    return pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


def _triplet_rows(item: Mined, with_scores: bool):
    sets = item.score_sets(with_scores)
    for p, positive in enumerate(item.positives):
        for n, negative in enumerate(item.negatives):
            yield [positive, negative] + [[pos[p], neg[n]] for pos, neg in sets]


def _tuple_rows(item: Mined, with_scores: bool):
    if not item.negatives:
        return
    sets = item.score_sets(with_scores)
    for p, positive in enumerate(item.positives):
        yield [positive, *item.negatives] + [[pos[p], *neg] for pos, neg in sets]


def _pair_rows(item: Mined, with_scores: bool):
    sets = item.score_sets(with_scores)
    for p, positive in enumerate(item.positives):
        yield [positive] + ([pos[p] for pos, _ in sets] if sets else [1])
    for n, negative in enumerate(item.negatives):
        yield [negative] + ([neg[n] for _, neg in sets] if sets else [0])


def _list_rows(item: Mined, with_scores: bool):
    if not item.negatives:
        return
    sets = item.score_sets(with_scores)
    for p, positive in enumerate(item.positives):
        labels = [[pos[p], *neg] for pos, neg in sets] if sets else \
            [[1] + [0] * len(item.negatives)]
        yield [[positive, *item.negatives], *labels]


_SHAPE_ROWS = {"triplet": _triplet_rows, "n-tuple": _tuple_rows, "labeled-pair": _pair_rows,
                "labeled-list": _list_rows}
