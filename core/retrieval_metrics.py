"""Retrieval metrics as pytrec_eval (trec_eval) computes them, and paired significance tests.

Pure numpy (scipy only for the t distribution). Conventions, checked against pytrec_eval 0.5
and MTEB's RetrievalEvaluator:
- A run is ranked by score descending, then doc id descending (trec_eval's order,
  `formats.trec.ranking`).
- A document is relevant when its judgment is >= 1; nDCG gains are the judgments themselves
  (linear gain, negative judgments count as 0); unjudged documents are not relevant.
- MRR@k is the reciprocal rank of the first relevant document within the top k (MTEB's mrr_at_k).
- Set metrics (no cutoff: the whole returned set, for thresholded runs) are trec_eval's set_P,
  set_recall and set_F (beta 1): relevant returned / returned, / relevant, and their harmonic
  mean; 0 where a denominator is 0.
- Only queries that are both in the qrels and in the run are averaged (pytrec_eval and MTEB);
  `all_queries=True` scores qrels queries missing from the run as 0 (trec_eval -c).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from vecpipe.formats.errors import UsageError
from vecpipe.formats.trec import Qrels, Run, ranking

if TYPE_CHECKING:
    import numpy as np

METRICS = ("ndcg", "map", "mrr", "recall", "precision")
SET_METRICS = ("set_precision", "set_recall", "set_f1")
DEFAULT_KS = (1, 3, 5, 10, 100, 1000)
MTEB_KS = (1, 3, 5, 10, 20, 100, 1000)
MAIN_METRIC = "ndcg_at_10"
RELEVANCE_LEVEL = 1
_ALIASES = {"ndcg": "ndcg", "ndcg_cut": "ndcg", "map": "map", "map_cut": "map", "mrr": "mrr",
            "recip_rank": "mrr", "rr": "mrr", "recall": "recall", "r": "recall",
            "precision": "precision", "p": "precision", "set_p": "set_precision",
            "set_precision": "set_precision", "set_r": "set_recall", "set_recall": "set_recall",
            "set_f": "set_f1", "set_f1": "set_f1"}


def metric_key(metric: str, k: int) -> str:
    """MTEB's name for a metric at a cutoff: ndcg_at_10, precision_at_1, mrr_at_10..."""
    return f"{metric}_at_{k}"


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """`ndcg,map,...` (aliases: p, r, rr, recip_rank, ndcg_cut, map_cut; set_p, set_r, set_f;
    `set` = the three set metrics) -> canonical names."""
    if not text:
        return METRICS
    names = []
    for part in text.split(","):
        lowered = part.strip().lower()
        found = SET_METRICS if lowered == "set" else (_ALIASES.get(lowered),)
        if found[0] is None:
            raise UsageError(f"unknown metric {part.strip()!r}; use "
                             f"{', '.join(METRICS + SET_METRICS)} or set")
        names += [name for name in found if name not in names]
    return tuple(names)


def metric_keys(metrics: Sequence[str], ks: Sequence[int]) -> list[str]:
    """The result keys of `metrics`: one per cutoff, or the name of a set metric."""
    return [key for metric in metrics
            for key in ([metric] if metric in SET_METRICS else
                        [metric_key(metric, k) for k in ks])]


def set_metric(text: str) -> str | None:
    """`set_f1`, `set_P`, `set_F`... -> the set metric's key, None when it is not one."""
    name = _ALIASES.get(text.strip().lower())
    return name if name in SET_METRICS else None


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
            if metric not in SET_METRICS:
                out[metric_key(metric, k)] = values[metric]
    if any(metric in SET_METRICS for metric in metrics):
        sets = set_scores(ranked, judged)
        out.update({metric: sets[metric] for metric in metrics if metric in SET_METRICS})
    return out


def set_scores(returned: Sequence[str], judged: Mapping[str, int]) -> dict[str, float]:
    """trec_eval's set_P, set_recall and set_F (beta 1) of a query's whole returned set."""
    relevant = sum(1 for rel in judged.values() if rel >= RELEVANCE_LEVEL)
    found = sum(1 for doc in returned if judged.get(doc, 0) >= RELEVANCE_LEVEL)
    precision = found / len(returned) if returned else 0.0
    recall = found / relevant if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"set_precision": precision, "set_recall": recall, "set_f1": f1}


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
    keys = metric_keys(metrics, ks)
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


def paired_randomization_test(a: Sequence[float], b: Sequence[float], permutations: int = 10000,
                              seed: int = 0) -> float:
    """Two-sided p-value of a paired randomization (sign-flip) test on mean(b - a), with the
    +1 correction so that p is never 0. Deterministic for a given seed. The one-metric form of
    sign_flip_pvalues, kept as the reference tests/test_eval.py checks against exact
    permutation."""
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
