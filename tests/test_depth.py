"""TTE depth (Seegmiller & Preum, EMNLP 2023) and its rank-sum test, against a direct
computation of the paper's definitions: D(x; F) = 2 - mean over F of (1 - cos), the quality index
Q(F, G) of Liu & Singh (1993), and the Wilcoxon rank-sum test of scipy."""
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as scipy_stats

from vecpipe.core import vector_stats as stats


def direct_depth(x, reference, skip_self):
    """The definition, one pair at a time."""
    out = []
    for i, row in enumerate(x):
        distances = [1.0 - row @ other / (np.linalg.norm(row) * np.linalg.norm(other))
                     for j, other in enumerate(reference) if not (skip_self and i == j)]
        out.append(2.0 - sum(distances) / len(distances))
    return np.array(out)


def direct_q(depth_f, depth_g):
    """Liu & Singh's estimator: mean over G of the fraction of F no deeper."""
    return float(np.mean([np.mean([x <= y for x in depth_f]) for y in depth_g]))


def clustered(rng, n, dim, centre, spread):
    return centre + spread * rng.normal(size=(n, dim))


def test_depth_equals_the_definition():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(23, 5)) + 1.0
    g = rng.normal(size=(17, 5))
    assert np.allclose(stats.tte_depth(f), direct_depth(f, f, skip_self=True), atol=1e-12)
    assert np.allclose(stats.tte_depth(g, f), direct_depth(g, f, skip_self=False), atol=1e-12)
    # blocks change nothing; depth is in [0, 2]
    assert np.allclose(stats.tte_depth(f, block=4), stats.tte_depth(f), atol=1e-12)
    assert np.allclose(stats.tte_depth(g, f, block=3), stats.tte_depth(g, f), atol=1e-12)
    assert ((stats.tte_depth(g, f) >= 0) & (stats.tte_depth(g, f) <= 2)).all()
    # the mean self-depth is 1 + the mean cosine of distinct pairs (anisotropy)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert stats.tte_depth(f).mean() == pytest.approx(1 + cos[~np.eye(23, dtype=bool)].mean())


def test_depth_refuses_zero_rows_and_single_rows():
    with pytest.raises(ValueError, match="zero vector"):
        stats.tte_depth(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="two rows"):
        stats.tte_depth(np.array([[1.0, 0.0]]))


def test_rank_sum_test_equals_the_definitions():
    rng = np.random.default_rng(1)
    centre = np.array([3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    f = clustered(rng, 60, 6, centre, 1.0)
    g = clustered(rng, 45, 6, centre + np.array([0, 1.5, 0, 0, 0, 0]), 1.0)
    depth_f, depth_g = direct_depth(f, f, True), direct_depth(g, f, False)
    q, w, p = stats.depth_rank_sum_test(f, g)
    expected = scipy_stats.ranksums(depth_f, depth_g, alternative="greater")
    assert q == pytest.approx(direct_q(depth_f, depth_g), abs=1e-12)
    assert w == pytest.approx(expected.statistic, rel=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)
    assert stats.depth_q(np.array([1.0, 2.0]), np.array([2.0])) == 1.0  # ties count as <=


def test_rank_sum_test_same_versus_shifted():
    rng = np.random.default_rng(2)
    centre = np.zeros(16)
    centre[0] = 2.0
    f = clustered(rng, 500, 16, centre, 0.5)
    same = clustered(rng, 400, 16, centre, 0.5)
    shifted = clustered(rng, 400, 16, np.roll(centre, 1) + centre, 0.5)
    q_same, _, p_same = stats.depth_rank_sum_test(f, same)
    q_shift, _, p_shift = stats.depth_rank_sum_test(f, shifted)
    assert abs(q_same - 0.5) < 0.06 and p_same > 0.01
    assert q_shift < 0.4 and p_shift < 1e-6


def write_vectors(path, vectors, values=pa.float32()):
    flat = pa.array(np.asarray(vectors).ravel(), type=values)
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))],
                      "title": [f"title {i}" for i in range(len(vectors))],
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    table = table.replace_schema_metadata({"vecpipe.model": "m", "vecpipe.dim":
                                           str(vectors.shape[1])})
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=37):  # several batches
            writer.write_batch(batch)
    return path


def test_cli_writes_rows_ranked_by_depth(cli, tmp_path):
    rng = np.random.default_rng(3)
    x = clustered(rng, 120, 8, np.eye(8)[0] * 2, 1.0).astype(np.float32)
    path = write_vectors(tmp_path / "x.arrow", x)
    out = tmp_path / "ranked.arrow"
    r = cli("eval", "embeddings", path, "--depth", "-o", out)
    assert r.exit_code == 0, r
    [record] = r.records()
    expected = direct_depth(x.astype(np.float64), x.astype(np.float64), skip_self=True)
    assert record["depth"]["median"] == pytest.approx(np.median(expected), abs=1e-9)
    table = pa.ipc.open_file(str(out)).read_all()
    assert table.schema.names == ["id", "title", "embedding", "depth"]
    assert table.schema.field("depth").type == pa.float32()
    assert table.schema.metadata[b"vecpipe.model"] == b"m"
    order = np.argsort(-expected, kind="stable")
    assert table["id"].to_pylist() == [f"d{i}" for i in order]
    assert table["title"].to_pylist() == [f"title {i}" for i in order]
    assert np.allclose(table["depth"].to_numpy(), expected[order], atol=1e-6)
    assert np.array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), x[order])
    jsonl = tmp_path / "ranked.jsonl"
    assert cli("eval", "embeddings", path, "--depth", "-o", jsonl).exit_code == 0
    assert [row["id"] for row in map(__import__("json").loads, jsonl.read_text().splitlines())] \
        == [f"d{i}" for i in order]


def test_cli_two_inputs_add_the_depth_test(cli, tmp_path):
    rng = np.random.default_rng(4)
    centre = np.eye(16)[0] * 2
    first = write_vectors(tmp_path / "first.arrow", clustered(rng, 600, 16, centre, 0.5))
    same = write_vectors(tmp_path / "same.arrow", clustered(rng, 600, 16, centre, 0.5))
    shifted = write_vectors(tmp_path / "shifted.arrow",
                            clustered(rng, 600, 16, centre + np.eye(16)[1] * 2, 0.5))
    r = cli("eval", "embeddings", first, shifted, "--depth", "--sample", "200")
    assert r.exit_code == 0, r
    test = r.records()[-1]["depth_test"]
    assert test["q"] < 0.4 and test["p_value"] < 1e-6 and r.records()[-1]["differ"] is True
    assert test["reference"] == str(first)
    r = cli("eval", "embeddings", first, same, "--depth", "--sample", "200")
    test = r.records()[-1]["depth_test"]
    assert abs(test["q"] - 0.5) < 0.06 and test["p_value"] > 0.01
    plain = cli("eval", "embeddings", first, same, "--sample", "200")
    assert "depth_test" not in plain.records()[-1] and "depth" not in plain.records()[0]
    table = cli("eval", "embeddings", first, shifted, "--depth", "--output-format", "table")
    assert "depth test p / Q" in table.stdout and "three rank-sum tests" in table.stdout


def test_cli_refusals(cli, tmp_path, write_jsonl):
    path = write_vectors(tmp_path / "x.arrow", np.ones((5, 4), np.float32))
    r = cli("eval", "embeddings", path, "-o", tmp_path / "r.arrow")
    assert r.exit_code == 2 and "--depth" in r.stderr
    assert cli("eval", "embeddings", path, "--depth", "-o", "-").exit_code == 2
    codes = write_vectors(tmp_path / "codes.arrow", np.ones((5, 4), np.int8), pa.int8())
    r = cli("eval", "embeddings", codes, "--depth")
    assert r.exit_code == 1 and "float vectors" in r.stderr and "Traceback" not in r.stderr
    bits = pa.table({"embedding": pa.array([b"\x01", b"\x02"], pa.binary(1))})
    with pa.ipc.new_file(str(tmp_path / "bits.arrow"), bits.schema) as writer:
        writer.write_table(bits)
    r = cli("eval", "embeddings", tmp_path / "bits.arrow", "--depth")
    assert r.exit_code == 1 and "packed-bit" in r.stderr
    zero = write_jsonl(tmp_path / "z.jsonl", [{"id": "a", "embedding": [1.0, 0.0]},
                                              {"id": "b", "embedding": [0.0, 0.0]}])
    r = cli("eval", "embeddings", zero, "--depth")
    assert r.exit_code == 1 and "zero vector" in r.stderr and "z.jsonl:2" in r.stderr
    single = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "embedding": [1.0, 0.0]}])
    r = cli("eval", "embeddings", single, "--depth")
    assert r.exit_code == 1 and "two rows" in r.stderr
    assert not (tmp_path / "r.arrow").exists()
