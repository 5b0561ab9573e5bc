"""embed's `auto` precision: torch bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 (recorded in the metadata),
float32 elsewhere and whenever asked; within cosine 0.9999 of float32 where bfloat16 runs."""
import numpy as np
import pyarrow as pa
import pytest

from vecpipe.cli import models
from vecpipe.formats import schema as names


def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path):
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    epyc = tmp_path / "epyc"
    epyc.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n")
    without = tmp_path / "avx2"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16x\n")
    assert models.bf16_cpu(str(with_amx)) and models.bf16_cpu(str(epyc))
    assert not models.bf16_cpu(str(without))
    assert not models.bf16_cpu(str(tmp_path / "absent"))
    assert not models.bf16_cpu()  # conftest's VECPIPE_CPUINFO: the tests run as without AMX


@pytest.mark.parametrize("asked, backend, expected", [
    ("auto", "auto", ("bfloat16", "torch")), ("auto", "torch", ("bfloat16", "torch")),
    ("float32", "auto", ("float32", "auto")), ("auto", "numpy", ("auto", "numpy")),
    ("auto", "onnx", ("auto", "onnx"))])
def test_auto_is_bfloat16_with_torch_on_bf16_hardware(monkeypatch, asked, backend, expected):
    monkeypatch.setattr(models, "bf16_cpu", lambda: True)
    assert models.embed_precision(asked, "cpu", backend, None) == expected
    assert models.embed_precision(asked, "cpu", backend, "fake:8")[0] == asked
    monkeypatch.setattr(models, "bf16_cpu", lambda: False)
    assert models.embed_precision(asked, "cpu", backend, None) == (asked, backend)


def vectors(path):
    table = pa.ipc.open_file(str(path)).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return np.asarray(names.vectors_to_numpy(table.column("embedding"))), meta


@pytest.mark.slow
def test_embed_records_bfloat16_and_stays_close_to_float32(cli, tmp_path, monkeypatch):
    texts = "".join(f'{{"id": "t{i}", "text": "a sentence about topic {i} and {i * 7}"}}\n'
                    for i in range(40))
    (tmp_path / "t.jsonl").write_text(texts)
    monkeypatch.setattr(models, "bf16_cpu", lambda: True)
    result = cli("embed", tmp_path / "t.jsonl", "-o", tmp_path / "auto.arrow")
    assert result.exit_code == 0, result.stderr
    assert "bfloat16 (this CPU multiplies bfloat16 in hardware" in result.stderr
    forced = cli("embed", tmp_path / "t.jsonl", "--precision", "float32", "-o",
                 tmp_path / "f32.arrow")
    assert forced.exit_code == 0, forced.stderr
    auto, auto_meta = vectors(tmp_path / "auto.arrow")
    exact, exact_meta = vectors(tmp_path / "f32.arrow")
    assert auto_meta["vecpipe.precision"] == "bfloat16"
    assert "vecpipe.precision" not in exact_meta
    cosine = (auto * exact).sum(1) / np.linalg.norm(auto, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.999 and cosine.mean() > 0.9998  # bfloat16: 8 bits of mantissa


def test_vnni_is_read_from_the_cpu_flags(tmp_path):
    from vecpipe.core import cpu

    for flags, expected in (("avx2 avx512f avx512_vnni", True), ("avx2 avx_vnni", True),
                            ("avx2 avx512f avx512_vnnix", False), ("", False)):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
        assert cpu.has_vnni(str(path)) is expected, flags
    assert not cpu.has_vnni()  # conftest's VECPIPE_CPUINFO
