"""Fusing ranked lists of several retrievers (runs) into one, as ranx defines it.

Methods (ranx `fuse(runs, norm, method)`): `rrf` sum of 1/(rrf_k + rank) (Cormack et al.
2009; ranks from 1, scores and normalisation unused); `combsum` sum of the normalised scores;
`combmnz` that sum times the number of runs that hold the document; `wsum` sum of weight *
normalised score. A document missing from a run adds 0 there.

Normalisations, per query and run (ranx's, 1e-9 the least denominator): `min-max`
(s - min) / (max - min); `z-score` (s - mean) / std (population std: ranx's zmuv); `rank`
1 - i/n for the i-th of n documents (from 0); `max` s / max; `sum` (s - min) / (sum - n*min);
`none` the scores as they are.

Each run's documents are taken best first in trec_eval's order (score descending, then doc id
descending), which is also how the fused list is ranked; ranx's sort leaves the order of tied
scores undefined, so ties are where the two can differ.

Weights are fitted as ranx's `optimize_fusion` does: every weight vector on a grid of `step`
whose weights sum to 1, in itertools.product order, the last best (>=) kept. The grid is exact
fractions of the step (ranx drops a few vectors whose float sum misses 1.0 with 3+ runs), and
deterministic: no seed is involved. A metric with a cutoff is evaluated on each query's top
cutoff documents, which is exact (no deeper document changes it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from vecpipe.formats.errors import ParameterError

if TYPE_CHECKING:
    import numpy as np

    from vecpipe.formats.trec import Qrels, Run

METHODS = ("rrf", "combsum", "combmnz", "wsum")
NORMS = ("none", "min-max", "z-score", "rank", "max", "sum")
DEFAULT_NORM = {"rrf": "none", "combsum": "min-max", "combmnz": "min-max", "wsum": "min-max"}
DEFAULT_RRF_K = 60
DEFAULT_FIT_METRIC, DEFAULT_FIT_STEP = "ndcg@10", 0.1
LEAST_DENOMINATOR = 1e-9


@dataclass(frozen=True)
class Fusion:
    """How runs are fused. `weights`: one per run, wsum only (None: equal, or to be fitted)."""

    method: str = "rrf"
    norm: str | None = None
    rrf_k: float = DEFAULT_RRF_K
    weights: tuple[float, ...] | None = None

    def checked(self, runs: int) -> "Fusion":
        """This fusion for `runs` runs, the norm defaulted; ParameterError when it can't be."""
        if self.method not in METHODS:
            raise ParameterError(f"unknown fusion method {self.method!r}; use "
                                 f"{'|'.join(METHODS)}", "method")
        norm = self.norm or DEFAULT_NORM[self.method]
        if norm not in NORMS:
            raise ParameterError(f"unknown normalisation {norm!r}; use "
                                 f"{'|'.join(NORMS)}", "norm")
        if self.method == "rrf" and norm != "none":
            raise ParameterError("rrf fuses ranks; a score normalisation does not "
                                 "apply to it", "norm")
        if self.rrf_k < 0:
            raise ParameterError(f"must be >= 0, got {self.rrf_k:g}", "rrf_k")
        if runs < 2:
            raise ParameterError(f"fusion needs at least 2 runs, got {runs}", "runs")
        if self.weights is not None:
            if self.method != "wsum":
                raise ParameterError(f"weights apply to wsum, not {self.method}", "weights")
            if len(self.weights) != runs:
                raise ParameterError(f"{len(self.weights)} weights for {runs} runs", "weights")
        return Fusion(self.method, norm, self.rrf_k, self.weights)

    def run_weights(self, runs: int) -> tuple[float, ...]:
        return self.weights if self.weights is not None else (1.0,) * runs

    def metadata(self) -> dict:
        """What the fused run records about its making (JSON-ready)."""
        described = {"method": self.method, "norm": self.norm}
        if self.method == "rrf":
            described["rrf_k"] = self.rrf_k
        if self.weights is not None:
            described["weights"] = list(self.weights)
        return described


def normalized(scores: "np.ndarray", norm: str) -> "np.ndarray":
    """One query's scores of one run (best first) under `norm`, as float64."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    if norm == "none" or not len(scores):
        return scores
    if norm == "rank":
        return 1.0 - np.arange(len(scores)) / len(scores)
    if norm == "min-max":
        low = scores.min()
        return (scores - low) / max(scores.max() - low, LEAST_DENOMINATOR)
    if norm == "z-score":
        return (scores - scores.mean()) / max(scores.std(), LEAST_DENOMINATOR)
    if norm == "max":
        return scores / max(scores.max(), LEAST_DENOMINATOR)
    if norm == "sum":
        low = scores.min()
        return (scores - low) / max(scores.sum() - low * len(scores), LEAST_DENOMINATOR)
    raise ParameterError(f"unknown normalisation {norm!r}", "norm")


def ranked(docs: Mapping[str, float]) -> tuple[list, "np.ndarray"]:
    """A query's documents of one run, best first in trec_eval's order, and their scores."""
    import numpy as np

    order = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return [doc for doc, _ in order], np.array([score for _, score in order], np.float64)


class QueryFusion:
    """One query's documents across runs: `union` (first seen first) and `contributions`, a
    (runs x union) matrix of what each run adds to each document (0 where it lacks it), so
    that any weights fuse with one product."""

    def __init__(self, fusion: Fusion, lists: Sequence[tuple[Sequence[str], "np.ndarray"]]):
        import numpy as np

        where: dict = {}
        for docs, _ in lists:
            for doc in docs:
                where.setdefault(doc, len(where))
        self.union = list(where)
        self.contributions = np.zeros((len(lists), len(where)))
        self.held = np.zeros(len(where))
        for run, (docs, scores) in enumerate(lists):
            at = np.fromiter((where[doc] for doc in docs), np.int64, len(docs))
            if fusion.method == "rrf":
                self.contributions[run, at] = 1.0 / (fusion.rrf_k + np.arange(1, len(docs) + 1))
            else:
                self.contributions[run, at] = normalized(scores, fusion.norm)
            self.held[at] += 1
        self.mnz = fusion.method == "combmnz"

    def scores(self, weights: Sequence[float]) -> "np.ndarray":
        import numpy as np

        total = np.zeros(len(self.union))
        for weight, row in zip(weights, self.contributions):
            total += weight * row  # run by run, as ranx sums
        return total * self.held if self.mnz else total

    def top(self, weights: Sequence[float], depth: int | None = None) -> tuple[list, list]:
        """(doc ids, scores) best first in trec_eval's order, the first `depth` (None: all)."""
        scores = self.scores(weights)
        order = sorted(range(len(self.union)), key=lambda i: (scores[i], self.union[i]),
                       reverse=True)[:depth]
        return [self.union[i] for i in order], [float(scores[i]) for i in order]


def query_fusions(fusion: Fusion, runs: Sequence["Run"]) -> dict[str, QueryFusion]:
    """Every query any run answers (a run that lacks it contributes nothing), in first-seen
    order."""
    queries = dict.fromkeys(qid for run in runs for qid in run)
    ranked_runs = [{qid: ranked(docs) for qid, docs in run.items()} for run in runs]
    empty = ([], ())
    return {qid: QueryFusion(fusion, [run.get(qid, empty) for run in ranked_runs])
            for qid in queries}


def fuse_runs(fusion: Fusion, runs: Sequence["Run"], depth: int | None = None) -> "Run":
    """The fused run: query -> {doc: score}, each query's documents best first."""
    fusion = fusion.checked(len(runs))
    weights = fusion.run_weights(len(runs))
    fused = {}
    for qid, query in query_fusions(fusion, runs).items():
        docs, scores = query.top(weights, depth)
        fused[qid] = dict(zip(docs, scores))
    return fused


@dataclass
class FittedWeights:
    weights: tuple[float, ...]
    metric: str           # MTEB key, e.g. ndcg_at_10
    score: float          # its mean over `queries`
    queries: int          # judged queries the runs answer
    trials: int

    def metadata(self) -> dict:
        return {"fitted_on": self.metric, "fitted_score": self.score,
                "fitted_queries": self.queries, "fitted_trials": self.trials}


def weight_grid(runs: int, step: float) -> list[tuple[float, ...]]:
    """Weight vectors of `runs` weights, multiples of `step` summing to 1, in ranx's order."""
    if not 0 < step <= 1:
        raise ParameterError(f"must be within (0, 1], got {step:g}", "step")
    steps = round(1 / step)
    if steps < 1 or abs(steps * step - 1) > 1e-9:
        raise ParameterError(f"must divide 1 evenly (0.1, 0.05, 0.25...), got {step:g}",
                             "step")
    digits = max(0, len(f"{step:.10f}".rstrip("0").split(".")[1]))
    return [tuple(round(i / steps, digits) for i in combo)
            for combo in itertools.product(range(steps + 1), repeat=runs)
            if sum(combo) == steps]


def fit_weights(fusion: Fusion, runs: Sequence["Run"], qrels: "Qrels", metric: str,
                step: float = DEFAULT_FIT_STEP) -> FittedWeights:
    """wsum weights that maximise `metric` (an MTEB key: ndcg_at_10...) over the judged
    queries: the grid search of ranx's optimize_fusion."""
    from vecpipe.core import retrieval_metrics as m

    fusion = fusion.checked(len(runs))
    if fusion.method != "wsum":
        raise ParameterError(f"weights are fitted for wsum, not {fusion.method}", "method")
    name, _, cutoff = metric.rpartition("_at_")
    queries = {qid: query for qid, query in query_fusions(fusion, runs).items()
               if qid in qrels}
    if not queries:
        raise ParameterError("no query of the runs is judged in the qrels", "qrels")
    grid = weight_grid(len(runs), step)
    best, best_score = grid[0], -1.0
    for weights in grid:
        fused = {qid: dict(zip(*query.top(weights, int(cutoff))))
                 for qid, query in queries.items()}
        score = m.evaluate(qrels, fused, (int(cutoff),), (name,)).means[metric]
        if score >= best_score:
            best, best_score = weights, score
    return FittedWeights(best, metric, best_score, len(queries), len(grid))


FIT_FORMAT = "vecpipe-fusion-fit"


def fit_record(fusion: Fusion, fitted: FittedWeights, lists: Sequence[str]) -> dict:
    """The saved fit: what `read_fit` takes back, and what the fused run's metadata holds."""
    return {"format": FIT_FORMAT, **fusion.metadata(), "weights": list(fitted.weights),
            **fitted.metadata(), "lists": list(lists)}


def read_fit(path: str) -> dict:
    """A saved fit (`fit_record`), checked: its norm and weights."""
    import json

    from vecpipe.formats.errors import DataError

    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"not a fusion fit file ({err.__class__.__name__})", source=path) \
            from None
    if not isinstance(record, dict) or record.get("format") != FIT_FORMAT:
        raise DataError(f"not a fusion fit file (no \"format\": \"{FIT_FORMAT}\")", source=path)
    weights = record.get("weights")
    if record.get("norm") not in NORMS or not isinstance(weights, list) \
            or not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
        raise DataError("a fusion fit file needs a norm and a list of weights >= 0",
                        source=path)
    return record
