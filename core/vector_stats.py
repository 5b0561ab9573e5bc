"""Statistics of vector sets: STS correlations (Pearson, Spearman over paired similarities),
label-free embedding statistics (RankMe, anisotropy, near duplicates), two-sample tests of
corpus shift, and TTE depth with its rank-sum test. Pure numpy; rank tests match scipy's.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np


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
            "norm": value_summary(norms) | {"zero": int((norms == 0).sum())},
            "dim_variance": value_summary(variance) | {
                "low": int((variance < 0.01 * variance.mean()).sum()) if variance.size else 0},
        }


def value_summary(values: "np.ndarray") -> dict:
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


def tte_depth(vectors: "np.ndarray", reference: "np.ndarray | None" = None,
              block: int = 8192) -> "np.ndarray":
    """TTE depth (Seegmiller & Preum, EMNLP 2023) of each row of `vectors` within the rows of
    `reference`: D(x; F) = 2 - E_{Y~F}[1 - cos(x, Y)], F the empirical distribution of the
    reference rows: the supremum of the cosine distance (2) minus the mean cosine distance, in
    [0, 2], higher = more central. `reference` None: each row's depth within `vectors`
    itself, over the n - 1 other rows, as the authors' package (tte_depth) computes it: a row's
    zero distance to itself is left out.

    Exact in O((n + m) dim) without the n x m cosine matrix: the cosine is linear in the unit
    vectors, so a row's mean cosine to the reference is its dot with the sum of the
    reference's unit vectors, divided by their count. Rows are normalised `block` at a time
    (float64). Zero rows have no cosine: ValueError."""
    import numpy as np

    own = reference is None
    total, count = _unit_sum(vectors if own else reference, block)
    if count < (2 if own else 1):
        raise ValueError("depth needs at least two rows" if own else "an empty reference")
    vectors = np.asarray(vectors)
    out = np.empty(len(vectors))
    for start in range(0, len(vectors), block):
        unit = _unit_block(vectors[start:start + block])
        cosines = unit @ total
        if own:  # leave out the row's cosine to itself (1 up to rounding)
            out[start:start + block] = 1.0 + (cosines - (unit * unit).sum(axis=1)) / (count - 1)
        else:
            out[start:start + block] = 1.0 + cosines / count
    return out


def _unit_sum(rows: "np.ndarray", block: int) -> tuple["np.ndarray", int]:
    import numpy as np

    rows = np.asarray(rows)
    total = np.zeros(rows.shape[1] if rows.ndim == 2 else 0)
    for start in range(0, len(rows), block):
        total += _unit_block(rows[start:start + block]).sum(axis=0)
    return total, len(rows)


def _unit_block(rows: "np.ndarray") -> "np.ndarray":
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.argmin(norms[:, 0]))} is a zero vector: it has no cosine")
    return rows / norms


def depth_q(reference_depths: "np.ndarray", other_depths: "np.ndarray") -> float:
    """Liu & Singh's (1993) quality index Q(F, G) = P(D(X; F) <= D(Y; F)), X ~ F, Y ~ G,
    estimated as the mean over G's rows of the fraction of F's rows no deeper than it. 1/2
    when F = G; below 1/2 when G lies further out of F (a location shift or more spread)."""
    import numpy as np

    ordered = np.sort(np.asarray(reference_depths, dtype=np.float64))
    below = np.searchsorted(ordered, np.asarray(other_depths, dtype=np.float64), side="right")
    return float(below.mean() / len(ordered)) if len(ordered) and len(below) else math.nan


def rank_sum_greater(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Wilcoxon rank-sum test, one-sided (x larger), normal approximation without tie or
    continuity correction: scipy.stats.ranksums(x, y, alternative="greater"). (z, p)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return math.nan, 1.0
    ranks = rankdata(np.concatenate([x, y]))
    expected = n1 * (n1 + n2 + 1) / 2.0
    z = (float(ranks[:n1].sum()) - expected) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


def depth_rank_sum_test(a: "np.ndarray", b: "np.ndarray") -> tuple[float, float, float]:
    """The paper's TTE-depth rank-sum test of whether corpus `b` (G) comes from the
    distribution of corpus `a` (F): the depths of F's rows within F (each without itself)
    and of G's rows with respect to F, compared by Q (`depth_q`) and by a Wilcoxon rank-sum
    test, one-sided as the authors' package runs it (H1: G's rows are less deep in F than
    F's own, i.e. Q < 1/2). Returns (Q, W (the rank-sum z), p-value).

    The authors' package estimates Q from each G row's rank among the pooled depths of both
    samples; this is Liu & Singh's estimator, with F's depths only, as the paper defines Q."""
    return depth_test(tte_depth(a), tte_depth(b, reference=a))


def depth_test(first: "np.ndarray", second: "np.ndarray") -> tuple[float, float, float]:
    """`depth_rank_sum_test` of depths already computed: `first` F's rows within F, `second`
    G's rows with respect to F. (Q, W, p-value)."""
    w, p = rank_sum_greater(first, second)
    return depth_q(first, second), w, p
