"""2D Matryoshka: `embed --layers L` (the first L layers, pooled as the model pools), recorded in
the metadata so search embeds queries alike, and `eval beir --grid layers=... dims=...`."""
import json

import numpy as np
import pyarrow as pa
import pytest

DOCS = [{"id": "a", "text": "The cat sat on the mat."},
        {"id": "b", "text": "Stock markets fell sharply on Monday after the announcement."},
        {"id": "c", "text": "Photosynthesis turns light into chemical energy in plants."}]


def reference(model_path, texts, layers, prompt=""):
    """transformers' own hidden_states[layers], mean-pooled over the mask, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    batch = tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                      max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layers].numpy()
    mask = batch["attention_mask"].numpy()[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def read_arrow(path):
    table = pa.ipc.open_file(str(path)).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32), meta


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_layers_equal_transformers_hidden_states(cli, write_jsonl, tmp_path, bundled_model_path,
                                                 backend):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out.arrow"
    result = cli("embed", docs, "-m", bundled_model_path, "--layers", "3", "--backend", backend,
                 "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.stderr
    vectors, meta = read_arrow(out)
    expected = reference(bundled_model_path, [d["text"] for d in DOCS], 3)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    assert meta["vecpipe.layers"] == "3"
    full = reference(bundled_model_path, [d["text"] for d in DOCS], 6)
    assert np.abs(vectors - full).max() > 0.05  # layer 3 is not the last layer


@pytest.mark.slow
def test_search_embeds_queries_with_the_index_layers(cli, write_jsonl, tmp_path,
                                                      bundled_model_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert cli("embed", docs, "-m", bundled_model_path, "--layers", "2",
               "-o", tmp_path / "d.arrow").exit_code == 0
    assert cli("index", tmp_path / "d.arrow", "-o", tmp_path / "idx").exit_code == 0
    query = "a kitten resting on a rug"
    result = cli("search", tmp_path / "idx", "--query", query, "-k", "3",
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    scores = {hit["id"]: hit["score"] for hit in result.records()}
    texts = [d["text"] for d in DOCS]
    doc_vectors = reference(bundled_model_path, texts, 2)
    at_2 = doc_vectors @ reference(bundled_model_path, [query], 2)[0]
    at_6 = doc_vectors @ reference(bundled_model_path, [query], 6)[0]
    assert np.abs(at_2 - at_6).max() > 1e-3  # a full-depth query would score otherwise
    np.testing.assert_allclose([scores[d["id"]] for d in DOCS], at_2, atol=1e-4)


def test_layers_recorded_and_part_of_the_identity(cli, write_jsonl, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert cli("embed", docs, "-m", "fake:16", "--layers", "2",
               "-o", tmp_path / "l2.arrow").exit_code == 0
    assert cli("embed", docs, "-m", "fake:16", "-o", tmp_path / "all.arrow").exit_code == 0
    cut, meta = read_arrow(tmp_path / "l2.arrow")
    full, full_meta = read_arrow(tmp_path / "all.arrow")
    assert meta["vecpipe.layers"] == "2" and "vecpipe.layers" not in full_meta
    assert not np.allclose(cut, full)
    result = cli("index", tmp_path / "l2.arrow", tmp_path / "all.arrow", "-o", tmp_path / "idx")
    assert result.exit_code == 1
    assert "layers differs" in result.stderr and "all layers" in result.stderr


def test_cache_key_holds_layers():
    from vecpipe.cli.models import load_model

    assert "layers" not in load_model("fake:8").vector_settings()
    assert load_model("fake:8", layers=2).vector_settings()["layers"] == 2


def test_exported_backends_refuse_layers(cli, write_jsonl, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    result = cli("embed", docs, "--layers", "2", "--backend", "onnx", "-o", tmp_path / "x.arrow")
    assert result.exit_code == 2
    assert "--layers" in result.stderr and "torch or numpy" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_layers_beyond_the_model_refused(cli, write_jsonl, tmp_path, bundled_model_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    result = cli("embed", docs, "-m", bundled_model_path, "--backend", "numpy", "--layers", "7",
                 "-o", tmp_path / "x.arrow")
    assert result.exit_code == 2
    assert "1 to 6 layers" in result.stderr


def write_beir(folder):
    docs = [("d1", "Cats", "cats purr and sleep all day"), ("d2", "Dogs", "dogs bark loudly"),
            ("d3", "Fish", "fish swim in the water"), ("d4", "Birds", "birds fly and sing"),
            ("d5", "Cars", "cars drive on roads"), ("d6", "Tea", "green tea is a drink")]
    queries = [("q1", "what do cats do"), ("q2", "animals that bark"),
               ("q3", "swimming animals"), ("q4", "flying animals"), ("q5", "hot drinks")]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\nq4\td4\t2\nq4\td1\t1\n"
        "q5\td6\t1\nq5\td3\t1\n")
    return folder


@pytest.mark.parametrize("model", ["fake:32", pytest.param("bundled", marks=pytest.mark.slow)])
def test_sweep_cells_equal_single_cell_runs(cli, tmp_path, bundled_model_path, model):
    folder = write_beir(tmp_path / "tiny")
    spec = bundled_model_path if model == "bundled" else model
    dims = "8,16" if model.startswith("fake") else "64,384"
    result = cli("eval", "beir", folder, "-m", spec, "--grid", f"layers=2,3 dims={dims}",
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    cells = {(c["layers"], c["dim"]): c for c in result.records()}
    assert len(cells) == 4
    for layers, dim in [(2, int(dims.split(",")[0])), (3, int(dims.split(",")[1]))]:
        single = cli("eval", "beir", folder, "-m", spec, "--layers", str(layers),
                     "--dim", str(dim), "--output-format", "jsonl")
        assert single.exit_code == 0, single.stderr
        expected = single.records()[0]
        for key in ("ndcg_at_10", "recall_at_10", "map_at_10"):
            assert cells[(layers, dim)][key] == pytest.approx(expected[key], abs=1e-9)
    assert all(c["seconds_per_1k_docs"] >= 0 for c in cells.values())


def test_sweep_refuses_bad_values(cli, tmp_path):
    folder = write_beir(tmp_path / "tiny")
    result = cli("eval", "beir", folder, "-m", "fake:8", "--grid", "heads=2")
    assert result.exit_code == 2 and "--grid 'heads=2'" in result.stderr
    result = cli("eval", "beir", folder, "-m", "fake:8", "--grid", "dims=4", "--dim", "4")
    assert result.exit_code == 2 and "leave out --dim" in result.stderr
