"""Embed text records with a sentence-transformers model: streaming, cached, shardable."""
import contextlib
import functools
import os
from dataclasses import dataclass, replace
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options
from vecpipe.core.embedding import DEFAULT_WINDOW
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.shards import Shard, parse_shard


def run(inputs: options.Inputs = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        model: options.Model = None,
        text_fields: options.TextField = None,
        old_field: options.FieldForText = None,
        id_field: options.IdField = None,
        prompt: options.Prompt = None,
        prompt_name: options.PromptName = None,
        dim: options.Dim = None,
        layers: options.Layers = None,
        pooling: options.Pooling = None,
        no_normalize: Annotated[bool, typer.Option(
            "--no-normalize", help="Do not L2-normalize (a model that normalizes itself "
                                   "still does).")] = False,
        batch_size: options.BatchSize = 32,
        batch_tokens: Annotated[Optional[int], typer.Option(
            "--batch-tokens", min=1, metavar="N", show_default=False,
            help="Fill each model call with up to N padded tokens (texts x the longest) "
                 "instead of --batch-size texts: many short texts to a call, few long ones "
                 "(token-budget batching, for GPUs: 16384 is a start).")] = None,
        device: options.Device = "auto",
        precision: options.Precision = "auto",
        old_dtype: options.alias(Optional[str], "--dtype", "--precision", "precision",
                                 lambda value: {"precision": options.precision(value)}) = None,
        backend: options.Backend = "torch",
        max_length: options.MaxLength = None,
        chunk_tokens: options.ChunkTokens = None,
        chunk_overlap: options.ChunkOverlap = 0,
        context_tokens: options.ContextTokens = None,
        context_template: options.ContextTemplate = None,
        late_chunking: options.LateChunking = False,
        cache: options.Cache = None,
        shard: options.Shard = None,
        engine: Annotated[str, typer.Option(
            "--engine", help="local|ray. ray: Ray actors (one per GPU, or per group of CPUs) "
                             "embed parts of the INPUT files or folders; -o DIR gets part "
                             "files, -o FILE the input order. Needs vecpipe[ray].")] = "local",
        address: Annotated[Optional[str], typer.Option(
            "--address", help="With --engine ray: the cluster to attach to (default "
                              "RAY_ADDRESS, else a local cluster).", metavar="ADDR")] = None,
        parts: Annotated[Optional[int], typer.Option(
            "--parts", min=1, help="With --engine ray: split the input into N parts (default: "
                                   "as many as -o DIR holds, else one per worker).",
            metavar="N")] = None,
        skip_invalid: Annotated[bool, typer.Option(
            "--skip-invalid", help="Skip records with missing, empty or non-string text (and "
                                   "count them) instead of failing.")] = False,
        drop_text: Annotated[bool, typer.Option(
            "--drop-text", help="Leave the text field out of the output.")] = False,
        window: Annotated[int, typer.Option(
            "--window", min=1, help="The most records buffered and encoded length-sorted "
                                    "at a time (memory stays bounded by it); windows start at "
                                    "64 and grow 4x to it, so the first output leaves soon.",
            metavar="N")] = DEFAULT_WINDOW,
        globs: Annotated[Optional[List[str]], typer.Option(
            "--glob", help="Embed the files under each INPUT folder that match PATTERN (e.g. "
                           "'**/*.md'; repeatable): one record per file, id = its path in the "
                           "folder, text = its contents, plus path, bytes and mtime. Files "
                           "that are not UTF-8 text are skipped and counted.",
            metavar="PATTERN", show_default=False)] = None,
        multi_vector: Annotated[bool, typer.Option(
            "--multi-vector", help="Also write each record's token vectors, as ColBERT keeps "
                                   "them: token_vectors (one L2-normalized vector per "
                                   "non-padding input token, special tokens kept) and "
                                   "token_count, for compress --fde and search --rescore "
                                   "(one forward pass makes both; one device, torch "
                                   "backend).")] = False,
        trust_remote_code: options.TrustRemoteCode = False,
        force: options.Force = False,
        dry_run: options.DryRun = False,
        progress: options.Progress = False,
        quiet: options.Quiet = False):
    """Embed the text of every record. Output keeps every input field (text unless
    --drop-text) and adds `id` and `embedding` (float32), with the model, prompt, dim and
    normalization in the schema metadata. Records are buffered in windows, encoded sorted by
    length, and written in input order; reading overlaps encoding. A summary (records, cache
    hits, truncated inputs, skipped records) goes to stderr.

    \b
    Example:
      vecpipe embed corpus.jsonl --text-field title --text-field text -o corpus.arrow
      vecpipe embed queries.jsonl --prompt 'query: ' --dim 128 --cache ~/.cache/vp | vecpipe info
      vecpipe embed docs.parquet --chunk-tokens 200 --chunk-overlap 50 --shard 0/4 -o p0.arrow
      vecpipe embed corpus.jsonl --shard auto -o parts/      # parts/part-0000I-of-0000N.arrow
      vecpipe embed --engine ray corpus/ -o corpus.arrow
      vecpipe embed notes/ --glob '**/*.md' --chunk-tokens 200 -o notes.arrow
      vecpipe embed corpus.jsonl --text-field title --dry-run   # check, print the plan
    """
    request = Request(inputs=inputs, output=output, output_format=output_format,
                      input_format=input_format, model=model, text_fields=text_fields,
                      id_field=id_field, prompt=prompt, prompt_name=prompt_name, dim=dim,
                      layers=layers, pooling=pooling,
                      no_normalize=no_normalize, batch_size=batch_size,
                      batch_tokens=batch_tokens, device=device,
                      precision=precision, backend=backend,
                      max_length=max_length, chunk_tokens=chunk_tokens,
                      chunk_overlap=chunk_overlap, context_tokens=context_tokens,
                      context_template=options.unescaped(context_template),
                      late_chunking=late_chunking, cache=cache, shard=parse_shard(shard),
                      skip_invalid=skip_invalid, drop_text=drop_text, window=window,
                      trust_remote_code=trust_remote_code, force=force,
                      globs=tuple(globs or ()), multi_vector=multi_vector)
    on_ray = bool(engine != "local" or address or parts)
    check_options(request, on_ray)
    if dry_run:
        return print_plan(dry_run_plan(request, on_ray))
    options.show_progress(progress)
    if on_ray:
        return embed_on_ray(request, engine, address, parts)
    return embed_local(request)


@dataclass(frozen=True)
class Request:
    """The options of one run as given: what a part's job counts, and what a Ray worker runs."""

    inputs: list | None
    output: str | None
    output_format: str
    input_format: str
    model: str | None
    text_fields: list | None
    id_field: str | None
    prompt: str | None
    prompt_name: str | None
    dim: int | None
    no_normalize: bool
    batch_size: int
    device: str
    precision: str
    backend: str
    max_length: int | None
    chunk_tokens: int | None
    chunk_overlap: int
    cache: str | None
    shard: Shard | None
    skip_invalid: bool
    drop_text: bool
    window: int
    trust_remote_code: bool
    force: bool
    globs: tuple = ()  # --glob: the inputs are folders, each matching file one record
    layers: int | None = None   # --layers: the model's first layers only
    pooling: str | None = None  # --pooling: instead of the model's own
    context_tokens: int | None = None  # --context-tokens: situated chunks
    context_template: str | None = None
    late_chunking: bool = False
    multi_vector: bool = False  # --multi-vector: token vectors too (core.multivector)
    batch_tokens: int | None = None  # --batch-tokens: a token budget per model call

    @property
    def joined_fields(self) -> tuple:
        """The fields whose text is embedded (joined with a space)."""
        return tuple(self.text_fields or ["text"])


def check_options(request: Request, on_ray: bool = False) -> None:
    chunked = request.chunk_tokens is not None
    if any(not f for f in request.joined_fields):
        raise UsageError("--text-field needs a field name")
    if request.chunk_overlap and not chunked:
        raise UsageError("--chunk-overlap needs --chunk-tokens")
    options.chunking(request.chunk_tokens, request.chunk_overlap, request.context_tokens,
                     request.context_template, request.late_chunking)
    if request.prompt is not None and request.prompt_name is not None:
        raise UsageError("give --prompt or --prompt-name, not both")
    if request.pooling is not None and request.pooling not in options.POOLING_MODES:
        raise UsageError(f"--pooling {request.pooling!r}: use {'|'.join(options.POOLING_MODES)}")
    check_folder_inputs(request, on_ray)
    check_batch_tokens(request)
    if request.multi_vector:
        check_multi_vector(request, on_ray)


def check_batch_tokens(request: Request) -> None:
    """A token budget batches the texts this process tokenizes for one model."""
    from vecpipe.cli.models import parse_devices

    if request.batch_tokens is None:
        return
    for flag, given in (("--late-chunking", request.late_chunking),
                        ("--multi-vector", request.multi_vector),
                        ("several --device values", len(parse_devices(request.device)) > 1)):
        if given:
            raise UsageError(f"--batch-tokens batches texts for one model in this process: "
                             f"leave out {flag} (it batches by --batch-size)")


def check_multi_vector(request: Request, on_ray: bool) -> None:
    """--multi-vector runs the torch transformer of one model on one device."""
    from vecpipe.cli.models import parse_devices

    if on_ray:
        raise UsageError("--multi-vector runs on this machine: leave out --engine ray")
    if len(parse_devices(request.device)) > 1:
        raise UsageError("--multi-vector runs on one device: give one --device")
    if request.backend != "torch":
        raise UsageError(f"--multi-vector needs --backend torch, not {request.backend}")
    if request.layers is not None:
        raise UsageError("--multi-vector keeps the token vectors of every layer: leave out "
                         "--layers")
    for flag, given in (("--late-chunking", request.late_chunking),
                        ("--context-tokens", request.context_tokens is not None)):
        if given:
            raise UsageError(f"--multi-vector keeps each chunk's own token vectors: leave out "
                             f"{flag}")


def check_folder_inputs(request: Request, on_ray: bool) -> None:
    """--glob takes folders (and fits no --input-format); without it a folder is read only by
    the Ray engine (a folder of record files)."""
    from vecpipe.formats.files import check_pattern

    for pattern in request.globs:
        check_pattern(pattern)
    inputs = request.inputs or ["-"]
    if request.globs:
        if "-" in inputs:
            raise UsageError("--glob walks folders: name them instead of stdin")
        if request.input_format != "auto":
            raise UsageError("--glob reads each file as one text record: leave out "
                             "--input-format")
        return
    folder = next((path for path in inputs if path != "-" and os.path.isdir(path)), None)
    if folder is not None and not on_ray:
        raise UsageError(f"{folder} is a folder, and embed reads record files",
                         hint=f"--glob '**/*.md' embeds each matching file in it as one "
                              "record (or --engine ray reads a folder of record files)")


def embed_local(request: Request):
    """Embed into -o, or into this shard's part of -o DIR/ (resumable: a complete part is
    skipped)."""
    from vecpipe.core.embedding import embed_part, embed_task
    from vecpipe.formats.parts import shard_output
    from vecpipe.formats.writers import resolve_output_format

    part = shard_output(request.output, request.shard, request.output_format,
                        hint="or --engine ray, which makes the parts itself")
    if part is None:
        resolve_output_format(request.output, request.output_format)  # fails before any work
    task, devices = local_task(request)
    with flag_hints(request.device):
        if part is None:
            output = request.output
            stats = embed_task(task, output, request.output_format, devices)
        else:
            output, output_format = part  # --shard I/N -o DIR/: DIR/part-0000I-of-0000N.<ext>
            stats = embed_part(task, output, output_format,
                               shard_job(request, request.shard, output_format), devices)
    if stats is not None:
        report(stats, output, stats.max_length)
        report_skipped_files(task.inputs)
    return stats


def local_task(request: Request):
    """(the core Task, the devices) of a run on this machine: one device, or a pool."""
    from vecpipe.cli.models import parse_devices

    devices = parse_devices(request.device)
    many = len(devices) > 1
    if many and ((request.model or "").startswith("fake:") or request.backend != "torch"):
        raise UsageError("several --device values need the torch backend and a real model")
    if many and request.late_chunking:
        raise UsageError("--late-chunking runs the model in this process: give one --device")
    precision = pool_dtype(request.precision, devices) if many else request.precision
    return embed_task_of(request, precision), devices


def embed_task_of(request: Request, precision: str):
    """The core Task of the request: its records, its plan, and its model's loader."""
    from vecpipe.core.embedding import Plan, Task

    load = functools.partial(load_embed_model, request, precision)
    plan = Plan(fields=request.joined_fields, id_field=request.id_field,
                normalize=not request.no_normalize, dim=request.dim,
                batch_size=request.batch_size, batch_tokens=request.batch_tokens,
                chunk_tokens=request.chunk_tokens,
                chunk_overlap=request.chunk_overlap, context_tokens=request.context_tokens,
                context_template=request.context_template,
                late_chunking=request.late_chunking, drop_text=request.drop_text,
                skip_invalid=request.skip_invalid, shard=request.shard, window=request.window,
                multi_vector=request.multi_vector)
    return Task(inputs=task_inputs(request), input_format=request.input_format,
                plan=plan, load=load, prompt=request.prompt, prompt_name=request.prompt_name,
                cache_dir=request.cache, force=request.force)


def load_embed_model(request: Request, precision: str, device: str = "auto"):
    """The model of the request on `device`, loaded when the checks have passed; `auto`
    precision is chosen here, on the machine that runs the model (models.embed_precision)."""
    from vecpipe.cli import console
    from vecpipe.cli.models import embed_precision, load_model, parse_devices

    chosen, backend = embed_precision(precision, device, request.backend, request.model)
    if chosen != precision:
        console.info(f"{chosen} (this CPU multiplies bfloat16 in hardware; --precision "
                     "float32 for float32)")
    needs_st = request.multi_vector or request.late_chunking or \
        len(parse_devices(request.device)) > 1  # token outputs, a pool of devices
    return load_model(request.model, device, dtype=chosen,
                      trust_remote_code=request.trust_remote_code, backend=backend,
                      max_length=request.max_length, export_dir=request.cache,
                      layers=request.layers, pooling=request.pooling, needs_st=needs_st)


def task_inputs(request: Request) -> tuple:
    """The paths (or `-`), or with --glob each folder's matching files (formats.files)."""
    from vecpipe.formats.files import FileTree

    if request.globs:
        return tuple(FileTree(folder, request.globs) for folder in request.inputs)
    return tuple(request.inputs or ["-"])


def pool_dtype(dtype: str, devices: list[str]) -> str:
    if dtype != "auto":
        return dtype
    return "float16" if all(d.startswith("cuda") for d in devices) else "float32"


# The options whose value changes what a part holds (flag -> Request field). Not counted:
# where and how fast the work runs (--device, --batch-size, --window, --cache, --engine,
# --address, --parts), -q, and --trust-remote-code (it allows a model, -m names it).
# --precision counts as given: `auto` is float16 on CUDA, bfloat16 on an AMX CPU and float32
# elsewhere, whichever machine runs it (the vectors agree to cosine 0.9999). Parts recorded
# under the old names (--field, --dtype) are made again.
JOB_OPTIONS = {"--input-format": "input_format", "--text-field": "text_fields",
               "--id-field": "id_field", "--prompt": "prompt", "--prompt-name": "prompt_name",
               "--dim": "dim", "--no-normalize": "no_normalize", "--precision": "precision",
               "--backend": "backend", "--max-length": "max_length",
               "--chunk-tokens": "chunk_tokens", "--chunk-overlap": "chunk_overlap",
               "--skip-invalid": "skip_invalid", "--drop-text": "drop_text", "--force": "force"}
# Counted only when given (not false), so that parts made before these options stay valid.
NEW_JOB_OPTIONS = {"--layers": "layers", "--pooling": "pooling",
                   "--context-tokens": "context_tokens", "--context-template": "context_template",
                   "--late-chunking": "late_chunking", "--multi-vector": "multi_vector"}


def job_options(request: Request, part_format: str) -> dict:
    """The options a part's job counts: those that change the output, the model's identity
    and the part's format."""
    from vecpipe.cli.models import model_identity

    counted = {flag: getattr(request, name) for flag, name in JOB_OPTIONS.items()}
    if request.globs:  # counted only when given: parts made before --glob existed stay valid
        counted["--glob"] = list(request.globs)
    counted.update({flag: getattr(request, name) for flag, name in NEW_JOB_OPTIONS.items()
                    if getattr(request, name) not in (None, False)})
    counted.update({"--model": model_identity(request.model), "--output-format": part_format})
    return counted


def shard_job(request: Request, shard: Shard, part_format: str):
    """The job a part of `embed --shard I/N -o DIR/` is made by: the inputs' contents, the
    model's, the options that change the output and the part's format."""
    from vecpipe.formats.parts import Job

    return Job(list(request.inputs or ["-"]), job_options(request, part_format), shard)


def embed_on_ray(request: Request, engine: str, address: str | None, parts: int | None):
    """--engine ray. -o DIR (or DIR/, or a name without extension): part files in DIR, merged
    later by `merge`. -o FILE: parts in the hidden folder `.FILE.parts/` beside it (kept for a
    resuming rerun), then FILE in input order, then the parts removed."""
    from vecpipe.core import ray_engine

    check_ray_options(request, engine)
    if request.globs:
        raise UsageError("--engine ray reads record files: leave out --glob",
                         hint="embed the folder locally, with --shard I/N for parts")
    if not request.inputs or "-" in request.inputs:
        raise UsageError("--engine ray reads files or folders, not stdin",
                         hint="name the input files or their folder")
    files = ray_engine.input_files(request.inputs)
    if request.output in (None, "-"):
        raise UsageError("--engine ray writes files: give -o FILE or -o DIR/")
    folder, final = ray_engine.part_folder(request.output, request.output_format)
    part_format = "arrow-file" if final or request.output_format == "auto" else \
        request.output_format
    worker_request = replace(request, inputs=files, **absolute_paths(request))
    run = ray_engine.RayRun(
        files=files, folder=folder, final=final, part_format=part_format,
        output_format=request.output_format, parts=parts, address=address,
        device=request.device, task=embed_task_of(worker_request, request.precision),
        job_options=job_options(request, part_format))
    with flag_hints(request.device):
        totals = ray_engine.embed_on_ray(run)
    if totals is not None:
        report(totals, final or folder, None)


def check_ray_options(request: Request, engine: str) -> None:
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown --engine {engine!r}; use local or ray")
    if engine == "local":
        raise UsageError("--address and --parts need --engine ray")
    if request.shard is not None:
        raise UsageError("--engine ray makes its own parts: leave out --shard",
                         hint="--parts N sets how many")
    if "," in request.device:
        raise UsageError("--engine ray gives each worker one device; use --device auto|cpu|cuda")


def absolute_paths(request: Request) -> dict:
    """A model folder and the cache as absolute paths: workers do not share our directory."""
    found = {}
    if request.model and os.path.isdir(request.model):
        found["model"] = os.path.abspath(request.model)
    if request.cache:
        found["cache"] = os.path.abspath(request.cache)
    return found


@contextlib.contextmanager
def flag_hints(device: str):
    """The pipeline's and the Ray engine's errors, told in this command's options."""
    from vecpipe.core import ray_engine
    from vecpipe.core.cache import CacheFileError
    from vecpipe.core.embedding import InvalidRecord, MissingTextField
    from vecpipe.formats.errors import ParameterError

    try:
        yield
    except ParameterError as err:
        raise options.as_option_error(err) from None
    except MissingTextField as err:
        err.hint = "--text-field NAME names the field to embed (repeat it to join several)"
        raise
    except InvalidRecord as err:
        err.hint = "--skip-invalid skips such records and counts them"
        raise
    except CacheFileError as err:
        err.hint = "point --cache at another folder, or delete this file"
        raise
    except ray_engine.RayMissing as err:
        raise DataError("--engine ray needs Ray, which is not installed", hint=err.hint) from None
    except ray_engine.NoFreeGpu as err:
        raise UsageError(f"--device {device}: {err.message}") from None
    except ray_engine.ClusterUnreachable as err:
        err.hint = ("check --address/RAY_ADDRESS (the head's host:port, default port 6379), or "
                    "leave both unset for a local cluster")
        raise
    except ray_engine.PartCountMismatch as err:
        err.hint = "use a new output folder, or the same --parts as before"
        raise


def report(stats, output, max_length) -> None:
    """The summary on stderr, and how many inputs were truncated (never silently)."""
    from vecpipe.cli import console

    console.info(stats.summary(output))
    if stats.truncated:
        window = f"{max_length}-token" if max_length else "token"
        console.warn(f"{stats.truncated} of {stats.embedded} embedded texts were longer than "
                     f"the model's {window} window and were truncated "
                     "(split them with --chunk-tokens)")


def report_skipped_files(inputs) -> None:
    """With --glob: the files of each folder that were not records, counted by reason."""
    from vecpipe.cli import console

    for tree in inputs:
        skipped = getattr(tree, "skipped", None)
        if skipped is not None and skipped.total:
            console.info(f"{tree}: {skipped.total} files skipped: {skipped.summary()}")


# -- --dry-run ---------------------------------------------------------------------------------

def dry_run_plan(request: Request, on_ray: bool) -> dict:
    """What a run would do, after the checks it makes before its slow part: every input opened,
    the first records checked for the text and id fields, the model found (not loaded) and
    checked against --dim, --max-length, --chunk-tokens and --prompt-name, the output's format
    and folder. Reads only the first records; writes nothing."""
    from vecpipe.cli.model_files import offline_model
    from vecpipe.core.embedding import check_first_records, find_id
    from vecpipe.core.space import input_check
    from vecpipe.formats.readers import RecordStream

    if on_ray:
        raise UsageError("--dry-run plans runs on this machine: leave out --engine ray")
    output, output_format = planned_output(request)
    task, devices = local_task(request)
    inputs = [described_input(path, request.input_format) for path in task.inputs]
    plan = task.plan
    stream = RecordStream(list(task.inputs), request.input_format,
                          batch_rows=min(1024, plan.window), check=input_check(request.force),
                          text_fields=plan.fields if plan.skip_invalid else ())
    with flag_hints(request.device):
        plan = replace(plan, id_column=find_id(stream.schema, request.id_field))
        check_first_records(stream, plan)
        model = offline_model(request.model)
        prompt = check_model_plan(request, model, plan)
    if request.cache and os.path.exists(request.cache) and not os.path.isdir(request.cache):
        raise DataError("not a folder, expected the embedding cache's", source=request.cache)
    counts = [item["records"] for item in inputs]
    return {
        "inputs": inputs,
        "records": None if None in counts else sum(counts),
        "text_fields": list(plan.fields),
        "id_field": plan.id_column or "(record numbers)",
        "model": model["name"], "model_source": model["source"],
        "dim": plan.dim or model["dim"], "max_length": request.max_length or model["max_length"],
        "prompt": prompt, "normalize": not request.no_normalize,
        "chunk_tokens": plan.chunk_tokens, "chunk_overlap": plan.chunk_overlap,
        "chunking": None if plan.chunking is None else plan.chunking.describe(),
        "output": output or "stdout", "output_format": output_format,
        "shard": str(request.shard) if request.shard else None, "cache": request.cache,
        "window": plan.window, "batch_size": plan.batch_size,
        "batch_tokens": plan.batch_tokens, "device": ",".join(devices),
        "backend": request.backend, "precision": request.precision,
    }


def planned_output(request: Request) -> tuple[str | None, str]:
    """(output path or None for stdout, its format), checked as a run checks them, and the
    folder it goes to checked for writing (nothing is created)."""
    from vecpipe.formats.parts import shard_output
    from vecpipe.formats.writers import resolve_output_format

    part = shard_output(request.output, request.shard, request.output_format,
                        hint="or --engine ray, which makes the parts itself")
    if part is not None:
        output, output_format = part
    else:
        output = None if request.output in (None, "-") else request.output
        output_format = resolve_output_format(output, request.output_format)
    if output is not None:
        if os.path.isdir(output):
            raise DataError("is a folder, expected a file name", source=output)
        folder = os.path.dirname(os.path.abspath(output))
        if part is None and not os.path.isdir(folder):
            raise DataError("no such folder for the output", source=folder)
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            raise DataError("folder not writable for the output", source=folder)
    return output, output_format


def described_input(path, input_format: str) -> dict:
    """One input opened as a run opens it: its format and, where cheap (a Parquet or Arrow
    file's footer, a folder's file list), its record count."""
    from vecpipe.core.notices import input_records
    from vecpipe.formats.readers import open_input, shown_name, sniff

    if not isinstance(path, str):  # --glob: the files found (some may be skipped when read)
        return {"input": str(path), "format": "files", "records": None,
                "files": len(path.files())}
    if path == "-":
        return {"input": shown_name(path), "format": input_format, "records": None}
    stream, head, compression = open_input(path)
    try:
        found = input_format if input_format != "auto" else sniff(head, path)
    finally:
        stream.close()
    cheap = found in ("parquet", "arrow-file") and not compression
    return {"input": path, "format": (found or "empty") + (f"+{compression}" if compression
                                                            else ""),
            "records": input_records([path], found)() if cheap else (0 if found is None
                                                                     else None)}


def check_model_plan(request: Request, model: dict, plan) -> str:
    """The literal prompt, after the checks the loaded model would make of --dim,
    --max-length, --chunk-tokens and --prompt-name (from its config files)."""
    from vecpipe.core.embedder import Embedder
    from vecpipe.core.embedding import check_fits
    from vecpipe.core.space import role_prompt

    window = model["max_length"]
    longest = model.get("longest_window") if request.backend == "torch" else window
    if request.max_length is not None and longest and request.max_length > longest:
        raise UsageError(f"--max-length {request.max_length} exceeds the model's window of "
                         f"{longest} tokens")
    described = Embedder(name=model["name"], sha=None, dim=model["dim"] or 0,
                         max_length=request.max_length or window, device="cpu",
                         prompts=model["prompts"] or {})
    prompt = role_prompt(described, "doc", request.prompt, request.prompt_name)
    if model["dim"]:  # the room left by special and prompt tokens is known once loaded
        check_fits(replace(plan, prompt=prompt), described)
    return prompt


def print_plan(plan: dict) -> None:
    from vecpipe.cli import console

    if console.plan_is_table():
        plan = dict(plan, inputs=[shown_input(item) for item in plan["inputs"]])
    console.print_plan("embed --dry-run: the checks passed; this run would", plan)


def shown_input(item: dict) -> str:
    records = "" if item["records"] is None else f", {item['records']:,} records"
    if "files" in item:
        records = f", {item['files']:,} matching files"
    return f"{item['input']} ({item['format']}{records})"
