"""Near-duplicate removal and train/test contamination checks on embedding vectors (numpy).

Greedy, in input order: a record is dropped when the cosine of its vector to an earlier *kept*
record is >= the threshold (so of a chain a~b~c with a !~ c, a and c are kept). Records within
the threshold of any reference vector (an evaluation corpus or its queries) are dropped first,
as contamination, and never suppress others. Exact brute force: the kept vectors are held in
memory (kept x dim float32) and every record is compared with all of them, so time grows as
records x kept x dim: measured on 2 loaded EPYC cores, 20k 384-dimensional records took 5 s and
50k 29 s, so a few hundred thousand records is the practical limit (no ANN shortcut yet).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np

CHUNK = 1024          # records compared with each other at once (a CHUNK x CHUNK matrix)
BLOCK = 65_536        # kept or reference rows per matrix product (CHUNK x BLOCK float32)


def float_vectors(vectors, source: str | None = None) -> "np.ndarray":
    """Unit-length float32 rows; codes (int8, packed bits) have no cosine to compare."""
    import numpy as np

    from vecpipe.core.vectors import normalized

    if not np.issubdtype(vectors.dtype, np.floating):
        raise DataError(f"near-duplicates are found on float vectors, these are "
                        f"{vectors.dtype} codes", source=source,
                        hint="compare the vectors before compressing them")
    return normalized(vectors)


def max_similarity(vectors: "np.ndarray", others: "np.ndarray") -> "np.ndarray":
    """Each row's largest dot product with any row of `others` (-inf when there are none)."""
    import numpy as np

    best = np.full(len(vectors), -np.inf, dtype=np.float32)
    for start in range(0, len(others), BLOCK):
        block = others[start:start + BLOCK]
        np.maximum(best, (vectors @ block.T).max(axis=1), out=best)
    return best


def greedy_keep(vectors: "np.ndarray", threshold: float) -> "np.ndarray":
    """Which rows survive a pass in order, each dropped if within `threshold` of an earlier
    survivor among these rows."""
    import numpy as np

    near = (vectors @ vectors.T) >= np.float32(threshold)
    alive = np.ones(len(vectors), dtype=bool)
    for row in range(len(vectors)):
        if alive[row]:
            alive[row + 1:] &= ~near[row, row + 1:]
    return alive


class NearDuplicates:
    """The state of one pass: the kept vectors so far, the reference set and the counts."""

    def __init__(self, threshold: float, against: "np.ndarray | None" = None):
        import numpy as np

        self.threshold = np.float32(threshold)
        self.against = against
        self.duplicates = 0
        self.contaminated = 0
        self._kept = None
        self._count = 0

    def keep(self, vectors: "np.ndarray", source: str | None = None) -> "np.ndarray":
        """The mask of the records (in order, after every earlier call) that are kept."""
        import numpy as np

        vectors = float_vectors(vectors, source)
        for other, named in ((self._kept, "earlier ones"), (self.against, "the reference set")):
            if other is not None and vectors.shape[1] != other.shape[1]:
                raise DataError(f"vectors have {vectors.shape[1]} dimensions, {named} "
                                f"{other.shape[1]}", source=source)
        mask = np.empty(len(vectors), dtype=bool)
        for start in range(0, len(vectors), CHUNK):
            mask[start:start + CHUNK] = self._keep_chunk(vectors[start:start + CHUNK])
        return mask

    def _keep_chunk(self, vectors):
        import numpy as np

        clean = np.ones(len(vectors), dtype=bool)
        if self.against is not None:
            clean = max_similarity(vectors, self.against) < self.threshold
            self.contaminated += int((~clean).sum())
        mask = clean & (max_similarity(vectors, self.kept) < self.threshold)
        survivors = np.flatnonzero(mask)
        mask[survivors] = greedy_keep(vectors[survivors], self.threshold)
        self.duplicates += int(clean.sum() - mask.sum())
        self._store(vectors[mask])
        return mask

    @property
    def kept(self) -> "np.ndarray":
        import numpy as np

        if self._kept is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._kept[:self._count]

    def _store(self, vectors) -> None:
        import numpy as np

        if self._kept is None:
            self._kept = np.empty((max(len(vectors), CHUNK), vectors.shape[1]), np.float32)
        if self._count + len(vectors) > len(self._kept):
            grown = np.empty((2 * (self._count + len(vectors)), self._kept.shape[1]), np.float32)
            grown[:self._count] = self._kept[:self._count]
            self._kept = grown
        self._kept[self._count:self._count + len(vectors)] = vectors
        self._count += len(vectors)
