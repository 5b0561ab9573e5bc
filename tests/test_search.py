"""vecpipe search: ANN and exact results against numpy brute force (real MiniLM embeddings and
fake vectors), filters at every selectivity, threshold, k > size, rescoring, compressed indexes,
exact search over a stream, model checks, output formats; and the filter language itself."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.cli.models import load_model
from vecpipe.core.codec import Codec
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.core.filter_expr import parse
from vecpipe.core.index_open import open_index

REPO = Path(__file__).resolve().parent.parent
N, DIM, K = 3000, 32, 10


def write_arrow(path, columns: dict, vectors, meta: dict):
    table = pa.table({**columns, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(vectors).reshape(-1)), vectors.shape[1])})
    table = table.replace_schema_metadata({f"vecpipe.{k}": str(v) for k, v in meta.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_queries(path, vectors, ids=None):
    ids = ids or [f"q{i}" for i in range(len(vectors))]
    path.write_bytes(b"".join(orjson.dumps({"id": i, "embedding": v.tolist()}) + b"\n"
                              for i, v in zip(ids, vectors)))
    return path


def brute_force(queries, docs, metric="cos", mask=None, k=K):
    q, d = queries.astype(np.float64), docs.astype(np.float64)
    if metric == "cos":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
    scores = -((q[:, None, :] - d[None, :, :]) ** 2).sum(-1) if metric == "l2sq" else q @ d.T
    if mask is not None:
        scores = np.where(mask[None, :], scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def hits_by_query(records, n_queries, prefix="q"):
    """{query index: [(doc row, score, record)]} from search output records (ids `d<row>`)."""
    out = {i: [] for i in range(n_queries)}
    for r in records:
        out[int(r["query_id"][len(prefix):])].append((int(r["id"][1:]), r["score"], r))
    for hits in out.values():
        assert [h[2]["rank"] for h in hits] == list(range(1, len(hits) + 1))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N fake docs (unit vectors) with fields to filter on, indexed with default settings."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = {"id": [f"d{i}" for i in range(N)], "group": [i % 7 for i in range(N)],
               "lang": [["en", "de", None][i % 3] for i in range(N)],
               "year": [2000 + i % 25 for i in range(N)], "rare": [i == 1234 for i in range(N)]}
    src = write_arrow(folder / "docs.arrow", columns, vectors,
                      {"model": "fake:32", "dim": DIM, "normalized": "true"})
    queries = rng.standard_normal((40, DIM)).astype(np.float32)
    from typer.testing import CliRunner

    from vecpipe.cli.app import app
    result = CliRunner().invoke(app, ["index", str(src), "-o", str(folder / "idx"), "--all-fields",
                                      "--keep-vectors"])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "src": src, "idx": folder / "idx", "vectors": vectors,
            "columns": columns, "queries": queries,
            "qfile": write_queries(folder / "q.jsonl", queries)}


# ---- real embeddings ----------------------------------------------------------------------------

def _real_texts(nfcorpus):
    """(doc texts, query texts): NFCorpus titles and queries when present, else the docstrings of
    Python's standard library (bench/demo_corpus.py)."""
    if nfcorpus is not None:
        with open(nfcorpus / "corpus.jsonl", "rb") as f:
            docs = [orjson.loads(next(f))["title"] for _ in range(300)]
        with open(nfcorpus / "queries.jsonl", "rb") as f:
            queries = [orjson.loads(next(f))["text"] for _ in range(30)]
        return docs, queries
    spec = importlib.util.spec_from_file_location("demo_corpus", REPO / "bench" / "demo_corpus.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    records = sorted(demo.records(max_chars=200), key=lambda r: r["id"])
    texts = [r["text"] for r in records]
    return texts[::max(1, len(texts) // 300)][:300], [r["id"].replace(".", " ") for r in
                                                      records[1::len(records) // 30]][:30]


@pytest.fixture(scope="module")
def real(tmp_path_factory, nfcorpus_path):
    """Real all-MiniLM-L6-v2 embeddings (sentence-transformers directly) and an index of them."""
    folder = tmp_path_factory.mktemp("real")
    model = load_model(None)
    doc_texts, query_texts = _real_texts(nfcorpus_path)
    docs = np.asarray(model.st.encode(doc_texts, batch_size=64, normalize_embeddings=True))
    queries = np.asarray(model.st.encode(query_texts, batch_size=64, normalize_embeddings=True))
    src = write_arrow(folder / "docs.arrow", {"id": [f"d{i}" for i in range(len(docs))]},
                      docs.astype(np.float32), model.metadata())
    qfile = folder / "q.jsonl"
    qfile.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "text": t}) + b"\n"
                               for i, t in enumerate(query_texts)))
    return {"folder": folder, "src": src, "docs": docs, "queries": queries, "qfile": qfile}


@pytest.mark.slow
def test_real_embeddings_ann_recall_and_exact_equal_brute_force(cli, real):
    idx = real["folder"] / "idx"
    # one build thread: usearch's parallel insertion order varies the graph from run to run
    # (recall 0.92-1.0 seen on these 30 queries), a single thread builds the same graph each time
    assert cli("index", real["src"], "-o", idx, "--threads", "1").exit_code == 0
    truth, truth_scores = brute_force(real["queries"], real["docs"])
    n = len(real["queries"])

    r = cli("search", idx, real["qfile"], "-k", K)  # text queries, embedded via the manifest
    assert r.exit_code == 0, r
    ann = hits_by_query(r.records(), n)
    recall = np.mean([len({h[0] for h in ann[i]} & set(truth[i])) / K for i in range(n)])
    assert recall >= 0.95, recall

    exact = hits_by_query(cli("search", idx, real["qfile"], "-k", K, "--exact").records(), n)
    for i in range(n):
        scores = np.array([h[1] for h in exact[i]])
        np.testing.assert_allclose(scores, truth_scores[i], atol=1e-4)
        rows = [h[0] for h in exact[i]]
        clear = np.abs(np.diff(truth_scores[i], append=-np.inf)) > 1e-4  # not a near-tie
        clear &= np.abs(np.diff(truth_scores[i], prepend=np.inf)) > 1e-4
        assert all(rows[j] == truth[i][j] for j in np.flatnonzero(clear))


# ---- exact and ANN on fake vectors ------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
def test_exact_equals_brute_force_for_every_metric(cli, tmp_path, metric):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((500, 16)).astype(np.float32) * rng.uniform(0.5, 2, (500, 1))
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    src = write_arrow(tmp_path / "d.arrow", {"id": [f"d{i}" for i in range(500)]}, docs,
                      {"model": "fake:16", "normalized": "false"})
    assert cli("index", src, "-o", tmp_path / "idx", "--metric", metric).exit_code == 0
    qfile = write_queries(tmp_path / "q.jsonl", queries)
    for args in (["--exact"], []):
        got = hits_by_query(cli("search", tmp_path / "idx", qfile, *args).records(), 20)
        truth, scores = brute_force(queries, docs, metric)
        for i in range(20):
            assert [h[0] for h in got[i]] == list(truth[i]) or args == []
            if args == ["--exact"]:
                np.testing.assert_allclose([h[1] for h in got[i]], scores[i], rtol=1e-5,
                                           atol=1e-4)
    assert np.mean([len({h[0] for h in got[i]} & set(truth[i])) / K for i in range(20)]) >= 0.9


def test_k_larger_than_the_index_returns_every_row(cli, tmp_path):
    docs = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    src = write_arrow(tmp_path / "d.arrow", {"id": [f"d{i}" for i in range(20)]}, docs, {})
    assert cli("index", src, "-o", tmp_path / "idx").exit_code == 0
    qfile = write_queries(tmp_path / "q.jsonl", docs[:3])
    got = hits_by_query(cli("search", tmp_path / "idx", qfile, "-k", 50).records(), 3)
    truth, _ = brute_force(docs[:3], docs, k=20)
    assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(3))


def test_min_score_keeps_exactly_the_hits_above_it(cli, corpus):
    truth, scores = brute_force(corpus["queries"], corpus["vectors"], k=50)
    threshold = float(np.median(scores[:, 5]))
    r = cli("search", corpus["idx"], corpus["qfile"], "-k", 50, "--exact", "--min-score",
            threshold)
    got = hits_by_query(r.records(), 40)
    for i in range(40):
        expected = [row for row, s in zip(truth[i], scores[i]) if s >= threshold]
        assert [h[0] for h in got[i]] == expected
        assert all(h[1] >= threshold for h in got[i])
    assert 0 < sum(len(h) for h in got.values()) < 40 * 50


# ---- filters ----------------------------------------------------------------------------------

FILTERS = {
    "rare == true": lambda c, i: c["rare"][i],                             # 1 row
    "year == 2003 and group == 2": lambda c, i: c["year"][i] == 2003 and c["group"][i] == 2,
    "group == 3": lambda c, i: c["group"][i] == 3,                         # ~14%: exact subset
    'lang == "en" or year >= 2020': lambda c, i: c["lang"][i] == "en" or c["year"][i] >= 2020,
    "not (group == 3)": lambda c, i: c["group"][i] != 3,                   # ~86%: ANN + filter
    'lang not in ["de"]': lambda c, i: c["lang"][i] == "en",               # null lang excluded
    "lang is null and group in [1, 2]": lambda c, i: c["lang"][i] is None and
    c["group"][i] in (1, 2),
    "group == 99": lambda c, i: False,                                     # nothing
}


@pytest.mark.slow
@pytest.mark.parametrize("expression", FILTERS)
def test_filters_equal_brute_force_filtering(cli, corpus, expression):
    columns = corpus["columns"]
    mask = np.array([FILTERS[expression](columns, i) for i in range(N)])
    truth, _ = brute_force(corpus["queries"], corpus["vectors"], mask=mask)
    r = cli("search", corpus["idx"], corpus["qfile"], "--filter", expression, "--fields",
            "group,lang,year", "--ef", "64")  # an ef: the graph, though the index is small
    assert r.exit_code == 0, r
    got = hits_by_query(r.records(), 40)
    expected_hits = min(K, int(mask.sum()))
    recalls = []
    for i in range(40):
        rows = [h[0] for h in got[i]]
        assert len(rows) == expected_hits  # a filter matching >= k rows returns k hits
        assert all(mask[row] for row in rows)
        assert all(h[2]["group"] == columns["group"][h[0]] for h in got[i])
        wanted = [row for row in truth[i] if mask[row]][:K]
        recalls.append(len(set(rows) & set(wanted)) / len(wanted) if wanted else 1.0)
    assert np.mean(recalls) >= (1.0 if mask.sum() < N / 2 else 0.9)


def test_filter_plans_cover_every_selectivity(corpus):
    index = open_index(str(corpus["idx"]))
    group = np.array(corpus["columns"]["group"])
    plans = {name: index.searcher(K, mask=mask, ef=64).plan for name, mask in
             {"none": group == 99, "few": group == 3, "most": group != 3,
              "all": group >= 0}.items()}
    assert plans == {"none": "none", "few": "exact-subset", "most": "ann-filtered", "all": "ann"}
    # without an ef a small index is scanned exactly, filtered or not
    assert index.searcher(K).plan == "exact"
    assert index.searcher(K, mask=group != 3).plan == "exact-subset"
    # a filter matching exactly k rows spread over the index still returns all k
    mask = np.zeros(N, dtype=bool)
    mask[np.linspace(0, N - 1, K).astype(int)] = True
    hits = index.searcher(K, mask=mask).search(corpus["queries"])
    assert (hits.counts == K).all() and mask[hits.rows].all()


def test_filter_errors(cli, corpus):
    r = cli("search", corpus["idx"], corpus["qfile"], "--filter", "group ==")
    assert r.exit_code == 2 and r.stdout == "" and "position" in r.stderr
    r = cli("search", corpus["idx"], corpus["qfile"], "--filter", "colour == 'red'")
    assert r.exit_code == 1 and r.stdout == "" and "colour" in r.stderr
    r = cli("search", corpus["idx"], corpus["qfile"], "--filter", "lang > 3")
    assert r.exit_code == 1 and "lang" in r.stderr
    r = cli("search", corpus["idx"], corpus["qfile"], "--fields", "nope")
    assert r.exit_code == 1 and "nope" in r.stderr


# ---- compressed indexes, rescoring ------------------------------------------------------------

@pytest.mark.slow
def test_binary_index_exact_equals_hamming_brute_force_and_rescore_uses_full_vectors(
        cli, corpus, tmp_path):
    idx = tmp_path / "b1"
    assert cli("index", corpus["src"], "-o", idx, "--dtype", "b1", "--keep-vectors").exit_code == 0
    bits = np.packbits(corpus["vectors"] > 0, axis=1)
    query_bits = np.packbits(corpus["queries"] > 0, axis=1)
    distances = np.unpackbits(query_bits[:, None, :] ^ bits[None, :, :], axis=2).sum(2)
    got = hits_by_query(cli("search", idx, corpus["qfile"], "--exact", "-k", 5).records(), 40)
    for i in range(40):
        expected = np.sort(distances[i])[:5]
        np.testing.assert_allclose([h[1] for h in got[i]], 1 - expected / DIM)
        assert all(distances[i][h[0]] == d for h, d in zip(got[i], expected))

    truth, truth_scores = brute_force(corpus["queries"], corpus["vectors"])
    plain = hits_by_query(cli("search", idx, corpus["qfile"]).records(), 40)
    rescored = hits_by_query(cli("search", idx, corpus["qfile"], "--rescore", 20).records(), 40)
    recall = {name: np.mean([len({h[0] for h in got[i]} & set(truth[i])) / K
                             for i in range(40)]) for name, got in
              (("plain", plain), ("rescored", rescored))}
    assert recall["rescored"] > recall["plain"], recall  # 32 random bits: a poor code
    for i in range(40):  # rescored scores are the float cosines of the kept vectors
        rows = [h[0] for h in rescored[i]]
        expected = brute_force(corpus["queries"][i:i + 1], corpus["vectors"][rows], k=len(rows))
        np.testing.assert_allclose([h[1] for h in rescored[i]], expected[1][0], atol=1e-5)
    # k x MULT >= the index: every row is a candidate, so rescoring is exact float search
    everything = hits_by_query(cli("search", idx, corpus["qfile"], "--rescore", N // K)
                               .records(), 40)
    for i in range(40):
        assert [h[0] for h in everything[i]] == list(truth[i])
        np.testing.assert_allclose([h[1] for h in everything[i]], truth_scores[i], atol=1e-5)


@pytest.mark.slow
def test_int8_index_scores_the_float_query_against_the_codes(cli, corpus, tmp_path):
    idx = tmp_path / "i8"
    assert cli("index", corpus["src"], "-o", idx, "--dtype", "i8").exit_code == 0
    index = open_index(str(idx))
    codec = index.codec
    got = hits_by_query(cli("search", idx, corpus["qfile"], "--rescore", 4).records(), 40)
    truth, _ = brute_force(corpus["queries"], corpus["vectors"])
    decoded = codec.decode(codec.encode(corpus["vectors"]))
    for i in range(40):
        rows = [h[0] for h in got[i]]
        expected = brute_force(corpus["queries"][i:i + 1], decoded[rows], k=len(rows))[1][0]
        np.testing.assert_allclose([h[1] for h in got[i]], expected, atol=1e-5)
    recall = np.mean([len({h[0] for h in got[i]} & set(truth[i])) / K for i in range(40)])
    assert recall >= 0.9


def test_query_codes_from_the_same_codec(cli, corpus, tmp_path):
    idx = tmp_path / "i8"
    assert cli("index", corpus["src"], "-o", idx, "--dtype", "i8", "--threads", 1).exit_code == 0
    codec = open_index(str(idx)).codec
    codes = codec.encode(corpus["queries"][:5])
    table = pa.table({"id": [f"q{i}" for i in range(5)], "embedding": codec.to_arrow(codes)})
    table = table.replace_schema_metadata({"vecpipe.model": "fake:32",
                                           "vecpipe.codec": codec.to_json()})
    qfile = tmp_path / "codes.arrow"
    with pa.OSFile(str(qfile), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    got = hits_by_query(cli("search", idx, qfile, "--exact").records(), 5)
    stored = open_index(str(idx)).stored_vectors(range(N)).astype(np.float64)
    truth, _ = brute_force(codes.astype(np.float64), stored)
    assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(5))
    # ANN with the i8 default (k*4 float rescoring) falls back to symmetric code scores
    ann = hits_by_query(cli("search", idx, qfile).records(), 5)
    assert all(len(ann[i]) == 10 for i in range(5))
    assert np.mean([len({h[0] for h in ann[i]} & set(truth[i])) for i in range(5)]) >= 9
    other = Codec.fit(corpus["vectors"][:100], to="int8")
    table = table.replace_schema_metadata({"vecpipe.codec": other.to_json()})
    with pa.OSFile(str(qfile), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    r = cli("search", idx, qfile)
    assert r.exit_code == 1 and "codec differs" in r.stderr


def test_rescore_needs_something_to_rescore_with(cli, tmp_path):
    docs = np.random.default_rng(3).standard_normal((30, 8)).astype(np.float32)
    src = write_arrow(tmp_path / "d.arrow", {"id": [f"d{i}" for i in range(30)]}, docs, {})
    assert cli("index", src, "-o", tmp_path / "idx").exit_code == 0
    r = cli("search", tmp_path / "idx", write_queries(tmp_path / "q.jsonl", docs[:2]),
            "--rescore", 4)
    assert r.exit_code == 2 and "--keep-vectors" in r.stderr


# ---- flat indexes (no graph) --------------------------------------------------------------------

def assert_same_hits(result, expected, n=40):
    got, want = hits_by_query(result.records(), n), hits_by_query(expected.records(), n)
    for q in range(n):  # tied scores (hamming, float16) may break either way
        scores = np.array([h[1] for h in want[q]])
        np.testing.assert_allclose([h[1] for h in got[q]], scores, atol=1e-6)
        gaps = np.diff(scores, prepend=np.inf, append=-np.inf if len(scores) == N else np.nan)
        untied = (np.abs(gaps[:-1]) > 1e-5) & (np.abs(gaps[1:]) > 1e-5)
        assert [h[0] for h, u in zip(got[q], untied) if u] == \
            [h[0] for h, u in zip(want[q], untied) if u], q


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16", "i8", "b1"])
def test_flat_index_answers_like_exact_search_on_the_graph_index(cli, corpus, tmp_path, dtype):
    flat, graph = tmp_path / "flat", tmp_path / "graph"
    for folder, extra in ((flat, ["--flat"]), (graph, [])):
        assert cli("index", corpus["src"], "-o", folder, "--dtype", dtype, "--keep-vectors",
                   "--fields", "group", *extra).exit_code == 0
    assert not (flat / "vectors.usearch").exists()
    width, itemsize = (DIM // 8, 1) if dtype == "b1" else (DIM, {"f32": 4, "f16": 2}.get(dtype, 1))
    assert (flat / "vectors.npy").stat().st_size == 128 + N * width * itemsize
    manifest = orjson.loads((flat / "manifest.json").read_bytes())
    assert manifest["flat"] is True and manifest["hnsw"] is None
    # b1's many tied hamming distances pick different candidates to rescore: rescore them all
    rescore = ["--rescore", N // K if dtype == "b1" else 3]
    for options in ([], ["--filter", "group == 3"], rescore, ["-k", 4000]):
        assert_same_hits(cli("search", flat, corpus["qfile"], *options),
                         cli("search", graph, corpus["qfile"], "--exact", *options))
    if dtype == "f32":  # and both equal numpy brute force
        truth, scores = brute_force(corpus["queries"], corpus["vectors"])
        got = hits_by_query(cli("search", flat, corpus["qfile"]).records(), 40)
        assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(40))
        np.testing.assert_allclose([[h[1] for h in got[i]] for i in range(40)], scores, atol=1e-5)


def test_flat_index_appends_replaces_and_merges(cli, corpus, tmp_path):
    half = N // 2
    vectors, ids = corpus["vectors"], corpus["columns"]["id"]
    meta = {"model": "fake:32", "dim": DIM, "normalized": "true"}
    first = write_arrow(tmp_path / "a.arrow", {"id": ids[:half]}, vectors[:half], meta)
    changed = vectors[half - 10:].copy()
    changed[:10] = -changed[:10]  # the 10 overlapping ids get new vectors
    second = write_arrow(tmp_path / "b.arrow", {"id": ids[half - 10:]}, changed, meta)
    grown = tmp_path / "grown"
    assert cli("index", first, "-o", grown, "--flat").exit_code == 0
    r = cli("index", second, "-o", grown, "--append", "--on-duplicate", "last")
    assert r.exit_code == 0 and "flat" in r.stderr
    final = vectors.copy()
    final[half - 10:half] = changed[:10]
    truth, _ = brute_force(corpus["queries"], final)
    got = hits_by_query(cli("search", grown, corpus["qfile"]).records(), 40)
    assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(40))
    for how in (["--link"], []):  # linked shards, and a rebuilt index that stays flat
        merged = tmp_path / f"merged{len(how)}"
        parts = []
        for name, src in (("p0", first), ("p1", second)):
            if not (tmp_path / name).exists():
                assert cli("index", src, "-o", tmp_path / name, "--flat").exit_code == 0
            parts.append(tmp_path / name)
        assert cli("merge", "--index", *how, *parts, "-o", merged, "--on-duplicate", "last"
                   ).exit_code == 0, how
        if not how:
            assert orjson.loads((merged / "manifest.json").read_bytes())["flat"] is True
        got = hits_by_query(cli("search", merged, corpus["qfile"]).records(), 40)
        assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(40)), how


@pytest.mark.parametrize("index_args, search_args, message", [
    (["--flat", "--connectivity", "8"], None, "no HNSW graph"),
    (["--flat", "--dtype", "bf16"], None, "f32, f16, i8 or b1"),
    (["--flat"], ["--ef", "100"], "flat"),
])
def test_flat_index_refuses_graph_options(cli, corpus, tmp_path, index_args, search_args,
                                          message):
    r = cli("index", corpus["src"], "-o", tmp_path / "idx", *index_args)
    if search_args is not None:
        assert r.exit_code == 0
        r = cli("search", tmp_path / "idx", corpus["qfile"], *search_args)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    r = cli("index", corpus["src"], "-o", corpus["idx"], "--append", "--flat")
    assert r.exit_code == 2 and "new indexes" in r.stderr


# ---- exact search over a stream ---------------------------------------------------------------

def test_stream_search_equals_brute_force_with_filter_and_fields(cli, corpus):
    mask = np.array(corpus["columns"]["group"]) == 3
    r = cli("search", corpus["src"], corpus["qfile"], "--filter", "group == 3", "--fields",
            "year", "-k", 7)
    assert r.exit_code == 0, r
    got = hits_by_query(r.records(), 40)
    truth, scores = brute_force(corpus["queries"], corpus["vectors"], mask=mask, k=7)
    for i in range(40):
        assert [h[0] for h in got[i]] == list(truth[i])
        np.testing.assert_allclose([h[1] for h in got[i]], scores[i], atol=1e-5)
        assert all(h[2]["year"] == corpus["columns"]["year"][h[0]] for h in got[i])
    index_hits = cli("search", corpus["idx"], corpus["qfile"], "--exact", "--filter",
                     "group == 3", "-k", 7).records()
    assert [(h["query_id"], h["id"]) for h in index_hits] == \
        [(h["query_id"], h["id"]) for h in r.records()]


# ---- queries, models, output ------------------------------------------------------------------

def test_text_queries_use_the_manifest_model_and_refuse_another(cli, corpus, tmp_path):
    texts = [f"query about {i}" for i in range(5)]
    qfile = tmp_path / "t.jsonl"
    qfile.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "text": t}) + b"\n"
                               for i, t in enumerate(texts)))
    got = hits_by_query(cli("search", corpus["idx"], qfile, "--exact").records(), 5)
    truth, _ = brute_force(load_model("fake:32").encode(texts), corpus["vectors"])
    assert all([h[0] for h in got[i]] == list(truth[i]) for i in range(5))

    r = cli("search", corpus["idx"], qfile, "-m", "fake:16")
    assert r.exit_code == 1 and r.stdout == ""
    assert "fake:32" in r.stderr and "fake:16" in r.stderr
    foreign = write_arrow(tmp_path / "foreign.arrow", {"id": ["x"]}, corpus["queries"][:1],
                          {"model": "other-model"})
    r = cli("search", corpus["idx"], foreign)
    assert r.exit_code == 1 and "other-model" in r.stderr
    assert cli("search", corpus["idx"], foreign, "--force").exit_code == 0


def test_several_text_fields_are_joined_by_a_space_as_embed_joins_them(cli, corpus, tmp_path,
                                                                        write_jsonl):
    queries = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q0", "title": "query", "body": "about 1"},
        {"id": "q1", "title": None, "body": "about 2"},
        {"id": "q2", "title": "about 3", "body": ""}])
    r = cli("search", corpus["idx"], queries, "--exact", "-k", 3, "--text-field", "title",
            "--text-field", "body", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    truth, _ = brute_force(load_model("fake:32").encode(["query about 1", "about 2",
                                                         "about 3"]), corpus["vectors"], k=3)
    got = hits_by_query(r.records(), 3)
    assert [[h[0] for h in got[i]] for i in range(3)] == [list(t) for t in truth]

    empty = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "title": "x", "body": "y"},
                                               {"id": "b", "title": None, "body": None}])
    r = cli("search", corpus["idx"], empty, "--text-field", "title", "--text-field", "body")
    assert r.exit_code == 1 and "{" not in r.stdout  # no hit; at most the abort line
    assert "query has no text in field 'title' + 'body'" in r.stderr and f"{empty}:2" in r.stderr
    r = cli("search", corpus["idx"], empty, "--text-field", "title", "--text-field", "nope")
    assert r.exit_code == 1 and "neither 'nope' nor 'embedding'" in r.stderr


def test_queries_on_the_command_line(cli, corpus, tmp_path):
    r = cli("search", corpus["idx"], "--query", "first question", "--query", "second question",
            "--exact", "-k", 3, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    truth, _ = brute_force(load_model("fake:32").encode(["first question", "second question"]),
                           corpus["vectors"], k=3)
    got = [(h["query_id"], h["id"]) for h in r.records()]
    assert got == [(f"q{q + 1}", f"d{row}") for q in range(2) for row in truth[q]]
    both = cli("search", corpus["idx"], corpus["qfile"], "--query", "x")
    assert both.exit_code == 2 and "give QUERIES or --query, not both" in both.stderr


def test_plain_text_queries_need_no_input_format(cli, corpus, tmp_path):
    """Queries that are none of the record formats are text lines, one query each."""
    qfile = tmp_path / "questions.txt"
    qfile.write_text("first question\nsecond question\n")
    named = cli("search", corpus["idx"], qfile, "--input-format", "text", "-k", 3, "--exact")
    sniffed = cli("search", corpus["idx"], qfile, "-k", 3, "--exact")
    assert sniffed.exit_code == 0, sniffed
    assert sniffed.stdout == named.stdout and len(sniffed.records()) == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\n")
    assert cli("convert", bad).exit_code == 1  # elsewhere an unknown format is still an error


def test_plain_text_lines_as_queries_against_a_stream(cli, corpus, tmp_path):
    """--input-format names the queries' format; the searched stream is still sniffed."""
    qfile = tmp_path / "questions.txt"
    qfile.write_text("first question\nsecond question\n")
    r = cli("search", corpus["src"], qfile, "--input-format", "text", "-k", 3)
    assert r.exit_code == 0, r
    truth, _ = brute_force(load_model("fake:32").encode(["first question", "second question"]),
                           corpus["vectors"], k=3)
    got = [(h["query_id"], h["id"]) for h in r.records()]
    assert got == [(str(q + 1), f"d{row}") for q in range(2) for row in truth[q]]


def test_trec_output(cli, corpus, tmp_path):
    out = tmp_path / "run.trec"
    r = cli("search", corpus["idx"], corpus["qfile"], "-k", 3, "--output-format", "trec",
            "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    lines = [line.split() for line in out.read_text().splitlines()]
    assert len(lines) == 40 * 3
    assert all(len(parts) == 6 and parts[1] == "Q0" and parts[5] == "vecpipe"
               for parts in lines)
    assert [parts[3] for parts in lines[:3]] == ["1", "2", "3"]
    assert float(lines[0][4]) >= float(lines[1][4]) >= float(lines[2][4])


@pytest.mark.slow
def test_pipeline_index_from_a_pipe_and_search_into_head(tmp_path, write_jsonl):
    docs = [{"id": f"d{i}", "text": f"doc {i}",
             "embedding": load_model("fake:8").encode([f"doc {i}"])[0].tolist()}
            for i in range(50)]
    body = b"".join(orjson.dumps(d) + b"\n" for d in docs)
    run = [sys.executable, "-m", "vecpipe.cli"]
    built = subprocess.run(run + ["index", "-o", str(tmp_path / "idx"), "-m", "fake:8",
                                  "--fields", "text"], input=body, capture_output=True)
    assert built.returncode == 0, built.stderr
    queries = b"".join(orjson.dumps({"id": f"q{i}", "text": f"doc {i}"}) + b"\n"
                       for i in range(2000))
    search = subprocess.Popen(run + ["search", str(tmp_path / "idx"), "--fields", "text",
                                     "--output-format", "jsonl"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=search.stdout, stdout=subprocess.PIPE)
    search.stdout.close()
    try:
        search.stdin.write(queries)
        search.stdin.close()
    except BrokenPipeError:  # search finished (head went away) before reading every query
        pass
    first_line = head.communicate(timeout=120)[0]
    assert search.wait(timeout=120) == 0, search.stderr.read()
    first = orjson.loads(first_line)
    assert (first["query_id"], first["rank"], first["id"], first["text"]) == \
        ("q0", 1, "d0", "doc 0")
    assert first["score"] == pytest.approx(1.0, abs=1e-5)


# ---- the filter language ----------------------------------------------------------------------

TABLE = pa.table({"lang": ["en", "de", None, "en"], "year": [2019, 2021, 2022, None],
                  "ok": [True, False, True, None], "odd name": [1, 2, 3, 4],
                  "title": ["it's", 'say "hi"', "x", "y"]})


@pytest.mark.parametrize("expression, expected", [
    ('lang == "en" and year >= 2020', [0, 0, 0, 0]),
    ('lang == "en" or year >= 2020', [1, 1, 1, 1]),
    ("lang == 'de' or lang == 'en' and year < 2020", [1, 1, 0, 0]),  # and binds tighter
    ("(lang == 'de' or lang == 'en') and year < 2020", [1, 0, 0, 0]),
    ("not lang == 'en'", [0, 1, 0, 0]),  # null is neither
    ("lang in ['en', 'fr']", [1, 0, 0, 1]),
    ("lang not in ['en']", [0, 1, 0, 0]),
    ("lang is null or year is not null and ok", [1, 0, 1, 0]),
    ("ok", [1, 0, 1, 0]),
    ("NOT ok", [0, 1, 0, 0]),
    ("`odd name` >= 3", [0, 0, 1, 1]),
    ("year in [2019, 2022.0]", [1, 0, 1, 0]),
    ("lang = 'de'", [0, 1, 0, 0]),
    ("title == 'it\\'s' or title == \"say \\\"hi\\\"\"", [1, 1, 0, 0]),
    ("year > -1e9 and 1 == 1", [1, 1, 1, 0]),
    ("lang in []", [0, 0, 0, 0]),
])
def test_filter_language(expression, expected):
    assert parse(expression).mask(TABLE).astype(int).tolist() == expected


@pytest.mark.parametrize("expression, error", [
    ("", UsageError), ("lang ==", UsageError), ("(lang == 'en'", UsageError),
    ("lang == 'en' year", UsageError), ("lang @ 1", UsageError), ("lang == 'open", UsageError),
    ("__import__('os')", UsageError), ("year > 'x'", DataError), ("lang", DataError),
    ("missing == 1", DataError), ("year in ['a']", DataError),
])
def test_filter_language_errors(expression, error):
    with pytest.raises(error):
        parse(expression).mask(TABLE)


def test_a_small_index_is_searched_exactly_unless_an_ef_asks_for_the_graph(tmp_path):
    """5,000 384-d float32 vectors (7.7 MB, under EXACT_SCAN_BYTES): the default search is the
    exact scan; random vectors are hard for a graph, so ef 8 misses some of the exact top 10."""
    import pyarrow as pa

    from vecpipe.core.index_build import IndexBuilder
    from vecpipe.core.index_search import EXACT_SCAN_BYTES
    from vecpipe.core.index_spec import IndexSpec

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5000, 384)).astype(np.float32)
    assert vectors.nbytes <= EXACT_SCAN_BYTES
    ids = [str(i) for i in range(len(vectors))]
    with IndexBuilder(str(tmp_path / "idx"), IndexSpec(dim=384)) as builder:
        builder.add(ids, vectors, pa.table({"id": ids}))
    index = open_index(str(tmp_path / "idx"))
    queries = rng.standard_normal((50, 384)).astype(np.float32)
    default, exact = index.searcher(10), index.searcher(10, exact=True)
    assert default.plan == "exact"
    np.testing.assert_array_equal(default.search(queries).rows, exact.search(queries).rows)
    graph = index.searcher(10, ef=8)
    assert graph.plan == "ann"
    assert (graph.search(queries).rows != exact.search(queries).rows).any()
    # ef belongs to the searcher: one made later with another ef does not change it
    wide = index.searcher(10, ef=400)
    before = wide.search(queries).rows
    narrow = index.searcher(10, ef=8)
    narrow.search(queries)
    np.testing.assert_array_equal(wide.search(queries).rows, before)
    np.testing.assert_array_equal(default.search(queries).rows, exact.search(queries).rows)
