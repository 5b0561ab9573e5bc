"""Set metrics of eval retrieval (set_precision, set_recall, set_f1 over the whole returned set)
equal pytrec_eval's set_P, set_recall and set_F."""
import json
import random

import pytest
import pytrec_eval

from vecpipe.core import retrieval_metrics as m
from vecpipe.formats.errors import UsageError

TREC = {"set_P": "set_precision", "set_recall": "set_recall", "set_F": "set_f1"}


def random_case(rng):
    docs = [f"d{i}" for i in range(rng.randint(1, 25))]
    qrels, run = {}, {}
    for q in range(rng.randint(1, 6)):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([-1, 0, 0, 1, 2]) for d in rng.sample(docs, rng.randint(
            1, len(docs)))}
        if rng.random() < 0.85:
            run[qid] = {d: round(rng.random(), 2) for d in rng.sample(docs, rng.randint(
                1, len(docs)))}
    return qrels, run


def test_set_metrics_equal_pytrec_eval_on_random_runs():
    rng = random.Random(3)
    for _ in range(200):
        qrels, run = random_case(rng)
        if not set(qrels) & set(run):
            continue
        ref = pytrec_eval.RelevanceEvaluator(qrels, set(TREC)).evaluate(run)
        ours = m.evaluate(qrels, run, (10,), m.SET_METRICS)
        assert set(ours.per_query) == set(ref)
        for qid, scores in ref.items():
            for trec, key in TREC.items():
                assert ours.per_query[qid][key] == pytest.approx(scores[trec], abs=1e-12)
        for trec, key in TREC.items():
            mean = sum(s[trec] for s in ref.values()) / len(ref)
            assert ours.means[key] == pytest.approx(mean, abs=1e-12)


def test_set_metrics_beside_cutoff_metrics():
    qrels = {"a": {"x": 1, "y": 2, "z": 0}, "b": {"x": 1}}
    run = {"a": {"x": 0.9, "z": 0.5, "w": 0.1}, "b": {"w": 0.3}}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"set_F", "ndcg_cut.3"}).evaluate(run)
    ours = m.evaluate(qrels, run, (3,), m.parse_metrics("ndcg,set_f"))
    assert ours.keys == ["ndcg_at_3", "set_f1"]
    for qid in qrels:
        assert ours.per_query[qid]["set_f1"] == pytest.approx(ref[qid]["set_F"])
        assert ours.per_query[qid]["ndcg_at_3"] == pytest.approx(ref[qid]["ndcg_cut_3"])


def test_metric_names():
    assert m.parse_metrics("set") == m.SET_METRICS
    assert m.parse_metrics("set_P,set_R,ndcg,set") == ("set_precision", "set_recall", "ndcg",
                                                       "set_f1")
    assert m.set_metric("set_F") == "set_f1" and m.set_metric("ndcg@10") is None
    with pytest.raises(UsageError):
        m.parse_metrics("set_x")


def write_case(tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq1\td3\t1\n"
                     "q2\td4\t1\nq3\td1\t1\n")
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 0.9 t\nq1 Q0 d5 2 0.8 t\nq2 Q0 d4 1 0.7 t\nq2 Q0 d6 2 0.6 t\n"
                   "q2 Q0 d7 3 0.5 t\n")
    return qrels, run


def test_cli_set_metrics_equal_pytrec_eval(cli, tmp_path):
    qrels_path, run_path = write_case(tmp_path)
    qrels = {"q1": {"d1": 1, "d2": 2, "d3": 1}, "q2": {"d4": 1}, "q3": {"d1": 1}}
    run = {"q1": {"d1": 0.9, "d5": 0.8}, "q2": {"d4": 0.7, "d6": 0.6, "d7": 0.5}}
    ref = pytrec_eval.RelevanceEvaluator(qrels, set(TREC)).evaluate(run)
    for all_queries, queries in ((False, 2), (True, 3)):
        args = ["--all-queries"] if all_queries else []
        result = cli("eval", "retrieval", run_path, "--qrels", qrels_path, "--metrics", "set",
                     "--output-format", "jsonl", *args)
        assert result.exit_code == 0, result.stderr
        record = json.loads(result.stdout)
        assert record["queries"] == queries
        for trec, key in TREC.items():  # a query missing from the run scores 0 (trec_eval -c)
            assert record[key] == pytest.approx(sum(s[trec] for s in ref.values()) / queries)
        assert "at most" not in result.stderr  # no cutoff: no warning about shallow runs


def test_cli_set_metrics_table_and_fail_under(cli, tmp_path):
    qrels_path, run_path = write_case(tmp_path)
    result = cli("eval", "retrieval", run_path, "--qrels", qrels_path, "--metrics", "ndcg,set",
                 "--cutoffs", "1,10", "--output-format", "table")
    assert result.exit_code == 0, result.stderr
    assert "set F1" in result.stdout and "nDCG" in result.stdout
    two = cli("eval", "retrieval", run_path, run_path, "--qrels", qrels_path, "--metrics",
              "set", "--output-format", "table")
    assert two.exit_code == 0, two.stderr
    assert "set P" in two.stdout
    failed = cli("eval", "retrieval", run_path, "--qrels", qrels_path, "--metrics", "set",
                 "--fail-under", "set_F=0.99")
    assert failed.exit_code == 1 and "set_f1" in failed.stderr
    refused = cli("eval", "retrieval", run_path, "--qrels", qrels_path, "--metrics", "ndcg",
                  "--fail-under", "set_f1=0.1")
    assert refused.exit_code == 2 and "not computed" in refused.stderr
