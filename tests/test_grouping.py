"""search --group-by against numpy brute force (every chunk scored, groups ranked by the max,
sum or mean of their best chunks), the deepening that brings k groups back when the top chunks
share one, TREC runs of groups, the refusals, and eval retrieval --aggregate against a document
run made by hand."""
import math

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.core.grouping import deepened_groups, group_hits, group_keys, group_lines
from vecpipe.core.vectors import Hits, similarity, sorted_hits

DIM = 8


def write_jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def chunks(path, vectors, parents, extra=None):
    return write_jsonl(path, [{"id": f"c{i}", "parent_id": parent, "n": i % 3,
                               **(extra or {}), "embedding": vector.tolist()}
                              for i, (vector, parent) in enumerate(zip(vectors, parents))])


def reference(queries, vectors, parents, k, size, how):
    """Brute force: per query, [(group, group score, [(chunk id, score)...])] best first."""
    scores = similarity("cos", queries, vectors)
    answers = []
    for row in scores:
        groups = {}
        for chunk in np.lexsort((np.arange(len(row)), -row)):  # best first, ties by row
            groups.setdefault(parents[chunk], []).append((f"c{chunk}", float(row[chunk])))
        ranked = []
        for position, (group, members) in enumerate(groups.items()):
            kept = members[:size]
            values = [score for _, score in kept]
            value = {"max": max(values), "sum": math.fsum(values),
                     "mean": math.fsum(values) / len(values)}[how]
            ranked.append((-value, position, group, value, kept))
        ranked.sort()
        answers.append([(group, value, kept) for _, _, group, value, kept in ranked[:k]])
    return answers


def grouped(records, query_ids):
    """search --group-by output records -> per query, [(group, group score, [(id, score)])]."""
    answers = {qid: [] for qid in query_ids}
    for record in records:
        groups = answers[record["query_id"]]
        if not groups or groups[-1][0] != record["parent_id"]:
            groups.append((record["parent_id"], record["group_score"], []))
        groups[-1][2].append((record["id"], record["score"]))
    return [answers[qid] for qid in query_ids]


def assert_same(got, want):
    assert len(got) == len(want)
    for got_groups, want_groups in zip(got, want):
        assert [g for g, _, _ in got_groups] == [g for g, _, _ in want_groups]
        for (_, got_score, got_kept), (_, want_score, want_kept) in zip(got_groups, want_groups):
            assert got_score == pytest.approx(want_score, abs=1e-5)
            assert [c for c, _ in got_kept] == [c for c, _ in want_kept]
            assert [s for _, s in got_kept] == pytest.approx([s for _, s in want_kept],
                                                             abs=1e-5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """90 chunks of 17 documents (fewer rows than the first depth: every chunk is a
    candidate, so sum and mean are exact too), and 6 queries."""
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((90, DIM)).astype(np.float32)
    parents = [f"d{i}" for i in rng.integers(0, 17, 90)]
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    src = chunks(folder / "c.jsonl", vectors, parents)
    qfile = write_jsonl(folder / "q.jsonl", [{"id": f"q{i}", "embedding": v.tolist()}
                                             for i, v in enumerate(queries)])
    result = CliRunner().invoke(app, ["index", str(src), "-o", str(folder / "idx"), "-m",
                                      f"fake:{DIM}", "--fields", "parent_id,n", "-q"])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "idx": folder / "idx", "q": qfile, "vectors": vectors,
            "parents": parents, "queries": queries, "ids": [f"q{i}" for i in range(6)]}


@pytest.mark.parametrize("how", ["max", "sum", "mean"])
@pytest.mark.parametrize("size", [1, 3])
def test_groups_equal_brute_force(cli, small, how, size):
    result = cli("search", small["idx"], small["q"], "--exact", "-k", 5, "--group-by",
                 "parent_id", "--group-size", size, "--group-score", how, "--output-format",
                 "jsonl")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert_same(grouped(records, small["ids"]),
                reference(small["queries"], small["vectors"], small["parents"], 5, size, how))
    for qid in small["ids"]:
        assert [r["rank"] for r in records if r["query_id"] == qid] == \
            list(range(1, sum(r["query_id"] == qid for r in records) + 1))


def test_hnsw_max_equals_brute_force_and_fields_kept(cli, small):
    result = cli("search", small["idx"], small["q"], "-k", 4, "--group-by", "parent_id",
                 "--fields", "n", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert list(records[0]) == ["query_id", "rank", "id", "score", "group_score", "n",
                                "parent_id"]
    assert_same(grouped(records, small["ids"]),
                reference(small["queries"], small["vectors"], small["parents"], 4, 1, "max"))


def test_fewer_groups_when_fewer_exist(cli, small):
    result = cli("search", small["idx"], small["q"], "-k", 40, "--group-by", "parent_id",
                 "--group-size", 2, "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    got = grouped(result.records(), small["ids"])
    assert [len(groups) for groups in got] == [len(set(small["parents"]))] * 6
    assert_same(got, reference(small["queries"], small["vectors"], small["parents"], 40, 2,
                               "max"))


def test_deepening_finds_k_groups_behind_one_big_group(cli, tmp_path):
    """600 chunks of one document sit around the query, 40 documents of one chunk far off:
    the first 100 candidates hold a single group, so k groups need deeper searches."""
    rng = np.random.default_rng(2)
    query = rng.standard_normal(DIM).astype(np.float32)
    near = query + 0.05 * rng.standard_normal((600, DIM)).astype(np.float32)
    far = rng.standard_normal((40, DIM)).astype(np.float32)
    vectors = np.concatenate([near, far])
    parents = ["big"] * 600 + [f"d{i}" for i in range(40)]
    src = chunks(tmp_path / "c.jsonl", vectors, parents)
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "embedding": query.tolist()}])
    assert cli("index", src, "-o", tmp_path / "idx", "-m", f"fake:{DIM}", "--fields",
               "parent_id", "--flat", "-q").exit_code == 0
    for k, size in ((5, 1), (8, 2)):
        result = cli("search", tmp_path / "idx", qfile, "-k", k, "--group-by", "parent_id",
                     "--group-size", size, "--output-format", "jsonl")
        assert result.exit_code == 0, result.stderr
        got = grouped(result.records(), ["q0"])
        assert len(got[0]) == k
        assert_same(got, reference(query[None], vectors, parents, k, size, "max"))


def test_deepening_fills_groups_whose_other_hits_lie_deeper(cli, tmp_path):
    """Document A has one chunk next to the query and five far off, behind 300 one-chunk
    documents: its mean of 3 needs the far chunks, found by deepening."""
    rng = np.random.default_rng(4)
    query = rng.standard_normal(DIM).astype(np.float32)
    best = query + 0.01 * rng.standard_normal(DIM).astype(np.float32)
    others = query + 0.6 * rng.standard_normal((300, DIM)).astype(np.float32)
    far = -query + 0.3 * rng.standard_normal((5, DIM)).astype(np.float32)
    vectors = np.concatenate([best[None], far, others])
    parents = ["A"] * 6 + [f"d{i}" for i in range(300)]
    src = chunks(tmp_path / "c.jsonl", vectors, parents)
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "embedding": query.tolist()}])
    assert cli("index", src, "-o", tmp_path / "idx", "-m", f"fake:{DIM}", "--fields",
               "parent_id", "--flat", "-q").exit_code == 0
    result = cli("search", tmp_path / "idx", qfile, "-k", 3, "--group-by", "parent_id",
                 "--group-size", 3, "--group-score", "mean", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert_same(grouped(result.records(), ["q0"]),
                reference(query[None], vectors, parents, 3, 3, "mean"))


def test_trec_run_has_one_line_per_group(cli, small):
    result = cli("search", small["idx"], small["q"], "--exact", "-k", 3, "--group-by",
                 "parent_id", "--group-size", 2, "--group-score", "sum", "--output-format",
                 "trec")
    assert result.exit_code == 0, result.stderr
    want = reference(small["queries"], small["vectors"], small["parents"], 3, 2, "sum")
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [(qid, doc, int(rank)) for qid, _, doc, rank, _, _ in lines] == \
        [(qid, group, rank) for qid, groups in zip(small["ids"], want)
         for rank, (group, _, _) in enumerate(groups, 1)]
    assert [float(line[4]) for line in lines] == pytest.approx(
        [value for groups in want for _, value, _ in groups], abs=1e-5)


@pytest.mark.parametrize("args, code, message", [
    (["--group-by", "title"], 1, "--group-by title: not stored (stored: id, parent_id, n)"),
    (["--group-by", "parent_id", "--mmr", "0.5"], 2, "--group-by or --mmr"),
    (["--group-by", "parent_id", "--max-hits", "5", "--min-score", "0"], 2, "--max-hits"),
    (["--group-by", "parent_id", "--group-score", "median"], 2, "use max|sum|mean"),
])
def test_refusals(cli, small, args, code, message):
    result = cli("search", small["idx"], small["q"], *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the error and maybe a hint


def test_an_index_of_chunks_groups_by_parent_id_by_default(cli, small, tmp_path):
    result = cli("search", small["idx"], small["q"], "--exact", "-k", 5, "--group-size", 2,
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert_same(grouped(result.records(), small["ids"]),
                reference(small["queries"], small["vectors"], small["parents"], 5, 2, "max"))
    plain = tmp_path / "plain"
    made = cli("index", small["folder"] / "c.jsonl", "-o", plain, "-m", f"fake:{DIM}",
               "--fields", "n", "-q")
    assert made.exit_code == 0, made.stderr
    refused = cli("search", plain, small["q"], "--group-size", 2)
    assert refused.exit_code == 2 and "--group-size needs --group-by FIELD" in refused.stderr


def test_stream_index_refused(cli, small):
    result = cli("search", small["folder"] / "c.jsonl", small["q"], "-m", f"fake:{DIM}",
                 "--group-by", "parent_id")
    assert result.exit_code == 2
    assert "--group-by needs an index folder" in result.stderr


def test_group_hits_ties_nulls_and_lines():
    hits = Hits(np.array([[0, 1, 2, 3, -1]]), np.array([[0.9, 0.8, 0.8, 0.5, -np.inf]],
                                                         np.float32))
    keys = group_keys(pa.array(["a", None, "b", "a"]))
    assert keys.tolist()[1] == -1
    groups = group_hits(hits, keys, 5, 2, "sum").trimmed()
    assert groups.hits.rows.tolist() == [[0, 3, 2]]  # a: 0.9+0.5 beats b: 0.8; null left out
    assert groups.group_scores[0].tolist() == pytest.approx([1.4, 1.4, 0.8])
    assert groups.counts.tolist() == [2]
    assert list(group_lines(["q", "q", "q"], ["a", "a", "b"], [1.4, 1.4, 0.8])) == \
        [("q", "a", 1, 1.4), ("q", "b", 2, 0.8)]


def test_deepened_groups_stops_when_exhausted():
    vectors = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32)
    keys = np.arange(50) % 4
    calls = []

    def search(which, depth):
        calls.append((list(which), depth))
        return sorted_hits(np.tile(np.arange(50), (len(which), 1)),
                           similarity("cos", vectors[:len(which)], vectors), depth)

    first = search(np.arange(2), 10)
    groups = deepened_groups(search, first, keys, 6, 1, "max", 10, 50)
    assert groups.counts.tolist() == [4, 4]  # only 4 groups exist
    assert [depth for _, depth in calls] == [10, 20, 40, 50]


def write_run(path, rows):
    return write_jsonl(path, [{"query_id": q, "id": c, "score": s, "parent_id": p}
                              for q, c, s, p in rows])


@pytest.mark.parametrize("how", ["max", "sum", "mean"])
def test_eval_aggregate_equals_a_document_run(cli, tmp_path, how):
    rng = np.random.default_rng(3)
    rows = [(f"q{q}", f"c{q}-{c}", round(float(rng.random()), 6), f"d{rng.integers(0, 12)}")
            for q in range(5) for c in range(30)]
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{q}\td{d}\t{int(rng.integers(1, 3))}\n" for q in range(5)
        for d in rng.choice(12, 3, replace=False)))
    documents = {}
    for qid, _, score, parent in rows:
        documents.setdefault((qid, parent), []).append(score)
    reduce = {"max": max, "sum": math.fsum, "mean": lambda s: math.fsum(s) / len(s)}[how]
    by_hand = write_jsonl(tmp_path / "docs.jsonl", [
        {"query_id": qid, "id": parent, "score": reduce(scores)}
        for (qid, parent), scores in documents.items()])
    chunk_run = write_run(tmp_path / "chunks.jsonl", rows)
    got = cli("eval", "retrieval", chunk_run, "--qrels", qrels, "--aggregate",
              f"parent_id={how}", "--output-format", "json")
    want = cli("eval", "retrieval", by_hand, "--qrels", qrels, "--output-format", "json")
    assert got.exit_code == 0 and want.exit_code == 0, got.stderr + want.stderr
    got, want = orjson.loads(got.stdout)[0], orjson.loads(want.stdout)[0]
    assert {key: value for key, value in got.items() if key != "run"} == \
        pytest.approx({key: value for key, value in want.items() if key != "run"})


def test_eval_aggregate_refusals(cli, tmp_path):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    trec = tmp_path / "run.trec"
    trec.write_text("q0 Q0 c0 1 0.5 vecpipe\n")
    result = cli("eval", "retrieval", trec, "--qrels", qrels, "--aggregate", "parent_id=max")
    assert result.exit_code == 1 and "TREC run file carries no parent_id" in result.stderr
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"query_id": "q0", "id": "c0", "score": 1}])
    result = cli("eval", "retrieval", plain, "--qrels", qrels, "--aggregate", "parent_id=max")
    assert result.exit_code == 1 and "no parent_id field" in result.stderr
    result = cli("eval", "retrieval", plain, "--qrels", qrels, "--aggregate", "parent_id")
    assert result.exit_code == 2 and "FIELD=max|sum|mean" in result.stderr


@pytest.mark.slow
def test_groups_of_reranked_hits(cli, tmp_path, cross_encoder):
    words = ["apple pie", "river bank", "stock market", "green tea", "rain forest", "old car"]
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        {"id": f"c{i}", "text": f"{words[i % 6]} and {words[(i * 7) % 6]} number {i}",
         "parent_id": f"d{i % 5}"} for i in range(30)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "text": "tea and apples"},
                                                 {"id": "q1", "text": "money markets"}])
    assert cli("embed", docs, "-m", "fake:16", "-o", tmp_path / "emb.arrow", "-q").exit_code == 0
    assert cli("index", tmp_path / "emb.arrow", "-o", tmp_path / "idx", "--fields",
               "text,parent_id", "-q").exit_code == 0
    common = ("search", tmp_path / "idx", queries, "--exact", "--rerank", cross_encoder,
              "--rerank-depth", 12, "--keep-first-score", "--output-format", "jsonl")
    flat = cli(*common, "-k", 12, "--fields", "parent_id")
    got = cli(*common, "-k", 3, "--group-by", "parent_id", "--group-size", 2)
    assert flat.exit_code == 0 and got.exit_code == 0, flat.stderr + got.stderr
    want = []
    for qid in ("q0", "q1"):
        groups = {}
        for record in (r for r in flat.records() if r["query_id"] == qid):
            groups.setdefault(record["parent_id"], []).append(record)
        ranked = sorted(groups.values(), key=lambda members: -members[0]["score"])[:3]
        want += [(qid, r["id"], r["first_score"], members[0]["score"]) for members in ranked
                 for r in members[:2]]
    assert [(r["query_id"], r["id"]) for r in got.records()] == [w[:2] for w in want]
    assert [r["first_score"] for r in got.records()] == pytest.approx([w[2] for w in want])
    assert [r["group_score"] for r in got.records()] == pytest.approx([w[3] for w in want])
