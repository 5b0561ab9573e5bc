"""Range search (every hit >= a score, capped) against numpy brute force, exact and over HNSW,
filtered and not; MMR against a plain-python MMR written here from the paper's definition."""
import math

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.core.diversity import check_lambda, diversified, index_mmr, mmr_order
from vecpipe.core.index_open import open_index
from vecpipe.core.index_search import RANGE_FIRST_DEPTH, range_hits
from vecpipe.core.vectors import Hits
from vecpipe.formats.errors import ParameterError

N, DIM = 2000, 16


def write_arrow(path, vectors, columns=None):
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))], **(columns or {}),
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.ascontiguousarray(vectors).reshape(-1)),
                          vectors.shape[1])})
    table = table.replace_schema_metadata({b"vecpipe.model": f"fake:{vectors.shape[1]}".encode(),
                                           b"vecpipe.normalized": b"false"})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_queries(path, vectors):
    path.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "embedding": v.tolist()}) + b"\n"
                              for i, v in enumerate(vectors)))
    return path


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Clustered vectors (so that some queries have hundreds of neighbours above a score and
    others a handful), indexed as HNSW and flat."""
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("range")
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((8, DIM))
    spread = rng.uniform(0.2, 1.5, 8)[:, None]
    labels = rng.integers(0, 8, N)
    vectors = (centres[labels] + spread[labels] * rng.standard_normal((N, DIM)))
    vectors = vectors.astype(np.float32)
    queries = (centres[rng.integers(0, 8, 30)] + 0.5 * rng.standard_normal((30, DIM)))
    queries = queries.astype(np.float32)
    src = write_arrow(folder / "d.arrow", vectors, {"group": (labels % 3).tolist()})
    for name, extra in (("hnsw", []), ("flat", ["--flat"])):
        result = CliRunner().invoke(app, ["index", str(src), "-o", str(folder / name),
                                          "--all-fields", "--threads", "1", *extra])
        assert result.exit_code == 0, result.output
    return {"folder": folder, "src": src, "vectors": vectors, "queries": queries,
            "labels": labels, "qfile": write_queries(folder / "q.jsonl", queries)}


def cosine(queries, docs):
    q = queries.astype(np.float64) / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs.astype(np.float64) / np.linalg.norm(docs, axis=1, keepdims=True)
    return q @ d.T


def range_truth(scores, min_score, max_hits, mask=None):
    """Per query: the rows scoring >= min_score, best first (ties by row), at most max_hits."""
    if mask is not None:
        scores = np.where(mask[None, :], scores, -np.inf)
    out = []
    for row_scores in scores:
        order = np.lexsort((np.arange(len(row_scores)), -row_scores))
        out.append([int(r) for r in order if row_scores[r] >= min_score][:max_hits])
    return out


def searcher_search(index, queries, mask=None, exact=False):
    """`range_hits`'s search callable over one opened index (a Searcher per depth)."""
    def search(which, k):
        return index.searcher(k, exact=exact, mask=mask).search(queries[which])
    return search


def counts_spread(truth):
    counts = [len(rows) for rows in truth]
    return min(counts), max(counts)


@pytest.mark.parametrize("layout, exact", [("flat", False), ("hnsw", True)])
def test_exact_range_search_equals_brute_force(clustered, layout, exact):
    index = open_index(str(clustered["folder"] / layout))
    scores = cosine(clustered["queries"], clustered["vectors"])
    min_score, max_hits = 0.7, 200
    truth = range_truth(scores, min_score, max_hits)
    low, high = counts_spread(truth)
    assert low < RANGE_FIRST_DEPTH < 2 * RANGE_FIRST_DEPTH < high  # several rounds, and a cap
    assert high == max_hits and sum(len(t) == max_hits for t in truth) < len(truth)
    hits = range_hits(searcher_search(index, clustered["queries"], exact=exact),
                      len(clustered["queries"]), min_score, max_hits)
    for i, rows in enumerate(truth):
        got = hits.rows[i][hits.rows[i] >= 0]
        assert got.tolist() == rows, i
        np.testing.assert_allclose(hits.scores[i][:len(rows)], scores[i][rows], atol=1e-5)


def test_filtered_and_exhausted_range_search(clustered):
    index = open_index(str(clustered["folder"] / "flat"))
    scores = cosine(clustered["queries"], clustered["vectors"])
    mask = clustered["labels"] % 3 == 1
    truth = range_truth(scores, 0.5, 10_000, mask)
    hits = range_hits(searcher_search(index, clustered["queries"], mask=mask),
                      len(clustered["queries"]), 0.5, 10_000)
    assert [list(r[r >= 0]) for r in hits.rows] == truth
    # a score every row passes: the whole (filtered) index comes back, ending on a short round
    everything = range_hits(searcher_search(index, clustered["queries"][:2], mask=mask), 2,
                            -2.0, 10_000)
    assert (everything.counts == mask.sum()).all()


def test_hnsw_range_search_finds_nearly_all_and_nothing_below(clustered):
    index = open_index(str(clustered["folder"] / "hnsw"))
    scores = cosine(clustered["queries"], clustered["vectors"])
    truth = range_truth(scores, 0.8, 300)
    hits = range_hits(searcher_search(index, clustered["queries"]), len(truth), 0.8, 300)
    assert (hits.scores[hits.rows >= 0] >= 0.8).all()
    assert (hits.counts <= 300).all()
    found = sum(len(set(hits.rows[i]) & set(rows)) for i, rows in enumerate(truth))
    assert found / sum(map(len, truth)) >= 0.95


def test_range_search_rounds_double_only_for_unfinished_queries():
    calls = []
    scores = np.linspace(1, 0, 1000)[None, :].repeat(3, 0)  # query i: row j scores 1 - j/999
    scores[1] *= 0.01   # query 1: nothing >= 0.5 past row 0

    def search(which, k):
        calls.append((which.tolist(), k))
        return Hits(np.tile(np.arange(k), (len(which), 1)), scores[which, :k].astype(np.float32))

    hits = range_hits(search, 3, 0.5, 10_000)
    assert [len(r[r >= 0]) for r in hits.rows] == [500, 0, 500]
    assert calls[0] == ([0, 1, 2], RANGE_FIRST_DEPTH) and calls[1][0] == [0, 2]
    assert [k for _, k in calls] == [64, 128, 256, 512]  # row 511 is the first below
    with pytest.raises(ParameterError):
        range_hits(search, 3, 0.5, 0)


@pytest.mark.slow
def test_search_cli_range_search(cli, clustered):
    """`search --min-score S --max-hits N` on a flat index and on the stream: brute force."""
    scores = cosine(clustered["queries"], clustered["vectors"])
    truth = range_truth(scores, 0.8, 300)
    for target in (clustered["folder"] / "flat", clustered["src"]):
        r = cli("search", target, clustered["qfile"], "--min-score", 0.8, "--max-hits", 300)
        assert r.exit_code == 0, r
        got = {f"q{i}": [] for i in range(len(truth))}
        for record in r.records():
            got[record["query_id"]].append(int(record["id"][1:]))
        assert [got[f"q{i}"] for i in range(len(truth))] == truth
    r = cli("search", clustered["folder"] / "flat", clustered["qfile"], "--max-hits", 300)
    assert r.exit_code == 2 and "--min-score" in r.stderr


# ---- MMR -------------------------------------------------------------------------------------

def python_similarity(metric, a, b):
    dot = sum(x * y for x, y in zip(a, b))
    if metric == "ip":
        return dot
    if metric == "cos":
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return -sum((x - y) ** 2 for x, y in zip(a, b))


def reference_mmr(metric, query, docs, lam, k):
    """Carbonell & Goldstein's MMR, literally: pick argmax over the unpicked of
    lam*sim(q,d) - (1-lam)*max_{s picked} sim(d,s); the first pick by relevance alone, scored
    against the least similar pair of candidates (the convention vecpipe documents)."""
    relevance = [python_similarity(metric, query, d) for d in docs]
    pairs = [python_similarity(metric, a, b) for i, a in enumerate(docs)
             for j, b in enumerate(docs) if i != j]
    floor = min(pairs) if pairs else 0.0
    picked, scores = [], []
    while len(picked) < min(k, len(docs)):
        best, best_score = None, None
        for d in range(len(docs)):
            if d in picked:
                continue
            redundancy = max((python_similarity(metric, docs[d], docs[s]) for s in picked),
                             default=floor)
            score = lam * relevance[d] - (1 - lam) * redundancy
            if best_score is None or score > best_score + 1e-12:
                best, best_score = d, score
        picked.append(best)
        scores.append(best_score)
    return picked, scores, [relevance[p] for p in picked]


@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mmr_equals_the_reference(metric, lam):
    rng = np.random.default_rng(5)
    docs = rng.standard_normal((60, 8)).astype(np.float32)
    docs[10] = docs[3] * 1.01  # near-duplicates: MMR must skip one of them
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    rows = np.stack([rng.permutation(60)[:25] for _ in range(4)])
    rows[2, 20:] = -1  # a query with fewer candidates
    hits = Hits(rows, np.zeros(rows.shape, np.float32))
    got, relevance = diversified(queries, hits, lambda r: docs[r], metric, lam, 10)
    for q in range(4):
        candidates = [int(r) for r in rows[q] if r >= 0]
        order, scores, rel = reference_mmr(metric, queries[q].tolist(),
                                           [docs[r].tolist() for r in candidates], lam, 10)
        assert got.rows[q].tolist() == [candidates[p] for p in order]
        np.testing.assert_allclose(got.scores[q], scores, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(relevance[q], rel, rtol=1e-4, atol=1e-4)
        assert (np.diff(got.scores[q]) <= 1e-6).all()  # scores fall with the rank


def test_mmr_extremes_and_checks():
    rng = np.random.default_rng(6)
    relevance = rng.random(30)
    pairwise = rng.random((30, 30))
    order, _ = mmr_order(relevance, pairwise, 1.0, 30)
    assert order.tolist() == np.argsort(-relevance, kind="stable").tolist()
    duplicates = np.ones((5, 5))  # all the same: lambda 0 keeps the first-stage order
    assert mmr_order(np.ones(5), duplicates, 0.0, 3)[0].tolist() == [0, 1, 2]
    assert mmr_order([], np.zeros((0, 0)), 0.5, 3)[0].tolist() == []
    for bad in (-0.1, 1.5):
        with pytest.raises(ParameterError):
            check_lambda(bad)


@pytest.mark.parametrize("layout", ["f32", "f16", "keep"])
def test_index_mmr_uses_the_stored_vectors(cli, tmp_path, layout):
    rng = np.random.default_rng(8)
    docs = rng.standard_normal((300, 12)).astype(np.float32)
    queries = rng.standard_normal((3, 12)).astype(np.float32)
    src = write_arrow(tmp_path / "d.arrow", docs)
    extra = {"f32": [], "f16": ["--dtype", "f16"], "keep": ["--dtype", "i8", "--keep-vectors"]}
    assert cli("index", src, "-o", tmp_path / "idx", *extra[layout]).exit_code == 0
    index = open_index(str(tmp_path / "idx"))
    first = index.searcher(40, exact=True).search(queries)
    got, relevance = index_mmr(index, queries, first, 0.5, 8)
    stored = docs.astype(np.float16).astype(np.float32) if layout == "f16" else docs
    for q in range(3):
        candidates = first.rows[q].tolist()
        order, _, rel = reference_mmr("cos", queries[q].tolist(),
                                      [stored[r].tolist() for r in candidates], 0.5, 8)
        assert got.rows[q].tolist() == [candidates[p] for p in order]
        np.testing.assert_allclose(relevance[q], rel, atol=2e-3)
    with pytest.raises(ParameterError):
        index_mmr(index, queries, first, 0.5, 8, encoded=True)


@pytest.mark.slow
def test_search_cli_mmr_equals_the_reference(cli, clustered):
    """`search --mmr 0.5 --mmr-depth 20 -k 5` on the flat index: the reference MMR over the
    brute-force top 20 of each query; `similarity` is the cosine; refusals are one line."""
    vectors, queries = clustered["vectors"], clustered["queries"][:5]
    qfile = write_queries(clustered["folder"] / "q5.jsonl", queries)
    r = cli("search", clustered["folder"] / "flat", qfile, "--mmr", 0.5, "--mmr-depth", 20,
            "-k", 5, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    scores = cosine(queries, vectors)
    for number, query in enumerate(queries):
        top = np.argsort(-scores[number], kind="stable")[:20]
        picked, mmr_scores, relevance = reference_mmr(
            "cos", query.tolist(), [vectors[row].tolist() for row in top], 0.5, 5)
        hits = [h for h in r.records() if h["query_id"] == f"q{number}"]
        assert [int(h["id"][1:]) for h in hits] == [int(top[p]) for p in picked]
        np.testing.assert_allclose([h["score"] for h in hits], mmr_scores, atol=1e-5)
        np.testing.assert_allclose([h["similarity"] for h in hits], relevance, atol=1e-5)
    for args, message in [(["--mmr", 0.5, "--min-score", 0.1, "--max-hits", 5], "--mmr"),
                          (["--mmr", 1.5], "--mmr")]:
        r = cli("search", clustered["folder"] / "flat", qfile, *args)
        assert r.exit_code == 2 and message in r.stderr, r
    r = cli("search", clustered["src"], qfile, "--mmr", 0.5)
    assert r.exit_code == 2 and "stored vectors" in r.stderr


def test_mmr_depth_needs_mmr_and_k_with_max_hits_is_refused(cli, clustered):
    result = cli("search", clustered["folder"] / "flat", clustered["qfile"], "--mmr-depth", 5)
    assert result.exit_code == 2 and "--mmr-depth needs --mmr" in result.stderr
    both = cli("search", clustered["folder"] / "flat", clustered["qfile"], "--min-score", 0.5,
               "--max-hits", 10, "-k", 3)
    assert both.exit_code == 2 and "give -k or --max-hits, not both" in both.stderr
