"""The index folder on disk: its file names, its manifest (read, checked, written), file
checksums, code conversion for usearch, and the atomic replacement of a folder.

    idx/manifest.json    format version, layout, count, dim, metric, dtype, HNSW parameters,
                         the stream metadata of the indexed vectors (model, prompt, codec...),
                         stored fields, file sizes and sha256 checksums
    idx/vectors.usearch  layout hnsw: usearch HNSW; keys are row numbers (uint64)
    idx/vectors.faiss    layout hnsw with "library": "faiss" in `hnsw`: faiss HNSW instead
                         (core/faiss_graph.py); ids are row numbers
    idx/vectors.npy      layout flat: the index-space vectors alone, row i = key i,
                         memory-mapped and searched exactly (no graph)
    idx/rows.parquet     row number (= position) -> `id` and the stored fields
    idx/full.npy         optional full-precision vectors for rescoring (memory-mapped)
    idx/planes.npy       multi-bit binary codes (Tencent's residual planes): planes 2..K of
                         each row, packed; the graph (or vectors.npy) holds plane 1
    idx/shards/00000/    layout linked: complete index folders searched as one, with optional
    idx/shards/00000.hidden.npy   sorted rows that another shard's copy of their id shadows

Layout lexical (BM25, no vectors) has its own files, listed in core/lexical.py.

Quantized indexes: i8 holds the compress codec's int8 codes (uint8 codes shifted by -128), b1
its packed sign bits (with `"planes": K` in the manifest, the first of K residual planes, the
rest in planes.npy), pq a product quantizer's codes (layout flat only: they are scanned, not put
in a graph); the codec travels in `metadata["codec"]`. `to_index_codes` / `from_index_codes`
convert between codec codes and what the index stores.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import stat
import tempfile
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.parts import file_sha256
from vecpipe.formats.writers import current_umask

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

FORMAT = "vecpipe-index"
FORMAT_VERSION = 1
MANIFEST, VECTORS, ROWS, FULL = "manifest.json", "vectors.usearch", "rows.parquet", "full.npy"
FLAT_VECTORS, PLANES = "vectors.npy", "planes.npy"
FAISS_VECTORS = "vectors.faiss"
GRAPH_LIBRARIES = ("usearch", "faiss")  # the library of an hnsw layout's graph (`hnsw.library`)
TOKENS, TOKEN_OFFSETS = "tokens.npy", "token_offsets.npy"  # core.multivector's token store
SHARDS = "shards"
LAYOUTS = ("hnsw", "flat", "linked", "lexical")
# layout lexical (core/lexical.py): bm25s's score matrix, vocabulary and parameters, the kept
# tokens, the rows; BM25L/BM25+ add the tf-0 scores
LEXICAL_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
                 "vocab.index.json", "params.index.json", "tokens.npy", "token_offsets.npy",
                 ROWS)
LEXICAL_NONOCCURRENCE = "nonoccurrence_array.index.npy"
METRICS = ("cos", "ip", "l2sq", "hamming")
FLOAT_METRICS = ("cos", "ip", "l2sq")
DTYPES = ("f32", "f16", "bf16", "i8", "b1", "pq")
FLOAT_DTYPES = ("f32", "f16", "bf16")
ID = "id"



class IndexReader(Protocol):
    """An opened index, one folder (`OpenIndex`) or linked shards (`LinkedIndex`): rows are
    numbered 0..count-1; vectors are in the index space (codes for i8/b1) unless full."""

    path: str
    manifest: dict
    layout: str
    count: int
    dim: int
    metric: str
    dtype: str
    score_metric: str
    metadata: dict
    fields: list
    full_spec: dict | None
    query_prompt: str | None
    codec: object
    query_dim: int
    planes: int
    files_checked: int

    def rows(self, columns: Sequence[str] | None = None) -> "pa.Table": ...
    def ids(self) -> "pa.ChunkedArray": ...
    def visible_mask(self) -> "np.ndarray | None":
        """bool per row, False where another shard's copy of the id shadows it; None: all."""
    def stored_vectors(self, rows) -> "np.ndarray":
        """Index-space vectors of `rows`: for multi-bit b1 every plane, side by side."""
    def full_vectors(self): ...
    def encode(self, queries) -> "np.ndarray": ...
    def storage_options(self) -> dict:
        """IndexSpec keywords that store vectors as this index does (HNSW parameters, or
        flat)."""
    def searcher(self, k: int, **options): ...


_SHARD_FILE = re.compile(r"shards/[0-9]{5}\.hidden\.npy")


def shard_folder(number: int) -> str:
    return os.path.join(SHARDS, f"{number:05d}")


def layout_of(manifest: dict) -> str:
    """hnsw | flat | linked | lexical; manifests written before the `layout` key said `flat:
    true`."""
    return manifest.get("layout") or ("flat" if manifest.get("flat") else "hnsw")


def hnsw_options(manifest: dict) -> dict:
    """The IndexSpec keywords that rebuild an index's layout: its HNSW parameters, or flat."""
    if layout_of(manifest) == "flat":
        return {"flat": True}
    hnsw = manifest["hnsw"]
    return {"connectivity": hnsw["connectivity"], "expansion_add": hnsw["expansion_add"],
            "expansion_search": hnsw["expansion_search"], "library": graph_library(manifest)}


def graph_library(manifest: dict) -> str:
    """usearch | faiss: the library of an hnsw layout's graph (manifests before faiss: none)."""
    return (manifest.get("hnsw") or {}).get("library", "usearch")


def graph_file(manifest: dict) -> str:
    """The file of an index's index-space vectors (`vectors_file`)."""
    return vectors_file(layout_of(manifest), graph_library(manifest))


def vectors_file(layout: str, library: str = "usearch") -> str:
    """The graph's file, or vectors.npy when the layout is flat."""
    if layout == "flat":
        return FLAT_VECTORS
    return FAISS_VECTORS if library == "faiss" else VECTORS


def new_manifest(layout: str, count: int, dim: int, metric: str, dtype: str,
                 score_metric: str, metadata: dict, query_prompt: str | None, fields: list,
                 full: dict | None, **layout_keys) -> dict:
    """The manifest keys every layout has, then the layout's own (`layout_keys`)."""
    from vecpipe.formats import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
        "vecpipe_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": count, "dim": dim, "metric": metric, "dtype": dtype,
        "score_metric": score_metric, "metadata": metadata, "query_prompt": query_prompt,
        "fields": fields, "full": full, **layout_keys}


def write_manifest(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


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


def check_manifest(manifest: dict, path: str) -> None:
    """Refuse a manifest whose fields have the wrong types or whose file names are not the
    known plain names (`shards/NNNNN[.hidden.npy]` in a linked index): a name is never
    followed outside the folder, and the error says nothing about the file it names. A
    manifest is input, and may have been crafted."""
    _field(manifest, path, "count", _is_count, "a non-negative integer")
    if manifest.get("layout") == "lexical":
        _check_lexical_manifest(manifest, path)
        return
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
    if "layout" in manifest and manifest["layout"] not in LAYOUTS:
        raise DataError("manifest.json: unknown 'layout'", source=path)
    _field(manifest, path, "flat", lambda v: isinstance(v, bool), "true or false",
           optional=True)
    if "layout" in manifest and "flat" in manifest and \
            manifest["flat"] != (manifest["layout"] == "flat"):
        raise DataError("manifest.json: 'flat' and 'layout' disagree", source=path)
    layout = layout_of(manifest)
    if layout == "linked":
        _check_linked_manifest(manifest, path)
        return
    if layout == "hnsw":
        _field(manifest, path, "hnsw", lambda v: isinstance(v, dict) and all(
            _is_int(v.get(key)) and v[key] >= 1
            for key in ("connectivity", "expansion_add", "expansion_search")) and
            v.get("library", "usearch") in GRAPH_LIBRARIES,
            "an object of positive connectivity/expansion_add/expansion_search (and a "
            f"library, {'|'.join(GRAPH_LIBRARIES)})")
    _field(manifest, path, "planes", lambda v: _is_int(v) and 2 <= v <= 8 and
           manifest["dtype"] == "b1", "2 to 8 (bit planes of a b1 index)", optional=True)
    if manifest["dtype"] == "pq" and layout != "flat":
        raise DataError("manifest.json: pq codes are kept in a flat index only", source=path)
    expected = {graph_file(manifest), ROWS}
    if manifest.get("full"):
        expected.add(FULL)
    if manifest.get("planes"):
        expected.add(PLANES)
    _field(manifest, path, "tokens", lambda v: v is None or (isinstance(v, dict) and _is_int(
        v.get("dim")) and v["dim"] >= 1), 'null or {"dim": N} (kept token vectors)',
        optional=True)
    if manifest.get("tokens"):
        expected |= {TOKENS, TOKEN_OFFSETS}
    _check_file_names(manifest, path, lambda name: name in expected)
    for name in sorted(expected - set(manifest["files"])):
        raise DataError(f"manifest.json lists no {name}: the index is damaged", source=path)


def _check_lexical_manifest(manifest: dict, path: str) -> None:
    """A lexical index has no vectors (no dim, metric or dtype); its settings are checked
    when core.lexical opens it."""
    _field(manifest, path, "fields", lambda v: isinstance(v, list) and ID in v and
           all(isinstance(name, str) for name in v), "a list of field names with 'id'")
    _field(manifest, path, "lexical", lambda v: isinstance(v, dict) and
           isinstance(v.get("method"), str), "an object of BM25 settings")
    expected = set(LEXICAL_FILES)
    if manifest["lexical"]["method"] in ("bm25l", "bm25+"):
        expected.add(LEXICAL_NONOCCURRENCE)
    _check_file_names(manifest, path, lambda name: name in expected)
    for name in sorted(expected - set(manifest["files"])):
        raise DataError(f"manifest.json lists no {name}: the index is damaged", source=path)


def _check_linked_manifest(manifest: dict, path: str) -> None:
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


def file_facts(folder: str, names: Iterable[str]) -> dict:
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)),
                   "sha256": file_sha256(os.path.join(folder, name))} for name in names}


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
        if verify and file_sha256(file_path) != facts["sha256"]:
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


def check_arrays(path: str, manifest: dict) -> None:
    """The .npy files hold what the manifest says (count, width, dtype), read from their
    headers: a count that disagrees would index past the vectors."""
    count, dim, dtype = manifest["count"], manifest["dim"], manifest["dtype"]
    if layout_of(manifest) == "flat":
        _check_matrix(path, FLAT_VECTORS, count, index_width(dim, dtype),
                      index_numpy_dtype(dtype))
    full = manifest.get("full")
    if full:
        _check_matrix(path, FULL, count, full["dim"], full_numpy_dtype(full["dtype"]))
    if manifest.get("planes"):
        _check_matrix(path, PLANES, count, (manifest["planes"] - 1) * index_width(dim, dtype),
                      index_numpy_dtype(dtype))


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


def index_width(dim: int, dtype: str, planes: int = 1) -> int:
    """Columns of an index-space vector: bytes of packed bits for b1 (every plane), else the
    dimension (for pq: the sub-vector codes)."""
    return dim // 8 * planes if dtype == "b1" else dim


def index_numpy_dtype(dtype: str):
    import numpy as np

    return {"f32": np.float32, "f16": np.float16, "bf16": np.float32, "i8": np.int8,
            "b1": np.uint8, "pq": np.uint8}[dtype]


def full_numpy_dtype(name: str):
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "f32": np.float32,
            "f16": np.float16}[name]


def real_folder(path: str) -> str:
    """The folder an output path names: a symlink's target is replaced and the link kept, so
    the temporary folder is made beside the target (the rename needs one file system)."""
    return os.path.realpath(os.path.abspath(path))


def check_target(path: str, marker: str = MANIFEST, what: str = "a vecpipe index") -> None:
    """May `path` be replaced? Only when it is missing, empty, or an earlier output of the
    same kind (it holds `marker`), never other data; its parent folder must exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"output folder does not exist: {parent}")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a folder")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise UsageError(f"{path} is a folder with other files, not {what}; refusing to "
                         "replace it", hint="choose a new or empty folder")


def temporary_sibling(path: str, kind: str = "building") -> str:
    """A new private folder beside `path`, named for this process (see `clean_leftovers`)."""
    parent, name = os.path.split(os.path.abspath(path))
    return tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent)


def clean_leftovers(path: str) -> None:
    """Remove temporary folders of builds whose process died; if a crash happened between the
    two renames of a swap, put the old folder back."""
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_into_place(tmp: str, path: str) -> None:
    """Move the finished folder `tmp` to `path` (a real path: renaming a symlink would move
    the link itself); an existing folder is swapped out, then removed."""
    os.chmod(tmp, 0o755 & ~current_umask())  # mkdtemp made it private
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = temporary_sibling(path, "old")
    os.rmdir(old)
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_rows(path: str, count: int, fields: list) -> "pa.Table":
    """rows.parquet, memory-mapped, checked against the manifest's count and fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # ParquetFile, not read_table: that goes through pyarrow.dataset, which imports pandas
        table = pq.ParquetFile(os.path.join(path, ROWS), memory_map=True).read()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{ROWS} is not readable ({err})", source=path) from None
    if table.num_rows != count or table.column_names != fields:
        raise DataError(f"{ROWS} holds {table.num_rows} rows of "
                        f"{', '.join(table.column_names)}; the manifest says {count} of "
                        f"{', '.join(fields)}: the index is damaged", source=path)
    return table


def stored_columns(rows: "pa.Table", columns: Sequence[str] | None, path: str) -> "pa.Table":
    """`rows` (all stored fields), or those of `columns`, each of which must be stored."""
    if columns is None:
        return rows
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DataError(f"the index does not store field {missing[0]!r} (it stores: "
                        f"{', '.join(rows.column_names)})", source=path,
                        hint="rebuild the index storing that field")
    return rows.select(list(columns))


class CommitOnExit:
    """An index builder used as `with builder:` commits when the block ends cleanly; any
    failure, the commit's own included, aborts (the temporary folder is removed)."""

    def commit(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
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
