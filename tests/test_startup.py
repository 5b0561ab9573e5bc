"""Search start-up (bench/startup.py measures it): a text query with a fake model imports none
of the heavy packages (nor pyarrow.dataset); a Ctrl-C while the model loads exits 130 in one
line; real query vectors are sentence-transformers' own, with the default (numpy) runtime and
with --backend torch (tests/test_bert_encoder.py checks the numpy runtime's imports)."""
import hashlib
import json
import signal
import subprocess
import sys
import threading

import pytest
from vecpipe.cli import models
from vecpipe.formats.errors import DataError

DOCS = [{"id": f"d{i}", "text": f"document {i} about topic {i % 3}"} for i in range(12)]


@pytest.fixture
def fake_index(cli, tmp_path, write_jsonl):
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    embedded = cli("embed", docs, "-m", "fake:16", "-o", tmp_path / "docs.arrow", "-q")
    assert embedded.exit_code == 0, embedded.stderr
    built = cli("index", tmp_path / "docs.arrow", "-o", tmp_path / "idx", "-q")
    assert built.exit_code == 0, built.stderr
    return tmp_path / "idx"


@pytest.fixture
def fresh_model_cache(monkeypatch):
    """Each test starts with no model loaded in this process."""
    monkeypatch.setattr(models, "_cache", {})


def test_a_bad_model_spec_is_one_usage_line(run_vecpipe, fake_index):
    result = run_vecpipe("search", fake_index, "--query", "x", "-m", "fake:0")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "vecpipe search: error: bad fake model 'fake:0'; use fake:DIM, e.g. fake:64"]


def test_ctrl_c_while_the_model_loads_exits_130(cli, fake_index, fresh_model_cache,
                                                monkeypatch):
    loading, release = threading.Event(), threading.Event()

    def slow_load(*args):
        loading.set()
        release.wait(30)
        raise DataError("released")

    def ctrl_c_once_loading():
        loading.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(models, "_load", slow_load)
    interrupter = threading.Thread(target=ctrl_c_once_loading)
    interrupter.start()
    try:
        result = cli("search", fake_index, "--query", "x")
    finally:
        release.set()
        interrupter.join()
    assert loading.is_set()
    assert result.exit_code == 130
    assert result.stderr.strip() == "vecpipe search: error: interrupted"


def test_search_query_with_a_fake_model_imports_no_torch(fake_index, tmp_path):
    """(pandas is not in the list: pyarrow imports it to check any Python list it converts.)"""
    script = ("import sys\n"
              "from vecpipe.cli.app import main\n"
              f"sys.argv = ['vecpipe', 'search', {str(fake_index)!r}, '--query', 'topic 1',"
              f" '-o', {str(tmp_path / 'hits.jsonl')!r}, '-q']\n"
              "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop\n"
              "heavy = {'torch', 'transformers', 'sentence_transformers', 'sklearn',"
              " 'datasets', 'pyarrow.dataset'}\n"
              "print(sorted(heavy & set(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert len((tmp_path / "hits.jsonl").read_text().splitlines()) == 10


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_real_query_vectors_equal_sentence_transformers(cli, tmp_path, write_jsonl,
                                                        bundled_model, bundled_model_path,
                                                        fresh_model_cache, backend):
    """Scores are the reference model's cosines (brute force); the model's sha is the weights'."""
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert cli("embed", docs, "-o", tmp_path / "docs.arrow", "-q").exit_code == 0
    assert cli("index", tmp_path / "docs.arrow", "-o", tmp_path / "idx", "--flat",
               "-q").exit_code == 0
    query = "what is topic 2 about?"
    result = cli("search", tmp_path / "idx", "--query", query, "-k", "12", "--backend", backend)
    assert result.exit_code == 0, result.stderr
    doc_vectors = bundled_model.encode([d["text"] for d in DOCS], normalize_embeddings=True)
    query_vector = bundled_model.encode([query], normalize_embeddings=True)[0]
    expected = {d["id"]: float(s) for d, s in zip(DOCS, doc_vectors @ query_vector)}
    got = {r["id"]: r["score"] for r in result.records()}
    assert got.keys() == expected.keys()
    assert max(abs(got[i] - expected[i]) for i in got) < 1e-6
    with open(f"{bundled_model_path}/model.safetensors", "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["metadata"]["model_sha"] == sha
    assert models.load_model(None).sha == models.load_model(None, backend="numpy").sha == sha
