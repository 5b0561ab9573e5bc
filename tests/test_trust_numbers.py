"""Numbers that must not mislead (issue 14): comparisons of runs on one query set, runs whose ids
the qrels never judge, cutoffs deeper than the run, truncation counts in `eval beir`, in-sample
compress reports, and parameter-free codecs that compare equal however they were made. Scores
are checked against pytrec_eval and numpy, never against vecpipe's own output."""
import json

import numpy as np
import pyarrow as pa
import pytest
import pytrec_eval

QRELS = {  # six judged queries
    "q1": {"a1": 1, "a2": 2}, "q2": {"b1": 1}, "q3": {"c1": 1, "c2": 1},
    "q4": {"d1": 1}, "q5": {"e1": 2}, "q6": {"f1": 1},
}


def write_qrels(path, qrels=QRELS):
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{rel}" for q, docs in qrels.items()
                                              for d, rel in docs.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_trec(path, run):
    path.write_text("".join(f"{q} Q0 {d} {rank} {score} t\n" for q, docs in run.items()
                            for rank, (d, score) in enumerate(docs.items(), 1)))
    return path


def pytrec_ndcg10(qrels, run):
    return {q: s["ndcg_cut_10"] for q, s in
            pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run).items()}


# A baseline that answers only q1..q3 (well), and a run that answers all six: better than the
# baseline on q1..q3, but it finds nothing on q4..q6, so its mean over its own six queries is
# below the baseline's mean over three.
BASE = {"q1": {"a2": 3.0, "x": 2.0, "a1": 1.0}, "q2": {"x": 2.0, "b1": 1.0},
        "q3": {"c1": 2.0, "x": 1.0}}
OTHER = {"q1": {"a2": 3.0, "a1": 2.0}, "q2": {"b1": 2.0}, "q3": {"c1": 2.0, "c2": 1.5},
         "q4": {"zz": 1.0}, "q5": {"zz": 1.0}, "q6": {"zz": 1.0}}


def test_deltas_and_tests_use_the_queries_both_runs_answer(cli, tmp_path):
    qrels = write_qrels(tmp_path / "qrels.tsv")
    base, other = write_trec(tmp_path / "base.trec", BASE), write_trec(tmp_path / "o.trec", OTHER)
    r = cli("eval", "retrieval", base, other, "--qrels", qrels, "--cutoffs", "10", "--metrics", "ndcg")
    assert r.exit_code == 0, r
    first, second = r.records()
    ref_base, ref_other = pytrec_ndcg10(QRELS, BASE), pytrec_ndcg10(QRELS, OTHER)
    common = sorted(ref_base)  # q1..q3
    own_means = (np.mean(list(ref_base.values())), np.mean(list(ref_other.values())))
    assert own_means[1] < own_means[0]  # what the old delta compared: the wrong sign
    paired = [np.mean([ref[q] for q in common]) for ref in (ref_base, ref_other)]
    assert paired[1] > paired[0]
    assert first["ndcg_at_10"] == pytest.approx(paired[0], abs=1e-9)
    assert second["ndcg_at_10"] == pytest.approx(paired[1], abs=1e-9)
    assert second["delta"]["ndcg_at_10"] == pytest.approx(paired[1] - paired[0], abs=1e-9)
    assert second["delta"]["ndcg_at_10"] > 0
    assert first["queries"] == second["queries"] == second["paired_queries"] == 3
    assert f"runs compared on the 3 queries judged in {qrels} that every run answers ({base} " \
           f"lacks 3, {other} lacks 0 of the 6 judged)" in r.stderr


def test_all_queries_compares_every_judged_query_scored_0_when_missing(cli, tmp_path):
    qrels = write_qrels(tmp_path / "qrels.tsv")
    base, other = write_trec(tmp_path / "base.trec", BASE), write_trec(tmp_path / "o.trec", OTHER)
    r = cli("eval", "retrieval", base, other, "--qrels", qrels, "--cutoffs", "10", "--metrics", "ndcg",
            "--all-queries")
    assert r.exit_code == 0, r
    first, second = r.records()
    ref_base, ref_other = pytrec_ndcg10(QRELS, BASE), pytrec_ndcg10(QRELS, OTHER)
    means = [sum(ref.get(q, 0.0) for q in QRELS) / len(QRELS) for ref in (ref_base, ref_other)]
    assert first["ndcg_at_10"] == pytest.approx(means[0], abs=1e-9)
    assert second["delta"]["ndcg_at_10"] == pytest.approx(means[1] - means[0], abs=1e-9)
    assert second["paired_queries"] == 6
    assert "compared on all 6 queries judged in" in r.stderr


def test_a_run_whose_ids_the_qrels_never_judge_fails(cli, tmp_path):
    qrels = write_qrels(tmp_path / "qrels.tsv")
    chunks = write_trec(tmp_path / "chunks.trec", {q: {f"{d}#0": 1.0 for d in docs}
                                                   for q, docs in QRELS.items()})
    r = cli("eval", "retrieval", chunks, "--qrels", qrels)
    assert r.exit_code == 1 and r.stdout == ""
    assert f"none of the run's documents is judged in {qrels}" in r.stderr
    assert f"({chunks})" in r.stderr


def test_a_run_with_few_judged_documents_warns(cli, tmp_path):
    qrels = write_qrels(tmp_path / "qrels.tsv")
    # per query 10 hits, one of them judged (q1's a1) only for q1: 1 of 60 top-10 hits judged
    run = {q: {f"n{q}{i}": 10.0 - i for i in range(10)} for q in QRELS}
    run["q1"] = {"a1": 11.0, **{f"nq1{i}": 9.0 - i for i in range(9)}}
    path = write_trec(tmp_path / "few.trec", run)
    r = cli("eval", "retrieval", path, "--qrels", qrels, "--cutoffs", "10")
    assert r.exit_code == 0, r
    assert "only 1 of the 60 top-10 hits (1.7%)" in r.stderr
    well = write_trec(tmp_path / "well.trec", {q: {d: 1.0 for d in docs} for q, docs in
                                              QRELS.items()})
    r = cli("eval", "retrieval", well, "--qrels", qrels, "--cutoffs", "2")
    assert r.exit_code == 0 and "top-10 hits" not in r.stderr, r


def test_cutoffs_deeper_than_the_run_warn(cli, tmp_path):
    qrels = write_qrels(tmp_path / "qrels.tsv")
    run = write_trec(tmp_path / "two.trec", {q: {d: 1.0 for d in list(docs) + ["x", "y"]}
                                             for q, docs in QRELS.items()})
    r = cli("eval", "retrieval", run, "--qrels", qrels, "--cutoffs", "1,3,4,10")
    assert r.exit_code == 0, r
    assert f"{run}: at most 4 hits per query: @10 sees no deeper" in r.stderr
    r = cli("eval", "retrieval", run, "--qrels", qrels, "--cutoffs", "1,4")
    assert r.exit_code == 0 and "hits per query" not in r.stderr, r


# ---------------------------------------------------------------- parameter-free codecs

def _texts(path, prefix, n):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": f"{prefix} text {i} "
                                        f"topic {i % 7}"}) + "\n" for i in range(n)))
    return path


def _fake(texts, dim=384):
    """The fake model's vectors, independently of vecpipe's pipeline: hash-seeded Gaussians."""
    from vecpipe.core.embedder import fake_vectors

    return fake_vectors(texts, dim, "", normalize=False)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def truncated_index(tmp_path, run_vecpipe):
    docs = _texts(tmp_path / "docs.jsonl", "doc", 300)
    embedded = run_vecpipe("embed", "-m", "fake:384", docs, "-o", tmp_path / "d.arrow")
    assert embedded.returncode == 0, embedded.stderr
    for name, to in (("idx", "float32"), ("idx16", "float16")):
        compressed = run_vecpipe("compress", tmp_path / "d.arrow", "--dim", "128", "--dtype", to,
                                 "-o", tmp_path / f"{name}.arrow")
        assert compressed.returncode == 0, compressed.stderr
        built = run_vecpipe("index", tmp_path / f"{name}.arrow", "-o", tmp_path / name)
        assert built.returncode == 0, built.stderr
    return tmp_path


@pytest.mark.slow
def test_truncated_queries_equal_however_they_were_made(truncated_index, run_vecpipe):
    """Queries truncated by `embed --dim 128` or by `compress --dim 128` (fitted on 25 rows,
    the index's codec on 300) search an index of `compress --dim 128` vectors alike, and find
    the numpy cosine top-5 of the truncated fake vectors."""
    tmp = truncated_index
    queries = _texts(tmp / "q.jsonl", "query", 25)
    assert run_vecpipe("embed", "-m", "fake:384", queries, "-o", tmp / "full.arrow").returncode == 0
    made = {"embed --dim": ["embed", "-m", "fake:384", "--dim", "128", queries]}
    for to in ("float32", "float16"):
        made[f"compress --to {to}"] = ["compress", tmp / "full.arrow", "--dim", "128", "--dtype", to]
    for name, args in made.items():
        out = run_vecpipe(*args, "-o", tmp / f"{name}.arrow")
        assert out.returncode == 0, out.stderr
    texts = [f"query text {i} topic {i % 7}" for i in range(25)]
    doc_texts = [f"doc text {i} topic {i % 7}" for i in range(300)]
    exact = _unit(_unit(_fake(texts))[:, :128]) @ _unit(_unit(_fake(doc_texts))[:, :128]).T
    fifth = -np.sort(-exact, axis=1)[:, 4]
    for index, made_by in (("idx", "embed --dim"), ("idx", "compress --to float32"),
                           ("idx16", "embed --dim"), ("idx16", "compress --to float16")):
        found = run_vecpipe("search", tmp / index, tmp / f"{made_by}.arrow", "-k", "5",
                            "--exact", "--output-format", "jsonl")
        assert found.returncode == 0, (index, made_by, found.stderr)
        hits = [json.loads(line) for line in found.stdout.splitlines()]
        assert len(hits) == 25 * 5
        tolerance = 1e-5 if index == "idx" else 3e-3  # float16 vectors
        for hit in hits:
            q, d = int(hit["query_id"][5:]), int(hit["id"][3:])
            assert hit["score"] == pytest.approx(exact[q, d], abs=tolerance), (index, made_by)
            assert exact[q, d] >= fifth[q] - 2 * tolerance, (index, made_by, hit)


@pytest.mark.slow
def test_a_query_dimension_mismatch_names_what_the_index_expects(truncated_index, run_vecpipe,
                                                                tmp_path):
    queries = _texts(tmp_path / "q.jsonl", "query", 5)
    assert run_vecpipe("embed", "-m", "fake:384", "--dim", "64", queries,
                       "-o", tmp_path / "q64.arrow").returncode == 0
    found = run_vecpipe("search", truncated_index / "idx", tmp_path / "q64.arrow")
    assert found.returncode == 1
    stderr = found.stderr.decode()
    assert "query vectors have 64 dimensions" in stderr
    assert "expects 384 (or 128, already truncated)" in stderr, stderr
    assert stderr.count("\n") <= 2  # one error line and at most a hint


def test_codec_identity_drops_what_does_not_change_the_vectors():
    from vecpipe.core.codec import Codec
    from vecpipe.formats.errors import DataError
    from vecpipe.core.space import check_same_space, merged_meta

    rng = np.random.default_rng(0)
    small, large = _unit(rng.normal(size=(25, 16))), _unit(rng.normal(size=(300, 16)))
    for to in ("float32", "float16", "bfloat16"):
        a, b = Codec.fit(small, to, dim=8), Codec.fit(large, to, dim=8)
        assert a.to_json() != b.to_json()  # calibration rows 25 vs 300
        meta_a, meta_b = a.metadata(), b.metadata()
        check_same_space(meta_a, meta_b, "a", "b")
        assert merged_meta([meta_a, meta_b])["codec"] == meta_a["codec"]
        assert a == b
    fitted = Codec.fit(small, "int8", dim=8), Codec.fit(large, "int8", dim=8)
    with pytest.raises(DataError, match="codec differs: a has 16 -> dim 8 -> int8"):
        check_same_space(fitted[0].metadata(), fitted[1].metadata(), "a", "b")
    assert "codec" not in merged_meta([fitted[0].metadata(), fitted[1].metadata()])
    with pytest.raises(DataError, match="codec differs"):
        check_same_space(Codec.fit(small, "float16", dim=8).metadata(),
                         Codec.fit(small, "float16", dim=4).metadata(), "a", "b", keys=("codec",))


# ---------------------------------------------------------------- compress --report queries

def _write_vectors(path, vectors, model="fake:32"):
    from vecpipe.formats import schema as names

    table = pa.table({"id": [f"r{i}" for i in range(len(vectors))],
                      "embedding": names.numpy_to_vectors(vectors.astype(np.float32))})
    meta = {"model": model, "dim": str(vectors.shape[1]), "normalized": "true"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


def _anisotropic(rows, dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    return _unit(x).astype(np.float32)


def _recall_at_10(exact, approx):
    truth = np.argsort(-exact, axis=1)[:, :10]
    found = np.argsort(-approx, axis=1)[:, :10]
    return np.mean([len(np.intersect1d(t, f)) for t, f in zip(truth, found)]) / 10


def test_compress_report_says_its_recall_is_in_sample(cli, tmp_path):
    src = _write_vectors(tmp_path / "v.arrow", _anisotropic(600, 32, 0))
    r = cli("compress", src, "--dim", "16", "--report", "--save-report", "-",
            "-o", tmp_path / "c.arrow")
    assert r.exit_code == 0, r
    retrieval = json.loads(r.stdout)["retrieval"]
    assert retrieval["in_sample"] is True and retrieval["queries_from"] == "calibration rows"
    assert "in-sample: calibration rows as queries" in r.stderr


def test_compress_report_queries_are_held_out(cli, tmp_path):
    x = _anisotropic(600, 32, 0)
    queries = _anisotropic(40, 32, 7)
    src = _write_vectors(tmp_path / "v.arrow", x)
    qfile = _write_vectors(tmp_path / "q.arrow", queries)
    r = cli("compress", src, "--dim", "16", "--report", "--save-report", "-",
            "--report-queries", qfile, "-o", tmp_path / "c.arrow")
    assert r.exit_code == 0, r
    retrieval = json.loads(r.stdout)["retrieval"]
    expected = _recall_at_10(queries @ x.T, _unit(queries[:, :16]) @ _unit(x[:, :16]).T)
    assert retrieval["recall"] == pytest.approx(expected, abs=1e-4)
    assert retrieval["in_sample"] is False and retrieval["queries_from"] == str(qfile)
    assert retrieval["queries"] == 40 and retrieval["corpus"] == 600
    assert f"40 held-out queries from {qfile}" in r.stderr


def test_compress_report_queries_must_share_the_vector_space(cli, tmp_path):
    src = _write_vectors(tmp_path / "v.arrow", _anisotropic(100, 32, 0))
    out = tmp_path / "c.arrow"
    other_dim = _write_vectors(tmp_path / "q24.arrow", _anisotropic(5, 24, 1))
    r = cli("compress", src, "--dim", "16", "--report", "--report-queries", other_dim, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert "dim differs" in r.stderr and str(other_dim) in r.stderr, r
    other_model = _write_vectors(tmp_path / "qm.arrow", _anisotropic(5, 32, 1), model="m2")
    r = cli("compress", src, "--dim", "16", "--report", "--report-queries", other_model,
            "-o", out)
    assert r.exit_code == 1 and "model differs" in r.stderr and not out.exists(), r
    r = cli("compress", src, "--dim", "16", "--report-queries", other_model, "-o", out)
    assert r.exit_code == 2 and "--report-queries needs --report" in r.stderr, r


def test_compress_report_queries_from_jsonl_are_checked_before_any_output(cli, tmp_path,
                                                                         write_jsonl):
    src = _write_vectors(tmp_path / "v.arrow", _anisotropic(100, 32, 0))
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "embedding": [0.1] * 24}])
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--dim", "16", "--report", "--report-queries", qfile, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert f"--report-queries: vectors have 24 dimensions, the input 32 ({qfile})" in r.stderr


# ---------------------------------------------------------------- eval beir truncation

@pytest.mark.slow
def test_beir_reports_documents_longer_than_the_window(cli, tmp_path, write_jsonl):
    from vecpipe.cli.models import load_model

    long_text = " ".join(f"word{i} nutrition" for i in range(300))
    docs = [{"_id": "d1", "title": "Long", "text": long_text},
            {"_id": "d2", "title": "Short", "text": "vitamin d and bone health"},
            {"_id": "d3", "title": "", "text": "statins and cholesterol"}]
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", docs)
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "bone health"},
                                           {"_id": "q2", "text": "cholesterol drugs"}])
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n"
                                               "q2\td3\t1\n")
    model = load_model(None)
    tokenizer, window = model.st.tokenizer, model.st.max_seq_length
    lengths = [len(tokenizer((d["title"] + " " + d["text"]).strip())["input_ids"]) for d in docs]
    assert [n > window for n in lengths] == [True, False, False]
    r = cli("eval", "beir", folder, "--cutoffs", "1,3")
    assert r.exit_code == 0, r
    assert f"1 of 3 documents and 0 of 2 queries were longer than the model's {window}-token " \
           "window and were truncated" in r.stderr
