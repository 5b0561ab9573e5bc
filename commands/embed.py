"""Embed text records with a sentence-transformers model: streaming, cached, shardable."""
import contextlib
import functools
import os
from dataclasses import dataclass, replace
from typing import Annotated, Optional

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
        no_normalize: Annotated[bool, typer.Option(
            "--no-normalize", help="Do not L2-normalize (a model that normalizes itself "
                                   "still does).")] = False,
        batch_size: options.BatchSize = 32,
        device: options.Device = "auto",
        precision: options.Precision = "auto",
        old_dtype: options.alias(Optional[str], "--dtype", "--precision", "precision",
                                 lambda value: {"precision": options.precision(value)}) = None,
        backend: Annotated[str, typer.Option(
            "--backend", help="torch|onnx|onnx-int8|openvino. ONNX exports are made once and "
                              "kept beside the weights.")] = "torch",
        max_length: Annotated[Optional[int], typer.Option(
            "--max-length", min=1, help="Token window, at most the model's (longer inputs "
                                        "are truncated and counted).", metavar="N")] = None,
        chunk_tokens: Annotated[Optional[int], typer.Option(
            "--chunk-tokens", min=1, help="Split texts into windows of N tokens (one row per "
                                          "chunk, with parent_id, chunk, char_start, char_end).",
            metavar="N")] = None,
        chunk_overlap: Annotated[int, typer.Option(
            "--chunk-overlap", min=0, help="Tokens shared by consecutive chunks.",
            metavar="N")] = 0,
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
            "--window", min=1, help="Records buffered and encoded length-sorted at a time "
                                    "(memory stays bounded by it).", metavar="N")] = DEFAULT_WINDOW,
        trust_remote_code: options.TrustRemoteCode = False,
        force: options.Force = False,
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
    """
    request = Request(inputs=inputs, output=output, output_format=output_format,
                      input_format=input_format, model=model, text_fields=text_fields,
                      id_field=id_field, prompt=prompt, prompt_name=prompt_name, dim=dim,
                      no_normalize=no_normalize, batch_size=batch_size, device=device,
                      precision=precision, backend=backend,
                      max_length=max_length, chunk_tokens=chunk_tokens,
                      chunk_overlap=chunk_overlap, cache=cache, shard=parse_shard(shard),
                      skip_invalid=skip_invalid, drop_text=drop_text, window=window,
                      trust_remote_code=trust_remote_code, force=force)
    check_options(request)
    options.show_progress(progress)
    if engine != "local" or address or parts:
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

    @property
    def joined_fields(self) -> tuple:
        """The fields whose text is embedded (joined with a space)."""
        return tuple(self.text_fields or ["text"])


def check_options(request: Request) -> None:
    chunked = request.chunk_tokens is not None
    if any(not f for f in request.joined_fields):
        raise UsageError("--text-field needs a field name")
    if request.chunk_overlap and not chunked:
        raise UsageError("--chunk-overlap needs --chunk-tokens")
    if chunked and request.chunk_overlap >= request.chunk_tokens:
        raise UsageError(f"--chunk-overlap {request.chunk_overlap} must be smaller than "
                         f"--chunk-tokens {request.chunk_tokens}")
    if request.prompt is not None and request.prompt_name is not None:
        raise UsageError("give --prompt or --prompt-name, not both")


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
    return stats


def local_task(request: Request):
    """(the core Task, the devices) of a run on this machine: one device, or a pool."""
    from vecpipe.cli.models import parse_devices

    devices = parse_devices(request.device)
    many = len(devices) > 1
    if many and ((request.model or "").startswith("fake:") or request.backend != "torch"):
        raise UsageError("several --device values need the torch backend and a real model")
    precision = pool_dtype(request.precision, devices) if many else request.precision
    return embed_task_of(request, precision), devices


def embed_task_of(request: Request, precision: str):
    """The core Task of the request: its records, its plan, and its model's loader."""
    from vecpipe.cli.models import load_model
    from vecpipe.core.embedding import Plan, Task

    load = functools.partial(load_model, request.model, dtype=precision,
                             trust_remote_code=request.trust_remote_code,
                             backend=request.backend, max_length=request.max_length,
                             export_dir=request.cache)
    plan = Plan(fields=request.joined_fields, id_field=request.id_field,
                normalize=not request.no_normalize, dim=request.dim,
                batch_size=request.batch_size, chunk_tokens=request.chunk_tokens,
                chunk_overlap=request.chunk_overlap, drop_text=request.drop_text,
                skip_invalid=request.skip_invalid, shard=request.shard, window=request.window)
    return Task(inputs=tuple(request.inputs or ["-"]), input_format=request.input_format,
                plan=plan, load=load, prompt=request.prompt, prompt_name=request.prompt_name,
                cache_dir=request.cache, force=request.force)


def pool_dtype(dtype: str, devices: list[str]) -> str:
    if dtype != "auto":
        return dtype
    return "float16" if all(d.startswith("cuda") for d in devices) else "float32"


# The options whose value changes what a part holds (flag -> Request field). Not counted:
# where and how fast the work runs (--device, --batch-size, --window, --cache, --engine,
# --address, --parts), -q, and --trust-remote-code (it allows a model, -m names it).
# --precision counts as given: `auto` is float16 on CUDA and float32 elsewhere, whichever
# machine runs it. Parts recorded under the old names (--field, --dtype) are made again.
JOB_OPTIONS = {"--input-format": "input_format", "--text-field": "text_fields",
               "--id-field": "id_field", "--prompt": "prompt", "--prompt-name": "prompt_name",
               "--dim": "dim", "--no-normalize": "no_normalize", "--precision": "precision",
               "--backend": "backend", "--max-length": "max_length",
               "--chunk-tokens": "chunk_tokens", "--chunk-overlap": "chunk_overlap",
               "--skip-invalid": "skip_invalid", "--drop-text": "drop_text", "--force": "force"}


def job_options(request: Request, part_format: str) -> dict:
    """The options a part's job counts: those that change the output, the model's identity
    and the part's format."""
    from vecpipe.cli.models import model_identity

    counted = {flag: getattr(request, name) for flag, name in JOB_OPTIONS.items()}
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
    from vecpipe.core.embedding import InvalidRecord
    from vecpipe.formats.errors import ParameterError

    try:
        yield
    except ParameterError as err:  # its message starts with the parameter's name
        option = "--" + err.parameter.replace("_", "-")
        raise UsageError(option + err.message.removeprefix(err.parameter)) from None
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
