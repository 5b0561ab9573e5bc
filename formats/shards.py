"""The shard contract: `--shard I/N` picks a deterministic, rerun-stable 1/N of a stream.

A record belongs to shard `hash(id) mod N` (blake2b, so every machine and Python agrees), which
keeps a record in the same shard when the corpus grows or is reordered. Records without an id
fall back to their record number. Shard outputs are named `part-0000I-of-0000N.<ext>`.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import NamedTuple

from vecpipe.formats.errors import UsageError

PART_PATTERN = re.compile(r"part-(\d{5})-of-(\d{5})")

# (rank variable, world-size variable) of the launchers `--shard auto` understands.
_LAUNCHERS = (
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("RANK", "WORLD_SIZE"),                    # torchrun
    ("JOB_COMPLETION_INDEX", "VECPIPE_SHARD_COUNT"),  # Kubernetes indexed jobs (count: ours)
)


class Shard(NamedTuple):
    index: int
    count: int

    def part_name(self, ext: str) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}.{ext.lstrip('.')}"


def parse_shard(spec: str | None, env: dict | None = None) -> Shard | None:
    """`I/N` (0-based I), `auto` (from launcher variables), or None for no sharding."""
    if spec is None:
        return None
    if spec == "auto":
        return _from_env(os.environ if env is None else env)
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match:
        raise UsageError(f"bad --shard {spec!r}; use I/N with 0 <= I < N, e.g. 0/4, or auto")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise UsageError(f"bad --shard {spec!r}; need 0 <= I < N")
    return Shard(index, count)


def _from_env(env) -> Shard:
    for rank_var, size_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            index = int(env[rank_var])
            if rank_var == "SLURM_ARRAY_TASK_ID":
                index -= int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            return parse_shard(f"{index}/{env[size_var]}")
    raise UsageError("--shard auto found no launcher variables",
                     hint="set SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE, or "
                          "JOB_COMPLETION_INDEX with VECPIPE_SHARD_COUNT; or pass I/N")


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) a record key belongs to."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def shard_mask(keys, shard: Shard):
    """Boolean numpy mask: which of `keys` (strings) belong to `shard`."""
    import numpy as np

    return np.fromiter((shard_of(str(k), shard.count) == shard.index for k in keys),
                       dtype=bool, count=len(keys))


def parse_part_name(name: str) -> Shard | None:
    """The shard a `part-0000I-of-0000N` file name stands for, or None."""
    match = PART_PATTERN.search(os.path.basename(name))
    return Shard(int(match[1]), int(match[2])) if match else None
