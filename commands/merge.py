"""Merge shards and streams (checking metadata, schemas, duplicates and shard sets), or models."""
import contextlib
import os
from dataclasses import dataclass
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(inputs: Annotated[Optional[List[str]], typer.Argument(
            help="Record files (any mix of formats) or - for stdin (the default); with "
                 "--models, model folders (`default` = the bundled model).",
            show_default=False, metavar="INPUT")] = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        dedupe: Annotated[str, typer.Option(
            "--dedupe", help="none|first|last|error: keep the first or the last record of "
                             "each id (later inputs win with last), or fail on a repeated id. "
                             "Holds every id in memory, not the records; last and error read "
                             "the inputs twice (stdin is spooled to a temporary file).",
            metavar="MODE")] = "none",
        sort_by: Annotated[Optional[str], typer.Option(
            "--sort-by", help="Sort the merged records by this field (e.g. id). Global: holds "
                              "all records in memory.", metavar="FIELD")] = None,
        expect_shards: Annotated[Optional[int], typer.Option(
            "--expect-shards", help="Fail unless the inputs are exactly N shards (files named "
                                    "part-0000I-of-0000N are checked for gaps and repeats "
                                    "even without this).", metavar="N")] = None,
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
    complete shard sets. With --models, average the weights of sentence-transformers models
    (model soups) and save the result as a model folder.

    \b
    Example:
      vecpipe merge shards/part-*.arrow --expect-shards 16 --sort-by id -o corpus.arrow
      vecpipe merge old.parquet new.jsonl --dedupe last -o corpus.parquet
      vecpipe merge --models default tuned/ --weights 0.5,0.5 -o soup/
    """
    from vecpipe.formats.errors import UsageError

    if models:
        if dedupe != "none" or sort_by or expect_shards is not None:
            raise UsageError("--dedupe, --sort-by and --expect-shards apply to record streams, "
                             "not --models")
        merge_models(inputs or [], output, weights, method, force)
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
    from vecpipe.formats import merging
    from vecpipe.formats.errors import DataError, UsageError
    from vecpipe.formats.writers import RecordWriter

    if dedupe not in merging.DEDUPE_MODES:
        raise UsageError(f"unknown --dedupe {dedupe!r}; choose from "
                         f"{', '.join(merging.DEDUPE_MODES)}")
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    merging.check_shard_set(paths, expect_shards)
    with spooled_stdin(paths, needed=dedupe in ("last", "error")) as readable:
        sources = [open_source(path, shown, input_format) for path, shown in readable]
        present = [s for s in sources if s.schema is not None]
        metas = [(s.name, read_meta(s.schema)) for s in present]
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
    console.info(f"{len(paths)} inputs -> {out.rows} records -> {output or 'stdout'} "
                 f"({out.format}){dropped_note}")


def read_meta(schema):
    from vecpipe.formats import schema as names

    return names.read_meta(schema)


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
    from vecpipe.formats import merging
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
    from vecpipe.formats import merging

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

    from vecpipe.formats import merging

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


def merge_models(specs, output, weights_text, method, force) -> None:
    """Weighted average (linear) or per-tensor slerp of models with identical architecture; the
    first model's tokenizer, pooling and normalize modules are kept."""
    from vecpipe.cli import console
    from vecpipe.formats import merging
    from vecpipe.formats.errors import UsageError

    if output in (None, "-"):
        raise UsageError("--models needs -o DIR for the merged model folder")
    if len(specs) < 2:
        raise UsageError("--models needs at least two models")
    weights = merging.parse_weights(weights_text, len(specs))
    if method not in ("linear", "slerp"):
        raise UsageError(f"unknown --method {method!r}; choose linear or slerp")
    t = slerp_position(weights) if method == "slerp" else None
    check_output_folder(output)
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

    from vecpipe.formats import merging

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


def check_output_folder(output: str) -> None:
    """Replace only an empty folder or an earlier merge result, never other data."""
    from vecpipe.formats.errors import UsageError

    if os.path.exists(output):
        if not os.path.isdir(output):
            raise UsageError(f"-o {output} exists and is not a folder")
        if os.listdir(output) and not os.path.isfile(os.path.join(output, PROVENANCE_FILE)):
            raise UsageError(f"-o {output} is a folder with other files; not replacing it",
                             hint="choose a new or empty folder")
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

    from vecpipe.cli import __version__

    soup = copy.deepcopy(loaded[0].st)
    soup.load_state_dict(merged)
    output = os.path.abspath(output)
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


def replace_folder(tmp: str, dest: str) -> None:
    """Move a finished folder into place; an existing one is swapped out, then removed."""
    import shutil

    old = None
    if os.path.exists(dest):
        old = f"{tmp}.old"
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)
