"""Deleting rows from an index by id, as part of the atomic rebuild `IndexBuilder` makes:
the ids to delete are read from a file or stream (`read_ids`), the rows that stay are
numbered again 0..n-1 in their old order (`kept_rows`), and a copied HNSW graph loses the
deleted nodes and renames the kept ones (`compact_graph`) instead of being built again.

Why copy the graph: usearch's `remove` marks a node deleted (searches skip it, later adds
reuse its slot, so the file does not grow night after night) and `rename` moves a key, both
in milliseconds, where a new graph costs as long as the first build; recall after deleting
stays that of a fresh graph (measured: tests/test_index_delete.py and the report of issue 17).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def read_ids(path: str, stdin=None) -> list[str]:
    """The ids in `path` (`-`: stdin): records with an `id` (or `_id`) field in any format
    vecpipe reads (JSONL, Arrow, Parquet, CSV/TSV by name), or plain text, one id a line
    (surrounding spaces stripped, blank lines skipped). Repeats are kept; order is kept."""
    from vecpipe.formats import schema as names
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([path], stdin=stdin, unsniffed="text")
    ids: list[str] = []
    for item in stream:
        fmt = next(iter(stream.formats.values()), "")
        column = names.find_id_column(item.batch.schema)
        if column is None and fmt.startswith("text"):
            lines = item.batch.column(names.TEXT).to_pylist()
            ids.extend(line.strip() for line in lines if line.strip())
        elif column is None:
            raise DataError(f"records have no 'id' field (fields: "
                            f"{', '.join(item.batch.schema.names)})", source=item.source,
                            record=item.first_record,
                            hint="give records with an id, or plain text: one id a line")
        else:
            ids.extend(names.batch_ids(item.batch, column, item.first_record,
                                       source=item.source).to_pylist())
    return ids


def kept_rows(index_ids: "pa.ChunkedArray | pa.Array", delete: Iterable[str]):
    """(rows that stay as a sorted int64 array, or None when nothing is deleted; how many rows
    are deleted; how many distinct ids in `delete` the index does not hold)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(list(dict.fromkeys(delete)), pa.string())
    gone = np.asarray(pc.is_in(index_ids, value_set=wanted).to_numpy(zero_copy_only=False),
                      dtype=bool)
    deleted = int(gone.sum())  # an index holds one row per id
    if deleted == 0:
        return None, 0, len(wanted)
    return np.flatnonzero(~gone).astype(np.int64), deleted, len(wanted) - deleted


def compact_graph(index, count: int, keep: "np.ndarray") -> None:
    """A usearch index whose keys were 0..count-1 keeps the rows `keep` (sorted), renamed
    0..len(keep)-1: the others are removed, then each kept key moves down to its new number.
    In ascending order every target is free by then (a deleted key, or one already moved)."""
    import numpy as np

    gone = np.setdiff1d(np.arange(count, dtype=np.int64), keep, assume_unique=True)
    if len(gone):
        index.remove(gone.astype(np.uint64))
    new = np.arange(len(keep), dtype=np.int64)
    moved = keep != new
    if moved.any():
        index.rename(keep[moved].astype(np.uint64), new[moved].astype(np.uint64))
    if index.size != len(keep):
        raise DataError(f"the copied graph holds {index.size} vectors after deleting, not "
                        f"{len(keep)}: the index is damaged", source=None)
