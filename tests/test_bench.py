"""Every benchmark says which CPU it ran on: figures from machines with other instruction sets
(AVX2 only vs AVX-512/VNNI/AMX) are not comparable, so each script prints bench/machine.py's line."""
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
NOT_BENCHMARKS = {"machine.py", "demo_corpus.py", "package_text.py"}  # data makers, no timings


def _machine():
    spec = importlib.util.spec_from_file_location("machine", BENCH / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_facts_name_the_speed_relevant_flags():
    machine = _machine()
    assert machine.cpu_facts(SAPPHIRE_RAPIDS) == (
        "Intel(R) Xeon(R) Platinum 8481C",
        ["AVX2", "AVX-512", "AVX512-VNNI", "AVX512-BF16", "AMX-BF16", "AMX-INT8"])
    assert machine.cpu_facts(EPYC) == ("AMD EPYC 7B13", ["AVX2"])
    line = machine.machine_line()
    assert line.startswith("machine: ") and "load average" in line and "absent" in line


def test_every_benchmark_prints_the_machine_line():
    scripts = [p for p in BENCH.glob("*.py") if p.name not in NOT_BENCHMARKS]
    assert scripts
    for script in scripts:
        source = script.read_text()
        assert "from machine import machine_line" in source, script.name
        main = source[source.index("\ndef main("):]
        assert re.search(r"machine_line\(\)", main), f"{script.name}: main() never prints it"


def test_every_benchmarks_section_names_its_cpu():
    text = (REPO / "BENCHMARKS.md").read_text()
    for section in text.split("\n## ")[1:]:
        head = section.splitlines()[0]
        assert re.search(r"^CPU: .*(AVX|AMX|absent|none)", section, re.M), head
