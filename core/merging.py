"""What `vecpipe merge` checks and combines: schemas, vecpipe metadata, shard sets and duplicate
ids (model weights: core.model_soup)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Sequence

from vecpipe.core.space import TEXT_KEY, check_same_space, merged_meta, note_unknown_text
from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError
from vecpipe.formats.shards import PART_PATTERN, parse_part_name

if TYPE_CHECKING:
    import pyarrow as pa

# Metadata keys whose difference makes merged vectors meaningless (normalization too: cosine and
# dot scores of mixed normalized/unnormalized vectors are not comparable; the text embedded:
# one set's title+text vectors do not rank alike with another's text alone).
MERGE_IDENTITY_KEYS = ("model", "dim", "normalized", "codec", TEXT_KEY)
# What to do with an id seen before: keep every copy, the first, the last, or fail.
DUPLICATE_POLICIES = ("keep", "first", "last", "error")


class DuplicateId(DataError):
    """An id held twice where each id must be unique."""


class MissingId(DataError):
    """A record without the id that finding duplicates needs."""


class UnnamedShard(DataError):
    """An input of a counted shard set that is not named part-I-of-N."""


# ---- schemas -------------------------------------------------------------------------------

def id_renamed(schema: "pa.Schema") -> "pa.Schema":
    """`_id` (BEIR) becomes `id` when the schema has no `id` of its own."""
    if names.ID in schema.names or "_id" not in schema.names:
        return schema
    index = schema.get_field_index("_id")
    return schema.set(index, schema.field(index).with_name(names.ID))


def unify_schemas(named: Sequence[tuple[str, "pa.Schema"]]) -> "pa.Schema":
    """One schema holding every field of every input, in first-seen order, no metadata.

    Types unify when one side is null, both are numbers (-> int64 or float64), or the `id` mixes
    integers and strings (-> string); any other difference is a DataError naming both inputs.
    """
    import pyarrow as pa

    fields: dict[str, tuple["pa.Field", str]] = {}
    for source, schema in named:
        for field in schema:
            if field.name not in fields:
                fields[field.name] = (field, source)
                continue
            known, known_source = fields[field.name]
            unified = _unify_type(field.name, known.type, field.type)
            if unified is None:
                raise DataError(f"field {field.name!r} is {known.type} in {known_source} but "
                                f"{field.type} in {source}",
                                hint="convert one of them first, or merge them separately")
            fields[field.name] = (known.with_type(unified).with_nullable(True), known_source)
    return pa.schema([field for field, _ in fields.values()])


def _unify_type(name: str, a: "pa.DataType", b: "pa.DataType") -> "pa.DataType | None":
    import pyarrow as pa

    t = pa.types
    if a.equals(b):
        return a
    if t.is_null(a) or t.is_null(b):
        return b if t.is_null(a) else a
    if t.is_integer(a) and t.is_integer(b):
        return pa.int64()
    if (t.is_integer(a) or t.is_floating(a)) and (t.is_integer(b) or t.is_floating(b)):
        return pa.float64()
    if name == names.ID and {_kind(a), _kind(b)} <= {"int", "str"}:
        return pa.string()
    return None


def _kind(dtype) -> str:
    import pyarrow as pa

    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "str"
    return "other"


def renamed_batch(batch: "pa.RecordBatch") -> "pa.RecordBatch":
    """`batch` with `_id` renamed as `id_renamed` does for its schema."""
    schema = id_renamed(batch.schema)
    return batch if schema is batch.schema else batch.rename_columns(schema.names)


# ---- metadata ------------------------------------------------------------------------------

def check_metadata(named: Sequence[tuple[str, dict]], force: bool = False,
                   keys: Iterable[str] = MERGE_IDENTITY_KEYS) -> None:
    """Refuse inputs whose model/dim/normalized/codec/embedded text differ; each key is
    compared with the first input that has it (inputs without the key, e.g. JSONL, pass; for
    the text embedded with a note)."""
    if force:
        return
    # Written by vecpipe (some metadata) but no codec: raw vectors, which must not be mixed
    # with compressed ones.
    named = [(source, dict(meta, codec=meta.get("codec", "none")) if meta else meta)
             for source, meta in named]
    for key in keys:
        reference = next(((source, meta) for source, meta in named if key in meta), None)
        if reference is None:
            continue
        for source, meta in named:
            check_same_space(reference[1], meta, reference[0], source, keys=(key,))
    if TEXT_KEY in keys:
        note_unknown_text(named)


def common_metadata(named: Sequence[tuple[str, dict]]) -> tuple[dict, list[str]]:
    """The metadata all inputs agree on, and the keys some input had that were dropped
    (`version` aside: it differs harmlessly between releases)."""
    metas = [meta for _, meta in named]
    common = merged_meta(metas)
    dropped = sorted({key for meta in metas for key in meta} - set(common) - {"version"})
    return common, dropped


# ---- shard sets ----------------------------------------------------------------------------

def check_shard_set(paths: Sequence[str], expected: int | None = None) -> None:
    """Fail when a fan-out is incomplete: inputs named `part-0000I-of-0000N` are grouped by
    folder and name around the part number, and each group needs every I in 0..N-1 exactly
    once. With `expected`, every group has N == expected, or, when no input has a part name,
    there are exactly `expected` distinct inputs."""
    files = [p for p in paths if p != "-"]
    groups: dict[tuple, dict[int, str]] = {}
    for path in files:
        shard = parse_part_name(path)
        if shard is None:
            continue
        group = groups.setdefault(_group_key(path, shard.count), {})
        if shard.index in group:
            raise DataError(f"shard {shard.index} of {shard.count} given twice: "
                            f"{group[shard.index]} and {path}")
        group[shard.index] = path
    if expected is not None:
        _check_expected(paths, files, groups, expected)
    for (folder, prefix, suffix, count), present in groups.items():
        missing = [i for i in range(count) if i not in present]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            example = os.path.join(folder, f"{prefix}part-{missing[0]:05d}-of-{count:05d}{suffix}")
            raise DataError(f"{len(missing)} of {count} shards missing (shard {shown}), "
                            f"e.g. {example}",
                            hint="a fan-out job did not finish; rerun the missing shards")


def _group_key(path: str, count: int) -> tuple:
    folder, base = os.path.split(path)
    match = PART_PATTERN.search(base)
    return (folder, base[:match.start()], base[match.end():], count)


def _check_expected(paths, files, groups, expected: int) -> None:
    if groups:
        unnamed = [p for p in paths if p == "-" or parse_part_name(p) is None]
        if unnamed:
            raise UnnamedShard(f"{unnamed[0]} is not named part-I-of-N",
                               hint="name every shard part-0000I-of-0000N or none of them")
        wrong = next((key for key in groups if key[3] != expected), None)
        if wrong is not None:
            raise DataError(f"expected {expected} shards but the files say {wrong[3]} "
                            f"({os.path.join(wrong[0], wrong[1])}part-*-of-{wrong[3]:05d}"
                            f"{wrong[2]})")
        return
    distinct = {os.path.realpath(p) if p != "-" else p for p in paths}
    if len(distinct) != len(paths):
        raise DataError("the same input is given twice as two shards")
    if len(paths) != expected:
        raise DataError(f"expected {expected} shards, got {len(paths)} inputs",
                        hint="a fan-out job did not finish; rerun the missing shards")


# ---- duplicate ids -------------------------------------------------------------------------

def batch_ids(batch: "pa.RecordBatch", source: str, first_record: int) -> list[str]:
    """The `id` column of a (renamed) batch as strings; a missing or null id is a MissingId."""
    if names.ID not in batch.schema.names:
        raise MissingId("records have no id field to find duplicates by", source=source)
    try:
        return names.batch_ids(batch, names.ID, first_record, source=source,
                               null_message="record has no id to find duplicates by"
                               ).to_pylist()
    except DataError as err:
        raise MissingId(err.message, source=err.source, record=err.record) from None


class FirstSeen:
    """Keep the first copy of each id: a record is kept unless its id was seen before (one
    pass)."""

    def __init__(self):
        self.seen: set[str] = set()
        self.dropped = 0

    def keep(self, ids: list[str], _ordinal: int) -> list[bool]:
        seen = self.seen
        mask = []
        for key in ids:
            mask.append(key not in seen)
            seen.add(key)
        self.dropped += mask.count(False)
        return mask


class LastSeen:
    """Keep the last copy of each id: a first pass records each id's last position (record
    ordinal over all inputs); the second pass keeps the record at that position."""

    def __init__(self):
        self.last: dict[str, int] = {}
        self.dropped = 0

    def observe(self, ids: list[str], ordinal: int) -> None:
        last = self.last
        for offset, key in enumerate(ids):
            last[key] = ordinal + offset

    def keep(self, ids: list[str], ordinal: int) -> list[bool]:
        last = self.last
        mask = [last[key] == ordinal + offset for offset, key in enumerate(ids)]
        self.dropped += mask.count(False)
        return mask


class NoDuplicates:
    """Refuse repeated ids: a first pass fails on the first repeated id, naming both places."""

    def __init__(self):
        self.first_place: dict[str, tuple[int, int]] = {}
        self.sources: list[str] = []

    def observe_source(self, ids: list[str], source: str, first_record: int) -> None:
        if not self.sources or self.sources[-1] != source:
            self.sources.append(source)
        source_index = len(self.sources) - 1
        places = self.first_place
        for offset, key in enumerate(ids):
            place = places.get(key)
            if place is not None:
                first = f"{self.sources[place[0]]}:{place[1]}"
                raise DuplicateId(f"duplicate id {key!r}, first seen at {first}",
                                  source=source, record=first_record + offset)
            places[key] = (source_index, first_record + offset)


# ---- linked index shards -------------------------------------------------------------------

def shadowed_rows(id_lists: Sequence[list[str]], mode: str,
                  sources: Sequence[str]) -> list[list[int]]:
    """For shards holding `id_lists` (ids unique within a shard), the rows of each shard that
    another shard's copy of the same id hides: with `first` the earliest shard's copy wins, with
    `last` the latest's; `none`/`error` fail on the first id held twice."""
    hidden: list[list[int]] = [[] for _ in id_lists]
    owner_of: dict[str, int] = {}
    order = range(len(id_lists))
    for shard in (reversed(order) if mode == "last" else order):
        for row, key in enumerate(id_lists[shard]):
            owner = owner_of.setdefault(key, shard)
            if owner == shard:
                continue
            if mode in ("keep", "error"):
                raise DuplicateId(f"duplicate id {key!r}: in {sources[min(owner, shard)]} and "
                                  f"{sources[max(owner, shard)]}")
            hidden[shard].append(row)
    return hidden
