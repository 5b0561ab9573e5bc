"""faiss's HNSW as the graph of an index folder (`"library": "faiss"` in the manifest's
`hnsw`, the graph in vectors.faiss), behind the same calls the folder makes on a usearch
index: add, replace, compact, save, search, get.

Why a second library: on the same 100k real MiniLM vectors, faiss's IndexHNSWFlat answered
2.8x the queries per second of usearch at the same ef and recall on one core, and built its
graph 2.2x faster (bench/search.py, BENCHMARKS.md). usearch stays the default: it is a core
dependency, memory-maps the whole graph, removes and renames nodes in place, and holds i8 and
b1 codes; faiss-cpu is the optional `faiss` extra.

f32 vectors are an IndexHNSWFlat, f16 an IndexHNSWSQ of QT_fp16 codes (the same float16
values usearch stores). Metrics: ip (cosine as the inner product of unit vectors, which the
index scales on the way in) and l2sq (faiss's L2 is squared). Distances come back in usearch's
convention (ip: 1 - dot product) so that `distance_to_score` reads both alike. faiss
cannot remove a node: replacing or deleting rows builds the graph again from the stored
vectors when it is saved; appending adds to it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from vecpipe.core.index_format import GRAPH_LIBRARIES
from vecpipe.formats.errors import DataError, ParameterError, UsageError

if TYPE_CHECKING:
    import numpy as np

FAISS_DTYPES = ("f32", "f16")
FAISS_METRICS = ("ip", "l2sq")
_ADD_BLOCK = 8192  # rows per faiss add while rebuilding: a signal is handled between blocks


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UsageError("a faiss graph needs faiss-cpu, which is not installed",
                         hint="pip install 'vecpipe[faiss]' (or faiss-cpu), or build a "
                              "usearch graph") from None
    return faiss


def check_library(library: str, metric: str, dtype: str, flat: bool) -> None:
    """What a faiss graph can hold: f32 or f16 vectors under ip/l2sq, in a graph."""
    if library not in GRAPH_LIBRARIES:
        raise ParameterError(f"unknown library {library!r}; use {'|'.join(GRAPH_LIBRARIES)}",
                             "library")
    if library == "usearch":
        return
    if flat:
        raise ParameterError("a flat index has no graph, so no graph library", "library")
    if dtype not in FAISS_DTYPES:
        raise ParameterError(f"a faiss graph holds f32 or f16 vectors, not {dtype}",
                             "library", hint="use a usearch graph for i8, b1 and bf16")
    if metric not in FAISS_METRICS:
        raise ParameterError(f"a faiss graph scores ip, cosine or l2sq, not {metric}",
                             "library")


class Matches(NamedTuple):
    """Search results shaped as usearch's BatchMatches: keys and distances (queries x count;
    key -1 past `counts`)."""
    keys: "np.ndarray"
    distances: "np.ndarray"
    counts: "np.ndarray"


class FaissGraph:
    """A faiss IndexHNSWFlat/IndexHNSWSQ whose ids are the row numbers 0..size-1."""

    def __init__(self, index, dtype: str, metric: str):
        self._index, self.dtype, self.metric = index, dtype, metric
        self.expansion_search = index.hnsw.efSearch
        self._rebuild = False  # rows were replaced: the graph is built again on save

    @classmethod
    def new(cls, dim: int, metric: str, dtype: str, connectivity: int | None = None,
            expansion_add: int | None = None, expansion_search: int | None = None):
        index = _empty_index(dim, metric, dtype, connectivity or 16)
        index.hnsw.efConstruction = expansion_add or 128
        index.hnsw.efSearch = expansion_search or 64
        return cls(index, dtype, metric)

    @classmethod
    def restore(cls, path: str, dtype: str, metric: str, view: bool = True):
        """Read vectors.faiss; `view`: its vectors memory-mapped, read-only (the graph's links
        are read into memory)."""
        faiss = import_faiss()
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if view else 0)
        except RuntimeError as err:
            raise DataError(f"vectors.faiss cannot be read: {str(err).splitlines()[0]}",
                            source=os.path.dirname(path)) from None
        expected = faiss.IndexHNSWFlat if dtype == "f32" else faiss.IndexHNSWSQ
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        if not isinstance(index, expected) or index.metric_type != faiss_metric:
            raise DataError(f"vectors.faiss holds a {type(index).__name__}, not the "
                            f"{expected.__name__} of {dtype} {metric} vectors the manifest "
                            "describes: the index is damaged", source=os.path.dirname(path))
        return cls(index, dtype, metric)

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def connectivity(self) -> int:
        return int(self._index.hnsw.nb_neighbors(1))  # level 0 links twice as many

    @property
    def expansion_add(self) -> int:
        return int(self._index.hnsw.efConstruction)

    @expansion_add.setter
    def expansion_add(self, value: int) -> None:
        self._index.hnsw.efConstruction = value

    def vectors(self) -> "np.ndarray":
        """Every stored vector (size x dim, float32 or float16), a view of faiss's storage
        (memory-mapped, and then not always aligned to the dtype)."""
        import numpy as np

        faiss = import_faiss()
        storage = faiss.downcast_index(self._index.storage)
        codes = faiss.rev_swig_ptr(storage.codes.data(), self.size * storage.code_size) \
            if self.size else np.zeros(0, dtype=np.uint8)
        return codes.view(np.float32 if self.dtype == "f32" else np.float16) \
            .reshape(self.size, self._index.d)

    def get(self, rows) -> "np.ndarray":
        import numpy as np

        return np.array(self.vectors()[np.asarray(rows, dtype=np.int64)])

    def add(self, keys, vectors, threads: int = 0) -> None:
        """Rows numbered on from `size`, in order (as the index builder numbers them)."""
        import numpy as np

        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if len(keys) and not np.array_equal(keys, np.arange(self.size, self.size + len(keys))):
            raise ValueError("a faiss graph adds rows numbered on from its size, in order")
        _set_threads(threads)
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def replace(self, row: int, vector) -> None:
        """The row's stored vector is overwritten; the graph is built again on save."""
        self.vectors()[row] = vector
        self._rebuild = True

    def compact(self, keep: "np.ndarray", threads: int = 0) -> None:
        """Keep only the rows `keep` (sorted), numbered again 0..len(keep)-1: a new graph."""
        self._build_again(keep, threads)

    def save(self, path: str, threads: int = 0) -> None:
        if self._rebuild:
            self._build_again(None, threads)
        faiss = import_faiss()
        faiss.write_index(self._index, path)

    def _build_again(self, rows, threads: int) -> None:
        """A new graph of the stored vectors (all, or `rows`), read from the old storage a
        block at a time: never a second whole copy beside both indexes."""
        old, stored = self._index, self.vectors()  # `old` keeps the view's memory alive
        self._index = _empty_index(old.d, self.metric, self.dtype, self.connectivity)
        self._index.hnsw.efConstruction = old.hnsw.efConstruction
        self._index.hnsw.efSearch = old.hnsw.efSearch
        self._rebuild = False
        total = len(stored) if rows is None else len(rows)
        for start in range(0, total, _ADD_BLOCK):
            stop = min(start + _ADD_BLOCK, total)
            block = stored[start:stop] if rows is None else stored[rows[start:stop]]
            self.add(range(start, stop), block, threads)

    def search(self, queries, count: int, exact: bool = False, threads: int = 0) -> Matches:
        """The top `count` rows of each query, in usearch's distances; `exact`: every stored
        vector is scored (faiss's flat storage, searched by brute force)."""
        import numpy as np

        faiss = import_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._index.d)
        _set_threads(threads)
        if exact:
            scores, keys = faiss.downcast_index(self._index.storage).search(queries, count)
        else:
            scores, keys = self._index.search(queries, count, params=faiss.SearchParametersHNSW(
                efSearch=self.expansion_search))
        distances = 1.0 - scores if self.metric == "ip" else scores
        return Matches(keys.astype(np.int64), distances.astype(np.float32),
                       (keys >= 0).sum(axis=1))


def _empty_index(dim: int, metric: str, dtype: str, connectivity: int):
    faiss = import_faiss()
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if dtype == "f32":
        return faiss.IndexHNSWFlat(dim, connectivity, faiss_metric)
    return faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, connectivity, faiss_metric)


def _set_threads(threads: int) -> None:
    """faiss's OpenMP threads for the next call: `threads`, or 0 for every CPU this process
    may run on."""
    faiss = import_faiss()
    faiss.omp_set_num_threads(threads or len(os.sched_getaffinity(0)))
