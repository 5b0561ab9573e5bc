"""Multi-bit residual binarisation (compress --dtype binary --bits K) against a direct numpy
computation of the residual planes, their scales and the scores."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.codec import Codec
from vecpipe.formats import schema as names


def unit_vectors(rows, dim, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_planes(x, calibration, planes):
    """Reference: scales fitted on `calibration`, then the signs of x's residuals (±1)."""
    fit, scales = calibration.astype(np.float64), []
    for _ in range(planes):
        scale = np.abs(fit).mean(axis=0)
        scales.append(scale)
        fit = fit - np.where(fit > 0, 1.0, -1.0) * scale
    residual, signs = x.astype(np.float64), []
    for scale in scales:
        sign = np.where(residual > 0, 1.0, -1.0)
        signs.append(sign)
        residual = residual - sign * scale
    return np.array(scales), np.array(signs)  # planes x dim, planes x rows x dim


@pytest.mark.parametrize("planes", [2, 3, 4])
@pytest.mark.parametrize("dim", [32, 20])  # 20: the last byte of each plane is partly used
def test_planes_scales_and_scores_match_numpy(planes, dim):
    x = unit_vectors(600, dim)
    queries = unit_vectors(7, dim, seed=1)
    codec = Codec.fit(x, "binary", bits=planes)
    scales, signs = numpy_planes(x, x, planes)
    np.testing.assert_allclose(codec.scales, scales, rtol=1e-5, atol=1e-7)
    codes = codec.encode(x)
    width = (dim + 7) // 8
    assert codes.shape == (600, planes * width) and codec.bytes_per_vector == planes * width
    for plane in range(planes):
        expected = np.packbits(signs[plane] > 0, axis=1)
        assert np.array_equal(codes[:, plane * width:(plane + 1) * width], expected)
    reconstruction = np.einsum("kd,krd->rd", scales, signs)
    np.testing.assert_allclose(codec.decode(codes), reconstruction, atol=2e-6)
    expected_scores = sum((queries * scales[k]) @ signs[k].T for k in range(planes))
    np.testing.assert_allclose(codec.score(queries, codes), expected_scores, atol=2e-5)


def test_each_plane_lowers_the_reconstruction_error():
    x = unit_vectors(2000, 48)
    errors = []
    for planes in (1, 2, 3, 4):
        codec = Codec.fit(x, "binary", bits=planes)
        errors.append(float(np.linalg.norm(codec.decode(codec.encode(x)) - x)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_one_plane_is_todays_binary_and_its_json():
    x = unit_vectors(300, 32)
    default, one = Codec.fit(x, "binary"), Codec.fit(x, "binary", bits=1)
    assert one.to_json() == default.to_json() and "planes" not in json.loads(one.to_json())
    assert np.array_equal(one.encode(x), np.packbits(x > 0, axis=1))


def test_json_records_bits_and_scales():
    x = unit_vectors(300, 32)
    codec = Codec.fit(x, "binary", bits=3, dim=24)
    data = json.loads(codec.to_json())
    assert data["planes"]["bits"] == 3 and data["planes"]["scales"]["shape"] == [3, 24]
    again = Codec.from_json(codec.to_json())
    assert again == codec and again.bits == 3
    assert np.array_equal(again.encode(x), codec.encode(x))
    assert codec != Codec.fit(x, "binary", bits=2, dim=24)


def write_arrow(path, vectors):
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))],
                      "embedding": names.numpy_to_vectors(vectors)})
    meta = {"model": "fake:32", "dim": str(vectors.shape[1]), "normalized": "true"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_compress_bits_writes_planes_and_the_codec(cli, tmp_path):
    x = unit_vectors(500, 32)
    source = write_arrow(tmp_path / "v.arrow", x)
    result = cli("compress", source, "--dtype", "binary", "--bits", "2",
                 "-o", str(tmp_path / "b.arrow"))
    assert result.exit_code == 0, result.stderr
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "b.arrow"))).read_all()
    codec = Codec.from_json(names.read_meta(table.schema)["codec"])
    assert codec.bits == 2 and table.schema.field("embedding").type == pa.binary(8)
    _, signs = numpy_planes(x, x, 2)
    stored = np.frombuffer(b"".join(table.column("embedding").to_pylist()), np.uint8)
    expected = np.concatenate([np.packbits(signs[k] > 0, axis=1) for k in range(2)], axis=1)
    assert np.array_equal(stored.reshape(500, 8), expected)


@pytest.mark.parametrize("args", [["--dtype", "int8", "--bits", "2"],
                                  ["--dtype", "binary", "--bits", "9"]])
def test_bits_needs_a_binary_target(cli, tmp_path, args):
    source = write_arrow(tmp_path / "v.arrow", unit_vectors(50, 32))
    result = cli("compress", source, *args, "-o", str(tmp_path / "x.arrow"))
    assert result.exit_code == 2
