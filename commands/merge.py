"""Merge shards and streams (checking metadata, schemas, duplicates and shard sets), or models."""
import contextlib
import os
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Record files (any mix of formats) or - for stdin (the default); with "
                 "--index, index folders; with --models, model folders (`default` = the "
                 "bundled model).",
            show_default=False, metavar="INPUT")] = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        dedupe: Annotated[str, typer.Option(
            "--dedupe", help="none|first|last|error: keep the first or the last record of "
                             "each id (later inputs win with last), or fail on a repeated id. "
                             "Holds every id in memory, not the records; last and error read "
                             "the inputs twice (stdin is spooled to a temporary file). With "
                             "--index: the first or last index's copy wins.",
            metavar="MODE")] = "none",
        sort_by: Annotated[Optional[str], typer.Option(
            "--sort-by", help="Sort the merged records by this field (e.g. id). Global: holds "
                              "all records in memory.", metavar="FIELD")] = None,
        expect_shards: Annotated[Optional[int], typer.Option(
            "--expect-shards", help="Fail unless the inputs are exactly N shards (files named "
                                    "part-0000I-of-0000N are checked for gaps and repeats "
                                    "even without this).", metavar="N")] = None,
        index: Annotated[bool, typer.Option(
            "--index", help="The INPUTs are index folders: rebuild one index from them into "
                            "-o (ids must be disjoint, or follow --dedupe).")] = False,
        link: Annotated[bool, typer.Option(
            "--link", help="With --index: don't rebuild; write a folder of linked shards "
                           "(files hard-linked) that `search` queries as one index.")] = False,
        models: Annotated[bool, typer.Option(
            "--models", help="Merge the weights of the INPUT models (identical architecture) "
                             "into the folder -o.")] = False,
        weights: Annotated[Optional[str], typer.Option(
            "--weights", help="With --models: one weight per model, e.g. 0.7,0.3 (default "
                              "equal).", metavar="W,W")] = None,
        method: Annotated[str, typer.Option(
            "--method", help="With --models: linear (any number of models) or slerp "
                             "(two models, per tensor).")] = "linear",
        force: Annotated[bool, typer.Option(
            "--force", help="Merge inputs whose model/dim/normalized/codec metadata differ "
                            "(the output keeps only the metadata they share).")] = False,
        quiet: options.Quiet = False):
    """Concatenate record streams into one, in bounded memory: schemas are unified (a field
    missing from an input becomes null; a field with conflicting types is an error), and inputs
    whose vecpipe metadata (model, dim, normalized, codec) differ are refused unless --force.
    The output carries the metadata all inputs share. Inputs named part-0000I-of-0000N must form
    complete shard sets. With --index, merge index folders (same checks); with --models,
    average the weights of sentence-transformers models (model soups) into a model folder.

    \b
    Example:
      vecpipe merge shards/part-*.arrow --expect-shards 16 --sort-by id -o corpus.arrow
      vecpipe merge old.parquet new.jsonl --dedupe last -o corpus.parquet
      vecpipe merge --index idx-a idx-b --dedupe last -o idx
      vecpipe merge --index --link idx-2024 idx-2025 -o idx-all   # search idx-all ...
      vecpipe merge --models default tuned/ --weights 0.5,0.5 -o soup/
    """
    from vecpipe.formats.errors import UsageError

    if index and models:
        raise UsageError("give --index or --models, not both")
    if link and not index:
        raise UsageError("--link applies to --index")
    if index:
        if sort_by or expect_shards is not None or weights is not None or method != "linear":
            raise UsageError("--sort-by, --expect-shards, --weights and --method do not apply "
                             "to --index")
        merge_indexes(inputs or [], output, dedupe, link, force)
        return
    if models:
        if dedupe != "none" or sort_by or expect_shards is not None:
            raise UsageError("--dedupe, --sort-by and --expect-shards apply to record streams, "
                             "not --models")
        merge_models(inputs or [], output, weights, method)
        return
    if weights is not None or method != "linear":
        raise UsageError("--weights and --method apply only with --models")
    merge_streams(inputs or ["-"], output, output_format, input_format, dedupe, sort_by,
                  expect_shards, force)


# ---- record streams ------------------------------------------------------------------------

@dataclass
class Source:
    """One input: the name shown in messages, the path read, its schema (None when empty), and
    for stdin the open stream (it can be read only once)."""

    name: str
    path: str
    schema: object
    kept: object = None


def merge_streams(paths, output, output_format, input_format, dedupe, sort_by, expect_shards,
                  force) -> None:
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.writers import RecordWriter

    if dedupe not in merging.DEDUPE_MODES:
        raise UsageError(f"unknown --dedupe {dedupe!r}; choose from "
                         f"{', '.join(merging.DEDUPE_MODES)}")
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    paths = expand_part_folders(paths)
    merging.check_shard_set(paths, expect_shards)
    if not force:
        check_one_job(paths)
    with spooled_stdin(paths, needed=dedupe in ("last", "error")) as readable:
        sources = [open_source(path, shown, input_format) for path, shown in readable]
        present = [s for s in sources if s.schema is not None]
        metas = [(s.name, names.read_meta(s.schema)) for s in present]
        merging.check_metadata(metas, force)
        schema = merging.unify_schemas([(s.name, merging.id_renamed(s.schema))
                                        for s in present])
        common, dropped = merging.common_metadata(metas)
        if dropped:
            console.warn(f"the output drops metadata not shared by all inputs: "
                         f"{', '.join(dropped)}")
        if sort_by and sort_by not in schema.names:
            raise DataError(f"no field {sort_by!r} to sort by; fields are "
                            f"{', '.join(schema.names)}")
        keeper = prepare_dedupe(dedupe, sources, input_format)
        with RecordWriter(output, output_format, schema=schema, metadata=common) as out:
            batches = kept_batches(sources, input_format, keeper)
            if sort_by:
                out.write_table(sorted_table(batches, schema, sort_by))
            else:
                for batch in batches:
                    out.write(batch)
    dropped_note = f", {keeper.dropped} duplicates dropped" if keeper else ""
    console.info(f"{len(paths)} input{'s' if len(paths) != 1 else ''} -> {out.rows} records -> {output or 'stdout'} "
                 f"({out.format}){dropped_note}")


def check_one_job(paths) -> None:
    """Parts of `--shard` runs whose inputs or options differ are never merged together."""
    from vecpipe.formats.parts import check_one_job as refuse_mixed_jobs

    refuse_mixed_jobs([path for path in paths if path != "-"])


def expand_part_folders(paths):
    """A folder stands for the part files in it (`embed --shard I/N -o DIR/`), in shard order."""
    from vecpipe.formats.errors import DataError
    from vecpipe.formats.parts import list_parts

    expanded = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            parts = [part for _, part in list_parts(path)]
            if not parts:
                raise DataError("folder holds no part-0000I-of-0000N files", source=path)
            expanded.extend(parts)
        else:
            expanded.append(path)
    return expanded


@contextlib.contextmanager
def spooled_stdin(paths, needed: bool):
    """Yield (path, shown name) pairs; when inputs must be read twice, stdin is first copied to
    a temporary file (removed afterwards) so that it can be."""
    import shutil
    import tempfile

    from vecpipe.formats.readers import STDIN_NAME, stdin_binary

    if not needed or "-" not in paths:
        yield [(path, STDIN_NAME if path == "-" else path) for path in paths]
        return
    with tempfile.NamedTemporaryFile(prefix="vecpipe-merge-stdin-") as spool:
        shutil.copyfileobj(stdin_binary(), spool, 1 << 20)
        spool.flush()
        yield [(spool.name, STDIN_NAME) if path == "-" else (path, path) for path in paths]


def open_source(path: str, shown: str, input_format: str) -> Source:
    """Read an input's schema. Files are reopened later (one open file at a time); stdin keeps
    its stream, with the batch already read still pending in it."""
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([path], input_format)
    with renamed_errors(path, shown):
        schema = stream.schema
    return Source(shown, path, schema, kept=stream if path == "-" else None)


@contextlib.contextmanager
def renamed_errors(path: str, shown: str):
    """Errors in a spooled stdin name <stdin>, not the temporary file."""
    from vecpipe.formats.errors import VecpipeError

    try:
        yield
    except VecpipeError as err:
        if err.source == path:
            err.source = shown
        raise


def source_batches(source: Source, input_format: str):
    """(renamed batch, shown name, first record number) for each batch of one input."""
    from vecpipe.core import merging
    from vecpipe.formats.readers import RecordStream

    if source.schema is None:
        return
    stream = source.kept or RecordStream([source.path], input_format)
    source.kept = None
    with renamed_errors(source.path, source.name):
        for item in stream:
            yield merging.renamed_batch(item.batch), source.name, item.first_record


def all_batches(sources, input_format):
    for source in sources:
        yield from source_batches(source, input_format)


def prepare_dedupe(mode: str, sources, input_format):
    """The keeper for --dedupe (None for none), after the first pass that last/error need."""
    from vecpipe.core import merging

    if mode == "none":
        return None
    if mode == "first":
        return merging.FirstSeen()
    if mode == "error":
        checker = merging.NoDuplicates()
        for batch, name, first in all_batches(sources, input_format):
            checker.observe_source(merging.batch_ids(batch, name, first), name, first)
        return None
    keeper = merging.LastSeen()
    ordinal = 0
    for batch, name, first in all_batches(sources, input_format):
        keeper.observe(merging.batch_ids(batch, name, first), ordinal)
        ordinal += batch.num_rows
    return keeper


def kept_batches(sources, input_format, keeper):
    """Every batch in input order, filtered by the dedupe keeper."""
    import pyarrow as pa

    from vecpipe.core import merging

    ordinal = 0
    for batch, name, first in all_batches(sources, input_format):
        if keeper is not None:
            mask = keeper.keep(merging.batch_ids(batch, name, first), ordinal)
            ordinal += batch.num_rows
            if not all(mask):
                batch = batch.filter(pa.array(mask, pa.bool_()))
        yield batch


def sorted_table(batches, schema, field: str):
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.formats.errors import DataError

    table = pa.Table.from_batches([names.align_batch(b, schema) for b in batches], schema)
    try:
        return table.sort_by([(field, "ascending")])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as err:
        raise DataError(f"cannot sort by {field!r} ({schema.field(field).type}): {err}") \
            from None


# ---- models (weight-space merging) ---------------------------------------------------------

PROVENANCE_FILE = "vecpipe-merge.json"


def merge_models(specs, output, weights_text, method) -> None:
    """Weighted average (linear) or per-tensor slerp of models with identical architecture; the
    first model's tokenizer, pooling and normalize modules are kept."""
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.formats.errors import UsageError

    if output in (None, "-"):
        raise UsageError("--models needs -o DIR for the merged model folder")
    if len(specs) < 2:
        raise UsageError("--models needs at least two models")
    weights = merging.parse_weights(weights_text, len(specs))
    if method not in ("linear", "slerp"):
        raise UsageError(f"unknown --method {method!r}; choose linear or slerp")
    t = slerp_position(weights) if method == "slerp" else None
    check_output_folder(output, PROVENANCE_FILE, "a merged model")
    loaded = [load_for_merge(spec) for spec in specs]
    check_same_modules(loaded)
    states = [model.st.state_dict() for model in loaded]
    merging.compare_state_shapes([(model.name, {k: tuple(v.shape) for k, v in state.items()})
                                  for model, state in zip(loaded, states)])
    if abs(sum(weights) - 1) > 1e-6 and method == "linear":
        console.warn(f"weights sum to {sum(weights):g}, not 1: the merged weights are scaled")
    merged = merged_state(states, weights, t)
    save_model(loaded, merged, output, {"method": method, "weights": weights})
    console.info(f"merged {len(loaded)} models ({method}, weights "
                 f"{','.join(f'{w:g}' for w in weights)}) -> {output}")


def slerp_position(weights) -> float:
    from vecpipe.formats.errors import UsageError

    if len(weights) != 2:
        raise UsageError("--method slerp merges exactly two models")
    if min(weights) < 0 or sum(weights) <= 0:
        raise UsageError("--method slerp needs non-negative weights, not both 0")
    return weights[1] / sum(weights)


def load_for_merge(spec: str):
    from vecpipe.cli.models import load_model
    from vecpipe.formats.errors import UsageError

    model = load_model(spec, device="cpu", dtype="float32")
    if model.is_fake:
        raise UsageError(f"{spec} is a fake model: it has no weights to merge")
    return model


def check_same_modules(loaded) -> None:
    """Same module stack, module settings (pooling mode, max length...), transformer config and
    tokenizer vocabulary as the first model; weights are checked separately."""
    from vecpipe.formats.errors import DataError

    first = loaded[0]
    reference = module_description(first.st)
    for model in loaded[1:]:
        description = module_description(model.st)
        for what in reference:
            if reference[what] != description[what]:
                raise DataError(f"models differ in {what} "
                                f"({difference(reference[what], description[what])}): "
                                f"{first.name} vs {model.name}",
                                hint="weight merging needs models fine-tuned from one base "
                                     "model, with the same tokenizer and pooling")


def module_description(st) -> dict:
    ignored = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}
    configs, model_config = [], {}
    for module in st:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        configs.append((type(module).__name__, config))
        if hasattr(module, "auto_model"):
            model_config = {k: v for k, v in module.auto_model.config.to_dict().items()
                            if k not in ignored}
    return {"module stack": [name for name, _ in configs],
            "module settings": configs,
            "transformer config": model_config,
            "tokenizer vocabulary": st.tokenizer.get_vocab() if st.tokenizer else None}


def difference(a, b) -> str:
    """The first few differing entries of two descriptions, briefly."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(difference(x, y) for x, y in zip(a, b) if x != y)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2 \
            and a[0] == b[0]:  # (module name, settings)
        return f"{a[0]}: {difference(a[1], b[1])}"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        if len(a) > 1000:  # a vocabulary
            return f"{len(keys)} of {len(a)} tokens differ"
        return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3]) + \
            (" ..." if len(keys) > 3 else "")
    text = f"{a!r} vs {b!r}"
    return text if len(text) <= 200 else text[:200] + "..."


def merged_state(states, weights, t) -> dict:
    """The merged state dict (torch tensors); non-float tensors (ids, counters) come from the
    first model."""
    import torch

    from vecpipe.core import merging

    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        arrays = [state[key].detach().cpu().numpy() for state in states]
        if t is None:
            result = merging.linear_merge(arrays, weights)
        else:
            result = merging.slerp_merge(arrays[0], arrays[1], t)
        merged[key] = torch.from_numpy(result)
    return merged


def check_output_folder(output: str, marker: str, what: str) -> None:
    """Replace only an empty folder or an earlier output of the same kind (it holds `marker`),
    never other data."""
    from vecpipe.formats.errors import UsageError

    if os.path.exists(output):
        if not os.path.isdir(output):
            raise UsageError(f"-o {output} exists and is not a folder")
        if os.listdir(output) and not os.path.isfile(os.path.join(output, marker)):
            raise UsageError(f"-o {output} is a folder with other files, not {what}; "
                             f"not replacing it", hint="choose a new or empty folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UsageError(f"output folder does not exist: {parent}")


def save_model(loaded, merged, output: str, recipe: dict) -> None:
    """A copy of the first model with the merged weights, saved to a temporary sibling folder
    and renamed into place (with a record of how it was made)."""
    import copy
    import json
    import shutil
    import tempfile

    from vecpipe.formats import __version__

    soup = copy.deepcopy(loaded[0].st)
    soup.load_state_dict(merged)
    output = real_output(output)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=os.path.dirname(output))
    try:
        soup.save(tmp)
        provenance = dict(recipe, models=[{"name": m.name, "sha": m.sha} for m in loaded],
                          vecpipe_version=__version__)
        with open(os.path.join(tmp, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def real_output(output: str) -> str:
    """The folder an output path names: a symlink's target is replaced and the link kept, so
    the temporary folder is made beside the target (the rename needs one file system)."""
    return os.path.realpath(os.path.abspath(output))


def replace_folder(tmp: str, dest: str) -> None:
    """Move a finished folder into place; an existing one is swapped out, then removed.
    `dest` is a real path (`real_output`): renaming a symlink would move the link itself."""
    import shutil

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)  # mkdtemp made it private
    old = None
    if os.path.exists(dest):
        old = f"{tmp}.old"
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---- indexes -------------------------------------------------------------------------------

INDEX_BLOCK_ROWS = 8192
BUILDER_DUPLICATES = {"none": "error", "error": "error", "first": "skip", "last": "replace"}


def merge_indexes(paths, output, dedupe, link, force) -> None:
    """One index rebuilt from several (from their stored codes, or their kept full vectors when
    codecs differ), or with `link` a folder of linked shards searched as one."""
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.formats.errors import UsageError
    from vecpipe.core.index_store import MANIFEST, open_index

    if output in (None, "-"):
        raise UsageError("--index needs -o DIR for the merged index folder")
    if not paths:
        raise UsageError("--index needs the index folders to merge")
    if dedupe not in merging.DEDUPE_MODES:
        raise UsageError(f"unknown --dedupe {dedupe!r}; choose from "
                         f"{', '.join(merging.DEDUPE_MODES)}")
    check_output_folder(output, MANIFEST, "a vecpipe index")
    if not force:
        check_one_job(paths)
    indexes = [open_index(path, verify=True) for path in paths]  # copied or linked: check them
    plan = plan_index_merge(indexes, force, link)
    if link:
        summary = link_indexes(indexes, plan, output, dedupe)
    else:
        summary = rebuild_index(indexes, plan, output, dedupe)
    console.info(f"{len(indexes)} indexes -> {output}: {summary}")


@dataclass
class IndexMergePlan:
    """What the merged index is: metadata, query prompt, stored fields (unified schema), the
    full-vector spec (kept only when every input keeps them) and, for a rebuild, the codec the
    inputs' codes must be re-encoded with (None: copy codes as they are)."""

    metadata: dict
    query_prompt: object
    rows_schema: object
    full: object
    shared_codec: bool
    reencode: object = None


def plan_index_merge(indexes, force: bool, link: bool) -> IndexMergePlan:
    from vecpipe.cli import console
    from vecpipe.core import merging
    from vecpipe.formats.errors import DataError

    first = indexes[0]
    for index in indexes[1:]:
        for what in ("dim", "metric", "dtype", "score_metric"):
            if getattr(index, what) != getattr(first, what):
                raise DataError(f"{what} differs: {first.path} has {getattr(first, what)!r}, "
                                f"{index.path} has {getattr(index, what)!r}",
                                hint="indexes merge only when their vectors are the same kind; "
                                     "rebuild one from the records")
    if link and any(index.manifest.get("layout") == "linked" for index in indexes):
        raise DataError("linking a linked index is not supported",
                        hint="link its source indexes instead, or merge it into one index "
                             "first")
    named = [(index.path, dict(index.metadata)) for index in indexes]
    merging.check_metadata([(name, {k: v for k, v in meta.items() if k != "codec"})
                            for name, meta in named], force)
    prompts = {index.query_prompt for index in indexes}
    if len(prompts) > 1 and not force:
        raise DataError(f"query prompt differs: {first.path} has {first.query_prompt!r}, "
                        f"{next(i for i in indexes if i.query_prompt != first.query_prompt).path}"
                        f" has another", hint="pass --force to keep none")
    shared_codec = all(index.codec == first.codec for index in indexes)
    full = first.full_spec if all(index.full_spec == first.full_spec for index in indexes) \
        else None
    if first.full_spec is not None and full is None:
        console.warn("not every index keeps full vectors: the merged index keeps none")
    metadata, _ = merging.common_metadata(named)
    plan = IndexMergePlan(metadata, first.query_prompt if len(prompts) == 1 else None,
                          merging.unify_schemas([(index.path, index.rows().schema)
                                                 for index in indexes]),
                          full, shared_codec)
    if not shared_codec:
        resolve_codecs(indexes, plan, force, link)
    return plan


def resolve_codecs(indexes, plan: IndexMergePlan, force: bool, link: bool) -> None:
    """Inputs quantized with different codecs: linked shards each encode queries their own way
    (with --force); a rebuild re-encodes every input's kept full vectors with the first codec."""
    from vecpipe.formats.errors import DataError

    first, other = indexes[0], next(i for i in indexes if i.codec != indexes[0].codec)
    described = f"{first.path} has {describe_codec(first)}, {other.path} has " \
                f"{describe_codec(other)}"
    if link:
        if not force:
            raise DataError(f"codec differs: {described}",
                            hint="pass --force to link them anyway (each shard encodes queries "
                                 "with its own codec; scores are then only comparable "
                                 "approximately)")
        return
    if first.codec is None or any(index.full_spec is None for index in indexes):
        raise DataError(f"codec differs: {described}; the codes cannot be mixed",
                        hint="index with --keep-vectors so merge can re-encode them, or link "
                             "them with --link --force")
    plan.reencode = first.codec
    plan.metadata.update(first.codec.metadata())
    plan.shared_codec = True


def describe_codec(index) -> str:
    return "no codec" if index.codec is None else index.codec.describe()


def rebuild_index(indexes, plan: IndexMergePlan, output: str, dedupe: str) -> str:
    from vecpipe.core.index_store import IndexBuilder, IndexSpec, hnsw_options
    from vecpipe.formats.errors import DataError

    first = indexes[0]
    layout = hnsw_options(getattr(first, "shards", [first])[0].manifest)
    spec = IndexSpec(dim=first.dim, metric=first.metric, dtype=first.dtype,
                     score_metric=first.score_metric, **layout, metadata=plan.metadata,
                     query_prompt=plan.query_prompt, full=plan.full)
    builder = IndexBuilder(output, spec, on_duplicate=BUILDER_DUPLICATES[dedupe],
                           fields=plan.rows_schema.names)
    try:
        with builder:
            for index in indexes:
                for block in index_blocks(index, plan):
                    builder.add(**block)
    except DataError as err:
        if err.message.startswith("duplicate id"):
            err.hint = "--dedupe first keeps the first copy, --dedupe last the last"
        raise
    notes = [f"{builder.skipped:,} duplicates skipped" if builder.skipped else "",
             f"{builder.replaced:,} replaced" if builder.replaced else "",
             "codes re-encoded with the first codec" if plan.reencode is not None else ""]
    return ", ".join([f"{builder.count:,} vectors rebuilt"] + [n for n in notes if n])


def index_blocks(index, plan: IndexMergePlan):
    """IndexBuilder.add arguments for the visible rows of one index, block by block."""
    import numpy as np
    import pyarrow as pa

    from vecpipe.formats import schema as names
    from vecpipe.core.index_store import to_index_codes

    rows_table = index.rows()
    visible = index.visible_mask() if hasattr(index, "visible_mask") else None
    for start in range(0, index.count, INDEX_BLOCK_ROWS):
        rows = np.arange(start, min(start + INDEX_BLOCK_ROWS, index.count))
        if visible is not None:
            rows = rows[visible[rows]]
        full = None
        if plan.full is not None or plan.reencode is not None:
            full = np.asarray(index.full_vectors()[rows])
        if plan.reencode is not None:
            vectors = to_index_codes(plan.reencode,
                                     plan.reencode.encode(full.astype(np.float32)))
        else:
            vectors = index.stored_vectors(rows)
        stored = pa.Table.from_batches(
            [names.align_batch(batch, plan.rows_schema)
             for batch in rows_table.take(pa.array(rows)).to_batches()], plan.rows_schema)
        yield dict(ids=stored.column(names.ID).to_pylist(), vectors=vectors, stored=stored,
                   full=full if plan.full is not None else None, source=index.path,
                   first_record=start + 1)


def link_indexes(indexes, plan: IndexMergePlan, output: str, dedupe: str) -> str:
    """A folder of hard-linked (else copied) shards, the rows each shard's duplicates hide,
    and a manifest saying how they form one index."""
    import datetime
    import json
    import shutil
    import tempfile

    import numpy as np

    from vecpipe.formats import __version__
    from vecpipe.core import linked_index
    from vecpipe.core import merging
    from vecpipe.core.index_store import FORMAT, FORMAT_VERSION, MANIFEST, file_facts

    hidden = merging.shadowed_rows([index.ids().to_pylist() for index in indexes], dedupe,
                                   [index.path for index in indexes])
    output = real_output(output)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=os.path.dirname(output))
    try:
        shards, copied = [], 0
        for number, (index, rows) in enumerate(zip(indexes, hidden)):
            folder = linked_index.shard_folder(number)
            copied += link_index_files(index, os.path.join(tmp, folder))
            entry = {"path": folder, "count": index.count, "hidden": None,
                     "source": os.path.abspath(index.path)}
            if len(rows):
                entry["hidden"] = f"{folder}.hidden.npy"
                np.save(os.path.join(tmp, entry["hidden"]), np.asarray(rows, dtype=np.int64))
            shards.append(entry)
        total = sum(index.count for index in indexes)
        visible = total - sum(len(rows) for rows in hidden)
        first = indexes[0]
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "layout": linked_index.LAYOUT,
            "vecpipe_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "count": visible, "rows": total, "dim": first.dim, "metric": first.metric,
            "dtype": first.dtype, "score_metric": first.score_metric,
            "metadata": plan.metadata, "query_prompt": plan.query_prompt,
            "fields": plan.rows_schema.names, "full": plan.full,
            "shared_codec": plan.shared_codec, "duplicates": dedupe, "shards": shards,
            "files": file_facts(tmp, [entry["hidden"] for entry in shards if entry["hidden"]])}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    how = f"{copied} files copied (other file system)" if copied else "files hard-linked"
    return f"{len(shards)} shards linked, {visible:,} vectors ({total - visible:,} duplicates " \
           f"hidden; {how})"


def link_index_files(index, target: str) -> int:
    """Hard-link the files of an opened index into `target`; copy where linking fails. The
    names come from its checked manifest (plain known names only). Returns the number of
    files copied."""
    import shutil

    from vecpipe.core.index_store import MANIFEST

    os.makedirs(target)
    copied = 0
    for name in [MANIFEST, *index.manifest["files"]]:
        try:
            os.link(os.path.join(index.path, name), os.path.join(target, name))
        except OSError:
            shutil.copy2(os.path.join(index.path, name), os.path.join(target, name))
            copied += 1
    return copied
