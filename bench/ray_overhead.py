"""Benchmark: the overhead of `vecpipe embed --engine ray` vs plain (sharded) runs, NFCorpus, CPU.

Each variant is a subprocess timed by wall clock, as a user runs it; the variants alternate in
rounds so machine load hits them alike; medians are reported with ratios to `plain`.

  plain    vecpipe embed corpus.jsonl --field title --field text -o plain.arrow
  shards   the same with --shard i/P -o parts/, i = 0..P-1 one after another (a Slurm array
           on one node, or make -j1)
  ray      vecpipe embed --engine ray --parts P corpus/ -o ray.arrow: starts a local Ray
           cluster, one actor per group of up to 8 CPUs loads the model and embeds the parts,
           then the driver writes them in input order and stops the cluster

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

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

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
    return [sys.executable, "-m", "vecpipe.cli", "embed", "-q", "--field", "title", "--field",
            "text", "--device", "cpu", *map(str, args)]


def time_variants(folder: Path, parts: int, rounds: int) -> dict[str, list[float]]:
    source = folder / "in" / "corpus.jsonl"
    variants = {
        "plain": [vecpipe(source, "-o", folder / "plain.arrow")],
        "shards": [vecpipe(source, "--shard", f"{i}/{parts}", "-o", f"{folder}/parts/")
                   for i in range(parts)],
        "ray": [vecpipe("--engine", "ray", "--parts", parts, folder / "in",
                        "-o", folder / "ray.arrow")],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, commands in variants.items():
            subprocess.run(["rm", "-rf", str(folder / "parts")], check=True)
            start = time.perf_counter()
            for command in commands:
                subprocess.run(command, check=True, env=ENV, cwd=REPO)
            times[name].append(time.perf_counter() - start)
    return times


def report(name: str, docs: int, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["plain"])
    print(f"\n{name} (wall seconds per run, median of {len(times['plain'])}):")
    for variant, values in times.items():
        median = statistics.median(values)
        rate = f", {docs / median:.1f} docs/s" if docs > 1 else ""
        print(f"  {variant:7s} {median:7.1f} s  ({median / base:.2f}x plain{rate}; "
              f"runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  ray - plain: {statistics.median(times['ray']) - base:+.1f} s, "
          f"ray - shards: {statistics.median(times['ray']) - statistics.median(times['shards']):+.1f} s")


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
    parent_of = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent_of[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parent_of.items() if parent in family} - family
        family |= more
        grew = bool(more)
    family.discard(os.getpid())
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
