"""A linked index: several index folders searched as one (layout `linked`).

    idx/manifest.json        "layout": "linked", the shards, their row offsets, what they share
    idx/shards/00000/        a complete index folder (its files hard-linked from the source
                             index where the file system allows, else copied)
    idx/shards/00000.hidden.npy   optional: sorted row numbers of this shard that another
                             shard's copy of the same id shadows

The row space is the concatenation of the shards (global row = shard offset + shard row), so a
linked index is an `IndexReader` like `OpenIndex` (rows, ids, searcher...). Each query searches
every shard with the shard's own Searcher (filters, rescoring, exact fallbacks) and the
per-shard top k are merged by score: shards hold disjoint ids (hidden rows are masked), so the
merged top k equals a search over one index holding them all. usearch's own multi-index search
(`Indexes`) is not used: every shard keys its rows from 0, and it returns those keys without
saying which shard they came from.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Sequence

from vecpipe.core.index_format import (
    ID, MANIFEST, file_facts, new_manifest, real_folder, shard_folder, swap_into_place,
    temporary_sibling, write_manifest)
from vecpipe.core.index_search import LinkedSearcher
from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from vecpipe.core.index_format import IndexReader


class LinkedIndex:
    """Shards (opened index folders) read as one index."""

    files_checked = 0  # set by index_open
    layout = "linked"

    def __init__(self, path: str, manifest: dict, shards: Sequence):
        import numpy as np

        self.path, self.manifest, self.shards = path, manifest, list(shards)
        first = self.shards[0]
        self.count = sum(shard.count for shard in self.shards)  # rows, shadowed ones included
        self.offsets = np.cumsum([0] + [shard.count for shard in self.shards])
        self.dim, self.metric, self.dtype = first.dim, first.metric, first.dtype
        self.planes = first.planes
        self.score_metric = first.score_metric
        self.metadata: dict = manifest.get("metadata") or {}
        self.query_prompt = manifest.get("query_prompt")
        self.fields: list[str] = manifest["fields"]
        self.full_spec = manifest.get("full")
        self.codec = first.codec if manifest.get("shared_codec", True) else None
        self.query_dim = first.query_dim
        self._rows = None
        self._hidden = [self._read_hidden(entry) for entry in manifest["shards"]]

    def _read_hidden(self, entry: dict):
        import numpy as np

        if not entry.get("hidden"):
            return None
        try:
            rows = np.load(os.path.join(self.path, entry["hidden"]), allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{entry['hidden']} is not a readable .npy array of rows ({err})",
                            source=self.path) from None
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or (
                len(rows) and not 0 <= rows.min() <= rows.max() < entry["count"]):
            raise DataError(f"{entry['hidden']} must hold row numbers of its shard "
                            f"(0..{entry['count'] - 1}): the index is damaged",
                            source=self.path)
        return rows.astype(np.int64)

    def rows(self, columns: Sequence[str] | None = None) -> "pa.Table":
        """The stored fields of every shard, in row order (a field a shard lacks is null)."""
        import pyarrow as pa

        from vecpipe.core.merging import unify_schemas
        from vecpipe.formats.schema import align_batch

        if self._rows is None:
            tables = [shard.rows() for shard in self.shards]
            schema = unify_schemas([(shard.path, table.schema)
                                    for shard, table in zip(self.shards, tables)])
            self._rows = pa.Table.from_batches(
                [align_batch(batch, schema) for table in tables for batch in table.to_batches()],
                schema)
        if columns is None:
            return self._rows
        missing = [c for c in columns if c not in self.fields]
        if missing:
            raise DataError(f"the index does not store field {missing[0]!r} (it stores: "
                            f"{', '.join(self.fields)})", source=self.path)
        return self._rows.select(list(columns))

    def ids(self) -> "pa.ChunkedArray":
        return self.rows().column(ID)

    def storage_options(self) -> dict:
        """How the shards store their vectors: as the first one does."""
        return self.shards[0].storage_options()

    def visible_mask(self):
        """bool per row: False for rows shadowed by another shard's copy of their id."""
        import numpy as np

        mask = np.ones(self.count, dtype=bool)
        for offset, hidden in zip(self.offsets, self._hidden):
            if hidden is not None:
                mask[offset + hidden] = False
        return mask

    def _locate(self, rows):
        """(shard number, shard row) of global rows."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]

    def stored_vectors(self, rows) -> "np.ndarray":
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        shard_of, local = self._locate(rows)
        empty = self.shards[0].stored_vectors([])  # the width and dtype of the codes
        out = np.empty((len(rows), empty.shape[1]), dtype=empty.dtype)
        for number, shard in enumerate(self.shards):
            here = shard_of == number
            if here.any():
                out[here] = shard.stored_vectors(local[here])
        return out

    def query_vectors(self, rows) -> "np.ndarray":
        """Float vectors of `rows` in the query space, each shard's own (see
        `OpenIndex.query_vectors`): shards quantized with different codecs decode their own."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        shard_of, local = self._locate(rows)
        out = np.empty((len(rows), self.query_dim), dtype=np.float32)
        for number, shard in enumerate(self.shards):
            here = shard_of == number
            if here.any():
                out[here] = shard.query_vectors(local[here])
        return out

    def full_vectors(self):
        if self.full_spec is None:
            return None
        return _ConcatenatedRows([shard.full_vectors() for shard in self.shards])

    def encode(self, queries) -> "np.ndarray":
        if self.codec is None and self.dtype in ("i8", "b1", "pq"):
            raise DataError("the shards were quantized with different codecs; give float "
                            "queries", source=self.path)
        return self.shards[0].encode(queries)

    def searcher(self, k: int, **options) -> LinkedSearcher:
        return LinkedSearcher(self, k, **options)


class _ConcatenatedRows:
    """Row-indexable view of several memory-mapped arrays (`view[rows]`, `len(view)`)."""

    def __init__(self, arrays):
        import numpy as np

        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), arrays[0].shape[1])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        import numpy as np

        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((*rows.shape, self.shape[1]), dtype=self.dtype)
        for number, array in enumerate(self.arrays):
            here = part == number
            if here.any():
                out[here] = array[rows[here] - self.offsets[number]]
        return out


def check_linkable(indexes: Sequence["IndexReader"]) -> None:
    """Shards are plain index folders: a linked index is not linked again."""
    if any(index.layout == "linked" for index in indexes):
        raise DataError("linking a linked index is not supported",
                        hint="link its source indexes instead, or merge it into one index "
                             "first")


def write_linked_index(output: str, indexes: Sequence["IndexReader"], hidden: Sequence,
                       metadata: dict, query_prompt: str | None, fields: list,
                       full: dict | None, shared_codec: bool, duplicates: str) -> dict:
    """A folder of hard-linked (else copied) shards, the rows of each that another shard's copy
    of their id hides (`hidden`, per index), and a manifest saying how they form one index;
    written beside `output` and swapped into place. Returns the manifest, with the number of
    files that had to be copied as "copied"."""
    import numpy as np

    check_linkable(indexes)
    output = real_folder(output)
    tmp = temporary_sibling(output, "building")
    try:
        shards, copied = [], 0
        for number, (index, rows) in enumerate(zip(indexes, hidden)):
            folder = shard_folder(number)
            copied += _link_files(index, os.path.join(tmp, folder))
            entry = {"path": folder, "count": index.count, "hidden": None,
                     "source": os.path.abspath(index.path)}
            if len(rows):
                entry["hidden"] = f"{folder}.hidden.npy"
                np.save(os.path.join(tmp, entry["hidden"]), np.asarray(rows, dtype=np.int64))
            shards.append(entry)
        total = sum(index.count for index in indexes)
        first = indexes[0]
        manifest = new_manifest(
            "linked", total - sum(len(rows) for rows in hidden), first.dim, first.metric,
            first.dtype, first.score_metric, metadata, query_prompt, fields, full, rows=total,
            shared_codec=shared_codec, duplicates=duplicates, shards=shards,
            files=file_facts(tmp, [entry["hidden"] for entry in shards if entry["hidden"]]))
        write_manifest(tmp, manifest)
        swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(manifest, copied=copied)


def _link_files(index: "IndexReader", target: str) -> int:
    """Hard-link the files of an opened index into `target`; copy where linking fails. The
    names come from its checked manifest (plain known names only). Returns the number of
    files copied."""
    os.makedirs(target)
    copied = 0
    for name in [MANIFEST, *index.manifest["files"]]:
        try:
            os.link(os.path.join(index.path, name), os.path.join(target, name))
        except OSError:
            shutil.copy2(os.path.join(index.path, name), os.path.join(target, name))
            copied += 1
    return copied
