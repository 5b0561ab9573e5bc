"""Embed text records with a sentence-transformers model: streaming, cached, shardable."""
import threading
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

DEFAULT_WINDOW = 4096
INTERRUPTED: list = []  # the exceptions Ctrl-C/SIGTERM raised while embedding
ID_HELP = "Field holding record ids (default: id, else _id, else the record number)."


def run(inputs: options.Inputs = None,
        output: options.Output = None,
        output_format: options.OutputFormat = "auto",
        input_format: options.InputFormat = "auto",
        model: options.Model = None,
        fields: Annotated[Optional[List[str]], typer.Option(
            "--field", help="Field holding the text (default: text). Repeat to join several "
                            "with a space, in order; empty parts are skipped.",
            metavar="FIELD", show_default=False)] = None,
        id_field: Annotated[Optional[str], typer.Option(
            "--id-field", help=ID_HELP, metavar="FIELD")] = None,
        prompt: Annotated[Optional[str], typer.Option(
            "--prompt", help="Text put before every input, e.g. 'query: ' (in metadata).",
            metavar="TEXT")] = None,
        prompt_name: Annotated[Optional[str], typer.Option(
            "--prompt-name", help="One of the model's own prompts, e.g. query.",
            metavar="NAME")] = None,
        dim: Annotated[Optional[int], typer.Option(
            "--dim", min=1, help="Keep the first N dimensions (Matryoshka), re-normalized "
                                 "unless --no-normalize.", metavar="N")] = None,
        no_normalize: Annotated[bool, typer.Option(
            "--no-normalize", help="Do not L2-normalize (a model that normalizes itself "
                                   "still does).")] = False,
        batch_size: options.BatchSize = 32,
        device: Annotated[str, typer.Option(
            "--device", help="auto|cpu|cuda|cuda:N|mps, or several comma-separated "
                             "(cuda:0,cuda:1): one worker process per device.")] = "auto",
        dtype: Annotated[str, typer.Option(
            "--dtype", help="auto|float32|float16|bfloat16 model precision (auto: float16 on "
                            "CUDA, float32 elsewhere; openvino takes float32 or bfloat16); output vectors "
                            "are float32, and a precision other than float32 is recorded in "
                            "the metadata.")] = "auto",
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
        cache: Annotated[Optional[str], typer.Option(
            "--cache", help="Content-addressed vector cache: reruns embed only new or changed "
                            "texts.", metavar="DIR")] = None,
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
        quiet: options.Quiet = False):
    """Embed the text of every record. Output keeps every input field (text unless
    --drop-text) and adds `id` and `embedding` (float32), with the model, prompt, dim and
    normalization in the schema metadata. Records are buffered in windows, encoded sorted by
    length, and written in input order; reading overlaps encoding. A summary (records, cache
    hits, truncated inputs, skipped records) goes to stderr.

    \b
    Example:
      vecpipe embed corpus.jsonl --field title --field text -o corpus.arrow
      vecpipe embed queries.jsonl --prompt 'query: ' --dim 128 --cache ~/.cache/vp | vecpipe info
      vecpipe embed docs.parquet --chunk-tokens 200 --chunk-overlap 50 --shard 0/4 -o p0.arrow
      vecpipe embed corpus.jsonl --shard auto -o parts/      # parts/part-0000I-of-0000N.arrow
      vecpipe embed --engine ray corpus/ -o corpus.arrow
    """
    given = dict(locals())  # the options as given: the Ray engine hands them to its workers
    from vecpipe.cli import console
    from vecpipe.formats.parts import PartClaim, shard_output
    from vecpipe.formats.shards import parse_shard
    from vecpipe.formats.writers import resolve_output_format

    plan = Plan(fields=list(fields or ["text"]), id_field=id_field, normalize=not no_normalize,
                dim=dim, batch_size=batch_size, chunk_tokens=chunk_tokens,
                chunk_overlap=chunk_overlap, drop_text=drop_text, skip_invalid=skip_invalid,
                shard=parse_shard(shard), window=window)
    plan.check_options()
    if engine != "local" or address or parts:
        from vecpipe.commands.embed_ray import embed_on_ray
        return embed_on_ray(given, engine, address, parts)
    part = shard_output(output, plan.shard, output_format,
                        hint="or --engine ray, which makes the parts itself")
    if part is None:
        resolve_output_format(output, output_format)  # a bad -o or format fails before any work
        return embed_run(given, plan, output, output_format)
    output, output_format = part  # --shard I/N -o DIR/: DIR/part-0000I-of-0000N.<ext>, resumable
    with PartClaim(output, shard_job(given, output_format, plan.shard)) as claim:
        if claim.rows is not None:
            console.info(f"{output} is already complete: skipped")
            return None
        for note in claim.notes():
            console.info(note)
        return embed_run(given, plan, output, output_format, claim)


def embed_run(options: dict, plan, output, output_format, claim=None):
    """Load the model, embed the input into `output`, mark the part (`claim`), report."""
    import signal

    from vecpipe.cli.models import load_model, parse_devices
    from vecpipe.formats.readers import RecordStream

    devices = parse_devices(options["device"])
    stream = RecordStream(options["inputs"], options["input_format"],
                          batch_rows=min(1024, plan.window), force=options["force"],
                          text_fields=tuple(plan.fields) if plan.skip_invalid else ())
    input_schema = stream.schema
    plan.id_column = find_id(input_schema, plan.id_field)
    many = len(devices) > 1
    dtype = options["dtype"]
    loaded = load_model(options["model"], device="cpu" if many else devices[0],
                        dtype=pool_dtype(dtype, devices) if many else dtype,
                        trust_remote_code=options["trust_remote_code"],
                        backend=options["backend"], max_length=options["max_length"],
                        export_dir=options["cache"])
    plan.prompt = loaded.prompt_text(options["prompt"], options["prompt_name"])
    plan.check_model(loaded)
    previous = _interrupts_as_exceptions(signal)
    try:
        stats = embed_stream(stream, input_schema, loaded, plan, output, output_format,
                             cache_dir=options["cache"], devices=devices if many else None)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if claim is not None:
        claim.finish(stats.rows)
    report(stats, output, loaded.max_length)
    return stats


# The options whose value changes what a part holds (flag -> run() parameter). Not counted:
# where and how fast the work runs (--device, --batch-size, --window, --cache, --engine,
# --address, --parts), -q, and --trust-remote-code (it allows a model, -m names it). --dtype
# counts as given: `auto` is float16 on CUDA and float32 elsewhere, whichever machine runs it.
JOB_OPTIONS = {"--input-format": "input_format", "--field": "fields", "--id-field": "id_field",
               "--prompt": "prompt", "--prompt-name": "prompt_name", "--dim": "dim",
               "--no-normalize": "no_normalize", "--dtype": "dtype", "--backend": "backend",
               "--max-length": "max_length", "--chunk-tokens": "chunk_tokens",
               "--chunk-overlap": "chunk_overlap", "--skip-invalid": "skip_invalid",
               "--drop-text": "drop_text", "--force": "force"}


def shard_job(options: dict, part_format: str, shard):
    """The job a part of `embed --shard I/N -o DIR/` is made by: the inputs' contents, the
    model's, the options that change the output and the part's format."""
    from vecpipe.formats.parts import Job

    counted = {flag: options[name] for flag, name in JOB_OPTIONS.items()}
    from vecpipe.cli.models import model_identity

    counted.update({"--model": model_identity(options["model"]),
                    "--output-format": part_format})
    return Job(list(options["inputs"] or ["-"]), counted, shard)


def report(stats, output, max_length) -> None:
    """The summary on stderr, and how many inputs were truncated (never silently)."""
    from vecpipe.cli import console

    console.info(stats.summary(output))
    if stats.truncated:
        window = f"{max_length}-token" if max_length else "token"
        console.warn(f"{stats.truncated} of {stats.embedded} embedded texts were longer than "
                     f"the model's {window} window and were truncated "
                     "(split them with --chunk-tokens)")


def _interrupts_as_exceptions(signal) -> dict:
    """Ctrl-C and SIGTERM (a killed job) raise KeyboardInterrupt and Terminated, so the run
    unwinds and no partial -o file is left behind. Each is also remembered in INTERRUPTED:
    Python drops an exception raised inside a finalizer ("Exception ignored in ..."), and the
    run would go on, so the encoding loop checks it at every batch. Returns the handlers to
    put back."""
    from vecpipe.formats.errors import Terminated

    INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(raised):
        def interrupt(signum, frame):
            INTERRUPTED.append(raised)
            raise raised()
        return interrupt

    return {number: signal.signal(number, handler(raised))
            for number, raised in ((signal.SIGINT, KeyboardInterrupt),
                                   (signal.SIGTERM, Terminated))}


def pool_dtype(dtype: str, devices: list[str]) -> str:
    if dtype != "auto":
        return dtype
    return "float16" if all(d.startswith("cuda") for d in devices) else "float32"


def find_id(schema, id_field):
    from vecpipe.formats import schema as names

    if schema is None:
        if id_field:
            from vecpipe.formats.errors import DataError
            raise DataError(f"no field {id_field!r} (the input is empty)")
        return None
    return names.find_id_column(schema, id_field)


# -- options ----------------------------------------------------------------------------------

class Plan:
    """What to embed and how: the options, checked, plus facts learned from the input/model."""

    def __init__(self, fields, id_field=None, normalize=True, dim=None, batch_size=32,
                 chunk_tokens=None, chunk_overlap=0, drop_text=False, skip_invalid=False,
                 shard=None, window=DEFAULT_WINDOW, prompt=""):
        self.fields = fields
        self.id_field = id_field
        self.id_column = None
        self.normalize = normalize
        self.dim = dim
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        self.drop_text = drop_text
        self.skip_invalid = skip_invalid
        self.shard = shard
        self.window = window
        self.prompt = prompt

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens is not None

    def check_options(self) -> None:
        from vecpipe.formats.errors import UsageError

        if any(not f for f in self.fields):
            raise UsageError("--field needs a field name")
        if self.chunk_overlap and not self.chunked:
            raise UsageError("--chunk-overlap needs --chunk-tokens")
        if self.chunked and self.chunk_overlap >= self.chunk_tokens:
            raise UsageError(f"--chunk-overlap {self.chunk_overlap} must be smaller than "
                             f"--chunk-tokens {self.chunk_tokens}")

    def check_model(self, model) -> None:
        from vecpipe.formats.errors import UsageError

        if self.dim is not None and self.dim > model.dim:
            raise UsageError(f"--dim {self.dim} exceeds the model's {model.dim} dimensions")
        if self.chunked and model.max_length:
            room = model.max_length - model.special_tokens() - model.prompt_tokens(self.prompt)
            if self.chunk_tokens > room:
                raise UsageError(f"--chunk-tokens {self.chunk_tokens} does not fit the model's "
                                 f"{model.max_length}-token window (room for {room} after "
                                 "special and prompt tokens)")

    def out_dim(self, model) -> int:
        return self.dim or model.dim

    def normalized(self, model) -> bool:
        """Whether output vectors are unit length (metadata `normalized`)."""
        return self.normalize or (model.normalizes and self.dim is None)

    def cache_settings(self, model) -> dict:
        return model.vector_settings(self.prompt, self.dim, self.normalize)


# -- the stream -------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.records = 0        # records of this shard that were read
        self.rows = 0           # output rows (chunks when chunking)
        self.invalid = 0
        self.first_invalid = None
        self.embedded = 0
        self.from_cache = 0
        self.duplicates = 0     # repeated texts in a window, embedded once
        self.truncated = 0

    def summary(self, output) -> str:
        parts = [f"{self.records} records -> {output or 'stdout'}: {self.rows} vectors",
                 f"{self.embedded} embedded", f"{self.from_cache} from cache"]
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated texts reused")
        if self.invalid:
            parts.append(f"{self.invalid} invalid records skipped (first: {self.first_invalid})")
        return ", ".join(parts)


def embed_stream(stream, input_schema, model, plan, output=None, output_format="auto",
                 cache_dir=None, devices=None) -> Stats:
    """Read `stream`, embed, write to `output`: the whole command minus option parsing."""
    import contextlib

    from vecpipe.cli import console
    from vecpipe.formats import schema as names
    from vecpipe.formats.writers import RecordWriter

    stats = Stats()
    out_schema = output_schema(input_schema, plan, plan.out_dim(model))
    meta = {key: None for key in names.META_KEYS}
    meta.update(model.metadata(plan.prompt, plan.normalized(model), plan.out_dim(model)))
    with contextlib.ExitStack() as stack:
        cache = None
        if cache_dir:
            from vecpipe.core.cache import EmbeddingCache, cache_space

            settings = plan.cache_settings(model)
            cache = stack.enter_context(EmbeddingCache(cache_dir, cache_space(settings),
                                                       plan.out_dim(model), settings))
        pool = None
        if devices:
            pool = model.start_pool(devices)
            stack.callback(model.stop_pool, pool)
        sink = stack.enter_context(LazyWriter(lambda: RecordWriter(
            output, output_format, schema=out_schema, metadata=meta)))
        bar = stack.enter_context(console.progress(desc="embed", unit="rec"))
        encoder = Encoder(model, plan, stats, cache, pool)
        parts = selected_parts(stream, input_schema, model, plan, stats)
        windows = stack.enter_context(contextlib.closing(encoder.run(parts)))
        for window, vectors in windows:
            for part, part_vectors in window.split(vectors):
                sink.write(output_batch(part, part_vectors, out_schema, plan))
                stats.rows += len(part.texts)
            bar.update(window.records)
        sink.ensure_started()
    return stats


class LazyWriter:
    """A RecordWriter made at the first write, so an error in the first window leaves stdout
    untouched; made empty at the end when nothing was written."""

    def __init__(self, make):
        self.make = make
        self.writer = None

    def ensure_started(self):
        if self.writer is None:
            self.writer = self.make()
        return self.writer

    def write(self, batch) -> None:
        self.ensure_started().write(batch)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)


# -- records -> parts (texts to embed) -------------------------------------------------------

class Part:
    """Kept input rows of one source batch and what to embed for each output row."""

    def __init__(self, batch, ids, texts, chunks=None, records=None):
        self.records = len(texts) if records is None else records  # input records it holds
        self.batch = batch      # input rows, one per output row (repeated when chunking)
        self.ids = ids          # output ids
        self.texts = texts      # text embedded for each output row
        self.chunks = chunks    # (parent_ids, numbers, char_starts, char_ends) when chunking


def selected_parts(stream, input_schema, model, plan, stats):
    """Parts from the stream: this shard's valid records (chunked when asked)."""
    from vecpipe.formats.readers import fit_batch

    next_record = 1  # across all inputs: record-number ids stay unique
    for item in stream:
        batch = fit_batch(item, input_schema)
        part = select_records(batch, item.source, item.first_record, next_record, plan, stats)
        next_record += batch.num_rows
        if part is None:
            continue
        if plan.chunked:
            part = chunk_part(part, model, plan)
        yield part


def select_records(batch, source, first_record, next_record, plan, stats):
    """The Part of `batch` this run embeds, or None: shard filter, then validation."""
    import numpy as np

    from vecpipe.formats.errors import DataError
    from vecpipe.formats.shards import shard_mask

    texts, text_problems = batch_texts(batch, plan.fields)
    ids, id_problems = batch_ids(batch, plan.id_column, next_record)
    keep = np.ones(batch.num_rows, dtype=bool) if plan.shard is None else \
        shard_mask(ids, plan.shard)
    for row in np.flatnonzero(keep):
        problem = text_problems[row] or id_problems[row]
        if problem is None:
            continue
        where = f"{source}:{first_record + row}"
        if not plan.skip_invalid:
            raise DataError(problem, source=source, record=int(first_record + row),
                            hint="--skip-invalid skips such records and counts them")
        stats.invalid += 1
        stats.first_invalid = stats.first_invalid or f"{where}: {problem}"
        keep[row] = False
    stats.records += int(keep.sum())
    rows = np.flatnonzero(keep)
    if not len(rows):
        return None
    kept = batch if len(rows) == batch.num_rows else batch.take(rows)
    return Part(kept, [ids[r] for r in rows], [texts[r] for r in rows])


def batch_texts(batch, fields):
    """(texts, problems): the joined text of every row, or None and why it is invalid."""
    import pyarrow as pa

    columns = []
    for name in fields:
        index = batch.schema.get_field_index(name)
        if index < 0:
            return [None] * batch.num_rows, [f"missing field {name!r}"] * batch.num_rows
        column = batch.column(index)
        kind = column.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind) or str(kind) == "string_view"):
            return [None] * batch.num_rows, [f"field {name!r} holds {kind}, not text"] * \
                batch.num_rows
        columns.append(column.to_pylist())
    label = " + ".join(repr(f) for f in fields)
    texts, problems = [], []
    for values in zip(*columns):
        present = [v for v in values if v]
        if all(v is None for v in values):
            texts.append(None)
            problems.append(f"no text in field {label} (missing, null or not a string)")
            continue
        text = " ".join(present)
        if not text.strip():
            texts.append(None)
            problems.append(f"empty text in field {label}")
            continue
        texts.append(text)
        problems.append(None)
    return texts, problems


def batch_ids(batch, id_column, next_record):
    """(ids, problems): string ids (record numbers when there is no id field)."""
    import pyarrow as pa

    if id_column is None:
        return [str(next_record + row) for row in range(batch.num_rows)], \
            [None] * batch.num_rows
    column = batch.column(id_column)
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    values = column.to_pylist()
    problems = [None if v is not None else f"null id in field {id_column!r}" for v in values]
    ids = [v if v is not None else str(next_record + row) for row, v in enumerate(values)]
    return ids, problems


def chunk_windows(spans, text_length: int, size: int, overlap: int):
    """Character (start, end) of each window of `size` tokens, `overlap` tokens shared.

    `spans` holds each token's character (start, end); a text without tokens is one chunk.
    """
    if not spans:
        return [(0, text_length)]
    windows, start = [], 0
    while True:
        end = min(start + size, len(spans))
        windows.append((spans[start][0], spans[end - 1][1]))
        if end == len(spans):
            return windows
        start += size - overlap


def chunk_part(part, model, plan) -> Part:
    """One row per chunk: the chunk's text, its parent id, number and character offsets."""
    rows, ids, texts, parents, numbers, starts, ends = [], [], [], [], [], [], []
    for row, (text, spans) in enumerate(zip(part.texts, model.token_spans(part.texts))):
        for number, (start, end) in enumerate(
                chunk_windows(spans, len(text), plan.chunk_tokens, plan.chunk_overlap)):
            rows.append(row)
            ids.append(f"{part.ids[row]}#{number}")
            texts.append(text[start:end])
            parents.append(part.ids[row])
            numbers.append(number)
            starts.append(start)
            ends.append(end)
    return Part(part.batch.take(rows), ids, texts, (parents, numbers, starts, ends),
                records=part.records)


# -- parts -> vectors -------------------------------------------------------------------------

class Window:
    """Consecutive parts encoded together: unique texts, sorted by length, in batches."""

    def __init__(self, parts):
        import numpy as np

        self.parts = parts
        self.records = sum(p.records for p in parts)
        slot_of_text: dict[str, int] = {}
        self.slots = np.fromiter((slot_of_text.setdefault(t, len(slot_of_text))
                                  for p in parts for t in p.texts), dtype=np.int64)
        self.unique = list(slot_of_text)
        self.todo = np.arange(len(self.unique))  # slots still to embed (cache misses)

    def split(self, vectors):
        """(part, its rows' vectors) in input order; `vectors` is per unique text."""
        start = 0
        for part in self.parts:
            stop = start + len(part.texts)
            yield part, vectors[self.slots[start:stop]]
            start = stop


class Encoder:
    """Windows of parts -> vectors. A thread reads, validates, looks up the cache and tokenizes
    ahead (length-sorted batches); the calling thread runs the model."""

    def __init__(self, model, plan, stats, cache=None, pool=None):
        self.model = model
        self.plan = plan
        self.stats = stats
        self.cache = cache
        self.pool = pool
        self.dim = plan.out_dim(model)

    def run(self, parts):
        """Yield (window, vectors per unique text) in input order."""
        items = background(self._prepared(parts), depth=8)
        try:
            yield from self._vectors(items)
        finally:
            items.close()  # the reader thread stops before an interrupt ends the process

    def _vectors(self, items):
        import numpy as np

        vectors = None
        for kind, window, payload in items:
            if INTERRUPTED:  # a signal whose exception Python dropped
                raise INTERRUPTED[0]()
            if kind == "start":
                vectors = np.empty((len(window.unique), self.dim), dtype=np.float32)
                if payload is not None:  # cache hits: (slots, their vectors)
                    vectors[payload[0]] = payload[1]
                if self.pool is not None and len(window.todo):
                    vectors[window.todo] = self._encode_pool(window)
            elif kind == "batch":
                if self.pool is None:
                    rows, features = payload
                    vectors[rows] = self.model.embed_features(features, self.plan.normalize,
                                                              self.plan.dim)
            else:
                if self.cache is not None and len(window.todo):
                    self.cache.store([window.unique[i] for i in window.todo],
                                     vectors[window.todo])
                yield window, vectors

    def _encode_pool(self, window):
        texts = [window.unique[i] for i in window.todo]
        return self.model.encode_pool(self.pool, texts, self.plan.batch_size, self.plan.prompt,
                                      self.plan.normalize, self.plan.dim)

    def _prepared(self, parts):
        """Runs in the reading thread: ("start", window, cache hits), then ("batch",
        window, (slots, features)) for each length-sorted batch, then ("end", window, None)."""
        for window in self._windows(parts):
            hit_slots = self._look_up(window)
            yield "start", window, hit_slots
            order = sorted(window.todo.tolist(), key=lambda s: -len(window.unique[s]))
            for start in range(0, len(order), self.plan.batch_size):
                slots = order[start:start + self.plan.batch_size]
                texts = [window.unique[s] for s in slots]
                features = self.model.tokenize(texts, self.plan.prompt)
                self.stats.truncated += self.model.count_truncated(texts, features,
                                                                   self.plan.prompt)
                yield "batch", window, (slots, None if self.pool is not None else features)
            yield "end", window, None

    def _windows(self, parts):
        pending, size = [], 0
        for part in parts:
            pending.append(part)
            size += len(part.texts)
            if size >= self.plan.window:
                yield Window(pending)
                pending, size = [], 0
        if pending:
            yield Window(pending)

    def _look_up(self, window):
        """Leave the cache misses in window.todo; return the hits as (slots, vectors)."""
        import numpy as np

        self.stats.duplicates += len(window.slots) - len(window.unique)
        if self.cache is None:
            self.stats.embedded += len(window.unique)
            return None
        cached, hits = self.cache.lookup(window.unique)
        window.todo = np.flatnonzero(~hits)
        self.stats.from_cache += int(hits.sum())
        self.stats.embedded += len(window.todo)
        return np.flatnonzero(hits), cached[hits]


READER_JOIN_SECONDS = 5.0


def background(iterable, depth: int = 8):
    """Iterate `iterable` in a daemon thread, at most `depth` items ahead; its exceptions are
    raised here. Leaving the loop early (close(), an exception) stops the thread at its next
    item and waits for it: a thread still inside torch or the tokenizer when the interpreter
    exits aborts the process ("terminate called without an active exception", exit 134 on
    Ctrl-C). A thread blocked reading a stalled stdin is waited for only a few seconds."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            put((False, err))

    thread = threading.Thread(target=produce, name="vecpipe-reader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                ok, item = items.get(timeout=0.2)
            except queue.Empty:
                continue
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=READER_JOIN_SECONDS)


# -- vectors -> output ------------------------------------------------------------------------

CHUNK_FIELDS = ("parent_id", "chunk", "char_start", "char_end")


def output_schema(input_schema, plan, dim: int):
    """Input fields (text dropped or replaced by the chunk text), `id`, chunk fields,
    `embedding`."""
    import pyarrow as pa

    from vecpipe.formats import schema as names

    input_fields = list(input_schema) if input_schema is not None else []
    fields = []
    for field in input_fields:
        if field.name == names.EMBEDDING or (plan.chunked and field.name in CHUNK_FIELDS):
            continue
        if field.name == names.TEXT and plan.drop_text:
            continue
        if field.name == names.TEXT and plan.chunked:
            field = pa.field(names.TEXT, pa.string())
        if field.name == names.ID:
            field = pa.field(names.ID, pa.string())
        fields.append(field)
    if names.ID not in [f.name for f in fields]:
        fields.insert(0, pa.field(names.ID, pa.string()))
    if plan.chunked:
        fields += [pa.field(names.PARENT_ID, pa.string()), pa.field(names.CHUNK, pa.int32()),
                   pa.field(names.CHAR_START, pa.int64()), pa.field(names.CHAR_END, pa.int64())]
        if not plan.drop_text and names.TEXT not in [f.name for f in fields]:
            fields.append(pa.field(names.TEXT, pa.string()))
    fields.append(pa.field(names.EMBEDDING, pa.list_(pa.float32(), dim)))
    metadata = input_schema.metadata if input_schema is not None else None
    return pa.schema(fields, metadata=metadata)


def output_batch(part, vectors, schema, plan):
    """The output RecordBatch of one part."""
    import pyarrow as pa

    from vecpipe.formats import schema as names

    made = {names.ID: lambda: pa.array(part.ids, pa.string()),
            names.EMBEDDING: lambda: names.numpy_to_vectors(vectors)}
    if plan.chunked:
        parents, numbers, starts, ends = part.chunks
        made.update({names.PARENT_ID: lambda: pa.array(parents, pa.string()),
                     names.CHUNK: lambda: pa.array(numbers, pa.int32()),
                     names.CHAR_START: lambda: pa.array(starts, pa.int64()),
                     names.CHAR_END: lambda: pa.array(ends, pa.int64()),
                     names.TEXT: lambda: pa.array(part.texts, pa.string())})
    columns = [made[field.name]() if field.name in made else part.batch.column(field.name)
               for field in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
