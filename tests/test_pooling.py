"""`embed --pooling MODE` (instead of the model's own pooling), recorded for queries; and a
model's document prompt applied to documents by default, as its query prompt is to queries."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.",
         "Photosynthesis turns light into chemical energy in green plants and algae."]


def hidden_states(model_path, texts, prompt=""):
    """(last hidden state, attention mask) from transformers itself, right-padded."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    batch = tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                      max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.numpy()
    return hidden, batch["attention_mask"].numpy()


def pooled(hidden, mask, mode):
    """Each mode written out per text, over its attended tokens only."""
    rows = []
    for tokens, row_mask in zip(hidden, mask):
        kept = tokens[row_mask.astype(bool)]
        if mode == "cls":
            rows.append(kept[0])
        elif mode == "max":
            rows.append(kept.max(axis=0))
        elif mode == "lasttoken":
            rows.append(kept[-1])
        elif mode == "weightedmean":
            weights = np.arange(1, len(kept) + 1, dtype=np.float64)[:, None]
            rows.append((kept * weights).sum(0) / weights.sum())
        else:
            rows.append(kept.mean(axis=0))
    rows = np.array(rows)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def embed(cli, write_jsonl, tmp_path, *args, texts=TEXTS):
    docs = write_jsonl(tmp_path / "docs.jsonl",
                       [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out.arrow"
    result = cli("embed", docs, *args, "-o", out)
    assert result.exit_code == 0, result.stderr
    table = pa.ipc.open_file(str(out)).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32), meta


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("mode", ["cls", "max", "lasttoken", "weightedmean"])
def test_pooling_modes_equal_a_numpy_computation(cli, write_jsonl, tmp_path, bundled_model_path,
                                                 mode, backend):
    vectors, meta = embed(cli, write_jsonl, tmp_path, "-m", bundled_model_path, "--pooling",
                          mode, "--backend", backend, "--device", "cpu")
    np.testing.assert_allclose(vectors, pooled(*hidden_states(bundled_model_path, TEXTS), mode),
                               atol=2e-5)
    assert meta["vecpipe.pooling"] == mode


@pytest.mark.slow
def test_the_models_own_pooling_is_not_recorded(cli, write_jsonl, tmp_path, bundled_model_path):
    vectors, meta = embed(cli, write_jsonl, tmp_path, "-m", bundled_model_path,
                          "--pooling", "mean", "--backend", "numpy")
    assert "vecpipe.pooling" not in meta
    np.testing.assert_allclose(vectors, pooled(*hidden_states(bundled_model_path, TEXTS),
                                               "mean"), atol=2e-5)


@pytest.mark.slow
def test_search_pools_queries_as_the_index(cli, write_jsonl, tmp_path, bundled_model_path):
    embed(cli, write_jsonl, tmp_path, "-m", bundled_model_path, "--pooling", "cls")
    assert cli("index", tmp_path / "out.arrow", "-o", tmp_path / "idx").exit_code == 0
    query = "a kitten on a rug"
    result = cli("search", tmp_path / "idx", "--query", query, "-k", "3",
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    docs = pooled(*hidden_states(bundled_model_path, TEXTS), "cls")
    expected = docs @ pooled(*hidden_states(bundled_model_path, [query]), "cls")[0]
    scores = {hit["id"]: hit["score"] for hit in result.records()}
    np.testing.assert_allclose([scores[str(i)] for i in range(3)], expected, atol=1e-4)


def test_unknown_pooling_is_a_usage_error(cli, write_jsonl, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "x"}])
    result = cli("embed", docs, "-m", "fake:8", "--pooling", "median")
    assert result.exit_code == 2 and "--pooling 'median'" in result.stderr


@pytest.fixture
def prompted_model(tmp_path, bundled_model_path):
    """The bundled model's folder with a query and a document prompt."""
    folder = tmp_path / "prompted"
    shutil.copytree(bundled_model_path, folder, ignore=shutil.ignore_patterns("onnx"))
    config_path = folder / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["prompts"] = {"query": "query: ", "document": "passage: "}
    config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_documents_get_the_models_document_prompt(cli, write_jsonl, tmp_path, prompted_model,
                                                  backend):
    vectors, meta = embed(cli, write_jsonl, tmp_path, "-m", prompted_model,
                          "--backend", backend)
    assert meta["vecpipe.prompt"] == "passage: "
    hidden, mask = hidden_states(str(prompted_model), TEXTS, prompt="passage: ")
    np.testing.assert_allclose(vectors, pooled(hidden, mask, "mean"), atol=2e-5)
    plain, meta = embed(cli, write_jsonl, tmp_path, "-m", prompted_model, "--prompt", "",
                        "--backend", backend)
    assert "vecpipe.prompt" not in meta
    np.testing.assert_allclose(plain, pooled(*hidden_states(str(prompted_model), TEXTS), "mean"),
                               atol=2e-5)


@pytest.mark.slow
def test_eval_beir_applies_both_prompts_by_default(cli, tmp_path, prompted_model):
    folder = tmp_path / "tiny"
    (folder / "qrels").mkdir(parents=True)
    docs = ["cats purr and sleep", "dogs bark loudly", "fish swim in water", "birds sing"]
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": t}) + "\n"
        for i, t in enumerate(["what purrs", "what barks", "what swims"])))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\nq2\td3\t1\n")

    def scores(*args):
        result = cli("eval", "beir", folder, "-m", prompted_model, "--save-run",
                     tmp_path / "run.trec", *args, "--output-format", "jsonl")
        assert result.exit_code == 0, result.stderr
        return (tmp_path / "run.trec").read_text()

    default = scores()
    assert default == scores("--query-prompt", "query: ", "--doc-prompt", "passage: ")
    assert default != scores("--query-prompt", "", "--doc-prompt", "")
