"""core.bert_encoder, BERT folders without sentence-transformers: its GELU against math.erf,
which folders it takes and why it refuses the others (the CLI then falls back to
sentence-transformers), and, against sentence-transformers itself, its token ids, vectors
(batched, long, prompted; the numpy forward and the torch one, float32 and bfloat16),
truncation counts and search results; that search --query with the numpy forward imports no
torch, and embed with the torch one no sentence-transformers or transformers."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vecpipe.cli import models
from vecpipe.cli.app import app
from vecpipe.core import notices, bert_encoder
from vecpipe.formats.errors import DataError, UsageError

DOCS = [{"id": f"d{i}", "text": f"document {i} about topic {i % 3}: "
         + "vitamins, bones and sleep " * (i % 4)} for i in range(12)]
LONG = [" ".join(f"word{i} lorem ipsum dolor" for i in range(150)),    # far over 256 tokens
        "Über naïve café déjà vu — 東京 " * 60,
        "short", "x " * 300]
MIXED = ["a", "vitamin D and bone loss", "what does the liver do when one fasts for three "
         "days and then eats a large meal?", *LONG]
HEAVY = ("torch", "transformers", "sentence_transformers")


@pytest.fixture
def fresh_model_cache(monkeypatch):
    monkeypatch.setattr(models, "_cache", {})


def _copy_of(folder, tmp_path, edits: dict) -> Path:
    """The model folder with its files linked and the JSON files in `edits` changed
    ({relative path: function(dict) -> dict, or None to leave the file out})."""
    copy = tmp_path / "model"
    for root, _, files in os.walk(folder):
        for name in files:
            source = Path(root) / name
            relative = source.relative_to(folder).as_posix()
            target = copy / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if relative not in edits:
                target.symlink_to(source)
            elif edits[relative] is not None:
                target.write_text(json.dumps(edits[relative](json.loads(source.read_text()))))
    return copy


def _setting(**changes):
    return lambda config: {**config, **changes}


# ---- GELU ---------------------------------------------------------------------------------------

def test_gelu_is_the_exact_erf_gelu_to_float32_rounding():
    x = np.concatenate([np.linspace(-12, 12, 240_001), [-1e4, -40.0, 0.0, 40.0, 1e4]])
    exact = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    got = bert_encoder.gelu(x.astype(np.float32)).astype(np.float64)
    error = np.abs(got - exact) / np.maximum(np.abs(x), 1.0)
    assert error.max() <= 2.5e-7
    tanh_approximation = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert (np.abs(tanh_approximation - exact) / np.maximum(np.abs(x), 1.0)).max() > 1e-4
    assert bert_encoder.gelu(np.float32([-30.0]))[0] == 0.0  # 0 as torch gives, no denormal


# ---- which folders it runs ----------------------------------------------------------------------

def test_the_bundled_model_is_eligible(bundled_model_path):
    plan = bert_encoder.read_plan(bundled_model_path)
    assert (plan.pooling, plan.normalize, plan.max_length) == ("mean", True, 256)


@pytest.mark.parametrize("edits, reason", [
    ({"1_Pooling/config.json": _setting(pooling_mode_mean_tokens=False,
                                        pooling_mode_mean_sqrt_len_tokens=True)},
     "pooling pooling_mode_mean_sqrt_len_tokens"),
    ({"1_Pooling/config.json": _setting(pooling_mode_cls_token=True)}, "pooling mean+cls"),
    ({"1_Pooling/config.json": _setting(include_prompt=False)}, "leaves the prompt out"),
    ({"config.json": _setting(model_type="roberta")}, "model_type is 'roberta'"),
    ({"config.json": _setting(hidden_act="gelu_new")}, "hidden_act is 'gelu_new'"),
    ({"config.json": _setting(position_embedding_type="relative_key")},
     "position_embedding_type is 'relative_key'"),
    ({"config.json": _setting(auto_map={"AutoModel": "x.Model"})}, "its own Python code"),
    ({"modules.json": lambda m: m + [{"idx": 3, "name": "3", "path": "3_Dense",
                                      "type": "sentence_transformers.models.Dense"}]},
     "modules are Transformer, Pooling, Normalize, Dense"),
    ({"tokenizer.json": None}, "no tokenizer.json"),
    ({"sentence_bert_config.json": _setting(max_seq_length=None)}, "no max_seq_length"),
    ({"tokenizer_config.json": _setting(do_lower_case=False)}, "do_lower_case disagrees"),
    ({"tokenizer_config.json": _setting(padding_side="left")}, "on the left"),
    ({"config_sentence_transformers.json": _setting(default_prompt_name="query",
                                                    prompts={"query": "q: "})},
     "default prompt"),
])
def test_folders_it_cannot_run_exactly_are_refused_with_the_reason(bundled_model_path, tmp_path,
                                                                   edits, reason):
    folder = _copy_of(bundled_model_path, tmp_path, edits)
    with pytest.raises(bert_encoder.NotEligible, match=re.escape(reason)):
        bert_encoder.read_plan(str(folder))
    with pytest.raises(DataError, match="--backend numpy cannot run model .*" + re.escape(reason)):
        models.load_model(str(folder), backend="numpy")


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_cls_and_max_pooling_are_taken(bundled_model_path, tmp_path, pooling):
    key = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}[pooling]
    edits = {"1_Pooling/config.json": _setting(pooling_mode_mean_tokens=False, **{key: True})}
    folder = _copy_of(bundled_model_path, tmp_path, edits)
    assert bert_encoder.read_plan(str(folder)).pooling == pooling


def test_numpy_is_refused_for_other_devices_and_precisions(bundled_model_path, fresh_model_cache):
    with pytest.raises(DataError, match="runs on the CPU, not cuda"):
        models.load_model(bundled_model_path, backend="numpy", device="cuda")
    with pytest.raises(DataError, match="computes float32, not float16"):
        models.load_model(bundled_model_path, backend="numpy", dtype="float16")


def test_max_length_lowers_the_window_and_cannot_exceed_it(fresh_model_cache):
    model = models.load_model(None, backend="numpy", max_length=8)
    assert model.max_length == 8
    features = model.tokenize(["one two three four five six seven eight nine ten", "one"])
    assert features["input_ids"].shape == (2, 8)
    assert model.count_truncated(["one two three four five six seven eight nine ten", "one"],
                                 features) == 1
    with pytest.raises(UsageError, match="exceeds the model's window of 256"):
        models.load_model(None, backend="numpy", max_length=1000)


def test_search_backend_choices(cli, tmp_path, write_jsonl):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert cli("embed", docs, "-m", "fake:16", "-o", tmp_path / "d.arrow", "-q").exit_code == 0
    result = cli("search", tmp_path / "d.arrow", "--query", "x", "--backend", "onnx")
    assert result.exit_code == 2
    assert "--backend onnx: search embeds queries with auto|torch|numpy" in result.stderr
    assert cli("search", tmp_path / "d.arrow", "--query", "x", "--backend", "numpy",
               "-q").exit_code == 0  # a fake model is the same with any backend


# ---- against sentence-transformers (slow: torch) ------------------------------------------------

@pytest.fixture(scope="module")
def numpy_model():
    return bert_encoder.load(models.bundled_model_path(), models.BUNDLED_NAME,
                              models.weights_sha(models.bundled_model_path()))


def _st_ids(bundled_model, texts):
    features = bundled_model.preprocess(list(texts))
    return [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"],
                                                           features["attention_mask"])]


def _np_ids(model, texts):
    features = model.tokenize(list(texts))
    return [row[mask.astype(bool)].tolist() for row, mask in zip(features["input_ids"],
                                                                 features["attention_mask"])]


@pytest.mark.slow
def test_nfcorpus_queries_equal_sentence_transformers(numpy_model, bundled_model, nfcorpus):
    with open(nfcorpus / "queries.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:400]
    assert _np_ids(numpy_model, texts) == _st_ids(bundled_model, texts)
    expected = bundled_model.encode(texts, batch_size=32, normalize_embeddings=True)
    assert np.abs(numpy_model.encode(texts, batch_size=32) - expected).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["", "query: "])
def test_long_prompted_mixed_batches_equal_sentence_transformers(numpy_model, bundled_model,
                                                                 prompt):
    expected = bundled_model.encode(MIXED, batch_size=4, prompt=prompt or None,
                                    normalize_embeddings=True)
    batched = numpy_model.encode(MIXED, batch_size=4, prompt=prompt)
    one_by_one = np.concatenate([numpy_model.encode([t], prompt=prompt) for t in MIXED])
    assert np.abs(batched - expected).max() <= 1e-5
    assert np.abs(one_by_one - batched).max() <= 1e-5
    prompted = [prompt + text for text in MIXED]
    assert _np_ids(numpy_model, prompted) == _st_ids(bundled_model, prompted)
    assert max(map(len, _np_ids(numpy_model, prompted))) == 256


@pytest.mark.slow
def test_the_embedder_interface_matches_the_torch_one(numpy_model, fresh_model_cache):
    torch_model = models.load_model(None, device="cpu")
    for key in ("name", "sha", "dim", "max_length", "prompts", "normalizes"):
        assert getattr(numpy_model, key) == getattr(torch_model, key), key
    for prompt in ("", "query: "):
        assert numpy_model.count_truncated(MIXED, numpy_model.tokenize(MIXED, prompt), prompt) \
            == torch_model.count_truncated(MIXED, torch_model.tokenize(MIXED, prompt), prompt)
        assert numpy_model.prompt_tokens(prompt) == torch_model.prompt_tokens(prompt)
    assert numpy_model.count_truncated(MIXED, numpy_model.tokenize(MIXED)) == 3
    assert numpy_model.token_spans(MIXED) == torch_model.token_spans(MIXED)
    assert numpy_model.special_tokens() == torch_model.special_tokens() == 2
    for dim, normalize in ((None, True), (64, True), (64, False)):
        assert np.abs(numpy_model.encode(MIXED, normalize=normalize, dim=dim)
                      - torch_model.encode(MIXED, normalize=normalize, dim=dim)).max() <= 1e-5
    meta = {**torch_model.metadata(), "backend": "numpy"}
    assert numpy_model.metadata() == meta


@pytest.mark.slow
def test_auto_falls_back_to_torch_saying_why_under_debug(bundled_model_path, tmp_path, capsys,
                                                         monkeypatch, fresh_model_cache):
    folder = _copy_of(bundled_model_path, tmp_path, {
        "1_Pooling/config.json": _setting(pooling_mode_mean_tokens=False,
                                          pooling_mode_cls_token=True)})
    folder = _copy_of(folder, tmp_path / "second", {"config.json": _setting(hidden_act="relu")})
    assert models.load_model(str(folder), backend="auto").backend == "torch"
    assert "numpy runtime" not in capsys.readouterr().err
    monkeypatch.setenv("VECPIPE_DEBUG", "1")
    notices.configure("vecpipe")  # not quiet (an earlier command's -q may have left it so)
    models._cache.clear()
    assert models.load_model(str(folder), backend="auto").backend == "torch"
    assert "the numpy runtime cannot run it: config.json hidden_act is 'relu'" \
        in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """An index of DOCS made with the torch backend (so its model_sha is torch's)."""
    folder = tmp_path_factory.mktemp("real")
    runner = CliRunner()
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for args in (["embed", docs, "-o", folder / "docs.arrow", "-q"],
                 ["index", folder / "docs.arrow", "-o", folder / "idx", "--flat", "-q"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return folder


def _hits(result):
    assert result.exit_code == 0, result.stderr
    return {(r["query_id"], r["id"]): r["score"] for r in result.records()}


@pytest.mark.slow
def test_search_results_equal_the_torch_backend(cli, real_index, write_jsonl, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl",
                          [{"id": f"q{i}", "text": t} for i, t in enumerate(MIXED)])
    for args in (["--query", "vitamin D and bone loss", "--query", LONG[0]], [queries]):
        by = {backend: _hits(cli("search", real_index / "idx", *args, "-k", "5", "--backend",
                                 backend)) for backend in ("auto", "numpy", "torch")}
        assert by["auto"].keys() == by["numpy"].keys() == by["torch"].keys()
        assert len(by["torch"]) == 5 * (len(args) // 2 if args[0] == "--query" else len(MIXED))
        for key, score in by["torch"].items():
            assert abs(by["numpy"][key] - score) <= 1e-5
            assert by["auto"][key] == by["numpy"][key]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_embed_equals_sentence_transformers(cli, real_index, bundled_model, backend):
    docs = real_index / "docs.jsonl"
    made = cli("embed", docs, "--backend", backend, "--dim", "128", "-o", "-",
               "--output-format", "jsonl", "-q")
    assert made.exit_code == 0, made.stderr
    got = np.array([r["embedding"] for r in made.records()])
    expected = bundled_model.encode([d["text"] for d in DOCS], truncate_dim=128,
                                    normalize_embeddings=True)
    assert got.shape == (len(DOCS), 128)
    assert np.abs(got - expected).max() <= 1e-5


# ---- the torch forward (TorchBert): embed's torch backend on a CPU ------------------------------

@pytest.mark.slow
def test_the_torch_forward_equals_sentence_transformers(bundled_model, fresh_model_cache):
    model = models.load_model(None, device="cpu", needs_st=False)
    assert isinstance(model.bert, bert_encoder.TorchBert) and (model.backend, model.precision) == \
        ("torch", "float32")
    reference = models.load_model(None, device="cpu")  # sentence-transformers' Embedder
    assert reference.st is not None
    for prompt in ("", "query: "):
        expected = bundled_model.encode(MIXED, batch_size=4, prompt=prompt or None,
                                        normalize_embeddings=True)
        assert np.abs(model.encode(MIXED, batch_size=4, prompt=prompt) - expected).max() \
            <= 1e-5
        assert model.token_lengths(MIXED, prompt) == reference.token_lengths(MIXED, prompt)
    assert model.metadata(prompt="query: ", dim=64) == \
        reference.metadata(prompt="query: ", dim=64)
    for layers, pooling in ((3, None), (None, "cls"), (2, "max")):
        cut = models.load_model(None, device="cpu", needs_st=False, layers=layers,
                                pooling=pooling)
        same = models.load_model(None, device="cpu", layers=layers, pooling=pooling)
        assert np.abs(cut.encode(MIXED) - same.encode(MIXED)).max() <= 1e-5
        assert cut.metadata() == same.metadata()


@pytest.mark.slow
def test_the_torch_forward_in_bfloat16_keeps_cosine_0_9999(fresh_model_cache):
    exact = models.load_model(None, device="cpu", needs_st=False).encode(MIXED)
    model = models.load_model(None, device="cpu", dtype="bfloat16", needs_st=False)
    assert isinstance(model, bert_encoder.BertEncoder) and model.precision == "bfloat16"
    assert model.metadata()["precision"] == "bfloat16"
    cosines = (model.encode(MIXED) * exact).sum(axis=1)
    assert cosines.mean() >= 0.9999 and cosines.min() >= 0.999, cosines


@pytest.mark.slow
def test_sentence_transformers_runs_what_the_torch_forward_cannot(bundled_model_path, tmp_path,
                                                                  capsys, monkeypatch,
                                                                  fresh_model_cache):
    lowered = models.load_model(None, device="cpu", max_length=8, needs_st=False)
    assert isinstance(lowered, bert_encoder.BertEncoder) and lowered.max_length == 8
    for kwargs in ({"dtype": "float16"}, {"max_length": 300}, {"needs_st": True}):
        model = models.load_model(None, device="cpu", **{"needs_st": False, **kwargs})
        assert model.st is not None, kwargs
    assert models.load_model(None, device="cpu", max_length=300, needs_st=False).max_length \
        == 300  # past the trained window, up to the position table, as sentence-transformers
    folder = _copy_of(bundled_model_path, tmp_path, {"config.json": _setting(hidden_act="relu")})
    monkeypatch.setenv("VECPIPE_DEBUG", "1")
    notices.configure("vecpipe")
    assert models.load_model(str(folder), device="cpu", needs_st=False).st is not None
    assert "sentence-transformers runs it, as core.bert_encoder cannot: config.json " \
        "hidden_act is 'relu'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--batch-tokens", "2048"], ["--chunk-tokens", "40"]])
def test_embed_imports_neither_transformers_nor_sentence_transformers(real_index, tmp_path,
                                                                      extra):
    out = tmp_path / "out.jsonl"
    script = ("import sys\n"
              "from vecpipe.cli.app import main\n"
              f"sys.argv = ['vecpipe', 'embed', {str(real_index / 'docs.jsonl')!r}, *{extra!r},"
              f" '-o', {str(out)!r}, '-q']\n"
              "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop\n"
              f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['torch']"
    assert len(out.read_text().splitlines()) >= len(DOCS)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--query", "file", "stdin lines"])
def test_search_with_the_numpy_runtime_imports_no_torch(real_index, tmp_path, how):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "a", "text": "topic 1"}\n{"id": "b", "text": "sleep"}\n')
    argv = {"--query": ["--query", "topic 1"], "file": [str(queries)], "stdin lines": []}[how]
    script = ("import sys\n"
              "from vecpipe.cli.app import main\n"
              f"sys.argv = ['vecpipe', 'search', {str(real_index / 'idx')!r}, *{argv!r},"
              f" '-k', '3', '-o', {str(tmp_path / 'hits.jsonl')!r}, '-q']\n"
              "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop\n"
              f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         input="topic 1\nsleep\n" if how == "stdin lines" else None,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    lines = (tmp_path / "hits.jsonl").read_text().splitlines()
    assert len(lines) == 3 * (1 if how == "--query" else 2)
