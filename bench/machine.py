"""The line every benchmark prints first: which CPU (and which of the instruction sets that
change embedding and search speed it has), how many cores, and the load when it started.
Figures from machines with different flags are not comparable; BENCHMARKS.md quotes this line."""
from __future__ import annotations

import os
import platform

# /proc/cpuinfo flag -> the name people know it by
SPEED_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI",
               "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def cpu_facts(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(CPU model name, the SPEED_FLAGS it has) from /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine(), []
    model, flags = platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.split())
    return model, [name for flag, name in SPEED_FLAGS.items() if flag in flags]


def machine_line() -> str:
    model, flags = cpu_facts()
    load = os.getloadavg()[0]
    return (f"machine: {model}, {os.cpu_count()} CPUs, flags {'/'.join(flags) or 'none of'} "
            f"({', '.join(f for f in SPEED_FLAGS.values() if f not in flags) or 'none'} absent), "
            f"load average {load:.1f} at start")


if __name__ == "__main__":
    print(machine_line())
