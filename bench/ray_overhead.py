"""Benchmark: the overhead of `vecpipe embed --engine ray` vs plain (sharded) runs, NFCorpus, CPU.

Each variant is a subprocess timed by wall clock, as a user runs it; the variants alternate in
rounds so machine load hits them alike; medians are reported with ratios to `plain`.

  plain    vecpipe embed corpus.jsonl --text-field title --text-field text -o plain.arrow
  shards   the same with --shard i/P -o parts/, i = 0..P-1 one after another (a Slurm array
           on one node, or make -j1)
  ray      vecpipe embed --engine ray --parts P corpus/ -o ray.arrow: starts a local Ray
           cluster, one actor per group of up to 8 CPUs loads the model and embeds the parts,
           then the driver writes them in input order and stops the cluster

Besides wall time, each variant's CPU time (user + system of the process and all its
descendants) is reported: on a machine shared with other jobs it is steadier than wall time.
It is sampled from /proc every 0.2 s, the last value seen per process (Ray's actors never reach
RUSAGE_CHILDREN, measured here), so each process's last 0.2 s may be missed.

The fixed cost is the same runs on a one-document corpus. In this process it also times
`ray.init(num_cpus=C)` and `ray.shutdown()` and sums the memory (RSS, PSS) of the processes Ray
starts, and checks that ray.arrow equals plain.arrow (ids, order, metadata, vectors).
The GPU half of the issue (1..N actors on one GPU) needs a GPU and is not measured here.

    .venv/bin/python bench/ray_overhead.py [--data ../shared/data/nfcorpus] [--limit N]
        [--parts 2] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine_line(), flush=True)

    print(f"machine: {os.cpu_count()} CPUs, load average {load()} at start")
    ray_start_cost()
    with tempfile.TemporaryDirectory(prefix="vecpipe-bench-ray-") as tmp:
        tmp = Path(tmp)
        docs = [orjson.loads(line) for line in
                (Path(args.data) / "corpus.jsonl").read_bytes().splitlines()][:args.limit]
        for name, subset in (("one document", docs[:1]), (f"{len(docs)} documents", docs)):
            folder = tmp / name.replace(" ", "-")
            (folder / "in").mkdir(parents=True)
            (folder / "in" / "corpus.jsonl").write_bytes(
                b"".join(orjson.dumps(d) + b"\n" for d in subset))
            rounds = args.rounds if len(subset) > 1 else 1
            times = time_variants(folder, args.parts, rounds)
            report(name, len(subset), times)
            check_equal(folder / "plain.arrow", folder / "ray.arrow")
    print(f"load average {load()} at the end")


def vecpipe(*args) -> list[str]:
    return [sys.executable, "-m", "vecpipe.cli", "embed", "-q", "--text-field", "title",
            "--text-field", "text", "--device", "cpu", *map(str, args)]


def time_variants(folder: Path, parts: int, rounds: int) -> dict[str, list[tuple]]:
    source = folder / "in" / "corpus.jsonl"
    variants = {
        "plain": [vecpipe(source, "-o", folder / "plain.arrow")],
        "shards": [vecpipe(source, "--shard", f"{i}/{parts}", "-o", f"{folder}/parts/")
                   for i in range(parts)],
        "ray": [vecpipe("--engine", "ray", "--parts", parts, folder / "in",
                        "-o", folder / "ray.arrow")],
    }
    times: dict[str, list[tuple]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, commands in variants.items():
            subprocess.run(["rm", "-rf", str(folder / "parts")], check=True)
            wall = cpu = 0.0
            for command in commands:
                command_wall, command_cpu = run_measured(command)
                wall, cpu = wall + command_wall, cpu + command_cpu
            times[name].append((wall, cpu))
    return times


def run_measured(command) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process tree) of one command."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_of: dict[int, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=ENV, cwd=REPO)
    while proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu_of[pid] = (int(fields[11]) + int(fields[12])) / ticks
        time.sleep(0.2)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command)
    return time.perf_counter() - start, sum(cpu_of.values())


def descendants(root: int) -> set:
    parent_of = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent_of[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    family, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parent_of.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return family - {root}


def report(name: str, docs: int, times: dict[str, list[tuple]]) -> None:
    wall = {variant: statistics.median(w for w, _ in runs) for variant, runs in times.items()}
    cpu = {variant: statistics.median(c for _, c in runs) for variant, runs in times.items()}
    print(f"\n{name} (seconds per run, medians of {len(times['plain'])}):")
    for variant, runs in times.items():
        rate = f", {docs / wall[variant]:.1f} docs/s" if docs > 1 else ""
        print(f"  {variant:7s} wall {wall[variant]:7.1f} s ({wall[variant] / wall['plain']:.2f}x "
              f"plain{rate}), CPU {cpu[variant]:7.1f} s ({cpu[variant] / cpu['plain']:.2f}x); "
              f"runs (wall/CPU): {', '.join(f'{w:.0f}/{c:.0f}' for w, c in runs)}")
    for other in ("plain", "shards"):
        print(f"  ray - {other}: wall {wall['ray'] - wall[other]:+.1f} s, "
              f"CPU {cpu['ray'] - cpu[other]:+.1f} s")


def ray_start_cost() -> None:
    """ray.init/shutdown times and the memory of the processes a local cluster starts."""
    os.environ.update(RAY_USAGE_STATS_ENABLED="0")
    start = time.perf_counter()
    import ray

    imported = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    started = time.perf_counter()
    ray.get(ray.remote(lambda: 1).remote())
    first_task = time.perf_counter()
    rss, pss, count = children_memory()
    stop = time.perf_counter()
    ray.shutdown()
    stopped = time.perf_counter()
    print(f"ray {ray.__version__}: import {imported - start:.1f} s, ray.init(num_cpus="
          f"{os.cpu_count()}) {started - imported:.1f} s, first task {first_task - started:.1f} s, "
          f"shutdown {stopped - stop:.1f} s; {count} processes started, "
          f"RSS {rss / 2**20:.0f} MiB, PSS {pss / 2**20:.0f} MiB (driver not counted)")


def children_memory():
    """(RSS, PSS, count) summed over this process's descendants (Linux /proc)."""
    family = descendants(os.getpid())
    rss = pss = 0
    for pid in family:
        try:
            rss += field_kib(f"/proc/{pid}/status", "VmRSS:") * 1024
            pss += field_kib(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024
        except OSError:
            continue
    return rss, pss, len(family)


def field_kib(path: str, name: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def check_equal(plain_path: Path, ray_path: Path) -> None:
    import numpy as np
    import pyarrow as pa

    from vecpipe.formats.schema import vectors_to_numpy

    plain = pa.ipc.open_file(pa.memory_map(str(plain_path))).read_all()
    ray = pa.ipc.open_file(pa.memory_map(str(ray_path))).read_all()
    assert ray.column("id").equals(plain.column("id")), "ids or their order differ"
    assert ray.schema.metadata == plain.schema.metadata, "metadata differs"
    assert ray.drop(["embedding"]).equals(plain.drop(["embedding"])), "fields differ"
    diff = np.abs(vectors_to_numpy(ray.column("embedding")) -
                  vectors_to_numpy(plain.column("embedding"))).max(initial=0.0)
    print(f"  ray.arrow vs plain.arrow: same ids in the same order, same fields and metadata; "
          f"vectors max |diff| {diff:.1e}")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
