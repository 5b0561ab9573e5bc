"""The Ray engine of the embed pipeline: Ray actors embed whole parts of the input files.

ray is imported inside functions (it is the optional extra `vecpipe[ray]`). One stateful actor per
GPU (or per group of CPUs) runs core.embedding.embed_part for each part it gets (the code of
one sharded part, `embed --shard I/N -o DIR/`; the task's loader keeps the model per process),
so its part files are the ones a Slurm array or `make -j` would write: atomic, checksummed, skipped when a rerun finds them
complete, and interchangeable between engines. The driver only schedules parts; for a single
output file it then restores the input order (see `gather`), so the file equals the unsharded
run's.

Plain actors, not Ray Data: parts keep the resume contract and the schema metadata, vectors never
pass through Ray's tensor type, and no CPU has to stay free for Ray Data's read tasks (an actor
pool that takes every CPU waits forever for them on a small machine).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from vecpipe.core import notices
from vecpipe.core.embedding import Stats, Task
from vecpipe.formats.errors import DataError, UsageError, VecpipeError
from vecpipe.formats.shards import Shard

RAY_HINT = "pip install 'vecpipe[ray]'"
MAX_CPUS_PER_WORKER = 8  # torch's CPU throughput stops growing past ~8 threads; use more actors


class RayMissing(DataError):
    """Ray is not installed."""


class NoFreeGpu(UsageError):
    """A GPU device was asked for and the cluster has none free."""


class ClusterUnreachable(DataError):
    """Nobody answers at the cluster address."""


class PartCountMismatch(UsageError):
    """The part folder holds parts of another count than asked for."""


@dataclass(frozen=True)
class RayRun:
    """One job for the cluster: `task` (pickled to the workers, its inputs `files`) embedded
    into part files of `part_format` in `folder`, then gathered into `final` when there is one.
    `job_options` are the options a part's job counts (formats.parts.Job: the caller's names),
    to tell which parts are done.
    """

    files: list
    folder: str
    final: str | None
    part_format: str
    output_format: str
    parts: int | None
    address: str | None
    device: str
    task: Task
    job_options: dict


def embed_on_ray(run: RayRun) -> Stats | None:
    """Make the parts not yet complete, then (for `final`) the file in input order. Returns the
    totals of the parts embedded now (None when every part was complete)."""
    count = known_part_count(run.folder, run.parts)
    todo = unfinished_parts(run, count) if count else None
    totals = Stats()
    if todo != []:
        ray = import_ray()
        with connected(ray, run.address) as where:
            shape = worker_shape(ray, run.device, where)
            count = count or shape.count
            todo = unfinished_parts(run, count, tell=True)
            notices.info(f"ray: {shape.describe()} on {where}; {len(todo)} of {count} parts "
                         f"to embed into {run.folder}")
            run_parts(ray, shape, run, count, todo, totals)
    else:
        notices.info(f"all {count} parts in {run.folder} are complete: nothing to embed")
    if run.final:
        gather(run, count)
        remove_parts(run.folder)
    return totals if todo else None


def input_files(inputs) -> list:
    """Absolute paths of the input files; a folder stands for its files (sorted, not hidden)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(name for name in os.listdir(path) if not name.startswith("."))
            files += [os.path.join(path, name) for name in found
                      if os.path.isfile(os.path.join(path, name))]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError("no such file", source=path)
    if not files:
        raise DataError(f"no input files in {', '.join(inputs)}")
    return [os.path.abspath(path) for path in files]


def part_folder(output: str, output_format: str):
    """(folder of part files, final file or None) for the output: a folder (or a name without
    extension) gets the parts; a file gets them in the hidden folder `.FILE.parts/` beside it
    (kept for a resuming rerun), then itself in input order."""
    from vecpipe.formats.parts import wants_part_folder
    from vecpipe.formats.writers import resolve_output_format

    if wants_part_folder(output) or not os.path.splitext(output)[1]:
        return os.path.abspath(output), None
    resolve_output_format(output, output_format)  # a bad name or format fails before any work
    final = os.path.abspath(output)
    folder, name = os.path.split(final)
    return os.path.join(folder, f".{name}.parts"), final


def known_part_count(folder: str, parts: int | None) -> int | None:
    """`parts`, else the count of the parts already in the folder (so a rerun on another
    cluster resumes), else None (one part per worker)."""
    from vecpipe.formats.parts import list_parts

    counts = {shard.count for shard, _ in list_parts(folder)} if os.path.isdir(folder) else set()
    if len(counts) > 1 or (parts and counts and counts != {parts}):
        found = ", ".join(str(n) for n in sorted(counts))
        raise PartCountMismatch(f"{folder} holds parts of {found} shards"
                                + (f", not {parts}" if parts else ""))
    return parts or next(iter(counts), None)


def part_job(run: RayRun, shard: Shard):
    """The formats.parts.Job a part is made by."""
    from vecpipe.formats.parts import Job

    return Job(run.files, run.job_options, shard)


def unfinished_parts(run: RayRun, count: int, tell: bool = False) -> list:
    """The parts not complete for their job; with `tell`, say why each one that exists is made
    again."""
    from vecpipe.formats.parts import part_path, part_status

    todo = []
    for index in range(count):
        shard = Shard(index, count)
        path, _ = part_path(run.folder, shard, run.part_format)
        rows, why = part_status(path, part_job(run, shard))
        if rows is None:
            todo.append(index)
            if why and tell:
                notices.info(f"{os.path.basename(path)}: {why}: making it again")
    return todo


def remove_parts(folder: str) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing("the Ray engine needs Ray, which is not installed",
                         hint=RAY_HINT) from None
    return ray


class connected:
    """Attach to a running Ray (this process's, the address given, RAY_ADDRESS or `ray start`
    on this machine), else start a local cluster; leave it as found."""

    def __init__(self, ray, address):
        self.ray = ray
        self.address = address
        self.started = False

    def __enter__(self) -> str:
        ray = self.ray
        if ray.is_initialized():
            return "the running Ray session"
        check_reachable(self.address or os.environ.get("RAY_ADDRESS"))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        debug = os.environ.get("VECPIPE_DEBUG", "") not in ("", "0")
        ray.init(address=self.address, include_dashboard=False, log_to_driver=debug,
                 logging_level="INFO" if debug else "ERROR", configure_logging=True)
        self.started = True
        return self.address or os.environ.get("RAY_ADDRESS") or "a local Ray cluster"

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()


def check_reachable(address: str | None, seconds: float = 10.0) -> None:
    """Fail fast on a cluster address nobody answers at: ray.init waits for it forever (and
    ignores SIGTERM meanwhile)."""
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray knows and we do not: let Ray judge it
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as err:
        raise ClusterUnreachable(f"no Ray cluster answers at {address} "
                                 f"({err.strerror or err})") from None


class Shape:
    """How many workers, and the CPUs/GPUs and device each one gets."""

    def __init__(self, count: int, cpus: int, gpus: int):
        self.count, self.cpus, self.gpus = count, cpus, gpus
        self.device = "cuda" if gpus else "cpu"

    def describe(self) -> str:
        each = f"1 GPU and {self.cpus} CPU" if self.gpus else f"{self.cpus} CPU"
        return f"{self.count} worker{'s' * (self.count != 1)} ({each}{'s' * (self.cpus != 1)} " \
               "each)"


def worker_shape(ray, device: str, where: str) -> Shape:
    """One worker per free GPU (unless `device` is cpu), else per group of at most 8 free CPUs.

    Counted from what is free now, so a busy cluster gets fewer workers instead of actors that
    wait forever for resources.
    """
    free = ray.available_resources()
    cpus, gpus = int(free.get("CPU", 0)), int(free.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise NoFreeGpu(f"{where} has no free GPU")
    if device in ("auto", "cuda") and gpus:
        return Shape(gpus, max(1, min(MAX_CPUS_PER_WORKER, cpus // gpus)), 1)
    if cpus < 1:
        raise DataError(f"{where} has no free CPU", hint="wait for other jobs, or add nodes")
    per_worker = min(cpus, MAX_CPUS_PER_WORKER)
    return Shape(cpus // per_worker, per_worker, 0)


class PartWorker:
    """A Ray actor: embeds whole parts of the run; the model is loaded once (the first part
    loads it; the task's loader keeps it per process). Quiet: the driver tells the progress."""

    def __init__(self, run: RayRun, device: str, cpus: int):
        os.environ["OMP_NUM_THREADS"] = str(cpus)  # before torch loads
        notices.configure(notices.prefix(), quiet=True)
        self.run = run
        self.device = device
        self.cpus = cpus

    def embed_part(self, index: int, count: int):
        """(index, stats as a dict) or (index, {"error": (class, fields)}) when the part
        failed."""
        from vecpipe.core.embedding import embed_part
        from vecpipe.formats.parts import part_path

        self._limit_threads()
        shard = Shard(index, count)
        path, fmt = part_path(self.run.folder, shard, self.run.part_format)
        try:
            stats = embed_part(self.run.task, path, fmt, part_job(self.run, shard),
                               devices=(self.device,))
        except VecpipeError as err:  # Ray would pickle it without its location and hint
            return index, {"error": (type(err), vars(err))}
        return index, vars(stats) if stats is not None else {}

    def _limit_threads(self) -> None:
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self.cpus)


def run_parts(ray, shape: Shape, run: RayRun, count: int, todo: list, totals: Stats) -> None:
    """Embed the parts `todo` on `shape.count` actors; the next free actor takes the next part.
    Adds each part's stats into `totals`; raises the first part's error."""
    from ray.util import ActorPool

    from vecpipe.formats.parts import part_path

    worker = ray.remote(num_cpus=shape.cpus, num_gpus=shape.gpus)(PartWorker)
    free_before = ray.available_resources().get("CPU", 0)
    actors = [worker.remote(run, shape.device, shape.cpus)
              for _ in range(min(shape.count, len(todo)))]
    try:
        pool = ActorPool(actors)
        for index, stats in worker_results(ray, pool.map_unordered(
                lambda actor, index: actor.embed_part.remote(index, count), todo)):
            if "error" in stats:
                raise rebuilt_error(*stats["error"])
            totals.add(stats)
            path = part_path(run.folder, Shard(index, count), run.part_format)[0]
            notices.info(f"{os.path.basename(path)}: {stats.get('rows', 0)} vectors")
    finally:
        for actor in actors:  # free the cluster's resources now, not when this driver exits
            ray.kill(actor)
        wait_for_cpus(ray, free_before)


def wait_for_cpus(ray, cpus: float, patience: float = 10.0) -> None:
    """Wait (a little) until the killed actors' CPUs are free again: Ray returns them
    asynchronously, and a next run in the same session sizes its workers by what is free."""
    import time

    deadline = time.monotonic() + patience
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.1)


def worker_results(ray, results):
    """The pool's results; a worker that crashed (not a vecpipe error: out of memory, a
    missing package on a node...) becomes one line instead of Ray's remote traceback."""
    try:
        yield from results
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None) or err
        first_line = (str(cause).strip().splitlines() or [""])[0]
        raise DataError(f"a Ray worker failed: {type(cause).__name__}: {first_line}",
                        hint="VECPIPE_DEBUG=1 shows the workers' output; vecpipe and the model "
                             "must be installed on every node") from None


def rebuilt_error(cls: type, fields: dict) -> VecpipeError:
    """A worker's error as it was raised there: its class and every attribute."""
    error = cls.__new__(cls)
    Exception.__init__(error, fields["message"])
    vars(error).update(fields)
    return error


def gather(run: RayRun, count: int) -> None:
    """Write the parts to `run.final` in input order, as the unsharded run would have.

    Order is carried by ids: a part holds its shard's records in input order, so reading the
    inputs' ids again (the pipeline's own id and validity rules) says for every record which
    part holds its next row(s): `shard_of(id)`. A streaming interleave over memory-mapped parts,
    no sort; the ids of the rows taken are checked against the input's.
    """
    from dataclasses import replace

    from vecpipe.core.embedding import find_id, selected_parts
    from vecpipe.core.space import input_check
    from vecpipe.formats.parts import part_path
    from vecpipe.formats.readers import RecordStream
    from vecpipe.formats.shards import shard_of
    from vecpipe.formats.writers import RecordWriter

    cursors = [PartCursor(part_path(run.folder, Shard(i, count), "arrow-file")[0])
               for i in range(count)]
    task = run.task
    stream = RecordStream(run.files, task.input_format, check=input_check(task.force))
    # the records as read (not chunked): which part holds each one's rows
    plan = replace(task.plan, chunk_tokens=None, chunk_overlap=0,
                   id_column=find_id(stream.schema, task.plan.id_field))
    with RecordWriter(run.final, run.output_format, schema=cursors[0].table.schema) as writer:
        for part in selected_parts(stream, stream.schema, None, plan, Stats()):
            firsts = [cursor.row for cursor in cursors]
            taken = []  # (shard, row in that part) of each output row, in input order
            for record_id in part.ids:
                shard = shard_of(record_id, count)
                taken += [(shard, row) for row in cursors[shard].take(record_id,
                                                                        task.plan.chunked)]
            writer.write_table(interleaved(cursors, firsts, taken))
    for cursor in cursors:
        cursor.check_all_taken()


def interleaved(cursors, firsts, taken):
    """The rows `taken` as one table: each part's rows are one contiguous slice."""
    import pyarrow as pa

    used = sorted({shard for shard, _ in taken})
    base, offset = {}, 0
    for shard in used:
        base[shard] = offset
        offset += cursors[shard].row - firsts[shard]
    pieces = pa.concat_tables([cursors[shard].table.slice(firsts[shard],
                                                          cursors[shard].row - firsts[shard])
                               for shard in used] or [cursors[0].table.slice(0, 0)])
    order = [base[shard] + row - firsts[shard] for shard, row in taken]
    return pieces.take(pa.array(order, pa.int64()))


class PartCursor:
    """A memory-mapped part and the row where the next record's rows start."""

    WINDOW = 8192  # ids are read this many rows at a time

    def __init__(self, path: str):
        import pyarrow as pa

        self.path = path
        self.table = pa.ipc.open_file(pa.memory_map(path)).read_all()  # zero-copy
        self.row = 0
        self._window = (0, [], [], [])  # first row, ids, parent ids, chunk numbers

    def take(self, record_id: str, chunked: bool) -> range:
        """The rows of record `record_id` (all its chunks when chunked), which must come next."""
        first = row = self.row
        if chunked:
            while row < self.table.num_rows and self._key(row)[1:] == (record_id, row - first):
                row += 1
        elif row < self.table.num_rows and self._key(row)[0] == record_id:
            row += 1
        if row == first:
            self._mismatch(f"has no row for id {record_id!r} next")
        self.row = row
        return range(first, row)

    def _key(self, row: int):
        """(id, parent id, chunk number) of a row."""
        start, ids, parents, chunks = self._window
        if not start <= row < start + len(ids):
            window = self.table.slice(row, self.WINDOW)
            names = window.column_names
            ids = window.column("id").to_pylist()
            parents = window.column("parent_id").to_pylist() if "parent_id" in names else ids
            chunks = window.column("chunk").to_pylist() if "chunk" in names else [0] * len(ids)
            start = row
            self._window = (start, ids, parents, chunks)
        index = row - start
        return ids[index], parents[index], chunks[index]

    def check_all_taken(self) -> None:
        if self.row != self.table.num_rows:
            self._mismatch("holds rows that no input record has")

    def _mismatch(self, what: str) -> None:
        raise DataError(f"{what}: the parts do not match the inputs", source=self.path,
                        hint="the inputs changed since the parts were written: delete the "
                             "parts folder and rerun")
