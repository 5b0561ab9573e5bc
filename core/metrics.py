"""Retrieval metrics as pytrec_eval (trec_eval) computes them, the run and qrels files they read,
paired significance tests, correlations for STS, and label-free statistics of embeddings.

Pure numpy (scipy only for the t distribution); no typer, no torch. Conventions, checked against
pytrec_eval 0.5 and MTEB's RetrievalEvaluator:
- A run is ordered by score descending, then doc id descending (trec_eval's order); a rank
  column is ignored when scores exist.
- A document is relevant when its judgment is >= 1; nDCG gains are the judgments themselves
  (linear gain, negative judgments count as 0); unjudged documents are not relevant.
- MRR@k is the reciprocal rank of the first relevant document within the top k (MTEB's mrr_at_k).
- Only queries that are both in the qrels and in the run are averaged (pytrec_eval and MTEB);
  `all_queries=True` scores qrels queries missing from the run as 0 (trec_eval -c).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

from vecpipe.formats.errors import DataError, UsageError

if TYPE_CHECKING:
    import numpy as np

Qrels = dict  # query id -> {doc id: int judgment}
Run = dict    # query id -> {doc id: float score}

METRICS = ("ndcg", "map", "mrr", "recall", "precision")
DEFAULT_KS = (1, 3, 5, 10, 100, 1000)
MTEB_KS = (1, 3, 5, 10, 20, 100, 1000)
MAIN_METRIC = "ndcg_at_10"
RELEVANCE_LEVEL = 1
_ALIASES = {"ndcg": "ndcg", "ndcg_cut": "ndcg", "map": "map", "map_cut": "map", "mrr": "mrr",
            "recip_rank": "mrr", "rr": "mrr", "recall": "recall", "r": "recall",
            "precision": "precision", "p": "precision"}
_READ_ROWS = 65536


# ---------------------------------------------------------------- metric names

def metric_key(metric: str, k: int) -> str:
    """MTEB's name for a metric at a cutoff: ndcg_at_10, precision_at_1, mrr_at_10..."""
    return f"{metric}_at_{k}"


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """`ndcg,map,...` (aliases: p, r, rr, recip_rank, ndcg_cut, map_cut) -> canonical names."""
    if not text:
        return METRICS
    names = []
    for part in text.split(","):
        name = _ALIASES.get(part.strip().lower())
        if name is None:
            raise UsageError(f"unknown metric {part.strip()!r}; use {', '.join(METRICS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_ks(text: str | None, default: Sequence[int] = DEFAULT_KS) -> tuple[int, ...]:
    if not text:
        return tuple(default)
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"bad cutoffs {text!r}; use comma-separated integers, e.g. 1,10,100") \
            from None
    if not ks or ks[0] < 1:
        raise UsageError(f"bad cutoffs {text!r}; cutoffs must be >= 1")
    return tuple(ks)


def parse_metric_key(text: str) -> str:
    """`ndcg@10`, `nDCG@10`, `ndcg_at_10`, `P@5`, `mrr_at_10` -> MTEB key (ndcg_at_10...)."""
    raw = text.strip()
    lowered = raw.lower()
    for sep in ("_at_", "@"):
        if sep in lowered:
            name, _, k = lowered.rpartition(sep)
            metric = _ALIASES.get(name)
            if metric is not None and k.isdigit() and int(k) > 0:
                return metric_key(metric, int(k))
    raise UsageError(f"bad metric {raw!r}; use e.g. ndcg@10, recall_at_100, mrr@10")


# ---------------------------------------------------------------- metrics

def ranking(docs: Mapping[str, float]) -> list[str]:
    """Doc ids best first in trec_eval's order: score descending, then doc id descending."""
    by_id = sorted(docs, reverse=True)
    return sorted(by_id, key=docs.__getitem__, reverse=True)  # stable: ties keep id order


def query_scores(ranked: Sequence[str], judged: Mapping[str, int], ks: Sequence[int],
                 metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """All metrics at all cutoffs for one query: `ranked` doc ids best first, `judged` its qrels."""
    import numpy as np

    depth = max(ks)
    rels = np.array([judged.get(doc, 0) for doc in ranked[:depth]], dtype=np.float64)
    hits = rels >= RELEVANCE_LEVEL
    num_rel = sum(1 for rel in judged.values() if rel >= RELEVANCE_LEVEL)
    ideal = np.sort(np.array([rel for rel in judged.values() if rel > 0], dtype=np.float64))
    ideal = ideal[::-1][:depth]
    discounts = 1.0 / np.log2(np.arange(2, max(len(rels), len(ideal)) + 2))
    cum_hits = np.cumsum(hits)
    cum_dcg = np.cumsum(np.where(rels > 0, rels, 0.0) * discounts[:len(rels)])
    cum_idcg = np.cumsum(ideal * discounts[:len(ideal)])
    cum_ap = np.cumsum(np.where(hits, cum_hits / np.arange(1, len(rels) + 1), 0.0))
    first_hit = int(np.argmax(hits)) if hits.any() else None

    def upto(cumulative, k):  # the cumulative value over the first k positions
        n = min(k, len(cumulative))
        return float(cumulative[n - 1]) if n else 0.0

    out = {}
    for k in ks:
        hits_k = upto(cum_hits, k)
        values = {
            "ndcg": upto(cum_dcg, k) / upto(cum_idcg, k) if upto(cum_idcg, k) > 0 else 0.0,
            "map": upto(cum_ap, k) / num_rel if num_rel else 0.0,
            "mrr": 1.0 / (first_hit + 1) if first_hit is not None and first_hit < k else 0.0,
            "recall": hits_k / num_rel if num_rel else 0.0,
            "precision": hits_k / k,
        }
        for metric in metrics:
            out[metric_key(metric, k)] = values[metric]
    return out


@dataclass
class Evaluation:
    """Per-query scores, their means, and which queries were left out and why."""

    per_query: dict[str, dict[str, float]]
    means: dict[str, float]
    keys: list[str]
    missing: list[str] = field(default_factory=list)   # in the qrels, not in the run
    unjudged: list[str] = field(default_factory=list)  # in the run, not in the qrels

    @property
    def queries(self) -> int:
        return len(self.per_query)

    def restricted(self, queries: Iterable[str]) -> "Evaluation":
        """The same scores over `queries` only (a subset of per_query), means recomputed."""
        kept = {qid: self.per_query[qid] for qid in sorted(queries)}
        return Evaluation(kept, _means(kept, self.keys), self.keys, self.missing,
                          self.unjudged)


def evaluate(qrels: Qrels, run: Run, ks: Sequence[int] = DEFAULT_KS,
             metrics: Sequence[str] = METRICS, all_queries: bool = False) -> Evaluation:
    """Score `run` against `qrels` as pytrec_eval does (see the module docstring)."""
    keys = [metric_key(metric, k) for metric in metrics for k in ks]
    per_query = {}
    for qid in sorted(qrels):
        if qid in run:
            per_query[qid] = query_scores(ranking(run[qid]), qrels[qid], ks, metrics)
        elif all_queries:
            per_query[qid] = dict.fromkeys(keys, 0.0)
    return Evaluation(per_query, _means(per_query, keys), keys,
                      missing=sorted(q for q in qrels if q not in run),
                      unjudged=sorted(q for q in run if q not in qrels))


def _means(per_query: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> dict:
    if not per_query:
        return {}
    return {key: math.fsum(scores[key] for scores in per_query.values()) / len(per_query)
            for key in keys}


def run_depth(run: Run, qrels: Qrels) -> int:
    """The most hits any judged query of the run has (0 for none)."""
    return max((len(docs) for qid, docs in run.items() if qid in qrels), default=0)


def judged_hits(run: Run, qrels: Qrels, depth: int | None = None) -> tuple[int, int]:
    """(hits whose document the qrels judge for any query, all hits) over the top `depth` hits
    (all with None) of the run's judged queries. Few or none judged means the ids do not match
    the qrels' (chunk ids, `_id` vs `id`, another dataset's qrels), not a bad ranking."""
    known = {doc for docs in qrels.values() for doc in docs}
    judged = total = 0
    for qid, docs in run.items():
        if qid not in qrels:
            continue
        top = ranking(docs)[:depth] if depth is not None else docs
        judged += sum(doc in known for doc in top)
        total += len(top)
    return judged, total


def run_to_qrels(run: Run, depth: int) -> Qrels:
    """A reference run (e.g. exact search) as qrels: its top `depth` documents are relevant."""
    return {qid: dict.fromkeys(ranking(docs)[:depth], 1) for qid, docs in run.items()}


# ---------------------------------------------------------------- reading runs and qrels

def _input_name(path: str) -> str:
    from vecpipe.formats.readers import STDIN_NAME

    return STDIN_NAME if path == "-" else path


def _is_record_format(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith((b"ARROW1", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"PAR1")) \
        or text.startswith(b"{")


def _open(path: str):
    """(stream, head bytes, compressed?, is a record format?) for a path or `-`."""
    from vecpipe.formats.readers import open_input

    stream, head, compression = open_input(path)
    return stream, head, compression is not None, _is_record_format(head)


def _record_batches(stream, head: bytes, path: str, compressed: bool) -> Iterator:
    """(batch, first record number) from an already opened record stream (stdin included)."""
    from vecpipe.formats import readers

    name = _input_name(path)
    seekable_path = None if (compressed or path == "-") else path
    for _schema, batches in readers.read_opened(stream, readers.sniff(head), name,
                                                seekable_path, _READ_ROWS):
        record = 1
        for batch in batches:
            yield batch, record
            record += batch.num_rows


def _text_lines(stream, name: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for the non-blank lines of a text stream."""
    for lineno, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(f"invalid UTF-8 ({err.reason})", source=name, record=lineno) \
                from None
        if line:
            yield lineno, line


def _score(text: str, name: str, lineno: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"score {text!r} is not a finite number", source=name, record=lineno)
    return value


def _judgment(text, name: str, lineno: int) -> int:
    try:
        if isinstance(text, float) and text.is_integer():
            return int(text)
        if isinstance(text, (int, str)) and not isinstance(text, bool):
            return int(text)
    except ValueError:
        pass
    raise DataError(f"relevance {text!r} is not an integer", source=name, record=lineno)


def _add_hit(run: Run, qid: str, doc: str, score: float, name: str, lineno: int) -> None:
    docs = run.setdefault(qid, {})
    if doc in docs:
        raise DataError(f"document {doc!r} appears twice for query {qid!r}", source=name,
                        record=lineno, hint="a run ranks each document once per query")
    docs[doc] = score


def read_run(path: str) -> Run:
    """A run from `search` output (any record format: query_id, id, score and/or rank) or a
    TREC run file (`qid Q0 docid rank score tag`), sniffed from the first bytes."""
    stream, head, compressed, records = _open(path)
    name = _input_name(path)
    try:
        if records:
            return _run_from_records(_record_batches(stream, head, path, compressed), name)
        return _run_from_trec(_text_lines(stream, name), name)
    finally:
        stream.close()


def _run_from_trec(lines, name: str) -> Run:
    run: Run = {}
    for lineno, line in lines:
        fields = line.split()
        if len(fields) != 6:
            raise DataError(f"expected 6 fields (qid Q0 docid rank score tag), got "
                            f"{len(fields)}", source=name, record=lineno)
        _add_hit(run, fields[0], fields[2], _score(fields[4], name, lineno), name, lineno)
    return run


def _column(batch, names: Sequence[str]):
    return next((n for n in names if n in batch.schema.names), None)


def _run_from_records(batches, name: str) -> Run:
    run: Run = {}
    for batch, first in batches:
        qcol, dcol = _column(batch, ("query_id",)), _column(batch, ("id", "_id", "doc_id"))
        scol = _column(batch, ("score",)) or _column(batch, ("rank",))
        if qcol is None or dcol is None or scol is None:
            raise DataError(f"a run needs fields query_id, id and score (or rank); fields are "
                            f"{', '.join(batch.schema.names)}", source=name)
        sign = 1.0 if scol == "score" else -1.0  # rank 1 is best: use -rank as the score
        rows = zip(batch.column(qcol).to_pylist(), batch.column(dcol).to_pylist(),
                   batch.column(scol).to_pylist())
        for offset, (qid, doc, score) in enumerate(rows):
            record = first + offset
            if qid is None or doc is None or score is None:
                raise DataError(f"null {qcol if qid is None else dcol if doc is None else scol}",
                                source=name, record=record)
            if isinstance(score, str) or not math.isfinite(score):
                raise DataError(f"{scol} {score!r} is not a finite number", source=name,
                                record=record)
            _add_hit(run, str(qid), str(doc), sign * float(score), name, record)
    return run


@dataclass
class Judgments:
    """What `--qrels` held: qrels, or a reference run turned into qrels (`from_run`)."""

    qrels: Qrels
    from_run: bool = False
    duplicates: int = 0


def read_qrels(path: str, depth: int = 10) -> Judgments:
    """BEIR qrels TSV (header `query-id corpus-id score`), TREC qrels (`qid iter docid rel`),
    qrels records (query_id, id, relevance) — or a run, whose top `depth` become relevant."""
    stream, head, compressed, records = _open(path)
    name = _input_name(path)
    try:
        if records:
            batches = _record_batches(stream, head, path, compressed)
            first = next(batches, None)
            if first is None:
                return Judgments({})
            batches = _chain(first, batches)
            if _column(first[0], ("relevance", "label", "corpus-id")) is None:
                return Judgments(run_to_qrels(_run_from_records(batches, name), depth), True)
            return _qrels_from_records(batches, name)
        lines = _text_lines(stream, name)
        first_line = next(lines, None)
        if first_line is None:
            return Judgments({})
        lines = _chain(first_line, lines)
        if len(first_line[1].split()) == 6:
            return Judgments(run_to_qrels(_run_from_trec(lines, name), depth), True)
        return _qrels_from_text(lines, name)
    finally:
        stream.close()


def _chain(first, rest):
    yield first
    yield from rest


def _qrels_from_text(lines, name: str) -> Judgments:
    qrels: Qrels = {}
    duplicates = 0
    tsv = None
    for lineno, line in lines:
        if tsv is None:  # the first line decides: tab-separated triples are BEIR's format
            fields = line.split("\t")
            tsv = len(fields) == 3
            if tsv and not _is_int(fields[2]):
                continue  # the header
        fields = [f.strip() for f in line.split("\t")] if tsv else line.split()
        if tsv and len(fields) != 3:
            raise DataError(f"expected 3 tab-separated fields (query-id corpus-id score), got "
                            f"{len(fields)}", source=name, record=lineno)
        if not tsv and len(fields) != 4:
            raise DataError(f"expected 4 fields (qid iter docid rel), got {len(fields)}",
                            source=name, record=lineno)
        qid, doc, rel = (fields[0], fields[1], fields[2]) if tsv else \
            (fields[0], fields[2], fields[3])
        duplicates += _judge(qrels, qid, doc, _judgment(rel, name, lineno))
    return Judgments(qrels, duplicates=duplicates)


def _qrels_from_records(batches, name: str) -> Judgments:
    qrels: Qrels = {}
    duplicates = 0
    for batch, first in batches:
        qcol = _column(batch, ("query_id", "query-id"))
        dcol = _column(batch, ("id", "_id", "corpus-id", "doc_id"))
        rcol = _column(batch, ("relevance", "label", "score"))
        if qcol is None or dcol is None or rcol is None:
            raise DataError(f"qrels need fields query_id, id and relevance; fields are "
                            f"{', '.join(batch.schema.names)}", source=name)
        rows = zip(batch.column(qcol).to_pylist(), batch.column(dcol).to_pylist(),
                   batch.column(rcol).to_pylist())
        for offset, (qid, doc, rel) in enumerate(rows):
            if qid is None or doc is None:
                raise DataError("null query or document id", source=name, record=first + offset)
            duplicates += _judge(qrels, str(qid), str(doc), _judgment(rel, name, first + offset))
    return Judgments(qrels, duplicates=duplicates)


def _judge(qrels: Qrels, qid: str, doc: str, rel: int) -> int:
    """Record a judgment (the last one wins, as in BEIR and pytrec_eval); 1 if it repeats."""
    docs = qrels.setdefault(qid, {})
    repeated = doc in docs
    docs[doc] = rel
    return int(repeated)


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def write_trec_run(run_top: Iterable[tuple[str, Sequence[str], Sequence[float]]], sink,
                   tag: str = "vecpipe") -> None:
    """Write (query id, doc ids best first, scores) as TREC run lines to a text sink. Scores
    keep 9 significant digits (float32 round-trips): rounding would create ties that trec_eval
    breaks by doc id, changing the metrics of the saved run."""
    for qid, docs, scores in run_top:
        sink.write("".join(f"{qid} Q0 {doc} {rank} {score:.9g} {tag}\n"
                           for rank, (doc, score) in enumerate(zip(docs, scores), 1)))


# ---------------------------------------------------------------- paired significance tests

def paired_randomization_test(a: Sequence[float], b: Sequence[float], permutations: int = 10000,
                              seed: int = 0) -> float:
    """Two-sided p-value of a paired randomization (sign-flip) test on mean(b - a), with the
    +1 correction so that p is never 0. Deterministic for a given seed."""
    import numpy as np

    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if diffs.size == 0 or not diffs.any():
        return 1.0
    return float(_sign_flip_pvalues(diffs[:, None], permutations, seed)[0])


def sign_flip_pvalues(diffs: "np.ndarray", permutations: int = 10000, seed: int = 0):
    """paired_randomization_test for many metrics at once: `diffs` is queries x metrics; every
    metric sees the same sign flips. Returns one p-value per column."""
    import numpy as np

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.shape[0] == 0:
        return np.ones(diffs.shape[1])
    return _sign_flip_pvalues(diffs, permutations, seed)


def _sign_flip_pvalues(diffs, permutations: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = diffs.shape[0]
    observed = np.abs(diffs.mean(axis=0))
    tolerance = 1e-12 * np.maximum(1.0, np.abs(diffs).max(axis=0))
    extreme = np.zeros(diffs.shape[1], dtype=np.int64)
    for start in range(0, permutations, 1000):
        count = min(1000, permutations - start)
        signs = rng.integers(0, 2, size=(count, n), dtype=np.int8) * 2.0 - 1.0
        means = np.abs(signs @ diffs) / n
        extreme += (means >= observed - tolerance).sum(axis=0)
    pvalues = (extreme + 1) / (permutations + 1)
    pvalues[~diffs.any(axis=0)] = 1.0
    return pvalues


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (scipy.stats.ttest_rel). Zero variance gives 1.0
    for identical scores and 0.0 for a constant nonzero difference (scipy says nan)."""
    import numpy as np
    from scipy.special import stdtr

    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = diffs.size
    if n < 2:
        return 1.0
    mean, sd = diffs.mean(), diffs.std(ddof=1)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2.0 * stdtr(n - 1, -abs(t)))


# ---------------------------------------------------------------- correlations (STS)

def rankdata(values: Sequence[float]) -> "np.ndarray":
    """1-based ranks, ties get their average rank (scipy.stats.rankdata's default)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rankdata(x), rankdata(y))


def paired_similarities(a: "np.ndarray", b: "np.ndarray") -> dict[str, "np.ndarray"]:
    """Row-wise similarity of two vector sets, MTEB's STS conventions: cosine, dot, and for
    distances similarity = -distance (euclidean, manhattan). float64 throughout."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return {"cosine": cosine, "dot": dot,
            "euclidean": -np.linalg.norm(a - b, axis=1),
            "manhattan": -np.abs(a - b).sum(axis=1)}


# ---------------------------------------------------------------- embedding statistics

def rankme(singular_values: Sequence[float], eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al. 2023): exp of the entropy of the singular values
    normalized to sum 1 (with their epsilon). A rank-r matrix with equal singular values gives r."""
    import numpy as np

    sigma = np.asarray(singular_values, dtype=np.float64)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + eps
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity correction
    (scipy.stats.mannwhitneyu(method="asymptotic")). Returns (U of x, p-value)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return math.nan, 1.0
    ranks = rankdata(np.concatenate([x, y]))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    _, counts = np.unique(ranks, return_counts=True)
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return u1, 1.0
    u = max(u1, n1 * n2 - u1)
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return u1, min(1.0, math.erfc(z / math.sqrt(2.0)))


class EmbeddingSummary:
    """Streaming statistics of one vector set: Gram matrix (for singular values), per-dimension
    moments, norms, and a uniform reservoir sample of rows (seeded) for pairwise statistics."""

    def __init__(self, sample_size: int = 5000, seed: int = 0):
        import numpy as np

        self.sample_size = sample_size
        self.rng = np.random.default_rng(seed)
        self.rows = 0
        self.gram = None
        self.sums = None
        self.squares = None
        self.norms: list = []
        self.sample = None
        self.keys = None

    def add(self, vectors: "np.ndarray") -> None:
        import numpy as np

        block = np.asarray(vectors, dtype=np.float64)
        if self.gram is None:
            dim = block.shape[1]
            self.gram = np.zeros((dim, dim))
            self.sums = np.zeros(dim)
            self.squares = np.zeros(dim)
            self.sample = np.zeros((0, dim), dtype=np.float32)
            self.keys = np.zeros(0)
        self.rows += len(block)
        self.gram += block.T @ block
        self.sums += block.sum(axis=0)
        self.squares += (block * block).sum(axis=0)
        self.norms.append(np.linalg.norm(block, axis=1))
        keys = np.concatenate([self.keys, self.rng.random(len(block))])
        pool = np.concatenate([self.sample, block.astype(np.float32)])
        keep = np.argsort(keys, kind="stable")[:self.sample_size]
        keep.sort()  # keep input order: the sample is the rows with the smallest random keys
        self.keys, self.sample = keys[keep], pool[keep]

    def singular_values(self) -> "np.ndarray":
        import numpy as np

        eigenvalues = np.linalg.eigvalsh(self.gram)[::-1]
        return np.sqrt(np.clip(eigenvalues, 0.0, None))

    def subsample(self, size: int) -> "np.ndarray":
        """A uniform sample of `size` rows: those with the smallest random keys."""
        import numpy as np

        keep = np.sort(np.argsort(self.keys, kind="stable")[:size])
        return self.sample[keep]

    def report(self, duplicate_threshold: float = 0.95, sample_size: int | None = None) -> dict:
        """The statistics; pairwise ones on `sample_size` sampled rows (default: the sample)."""
        import numpy as np

        norms = np.concatenate(self.norms)
        mean = self.sums / self.rows
        variance = np.maximum(self.squares / self.rows - mean * mean, 0.0)
        unit = _unit_rows(self.subsample(sample_size or self.sample_size))
        pairwise = pairwise_cosine_stats(unit, duplicate_threshold)
        return {
            "rows": self.rows, "dim": int(len(mean)),
            "rankme": rankme(self.singular_values()),
            "anisotropy": pairwise["mean_cosine"],
            "centroid_norm": float(np.linalg.norm(unit.mean(axis=0))) if len(unit) else 0.0,
            "near_duplicate_rate": pairwise["near_duplicate_rate"],
            "near_duplicate_threshold": duplicate_threshold,
            "sample": int(len(unit)),
            "norm": _summary(norms) | {"zero": int((norms == 0).sum())},
            "dim_variance": _summary(variance) | {
                "low": int((variance < 0.01 * variance.mean()).sum()) if variance.size else 0},
        }


def _summary(values: "np.ndarray") -> dict:
    import numpy as np

    if values.size == 0:
        return {}
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "p25": float(p25), "median": float(p50), "p75": float(p75),
            "max": float(values.max())}


def _unit_rows(vectors: "np.ndarray") -> "np.ndarray":
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[norms[:, 0] > 0] / norms[norms[:, 0] > 0]


def pairwise_cosine_stats(unit: "np.ndarray", threshold: float, block: int = 2048) -> dict:
    """Mean cosine over distinct pairs of unit rows, and the fraction of rows that have another
    row at cosine >= threshold. Computed in blocks of rows (bounded memory)."""
    import numpy as np

    n = len(unit)
    if n < 2:
        return {"mean_cosine": math.nan, "near_duplicate_rate": 0.0}
    total = 0.0
    has_twin = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        sims = unit[start:start + block] @ unit.T
        rows = np.arange(start, min(start + block, n))
        sims[rows - start, rows] = np.nan  # not a pair: a row with itself
        total += float(np.nansum(sims))
        has_twin[rows] = (np.nan_to_num(sims, nan=-np.inf) >= threshold).any(axis=1)
    return {"mean_cosine": total / (n * (n - 1)), "near_duplicate_rate": float(has_twin.mean())}


def corpus_shift(first: "np.ndarray", second: "np.ndarray", seed: int = 0) -> dict:
    """Do two vector sets come from the same distribution? Each sample is split at random into a
    fitting half and a held-out half. Held-out rows of both sets are scored by (a) `mean_shift`:
    their projection on the difference of the two fitting halves' mean unit vectors, and
    (b) `nearest_cosine`: cosine to their nearest non-identical row in the first set's fitting
    half. A Mann-Whitney rank-sum test per statistic compares the held-out scores of the two
    sets. The tests stay valid when nothing differs because fitting and testing use disjoint
    rows: rows of the second sample identical to a row of the first (overlapping corpora, or
    one file compared with itself) are dropped first (`shared_rows`)."""
    import numpy as np

    first = np.asarray(first, dtype=np.float32)
    second = np.asarray(second, dtype=np.float32)
    seen = {row.tobytes() for row in first}
    fresh = np.array([row.tobytes() not in seen for row in second], dtype=bool)
    rng = np.random.default_rng(seed)
    fit_a, held_a = _halves(_unit_rows(first), rng)
    fit_b, held_b = _halves(_unit_rows(second[fresh]), rng)
    direction = fit_a.mean(axis=0) - fit_b.mean(axis=0) if len(fit_b) else fit_a[0] * 0
    stats = {
        "mean_shift": (held_a @ direction, held_b @ direction),
        "nearest_cosine": (_nearest(held_a, fit_a), _nearest(held_b, fit_a)),
    }
    out = {"shared_rows": int((~fresh).sum()), "held_out": [len(held_a), len(held_b)]}
    for name, (a, b) in stats.items():
        u, p = mann_whitney(a, b)
        out[name] = {"first_median": float(np.median(a)) if len(a) else math.nan,
                     "second_median": float(np.median(b)) if len(b) else math.nan,
                     "u": u, "auc": u / (len(a) * len(b)) if len(a) and len(b) else math.nan,
                     "p_value": p}
    return out


def _halves(rows: "np.ndarray", rng) -> tuple["np.ndarray", "np.ndarray"]:
    order = rng.permutation(len(rows))
    half = len(rows) // 2
    return rows[order[:half]], rows[order[half:]]


def _nearest(rows: "np.ndarray", reference: "np.ndarray", block: int = 2048) -> "np.ndarray":
    """Per row, the cosine to its nearest reference row that is not the same vector."""
    import numpy as np

    out = np.empty(len(rows))
    for start in range(0, len(rows), block):
        sims = rows[start:start + block] @ reference.T
        sims[sims >= 1.0 - 1e-6] = -np.inf
        out[start:start + block] = sims.max(axis=1) if sims.shape[1] else np.nan
    return out
