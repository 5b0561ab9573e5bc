"""The embed pipeline: records -> texts (validated, sharded, chunked) -> vectors (cached,
length-sorted batches, reading overlapped with encoding) -> output batches in input order.

`embed_task(task, output)` is one whole run (read, load the model, embed, write) and
`embed_part(task, path, format, job)` one part of a sharded job (claimed, resumable); the CLI's
`embed` and the Ray engine's workers both come here. numpy and pyarrow are imported inside
functions.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Callable

from vecpipe.core import notices
from vecpipe.formats.errors import DataError
from vecpipe.formats.shards import Shard

DEFAULT_WINDOW = 4096  # the largest window: the memory bound, and the best length sorting
FIRST_WINDOW = 64      # the first window (at least one model batch): the first output is soon
WINDOW_GROWTH = 4      # each window this many times the last, up to the largest
INTERRUPTED: list = []  # the exceptions Ctrl-C/SIGTERM raised while embedding


class InvalidRecord(DataError):
    """A record without usable text or id (the caller may say how to skip such records)."""


@dataclass(frozen=True)
class Plan:
    """What to embed and how, with what was learned from the input (its id column) and the
    model (the literal prompt). Built once, then only read."""

    fields: tuple = ("text",)
    id_field: str | None = None
    id_column: str | None = None
    normalize: bool = True
    dim: int | None = None
    batch_size: int = 32
    batch_tokens: int | None = None  # a token budget per model call instead of batch_size texts
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    context_tokens: int | None = None  # situated chunks: the context around each chunk
    context_template: str | None = None
    late_chunking: bool = False
    drop_text: bool = False
    skip_invalid: bool = False
    shard: Shard | None = None
    window: int = DEFAULT_WINDOW  # the largest window (records, or chunks when chunking)
    prompt: str = ""
    multi_vector: bool = False  # also each text's token vectors (core.multivector)

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens is not None

    @property
    def chunking(self):
        """The core.chunking.Chunking of the plan (None without chunks)."""
        if not self.chunked:
            return None
        from vecpipe.core.chunking import DEFAULT_TEMPLATE, Chunking

        return Chunking(self.chunk_tokens, self.chunk_overlap, self.context_tokens,
                        self.context_template or DEFAULT_TEMPLATE, self.late_chunking)

    def out_dim(self, model) -> int:
        return self.dim or model.dim

    def normalized(self, model) -> bool:
        """Whether output vectors are unit length (metadata `normalized`)."""
        return self.normalize or (model.normalizes and self.dim is None)

    def cache_settings(self, model) -> dict:
        settings = model.vector_settings(self.prompt, self.dim, self.normalize)
        if self.late_chunking:  # a late chunk's vector is its document's, pooled on a span
            settings["late_chunking"] = model.max_length
        return settings

    def chunk_room(self, model) -> int | None:
        """Tokens a chunk may hold in the model's window (None: no window)."""
        if not model.max_length:
            return None
        return model.max_length - model.special_tokens() - model.prompt_tokens(self.prompt)


@dataclass
class Stats:
    records: int = 0        # records of this shard that were read
    rows: int = 0           # output rows (chunks when chunking)
    invalid: int = 0
    first_invalid: str | None = None
    embedded: int = 0
    from_cache: int = 0
    duplicates: int = 0     # repeated texts in a window, embedded once
    truncated: int = 0
    max_length: int | None = None  # the model's token window (what `truncated` counts against)

    def add(self, other: dict) -> None:
        """Add another part's stats (as `vars(stats)`): counts sum, the rest keeps the first."""
        for name, value in other.items():
            if name in ("first_invalid", "max_length"):
                setattr(self, name, getattr(self, name) or value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def summary(self, output) -> str:
        parts = [f"{self.records:,} records -> {output or 'stdout'}: {self.rows:,} vectors",
                 f"{self.embedded:,} embedded", f"{self.from_cache:,} from cache"]
        if self.duplicates:
            parts.append(f"{self.duplicates:,} repeated texts reused")
        if self.invalid:
            parts.append(f"{self.invalid:,} invalid records skipped (first: "
                         f"{self.first_invalid})")
        return ", ".join(parts)


@dataclass(frozen=True)
class Task:
    """One embed run before it starts: the records (files, `-` for stdin), the plan (its id
    column and prompt are learned in the run), and `load(device) -> Embedder`, a picklable
    callable (naming models is the caller's business: a Ray worker loads its own)."""

    inputs: tuple
    input_format: str
    plan: Plan
    load: Callable
    prompt: str | None = None
    prompt_name: str | None = None
    cache_dir: str | None = None
    force: bool = False  # read inputs of different vector spaces together


def embed_task(task: Task, output=None, output_format="auto", devices=("auto",)) -> Stats:
    """Read the task's records, load the model (on the one device, or on the CPU for a pool of
    several), embed into `output`. Ctrl-C and SIGTERM unwind it (see interrupts_as_exceptions)."""
    import signal

    from vecpipe.core.space import input_check, role_prompt
    from vecpipe.formats.readers import RecordStream

    plan = task.plan
    stream = RecordStream(list(task.inputs), task.input_format,
                          batch_rows=min(1024, plan.window), check=input_check(task.force),
                          text_fields=plan.fields if plan.skip_invalid else ())
    id_column = find_id(stream.schema, plan.id_field)
    if id_column is None and stream.schema is not None:
        notices.info("no id field (id or _id): the ids are the record numbers")
    plan = replace(plan, id_column=id_column)
    check_first_records(stream, plan)  # before the model loads: a bad field fails in a second
    many = len(devices) > 1
    model = task.load("cpu" if many else devices[0])
    plan = replace(plan, prompt=role_prompt(model, "doc", task.prompt, task.prompt_name))
    check_fits(plan, model)
    previous = interrupts_as_exceptions(signal)
    try:
        stats = embed_stream(stream, stream.schema, model, plan, output, output_format,
                             cache_dir=task.cache_dir, devices=list(devices) if many else None,
                             count=notices.input_records(task.inputs, task.input_format))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    stats.max_length = model.max_length
    return stats


def embed_part(task: Task, path: str, output_format: str, job, devices=("auto",)) -> Stats | None:
    """Make the part file `path` of `job.shard` (a formats.parts.Job), resumably: None when it
    is already complete for this job; else embed the shard's records into it, mark it complete
    and return the stats."""
    from vecpipe.core import notices
    from vecpipe.formats.parts import PartClaim

    with PartClaim(path, job) as claim:
        if claim.rows is not None:
            notices.info(f"{path} is already complete: skipped")
            return None
        for note in claim.notes():
            notices.info(note)
        stats = embed_task(replace(task, plan=replace(task.plan, shard=job.shard)), path,
                           output_format, devices)
        claim.finish(stats.rows)
    return stats


class MissingTextField(DataError):
    """A text field that the first records do not have (the caller may say how to name it)."""


def check_first_records(stream, plan: Plan) -> None:
    """Check the first batch of `stream` (peeked, not consumed) as the run will, so that a
    text field no record of it has, or its first invalid record, fails before the model loads.
    A field missing from the first batch fails even when invalid records are skipped: it would
    skip them all."""
    from vecpipe.formats.readers import fit_batch

    item = stream.peek()
    if item is None:
        return
    batch = fit_batch(item, stream.schema)
    for name in plan.fields:
        if name not in batch.schema.names:
            raise MissingTextField(f"no field {name!r} to embed in the first records; fields "
                                   f"are {', '.join(batch.schema.names) or 'none'}",
                                   source=item.source, record=item.first_record)
    select_records(batch, item.source, item.first_record, item.first_record, plan, Stats())


def check_fits(plan: Plan, model) -> None:
    """Refuse a plan that asks more of the model than it has. A ParameterError's message
    starts with its parameter's name, for a command to put its option's name there."""
    from vecpipe.formats.errors import ParameterError

    if plan.dim is not None and plan.dim > model.dim:
        raise ParameterError(f"dim {plan.dim} exceeds the model's {model.dim} dimensions", "dim")
    chunking = plan.chunking
    if chunking is not None and chunking.late:
        model.check_late_chunking()  # the document's windows are the model's: chunks any size
        return
    room = plan.chunk_room(model) if plan.chunked else None
    if room is None:
        return
    if chunking.situated:
        needed = chunking.room_needed(model.prompt_tokens(chunking.template_text()))
        if needed > room:
            raise ParameterError(f"context_tokens {chunking.context_tokens} with chunks of "
                                 f"{chunking.tokens} tokens need {needed} tokens, and the "
                                 f"model's {model.max_length}-token window has room for {room}",
                                 "context_tokens")
    elif plan.chunk_tokens > room:
        raise ParameterError(f"chunk_tokens {plan.chunk_tokens} does not fit the model's "
                             f"{model.max_length}-token window (room for {room} after special "
                             "and prompt tokens)", "chunk_tokens")


def embed_stream(stream, input_schema, model, plan: Plan, output=None, output_format="auto",
                 cache_dir=None, devices=None, count=None) -> Stats:
    """Read `stream`, embed, write to `output` (`devices`: a worker pool, one per device).
    `count`: a function finding how many records the stream holds, for the bar's total."""
    import contextlib

    from vecpipe.core import multivector, notices, space
    from vecpipe.formats import schema as names
    from vecpipe.formats.writers import RecordWriter

    stats = Stats()
    out_schema = multivector.without_token_fields(
        output_schema(input_schema, plan, plan.out_dim(model)))
    tokens = multivector.TokenColumns(model, plan.batch_size, plan.prompt) \
        if plan.multi_vector else None
    written_schema = out_schema if tokens is None else tokens.schema(out_schema)
    meta = {key: None for key in names.META_KEYS + ("layers", "pooling")}
    meta.update(model.metadata(plan.prompt, plan.normalized(model), plan.out_dim(model)))
    meta[space.TEXT_KEY] = space.embedded_text(plan.fields, plan.chunking)
    meta.update(multivector.embed_meta(model, plan.multi_vector))
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
            output, output_format, schema=written_schema, metadata=meta)))
        bar = stack.enter_context(notices.progress(
            desc="embed", unit="rec", count=count if plan.shard is None else None))
        feed = RecordProgress(bar)
        watch = ReaderWatch() if output in (None, "-") else None
        encoder = Encoder(model if tokens is None else tokens.model, plan, stats, cache, pool,
                          progress=feed.embedded if watch is None else watch.wrap(feed.embedded))
        parts = selected_parts(stream, input_schema, model, plan, stats)
        windows = stack.enter_context(contextlib.closing(encoder.run(parts)))
        for window, vectors in windows:
            for part, part_vectors in window.split(vectors):
                batch = output_batch(part, part_vectors, out_schema, plan)
                sink.write(batch if tokens is None else
                           tokens.added(batch, part.texts, written_schema))
                stats.rows += len(part.texts)
            if watch is not None:  # a reader downstream (`| head -1`) sees each window at once
                sink.writer.flush()
            feed.finished(window)
        sink.ensure_started()
    return stats


class ReaderWatch:
    """Notices that the reader of a piped stdout went away (`| head -1` has its line), so the
    run stops at the next model batch with the BrokenPipeError a write would raise (a quiet
    exit 0), instead of embedding the rest of the input first: the next write may be a whole
    window away. Linux flags a pipe's writing end POLLERR once no reader holds it."""

    def __init__(self):
        import select
        import stat
        import sys

        self.poll = None
        try:
            fd = sys.stdout.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                self.poll = select.poll()
                self.poll.register(fd, select.POLLOUT)
        except (AttributeError, OSError, ValueError):  # no real stdout (a test runner's)
            self.poll = None

    def check(self) -> None:
        import errno
        import select

        if self.poll is not None and any(events & select.POLLERR
                                         for _, events in self.poll.poll(0)):
            raise BrokenPipeError(errno.EPIPE, "the reader of stdout went away")

    def wrap(self, progress):
        def checked(window, texts):
            progress(window, texts)
            self.check()
        return checked


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


class Part:
    """Kept input rows of one source batch and what to embed for each output row."""

    def __init__(self, batch, ids, texts, chunks=None, records=None, shown=None):
        self.records = len(texts) if records is None else records  # input records it holds
        self.batch = batch      # input rows, one per output row (repeated when chunking)
        self.ids = ids          # output ids
        self.texts = texts      # text embedded for each output row (late chunks: late_key)
        self.chunks = chunks    # (parent_ids, numbers, char_starts, char_ends) when chunking
        self.shown = shown      # the chunk texts written, when not the texts embedded

    def split(self, rows: int) -> tuple["Part", "Part"]:
        """The first `rows` output rows and the rest. A chunked record counts in the part
        holding its first chunk."""
        chunks = head_chunks = None
        head_records = rows
        if self.chunks is not None:
            head_chunks = tuple(column[:rows] for column in self.chunks)
            chunks = tuple(column[rows:] for column in self.chunks)
            head_records = sum(1 for number in head_chunks[1] if number == 0)
        shown = (None, None) if self.shown is None else (self.shown[:rows], self.shown[rows:])
        head = Part(self.batch.slice(0, rows), self.ids[:rows], self.texts[:rows], head_chunks,
                    records=head_records, shown=shown[0])
        rest = Part(self.batch.slice(rows), self.ids[rows:], self.texts[rows:], chunks,
                    records=self.records - head_records, shown=shown[1])
        return head, rest


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
            raise InvalidRecord(problem, source=source, record=int(first_record + row))
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
    """(ids, problems): string ids (record numbers when there is no id field or a null id)."""
    from vecpipe.formats import schema as names

    ids = names.batch_ids(batch, id_column, next_record, on_null="record").to_pylist()
    if id_column is None:
        return ids, [None] * batch.num_rows
    nulls = batch.column(id_column).is_null().to_pylist()
    return ids, [f"null id in field {id_column!r}" if null else None for null in nulls]


def chunk_part(part, model, plan) -> Part:
    """One row per chunk: what is embedded for it (its text, its situated text, or its late
    key), its parent id, number and character offsets; the chunk's own text is written."""
    from vecpipe.core.chunking import late_key

    chunking = plan.chunking
    spans = model.token_spans(part.texts)
    chunks = chunking.split(spans, [len(text) for text in part.texts])
    rows = [c.row for c in chunks]
    shown = [part.texts[c.row][c.char_start:c.char_end] for c in chunks]
    if chunking.late:
        embedded = [late_key(part.texts[c.row], c.first_token, c.end_token) for c in chunks]
    else:
        embedded = [chunking.embedded_text(part.texts[c.row], spans[c.row], c) for c in chunks]
    columns = ([part.ids[r] for r in rows], [c.number for c in chunks],
               [c.char_start for c in chunks], [c.char_end for c in chunks])
    return Part(part.batch.take(rows), [f"{part.ids[c.row]}#{c.number}" for c in chunks],
                embedded, columns, records=part.records,
                shown=None if embedded == shown else shown)


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


class RecordProgress:
    """Moves a bar of records as the model runs: within a window, its records in proportion
    to its texts embedded so far (they are done in batches of similar length, not in order);
    all of them once the window is written."""

    def __init__(self, bar):
        self.bar = bar
        self.done = 0       # records of the windows written
        self.texts = {}     # id(window) -> its texts embedded so far

    def embedded(self, window, texts: int) -> None:
        done = self.texts[id(window)] = self.texts.get(id(window), 0) + texts
        share = window.records * min(done, len(window.todo)) // max(len(window.todo), 1)
        self._move(self.done + share)

    def finished(self, window) -> None:
        self.texts.pop(id(window), None)
        self.done += window.records
        self._move(self.done)

    def _move(self, count: int) -> None:
        if count > self.bar.n:
            self.bar.update(count - self.bar.n)


class Encoder:
    """Windows of parts -> vectors. A thread reads, validates, looks up the cache and tokenizes
    ahead (length-sorted batches); the calling thread runs the model."""

    def __init__(self, model, plan, stats, cache=None, pool=None, progress=None):
        self.model = model
        self.plan = plan
        self.stats = stats
        self.cache = cache
        self.pool = pool
        self.dim = plan.out_dim(model)
        self.progress = progress  # progress(window, texts): after each batch the model ran

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
                vectors = payload if payload is not None else \
                    np.empty((len(window.unique), self.dim), dtype=np.float32)
                if self.pool is not None and len(window.todo):
                    vectors[window.todo] = self._encode_pool(window)
                    if self.progress is not None:
                        self.progress(window, len(window.todo))
            elif kind == "batch":
                if self.pool is None:
                    rows, features = payload
                    vectors[rows] = self._embed(features)
                    if self.progress is not None:
                        self.progress(window, len(rows))
            else:
                if self.cache is not None and len(window.todo):
                    self.cache.store([window.unique[i] for i in window.todo],
                                     vectors[window.todo])
                yield window, vectors

    def _embed(self, features):
        if not self.plan.late_chunking:
            return self.model.embed_features(features, self.plan.normalize, self.plan.dim)
        from vecpipe.core.chunking import finish, late_chunk_vectors

        return finish(late_chunk_vectors(self.model, features, self.plan.prompt),
                      self.plan.normalize, self.plan.dim)

    def _encode_pool(self, window):
        texts = [window.unique[i] for i in window.todo]
        return self.model.encode_pool(self.pool, texts, self.plan.batch_size, self.plan.prompt,
                                      self.plan.normalize, self.plan.dim)

    def _prepared(self, parts):
        """Runs in the reading thread: ("start", window, cache hits), then ("batch",
        window, (slots, features)) for each length-sorted batch, then ("end", window, None)."""
        for window in self._windows(parts):
            yield "start", window, self._look_up(window)
            if self.plan.late_chunking:
                for slots, documents in late_batches(window, self.plan.batch_size):
                    yield "batch", window, (slots, documents)
                yield "end", window, None
                continue
            for slots in self._batches(window):
                texts = [window.unique[s] for s in slots]
                features = self.model.tokenize(texts, self.plan.prompt)
                self.stats.truncated += self.model.count_truncated(texts, features,
                                                                   self.plan.prompt)
                yield "batch", window, (slots, None if self.pool is not None else features)
            yield "end", window, None

    def _batches(self, window):
        """The window's slots still to embed, longest first, in model batches: batch_size
        texts each, or with a token budget as many as fit it (token_batches)."""
        if self.plan.batch_tokens is None or self.pool is not None:
            order = sorted(window.todo.tolist(), key=lambda s: -len(window.unique[s]))
            for start in range(0, len(order), self.plan.batch_size):
                yield order[start:start + self.plan.batch_size]
            return
        slots = window.todo.tolist()
        lengths = self.model.token_lengths([window.unique[s] for s in slots], self.plan.prompt)
        order = sorted(range(len(slots)), key=lambda i: -lengths[i])
        for batch in token_batches([lengths[i] for i in order], self.plan.batch_tokens):
            yield [slots[order[i]] for i in batch]

    def _windows(self, parts):
        """Windows of exactly the sizes window_sizes gives (parts split at their edges); the
        last holds what is left."""
        sizes = window_sizes(self.plan.window, self.plan.batch_size)
        pending, room = [], next(sizes)
        for part in parts:
            while len(part.texts) >= room:
                head, part = part.split(room)
                yield Window([*pending, head])
                pending, room = [], next(sizes)
            if part.texts:
                pending.append(part)
                room -= len(part.texts)
        if pending:
            yield Window(pending)

    def _look_up(self, window):
        """Leave the cache misses in window.todo; return the window's vectors with the hits
        filled in (None without a cache)."""
        self.stats.duplicates += len(window.slots) - len(window.unique)
        if self.cache is None:
            self.stats.embedded += len(window.unique)
            return None
        vectors, window.todo = self.cache.misses(window.unique)
        self.stats.from_cache += len(window.unique) - len(window.todo)
        self.stats.embedded += len(window.todo)
        return vectors


def token_batches(lengths, budget: int):
    """Consecutive ranges of `lengths` (token counts, longest first) whose padded size, rows x
    the first (longest) row's tokens, stays within `budget` (one row at least): short texts go
    many to a model call, long ones few, as TEI and infinity batch, instead of a fixed count
    that pads a GPU's batch of short texts into idle work or overflows memory on long ones."""
    start = 0
    while start < len(lengths):
        rows = max(1, budget // max(1, lengths[start]))
        yield range(start, min(start + rows, len(lengths)))
        start += rows


def late_batches(window, batch_size: int):
    """(slots, LateDocuments) of the window's chunks still to embed: `batch_size` documents
    at a time, longest first, each with the chunks wanted of it."""
    from vecpipe.core.chunking import LateDocument, parse_late_key

    wanted: dict = {}
    for slot in window.todo.tolist():
        text, first, end = parse_late_key(window.unique[slot])
        wanted.setdefault(text, []).append((slot, (first, end)))
    texts = sorted(wanted, key=len, reverse=True)
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        slots = [slot for text in batch for slot, _ in wanted[text]]
        yield slots, [LateDocument(text, [span for _, span in wanted[text]]) for text in batch]


def window_sizes(largest: int, batch_size: int):
    """The sizes of consecutive windows: FIRST_WINDOW (at least one model batch), then
    WINDOW_GROWTH times the last, up to `largest`. The first output leaves after one small
    window (seconds, not the minutes a 4,096-record window takes on a CPU); the windows reach
    the largest size soon, since length sorting in a large window pads batches least."""
    size = min(largest, max(FIRST_WINDOW, batch_size))
    while True:
        yield size
        size = min(largest, size * WINDOW_GROWTH)


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
        if field.name == "_id" and plan.id_column == "_id":  # it becomes `id`, not a second one
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
                     names.TEXT: lambda: pa.array(part.texts if part.shown is None
                                                  else part.shown, pa.string())})
    columns = [made[field.name]() if field.name in made else part.batch.column(field.name)
               for field in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def find_id(schema, id_field):
    from vecpipe.formats import schema as names

    if schema is None:
        if id_field:
            raise DataError(f"no field {id_field!r} (the input is empty)")
        return None
    return names.find_id_column(schema, id_field)


def interrupts_as_exceptions(signal) -> dict:
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
