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


def has_amx_bf16(cpuinfo: str | None = None) -> bool:
    return "amx_bf16" in cpu_flags(cpuinfo)


def has_vnni(cpuinfo: str | None = None) -> bool:
    """u8 x s8 dot products that accumulate in 32 bits (AVX512-VNNI or AVX-VNNI), so int8 weights
    may use their whole range without the 16-bit saturation of AVX2's vpmaddubsw."""
    return not cpu_flags(cpuinfo).isdisjoint({"avx512_vnni", "avx_vnni"})
