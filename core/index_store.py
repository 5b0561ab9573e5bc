"""The index folder: writing it (atomically), opening it (memory-mapped) and searching it.

    idx/manifest.json    format version, count, dim, metric, dtype, HNSW parameters, the stream
                         metadata of the indexed vectors (model, prompt, codec...), stored fields,
                         file sizes and sha256 checksums
    idx/vectors.usearch  usearch HNSW; keys are row numbers (uint64)
    idx/vectors.npy      instead, with `index --flat`: the index-space vectors alone, row i = key
                         i, memory-mapped and searched exactly (no graph)
    idx/rows.parquet     row number (= position) -> `id` and the stored fields
    idx/full.npy         optional full-precision vectors for rescoring (memory-mapped)

API (numpy/pyarrow/usearch only):
- `IndexSpec`: what a new index is (dim, metric, dtype, HNSW params, metadata, full vectors).
- `IndexBuilder(path, spec | base=open_index(...), on_duplicate=..., threads=...)`: a context
  manager; `.add(ids, vectors, stored, full=None, source=, first_record=)` then the block's end
  commits: everything is written to a temporary sibling folder, then renamed into place, so an
  interrupted build leaves the old index intact.
- `open_index(path, verify=False) -> OpenIndex`: manifest checked, usearch index memory-mapped
  (`.usearch`), `.rows(columns)`, `.ids()`, `.full_vectors()`, `.stored_vectors(rows)`,
  `.codec`, `.encode(float queries)`, `.searcher(k, ...)` -> `Searcher`, whose
  `.search(queries) -> Hits` does ANN or exact search, filters at any selectivity, rescoring and
  the score threshold. `read_manifest(path)` reads only the manifest.
- Scores are similarities, larger is better, whatever the metric: cos -> cosine, ip -> dot
  product, l2sq -> minus the squared distance, hamming -> the fraction of equal bits
  (`distance_to_score` converts usearch distances). `similarity(metric, queries, vectors)` and
  `TopK` compute the same scores with numpy (exact search over a stream).
- Quantized indexes: i8 holds the compress codec's int8 codes (uint8 codes shifted by -128), b1
  its packed sign bits; the codec travels in `metadata["codec"]`. `to_index_codes` /
  `from_index_codes` convert between codec codes and what usearch stores. i8 scores are always
  the float query against the decoded codes (asymmetric); b1 scores are hamming-based unless
  rescored.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.writers import write_error
from vecpipe.core.vectors import Hits, distance_to_score, paired_similarity, sorted_hits

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FORMAT = "vecpipe-index"
FORMAT_VERSION = 1
MANIFEST, VECTORS, ROWS, FULL = "manifest.json", "vectors.usearch", "rows.parquet", "full.npy"
FLAT_VECTORS = "vectors.npy"
METRICS = ("cos", "ip", "l2sq", "hamming")
FLOAT_METRICS = ("cos", "ip", "l2sq")
DTYPES = ("f32", "f16", "bf16", "i8", "b1")
FLOAT_DTYPES = ("f32", "f16", "bf16")
ON_DUPLICATE = ("error", "skip", "replace")
ID = "id"
_NPY_HEADER = 128          # full.npy gets a fixed-size header, rewritten when the count is known
_OVERSAMPLE = 2.0          # filtered ANN fetches this many times the expected need
_HNSW_COST = 32            # ~distance computations per HNSW result, vs 1 per row for exact
# i8 codes carry per-dimension scales, so the graph's code-space neighbours are not quite the
# float ones: fetching 4x candidates and rescoring them against the float query took recall@10
# on real MiniLM vectors from 0.86 to 0.97 (bench/search.py).
_SCALAR_CODES_RESCORE = 4


# ---- manifest ---------------------------------------------------------------------------------

@dataclass
class IndexSpec:
    """What a new index is. `dim` is the index-space dimension (bits for b1); `metric` is the
    usearch metric; `score_metric` the float metric of rescoring and of i8 scores (the same as
    `metric` for float indexes); `full` describes kept full-precision vectors ({"dim", "dtype"})
    or is None; `metadata` holds the stream metadata of the vectors (model, codec...); `flat`
    keeps the vectors without an HNSW graph (exact search only)."""

    dim: int
    metric: str = "cos"
    dtype: str = "f32"
    score_metric: str | None = None
    connectivity: int | None = None
    expansion_add: int | None = None
    expansion_search: int | None = None
    metadata: dict = field(default_factory=dict)
    query_prompt: str | None = None
    full: dict | None = None
    flat: bool = False

    def check(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"unknown metric {self.metric!r}; use {'|'.join(METRICS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use {'|'.join(DTYPES)}")
        if (self.metric == "hamming") != (self.dtype == "b1"):
            raise UsageError("--metric hamming goes with --dtype b1 (and b1 with hamming)")
        self.score_metric = self.score_metric or (
            "cos" if self.metric == "hamming" else self.metric)
        if self.score_metric not in FLOAT_METRICS:
            raise UsageError(f"score metric must be one of {'|'.join(FLOAT_METRICS)}")
        if self.dtype == "b1" and self.dim % 8:
            raise DataError(f"b1 needs a dimension divisible by 8, got {self.dim}")
        if self.flat and self.dtype == "bf16":
            raise UsageError("a flat index keeps f32, f16, i8 or b1 vectors; use --dtype f16 "
                             "for half the size of f32")
        if self.flat and (self.connectivity or self.expansion_add or self.expansion_search):
            raise UsageError("a flat index has no HNSW graph: --connectivity and --expansion-* "
                             "do not apply")


def read_manifest(path: str) -> dict:
    """The manifest of an index folder, checked for format, version, field types and file
    names (see `check_manifest`)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise DataError("no such index folder", source=path)
    if not os.path.isfile(manifest_path):
        raise DataError("folder has no manifest.json; not a vecpipe index", source=path)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as err:
        raise DataError(f"invalid manifest.json: {err}", source=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError("manifest.json is not a vecpipe index manifest", source=path)
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise DataError("manifest.json: 'format_version' must be a positive integer",
                        source=path)
    if version > FORMAT_VERSION:
        raise DataError(f"index format {version} is newer than this vecpipe reads "
                        f"({FORMAT_VERSION})", source=path, hint="upgrade vecpipe")
    check_manifest(manifest, path)
    return manifest


# ---- manifest checks: a manifest is input, and may have been crafted -------------------------

_SHARD_FILE = re.compile(r"shards/[0-9]{5}\.hidden\.npy")


def check_manifest(manifest: dict, path: str) -> None:
    """Refuse a manifest whose fields have the wrong types or whose file names are not the
    known plain names (`shards/NNNNN[.hidden.npy]` in a linked index): a name is never
    followed outside the folder, and the error says nothing about the file it names."""
    _field(manifest, path, "count", _is_count, "a non-negative integer")
    _field(manifest, path, "dim", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _field(manifest, path, "metric", lambda v: v in METRICS, "|".join(METRICS))
    _field(manifest, path, "dtype", lambda v: v in DTYPES, "|".join(DTYPES))
    _field(manifest, path, "score_metric", lambda v: v is None or v in FLOAT_METRICS,
           "|".join(FLOAT_METRICS), optional=True)
    _field(manifest, path, "fields", lambda v: isinstance(v, list) and ID in v and
           all(isinstance(name, str) for name in v), "a list of field names with 'id'")
    _field(manifest, path, "metadata", lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(value, str) for value in v.values())), "an object of strings",
        optional=True)
    _field(manifest, path, "query_prompt", lambda v: v is None or isinstance(v, str),
           "a string or null", optional=True)
    _field(manifest, path, "full", _is_full_spec,
           'null or {"dim": N, "dtype": "float32"|"float16"}', optional=True)
    if manifest.get("layout") == "linked":
        _check_linked_manifest(manifest, path)
        return
    if "layout" in manifest:
        raise DataError("manifest.json: unknown 'layout'", source=path)
    _field(manifest, path, "flat", lambda v: isinstance(v, bool), "true or false",
           optional=True)
    if not manifest.get("flat"):
        _field(manifest, path, "hnsw", lambda v: isinstance(v, dict) and all(
            _is_int(v.get(key)) and v[key] >= 1
            for key in ("connectivity", "expansion_add", "expansion_search")),
            "an object of positive connectivity/expansion_add/expansion_search")
    expected = {FLAT_VECTORS if manifest.get("flat") else VECTORS, ROWS}
    if manifest.get("full"):
        expected.add(FULL)
    _check_file_names(manifest, path, lambda name: name in expected)
    for name in sorted(expected - set(manifest["files"])):
        raise DataError(f"manifest.json lists no {name}: the index is damaged", source=path)


def _check_linked_manifest(manifest: dict, path: str) -> None:
    from vecpipe.core.linked_index import shard_folder

    _field(manifest, path, "shards", lambda v: isinstance(v, list) and v and all(
        isinstance(entry, dict) for entry in v), "a list of shard objects")
    for number, entry in enumerate(manifest["shards"]):
        folder = shard_folder(number)
        if entry.get("path") != folder:
            raise DataError(f"manifest.json: shard {number} must be in {folder}, not "
                            f"{_shown(entry.get('path'))}", source=path)
        if not _is_count(entry.get("count")):
            raise DataError(f"manifest.json: the 'count' of {folder} must be a non-negative "
                            "integer", source=path)
        if entry.get("hidden") not in (None, f"{folder}.hidden.npy"):
            raise DataError(f"manifest.json: the hidden rows of {folder} must be in "
                            f"{folder}.hidden.npy, not {_shown(entry['hidden'])}", source=path)
    if "files" in manifest:  # older linked indexes recorded no checksums for hidden rows
        _check_file_names(manifest, path, _SHARD_FILE.fullmatch)


def _check_file_names(manifest: dict, path: str, known) -> None:
    _field(manifest, path, "files", lambda v: isinstance(v, dict) and all(
        isinstance(facts, dict) and _is_count(facts.get("bytes"))
        and isinstance(facts.get("sha256"), str) for facts in v.values()),
        'an object of {"bytes", "sha256"} per file name')
    for name in manifest["files"]:
        if not known(name):
            raise DataError(f"manifest.json lists {_shown(name)}, which is not an index file "
                            "name: refusing the index", source=path)


def _field(manifest: dict, path: str, key: str, valid, expected: str,
           optional: bool = False) -> None:
    if optional and key not in manifest:
        return
    if key not in manifest or not valid(manifest[key]):
        shown = "missing" if key not in manifest else _shown(manifest[key])
        raise DataError(f"manifest.json: {key!r} must be {expected}, not {shown}",
                        source=path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return _is_int(value) and value >= 0


def _is_full_spec(value) -> bool:
    return value is None or (isinstance(value, dict) and _is_int(value.get("dim")) and
                             value["dim"] >= 1 and value.get("dtype") in ("float32", "float16"))


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_facts(folder: str, names: Iterable[str]) -> dict:
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)),
                   "sha256": _sha256(os.path.join(folder, name))} for name in names}


def check_files(path: str, manifest: dict, verify: bool) -> int:
    """Sizes (and with `verify` checksums) of the files the manifest lists, whose names
    `check_manifest` accepted; returns how many were checked."""
    files = manifest.get("files", {})
    for name, facts in files.items():
        file_path = os.path.join(path, name)
        try:
            info = os.lstat(file_path)
        except FileNotFoundError:
            raise DataError(f"index file {name} is missing", source=path) from None
        if not stat.S_ISREG(info.st_mode):  # a link could lead anywhere: vecpipe writes none
            raise DataError(f"index file {name} is not a plain file", source=path)
        if info.st_size != facts["bytes"]:
            raise DataError(f"index file {name} has {info.st_size} bytes, the manifest says "
                            f"{facts['bytes']}: the index is damaged", source=path)
        if verify and _sha256(file_path) != facts["sha256"]:
            raise DataError(f"index file {name} does not match its checksum: the index is "
                            "damaged", source=path)
    return len(files)


def _npy_header(path: str, name: str):
    """(shape, dtype) of a .npy file, read without loading (or unpickling) anything."""
    import numpy as np

    try:
        with open(os.path.join(path, name), "rb") as f:
            npy = np.lib.format
            read_header = npy.read_array_header_1_0 if npy.read_magic(f) == (1, 0) \
                else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, SyntaxError) as err:
        raise DataError(f"{name} is not a readable .npy file ({err})", source=path) from None
    if dtype.hasobject:
        raise DataError(f"{name} holds Python objects (dtype object), not numbers; vecpipe "
                        "never unpickles index files", source=path)
    if fortran:
        raise DataError(f"{name} is in Fortran order; vecpipe writes C order", source=path)
    return shape, dtype


def _check_matrix(path: str, name: str, rows: int, width: int, dtype) -> None:
    import numpy as np

    shape, found = _npy_header(path, name)
    if found != np.dtype(dtype):
        raise DataError(f"{name} holds {found} values, the manifest implies "
                        f"{np.dtype(dtype)}: the index is damaged", source=path)
    if shape != (rows, width):
        raise DataError(f"{name} has shape {shape}, the manifest says {rows} vectors of "
                        f"{width}: the index is damaged", source=path)


# ---- full-precision vectors (.npy written incrementally) --------------------------------------

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


# ---- building ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(path: str) -> None:
    """Remove temporary folders of builds whose process died; if a crash happened between the
    two renames of a commit, put the old index back."""
    parent, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(parent):
        for kind in ("building", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-")[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            leftover = os.path.join(parent, entry)
            if kind == "old" and not os.path.exists(path):
                os.rename(leftover, path)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _sibling(path: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent)


class IndexBuilder:
    """Build a new index (`spec`) or a copy of `base` with more rows, atomically.

    `add()` takes string ids, index-space vectors (float32/float16 for float dtypes, int8 codes
    for i8, packed uint8 bits for b1), the stored fields (a pyarrow Table/RecordBatch with `id`
    and the stored fields, one row per vector) and, when the spec keeps them, full vectors.
    Duplicate ids (against the base and within the stream) follow `on_duplicate`: error, skip
    (keep the first), replace (the row keeps its number, its vector and fields are replaced).
    """

    def __init__(self, path: str, spec: IndexSpec | None = None, base: "OpenIndex | None" = None,
                 on_duplicate: str = "error", threads: int = 0, fields: Sequence[str] = ()):
        import numpy as np

        if on_duplicate not in ON_DUPLICATE:
            raise UsageError(f"unknown --on-duplicate {on_duplicate!r}; use "
                             f"{'|'.join(ON_DUPLICATE)}")
        # a symlink to an index: its target folder is replaced and the link kept (renaming
        # the link itself would leave the target and the swapped-out link behind)
        self.path = os.path.realpath(path)
        if base is not None and base.manifest.get("layout") == "linked":
            raise UsageError("cannot append to a linked multi-shard index",
                             hint="index the new records on their own and link them in with "
                                  "`vecpipe merge --index --link`")
        self.spec = spec or _spec_of(base)
        self.spec.check()
        self.fields = list(base.fields) if base else [ID, *[f for f in fields if f != ID]]
        self.on_duplicate = on_duplicate
        self.threads = threads
        self.skipped = self.replaced = 0
        _check_target(self.path, base)
        _clean_leftovers(self.path)
        self.tmp = _sibling(self.path, "building")
        try:
            self._vectors = self._start_flat(base) if self.spec.flat else \
                self._start_usearch(base)
            self._full = self._start_full(base)
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

    # -- set-up

    def _start_usearch(self, base):
        from usearch.index import Index

        if base is not None:
            index = Index.restore(os.path.join(base.path, VECTORS), view=False)
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

    def _start_flat(self, base):
        writer = _NpyWriter(os.path.join(self.tmp, FLAT_VECTORS),
                            _index_width(self.spec.dim, self.spec.dtype),
                            _index_numpy_dtype(self.spec.dtype))
        if base is not None:
            _copy_rows(base.flat_vectors(), writer)
        return writer

    def _start_full(self, base):
        if not self.spec.full:
            return None
        writer = _NpyWriter(os.path.join(self.tmp, FULL), self.spec.full["dim"],
                            _numpy_dtype(self.spec.full["dtype"]))
        if base is not None:
            _copy_rows(base.full_vectors(), writer)
        return writer

    def _take_base(self, base: "OpenIndex") -> None:
        import numpy as np

        table = base.rows()
        self._tables.append(table)
        self._arrived = self.count = table.num_rows
        self._position = np.arange(table.num_rows, dtype=np.int64)
        self._row_of = {key: row for row, key in enumerate(table.column(ID).to_pylist())}

    # -- adding

    def add(self, ids: Sequence[str], vectors, stored, full=None, source: str | None = None,
            first_record: int = 1) -> None:
        """Add one batch; `first_record` (1-based) locates errors in `source`."""

        vectors = self._checked_vectors(vectors, source, first_record)
        if (full is None) != (self._full is None):
            raise ValueError("full vectors must be given exactly when the spec keeps them")
        if full is not None and (full.ndim != 2 or full.shape[1] != self.spec.full["dim"]):
            raise DataError(f"full vectors have dimension {full.shape[-1]}, the index keeps "
                            f"{self.spec.full['dim']}", source=source, record=first_record)
        new_rows, new_pos, replace_rows, replace_pos = self._assign_rows(ids, source, first_record)
        if self.spec.flat:  # new rows are numbered in arrival order, so they append
            self._vectors.append(vectors[new_pos])
            for row, pos in zip(replace_rows, replace_pos):
                self._vectors.overwrite(row, vectors[pos])
        else:
            with _interruptible():
                self._add_to_graph(new_rows, new_pos, replace_rows, replace_pos, vectors)
        if self._full is not None:
            self._full.append(full[new_pos])
            for row, pos in zip(replace_rows, replace_pos):
                self._full.overwrite(row, full[pos])
        self._add_stored(stored, new_rows + replace_rows, new_pos + replace_pos)

    def _add_to_graph(self, new_rows, new_pos, replace_rows, replace_pos, vectors) -> None:
        import numpy as np

        keys = np.asarray(new_rows, dtype=np.uint64)
        if len(keys):
            self._vectors.add(keys, vectors[new_pos], threads=self.threads)
        for row, pos in zip(replace_rows, replace_pos):
            self._vectors.remove(row)
            self._vectors.add(row, vectors[pos])

    def _checked_vectors(self, vectors, source, first_record):
        import numpy as np

        width = _index_width(self.spec.dim, self.spec.dtype)
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise DataError(f"vectors have dimension {vectors.shape[-1]}, the index has "
                            f"{width}", source=source, record=first_record)
        if vectors.dtype.kind == "f":
            finite = np.isfinite(vectors).all(axis=1)
            if not finite.all():
                raise DataError("vector holds NaN or infinity", source=source,
                                record=first_record + int(np.argmin(finite)))
        return vectors

    def _assign_rows(self, ids, source, first_record):
        """Row numbers for a batch: (new rows, their batch positions, replaced rows, positions).
        A later duplicate within the batch under `replace` updates the earlier assignment."""
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
                                hint="--on-duplicate skip keeps the first, replace the last")
            elif self.on_duplicate == "skip":
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

    # -- finishing

    def commit(self) -> dict:
        """Write everything into the temporary folder, then swap it into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.count == 0:
            raise DataError("no records to index")
        try:
            if self.spec.flat:
                self._vectors.close()
            else:
                self._vectors.save(os.path.join(self.tmp, VECTORS))
            rows = pa.concat_tables(self._tables).take(pa.array(self._position[:self.count]))
            pq.write_table(rows, os.path.join(self.tmp, ROWS), compression="zstd")
        except OSError as err:
            raise write_error(err, self.path) from None
        except RuntimeError as err:  # usearch says only "Failed to serialize into stream"
            raise _save_error(err, self.tmp, self.path) from None
        files = [FLAT_VECTORS if self.spec.flat else VECTORS, ROWS]
        if self._full is not None:
            self._full.close()
            files.append(FULL)
        manifest = self._manifest(files)
        with open(os.path.join(self.tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        self._swap_into_place()
        return manifest

    def _manifest(self, files: list[str]) -> dict:
        import datetime

        from vecpipe.formats import __version__

        spec = self.spec
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "vecpipe_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "count": self.count, "dim": spec.dim, "metric": spec.metric, "dtype": spec.dtype,
            "score_metric": spec.score_metric, "flat": spec.flat,
            "hnsw": None if spec.flat else {
                "connectivity": spec.connectivity, "expansion_add": spec.expansion_add,
                "expansion_search": spec.expansion_search},
            "metadata": spec.metadata, "query_prompt": spec.query_prompt,
            "fields": self.fields, "full": spec.full,
            "files": file_facts(self.tmp, files),
        }

    def _swap_into_place(self) -> None:
        os.chmod(self.tmp, 0o755 & ~_umask())
        if not os.path.exists(self.path):
            os.rename(self.tmp, self.path)
            return
        old = _sibling(self.path, "old")
        os.rmdir(old)
        os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for writer in (getattr(self, "_full", None), getattr(self, "_vectors", None)):
            if isinstance(writer, _NpyWriter):
                writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "IndexBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


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
def _interruptible():
    """Around usearch's add and search, which run Python's signal handlers themselves and,
    when one raises (Ctrl-C's KeyboardInterrupt, SIGTERM's Terminated), stop with an exception
    of their own that loses the handler's (RuntimeError from add, MemoryError from an exact
    search): the handler's exception is raised instead."""
    with _SignalWatch() as watch:
        try:
            yield
        except (RuntimeError, MemoryError):
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(path: str, base) -> None:
    if base is not None or not os.path.exists(path):
        if not os.path.isdir(os.path.dirname(path)):
            raise UsageError(f"output folder does not exist: {os.path.dirname(path)}")
        return
    if not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a folder")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
        raise UsageError(f"{path} exists and is not a vecpipe index; refusing to replace it")


def _spec_of(base: "OpenIndex") -> IndexSpec:
    m = base.manifest
    return IndexSpec(dim=m["dim"], metric=m["metric"], dtype=m["dtype"],
                     score_metric=m.get("score_metric"), **hnsw_options(m),
                     metadata=dict(m["metadata"]), query_prompt=m.get("query_prompt"),
                     full=m.get("full"))


def hnsw_options(manifest: dict) -> dict:
    """The IndexSpec keywords that rebuild an index's layout: its HNSW parameters, or flat."""
    if manifest.get("flat"):
        return {"flat": True}
    hnsw = manifest["hnsw"]
    return {"connectivity": hnsw["connectivity"], "expansion_add": hnsw["expansion_add"],
            "expansion_search": hnsw["expansion_search"]}


def _copy_rows(matrix, writer: _NpyWriter, block: int = 65536) -> None:
    for start in range(0, len(matrix), block):
        writer.append(matrix[start:start + block])


def _numpy_dtype(name: str):
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "f32": np.float32,
            "f16": np.float16}[name]


# ---- opening ----------------------------------------------------------------------------------

def open_index(path: str, verify: bool = False) -> "OpenIndex":
    """Open an index folder: manifest and file sizes checked (checksums too with `verify`).
    A linked multi-shard folder (`merge --index --link`) opens as a LinkedIndex."""
    manifest = read_manifest(path)
    if manifest.get("layout") == "linked":
        from vecpipe.core.linked_index import open_linked

        return open_linked(path, manifest, verify)
    checked = check_files(path, manifest, verify)
    _check_arrays(path, manifest)
    index = OpenIndex(path, manifest)
    index.files_checked = checked
    return index


def verify_index(path: str) -> int:
    """Check every file of an index (a linked one's shards too) against the manifest's sizes
    and checksums; returns the number of files checked."""
    return open_index(path, verify=True).files_checked


def _check_arrays(path: str, manifest: dict) -> None:
    """The .npy files hold what the manifest says (count, width, dtype), read from their
    headers: a count that disagrees would index past the vectors."""
    count, dim, dtype = manifest["count"], manifest["dim"], manifest["dtype"]
    if manifest.get("flat"):
        _check_matrix(path, FLAT_VECTORS, count, _index_width(dim, dtype),
                      _index_numpy_dtype(dtype))
    full = manifest.get("full")
    if full:
        _check_matrix(path, FULL, count, full["dim"], _numpy_dtype(full["dtype"]))


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
        self.flat: bool = bool(manifest.get("flat"))
        self._usearch = self._rows = self._full = self._flat = None
        self.codec = None
        if self.metadata.get("codec"):
            from vecpipe.core.codec import codec_from_meta

            self.codec = codec_from_meta(self.metadata, source=path)

    @property
    def usearch(self):
        if self.flat:
            raise UsageError("a flat index has no HNSW graph; it is searched exactly")
        if self._usearch is None:
            from usearch.index import Index

            index = Index.restore(os.path.join(self.path, VECTORS), view=True)
            if index is None or index.size != self.count:
                raise DataError("vectors.usearch does not hold the manifest's "
                                f"{self.count} vectors", source=self.path)
            index.expansion_search = self.manifest["hnsw"]["expansion_search"]
            self._usearch = index
        return self._usearch

    def rows(self, columns: Sequence[str] | None = None) -> "pa.Table":
        """The stored fields (all, or `columns`), row i = key i, memory-mapped."""

        if self._rows is None:
            self._rows = _read_rows(self.path, self.count, self.fields)
        if columns is None:
            return self._rows
        missing = [c for c in columns if c not in self.fields]
        if missing:
            raise DataError(f"the index does not store field {missing[0]!r} (it stores: "
                            f"{', '.join(self.fields)})", source=self.path,
                            hint=f"rebuild it with --store {missing[0]}")
        return self._rows.select(list(columns))

    def ids(self) -> "pa.ChunkedArray":
        return self.rows().column(ID)

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

    def stored_vectors(self, rows) -> "np.ndarray":
        """Index-space vectors of `rows` as usearch holds them (codes for i8/b1)."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.uint64)
        width = _index_width(self.dim, self.dtype)
        if len(rows) == 0:
            return np.zeros((0, width), dtype=_index_numpy_dtype(self.dtype))
        if self.flat:
            return np.asarray(self.flat_vectors()[rows.astype(np.int64)])
        return np.vstack(self.usearch.get(rows)).reshape(len(rows), width)

    def encode(self, queries) -> "np.ndarray":
        """Float queries -> the index space (the codec applied, if any)."""
        import numpy as np

        queries = np.asarray(queries, dtype=np.float32)
        codec = self.codec
        if queries.ndim != 2 or queries.shape[1] not in (codec.query_dims if codec else
                                                         (self.query_dim,)):
            raise DataError(f"query vectors have {queries.shape[-1]} dimensions, the index "
                            f"expects {codec.expected_dims() if codec else self.query_dim}",
                            source=self.path)
        if self.codec is not None:
            if self.score_metric == "cos":  # scale-free: unit queries stay inside the ranges
                queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True),
                                               1e-30)
            return to_index_codes(self.codec, self.codec.encode(queries))
        if self.dtype in ("i8", "b1"):
            raise DataError(f"the index holds {self.dtype} codes but records no codec, so float "
                            "queries cannot be encoded", source=self.path,
                            hint="query with vectors encoded the same way")
        return queries

    def searcher(self, k: int, **options) -> "Searcher":
        return Searcher(self, k, **options)


def _read_rows(path: str, count: int, fields: list) -> "pa.Table":
    """rows.parquet, memory-mapped, checked against the manifest's count and fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(os.path.join(path, ROWS), memory_map=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{ROWS} is not readable ({err})", source=path) from None
    if table.num_rows != count or table.column_names != fields:
        raise DataError(f"{ROWS} holds {table.num_rows} rows of "
                        f"{', '.join(table.column_names)}; the manifest says {count} of "
                        f"{', '.join(fields)}: the index is damaged", source=path)
    return table


def to_index_codes(codec, codes):
    """Codec codes -> what usearch stores: uint8 levels shift to int8 (same levels, same
    distances), bfloat16 bit patterns widen to float32; other codes pass through."""
    import numpy as np

    if codec is None:
        return codes
    if codec.to == "uint8":
        return (codes.astype(np.int16) - 128).astype(np.int8)
    if codec.to == "bfloat16":
        from vecpipe.core.codec import bfloat16_bits_to_float32

        return bfloat16_bits_to_float32(codes)
    return codes


def from_index_codes(codec, stored):
    """Inverse of `to_index_codes`: usearch vectors -> codec codes."""
    import numpy as np

    if codec.to == "uint8":
        return (stored.astype(np.int16) + 128).astype(np.uint8)
    if codec.to == "bfloat16":
        from vecpipe.core.codec import float32_to_bfloat16_bits

        return float32_to_bfloat16_bits(stored)
    return np.ascontiguousarray(stored, dtype=codec.code_dtype)


def _index_width(dim: int, dtype: str) -> int:
    """Columns of an index-space vector: bytes of packed bits for b1, else the dimension."""
    return dim // 8 if dtype == "b1" else dim


def _index_numpy_dtype(dtype: str):
    import numpy as np

    return {"f32": np.float32, "f16": np.float16, "bf16": np.float32, "i8": np.int8,
            "b1": np.uint8}[dtype]


# ---- searching --------------------------------------------------------------------------------

class Searcher:
    """Search an OpenIndex with fixed options, for one batch of queries after another.

    - `k` hits per query (fewer only when fewer rows exist, pass the filter, or reach
      `min_score`).
    - `exact`: brute force in the index space instead of HNSW. `ef`: HNSW expansion_search.
    - `rescore=MULT`: fetch k*MULT candidates, rescore them with the kept full vectors (or, with
      no full vectors, the float query against the decoded codes), keep k. i8 indexes always
      score the float query against the decoded codes, by default on k*4 candidates.
    - `mask`: bool per row (True = allowed). Few allowed rows: exact search over them; many:
      oversampled ANN, post-filtered, and any query left short is redone exactly, so a filter
      that matches >= k rows always returns k hits.
    """

    def __init__(self, index: OpenIndex, k: int, exact: bool = False, ef: int | None = None,
                 rescore: int | None = None, min_score: float | None = None, mask=None,
                 threads: int = 0):
        import numpy as np

        if k < 1:
            raise UsageError("-k must be at least 1")
        self.index, self.k, self.exact, self.min_score, self.threads = \
            index, k, exact, min_score, threads
        self.rescore_source = _rescore_source(index, rescore)
        self.rescore_requested = rescore is not None
        self.want = k * (rescore or (_SCALAR_CODES_RESCORE if self.rescore_source == "codes"
                                     else 1))
        if ef is not None:
            if index.flat:
                raise UsageError("--ef tunes HNSW search; this index is flat (always exact)")
            index.usearch.expansion_search = ef
        self.allowed = None if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
        if self.allowed is not None and len(self.allowed) == index.count:
            self.allowed = None  # the filter keeps everything
        self._allowed_vectors = None
        self.plan = self._plan()

    def _plan(self) -> str:
        """none | exact | ann | exact-subset | ann-filtered (see the class docstring)."""
        n = self.index.count
        exact = self.exact or self.index.flat
        if self.allowed is None:
            return "exact" if exact or self.want >= n else "ann"
        m = len(self.allowed)
        if m == 0:
            return "none"
        if exact or m <= self._fetch() * _HNSW_COST or self._fetch() >= n // 2:
            return "exact-subset"
        return "ann-filtered"

    def _fetch(self) -> int:
        """ANN results to fetch so that ~`want` of them pass the filter."""
        n, m = self.index.count, len(self.allowed)
        return min(n, int(math.ceil(self.want * n / m * _OVERSAMPLE)) + self.want)

    def search(self, queries, encoded: bool = False) -> Hits:
        """`queries`: float32 (queries x query_dim), or index-space codes with `encoded`."""
        import numpy as np

        queries = np.asarray(queries)
        coded = queries if encoded else self.index.encode(queries)
        if encoded and self.rescore_requested:
            raise UsageError("--rescore needs float query vectors, not codes")
        candidates = self._candidates(coded)
        if self.rescore_source is not None and not encoded:
            candidates = self._rescored(queries, candidates.rows)
        return sorted_hits(candidates.rows, candidates.scores, self.k) \
            .thresholded(self.min_score)

    # -- candidates in the index space

    def _candidates(self, coded) -> Hits:
        import numpy as np

        n = self.index.count
        if self.plan == "none" or len(coded) == 0:
            return Hits(np.full((len(coded), 0), -1, np.int64),
                        np.zeros((len(coded), 0), np.float32))
        if self.plan == "exact":
            return self._usearch(coded, min(self.want, n), exact=True)
        if self.plan == "exact-subset":
            return self._exact_subset(coded)
        if self.plan == "ann":
            return self._complete(coded, self._usearch(coded, self.want, exact=False), n,
                                  lambda q: self._usearch(q, self.want, exact=True))
        return self._complete(coded, self._ann_filtered(coded), len(self.allowed),
                              self._exact_subset)

    def _complete(self, coded, hits: Hits, available: int, exact) -> Hits:
        """Redo exactly the queries that came back with fewer candidates than exist."""
        import numpy as np

        short = np.flatnonzero(hits.counts < min(self.want, available))
        if len(short) == 0:
            return hits
        redo = exact(coded[short])
        width = max(hits.rows.shape[1], redo.rows.shape[1])
        rows, scores = _padded(hits, width)
        rows[short], scores[short] = _padded(redo, width)
        return Hits(rows, scores)

    def _usearch(self, coded, count: int, exact: bool) -> Hits:
        if self.index.flat:
            found = self._scan(self.index.flat_vectors(), coded, count)
        else:
            with _interruptible():
                found = self.index.usearch.search(coded, count, exact=exact,
                                                  threads=self.threads)
        return self._to_hits(found, count)

    def _to_hits(self, found, count: int, row_of_key=None) -> Hits:
        import numpy as np

        keys, distances, counts = _match_arrays(found, count)
        valid = np.arange(count)[None, :] < counts[:, None]
        keys = np.where(valid, keys, 0)
        rows = np.where(valid, keys if row_of_key is None else row_of_key[keys], -1)
        scores = distance_to_score(self.index.metric, distances, self.index.dim)
        return Hits(rows, np.where(valid, scores, -np.inf).astype(np.float32))

    def _exact_subset(self, coded) -> Hits:
        if self._allowed_vectors is None:
            self._allowed_vectors = self.index.stored_vectors(self.allowed)
        count = min(self.want, len(self.allowed))
        found = self._scan(self._allowed_vectors, coded, count)
        return self._to_hits(found, count, row_of_key=self.allowed)

    def _scan(self, vectors, coded, count: int):
        """usearch's exact brute force over index-space vectors (keys = their positions)."""
        from usearch.index import search

        with _interruptible():
            return search(vectors, coded, count, self.index.metric, exact=True,
                          threads=self.threads)

    def _ann_filtered(self, coded) -> Hits:
        import numpy as np

        hits = self._usearch(coded, self._fetch(), exact=False)
        allowed = np.zeros(self.index.count + 1, dtype=bool)
        allowed[self.allowed] = True
        ok = allowed[hits.rows]  # row -1 reads the sentinel False at the end
        order = np.argsort(~ok, axis=1, kind="stable")[:, :self.want]
        rows = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(hits.rows, order, 1),
                        -1)
        return Hits(rows, np.take_along_axis(hits.scores, order, 1))

    # -- rescoring

    def _rescored(self, queries, rows) -> Hits:
        import numpy as np

        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        if self.rescore_source == "full" and queries.shape[1] != self.index.full_spec["dim"]:
            raise DataError(f"--rescore with {FULL} needs {self.index.full_spec['dim']}-"
                            f"dimensional queries, not {queries.shape[1]} (already truncated)",
                            source=self.index.path, hint="give the untruncated query vectors")
        if self.rescore_source == "codes":
            queries = self.index.codec.project(queries)
        for start in range(0, len(rows), 256):
            block = rows[start:start + 256]
            vectors = self._rescore_vectors(np.where(block >= 0, block, 0))
            scores[start:start + 256] = paired_similarity(
                self.index.score_metric, queries[start:start + 256], vectors)
        return Hits(rows, np.where(rows >= 0, scores, -np.inf))

    def _rescore_vectors(self, rows):
        """Float vectors to rescore with, for a (queries x candidates) block of rows."""
        import numpy as np

        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        if self.rescore_source == "full":
            vectors = np.asarray(self.index.full_vectors()[unique], dtype=np.float32)
        else:
            codec = self.index.codec
            vectors = codec.decode(from_index_codes(codec, self.index.stored_vectors(unique)))
        return vectors[inverse].reshape(*rows.shape, -1)


def _match_arrays(found, count: int):
    """usearch results as (keys, distances) of queries x count and found counts; usearch answers
    a single query with a trimmed `Matches` instead of `BatchMatches`."""
    import numpy as np

    if hasattr(found, "counts"):
        return (np.asarray(found.keys).reshape(-1, count).astype(np.int64),
                np.asarray(found.distances, dtype=np.float32).reshape(-1, count),
                np.asarray(found.counts).reshape(-1))
    n = len(found.keys)
    keys = np.zeros((1, count), dtype=np.int64)
    distances = np.zeros((1, count), dtype=np.float32)
    keys[0, :n], distances[0, :n] = found.keys, found.distances
    return keys, distances, np.array([n])


def _padded(hits: Hits, width: int):
    import numpy as np

    rows = np.full((len(hits.rows), width), -1, dtype=np.int64)
    scores = np.full((len(hits.rows), width), -np.inf, dtype=np.float32)
    rows[:, :hits.rows.shape[1]] = hits.rows
    scores[:, :hits.rows.shape[1]] = hits.scores
    return rows, scores


def _rescore_source(index: OpenIndex, rescore: int | None) -> str | None:
    """'full' (kept vectors), 'codes' (float query vs decoded codes) or None."""
    from vecpipe.core.codec import SCALAR_TARGETS

    if rescore is not None and rescore < 1:
        raise UsageError("--rescore must be at least 1")
    scalar_codes = index.codec is not None and index.codec.to in SCALAR_TARGETS
    if rescore is None:
        return "codes" if scalar_codes else None
    if index.full_spec is not None:
        if index.full_spec["dim"] != index.query_dim:  # `index` refuses to build these now
            raise DataError(f"{FULL} holds {index.full_spec['dim']}-dimensional vectors, the "
                            f"queries have {index.query_dim}: it kept the reduced vectors of a "
                            "compressed stream, which cannot rescore", source=index.path,
                            hint="search without --rescore, or rebuild the index from the "
                                 "uncompressed vectors")
        return "full"
    if index.codec is not None:
        return "codes"
    raise UsageError("--rescore needs full vectors (index --keep-vectors) or a quantized "
                     "(i8/b1) index", hint="rebuild the index with --keep-vectors")
