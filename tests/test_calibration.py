"""Relevance calibration: eval calibrate's fit equals scikit-learn's unpenalized logistic
regression on the same features (made here from the scores directly), search --calibrator's
prob equals the calibrator's formula on numpy brute-force scores, --min-prob filters."""
import json

import numpy as np
import orjson
import pyarrow as pa
import pytest
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from vecpipe.core import calibration

DIM, DOCS, QUERIES, DEPTH = 16, 300, 60, 20


def features(top, scores=None):
    """FEATURES of `scores` (default `top`) given a query's top-DEPTH scores `top`."""
    top = np.asarray(top, dtype=np.float64)
    scores = top if scores is None else np.asarray(scores, dtype=np.float64)
    mean, std = top.mean(), max(top.std(), calibration.STD_FLOOR)
    return np.column_stack([scores, scores - top[0], (scores - mean) / std,
                            np.full(len(scores), top[0] - mean)])


def sklearn_fit(x, y):
    model = LogisticRegression(C=np.inf, solver="newton-cg", tol=1e-12, max_iter=10000)
    return model.fit(x, y)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An index of random unit vectors (fake:16 metadata), queries near some documents, and
    qrels in which documents close to a query's best hit are more often relevant."""
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(11)
    docs = rng.standard_normal((DOCS, DIM)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.integers(0, DOCS, QUERIES)] + rng.normal(0, 0.6, (QUERIES, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    table = pa.table({"id": [f"d{i}" for i in range(DOCS)], "embedding":
                      pa.FixedSizeListArray.from_arrays(pa.array(docs.reshape(-1)), DIM)})
    table = table.replace_schema_metadata({"vecpipe.model": "fake:16", "vecpipe.dim": str(DIM),
                                           "vecpipe.normalized": "true"})
    with pa.OSFile(str(folder / "docs.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "q.jsonl").write_bytes(b"".join(
        orjson.dumps({"id": f"q{i}", "embedding": v.tolist()}) + b"\n"
        for i, v in enumerate(queries)))
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    lines = ["query-id\tcorpus-id\tscore"]
    for q in range(QUERIES):
        chance = expit(25 * (scores[q] - scores[q].max()) + 1.5)
        lines += [f"q{q}\td{d}\t{rng.choice([1, 2])}" for d in range(DOCS)
                  if rng.random() < chance[d]]
    (folder / "qrels.tsv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["index", str(folder / "docs.arrow"), "-o",
                                      str(folder / "idx")])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "scores": scores, "qrels": lines[1:]}


def top_hits(scores, depth):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return order, np.take_along_axis(scores, order, 1)


def fitted(cli, case):
    f = case["folder"]
    run = cli("search", f / "idx", f / "q.jsonl", "-k", DEPTH, "--exact", "-o", f / "run.jsonl")
    assert run.exit_code == 0, run.stderr
    result = cli("eval", "calibrate", f / "run.jsonl", "--qrels", f / "qrels.tsv", "--space",
                 f / "idx", "-o", f / "cal.json")
    assert result.exit_code == 0, result.stderr
    return json.loads((f / "cal.json").read_text())


def test_fit_equals_scikit_learn(cli, case):
    cal = fitted(cli, case)
    f = case["folder"]
    relevant = {tuple(line.split("\t")[:2]) for line in case["qrels"]}
    hits: dict = {}
    for line in (f / "run.jsonl").read_text().splitlines():
        row = json.loads(line)
        if any(row["query_id"] == q for q, _ in relevant):  # judged queries only
            hits.setdefault(row["query_id"], []).append((row["id"], row["score"]))
    x = np.concatenate([features([s for _, s in rows]) for rows in hits.values()])
    y = np.array([(q, d) in relevant for q, rows in hits.items() for d, _ in rows], dtype=float)
    model = sklearn_fit(x, y)
    assert cal["depth"] == DEPTH and cal["model"] == "fake:16" and cal["metric"] == "cos"
    assert cal["fit"]["hits"] == len(y) and cal["fit"]["relevant"] == int(y.sum())
    np.testing.assert_allclose(cal["coefficients"], model.coef_[0], rtol=1e-4, atol=1e-6)
    assert cal["intercept"] == pytest.approx(model.intercept_[0], rel=1e-4, abs=1e-6)
    p = expit(x @ np.array(cal["coefficients"]) + cal["intercept"])
    np.testing.assert_allclose(p, model.predict_proba(x)[:, 1], atol=1e-7)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert cal["fit"]["log_loss"] == pytest.approx(loss, rel=1e-9)


def test_fit_logistic_equals_scikit_learn_on_random_data():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 4)) * [1, 0.1, 3, 10] + [0, 5, 0, 100]
    y = (rng.random(2000) < expit(x @ [1.0, -4, 0.3, 0.05] + 15)).astype(float)
    coefficients, intercept, _ = calibration.fit_logistic(x, y)
    model = sklearn_fit(x, y)
    np.testing.assert_allclose(coefficients, model.coef_[0], rtol=1e-4)
    assert intercept == pytest.approx(model.intercept_[0], rel=1e-4)


def test_hit_features_match_a_direct_computation():
    scores = np.array([[0.9, 0.7, 0.7, 0.2, -np.inf], [0.5, -np.inf, -np.inf, -np.inf, -np.inf],
                       [-np.inf] * 5])
    present = np.isfinite(scores)
    got = calibration.hit_features(scores, 3, present)
    np.testing.assert_allclose(got[0, :4], features([0.9, 0.7, 0.7], scores[0, :4]))
    np.testing.assert_allclose(got[1, :1], features([0.5]))
    assert np.isnan(got[0, 4]).all() and np.isnan(got[2]).all()


def test_search_prob_equals_the_formula(cli, case):
    cal = fitted(cli, case)
    f, k = case["folder"], 5
    result = cli("search", f / "idx", f / "q.jsonl", "-k", k, "--exact", "--calibrator",
                 f / "cal.json", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert len(records) == QUERIES * k and list(records[0]) == ["query_id", "rank", "id",
                                                                "score", "prob"]
    order, top = top_hits(case["scores"], DEPTH)  # statistics over the calibrator's depth
    for q in range(QUERIES):
        mine = [r for r in records if r["query_id"] == f"q{q}"]
        assert [r["id"] for r in mine] == [f"d{d}" for d in order[q, :k]]
        x = features(top[q], top[q, :k])
        expected = expit(x @ np.array(cal["coefficients"]) + cal["intercept"])
        np.testing.assert_allclose([r["prob"] for r in mine], expected, atol=2e-5)


def test_min_prob_filters(cli, case):
    fitted(cli, case)
    f, k = case["folder"], 8
    every = cli("search", f / "idx", f / "q.jsonl", "-k", DEPTH, "--exact", "--calibrator",
                f / "cal.json", "--output-format", "jsonl").records()
    cut = float(np.median([r["prob"] for r in every]))
    result = cli("search", f / "idx", f / "q.jsonl", "-k", k, "--exact", "--calibrator",
                 f / "cal.json", "--min-prob", cut, "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    kept = result.records()
    for q in range(QUERIES):
        expected = [r["id"] for r in every if r["query_id"] == f"q{q}" and r["prob"] >= cut][:k]
        mine = [r for r in kept if r["query_id"] == f"q{q}"]
        assert [r["id"] for r in mine] == expected
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
    assert 0 < len(kept) < QUERIES * k


def test_calibrator_refusals(cli, case, tmp_path):
    fitted(cli, case)
    f = case["folder"]
    search = ["search", f / "idx", f / "q.jsonl", "--exact"]
    no_cal = cli(*search, "--min-prob", "0.5")
    assert no_cal.exit_code == 2 and "--min-prob needs --calibrator" in no_cal.stderr
    both = cli(*search, "--calibrator", f / "cal.json", "--min-score", "0.3")
    assert both.exit_code == 2 and "--min-score" in both.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "vecpipe-calibrator", "format_version": 1}')
    broken = cli(*search, "--calibrator", bad)
    assert broken.exit_code == 1 and "bad.json" in broken.stderr
    assert "Traceback" not in broken.stderr
    other = json.loads((f / "cal.json").read_text()) | {"model": "another-model"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    mismatch = cli(*search, "--calibrator", tmp_path / "other.json")
    assert mismatch.exit_code == 1 and "another-model" in mismatch.stderr
    forced = cli(*search, "--calibrator", tmp_path / "other.json", "--force")
    assert forced.exit_code == 0, forced.stderr


def test_calibrate_refuses_unrelated_qrels(cli, case, tmp_path):
    fitted(cli, case)
    qrels = tmp_path / "other.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nzz\td1\t1\n")
    result = cli("eval", "calibrate", case["folder"] / "run.jsonl", "--qrels", qrels)
    assert result.exit_code == 1 and "no query in common" in result.stderr


def test_filtered_run_scores_like_pytrec_eval(cli, case):
    """search --min-prob | eval retrieval --metrics set --all-queries: pytrec_eval's set_P,
    set_recall and set_F of the run the formula keeps, a query left empty scoring 0."""
    import pytrec_eval

    cal = fitted(cli, case)
    f, cut = case["folder"], 0.5
    search = cli("search", f / "idx", f / "q.jsonl", "-k", DEPTH, "--exact", "--calibrator",
                 f / "cal.json", "--min-prob", cut, "-o", f / "kept.jsonl")
    assert search.exit_code == 0, search.stderr
    result = cli("eval", "retrieval", f / "kept.jsonl", "--qrels", f / "qrels.tsv", "--metrics",
                 "set", "--all-queries", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    qrels: dict = {}
    for line in case["qrels"]:
        qid, doc, rel = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(rel)
    order, top = top_hits(case["scores"], DEPTH)
    run = {}
    for q in range(QUERIES):
        prob = expit(features(top[q]) @ np.array(cal["coefficients"]) + cal["intercept"])
        run[f"q{q}"] = {f"d{d}": float(s) for d, s, p in zip(order[q], top[q], prob) if p >= cut}
    assert 0 < sum(map(len, run.values())) < QUERIES * DEPTH
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"set_P", "set_recall", "set_F"}).evaluate(
        {qid: docs for qid, docs in run.items() if docs})
    record = json.loads(result.stdout)
    for trec, key in (("set_P", "set_precision"), ("set_recall", "set_recall"),
                      ("set_F", "set_f1")):
        assert record[key] == pytest.approx(sum(s[trec] for s in ref.values()) / len(qrels))
