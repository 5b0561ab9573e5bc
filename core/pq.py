"""Product quantisation (Jégou et al. 2011) and optimised PQ (Ge et al. 2013), in numpy.

A vector of `dim` values is cut into `m` sub-vectors of `dim / m` values; each is replaced by
the number of its nearest of `2^bits` centroids, trained by k-means on the calibration rows
(one byte per sub-vector). Scores are asymmetric (ADC): the query stays float and each code
scores `q . reconstruction(code)`. The textbook way is a per-query table of `m x 2^bits`
sub-vector dot products and `m` look-ups per code; in numpy, decoding a block
of codes and one matmul gives the same numbers about 9x faster, within 2x of faiss's IndexPQ
(bench/quantization.py, BENCHMARKS.md), so `scores` does that and vecpipe does not need faiss.

OPQ learns an orthogonal rotation R first (codes are of `x @ R`) by alternating PQ training
with orthogonal Procrustes: R = U V^T for U S V^T = svd(X^T Y), Y the reconstruction of the
rotated rows. Dot products survive the rotation, so queries are rotated the same way.

"""
from __future__ import annotations

import numpy as np

from vecpipe.formats.errors import DataError, UsageError

KMEANS_ITERATIONS = 20
OPQ_ITERATIONS = 10
MAX_TRAINING_ROWS_PER_CENTROID = 256  # faiss's default cap: more rows change little
SCORE_BLOCK_CODES = 16_384  # codes decoded at a time by `scores` (block x dim float32)


class ProductQuantizer:
    """Centroids (m x 2^bits x dim/m float32) and an optional rotation (dim x dim)."""

    def __init__(self, centroids: np.ndarray, rotation: np.ndarray | None = None):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.rotation = None if rotation is None else np.ascontiguousarray(rotation, np.float32)

    @property
    def m(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def ksub(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def bits(self) -> int:
        return int(self.ksub).bit_length() - 1

    @property
    def dim(self) -> int:
        return self.m * int(self.centroids.shape[2])

    @classmethod
    def train(cls, sample: np.ndarray, m: int, bits: int = 8, opq: bool = False,
              seed: int = 0) -> "ProductQuantizer":
        check_shape(sample.shape[1], m, bits, len(sample))
        sample = _training_rows(np.asarray(sample, np.float32), 2 ** bits, seed)
        if not opq:
            return cls(_train_subspaces(sample, m, 2 ** bits, seed))
        return _train_opq(sample, m, 2 ** bits, seed)

    def rotate(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors if self.rotation is None else vectors @ self.rotation

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """float32 (rows x dim) -> uint8 codes (rows x m)."""
        return _assign_all(self.rotate(vectors), self.centroids)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> the reconstruction in the input (unrotated) space."""
        rotated = self.decode_rotated(codes)
        return rotated if self.rotation is None else rotated @ self.rotation.T

    def decode_rotated(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> their centroids side by side, in one gather over all sub-spaces."""
        codes = np.asarray(codes, dtype=np.intp) + np.arange(self.m) * self.ksub
        flat = self.centroids.reshape(self.m * self.ksub, -1)
        return flat[codes].reshape(len(codes), self.dim)

    def scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """ADC (queries x codes): q . decode(code), a block of codes decoded at a time."""
        rotated = self.rotate(queries)
        codes = np.asarray(codes)
        out = np.empty((len(rotated), len(codes)), dtype=np.float32)
        for start in range(0, len(codes), SCORE_BLOCK_CODES):
            block = self.decode_rotated(codes[start:start + SCORE_BLOCK_CODES])
            out[:, start:start + len(block)] = rotated @ block.T
        return out


def check_shape(dim: int, m: int, bits: int, rows: int) -> None:
    if m < 1 or dim % m:
        raise UsageError(f"{m} PQ sub-vectors must divide the {dim} dimensions")
    if not 1 <= bits <= 8:
        raise UsageError(f"PQ bits must be between 1 and 8 (one byte per sub-vector), not {bits}")
    if rows < 2 ** bits:
        raise DataError(f"PQ with {2 ** bits} centroids needs at least that many calibration "
                        f"rows, got {rows}", hint="calibrate on more rows or lower the PQ bits")


def _training_rows(sample: np.ndarray, ksub: int, seed: int) -> np.ndarray:
    cap = ksub * MAX_TRAINING_ROWS_PER_CENTROID
    if len(sample) <= cap:
        return sample
    return sample[np.sort(np.random.default_rng(seed).choice(len(sample), cap, replace=False))]


def _train_subspaces(sample, m: int, ksub: int, seed: int, init=None,
                     iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    parts = np.split(sample, m, axis=1)
    return np.stack([kmeans(part, ksub, seed + j, None if init is None else init[j], iterations)
                     for j, part in enumerate(parts)])


def kmeans(points: np.ndarray, k: int, seed: int = 0, init: np.ndarray | None = None,
           iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Lloyd's k-means (squared L2) from k distinct random rows (or `init`); an emptied
    centroid restarts at the point farthest from its own centroid."""
    rng = np.random.default_rng(seed)
    points = points.astype(np.float32)
    centroids = points[rng.choice(len(points), k, replace=False)].copy() if init is None \
        else init.copy()
    for _ in range(iterations):
        labels, distances = _nearest(points, centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=points[:, d], minlength=k)
                         for d in range(points.shape[1])], axis=1)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        for empty in np.flatnonzero(~filled):
            far = int(np.argmax(distances))
            centroids[empty], distances[far] = points[far], 0.0
    return centroids


def _nearest(points: np.ndarray, centroids: np.ndarray):
    """(label, squared distance) of each point's nearest centroid."""
    scores = points @ centroids.T
    scores *= -2
    scores += (centroids * centroids).sum(axis=1)
    labels = scores.argmin(axis=1)
    best = scores[np.arange(len(points)), labels] + (points * points).sum(axis=1)
    return labels, np.maximum(best, 0)


def _assign_all(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    parts = np.split(vectors, centroids.shape[0], axis=1)
    codes = np.empty((len(vectors), centroids.shape[0]), dtype=np.uint8)
    for j, part in enumerate(parts):
        codes[:, j] = _nearest(part, centroids[j])[0]
    return codes


def _train_opq(sample, m: int, ksub: int, seed: int) -> ProductQuantizer:
    """Non-parametric OPQ: alternate PQ training on the rotated rows and Procrustes."""
    rotation = np.eye(sample.shape[1], dtype=np.float32)
    centroids = None
    for _ in range(OPQ_ITERATIONS):
        rotated = sample @ rotation
        centroids = _train_subspaces(rotated, m, ksub, seed, centroids,
                                     iterations=4 if centroids is not None else KMEANS_ITERATIONS)
        target = ProductQuantizer(centroids).decode_rotated(_assign_all(rotated, centroids))
        u, _, vt = np.linalg.svd(sample.T.astype(np.float64) @ target, full_matrices=False)
        rotation = (u @ vt).astype(np.float32)
    rotated = sample @ rotation
    centroids = _train_subspaces(rotated, m, ksub, seed, centroids, iterations=4)
    return ProductQuantizer(centroids, rotation)
