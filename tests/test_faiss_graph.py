"""index --library faiss: faiss's HNSW behind the same index folder and manifest, checked
against faiss itself (the same graph, the same hits), numpy's exact scores, and the usearch
graph (the same exact results); appending, replacing, deleting, merging and linking keep
it; what it cannot hold is refused with one line."""
import json

import numpy as np
import pytest

from tests.test_index import write_vectors
from vecpipe.core.index_open import open_index

faiss = pytest.importorskip("faiss", reason="faiss-cpu (the faiss extra) is not installed")

DIM, COUNT, K = 24, 3000, 10


def unit_rows(n, seed=0, dim=DIM):
    """Clustered unit vectors (like text embeddings, unlike uniform noise, a graph can
    search them well)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim)).astype(np.float32)
    rows = centres[rng.integers(0, 30, n)] + 0.6 * rng.standard_normal((n, dim))
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def docs_of(n, start=0, prefix="d"):
    return {"id": [f"{prefix}{i}" for i in range(start, start + n)], "text": [""] * n,
            "group": [0] * n}


def arrow(tmp_path, name, vectors, start=0, normalized="true"):
    return write_vectors(tmp_path / f"{name}.arrow", docs_of(len(vectors), start), {
        "model": "fake:24", "dim": str(DIM), "normalized": normalized}, vectors)


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def search(path, queries, k=K, **options):
    return open_index(str(path)).searcher(k, **options).search(queries)


def exact_rows(vectors, queries, k=K):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.fixture
def vectors():
    return unit_rows(COUNT)


@pytest.fixture
def queries():
    return unit_rows(50, seed=1)


def test_the_graph_is_faiss_own_and_answers_as_faiss_does(cli, tmp_path, vectors, queries):
    """One thread, the same M/efConstruction/efSearch: vecpipe's faiss index and a bare
    faiss.IndexHNSWFlat built on the same vectors return the same rows, and the scores are
    numpy's cosines."""
    source = arrow(tmp_path, "docs", vectors)
    r = cli("index", source, "-o", tmp_path / "idx", "--library", "faiss", "--threads", "1",
            "--connectivity", "12", "--expansion-add", "80", "--expansion-search", "40")
    assert r.exit_code == 0, r.stderr
    assert "faiss" in r.stderr
    m = manifest(tmp_path / "idx")
    assert m["hnsw"] == {"library": "faiss", "connectivity": 12, "expansion_add": 80,
                         "expansion_search": 40}
    assert (m["metric"], m["score_metric"]) == ("ip", "cos")
    assert set(m["files"]) == {"vectors.faiss", "rows.parquet"}
    reference = faiss.IndexHNSWFlat(DIM, 12, faiss.METRIC_INNER_PRODUCT)
    reference.hnsw.efConstruction = 80
    faiss.omp_set_num_threads(1)
    reference.add(vectors)
    reference.hnsw.efSearch = 40
    _, expected = reference.search(queries, K)
    hits = search(tmp_path / "idx", queries, ef=40, threads=1)
    np.testing.assert_array_equal(hits.rows, expected)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(queries @ vectors.T, hits.rows, 1),
                               atol=1e-5)


def test_exact_results_equal_a_usearch_graph_and_numpy(cli, tmp_path, vectors, queries):
    source = arrow(tmp_path, "docs", vectors)
    for library in ("faiss", "usearch"):
        assert cli("index", source, "-o", tmp_path / library, "--library", library).exit_code == 0
    truth = exact_rows(vectors, queries)
    faiss_hits = search(tmp_path / "faiss", queries, exact=True)
    usearch_hits = search(tmp_path / "usearch", queries, exact=True)
    np.testing.assert_array_equal(faiss_hits.rows, truth)
    np.testing.assert_array_equal(usearch_hits.rows, truth)
    np.testing.assert_allclose(faiss_hits.scores, usearch_hits.scores, atol=1e-5)
    # the graph, searched deep enough, finds the exact top k too
    assert recall(search(tmp_path / "faiss", queries, ef=400).rows, truth) == 1.0
    assert recall(search(tmp_path / "faiss", queries, ef=64).rows, truth) >= 0.95


def test_search_command_reads_a_faiss_index(cli, tmp_path, vectors, queries):
    source = arrow(tmp_path, "docs", vectors)
    assert cli("index", source, "-o", tmp_path / "idx", "--library", "faiss").exit_code == 0
    query_file = arrow(tmp_path, "queries", queries, start=0)
    r = cli("search", tmp_path / "idx", query_file, "-k", "3", "--exact", "--output-format", "jsonl")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["id"] for row in rows[:3]] == [f"d{i}" for i in exact_rows(vectors, queries)[0, :3]]
    info = cli("info", tmp_path / "idx")
    assert info.exit_code == 0
    assert json.loads(info.stdout)["manifest"]["hnsw"]["library"] == "faiss"
    assert cli("info", "--verify", tmp_path / "idx").exit_code == 0


def test_vectors_that_are_not_unit_length_are_scaled_for_cosine(cli, tmp_path, vectors, queries):
    lengths = np.random.default_rng(3).uniform(0.5, 4.0, (COUNT, 1)).astype(np.float32)
    source = arrow(tmp_path, "docs", vectors * lengths, normalized="false")
    assert cli("index", source, "-o", tmp_path / "idx", "--library", "faiss").exit_code == 0
    assert manifest(tmp_path / "idx")["metric"] == "ip"
    hits = search(tmp_path / "idx", queries * 7.0, exact=True)
    np.testing.assert_array_equal(hits.rows, exact_rows(vectors, queries))
    np.testing.assert_allclose(hits.scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :K],
                               atol=1e-5)


@pytest.mark.parametrize("metric,dtype", [("l2sq", "f32"), ("ip", "f16"), ("cos", "f16")])
def test_l2sq_and_float16(cli, tmp_path, vectors, queries, metric, dtype):
    raw = vectors * np.random.default_rng(4).uniform(0.5, 2.0, (COUNT, 1)).astype(np.float32)
    source = arrow(tmp_path, "docs", raw, normalized="false")
    r = cli("index", source, "-o", tmp_path / "idx", "--library", "faiss", "--metric", metric,
            "--dtype", dtype)
    assert r.exit_code == 0, r.stderr
    assert manifest(tmp_path / "idx")["dtype"] == dtype
    stored = raw.astype(np.float16).astype(np.float32) if dtype == "f16" else raw
    if metric == "cos":
        stored = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        stored = stored.astype(np.float16).astype(np.float32)
        truth = queries @ stored.T
    elif metric == "ip":
        truth = queries @ stored.T
    else:
        truth = -((queries ** 2).sum(1)[:, None] - 2 * queries @ stored.T + (stored ** 2).sum(1))
    hits = search(tmp_path / "idx", queries, exact=True)
    np.testing.assert_allclose(hits.scores, np.sort(truth, axis=1)[:, ::-1][:, :K], atol=1e-4)
    assert recall(hits.rows, np.argsort(-truth, axis=1, kind="stable")[:, :K]) >= 0.99
    assert recall(search(tmp_path / "idx", queries, ef=200).rows, hits.rows) >= 0.97


def test_append_replace_and_delete(cli, tmp_path, vectors, queries):
    idx = tmp_path / "idx"
    assert cli("index", arrow(tmp_path, "a", vectors[:2000]), "-o", idx,
               "--library", "faiss").exit_code == 0
    r = cli("index", arrow(tmp_path, "b", vectors[2000:], start=2000), "-o", idx, "--append")
    assert r.exit_code == 0, r.stderr
    assert open_index(str(idx)).count == COUNT and manifest(idx)["hnsw"]["library"] == "faiss"
    assert recall(search(idx, queries, ef=200).rows, exact_rows(vectors, queries)) >= 0.98
    # d5 replaced by another vector: the rebuilt graph finds it at its new place
    moved = unit_rows(1, seed=9)
    replacement = write_vectors(tmp_path / "r.arrow", docs_of(1, start=5), {
        "model": "fake:24", "dim": str(DIM), "normalized": "true"}, moved)
    r = cli("index", replacement, "-o", idx, "--append", "--on-duplicate", "last")
    assert r.exit_code == 0 and "1 replaced" in r.stderr, r.stderr
    index = open_index(str(idx))
    hits = index.searcher(1, ef=64).search(moved)
    assert index.ids()[int(hits.rows[0, 0])].as_py() == "d5"
    assert hits.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    gone = tmp_path / "gone.txt"
    gone.write_text("".join(f"d{i}\n" for i in range(0, COUNT, 3)))
    r = cli("index", "--delete", gone, "-o", idx)
    assert r.exit_code == 0, r.stderr
    index = open_index(str(idx))
    assert index.count == COUNT - len(range(0, COUNT, 3))
    kept = [i for i in range(COUNT) if i % 3]
    updated = vectors.copy()
    updated[5] = moved[0]
    truth = exact_rows(updated[kept], queries)
    assert recall(index.searcher(K, ef=200).search(queries).rows, truth) >= 0.98
    np.testing.assert_array_equal(index.searcher(K, exact=True).search(queries).rows, truth)
    assert index.ids().to_pylist() == [f"d{i}" for i in kept]


def test_merge_and_link_keep_the_library(cli, tmp_path, vectors, queries):
    parts = []
    for number, (start, stop) in enumerate(((0, 1500), (1500, COUNT))):
        parts.append(tmp_path / f"part{number}")
        assert cli("index", arrow(tmp_path, f"p{number}", vectors[start:stop], start=start),
                   "-o", parts[-1], "--library", "faiss").exit_code == 0
    truth = exact_rows(vectors, queries)
    assert cli("merge", "--index", *parts, "-o", tmp_path / "merged").exit_code == 0
    assert manifest(tmp_path / "merged")["hnsw"]["library"] == "faiss"
    assert cli("merge", "--index", "--link", *parts, "-o", tmp_path / "linked").exit_code == 0
    for name in ("merged", "linked"):
        index = open_index(str(tmp_path / name))
        hits = index.searcher(K, exact=True).search(queries)
        ids = index.ids().to_pylist()
        assert [[ids[r] for r in row] for row in hits.rows] == \
            [[f"d{r}" for r in row] for row in truth]


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "i8"], "f32 or f16"),
    (["--dtype", "b1"], "f32 or f16"),
    (["--flat"], "flat"),
    (["--library", "annoy"], "unknown library"),
])
def test_what_faiss_cannot_hold_is_a_usage_error(cli, tmp_path, vectors, args, needle):
    source = arrow(tmp_path, "docs", vectors)
    library = [] if "--library" in args else ["--library", "faiss"]
    r = cli("index", source, "-o", tmp_path / "idx", *library, *args)
    assert r.exit_code == 2, r.stderr
    assert "--library" in r.stderr and needle in r.stderr
    assert not (tmp_path / "idx").exists()


def test_append_with_another_library_is_refused(cli, tmp_path, vectors):
    idx = tmp_path / "idx"
    assert cli("index", arrow(tmp_path, "a", vectors[:100]), "-o", idx).exit_code == 0
    r = cli("index", arrow(tmp_path, "b", vectors[100:200], start=100), "-o", idx, "--append",
            "--library", "faiss")
    assert r.exit_code == 2 and "--library faiss differs from the index's usearch" in r.stderr


def test_without_faiss_installed_the_error_says_how_to_get_it(cli, tmp_path, vectors,
                                                              monkeypatch):
    source = arrow(tmp_path, "docs", vectors[:100])
    assert cli("index", source, "-o", tmp_path / "idx", "--library", "faiss").exit_code == 0
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    for args in (["index", source, "-o", tmp_path / "new", "--library", "faiss"],
                 ["search", tmp_path / "idx", source, "-k", "1", "--ef", "10"]):
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert "faiss-cpu" in r.stderr and "vecpipe[faiss]" in r.stderr
    assert not (tmp_path / "new").exists()


def test_a_graph_file_of_another_kind_is_a_damaged_index(tmp_path, vectors):
    """The manifest's checksum guards the file (info --verify); opened unverified, a graph of
    another metric or kind is still refused in one line, not used."""
    from vecpipe.core.faiss_graph import FaissGraph
    from vecpipe.formats.errors import DataError

    for name, other in (("ip.faiss", faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)),
                        ("flat.faiss", faiss.IndexFlatL2(DIM))):
        other.add(vectors[:200])
        faiss.write_index(other, str(tmp_path / name))
        with pytest.raises(DataError, match="damaged"):
            FaissGraph.restore(str(tmp_path / name), "f32", "l2sq")
    assert FaissGraph.restore(str(tmp_path / "ip.faiss"), "f32", "ip").size == 200
