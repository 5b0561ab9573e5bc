"""--save-mteb writes MTEB's TaskResult files that mteb's own result classes load: TaskResult,
ModelMeta and the ResultCache a leaderboard run reads, with the scores vecpipe printed."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core import mteb_results

TINY = Path(__file__).parent / "data" / "eval" / "tinybeir"


@pytest.fixture
def mteb():
    return pytest.importorskip("mteb")


def pairs_file(tmp_path, with_model=True, n=40):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(n, 8)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    b = (a * labels[:, None] + rng.normal(scale=1.0, size=(n, 8))).astype(np.float32)
    column = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)  # noqa: E731
    meta = {b"vecpipe.model": b"org/some-model", b"vecpipe.model_sha": b"abc123",
            b"vecpipe.dim": b"8"} if with_model else None
    table = pa.table({"sentence1": column(a), "sentence2": column(b), "labels": labels},
                     schema=pa.schema([("sentence1", pa.list_(pa.float32(), 8)),
                                       ("sentence2", pa.list_(pa.float32(), 8)),
                                       ("labels", pa.int64())], metadata=meta))
    path = tmp_path / "pairs.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def load_cache(mteb, folder):
    """What MTEB's leaderboard code reads: ResultCache over a folder holding results/."""
    return mteb.ResultCache(cache_path=folder).load_results(include_remote=False)


def test_the_format_is_the_installed_mteb_version(mteb):
    assert mteb_results.MTEB_VERSION == mteb.__version__


def test_pair_classification_result_loads_in_mteb(cli, tmp_path, mteb):
    from mteb.models.model_meta import ModelMeta
    from mteb.results import TaskResult

    pairs = pairs_file(tmp_path)
    results = tmp_path / "cache" / "results"
    r = cli("eval", "pair-classification", pairs, "--save-mteb", results,
            "--mteb-task", "MyPairs", "--mteb-languages", "eng-Latn")
    assert r.exit_code == 0, r
    record = r.records()[0]
    path = results / "org__some-model" / "abc123" / "MyPairs.json"
    assert f"MTEB result: {path}" in r.stderr
    loaded = TaskResult.from_disk(path)
    assert loaded.task_name == "MyPairs" and loaded.mteb_version == mteb.__version__
    assert loaded.dataset_revision.startswith("sha256:")
    scores = loaded.scores["test"][0]
    assert scores["hf_subset"] == "default" and scores["languages"] == ["eng-Latn"]
    for key in ("max_ap", "cosine_accuracy", "manhattan_f1", "dot_ap", "main_score"):
        assert scores[key] == pytest.approx(record[key], abs=1e-12)
    assert "pairs" not in scores and "model" not in scores and loaded.evaluation_time >= 0
    meta = ModelMeta.model_validate_json_resolved((path.parent / "model_meta.json").read_text())
    assert (meta.name, meta.revision, meta.embed_dim) == ("org/some-model", "abc123", 8)
    benchmark = load_cache(mteb, tmp_path / "cache")
    [model] = benchmark.model_results
    assert (model.model_name, model.model_revision) == ("org/some-model", "abc123")
    [task] = model.task_results
    assert task.task_name == "MyPairs" and task.get_score() == pytest.approx(record["max_ap"])


def test_dataset_revision_follows_the_data(cli, tmp_path, mteb):
    from mteb.results import TaskResult

    pairs = pairs_file(tmp_path)
    out = tmp_path / "results"
    cli("eval", "pair-classification", pairs, "--save-mteb", out)
    path = out / "org__some-model" / "abc123" / "pairs.json"  # task named by the file
    first = TaskResult.from_disk(path).dataset_revision
    assert cli("eval", "pair-classification", pairs, "--save-mteb", out,
               "--mteb-revision", "v2").exit_code == 0
    assert TaskResult.from_disk(path).dataset_revision == "v2"
    pairs.write_bytes(pairs.read_bytes())  # same bytes, same revision
    cli("eval", "pair-classification", pairs, "--save-mteb", out)
    assert TaskResult.from_disk(path).dataset_revision == first
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_beir_result_has_mteb_retrieval_keys(cli, tmp_path, mteb):
    from mteb.results import TaskResult

    out = tmp_path / "results"
    r = cli("eval", "beir", TINY, "-m", "fake:16", "--save-mteb", out, "--mteb-task", "Tiny")
    assert r.exit_code == 0, r
    record = r.records()[0]
    [path] = out.glob("fake:16/*/Tiny.json")
    assert path.parent.name == mteb_results.NO_REVISION  # a fake model has no weights to hash
    loaded = TaskResult.from_disk(path)
    scores = loaded.scores["test"][0]
    assert scores["main_score"] == pytest.approx(record["ndcg_at_10"])
    for key in ("ndcg_at_1", "map_at_10", "recall_at_100", "mrr_at_10", "precision_at_3"):
        assert scores[key] == pytest.approx(record[key], abs=1e-12)
    assert loaded.get_score() == pytest.approx(record["main_score"])
    assert cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1,3",
               "--save-mteb", out).exit_code == 2  # no nDCG@10: no main score to file


def test_sts_result_loads(cli, tmp_path, write_jsonl, mteb):
    from mteb.results import TaskResult

    rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i % 3}", "score": i % 5}
            for i in range(12)]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    out = tmp_path / "r"
    r = cli("eval", "sts", data, "-m", "fake:8", "--save-mteb", out, "--mteb-task", "STSx")
    assert r.exit_code == 0, r
    [path] = out.glob("*/*/STSx.json")
    scores = TaskResult.from_disk(path).scores["test"][0]
    assert scores["cosine_spearman"] == pytest.approx(r.records()[0]["cosine_spearman"])
    assert json.loads(path.read_text())["task_name"] == "STSx"


def test_save_mteb_needs_a_model(cli, tmp_path):
    r = cli("eval", "pair-classification", pairs_file(tmp_path, with_model=False),
            "--save-mteb", tmp_path / "out")
    assert r.exit_code == 2 and "--save-mteb needs the model" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
