"""Opening an index folder: `open_index(path)` checks its manifest and file sizes (checksums
too with `verify`) and returns an `OpenIndex` (one folder, memory-mapped), for a linked
folder a `LinkedIndex` over its opened shards, for a lexical one a `core.lexical.LexicalIndex`.
All are `IndexReader`s.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from vecpipe.core.index_format import (
    FLAT_VECTORS, FULL, ID, PLANES, check_arrays, check_files, from_index_codes,
    graph_file, graph_library, hnsw_options, index_numpy_dtype, index_width, layout_of,
    read_manifest, read_rows, stored_columns, to_index_codes)
from vecpipe.core.index_linked import LinkedIndex
from vecpipe.core.index_search import Searcher
from vecpipe.core.index_spec import unit_ip
from vecpipe.formats.errors import DataError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from vecpipe.core.index_format import IndexReader


def open_index(path: str, verify: bool = False) -> "IndexReader":
    """Open an index folder: manifest and file sizes checked (checksums too with `verify`)."""
    manifest = read_manifest(path)
    if layout_of(manifest) == "linked":
        return _open_linked(path, manifest, verify)
    if layout_of(manifest) == "lexical":
        from vecpipe.core.lexical import open_lexical

        return open_lexical(path, manifest, verify)
    checked = check_files(path, manifest, verify)
    check_arrays(path, manifest)
    index = OpenIndex(path, manifest)
    index.files_checked = checked
    return index


def verify_index(path: str) -> int:
    """Check every file of an index (a linked one's shards too) against the manifest's sizes
    and checksums; returns the number of files checked."""
    return open_index(path, verify=True).files_checked


def _open_linked(path: str, manifest: dict, verify: bool) -> LinkedIndex:
    """`manifest` is checked by check_manifest: shard paths are `shards/NNNNN`, hidden rows
    `shards/NNNNN.hidden.npy`."""
    checked = check_files(path, manifest, verify)
    shards = []
    for entry in manifest["shards"]:
        shard = open_index(os.path.join(path, entry["path"]), verify=verify)
        if shard.count != entry["count"]:
            raise DataError(f"shard {entry['path']} holds {shard.count} vectors, the manifest "
                            f"says {entry['count']}: the index is damaged", source=path)
        shards.append(shard)
        checked += shard.files_checked
    index = LinkedIndex(path, manifest, shards)
    index.files_checked = checked
    return index


class OpenIndex:
    """An index folder opened for reading; the usearch index is memory-mapped on first use."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.count: int = manifest["count"]
        self.dim: int = manifest["dim"]
        self.metric: str = manifest["metric"]
        self.dtype: str = manifest["dtype"]
        self.score_metric: str = manifest.get("score_metric") or (
            "cos" if self.metric == "hamming" else self.metric)
        self.metadata: dict = manifest.get("metadata") or {}
        self.fields: list[str] = manifest["fields"]
        self.full_spec: dict | None = manifest.get("full")
        self.query_prompt: str | None = manifest.get("query_prompt")
        self.layout: str = layout_of(manifest)
        self.flat: bool = self.layout == "flat"
        self.planes: int = manifest.get("planes") or 1
        self.library: str = graph_library(manifest)
        self._graph = self._rows = self._full = self._flat = self._later_planes = None
        self.codec = None
        if self.metadata.get("codec"):
            from vecpipe.core.codec import codec_from_meta

            self.codec = codec_from_meta(self.metadata, source=path)
        _check_codes(self)

    @property
    def graph(self):
        """The HNSW graph, memory-mapped on first use: a usearch Index, or a
        core.faiss_graph.FaissGraph (the same calls) when the manifest's library is faiss."""
        if self.flat:
            raise UsageError("a flat index has no HNSW graph; it is searched exactly")
        if self._graph is None:
            name = graph_file(self.manifest)
            if self.library == "faiss":
                from vecpipe.core.faiss_graph import FaissGraph

                index = FaissGraph.restore(os.path.join(self.path, name), self.dtype,
                                           self.metric)
            else:
                from usearch.index import Index

                index = Index.restore(os.path.join(self.path, name), view=True)
            if index is None or index.size != self.count:
                raise DataError(f"{name} does not hold the manifest's {self.count} vectors",
                                source=self.path)
            index.expansion_search = self.manifest["hnsw"]["expansion_search"]
            self._graph = index
        return self._graph

    def rows(self, columns: Sequence[str] | None = None) -> "pa.Table":
        """The stored fields (all, or `columns`), row i = key i, memory-mapped."""

        if self._rows is None:
            self._rows = read_rows(self.path, self.count, self.fields)
        return stored_columns(self._rows, columns, self.path)

    def ids(self) -> "pa.ChunkedArray":
        return self.rows().column(ID)

    def visible_mask(self) -> None:
        """Every row of one folder is visible (its ids are unique)."""
        return None

    def storage_options(self) -> dict:
        return hnsw_options(self.manifest)

    files_checked = 0  # set by open_index

    def flat_vectors(self):
        """A flat index's vectors (memory-mapped numpy array, index space)."""
        if self._flat is None:
            import numpy as np

            self._flat = np.load(os.path.join(self.path, FLAT_VECTORS), mmap_mode="r",
                                 allow_pickle=False)
        return self._flat

    def full_vectors(self):
        """The kept full-precision vectors (memory-mapped numpy array), or None."""
        if self.full_spec is None:
            return None
        if self._full is None:
            import numpy as np

            self._full = np.load(os.path.join(self.path, FULL), mmap_mode="r",
                                 allow_pickle=False)
        return self._full

    @property
    def query_dim(self) -> int:
        """The dimension of float query vectors (before the codec, if any)."""
        return self.codec.input_dim if self.codec is not None else self.dim

    def later_planes(self):
        """planes.npy (memory-mapped): bit planes 2..K of a multi-bit b1 index, or None."""
        if self.planes == 1:
            return None
        if self._later_planes is None:
            import numpy as np

            self._later_planes = np.load(os.path.join(self.path, PLANES), mmap_mode="r",
                                         allow_pickle=False)
        return self._later_planes

    def stored_vectors(self, rows) -> "np.ndarray":
        """Index-space vectors of `rows` (codes for i8/b1/pq; every bit plane of a multi-bit
        b1 index, side by side)."""
        import numpy as np

        graph = self.graph_vectors(rows)
        if self.planes == 1:
            return graph
        later = self.later_planes()[np.asarray(rows, dtype=np.int64)]
        return np.concatenate([graph, later], axis=1)

    def graph_vectors(self, rows) -> "np.ndarray":
        """What usearch (or vectors.npy) holds for `rows`: of several bit planes, the first."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.uint64)
        width = index_width(self.dim, self.dtype)
        if len(rows) == 0:
            return np.zeros((0, width), dtype=index_numpy_dtype(self.dtype))
        if self.flat:
            return np.asarray(self.flat_vectors()[rows.astype(np.int64)])
        return np.vstack(self.graph.get(rows)).reshape(len(rows), width)

    def query_vectors(self, rows) -> "np.ndarray":
        """Float vectors of `rows` in the query space (query_dim columns, float32), as close to
        what was indexed as the folder allows: the kept full vectors; else the stored ones;
        codes decoded, and lifted back through the codec's truncation/PCA, so that encoding
        them as a query gives the decoded vector again (`lifted`)."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        full = self.full_vectors()
        if full is not None and self.full_spec["dim"] == self.query_dim:
            return np.asarray(full[rows], dtype=np.float32)
        stored = self.stored_vectors(rows)
        if self.codec is not None:
            return lifted(self.codec, self.codec.decode(from_index_codes(self.codec, stored)))
        if self.dtype in ("i8", "b1", "pq"):
            raise DataError(f"the index holds {self.dtype} codes but records no codec, so "
                            "its vectors cannot be decoded", source=self.path)
        return stored.astype(np.float32)

    def encode(self, queries) -> "np.ndarray":
        """Float queries -> the index space (the codec applied, if any; every bit plane)."""
        queries = self.checked_queries(queries)
        if self.codec is not None:
            return to_index_codes(self.codec, self.codec.encode(queries))
        if self.dtype in ("i8", "b1", "pq"):
            raise DataError(f"the index holds {self.dtype} codes but records no codec, so float "
                            "queries cannot be encoded", source=self.path,
                            hint="query with vectors encoded the same way")
        return queries

    def checked_queries(self, queries) -> "np.ndarray":
        """Float queries of a dimension the index takes, float32; scaled to unit length under
        cos when a codec encodes them (scale-free, and unit queries stay inside its ranges) or
        the graph scores unit vectors by their inner product."""
        import numpy as np

        queries = np.asarray(queries, dtype=np.float32)
        codec = self.codec
        if queries.ndim != 2 or queries.shape[1] not in (codec.query_dims if codec else
                                                         (self.query_dim,)):
            raise DataError(f"query vectors have {queries.shape[-1]} dimensions, the index "
                            f"expects {codec.expected_dims() if codec else self.query_dim}",
                            source=self.path)
        coded_cos = codec is not None and self.score_metric == "cos"
        if coded_cos or unit_ip(self.metric, self.score_metric):
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True),
                                           1e-30)
        return queries

    def searcher(self, k: int, **options) -> "Searcher":
        return Searcher(self, k, **options)


def _check_codes(index: OpenIndex) -> None:
    """pq and multi-bit b1 codes are read through their codec, which must match them."""
    codec = index.codec
    if index.dtype == "pq" and (codec is None or codec.to != "pq" or
                                codec.code_width != index.dim):
        raise DataError("the index holds pq codes without the pq codec that made them",
                        source=index.path)
    if index.planes != (codec.bits if codec is not None else 1):
        raise DataError(f"the index holds {index.planes} bit planes, its codec makes "
                        f"{codec.bits if codec is not None else 1}: the index is damaged",
                        source=index.path)


def lifted(codec, reduced) -> "np.ndarray":
    """Vectors of a codec's reduced space (`project`'s output) -> its input space, such that
    `codec.project(lifted(codec, r))` is `r` (renormalised when the codec normalises)."""
    return codec.lift(reduced)
