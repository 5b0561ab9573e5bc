"""Relevance calibration: each hit's score mapped to a probability that it is relevant, through a
mapping that depends on its query (after Rossi et al., "Relevance Filtering for Embedding-based
Retrieval", CIKM 2024, the "Cosine Adapter"), so that one probability threshold can filter the
hits of every query where no single score threshold does.

The paper predicts the parameters of a monotonic map of the cosine from the query embedding
with a neural network. The simplification here: a logistic regression of relevance on four
features of a hit, computed from the scores of its query's top `depth` hits:
    score, score - top1, (score - mean) / std, top1 - mean
(top1, mean and std: the best score and the mean and population std of the query's top
`depth` scores; std floored at STD_FLOOR). The logit is then slope(q) * score + offset(q) with
    slope(q)  = w_score + w_gap + w_z / std(q)
    offset(q) = b - w_gap * top1(q) - w_z * mean(q) / std(q) + w_peak * (top1(q) - mean(q))
a linear map of the score whose parameters are functions of the query's score distribution,
the paper's query-dependent linear mapping with score statistics in place of the embedding.
Fitted by Newton's method (IRLS) on standardized features, as scikit-learn's
LogisticRegression(penalty=None) fits it, but for a RIDGE penalty on the standardized weights,
so small that it only keeps separable data (a perfect cut) finite. A hit without a judgment
counts as not relevant (trec_eval's convention), a judgment >= 1 as relevant. The features
need the same depth at search time: search --calibrator fetches at least `depth` hits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from vecpipe.formats.trec import Qrels, Run

FORMAT, FORMAT_VERSION = "vecpipe-calibrator", 1
FEATURES = ("score", "score - top1", "(score - mean) / std", "top1 - mean")
STD_FLOOR = 1e-4
RELEVANCE_LEVEL = 1
RIDGE = 1e-6
METHOD = ("logistic regression of relevance on per-hit features of the query's top-depth "
          "scores (a query-dependent linear map of the score, after Rossi et al. 2024)")


@dataclass
class Calibrator:
    """The fitted map: `depth` top scores per query give the statistics; `coefficients` weigh
    FEATURES (in that order); `provenance`: model, index, metric, fit statistics..."""

    depth: int
    coefficients: list[float]
    intercept: float
    provenance: dict = field(default_factory=dict)

    def logits(self, scores, present=None):
        """queries x width scores (best first) -> logits, nan where `present` is False."""
        import numpy as np

        x = hit_features(scores, self.depth, present)
        return x @ np.asarray(self.coefficients, dtype=np.float64) + self.intercept

    def probabilities(self, scores, present=None):
        """queries x width scores (best first) -> P(relevant), nan where there is no hit."""
        from scipy.special import expit

        return expit(self.logits(scores, present))

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "method": METHOD,
                "features": list(FEATURES), "std_floor": STD_FLOOR, "ridge": RIDGE,
                "relevance_level": RELEVANCE_LEVEL, "depth": self.depth,
                "coefficients": self.coefficients, "intercept": self.intercept,
                **self.provenance}


def hit_features(scores, depth: int, present=None):
    """queries x width x 4 FEATURES of each hit; statistics over the first `depth` present hits
    of its query (hits are best first); nan where `present` (default: finite scores) is False."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    present = np.isfinite(scores) if present is None else np.asarray(present, dtype=bool)
    values = np.where(present, scores, np.nan)
    top1, mean, std = (column[:, None] for column in query_statistics(values, depth))
    return np.stack([values, values - top1, (values - mean) / std,
                     np.where(present, top1 - mean, np.nan)], axis=-1)


def query_statistics(values, depth: int):
    """(top1, mean, std floored) of the first `depth` values of each row (nan = no hit)."""
    import warnings

    import numpy as np

    top = values[:, :depth]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query without hits: nan
        return (np.nanmax(top, axis=1), np.nanmean(top, axis=1),
                np.maximum(np.nanstd(top, axis=1), STD_FLOOR))


def training_set(run: "Run", qrels: "Qrels", depth: int):
    """(scores, labels, queries): the scores of the top `depth` hits of each judged query of
    `run` (queries x depth, nan past its last hit), 1 where judged >= RELEVANCE_LEVEL."""
    import numpy as np

    from vecpipe.formats.trec import ranking

    queries = [qid for qid in sorted(run) if qid in qrels and run[qid]]
    scores = np.full((len(queries), depth), np.nan)
    labels = np.zeros((len(queries), depth))
    for i, qid in enumerate(queries):
        ranked = ranking(run[qid])[:depth]
        scores[i, :len(ranked)] = [run[qid][doc] for doc in ranked]
        labels[i, :len(ranked)] = [qrels[qid].get(doc, 0) >= RELEVANCE_LEVEL for doc in ranked]
    return scores, labels, queries


def fit(run: "Run", qrels: "Qrels", depth: int, provenance: dict | None = None) -> Calibrator:
    """The calibrator of `run`'s top `depth` hits against `qrels` (see the module docstring)."""
    import numpy as np

    scores, labels, queries = training_set(run, qrels, depth)
    if not queries:
        raise DataError("the run has no query in common with the qrels")
    present = np.isfinite(scores)
    x, y = hit_features(scores, depth, present)[present], labels[present]
    if y.min() == y.max():
        what = "relevant" if y[0] else "not relevant"
        raise DataError(f"the top {depth} hits are all {what}: nothing to tell apart")
    coefficients, intercept, iterations = fit_logistic(x, y)
    calibrator = Calibrator(depth, [float(c) for c in coefficients], float(intercept))
    p = np.clip(calibrator_probabilities(calibrator, x), 1e-15, 1 - 1e-15)
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    calibrator.provenance = {**(provenance or {}), "fit": {
        "queries": len(queries), "hits": int(len(y)), "relevant": int(y.sum()),
        "log_loss": log_loss, "base_rate_log_loss": _base_log_loss(y),
        "iterations": iterations,
        "increasing_queries": float(np.mean(query_slopes(calibrator, scores) > 0))}}
    return calibrator


def calibrator_probabilities(calibrator: Calibrator, features):
    """P(relevant) of rows of FEATURES (n x 4)."""
    import numpy as np
    from scipy.special import expit

    return expit(features @ np.asarray(calibrator.coefficients) + calibrator.intercept)


def _base_log_loss(y) -> float:
    rate = float(y.mean())
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def fit_logistic(x, y, max_iter: int = 100, tol: float = 1e-10):
    """Logistic regression by Newton's method with step halving, on standardized columns (the
    weights, not the intercept, under RIDGE): (coefficients, intercept, iterations) in the
    original units."""
    import numpy as np

    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = np.column_stack([(x - mu) / sd, np.ones(len(x))])
    w = np.zeros(z.shape[1])
    loss = _loss(z, y, w)
    for iteration in range(1, max_iter + 1):
        step = _newton_step(z, y, w)
        scale = 1.0
        while _loss(z, y, w - scale * step) > loss and scale > 1e-10:
            scale /= 2
        w = w - scale * step
        loss = _loss(z, y, w)
        if np.max(np.abs(scale * step)) < tol:
            break
    return w[:-1] / sd, w[-1] - float(np.sum(w[:-1] * mu / sd)), iteration


def _loss(z, y, w) -> float:
    import numpy as np

    eta = z @ w
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + RIDGE / 2 * np.sum(w[:-1] ** 2))


def _newton_step(z, y, w):
    import numpy as np
    from scipy.special import expit

    p = expit(z @ w)
    ridge = np.full(z.shape[1], RIDGE)
    ridge[-1] = 0.0  # the intercept
    hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(ridge)
    return np.linalg.lstsq(hessian, z.T @ (p - y) + ridge * w, rcond=None)[0]


def read_calibrator(path: str) -> Calibrator:
    """A calibrator JSON written by `eval calibrate`; one-line errors naming the file."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as err:
        raise DataError(f"cannot read the calibrator: {err.strerror}", source=path) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"not a calibrator: invalid JSON ({err})", source=path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"not a calibrator (no \"format\": \"{FORMAT}\")", source=path,
                        hint="write one with eval calibrate")
    return _checked(data, path)


def _checked(data: dict, path: str) -> Calibrator:
    if data.get("format_version") != FORMAT_VERSION:
        raise DataError(f"calibrator format version {data.get('format_version')!r}; this "
                        f"vecpipe reads {FORMAT_VERSION}", source=path)
    if data.get("features") != list(FEATURES):
        raise DataError(f"unknown features {data.get('features')!r}; expected {list(FEATURES)}",
                        source=path)
    depth, coefficients = data.get("depth"), data.get("coefficients")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise DataError(f"bad depth {depth!r}", source=path)
    numbers = [*coefficients, data.get("intercept")] if isinstance(coefficients, list) else []
    if len(numbers) != len(FEATURES) + 1 or not all(_finite(v) for v in numbers):
        raise DataError(f"need {len(FEATURES)} finite coefficients and an intercept",
                        source=path)
    own = {"format", "format_version", "method", "features", "std_floor", "ridge",
           "relevance_level", "depth", "coefficients", "intercept"}
    return Calibrator(depth, [float(v) for v in coefficients], float(data["intercept"]),
                      {k: v for k, v in data.items() if k not in own})


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def query_slopes(calibrator: Calibrator, values) -> "np.ndarray":
    """slope(q) per row of best-first scores (nan = no hit): where > 0, the query's map is
    increasing, so a probability threshold keeps a top of its hits."""
    _top1, _mean, std = query_statistics(values, calibrator.depth)
    w = calibrator.coefficients
    return w[0] + w[1] + w[2] / std
