"""MUVERA fixed dimensional encodings (Dhulipala et al. 2024): a set of token vectors -> one
vector whose inner product approximates the Chamfer (MaxSim) similarity of two sets, so a
single-vector index can retrieve multi-vector candidates; exact Chamfer then rescores them.

Following google/graph-mining's reference (sketching/point_cloud/fixed_dimensional_encoding.cc):

- per repetition r of `reps`: `simhash` Gaussian hyperplanes (token_dim x K) cut the space into
  2^K buckets; a token falls in the bucket of its sign bits. Buckets are numbered here by the
  bits read as a binary number (the reference numbers them in Gray-code order: a permutation of
  the buckets, so every inner product is the same).
- optionally each token is first projected to `proj_dim` dimensions by an AMS sketch (each
  input dimension added, with a random sign, to one random output dimension; the reference's
  AMSProjectionMatrixFromSeed), unbiased for inner products.
- query side: each bucket holds the SUM of its tokens; document side: the MEAN, and with
  `fill_empty` an empty bucket takes the (projected) document token nearest to it in Hamming
  distance of the sign bits (the first such token).
- the repetitions are concatenated (reps * 2^K * proj_dim values), then optionally
  count-sketched to `final_dim` (each coordinate added, with a random sign, to one random
  output coordinate), the same sketch on both sides.

So `<query_fde(Q), document_fde(D)>` is about `reps * chamfer(Q, D)` (each repetition is one
estimate). Every random matrix comes from `seed` through numpy's PCG64 (`default_rng` of
(seed, what, repetition)), so the same configuration makes the same encodings anywhere.

`chamfer(Q, D) = sum over q in Q of max over d in D of <q, d>` (ColBERT's MaxSim).

Token sets are passed as one flat float32 matrix of every token (rows) and `offsets` (length
sets + 1): set i is `tokens[offsets[i]:offsets[i + 1]]`. A set without tokens encodes to zeros.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from vecpipe.formats.errors import DataError, UsageError

FORMAT_VERSION = 1
SIDES = ("document", "query")
MAX_SIMHASH = 16  # 2^16 buckets per repetition is far past any useful size
_SIMHASH, _PROJECTION, _FINAL = 0, 1, 2  # the `what` of each random matrix's seed


@dataclass(frozen=True)
class FdeConfig:
    """The parameters of an encoding: everything that changes it (compared as its identity)."""

    token_dim: int
    reps: int = 20
    simhash: int = 5
    proj_dim: int | None = None    # AMS sketch of each token to this many dimensions
    final_dim: int | None = None   # count sketch of the whole encoding to this many
    seed: int = 42
    fill_empty: bool = True        # document side: empty buckets take the nearest token

    def __post_init__(self):
        for name, low in (("token_dim", 1), ("reps", 1), ("simhash", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UsageError(f"FDE {name} must be an integer >= {low}, not {value!r}")
        if self.simhash > MAX_SIMHASH:
            raise UsageError(f"FDE simhash {self.simhash}: at most {MAX_SIMHASH} hyperplanes "
                             f"(2^{MAX_SIMHASH} buckets per repetition)")
        for name in ("proj_dim", "final_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"FDE {name} must be a positive integer, not {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"FDE seed must be a non-negative integer, not {self.seed!r}")

    @property
    def buckets(self) -> int:
        return 1 << self.simhash

    @property
    def bucket_dim(self) -> int:
        return self.proj_dim or self.token_dim

    @property
    def raw_dim(self) -> int:
        """Dimensions before the final projection."""
        return self.reps * self.buckets * self.bucket_dim

    @property
    def out_dim(self) -> int:
        return self.final_dim or self.raw_dim

    def describe(self) -> str:
        """e.g. `fde 20 reps x 2^5 buckets x 384 -> 245760 dims`."""
        text = f"fde {self.reps} reps x 2^{self.simhash} buckets x {self.bucket_dim}"
        if self.proj_dim:
            text += f" (ams {self.token_dim} -> {self.proj_dim})"
        if self.final_dim:
            text += f", count sketch {self.raw_dim} -> {self.final_dim}"
        return text + f", seed {self.seed} ({self.out_dim} dims)"

    def to_json(self) -> str:
        """The canonical `vecpipe.fde` value: equal strings exactly when equal encodings."""
        return json.dumps({"format": FORMAT_VERSION, "rng": "numpy-pcg64", **asdict(self)},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "FdeConfig":
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("expected an object")
            if data.pop("format", None) != FORMAT_VERSION or data.pop("rng", None) != \
                    "numpy-pcg64":
                raise ValueError("unsupported FDE format")
            return cls(**data)
        except (TypeError, ValueError, UsageError) as err:
            raise DataError(f"invalid vecpipe.fde metadata: {err}") from None


def config_from_meta(meta: Mapping[str, str], source: str | None = None) -> FdeConfig | None:
    """The FDE configuration a stream's (or an index's) `vecpipe.*` metadata records."""
    text = meta.get("fde")
    if not text:
        return None
    try:
        return FdeConfig.from_json(text)
    except DataError as err:
        raise err.located(source)


class Fde:
    """An encoder for one configuration; its random matrices are made once."""

    def __init__(self, config: FdeConfig):
        self.config = config
        c = config
        self._hyperplanes = [np.random.default_rng((c.seed, _SIMHASH, r)).standard_normal(
            (c.token_dim, c.simhash)).astype(np.float32) for r in range(c.reps)]
        self._projections = self._matrices = None
        if c.proj_dim:
            self._projections = [_sketch(np.random.default_rng((c.seed, _PROJECTION, r)),
                                         c.token_dim, c.proj_dim) for r in range(c.reps)]
            # token_dim x proj_dim is small: a dense product runs faster than the gather
            self._matrices = [_dense(*sketch) for sketch in self._projections]
        self._final = None
        if c.final_dim:
            self._final = _sketch(np.random.default_rng((c.seed, _FINAL)), c.raw_dim,
                                  c.final_dim)
        self._weights = (1 << np.arange(c.simhash - 1, -1, -1)).astype(np.int64)

    def encode(self, tokens: np.ndarray, offsets: np.ndarray, side: str = "document"
               ) -> np.ndarray:
        """FDEs (sets x out_dim float32) of the token sets `tokens[offsets[i]:offsets[i+1]]`."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, not {side!r}")
        tokens, offsets = self._checked(tokens, offsets)
        c = self.config
        sets = len(offsets) - 1
        counts = np.diff(offsets)
        owner = np.repeat(np.arange(sets), counts)
        out = np.zeros((sets, c.reps, c.buckets, c.bucket_dim), dtype=np.float32)
        for r in range(c.reps):
            bits = tokens @ self._hyperplanes[r] > 0 if c.simhash else \
                np.zeros((len(tokens), 0), bool)
            bucket = bits.astype(np.int64) @ self._weights if c.simhash else \
                np.zeros(len(tokens), np.int64)
            projected = tokens if self._matrices is None else tokens @ self._matrices[r]
            slot = owner * c.buckets + bucket
            sums, sizes = _segment_sums(projected, slot, sets * c.buckets)
            block = sums.reshape(sets, c.buckets, c.bucket_dim)
            if side == "document":
                sizes = sizes.reshape(sets, c.buckets)
                filled = sizes > 0
                block[filled] /= sizes[filled][:, None]
                if c.fill_empty and c.simhash and not filled.all():
                    _fill_empty(block, filled, bits, projected, offsets, self._weights)
            out[:, r] = block
        flat = out.reshape(sets, c.raw_dim)
        if self._final is not None:
            flat = _apply_sketch(flat, *self._final)
        return np.ascontiguousarray(flat, dtype=np.float32)

    def _checked(self, tokens, offsets):
        tokens = np.ascontiguousarray(tokens, dtype=np.float32)
        offsets = np.asarray(offsets, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.config.token_dim:
            width = tokens.shape[-1] if tokens.ndim else 0
            raise DataError(f"token vectors have {width} dimensions, the FDE was made for "
                            f"{self.config.token_dim}")
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or \
                offsets[-1] != len(tokens) or (np.diff(offsets) < 0).any():
            raise ValueError("offsets must rise from 0 to the number of tokens")
        return tokens, offsets


def _sketch(rng, rows: int, columns: int):
    """A sparse random sign matrix, one nonzero per row: (column of each row, its sign)."""
    index = rng.integers(0, columns, size=rows)
    sign = rng.integers(0, 2, size=rows).astype(np.float32) * 2 - 1
    return index, sign, columns


def _dense(index: np.ndarray, sign: np.ndarray, columns: int) -> np.ndarray:
    matrix = np.zeros((len(index), columns), dtype=np.float32)
    matrix[np.arange(len(index)), index] = sign
    return matrix


def _apply_sketch(x: np.ndarray, index: np.ndarray, sign: np.ndarray, columns: int):
    """x @ S for the sparse sign matrix S (each input column added, signed, to one output)."""
    order = np.argsort(index, kind="stable")
    signed = x[:, order] * sign[order]
    targets = index[order]
    starts = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
    out = np.zeros((len(x), columns), dtype=np.float32)
    if len(order):
        out[:, targets[starts]] = np.add.reduceat(signed, starts, axis=1)
    return out


def _segment_sums(values: np.ndarray, slot: np.ndarray, slots: int):
    """(per-slot sums of `values` rows (slots x columns), per-slot row counts)."""
    sizes = np.bincount(slot, minlength=slots)
    sums = np.zeros((slots, values.shape[1]), dtype=np.float32)
    if len(slot):
        order = np.argsort(slot, kind="stable")
        sorted_slots = slot[order]
        starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        sums[sorted_slots[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return sums, sizes


def _fill_empty(block, filled, bits, projected, offsets, weights) -> None:
    """Each empty bucket of each non-empty set takes the set's first token nearest to it in
    Hamming distance (sign bits vs the bucket's bits)."""
    buckets = block.shape[1]
    codes = bits.astype(np.int64) @ weights                      # tokens
    bucket_ids = np.arange(buckets, dtype=np.int64)
    popcount = np.array([bin(v).count("1") for v in range(buckets)], dtype=np.int64)
    counts = np.diff(offsets)
    nonempty = np.flatnonzero(counts > 0)
    if not len(nonempty):
        return
    total = int(offsets[-1])
    per_chunk = max(1, (1 << 22) // (buckets * max(1, int(counts.max()))))
    # distance * (total + 1) + position in the set: a set's minimum is its first nearest token
    for first in range(0, len(nonempty), per_chunk):
        chosen = nonempty[first:first + per_chunk]
        low, high = offsets[chosen[0]], offsets[chosen[-1] + 1]
        distance = popcount[codes[low:high, None] ^ bucket_ids[None, :]]
        local = np.arange(low, high) - np.repeat(offsets[chosen], counts[chosen])
        key = distance * (total + 1) + local[:, None]
        best = np.minimum.reduceat(key, offsets[chosen] - low, axis=0)   # chosen x buckets
        nearest = best % (total + 1) + offsets[chosen][:, None]
        rows, cols = np.nonzero(~filled[chosen])
        block[chosen[rows], cols] = projected[nearest[rows, cols]]


def chamfer(query: np.ndarray, document: np.ndarray) -> float:
    """sum over the query's tokens of the best inner product with a document token."""
    if not len(query) or not len(document):
        return 0.0
    return float((np.asarray(query, np.float32) @ np.asarray(document, np.float32).T)
                 .max(axis=1).sum())


def chamfer_scores(query: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Chamfer similarity of one query (tokens x dim) with every set of (tokens, offsets)
    (float32, one per set; 0 for an empty set)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    sets = len(offsets) - 1
    out = np.zeros(sets, dtype=np.float32)
    counts = np.diff(offsets)
    nonempty = np.flatnonzero(counts > 0)
    if not len(nonempty) or not len(query):
        return out
    sims = np.asarray(query, np.float32) @ np.asarray(tokens, np.float32).T   # q x tokens
    # reduceat over the starts of non-empty sets covers exactly each set's tokens when the
    # sets are contiguous; empty sets in between have no tokens to cover
    best = np.maximum.reduceat(sims[:, offsets[nonempty[0]]:], offsets[nonempty]
                               - offsets[nonempty[0]], axis=1)
    out[nonempty] = best.sum(axis=0)
    return out


def pack_sets(sets) -> tuple[np.ndarray, np.ndarray]:
    """A list of (tokens x dim) arrays -> (flat tokens, offsets)."""
    sets = list(sets)
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sets])
    if not sets:
        return np.zeros((0, 0), np.float32), offsets
    arrays = [np.asarray(s, np.float32) for s in sets]
    dim = next((a.shape[1] for a in arrays if a.ndim == 2), 0)
    return np.concatenate([a.reshape(len(a), dim) for a in arrays]), offsets
