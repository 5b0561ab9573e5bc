"""The CPU's feature flags, for fast paths that choose by capability on the machine that runs
them (Linux's /proc/cpuinfo; elsewhere no flags, so the portable path). VECPIPE_CPUINFO names
another file to read them from: the tests point it at none, so they run as on a plain CPU."""
from __future__ import annotations

import os


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    cpuinfo = cpuinfo or os.environ.get("VECPIPE_CPUINFO") or "/proc/cpuinfo"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def has_bf16_math(cpuinfo: str | None = None) -> bool:
    """bfloat16 matrix products in hardware: AMX-BF16 tiles, or AVX512-BF16's dot products
    (the AMD EPYCs with AVX-512 have them, without AMX)."""
    return not cpu_flags(cpuinfo).isdisjoint({"amx_bf16", "avx512_bf16"})


def has_vnni(cpuinfo: str | None = None) -> bool:
    """u8 x s8 dot products that accumulate in 32 bits (AVX512-VNNI or AVX-VNNI), so int8 weights
    may use their whole range without the 16-bit saturation of AVX2's vpmaddubsw."""
    return not cpu_flags(cpuinfo).isdisjoint({"avx512_vnni", "avx_vnni"})
