"""eval suite: tasks against models in one command; Borda rank as MTEB computes it, the paired
bootstrap's p-values, MTEB files from every task, and the shipped NFCorpus suite reproducing
MTEB's published score."""
import json
from pathlib import Path

import numpy as np
import pytest

from vecpipe.core import suite as s

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "data" / "eval" / "tinybeir"


def write_suite(path, models, tasks):
    lines = [f"models = {json.dumps(models)}"]
    for task in tasks:
        lines.append("[[tasks]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in task.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sts_rows(n=30):
    rng = np.random.default_rng(1)
    words = ["cat", "dog", "fish", "bird", "tree", "car"]
    return [{"sentence1": " ".join(rng.choice(words, 3)), "sentence2": " ".join(rng.choice(words, 3)),
             "score": float(rng.integers(0, 5))} for _ in range(n)]


# ---------------------------------------------------------------- Borda rank and p-values

def test_borda_rank_equals_mteb():
    pl = pytest.importorskip("polars")
    pytest.importorskip("mteb")
    from mteb.benchmarks._create_table import _get_borda_rank

    rng = np.random.default_rng(0)
    for trial in range(20):
        scores = rng.integers(0, 4, size=(5, 6)).astype(float) / 4  # many ties
        frame = pl.DataFrame({f"t{j}": scores[:, j] for j in range(scores.shape[1])})
        expected = frame.select(_get_borda_rank(list(frame.columns))).to_series().to_list()
        assert s.borda_ranks(scores.tolist()) == expected, trial


def test_identical_models_are_not_different_and_far_ones_are():
    rng = np.random.default_rng(4)
    units = rng.random(200)
    assert s.compare(units, units) == 1.0
    assert s.compare(units, units + 0.2) == pytest.approx(1 / (s.RESAMPLES + 1))
    noisy = units + rng.normal(scale=0.3, size=200) * 0.01
    p = s.compare(units, noisy, seed=3)
    assert 0 < p <= 1 and p == s.compare(units, noisy, seed=3)  # seeded
    assert s.compare(units, units[:-1]) is None and s.compare(None, units) is None


def test_units_are_a_function_of_the_selection():
    a, b = np.arange(50.0), np.arange(50.0) + 1
    by_mean = s.compare(list(a), list(b), seed=1)
    by_function = s.compare(s.Units(lambda rows: a[rows].mean(), 50),
                            s.Units(lambda rows: b[rows].mean(), 50), seed=1)
    assert by_mean == by_function


# ---------------------------------------------------------------- the command

def test_suite_runs_every_task_against_every_model(cli, tmp_path, write_jsonl, mteb_cache):
    sts = write_jsonl(tmp_path / "sts.jsonl", sts_rows())
    path = write_suite(tmp_path / "suite.toml", ["fake:16", "fake:24"], [
        {"name": "Tiny", "command": "beir", "args": [str(TINY)]},
        {"name": "MySTS", "command": "sts", "args": ["sts.jsonl"], "languages": "eng-Latn"}])
    out = tmp_path / "results"
    r = cli("eval", "suite", path, "--save-mteb", out)
    assert r.exit_code == 0, r
    records = r.records()
    assert [rec["model"] for rec in records] == ["fake:16", "fake:24"]
    for rec in records:  # the same numbers as the commands run alone
        alone_beir = cli("eval", "beir", TINY, "-m", rec["model"]).records()[0]
        alone_sts = cli("eval", "sts", sts, "-m", rec["model"]).records()[0]
        assert rec["scores"] == {"Tiny": alone_beir["main_score"],
                                 "MySTS": alone_sts["main_score"]}
    assert records[0]["p_values"] == {"Tiny": None, "MySTS": None}
    assert all(0 < p <= 1 for p in records[1]["p_values"].values())
    scores = [[rec["scores"][t] for t in ("Tiny", "MySTS")] for rec in records]
    assert [rec["borda_rank"] for rec in records] == s.borda_ranks(scores)
    loaded = mteb_cache(out)
    assert sorted((m.model_name, t.task_name) for m in loaded.model_results
                  for t in m.task_results) == [("fake:16", "MySTS"), ("fake:16", "Tiny"),
                                               ("fake:24", "MySTS"), ("fake:24", "Tiny")]


@pytest.fixture
def mteb_cache(tmp_path):
    mteb = pytest.importorskip("mteb")

    def load(results_folder: Path):
        cache = tmp_path / "mteb-cache"
        cache.mkdir(exist_ok=True)
        (cache / "results").symlink_to(results_folder)
        return mteb.ResultCache(cache_path=cache).load_results(include_remote=False,
                                                               require_model_meta=True)
    return load


def test_suite_table_marks_significant_differences(cli, tmp_path, write_jsonl):
    write_jsonl(tmp_path / "sts.jsonl", sts_rows(80))
    path = write_suite(tmp_path / "suite.toml", ["fake:16", "fake:16", "fake:64"], [
        {"name": "MySTS", "command": "sts", "args": ["sts.jsonl"]}])
    r = cli("eval", "suite", path, "--output-format", "table")
    assert r.exit_code == 0, r
    assert "Borda rank" in r.stdout and "paired bootstrap" in r.stdout
    records = cli("eval", "suite", path).records()
    assert records[1]["p_values"]["MySTS"] == 1.0  # the same model: no difference
    assert records[0]["borda_rank"] == records[1]["borda_rank"]


@pytest.mark.parametrize("content, message", [
    ('models = ["fake:8"]\n', "no tasks"),
    ('models = ["fake:8"]\n[[tasks]]\nname = "x"\ncommand = "retrieval"\n', "is not one of"),
    ('models = ["fake:8"]\n[[tasks]]\ncommand = "sts"\n', "task 1 has no name"),
    ('models = "fake:8"\n[[tasks]]\nname = "x"\ncommand = "sts"\n', "models must be a list"),
    ('model = ["fake:8"]\n', "unknown key 'model'"),
    ('models = [\n', "not a suite file"),
    ('models = ["fake:8"]\n[[tasks]]\nname = "x"\ncommand = "sts"\nargs = ["-m", "y"]\n',
     "not -m"),
])
def test_bad_suite_files(cli, tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    r = cli("eval", "suite", path)
    assert r.exit_code == 1, r
    assert message in r.stderr and str(path) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2


def test_a_failing_task_stops_the_suite_with_its_error(cli, tmp_path):
    path = write_suite(tmp_path / "suite.toml", ["fake:8"], [
        {"name": "x", "command": "sts", "args": ["missing.jsonl"]}])
    r = cli("eval", "suite", path)
    assert r.exit_code == 1 and "missing.jsonl" in r.stderr and r.stdout == ""
    assert f"hint: task x of {path}, model fake:8" in r.stderr  # which task of which suite
    path = write_suite(tmp_path / "suite.toml", ["fake:8"], [
        {"name": "x", "command": "sts", "args": ["--no-such-option"]}])
    r = cli("eval", "suite", path)
    assert r.exit_code == 2 and "task x" in r.stderr and "--no-such-option" in r.stderr


@pytest.mark.parametrize("name, content", [("bad.toml", 'models = ["fake:8"]\n[[tasks]\n'),
                                           ("bad.json", '{"models": ["fake:8"],\n "tasks": [}')])
def test_a_broken_suite_file_is_located_to_its_line(cli, tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    r = cli("eval", "suite", path)
    assert r.exit_code == 1 and r.stderr.rstrip().endswith(f"({path}:2)"), r


def test_json_suite_files(cli, tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"models": ["fake:16"], "tasks": [
        {"name": "Tiny", "command": "beir", "args": [str(TINY), "--cutoffs", "10"]}]}))
    r = cli("eval", "suite", path)
    assert r.exit_code == 0, r
    assert r.records()[0]["scores"]["Tiny"] == cli(
        "eval", "beir", TINY, "-m", "fake:16").records()[0]["ndcg_at_10"]


@pytest.mark.slow
def test_shipped_suite_reproduces_the_published_nfcorpus_score(cli, nfcorpus, tmp_path):
    suite_file = ROOT / "docs" / "suites" / "nfcorpus.toml"
    if nfcorpus.resolve() != (suite_file.parent / "../../../shared/data/nfcorpus").resolve():
        pytest.skip("NFCorpus is not where the shipped suite names it (../shared/data)")
    r = cli("eval", "suite", suite_file, "--save-mteb", tmp_path / "results")
    assert r.exit_code == 0, r
    [record] = r.records()
    assert round(record["scores"]["NFCorpus"], 5) == 0.31594  # MTEB's published nDCG@10
    [path] = (tmp_path / "results").glob("sentence-transformers__all-MiniLM-L6-v2/*/NFCorpus.json")
    assert json.loads(path.read_text())["scores"]["test"][0]["languages"] == ["eng-Latn"]


def test_a_suite_embeds_each_text_once_per_model(cli, tmp_path, write_jsonl, monkeypatch):
    from vecpipe.core.embedder import Embedder

    write_jsonl(tmp_path / "sts.jsonl", sts_rows(20))
    embedded = []
    encode = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, texts, *args, **kwargs: (
        embedded.extend((self.name, text) for text in texts), encode(self, texts, *args,
                                                                      **kwargs))[1])
    path = write_suite(tmp_path / "suite.toml", ["fake:16", "fake:24"], [
        {"name": "A", "command": "sts", "args": ["sts.jsonl"]},
        {"name": "B", "command": "pair-classification", "args": ["pairs.jsonl"]}])
    write_jsonl(tmp_path / "pairs.jsonl", [dict(r, labels=i % 2) for i, r in
                                           enumerate(sts_rows(20))])  # the same sentences
    r = cli("eval", "suite", path)
    assert r.exit_code == 0, r
    assert len(embedded) == len(set(embedded))  # no text twice for one model
    assert {name for name, _ in embedded} == {"fake:16", "fake:24"}
    alone = cli("eval", "sts", tmp_path / "sts.jsonl", "-m", "fake:16").records()[0]
    assert r.records()[0]["scores"]["A"] == alone["main_score"]


def test_quiet_suites_say_nothing_on_stderr(cli, tmp_path):
    path = write_suite(tmp_path / "suite.toml", ["fake:16"], [
        {"name": "Tiny", "command": "beir", "args": [str(TINY)]}])
    r = cli("eval", "suite", path, "-q")
    assert r.exit_code == 0 and r.stderr == "" and r.records()
