"""Fusion of ranked lists: every method and normalisation against ranx on the same runs, the
fitted weights against ranx's optimize_fusion, a plain-python RRF written here from Cormack et
al., and `merge --fuse` end to end (formats, metadata, fit files, refusals)."""
import json
import random

import pytest

from vecpipe.core.fusion import Fusion, fit_weights, fuse_runs, weight_grid
from vecpipe.formats.errors import ParameterError
from vecpipe.formats.trec import read_run

RANX_NAME = {"combsum": "sum", "combmnz": "mnz", "z-score": "zmuv"}


def random_runs(count, queries=25, docs=80, depth=30, seed=0, gaps=True):
    """Runs over shared queries with distinct random scores (no ties: ranx orders ties its own
    way); with `gaps`, some queries are missing from some runs."""
    rng = random.Random(seed)
    runs = []
    for _ in range(count):
        runs.append({f"q{q}": {f"d{d}": rng.random() for d in rng.sample(range(docs), depth)}
                     for q in range(queries) if not gaps or rng.random() > 0.1})
    return runs


def random_qrels(queries=25, docs=80, seed=1):
    rng = random.Random(seed)
    return {f"q{q}": {f"d{d}": rng.choice([1, 2]) for d in rng.sample(range(docs), 10)}
            for q in range(queries)}


def ranx_runs(runs):
    """ranx fuses runs that hold the same queries (its precondition: a query missing from a
    run is NaN under its zmuv)."""
    from ranx import Run

    return [Run(run) for run in runs]


CASES = [("rrf", None, {"k": 60}), ("rrf", None, {"k": 5}), ("combsum", "min-max", {}),
         ("combsum", "z-score", {}), ("combsum", "rank", {}), ("combsum", "max", {}),
         ("combsum", "sum", {}), ("combsum", "none", {}), ("combmnz", "min-max", {}),
         ("combmnz", "z-score", {}), ("wsum", "min-max", {"weights": [0.2, 0.3, 0.5]}),
         ("wsum", "rank", {"weights": [0.6, 0.1, 0.3]})]


@pytest.mark.slow  # ranx compiles its numba functions on first use
@pytest.mark.parametrize("method,norm,params", CASES)
def test_fusion_equals_ranx(method, norm, params):
    from ranx import fuse

    runs = random_runs(3, gaps=False)
    ranx_norm = RANX_NAME.get(norm, norm) if norm != "none" else None
    expected = fuse(ranx_runs(runs), norm=ranx_norm if method != "rrf" else None,
                    method=RANX_NAME.get(method, method), params=params).to_dict()
    weights = tuple(params["weights"]) if "weights" in params else None
    fused = fuse_runs(Fusion(method, norm, params.get("k", 60), weights), runs)
    assert set(fused) == set(expected)
    for qid, docs in fused.items():
        assert set(docs) == set(expected[qid])
        for doc, score in docs.items():
            assert score == pytest.approx(expected[qid][doc], abs=1e-12)
        assert list(docs.values()) == sorted(docs.values(), reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
def test_fitted_weights_equal_ranx_optimize_fusion(count):
    from ranx import Qrels, optimize_fusion

    runs, qrels = random_runs(count, seed=5, gaps=False), random_qrels()
    expected = optimize_fusion(Qrels(qrels), ranx_runs(runs), norm="min-max", method="wsum",
                               metric="ndcg@10", show_progress=False)
    fitted = fit_weights(Fusion("wsum"), runs, qrels, "ndcg_at_10")
    assert fitted.weights == pytest.approx(tuple(expected["weights"]))
    assert fitted.trials == len(weight_grid(count, 0.1))


def plain_rrf(runs, k=60):
    fused = {}
    for run in runs:
        for qid, docs in run.items():
            ranking = sorted(docs, key=lambda doc: (docs[doc], doc), reverse=True)
            for rank, doc in enumerate(ranking, 1):
                fused.setdefault(qid, {}).setdefault(doc, 0.0)
                fused[qid][doc] += 1 / (k + rank)
    return fused


def test_rrf_equals_the_definition_with_ties_in_trec_order():
    runs = [{"q": {"a": 1.0, "b": 1.0, "c": 0.5}}, {"q": {"c": 2.0, "a": 1.0}}]
    fused = fuse_runs(Fusion("rrf", rrf_k=10), runs)
    assert fused["q"] == pytest.approx(plain_rrf(runs, 10)["q"])
    # b and a tie at 1.0 in the first run: trec_eval's order (doc id descending) ranks b first
    assert fused["q"]["b"] == pytest.approx(1 / 11)


def test_a_query_missing_from_a_run_is_fused_from_the_others():
    runs = random_runs(2, seed=4)
    only_first = next(qid for qid in runs[0] if qid not in runs[1])
    fused = fuse_runs(Fusion("combsum", "z-score"), runs)
    docs = runs[0][only_first]
    mean = sum(docs.values()) / len(docs)
    std = (sum((s - mean) ** 2 for s in docs.values()) / len(docs)) ** 0.5
    assert fused[only_first] == pytest.approx({d: (s - mean) / std for d, s in docs.items()})


def test_weight_grid_sums_to_one_in_product_order():
    grid = weight_grid(3, 0.25)
    assert all(sum(weights) == pytest.approx(1) for weights in grid)
    assert len(grid) == 15 and grid[0] == (0.0, 0.0, 1.0) and grid[-1] == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("fusion,runs,parameter", [
    (Fusion("rrf", "min-max"), 2, "norm"), (Fusion("borda"), 2, "method"),
    (Fusion("combsum", "l2"), 2, "norm"), (Fusion("rrf"), 1, "runs"),
    (Fusion("rrf", weights=(1.0, 1.0)), 2, "weights"),
    (Fusion("wsum", weights=(1.0,)), 2, "weights")])
def test_fusion_refuses_what_cannot_work(fusion, runs, parameter):
    with pytest.raises(ParameterError) as caught:
        fusion.checked(runs)
    assert caught.value.parameter == parameter


# ---- merge --fuse ------------------------------------------------------------------------------

@pytest.fixture
def two_runs(tmp_path):
    runs = random_runs(2, queries=6, docs=20, depth=8, seed=3)
    trec = tmp_path / "bm25.trec"
    trec.write_text("".join(f"{qid} Q0 {doc} {rank} {score} bm25\n"
                            for qid, docs in runs[0].items()
                            for rank, (doc, score) in enumerate(
                                sorted(docs.items(), key=lambda d: -d[1]), 1)))
    jsonl = tmp_path / "dense.jsonl"
    jsonl.write_text("".join(json.dumps({"query_id": qid, "id": doc, "score": score}) + "\n"
                             for qid, docs in runs[1].items() for doc, score in docs.items()))
    return tmp_path, runs, trec, jsonl


def test_merge_fuse_writes_the_fused_run(cli, two_runs):
    folder, runs, trec, jsonl = two_runs
    result = cli("merge", "--fuse", "combmnz", "--fuse-norm", "z-score", trec, jsonl)
    assert result.exit_code == 0, result.stderr
    expected = fuse_runs(Fusion("combmnz", "z-score"), runs)
    rows = result.records()
    assert len(rows) == sum(len(docs) for docs in expected.values())
    for row in rows:
        assert row["score"] == pytest.approx(expected[row["query_id"]][row["id"]], abs=1e-12)
    first = [row for row in rows if row["query_id"] == rows[0]["query_id"]]
    assert [row["rank"] for row in first] == list(range(1, len(first) + 1))
    assert "fused 2 runs (combmnz, norm z-score)" in result.stderr


def test_merge_fuse_trec_output_and_depth(cli, two_runs):
    folder, runs, trec, jsonl = two_runs
    out = folder / "fused.trec"
    result = cli("merge", "--fuse", "rrf", "--rrf-k", "20", "--fuse-depth", "3", trec, jsonl,
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    fused = read_run(str(out))
    expected = plain_rrf(runs, 20)
    for qid, docs in fused.items():
        assert len(docs) == 3
        best = sorted(expected[qid].items(), key=lambda d: (d[1], d[0]), reverse=True)[:3]
        assert docs == pytest.approx(dict(best))


def test_merge_fuse_fits_saves_and_reuses_weights(cli, two_runs):
    import pyarrow as pa

    folder, runs, trec, jsonl = two_runs
    qrels = folder / "train.tsv"
    judged = random_qrels(queries=6, docs=20, seed=9)
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{qid}\t{doc}\t{rel}\n" for qid, docs in judged.items() for doc, rel in docs.items()))
    fit, out = folder / "fit.json", folder / "fused.arrow"
    result = cli("merge", "--fuse", "wsum", trec, jsonl, "--fit-qrels", qrels,
                 "--fit-metric", "ndcg@5", "--save-fit", fit, "-o", out)
    assert result.exit_code == 0, result.stderr
    expected = fit_weights(Fusion("wsum"), runs, judged, "ndcg_at_5")
    saved = json.loads(fit.read_text())
    assert tuple(saved["weights"]) == expected.weights
    assert saved["fitted_score"] == pytest.approx(expected.score)
    assert "fitted weights" in result.stderr
    meta = json.loads(pa.ipc.open_file(str(out)).schema.metadata[b"vecpipe.fusion"])
    assert meta["weights"] == saved["weights"] and meta["fitted_on"] == "ndcg_at_5"
    again = cli("merge", "--fuse", "wsum", trec, jsonl, "--fuse-weights", fit)
    fused = fuse_runs(Fusion("wsum", weights=expected.weights), runs)
    for row in again.records():
        assert row["score"] == pytest.approx(fused[row["query_id"]][row["id"]], abs=1e-12)
    clash = cli("merge", "--fuse", "wsum", trec, jsonl, "--fuse-weights", fit,
                "--fuse-norm", "rank")
    assert clash.exit_code == 2 and "fitted under min-max" in clash.stderr


@pytest.mark.parametrize("args,message", [
    (["--fuse", "rrf", "--fuse-norm", "min-max"], "--fuse-norm: rrf fuses ranks"),
    (["--fuse", "wsum", "--fuse-weights", "1,2,3"], "--fuse-weights: 3 weights for 2 runs"),
    (["--fuse", "wsum", "--fuse-weights", "a,b"], "--fuse-weights 'a,b'"),
    (["--fuse", "rrf", "--fuse-weights", "1,1"], "weights apply to wsum"),
    (["--fuse", "foo"], "unknown fusion method 'foo'"),
    (["--fuse", "rrf", "--save-fit", "x.json"], "--save-fit needs --fit-qrels"),
    (["--rrf-k", "5"], "--rrf-k needs --fuse METHOD"),
    (["--fuse", "rrf", "--index"], "--fuse merges runs")])
def test_merge_fuse_refusals(cli, two_runs, args, message):
    folder, runs, trec, jsonl = two_runs
    result = cli("merge", *args, trec, jsonl)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_merge_fuse_names_a_bad_run_file(cli, two_runs):
    folder, runs, trec, jsonl = two_runs
    bad = folder / "bad.trec"
    bad.write_text("q1 Q0 d1 1\n")
    result = cli("merge", "--fuse", "rrf", trec, bad)
    assert result.exit_code == 1 and "bad.trec" in result.stderr and "6 fields" in result.stderr


def test_merge_fit_step_outside_0_1_is_a_usage_error(cli, two_runs):
    folder, runs, trec, jsonl = two_runs
    qrels = folder / "q.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\n")
    for step in ("0", "-0.1", "0.3"):
        result = cli("merge", "--fuse", "wsum", trec, jsonl, "--fit-qrels", qrels,
                     "--fit-step", step)
        assert result.exit_code == 2 and "--fit-step:" in result.stderr, result.stderr
