"""compress --pca N --pca-center (centred PCA, as PCA-RAG and scikit-learn do) and the report's
query-latency figures, against scikit-learn and numpy brute force."""
import base64
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.codec import Codec, codec_from_meta
from vecpipe.formats import schema as names
from vecpipe.formats.errors import UsageError


def unit_vectors(rows, dim, seed=0):
    """Anisotropic unit vectors sharing a mean direction, like real embeddings."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_arrow(path, vectors, model="fake:32"):
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))],
                      "embedding": names.numpy_to_vectors(vectors)})
    meta = {"model": model, "dim": str(vectors.shape[1]), "normalized": "true"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


def read_codes(path):
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return names.vectors_to_numpy(table.column("embedding")), names.read_meta(table.schema)


def same_up_to_sign(a, b, atol):
    """Columns of a equal those of b, each possibly negated."""
    signs = np.sign((a * b).sum(axis=0))
    return np.allclose(a * signs, b, atol=atol)


# ----- the codec -------------------------------------------------------------------------------
def test_centred_pca_is_numpys_svd_of_the_centred_sample():
    x = unit_vectors(800, 32)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    codec = Codec.fit(x, "float32", pca=8, center=True, normalize=False)
    assert same_up_to_sign(codec.pca_components, vt[:8].T, atol=1e-4)
    assert same_up_to_sign(codec.project(x), centred @ vt[:8].T, atol=1e-4)
    assert codec.pca_explained == pytest.approx((singular[:8] ** 2).sum() / (singular ** 2).sum(),
                                                abs=1e-5)


@pytest.mark.slow  # importing scikit-learn takes a second
def test_centred_pca_is_scikit_learns_pca():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = unit_vectors(800, 32)
    reference = decomposition.PCA(n_components=8).fit(x.astype(np.float64))
    raw = Codec.fit(x, "float32", pca=8, center=True, normalize=False)
    assert np.allclose(raw.pca_mean, reference.mean_, atol=1e-6)
    assert same_up_to_sign(raw.pca_components, reference.components_.T, atol=1e-4)
    assert same_up_to_sign(raw.project(x), reference.transform(x), atol=1e-4)
    assert raw.pca_explained == pytest.approx(reference.explained_variance_ratio_.sum(), abs=1e-5)
    # unit vectors (normalize): the same transform, re-normalised like the uncentred path's
    unit = Codec.fit(x, "float32", pca=8, center=True)
    expected = reference.transform(x)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert same_up_to_sign(unit.project(x), expected, atol=1e-4)
    # and blind to a vector's scale, as uncentred PCA is
    assert np.allclose(unit.project(3 * x[:5]), unit.project(x[:5]), atol=1e-6)


@pytest.mark.slow
def test_centred_pca_after_truncation_centres_the_truncated_space():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = unit_vectors(600, 32)
    codec = Codec.fit(x, "float32", dim=24, pca=8, center=True)
    head = x[:, :24] / np.linalg.norm(x[:, :24], axis=1, keepdims=True)
    expected = decomposition.PCA(n_components=8).fit(head.astype(np.float64)).transform(head)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert same_up_to_sign(codec.project(x), expected, atol=1e-4)
    assert codec.describe() == "32 -> dim 24 -> pca 8 centred -> float32 (32 B/vector)"


@pytest.mark.parametrize("to", ["float32", "float16", "int8", "binary"])
def test_centred_codec_json_round_trip_and_identity(to):
    x = unit_vectors(400, 32)
    codec = Codec.fit(x, to, pca=12, center=True)
    again = Codec.from_json(codec.to_json())
    assert again.to_json() == codec.to_json() and again == codec
    assert np.array_equal(again.pca_mean, codec.pca_mean)
    assert np.array_equal(again.encode(x), codec.encode(x))
    assert codec_from_meta(codec.metadata()) == codec
    uncentred = Codec.fit(x, to, pca=12)
    assert uncentred != codec and "mean" not in json.loads(uncentred.to_json())["pca"]


def test_tampered_mean_is_refused():
    from vecpipe.formats.errors import DataError

    data = json.loads(Codec.fit(unit_vectors(100, 16), "float32", pca=4, center=True).to_json())
    mean = np.zeros(16, np.float32)
    data["pca"]["mean"]["float32_base64"] = base64.b64encode(mean.tobytes()).decode()
    with pytest.raises(DataError, match="sha256"):
        Codec.from_dict(data)


def test_old_codec_json_without_a_mean_loads_as_uncentred():
    x = unit_vectors(300, 32)
    codec = Codec.fit(x, "int8", pca=8)
    data = json.loads(codec.to_json())
    assert set(data["pca"]) == {"components", "kept_energy", "sha256"}  # the format as it was
    old = Codec.from_dict(data)
    assert not old.is_centred and old.pca_mean is None and old == codec
    assert np.array_equal(old.encode(x), codec.encode(x))
    assert "centred" not in old.describe()


@pytest.mark.parametrize("steps", [{"pca": 8}, {"dim": 24, "pca": 8}])
@pytest.mark.parametrize("normalize", [True, False])
def test_lift_inverts_project_for_centred_pca(steps, normalize):
    x = unit_vectors(500, 32)
    codec = Codec.fit(x, "float32", center=True, normalize=normalize, **steps)
    reduced = codec.project(x[:20])
    lifted = codec.lift(reduced)
    assert lifted.shape == (20, 32)
    assert np.allclose(codec.project(lifted), reduced, atol=1e-5)


def test_centre_without_pca_is_refused():
    with pytest.raises(UsageError, match="PCA"):
        Codec.fit(unit_vectors(50, 16), "float32", center=True)


# ----- the command -----------------------------------------------------------------------------
def test_pca_center_without_pca_is_a_usage_error(cli, tmp_path):
    src = write_arrow(tmp_path / "v.arrow", unit_vectors(50, 32))
    for args in (["--pca-center"], ["--dtype", "int8", "--pca-center"]):
        r = cli("compress", src, *args, "--output-format", "jsonl")
        assert r.exit_code == 2 and r.stdout == "", (args, r)
        assert "--pca-center" in r.stderr and "--pca N" in r.stderr
    saved = tmp_path / "codec.json"
    saved.write_text(Codec.fit(unit_vectors(50, 32), "int8").to_json())
    r = cli("compress", src, "--codec", saved, "--pca-center", "--output-format", "jsonl")
    assert r.exit_code == 2 and "drop --pca-center" in r.stderr


def test_save_codec_then_codec_gives_identical_output(cli, tmp_path):
    x = unit_vectors(600, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    saved, first, second = tmp_path / "codec.json", tmp_path / "a.arrow", tmp_path / "b.arrow"
    r = cli("compress", src, "--pca", "12", "--pca-center", "--dtype", "int8",
            "--save-codec", saved, "-o", first)
    assert r.exit_code == 0, r
    assert "pca 12 centred" in r.stderr
    assert cli("compress", src, "--codec", saved, "-o", second).exit_code == 0
    codes_a, meta_a = read_codes(first)
    codes_b, meta_b = read_codes(second)
    assert np.array_equal(codes_a, codes_b) and meta_a["codec"] == meta_b["codec"]
    codec = Codec.load(str(saved))
    assert codec.is_centred and codec == codec_from_meta(meta_a)
    assert np.allclose(codec.pca_mean, x.mean(axis=0), atol=1e-6)
    assert np.array_equal(codes_a, Codec.fit(x, "int8", pca=12, center=True).encode(x))


def test_old_codec_file_without_mean_applies_uncentred(cli, tmp_path):
    x = unit_vectors(300, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    data = json.loads(Codec.fit(x, "float32", pca=8, model="fake:32").to_json())
    assert "mean" not in data["pca"]
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(data))
    out = tmp_path / "c.arrow"
    assert cli("compress", src, "--codec", saved, "-o", out).exit_code == 0
    codes, _ = read_codes(out)
    projected = x @ Codec.from_dict(data).pca_components
    assert np.allclose(codes, projected / np.linalg.norm(projected, axis=1, keepdims=True),
                       atol=1e-6)


def brute_force(queries, vectors, k):
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def hits_by_query(records):
    got = {}
    for hit in records:
        got.setdefault(hit["query_id"], []).append(int(hit["id"][1:]))
    return got


def test_index_of_centred_codes_searches_with_the_same_transform(cli, tmp_path, write_jsonl):
    from vecpipe.cli.models import load_model

    x = unit_vectors(400, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    codes_path, idx = tmp_path / "c.arrow", tmp_path / "idx"
    assert cli("compress", src, "--pca", "12", "--pca-center", "-o", codes_path).exit_code == 0
    r = cli("index", codes_path, "-o", idx)
    assert r.exit_code == 0, r
    codec = codec_from_meta(read_codes(codes_path)[1])
    docs = codec.project(x)  # what the index holds (float32 codes are the projection)
    # vector queries, and text queries embedded by the index's model (fake:32)
    vectors = unit_vectors(6, 32, seed=7)
    texts = [f"query about {i}" for i in range(6)]
    vector_file = write_jsonl(tmp_path / "qv.jsonl", [{"id": f"q{i}", "embedding": v.tolist()}
                                                      for i, v in enumerate(vectors)])
    text_file = write_jsonl(tmp_path / "qt.jsonl", [{"id": f"q{i}", "text": t}
                                                    for i, t in enumerate(texts)])
    for queries, path in ((vectors, vector_file), (load_model("fake:32").encode(texts),
                                                   text_file)):
        truth = brute_force(codec.project(queries), docs, 5)
        uncentred = Codec.fit(x, "float32", pca=12)
        other = brute_force(uncentred.project(queries), uncentred.project(x), 5)
        assert not np.array_equal(truth, other)  # the centring changes the ranking
        r = cli("search", idx, path, "--exact", "-k", 5, "--output-format", "jsonl")
        assert r.exit_code == 0, r
        got = hits_by_query(r.records())
        assert [got[f"q{i}"] for i in range(6)] == truth.tolist()


def test_report_has_query_latency_in_text_and_json(cli, tmp_path):
    x = unit_vectors(1500, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--pca", "8", "--pca-center", "--report", "--save-report", "-",
            "-o", out)
    assert r.exit_code == 0, r
    facts = json.loads(r.stdout)
    # the fields the report had keep their shape
    assert {"vectors", "codec", "bytes_per_vector", "kept_energy", "quantization",
            "retrieval", "pca_kept_energy_calibration"} <= set(facts)
    assert facts["codec"] == "32 -> pca 8 centred -> float32 (32 B/vector)"
    latency = facts["query_latency"]
    assert latency["queries"] == 100 and latency["corpus"] == 1500 and latency["k"] == 10
    assert latency["repeats"] == 5
    assert latency["float32_ms"] > 0 and latency["codes_ms"] > 0
    assert latency["speedup"] == pytest.approx(latency["float32_ms"] / latency["codes_ms"],
                                               rel=0.02)
    assert "latency" in r.stderr and "ms/query" in r.stderr
    # kept energy of centred PCA: the share of the centred vectors' squared norm
    centred = x - x.mean(axis=0)
    codec = Codec.fit(x, "float32", pca=8, center=True)
    share = ((centred @ codec.pca_components) ** 2).sum(1) / (centred ** 2).sum(1)
    assert facts["kept_energy"] == pytest.approx(share.mean(), abs=1e-4)


def test_like_search_over_a_centred_pca_index_uses_the_decoded_vectors(cli, tmp_path):
    """--like builds the query from stored codes, lifted back to the input space: encoding
    that again must give the decoded vectors, so the liked record is its own best match."""
    x = unit_vectors(300, 32)
    codes_path, idx = tmp_path / "c.arrow", tmp_path / "idx"
    assert cli("compress", write_arrow(tmp_path / "v.arrow", x), "--pca", "8", "--pca-center",
               "-o", codes_path).exit_code == 0
    assert cli("index", codes_path, "-o", idx).exit_code == 0
    codec = codec_from_meta(read_codes(codes_path)[1])
    docs = codec.project(x)
    r = cli("search", idx, "--like", "d5", "--exact", "-k", 5, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    truth = [row for row in np.argsort(-(docs @ docs[5]), kind="stable") if row != 5][:5]
    assert [int(hit["id"][1:]) for hit in r.records()] == truth
