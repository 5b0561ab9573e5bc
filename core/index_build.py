"""Building an index folder (the `IndexSpec` of `index_spec`), or a copy of an existing one
with rows added, replaced or deleted, atomically.

`IndexBuilder(path, spec | base=open_index(...), on_duplicate=..., threads=...)` is a context
manager; `.add(ids, vectors, stored, full=None, source=, first_record=)` then the block's end
commits: everything is written to a temporary sibling folder, then renamed into place, so an
interrupted build leaves the old index intact.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from typing import TYPE_CHECKING, Sequence

from vecpipe.core.index_format import (
    FAISS_VECTORS, FLAT_VECTORS, FULL, ID, PLANES, ROWS, VECTORS, CommitOnExit, check_target,
    clean_leftovers, file_facts, full_numpy_dtype, hnsw_options, index_numpy_dtype,
    index_width, new_manifest, real_folder, swap_into_place, temporary_sibling, vectors_file,
    write_manifest)
from vecpipe.core.index_delete import compact_graph, kept_rows
from vecpipe.core.index_spec import IndexSpec
from vecpipe.formats.errors import ParameterError
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.writers import write_error

if TYPE_CHECKING:
    from vecpipe.core.index_format import IndexReader

DUPLICATE_POLICIES = ("error", "first", "last")
_OLD_DUPLICATE_NAMES = {"skip": "first", "replace": "last", "none": "error"}
_NPY_HEADER = 128          # full.npy gets a fixed-size header, rewritten when the count is known


def duplicate_policy(name: str) -> str:
    """error | first | last for an id already in the index: first keeps the row there, last
    replaces it. The builder's older names (skip, replace) and merge's `none` (nothing is
    deduplicated, so a repeated id fails) are accepted; `keep` is refused, since an index
    holds one row per id."""
    name = _OLD_DUPLICATE_NAMES.get(name, name)
    if name == "keep":
        raise ParameterError("an index holds one row per id, so it cannot keep both copies of "
                             "a duplicate id", "on_duplicate",
                             hint="keep the first or the last copy, or fail")
    if name not in DUPLICATE_POLICIES:
        raise ParameterError(f"unknown duplicate-id policy {name!r}; use "
                             f"{'|'.join(DUPLICATE_POLICIES)}", "on_duplicate")
    return name


class _NpyWriter:
    """A 2-D .npy file appended row-block by row-block; rows can be overwritten in place."""

    def __init__(self, path: str, dim: int, dtype):
        import numpy as np

        self.path, self.dim, self.dtype = path, dim, np.dtype(dtype)
        self.rows = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, b"\0" * _NPY_HEADER, 0)

    def _offset(self, row: int) -> int:
        return _NPY_HEADER + row * self.dim * self.dtype.itemsize

    def append(self, matrix) -> None:
        import numpy as np

        data = np.ascontiguousarray(matrix, dtype=self.dtype)
        os.pwrite(self.fd, data.tobytes(), self._offset(self.rows))
        self.rows += len(data)

    def overwrite(self, row: int, vector) -> None:
        import numpy as np

        os.pwrite(self.fd, np.ascontiguousarray(vector, dtype=self.dtype).tobytes(),
                  self._offset(row))

    def close(self) -> None:
        import numpy as np

        header = "{'descr': %r, 'fortran_order': False, 'shape': (%d, %d), }" % (
            np.lib.format.dtype_to_descr(self.dtype), self.rows, self.dim)
        body_len = _NPY_HEADER - 10  # magic (6) + version (2) + header length (2)
        header = header.ljust(body_len - 1) + "\n"
        os.pwrite(self.fd, b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") +
                  header.encode("latin1"), 0)
        os.close(self.fd)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class IndexBuilder(CommitOnExit):
    """Build a new index (`spec`) or a copy of `base` with more rows, atomically.

    `add()` takes string ids, index-space vectors (float32/float16 for float dtypes, int8 codes
    for i8, packed uint8 bits for b1, every plane side by side when the spec has several, uint8
    sub-vector codes for pq), the stored fields (a pyarrow Table/RecordBatch with `id`
    and the stored fields, one row per vector) and, when the spec keeps them, full vectors.
    Duplicate ids (against the base and within the stream) follow `on_duplicate`
    (`duplicate_policy`): error, first (keep the row there), last (the row keeps its number,
    its vector and fields are replaced). `delete`: ids whose rows of `base` are left out of
    the copy before anything is added (the rest keep their order, numbered again; see
    index_delete); `deleted` and `not_found` count them.
    """

    def __init__(self, path: str, spec: IndexSpec | None = None, base: "IndexReader | None" = None,
                 on_duplicate: str = "error", threads: int = 0, fields: Sequence[str] = (),
                 delete: Sequence[str] | None = None):
        import numpy as np

        # a symlink to an index: its target folder is replaced and the link kept (renaming
        # the link itself would leave the target and the swapped-out link behind)
        self.path = real_folder(path)
        if base is not None and base.layout == "linked":
            raise UsageError("cannot append to a linked multi-shard index",
                             hint="index the new records on their own and link them in as "
                                  "another shard")
        self.spec = spec or _spec_of(base)
        self.spec.check()
        _check_codec(self.spec)
        self.fields = list(base.fields) if base else [ID, *[f for f in fields if f != ID]]
        self.on_duplicate = duplicate_policy(on_duplicate)
        self.threads = threads
        self.skipped = self.replaced = 0
        self.deleted = self.not_found = 0  # rows of `base` deleted; ids of `delete` it lacks
        self._keep = None                  # the rows of `base` that stay (None: all)
        if delete is not None:
            if base is None:
                raise ValueError("rows can be deleted only from a base index")
            self._keep, self.deleted, self.not_found = kept_rows(base.ids(), delete)
        if base is None:
            check_target(self.path)
        clean_leftovers(self.path)
        self.tmp = temporary_sibling(self.path, "building")
        try:
            self._vectors = self._start_flat(base) if self.spec.flat else \
                self._start_graph(base)
            self._full = self._start_full(base)
            self._planes = self._start_planes(base)
            self._tokens = self._start_tokens(base)
        except BaseException:
            self.abort()
            raise
        self._row_of: dict[str, int] = {}
        self._tables: list = []          # stored-field tables in arrival order
        self._arrived = 0                # rows in self._tables
        self._position = np.zeros(0, dtype=np.int64)  # row -> position in the arrivals
        self.count = 0
        if base is not None:
            self._take_base(base)

    def _start_graph(self, base):
        if self.spec.library == "faiss":
            return self._start_faiss(base)
        from usearch.index import Index

        if base is not None:
            index = Index.restore(os.path.join(base.path, VECTORS), view=False)
            if self._keep is not None:
                compact_graph(index, base.count, self._keep)
        else:
            spec = self.spec
            index = Index(ndim=spec.dim, metric=spec.metric, dtype=spec.dtype,
                          connectivity=spec.connectivity, expansion_add=spec.expansion_add,
                          expansion_search=spec.expansion_search)
        self.spec.connectivity = index.connectivity
        if self.spec.expansion_add:
            index.expansion_add = self.spec.expansion_add
        if self.spec.expansion_search:
            index.expansion_search = self.spec.expansion_search
        self.spec.expansion_add = index.expansion_add
        self.spec.expansion_search = index.expansion_search
        return index

    def _start_faiss(self, base):
        from vecpipe.core.faiss_graph import FaissGraph

        spec = self.spec
        if base is None:
            graph = FaissGraph.new(spec.dim, spec.metric, spec.dtype, spec.connectivity,
                                   spec.expansion_add, spec.expansion_search)
        else:
            graph = FaissGraph.restore(os.path.join(base.path, FAISS_VECTORS), spec.dtype,
                                       spec.metric, view=False)
            if self._keep is not None:
                graph.compact(self._keep, self.threads)
        graph.expansion_search = spec.expansion_search or graph.expansion_search
        if spec.expansion_add:
            graph.expansion_add = spec.expansion_add
        spec.connectivity, spec.expansion_add = graph.connectivity, graph.expansion_add
        spec.expansion_search = graph.expansion_search
        return graph

    def _start_flat(self, base):
        writer = _NpyWriter(os.path.join(self.tmp, FLAT_VECTORS),
                            index_width(self.spec.dim, self.spec.dtype),
                            index_numpy_dtype(self.spec.dtype))
        if base is not None:
            _copy_rows(base.flat_vectors(), writer, self._keep)
        return writer

    def _start_full(self, base):
        if not self.spec.full:
            return None
        writer = _NpyWriter(os.path.join(self.tmp, FULL), self.spec.full["dim"],
                            full_numpy_dtype(self.spec.full["dtype"]))
        if base is not None:
            _copy_rows(base.full_vectors(), writer, self._keep)
        return writer

    def _start_tokens(self, base):
        """The token store (core.multivector) of a new index whose spec keeps token vectors;
        an index that has one is not copied (appending, deleting) yet."""
        if base is not None and base.manifest.get("tokens"):
            raise UsageError("the index keeps token vectors (multi-vector), which appending "
                             "and deleting do not copy yet", hint="build it again from "
                                                                  "every record")
        if not self.spec.tokens:
            return None
        from vecpipe.core.multivector import TokenStoreWriter

        if self.on_duplicate == "last":
            raise UsageError("an index keeping token vectors takes each id once: duplicates "
                             "cannot replace earlier rows", hint="keep the first copy")
        return TokenStoreWriter(self.tmp, self.spec.tokens["dim"])

    def _start_planes(self, base):
        """planes.npy: the bit planes after the first, which the graph does not hold."""
        spec = self.spec
        if spec.planes == 1:
            return None
        writer = _NpyWriter(os.path.join(self.tmp, PLANES),
                            index_width(spec.dim, spec.dtype, spec.planes - 1),
                            index_numpy_dtype(spec.dtype))
        if base is not None:
            _copy_rows(base.later_planes(), writer, self._keep)
        return writer

    def _take_base(self, base: "IndexReader") -> None:
        import numpy as np

        table = base.rows()
        if self._keep is not None:
            table = table.take(self._keep)
        self._tables.append(table)
        self._arrived = self.count = table.num_rows
        self._position = np.arange(table.num_rows, dtype=np.int64)
        self._row_of = {key: row for row, key in enumerate(table.column(ID).to_pylist())}

    def add(self, ids: Sequence[str], vectors, stored, full=None, source: str | None = None,
            first_record: int = 1, tokens=None) -> None:
        """Add one batch; `first_record` (1-based) locates errors in `source`; `tokens`:
        (flat token vectors, offsets) of the batch's rows when the spec keeps them."""

        vectors = self._checked_vectors(vectors, source, first_record)
        if (full is None) != (self._full is None):
            raise ValueError("full vectors must be given exactly when the spec keeps them")
        if full is not None and (full.ndim != 2 or full.shape[1] != self.spec.full["dim"]):
            raise DataError(f"full vectors have dimension {full.shape[-1]}, the index keeps "
                            f"{self.spec.full['dim']}", source=source, record=first_record)
        new_rows, new_pos, replace_rows, replace_pos = self._assign_rows(ids, source, first_record)
        if (tokens is None) != (self._tokens is None):
            raise ValueError("token vectors must be given exactly when the spec keeps them")
        if self._tokens is not None:
            self._add_tokens(tokens, new_pos)
        if self._planes is not None:  # the graph gets the first plane
            first_plane = index_width(self.spec.dim, self.spec.dtype)
            _write_rows(self._planes, vectors[:, first_plane:], new_pos, replace_rows,
                        replace_pos)
            vectors = vectors[:, :first_plane]
        if self.spec.flat:
            _write_rows(self._vectors, vectors, new_pos, replace_rows, replace_pos)
        else:
            with interruptible():
                self._add_to_graph(new_rows, new_pos, replace_rows, replace_pos, vectors)
        if self._full is not None:
            _write_rows(self._full, full, new_pos, replace_rows, replace_pos)
        self._add_stored(stored, new_rows + replace_rows, new_pos + replace_pos)

    def _add_tokens(self, tokens, positions) -> None:
        """The token sets of the batch's new rows (in row order: rows are numbered as they
        arrive, and a kept first copy leaves later ones out)."""
        from vecpipe.core.fde import pack_sets

        flat, offsets = tokens
        if len(positions) != len(offsets) - 1:
            flat, offsets = pack_sets([flat[offsets[p]:offsets[p + 1]] for p in positions])
        self._tokens.add(flat, offsets)

    def _add_to_graph(self, new_rows, new_pos, replace_rows, replace_pos, vectors) -> None:
        import numpy as np

        keys = np.asarray(new_rows, dtype=np.uint64)
        if len(keys):
            self._vectors.add(keys, vectors[new_pos], threads=self.threads)
        for row, pos in zip(replace_rows, replace_pos):
            if self.spec.library == "faiss":
                self._vectors.replace(row, vectors[pos])
                continue
            self._vectors.remove(row)
            self._vectors.add(row, vectors[pos])

    def _checked_vectors(self, vectors, source, first_record):
        import numpy as np

        width = index_width(self.spec.dim, self.spec.dtype, self.spec.planes)
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise DataError(f"vectors have dimension {vectors.shape[-1]}, the index has "
                            f"{width}", source=source, record=first_record)
        if vectors.dtype.kind == "f":
            finite = np.isfinite(vectors).all(axis=1)
            if not finite.all():
                raise DataError("vector holds NaN or infinity", source=source,
                                record=first_record + int(np.argmin(finite)))
        if self.spec.unit_ip:
            from vecpipe.core.vectors import normalized

            vectors = normalized(vectors)
        return vectors

    def _assign_rows(self, ids, source, first_record):
        """Row numbers for a batch: (new rows, their batch positions, replaced rows, positions).
        A later duplicate within the batch under `last` updates the earlier assignment."""
        new_rows, new_pos, replace_at = [], [], {}
        pending = {}  # row -> index into new_rows, for rows first seen in this batch
        for pos, key in enumerate(ids):
            row = self._row_of.get(key)
            if row is None:
                row = self._row_of[key] = self.count + len(new_rows)
                pending[row] = len(new_rows)
                new_rows.append(row)
                new_pos.append(pos)
            elif self.on_duplicate == "error":
                raise DataError(f"duplicate id {key!r}", source=source, record=first_record + pos,
                                hint="keep the first copy or the last instead of failing")
            elif self.on_duplicate == "first":
                self.skipped += 1
            else:
                self.replaced += 1
                if row in pending:
                    new_pos[pending[row]] = pos
                else:
                    replace_at[row] = pos
        self.count += len(new_rows)
        return new_rows, new_pos, list(replace_at), list(replace_at.values())

    def _add_stored(self, stored, rows, positions) -> None:
        import numpy as np
        import pyarrow as pa

        from vecpipe.formats.schema import align_batch

        table = pa.Table.from_batches([stored]) if isinstance(stored, pa.RecordBatch) else stored
        table = table.select(self.fields)
        if self._tables:
            first = self._tables[0].schema
            table = pa.Table.from_batches([align_batch(b, first) for b in table.to_batches()],
                                          first)
        self._tables.append(table)
        if len(self._position) < self.count:
            grown = np.zeros(max(self.count, 2 * len(self._position)), dtype=np.int64)
            grown[:len(self._position)] = self._position
            self._position = grown
        self._position[np.asarray(rows, dtype=np.int64)] = \
            self._arrived + np.asarray(positions, dtype=np.int64)
        self._arrived += table.num_rows

    def commit(self) -> dict:
        """Write everything into the temporary folder, then swap it into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.count == 0:
            raise DataError("no records to index")
        try:
            if self.spec.flat:
                self._vectors.close()
            elif self.spec.library == "faiss":
                with interruptible():
                    self._vectors.save(os.path.join(self.tmp, FAISS_VECTORS), self.threads)
            else:
                self._vectors.save(os.path.join(self.tmp, VECTORS))
            rows = pa.concat_tables(self._tables).take(pa.array(self._position[:self.count]))
            pq.write_table(rows, os.path.join(self.tmp, ROWS), compression="zstd")
        except OSError as err:
            raise write_error(err, self.path) from None
        except RuntimeError as err:  # usearch says only "Failed to serialize into stream"
            raise _save_error(err, self.tmp, self.path) from None
        files = [vectors_file(self.spec.layout, self.spec.library), ROWS]
        for writer, name in ((self._full, FULL), (self._planes, PLANES)):
            if writer is not None:
                writer.close()
                files.append(name)
        if self._tokens is not None:
            files += self._tokens.close()
        manifest = new_manifest(
            self.spec.layout, self.count, self.spec.dim, self.spec.metric, self.spec.dtype,
            self.spec.score_metric, self.spec.metadata, self.spec.query_prompt, self.fields,
            self.spec.full, **self._layout_keys(), files=file_facts(self.tmp, files))
        if self.spec.tokens:
            manifest["tokens"] = dict(self.spec.tokens)
        write_manifest(self.tmp, manifest)
        swap_into_place(self.tmp, self.path)
        return manifest

    def _layout_keys(self) -> dict:
        spec = self.spec
        planes = {"planes": spec.planes} if spec.planes > 1 else {}
        return {"flat": spec.flat, "hnsw": None if spec.flat else {
            "library": spec.library, "connectivity": spec.connectivity,
            "expansion_add": spec.expansion_add, "expansion_search": spec.expansion_search},
            **planes}

    def abort(self) -> None:
        if getattr(self, "_tokens", None) is not None:
            self._tokens.abort()
        for writer in (getattr(self, "_full", None), getattr(self, "_vectors", None),
                       getattr(self, "_planes", None)):
            if isinstance(writer, _NpyWriter):
                writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _save_error(err: RuntimeError, folder: str, path: str) -> DataError:
    """usearch's failed save as a DataError: disk full when the folder's filesystem is."""
    try:
        usage = os.statvfs(folder)
        full = usage.f_bavail * usage.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full:
        return write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    return DataError(f"could not write the index: {err}", source=path)


@contextlib.contextmanager
def interruptible():
    """Around usearch's add and search, which run Python's signal handlers themselves and,
    when one raises (Ctrl-C's KeyboardInterrupt, SIGTERM's Terminated), stop with an exception
    of their own that loses the handler's (RuntimeError from add, MemoryError from an exact
    search; or SystemError, "returned a result with an exception set", when the search
    returns after the handler raised): the handler's exception is raised instead."""
    with _SignalWatch() as watch:
        try:
            yield
        except (RuntimeError, MemoryError, SystemError):
            if watch.raised is not None:
                raise watch.raised from None
            raise


class _SignalWatch:
    """Keeps the exception that a SIGINT or SIGTERM handler raised while it was entered."""

    def __init__(self):
        self.raised: BaseException | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_SignalWatch":
        if threading.current_thread() is threading.main_thread():  # handlers live there
            for signum in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(signum)
                if callable(handler):
                    self._previous[signum] = handler
                    signal.signal(signum, self._watched(handler))
        return self

    def _watched(self, handler):
        def run(signum, frame):
            try:
                handler(signum, frame)
            except BaseException as err:
                self.raised = err
                raise
        return run

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _check_codec(spec: IndexSpec) -> None:
    """The spec stores what its codec makes: pq codes as dtype pq, K bit planes as K planes."""
    from vecpipe.core.codec import codec_from_meta

    codec = codec_from_meta(spec.metadata or {})
    if (codec is not None and codec.to == "pq") != (spec.dtype == "pq"):
        raise DataError("dtype pq holds the codes of a pq codec, and those codes only")
    planes = codec.bits if codec is not None else 1
    if planes != spec.planes:
        raise DataError(f"the codec makes {planes} bit plane(s), the index was to hold "
                        f"{spec.planes}")


def _spec_of(base: "IndexReader") -> IndexSpec:
    m = base.manifest
    return IndexSpec(dim=m["dim"], metric=m["metric"], dtype=m["dtype"],
                     score_metric=m.get("score_metric"), **hnsw_options(m),
                     metadata=dict(m["metadata"]), query_prompt=m.get("query_prompt"),
                     full=m.get("full"), planes=m.get("planes") or 1)


def _write_rows(writer: _NpyWriter, matrix, new_pos, replace_rows, replace_pos) -> None:
    """New rows append (they are numbered in arrival order); replaced rows are overwritten."""
    writer.append(matrix[new_pos])
    for row, pos in zip(replace_rows, replace_pos):
        writer.overwrite(row, matrix[pos])


def _copy_rows(matrix, writer: _NpyWriter, rows=None, block: int = 65536) -> None:
    """Copy `matrix` (or its `rows`, sorted) block by block: a memory map is never read
    whole."""
    total = len(matrix) if rows is None else len(rows)
    for start in range(0, total, block):
        writer.append(matrix[start:start + block] if rows is None
                      else matrix[rows[start:start + block]])
