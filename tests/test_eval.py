"""eval: retrieval metrics equal pytrec_eval, beir equals brute-force search + pytrec_eval (and
MTEB's published NFCorpus scores with VECPIPE_SLOW=1), sts equals scipy, embeddings statistics
equal numpy/scipy on constructed data."""
import csv
import io
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import pytrec_eval
import scipy.stats

from vecpipe.core import retrieval_metrics as m
from vecpipe.core import vector_stats as stats
from vecpipe.formats.errors import UsageError

DATA = Path(__file__).resolve().parent / "data" / "eval"
TINY = DATA / "tinybeir"
KS = (1, 2, 3, 5, 10, 20)
PAIRS = (("ndcg_cut", "ndcg"), ("map_cut", "map"), ("recall", "recall"), ("P", "precision"))


def assert_like_pytrec(qrels, run, ks=KS, all_queries=False):
    """Our per-query scores and means equal pytrec_eval's (MRR@k: its recip_rank on the run cut
    at k in its own order) to 1e-9."""
    measures = {f"{name}.{','.join(map(str, ks))}" for name, _ in PAIRS}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = m.evaluate(qrels, run, ks, all_queries=all_queries)
    expected_queries = set(qrels) if all_queries else set(ref)
    assert set(ours.per_query) == expected_queries
    for qid, scores in ref.items():
        mine = ours.per_query[qid]
        for k in ks:
            for trec, name in PAIRS:
                assert mine[f"{name}_at_{k}"] == pytest.approx(scores[f"{trec}_{k}"], abs=1e-9)
            cut = {qid: dict(sorted(run[qid].items(), key=lambda kv: (-kv[1], _rev(kv[0])))[:k])}
            rr = pytrec_eval.RelevanceEvaluator({qid: qrels[qid]}, {"recip_rank"}).evaluate(cut)
            assert mine[f"mrr_at_{k}"] == pytest.approx(rr[qid]["recip_rank"], abs=1e-9)
    for trec, name in PAIRS:
        for k in ks:
            total = sum(s[f"{trec}_{k}"] for s in ref.values())
            assert ours.means[f"{name}_at_{k}"] == pytest.approx(
                total / len(expected_queries), abs=1e-9)
    return ours


class _rev(str):
    """Sort key for doc id descending inside an ascending sort (trec_eval's tie order)."""

    def __lt__(self, other):
        return str.__gt__(self, other)


def pytrec_means(qrels, run, ks=(1, 3, 5, 10, 100, 1000)):
    ref = pytrec_eval.RelevanceEvaluator(qrels, {f"{n}.{','.join(map(str, ks))}" for n in (
        "ndcg_cut", "map_cut", "recall", "P")}).evaluate(run)
    means = {}
    for trec, name in PAIRS:
        for k in ks:
            means[f"{name}_at_{k}"] = sum(s[f"{trec}_{k}"] for s in ref.values()) / len(ref)
    return means


def load_tsv_qrels(path):
    qrels = {}
    for line in Path(path).read_text().splitlines()[1:]:
        qid, doc, rel = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(rel)
    return qrels


def load_trec_run(path):
    run = {}
    for line in Path(path).read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    return run


# ---------------------------------------------------------------- metrics vs pytrec_eval

@pytest.mark.slow
def test_metrics_equal_pytrec_eval_on_random_runs():
    rng = random.Random(7)
    for _ in range(150):
        docs = [f"d{i}" for i in range(rng.randint(1, 30))]
        qrels, run = {}, {}
        for q in range(rng.randint(1, 6)):
            qid = f"q{q}"
            if rng.random() < 0.9:
                qrels[qid] = {d: rng.choice([-1, 0, 0, 1, 1, 2, 3])
                              for d in rng.sample(docs, rng.randint(1, len(docs)))}
            if rng.random() < 0.85:  # ties on purpose: few distinct scores
                run[qid] = {d: rng.choice([0.25, 0.5, 1.0]) if rng.random() < 0.5
                            else round(rng.random(), 2)
                            for d in rng.sample(docs, rng.randint(0, len(docs)))}
        if qrels and set(qrels) & set(run):
            assert_like_pytrec(qrels, run)


def test_edge_cases_equal_pytrec_eval():
    qrels = {"tie": {"a": 1}, "tie2": {"b": 1}, "zeros": {"a": 0, "b": 0},
             "graded": {"a": 3, "b": 1, "c": 2, "x": -2}, "absent": {"a": 1},
             "emptyrun": {"a": 1}, "long": {"d01200": 1, "d00003": 2}}
    run = {"tie": {"a": 1.0, "b": 1.0}, "tie2": {"a": 1.0, "b": 1.0},
           "zeros": {"a": 2.0, "b": 1.0}, "graded": {"x": 9.0, "c": 5.0, "z": 4.0, "a": 1.0},
           "emptyrun": {}, "notjudged": {"a": 1.0},
           "long": {f"d{i:05d}": float(-i) for i in range(1500)}}
    ours = assert_like_pytrec(qrels, run, ks=(1, 2, 3, 10, 1000, 1500))
    assert ours.per_query["tie"]["mrr_at_1"] == 0.0     # b (id descending) ranks before a
    assert ours.per_query["tie2"]["mrr_at_1"] == 1.0
    assert ours.missing == ["absent"] and ours.unjudged == ["notjudged"]
    assert ours.per_query["long"]["mrr_at_1500"] == pytest.approx(1 / 4)


def test_all_queries_scores_missing_queries_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 2}}
    run = {"q1": {"a": 1.0, "b": 0.5}}
    ours = assert_like_pytrec(qrels, run, all_queries=True)
    assert ours.means["ndcg_at_10"] == pytest.approx(1 / 3)
    assert ours.per_query["q3"] == dict.fromkeys(ours.keys, 0.0)


def test_metric_names_and_cutoffs():
    assert m.parse_metric_key("nDCG@10") == "ndcg_at_10"
    assert m.parse_metric_key("P@1") == "precision_at_1"
    assert m.parse_metric_key("recall_at_100") == "recall_at_100"
    assert m.parse_ks("100,10,10") == (10, 100)
    assert m.parse_metrics("p,RR") == ("precision", "mrr")
    for bad in ("ndcg", "foo@10", "ndcg@0"):
        with pytest.raises(UsageError):
            m.parse_metric_key(bad)


# ---------------------------------------------------------------- statistics vs scipy

def test_paired_tests_match_scipy_and_exact_permutation():
    rng = np.random.default_rng(3)
    a = rng.random(10)
    b = a + rng.normal(0.08, 0.1, 10)
    assert m.paired_t_test(a, b) == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-9)
    diffs = b - a
    flips = np.array(list(itertools.product([-1, 1], repeat=10)))
    exact = np.mean(np.abs(flips @ diffs) >= abs(diffs.sum()) - 1e-12)
    assert m.paired_randomization_test(a, b, permutations=20000) == pytest.approx(exact,
                                                                                  abs=0.01)
    assert m.paired_randomization_test(a, a) == 1.0 and m.paired_t_test(a, a) == 1.0
    assert m.paired_randomization_test(a, b, seed=1) == m.paired_randomization_test(a, b, seed=1)


def test_rank_statistics_match_scipy():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, 300).astype(float)  # many ties
    y = x + rng.normal(0, 2, 300)
    assert np.array_equal(stats.rankdata(x), scipy.stats.rankdata(x))
    assert stats.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert stats.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    u, p = stats.mann_whitney(x[:120], y[120:])
    ref = scipy.stats.mannwhitneyu(x[:120], y[120:], method="asymptotic")
    assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_rankme_on_matrices_of_known_rank():
    rng = np.random.default_rng(0)
    q_left, _ = np.linalg.qr(rng.normal(size=(200, 12)))
    q_right, _ = np.linalg.qr(rng.normal(size=(64, 12)))
    for rank in (1, 5, 12):
        equal = q_left[:, :rank] @ q_right[:, :rank].T * 3.0  # rank r, equal singular values
        summary = stats.EmbeddingSummary()
        summary.add(equal[:70])
        summary.add(equal[70:])
        # the paper's epsilon (1e-7) goes to all 64 values: exactly r only without it
        p = np.r_[np.full(rank, 1 / rank), np.zeros(64 - rank)] + 1e-7
        expected = math.exp(-(p * np.log(p)).sum())
        assert expected == pytest.approx(rank, rel=1e-3)
        assert stats.rankme(summary.singular_values()) == pytest.approx(expected, rel=1e-5)
        assert stats.rankme(np.linalg.svd(equal, compute_uv=False)) == pytest.approx(expected,
                                                                                 rel=1e-6)
    skewed = q_left[:, :3] @ np.diag([10.0, 1.0, 0.1]) @ q_right[:, :3].T
    p = np.r_[np.array([10.0, 1.0, 0.1]) / 11.1, np.zeros(61)] + 1e-7
    assert stats.rankme(np.linalg.svd(skewed, compute_uv=False)) == pytest.approx(
        math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert 1.0 < stats.rankme(np.linalg.svd(skewed, compute_uv=False)) < 3.0


# ---------------------------------------------------------------- eval retrieval (CLI)

def test_retrieval_trec_run_with_beir_qrels_equals_pytrec(cli):
    r = cli("eval", "retrieval", DATA / "bm25.trec", "--qrels", DATA / "qrels.tsv")
    assert r.exit_code == 0, r
    [record] = r.records()
    qrels, run = load_tsv_qrels(DATA / "qrels.tsv"), load_trec_run(DATA / "bm25.trec")
    for key, value in pytrec_means(qrels, run).items():
        assert record[key] == pytest.approx(value, abs=1e-9), key
    assert record["queries"] == 3 and record["main_score"] == record["ndcg_at_10"]
    assert "1 of 4 qrels queries have no results" in r.stderr
    assert "ignored 1 queries not in the qrels" in r.stderr


def test_retrieval_records_from_stdin_with_trec_qrels(cli):
    r = cli("eval", "retrieval", "--qrels", DATA / "qrels.txt", "--cutoffs", "1,10",
            "--metrics", "ndcg,mrr", input=(DATA / "dense.jsonl").read_bytes())
    assert r.exit_code == 0, r
    [record] = r.records()
    run = {}
    for line in (DATA / "dense.jsonl").read_text().splitlines():
        hit = json.loads(line)
        run.setdefault(hit["query_id"], {})[hit["id"]] = hit["score"]
    qrels = load_tsv_qrels(DATA / "qrels.tsv")
    assert record["ndcg_at_10"] == pytest.approx(pytrec_means(qrels, run, (10,))["ndcg_at_10"])
    assert record["mrr_at_1"] == pytest.approx(3 / 4)  # q4's d8 is not relevant
    assert set(record) == {"run", "queries", "ndcg_at_1", "ndcg_at_10", "mrr_at_1",
                           "mrr_at_10", "main_score"}


def test_retrieval_reads_arrow_runs_ranked_by_rank_alone(cli, tmp_path):
    table = pa.table({"query_id": ["q1", "q1", "q2"], "id": ["d2", "d1", "d2"],
                      "rank": [1, 2, 1]})
    path = tmp_path / "run.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    r = cli("eval", "retrieval", path, "--qrels", DATA / "qrels.tsv", "--cutoffs", "1")
    assert r.exit_code == 0, r
    assert r.records()[0]["mrr_at_1"] == pytest.approx(0.5)  # rank 1 is best: q1 misses at 1


def test_retrieval_reads_an_arrow_stream_on_stdin(cli):
    import io

    hits = [json.loads(line) for line in (DATA / "dense.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist(hits)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    from_arrow = cli("eval", "retrieval", "--qrels", DATA / "qrels.tsv", input=sink.getvalue())
    from_jsonl = cli("eval", "retrieval", DATA / "dense.jsonl", "--qrels", DATA / "qrels.tsv")
    assert from_arrow.exit_code == 0, from_arrow
    assert from_arrow.records()[0]["ndcg_at_10"] == from_jsonl.records()[0]["ndcg_at_10"]


def test_several_runs_compared_with_paired_tests(cli):
    r = cli("eval", "retrieval", DATA / "bm25.trec", DATA / "dense.jsonl", "--qrels",
            DATA / "qrels.tsv", "--cutoffs", "10", "--metrics", "ndcg,recall")
    assert r.exit_code == 0, r
    base, other = r.records()
    assert other["baseline"] == str(DATA / "bm25.trec") and "delta" not in base
    assert other["delta"]["ndcg_at_10"] == pytest.approx(other["ndcg_at_10"] -
                                                         base["ndcg_at_10"])
    assert other["paired_queries"] == 3  # bm25 has no q4
    per_query = {(rec["run"], rec["query_id"]): rec["ndcg_at_10"] for rec in cli(
        "eval", "retrieval", DATA / "bm25.trec", DATA / "dense.jsonl", "--qrels",
        DATA / "qrels.tsv", "--cutoffs", "10", "--per-query").records()}
    a = [per_query[(str(DATA / "bm25.trec"), q)] for q in ("q1", "q2", "q3")]
    b = [per_query[(str(DATA / "dense.jsonl"), q)] for q in ("q1", "q2", "q3")]
    assert other["p_ttest"]["ndcg_at_10"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)
    flips = np.array(list(itertools.product([-1, 1], repeat=3)))
    d = np.subtract(b, a)
    exact = np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12)
    assert other["p_randomization"]["ndcg_at_10"] == pytest.approx(exact, abs=0.02)
    assert "runs compared on the 3 queries judged in" in r.stderr  # bm25 lacks q4


def test_per_query_rows_equal_pytrec(cli):
    r = cli("eval", "retrieval", DATA / "bm25.trec", "--qrels", DATA / "qrels.tsv",
            "--per-query")
    assert r.exit_code == 0, r
    ref = pytrec_eval.RelevanceEvaluator(load_tsv_qrels(DATA / "qrels.tsv"), {
        "ndcg_cut.3"}).evaluate(load_trec_run(DATA / "bm25.trec"))
    rows = r.records()
    assert [row["query_id"] for row in rows] == ["q1", "q2", "q3"]
    for row in rows:
        assert row["ndcg_at_3"] == pytest.approx(ref[row["query_id"]]["ndcg_cut_3"])
    as_csv = cli("eval", "retrieval", DATA / "bm25.trec", "--qrels", DATA / "qrels.tsv",
                 "--per-query", "--output-format", "csv")
    assert as_csv.exit_code == 0, as_csv
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [row["query_id"] for row in table] == ["q1", "q2", "q3"]
    for row in table:
        assert float(row["ndcg_at_3"]) == pytest.approx(ref[row["query_id"]]["ndcg_cut_3"])


def test_qrels_can_be_a_reference_run_for_ann_recall(cli, tmp_path, write_jsonl):
    exact = write_jsonl(tmp_path / "exact.jsonl", [
        {"query_id": "q", "id": d, "score": s} for d, s in
        [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)]])
    ann = write_jsonl(tmp_path / "ann.jsonl", [
        {"query_id": "q", "id": d, "score": s} for d, s in [("a", 0.9), ("c", 0.7), ("e", 0.5)]])
    r = cli("eval", "retrieval", ann, "--qrels", exact, "--qrels-depth", "2", "--cutoffs", "2",
            "--metrics", "recall")
    assert r.exit_code == 0, r
    assert r.records()[0]["recall_at_2"] == pytest.approx(0.5)  # {a, c} vs exact top-2 {a, b}
    assert "its top 2 hits per query count as relevant" in r.stderr


def test_fail_under(cli):
    args = ("eval", "retrieval", DATA / "bm25.trec", "--qrels", DATA / "qrels.tsv")
    ok = cli(*args, "--fail-under", "ndcg@10=0.1")
    assert ok.exit_code == 0, ok
    low = cli(*args, "--fail-under", "ndcg@10=0.99", "--fail-under", "recall_at_100=0.1")
    assert low.exit_code == 1 and low.records()  # the report comes first
    assert "below --fail-under: ndcg_at_10 = 0." in low.stderr and "< 0.99" in low.stderr
    assert "recall_at_100" not in low.stderr
    unknown = cli(*args, "--fail-under", "ndcg@7=0.5")
    assert unknown.exit_code == 2 and unknown.stdout == ""
    assert "ndcg_at_7 is not computed" in unknown.stderr


@pytest.mark.parametrize("name,content,where,what", [
    ("run.trec", "q1 Q0 d1 1 2.0 x\nq1 Q0 d2 2 1.0 x\nq1 Q0 d3 3 1.0\n", ":3)", "6 fields"),
    ("run.trec", "q1 Q0 d1 1 2.0 x\n\nq1 Q0 d2 2 abc x\n", ":3)", "'abc' is not a finite"),
    ("run.trec", "q1 Q0 d1 1 2.0 x\nq1 Q0 d1 2 1.0 x\n", ":2)", "appears twice"),
    ("run.trec", "q1 Q0 d1 1 nan x\n", ":1)", "not a finite number"),
    ("run.jsonl", '{"query_id": "q1", "id": "a", "score": 1}\n{"query_id": "q1", "id": null, '
                  '"score": 2}\n', ":2)", "null id"),
    ("run.jsonl", '{"query_id": "q1", "doc": "a"}\n', ")", "needs fields query_id"),
])
def test_bad_run_lines_name_file_and_line(cli, tmp_path, name, content, where, what):
    path = tmp_path / name
    path.write_text(content)
    r = cli("eval", "retrieval", path, "--qrels", DATA / "qrels.tsv")
    assert r.exit_code == 1 and r.stdout == ""
    assert what in r.stderr and f"{path}{where}" in r.stderr, r.stderr


@pytest.mark.parametrize("content,where,what", [
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n", ":3)", "'high' is not an integer"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", ":3)", "3 tab-separated fields"),
    ("q1 0 d1 1\nq1 0 d2\n", ":2)", "4 fields"),
])
def test_bad_qrels_lines_name_file_and_line(cli, tmp_path, content, where, what):
    path = tmp_path / "qrels.tsv"
    path.write_text(content)
    r = cli("eval", "retrieval", DATA / "bm25.trec", "--qrels", path)
    assert r.exit_code == 1 and r.stdout == ""
    assert what in r.stderr and f"{path}{where}" in r.stderr, r.stderr


def test_empty_run(cli, tmp_path):
    empty = tmp_path / "empty.trec"
    empty.write_text("")
    r = cli("eval", "retrieval", empty, "--qrels", DATA / "qrels.tsv")
    assert r.exit_code == 1 and r.stdout == "" and "the run is empty" in r.stderr
    r = cli("eval", "retrieval", empty, "--qrels", DATA / "qrels.tsv", "--all-queries")
    assert r.exit_code == 0, r
    record = r.records()[0]
    assert record["queries"] == 4 and record["ndcg_at_10"] == 0.0


def test_retrieval_table_on_a_terminal():
    from rich.console import Console

    from vecpipe.commands import eval as ev

    records = [{"run": "a", "queries": 3, "ndcg_at_10": 0.5, "mrr_at_10": 0.25},
               {"run": "x/b", "queries": 3, "ndcg_at_10": 0.6, "mrr_at_10": 0.25, "paired_queries": 3,
                "delta": {"ndcg_at_10": 0.1, "mrr_at_10": 0.0},
                "p_randomization": {"ndcg_at_10": 0.01, "mrr_at_10": 1.0},
                "p_ttest": {"ndcg_at_10": 0.02, "mrr_at_10": 1.0}}]
    console = Console(record=True, width=120)
    console.print(ev._retrieval_table(records, (10,), ("ndcg", "mrr")))
    text = console.export_text()
    assert "nDCG@10" in text and "+0.10000" in text and "0.010 / 0.020*" in text


# ---------------------------------------------------------------- eval beir

def brute_force_run(model_spec, query_prompt="", doc_prompt=""):
    """Exact cosine search over the tiny BEIR folder with a full score matrix (the reference)."""
    from vecpipe.cli.models import load_model

    model = load_model(model_spec)
    qrels = load_tsv_qrels(TINY / "qrels" / "test.tsv")
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(TINY / "queries.jsonl"))
               if q["_id"] in qrels}
    docs = [json.loads(line) for line in open(TINY / "corpus.jsonl")]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    scores = model.encode(list(queries.values()), prompt=query_prompt) @ \
        model.encode(texts, prompt=doc_prompt).T
    run = {qid: {d["_id"]: float(s) for d, s in zip(docs, row)}
           for qid, row in zip(queries, scores)}
    return qrels, run


def test_beir_equals_brute_force_search_and_pytrec(cli, monkeypatch, tmp_path):
    from vecpipe.commands import eval as ev

    monkeypatch.setattr(ev, "_CORPUS_BLOCK", 3)  # several corpus blocks and query chunks
    monkeypatch.setattr(ev, "_QUERY_BLOCK", 2)
    saved = tmp_path / "run.trec"
    r = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1,3,5", "--save-run", saved)
    assert r.exit_code == 0, r
    [record] = r.records()
    qrels, run = brute_force_run("fake:16")
    top5 = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:5]) for q, d in run.items()}
    for key, value in pytrec_means(qrels, top5, (1, 3, 5)).items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
    assert record["corpus"] == 11 and record["queries"] == 5 and record["split"] == "test"
    # q1, q2, q3, q5 equal their relevant document's MTEB text (title + " " + text, stripped)
    per_query = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1", "--per-query").records()
    assert {row["query_id"] for row in per_query if row["mrr_at_1"] == 1.0} >= {"q1", "q2",
                                                                                "q3", "q5"}
    again = cli("eval", "retrieval", saved, "--qrels", TINY / "qrels" / "test.tsv", "--cutoffs",
                "1,3,5").records()[0]
    assert again["ndcg_at_5"] == pytest.approx(record["ndcg_at_5"], abs=1e-6)
    assert len(saved.read_text().splitlines()) == 5 * 5


def test_beir_prompts_reach_the_model(cli):
    r = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1", "--query-prompt", "q: ",
            "--per-query")
    assert r.exit_code == 0, r
    qrels, run = brute_force_run("fake:16", query_prompt="q: ")
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"P.1"}).evaluate(run)
    for row in r.records():
        assert row["precision_at_1"] == ref[row["query_id"]]["P_1"]


def test_beir_through_a_temporary_index(cli):
    exact = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1,3,5").records()[0]
    f32 = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1,3,5", "--index-dtype", "f32")
    assert f32.exit_code == 0, f32
    f32 = f32.records()[0]
    assert f32["search"] == "hnsw-f32" and exact["search"] == "exact"
    for key in ("ndcg_at_5", "mrr_at_5", "recall_at_5"):  # 11 documents: HNSW finds them all
        assert f32[key] == pytest.approx(exact[key], abs=1e-6)
    for dtype in ("i8", "b1"):
        r = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1,3,5", "--index-dtype", dtype)
        assert r.exit_code == 0, r
        assert 0.0 <= r.records()[0]["ndcg_at_5"] <= 1.0
    for bad in (["--index-dtype", "f64"], ["--ef", "10"], ["--index-dtype", "uint8"]):
        r = cli("eval", "beir", TINY, "-m", "fake:16", *bad)
        assert r.exit_code == 2 and r.stdout == "", r
    r = cli("eval", "beir", TINY, "-m", "fake:16", "--cutoffs", "1", "--exact")  # a no-op now
    assert r.exit_code == 0 and r.records()[0]["search"] == "exact"
    assert r.stderr.splitlines()[0] == ("vecpipe eval beir: warning: --exact is deprecated; use "
                                        "no flag (exact search is the default)")


def test_beir_cache_is_shared_with_embed(cli, tmp_path, write_jsonl):
    cache = tmp_path / "cache"
    docs = [json.loads(line) for line in open(TINY / "corpus.jsonl")]
    texts = write_jsonl(tmp_path / "texts.jsonl", [
        {"id": d["_id"], "text": (d["title"] + " " + d["text"]).strip()} for d in docs])
    embedded = cli("embed", texts, "-m", "fake:16", "--cache", cache, "--output-format", "jsonl")
    assert embedded.exit_code == 0, embedded
    first = cli("eval", "beir", TINY, "-m", "fake:16", "--cache", cache)
    assert first.exit_code == 0, first
    # the 11 documents, and 4 queries whose text equals a document's (q4 is new)
    assert "(15 texts from the cache)" in first.stderr
    again = cli("eval", "beir", TINY, "-m", "fake:16", "--cache", cache)
    assert "(16 texts from the cache)" in again.stderr
    assert again.records()[0]["ndcg_at_10"] == first.records()[0]["ndcg_at_10"] == \
        cli("eval", "beir", TINY, "-m", "fake:16").records()[0]["ndcg_at_10"]


def test_beir_errors(cli, tmp_path):
    r = cli("eval", "beir", TINY, "-m", "fake:8", "--split", "train")
    assert r.exit_code == 1 and "missing qrels/train.tsv" in r.stderr
    assert "splits here: dev, test; choose one with --split" in r.stderr
    mined = cli("mine-negatives", "--beir", TINY, "-m", "fake:8", "--split", "train")
    assert mined.exit_code == 1 and mined.stderr.splitlines()[-1] == r.stderr.splitlines()[-1]
    r = cli("eval", "beir", tmp_path / "nope", "-m", "fake:8")
    assert r.exit_code == 1 and "not a folder" in r.stderr
    r = cli("eval", "beir", TINY, "-m", "fake:8", "--fail-under", "recall@1000=1.01")
    assert r.exit_code == 1 and r.records()[0]["recall_at_1000"] == 1.0
    assert "below --fail-under: recall_at_1000 = 1.00000 < 1.01" in r.stderr


@pytest.mark.skipif(os.environ.get("VECPIPE_SLOW", "") in ("", "0"),
                    reason="minutes of CPU: set VECPIPE_SLOW=1")
@pytest.mark.slow
def test_beir_nfcorpus_reproduces_mteb(cli, nfcorpus):
    started = time.perf_counter()
    r = cli("eval", "beir", nfcorpus)
    assert r.exit_code == 0, r
    record = r.records()[0]
    published = {"ndcg_at_10": 0.31594, "map_at_10": 0.11048, "recall_at_100": 0.31151,
                 "mrr_at_10": 0.50456}
    print(json.dumps({k: record[k] for k in published}), f"{time.perf_counter() - started:.0f}s")
    for key, value in published.items():
        assert record[key] == pytest.approx(value, abs=0.002), key


# ---------------------------------------------------------------- eval sts

def test_sts_on_vector_columns_equals_scipy(cli, tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 6)).astype(np.float32)
    b = (a + rng.normal(scale=0.8, size=(40, 6))).astype(np.float32)
    gold = np.round(rng.random(40) * 5)  # ties
    table = pa.table({"ea": pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), 6),
                      "eb": pa.FixedSizeListArray.from_arrays(pa.array(b.ravel()), 6),
                      "label": gold})
    path = tmp_path / "pairs.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    r = cli("eval", "sts", path, "--pair", "ea,eb", "--score", "label")
    assert r.exit_code == 0, r
    record = r.records()[0]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    sims = {"cosine": [scipy.spatial.distance.cosine(x, y) * -1 + 1 for x, y in zip(a64, b64)],
            "dot": (a64 * b64).sum(1),
            "euclidean": [-scipy.spatial.distance.euclidean(x, y) for x, y in zip(a64, b64)],
            "manhattan": [-scipy.spatial.distance.cityblock(x, y) for x, y in zip(a64, b64)]}
    for name, values in sims.items():
        assert record[f"{name}_spearman"] == pytest.approx(
            scipy.stats.spearmanr(gold, values).statistic, abs=1e-9)
        assert record[f"{name}_pearson"] == pytest.approx(
            scipy.stats.pearsonr(gold, values).statistic, abs=1e-9)
    assert record["main_score"] == record["cosine_spearman"] and record["pairs"] == 40


@pytest.mark.slow
def test_sts_embeds_text_with_the_bundled_model(cli, tmp_path, write_jsonl):
    from vecpipe.cli.models import load_model

    pairs = [("A man is playing a guitar.", "A person plays an instrument.", 4.2),
             ("A dog runs in the park.", "A cat sleeps on the sofa.", 1.0),
             ("The stock market fell today.", "Shares dropped sharply.", 4.0),
             ("She is cooking pasta.", "A woman prepares food.", 3.8),
             ("Kids play football.", "The weather is cold.", 0.2),
             ("He reads a book.", "A man is reading.", 4.6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"sentence1": s1, "sentence2": s2, "score": g} for s1, s2, g in pairs])
    r = cli("eval", "sts", path)
    assert r.exit_code == 0, r
    record = r.records()[0]
    st = load_model(None).st  # sentence-transformers itself, without our wrapper
    e1 = st.encode([p[0] for p in pairs]).astype(np.float64)
    e2 = st.encode([p[1] for p in pairs]).astype(np.float64)
    cosine = (e1 * e2).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    gold = [p[2] for p in pairs]
    assert record["cosine_spearman"] == pytest.approx(scipy.stats.spearmanr(gold, cosine)
                                                      .statistic, abs=1e-6)
    assert record["cosine_pearson"] == pytest.approx(scipy.stats.pearsonr(gold, cosine)
                                                     .statistic, abs=1e-5)
    assert record["model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_sts_errors(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [{"sentence1": "a", "sentence2": "b",
                                               "score": 1}, {"sentence1": "c",
                                                             "sentence2": None, "score": 2}])
    r = cli("eval", "sts", path, "-m", "fake:8")
    assert r.exit_code == 1 and "'sentence2' is null" in r.stderr and ":2)" in r.stderr
    r = cli("eval", "sts", path, "--pair", "s1,s2", "--score", "score", "-m", "fake:8")
    assert r.exit_code == 1 and "no field 's1'" in r.stderr


# ---------------------------------------------------------------- eval embeddings

def write_vectors(path, vectors, model="m"):
    table = pa.table({"id": [str(i) for i in range(len(vectors))],
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.asarray(vectors, np.float32).ravel()), vectors.shape[1])})
    table = table.replace_schema_metadata({"vecpipe.model": model})
    with pa.ipc.new_file(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=70):  # several batches
            writer.write_batch(batch)
    return path


def test_embeddings_statistics_equal_numpy(cli, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) + np.array([3.0] + [0.0] * 7)  # anisotropic: shared offset
    x[10] = x[11] * 2.0  # a near duplicate by cosine
    path = write_vectors(tmp_path / "x.arrow", x)
    r = cli("eval", "embeddings", path)
    assert r.exit_code == 0, r
    [record] = r.records()
    x32 = x.astype(np.float32).astype(np.float64)
    unit = x32 / np.linalg.norm(x32, axis=1, keepdims=True)
    cos = unit @ unit.T
    off_diagonal = ~np.eye(300, dtype=bool)
    assert record["anisotropy"] == pytest.approx(cos[off_diagonal].mean(), abs=1e-9)
    assert record["near_duplicate_rate"] == pytest.approx(
        ((cos >= 0.95) & off_diagonal).any(axis=1).mean())
    assert record["near_duplicate_rate"] >= 2 / 300
    assert record["rankme"] == pytest.approx(stats.rankme(np.linalg.svd(x32, compute_uv=False)),
                                             rel=1e-6)
    norms = np.linalg.norm(x32, axis=1)
    assert record["norm"]["mean"] == pytest.approx(norms.mean())
    assert record["norm"]["median"] == pytest.approx(np.median(norms))
    assert record["dim_variance"]["max"] == pytest.approx(x32.var(axis=0).max(), rel=1e-9)
    assert record["rows"] == 300 and record["dim"] == 8 and record["model"] == "m"


def test_embeddings_comparison_detects_a_shift(cli, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(1200, 16))
    same = write_vectors(tmp_path / "same.arrow", rng.normal(size=(1200, 16)))
    shifted = write_vectors(tmp_path / "shifted.arrow",
                            rng.normal(size=(1200, 16)) + np.array([1.0] * 4 + [0.0] * 12))
    first = write_vectors(tmp_path / "first.arrow", base)
    r = cli("eval", "embeddings", first, same, "--sample", "400")
    assert r.exit_code == 0, r
    comparison = r.records()[-1]
    assert comparison["differ"] is False and comparison["held_out"] == [400, 400]
    assert comparison["mean_shift"]["p_value"] > 0.01
    r = cli("eval", "embeddings", first, first, "--sample", "400")  # overlapping rows dropped
    comparison = r.records()[-1]
    assert comparison["differ"] is False and comparison["shared_rows"] > 0
    r = cli("eval", "embeddings", first, shifted, "--sample", "400")
    comparison = r.records()[-1]
    assert comparison["differ"] is True
    assert comparison["mean_shift"]["p_value"] < 1e-6
    drift = cli("eval", "embeddings", first, shifted, "--sample", "400", "--fail-on-drift")
    assert drift.exit_code == 1 and drift.records()[-1]["differ"] is True  # report, then fail
    assert f"error: {first} and {shifted} differ (--fail-on-drift" in drift.stderr
    steady = cli("eval", "embeddings", first, same, "--sample", "400", "--fail-on-drift")
    assert steady.exit_code == 0, steady
    assert cli("eval", "embeddings", first, "--fail-on-drift").exit_code == 2


def test_embeddings_errors(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "v.jsonl", [{"id": "1", "embedding": [1.0, 2.0]},
                                              {"id": "2", "embedding": [1.0]}])
    r = cli("eval", "embeddings", path)
    assert r.exit_code == 1 and r.stdout == "" and "v.jsonl:2)" in r.stderr
    path = write_jsonl(tmp_path / "ok.jsonl", [{"id": "1", "embedding": [1.0, 2.0]}])
    r = cli("eval", "embeddings", path, "--vector-field", "vec")
    assert r.exit_code == 1 and "no field 'vec'" in r.stderr
    r = cli("eval", "embeddings", path, path, path)
    assert r.exit_code == 2


def test_sts_fail_under(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"a": [1.0, 0.0], "b": [1.0, 0.1 * i], "gold": 5 - i} for i in range(5)])
    r = cli("eval", "sts", path, "--pair", "a,b", "--score", "gold", "--fail-under", "cosine_spearman=0.9")
    assert r.exit_code == 0, r
    assert r.records()[0]["cosine_spearman"] == pytest.approx(1.0)
    r = cli("eval", "sts", path, "--pair", "a,b", "--score", "gold", "--fail-under", "cosine=0.9")
    assert r.exit_code == 2 and r.stdout == ""


# ---------------------------------------------------------------- as a process

@pytest.mark.slow
def test_pipeline_and_no_torch_for_eval_retrieval(run_vecpipe):
    import subprocess
    import sys

    out = run_vecpipe("eval", "retrieval", "--qrels", DATA / "qrels.tsv", "--cutoffs", "10",
                      input=(DATA / "dense.jsonl").read_bytes())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ndcg_at_10"] > 0
    code = ("import sys; from vecpipe.cli.app import app\n"
            "try:\n    app(sys.argv[1:], prog_name='vecpipe')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', "
            "'sentence_transformers')), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, "eval", "retrieval", str(DATA / "bm25.trec"),
                          "--qrels", str(DATA / "qrels.tsv")], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "[]"
