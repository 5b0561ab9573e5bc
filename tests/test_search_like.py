"""vecpipe search --like/--unlike ("more like this"): the query is built from the index's stored
vectors and checked against numpy brute force over the vectors that went into the index, for
graph, flat, linked and quantized (i8, b1, PCA codec) indexes; the records named are left out
with k hits still returned; no model is loaded; errors and usage errors."""
import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.index_open import open_index

N, DIM, K = 400, 16, 10
# the recorded model cannot be loaded: a search that embeds text fails, one that does not works
UNLOADABLE = "fake:unloadable"


def write_arrow(path, ids, vectors, meta, **columns):
    table = pa.table({"id": ids, **columns, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)),
        vectors.shape[1])})
    table = table.replace_schema_metadata({f"vecpipe.{k}": str(v) for k, v in meta.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def reference(vectors, like, unlike=(), metric="cos"):
    """The documented query: unit vectors under cos, 2*mean(like) - mean(unlike) (mean(like)
    alone without unlike), unit length for cos and ip."""
    v = vectors.astype(np.float64)
    if metric == "cos":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    query = v[list(like)].mean(0)
    if unlike:
        query = 2 * query - v[list(unlike)].mean(0)
    if metric in ("cos", "ip"):
        query = query / np.linalg.norm(query)
    return query


def brute_force(query, vectors, metric="cos", excluded=(), mask=None, k=K):
    """(rows, scores) of the top k, `excluded` rows left out, ties to the lower row."""
    d = vectors.astype(np.float64)
    if metric == "cos":
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
    scores = -((d - query) ** 2).sum(1) if metric == "l2sq" else d @ query
    allowed = np.ones(len(d), bool) if mask is None else mask.copy()
    allowed[list(excluded)] = False
    scores = np.where(allowed, scores, -np.inf)
    order = np.lexsort((np.arange(len(d)), -scores))[:min(k, int(allowed.sum()))]
    return order, scores[order]


def got(result):
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert [r["rank"] for r in records] == list(range(1, len(records) + 1))
    return [int(r["id"][1:]) for r in records], np.array([r["score"] for r in records]), records


def like_args(like, unlike=()):
    return [arg for row in like for arg in ("--like", f"d{row}")] + \
        [arg for row in unlike for arg in ("--unlike", f"d{row}")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Gaussian vectors of varied length (so the per-record unit scaling matters), a group field,
    written with an unloadable model recorded."""
    folder = tmp_path_factory.mktemp("like")
    rng = np.random.default_rng(11)
    vectors = (rng.standard_normal((N, DIM)) * rng.uniform(0.5, 2, (N, 1))).astype(np.float32)
    ids = [f"d{i}" for i in range(N)]
    groups = [i % 4 for i in range(N)]
    src = write_arrow(folder / "docs.arrow", ids, vectors, {"model": UNLOADABLE, "dim": DIM},
                      group=groups)
    return {"folder": folder, "src": src, "vectors": vectors, "group": np.array(groups)}


def build(cli, corpus, name, *args, src=None):
    idx = corpus["folder"] / name
    if not idx.exists():
        r = cli("index", src or corpus["src"], "-o", idx, "--fields", "group", *args)
        assert r.exit_code == 0, r.stderr
    return idx


@pytest.mark.parametrize("like,unlike", [([5], []), ([5, 77, 301], []), ([5, 77], [200]),
                                         ([9], [10, 11])])
def test_exact_hits_equal_brute_force_and_leave_the_records_out(cli, corpus, like, unlike):
    idx = build(cli, corpus, "hnsw")
    rows, scores, records = got(cli("search", idx, *like_args(like, unlike), "--exact"))
    truth, truth_scores = brute_force(reference(corpus["vectors"], like, unlike),
                                      corpus["vectors"], excluded=like + unlike)
    assert len(rows) == K and not set(rows) & set(like + unlike)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    expected_id = "like:" + ",".join(f"d{r}" for r in like) + \
        (";unlike:" + ",".join(f"d{r}" for r in unlike) if unlike else "")
    assert {r["query_id"] for r in records} == {expected_id}


def test_graph_search_finds_the_brute_force_neighbours(cli, corpus):
    idx = build(cli, corpus, "hnsw")
    rows, _, _ = got(cli("search", idx, "--like", "d3", "--like", "d4", "-k", 20))
    truth, _ = brute_force(reference(corpus["vectors"], [3, 4]), corpus["vectors"],
                           excluded=[3, 4], k=20)
    assert len(rows) == 20 and not {3, 4} & set(rows)
    assert len(set(rows) & set(truth)) >= 18


@pytest.mark.parametrize("metric", ["cos", "ip", "l2sq"])
def test_every_metric_on_a_flat_index(cli, corpus, metric):
    idx = build(cli, corpus, f"flat-{metric}", "--flat", "--metric", metric)
    like, unlike = [12, 13], [14]
    rows, scores, _ = got(cli("search", idx, *like_args(like, unlike), "-k", 7))
    truth, truth_scores = brute_force(reference(corpus["vectors"], like, unlike, metric),
                                      corpus["vectors"], metric, excluded=like + unlike, k=7)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, rtol=1e-4, atol=1e-4)


def test_filter_min_score_and_fields_combine(cli, corpus):
    idx = build(cli, corpus, "hnsw")
    query = reference(corpus["vectors"], [6])  # group 2
    mask = corpus["group"] == 2
    rows, scores, records = got(cli("search", idx, "--like", "d6", "--filter", "group == 2",
                                    "--fields", "group"))
    truth, truth_scores = brute_force(query, corpus["vectors"], excluded=[6], mask=mask)
    assert rows == list(truth) and {r["group"] for r in records} == {2}
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    threshold = float(truth_scores[4])
    rows, scores, _ = got(cli("search", idx, "--like", "d6", "--filter", "group == 2",
                              "--min-score", threshold - 1e-4))
    assert rows == list(truth[:5])


def test_linked_index_of_two_shards(cli, corpus, tmp_path):
    vectors, half = corpus["vectors"], N // 2
    ids = [f"d{i}" for i in range(N)]
    parts = []
    for number, rows in enumerate((slice(0, half), slice(half, N))):
        src = write_arrow(tmp_path / f"part{number}.arrow", ids[rows], vectors[rows],
                          {"model": UNLOADABLE, "dim": DIM})
        assert cli("index", src, "-o", tmp_path / f"idx{number}", "--flat").exit_code == 0
        parts.append(tmp_path / f"idx{number}")
    r = cli("merge", "--index", "--link", *parts, "-o", tmp_path / "linked")
    assert r.exit_code == 0, r.stderr
    like, unlike = [3, half + 7], [half + 40]  # from both shards
    rows, scores, _ = got(cli("search", tmp_path / "linked", *like_args(like, unlike)))
    truth, truth_scores = brute_force(reference(vectors, like, unlike), vectors,
                                      excluded=like + unlike)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)


def test_linked_index_takes_the_visible_copy_of_a_duplicate_id(cli, corpus, tmp_path):
    """d0 is in both shards; with --on-duplicate last the second copy (another vector) is the
    record, so --like d0 searches with that vector and leaves out only that row."""
    vectors = corpus["vectors"]
    first = write_arrow(tmp_path / "a.arrow", [f"d{i}" for i in range(100)], vectors[:100],
                        {"model": UNLOADABLE, "dim": DIM})
    second_ids = ["d0"] + [f"d{i}" for i in range(100, 200)]
    second = write_arrow(tmp_path / "b.arrow", second_ids, vectors[[250, *range(100, 200)]],
                         {"model": UNLOADABLE, "dim": DIM})
    for src, name in ((first, "a"), (second, "b")):
        assert cli("index", src, "-o", tmp_path / name, "--flat").exit_code == 0
    r = cli("merge", "--index", "--link", tmp_path / "a", tmp_path / "b", "--on-duplicate",
            "last", "-o", tmp_path / "linked")
    assert r.exit_code == 0, r.stderr
    visible = np.vstack([vectors[250], vectors[1:200]])  # d0 = vectors[250], then d1..d199
    _, _, records = got(cli("search", tmp_path / "linked", "--like", "d0", "-k", 5))
    truth, truth_scores = brute_force(reference(visible, [0]), visible, excluded=[0], k=5)
    assert [r["id"] for r in records] == [f"d{row}" for row in truth]
    np.testing.assert_allclose([r["score"] for r in records], truth_scores, atol=1e-5)


def test_int8_index_decodes_its_codes(cli, corpus):
    """No kept vectors: the records' vectors are the decoded codes, and i8 scores are the float
    query against the decoded codes; a rescore multiple covering the index makes it exact."""
    idx = build(cli, corpus, "i8", "--dtype", "i8")
    codec = open_index(str(idx)).codec
    decoded = codec.decode(codec.encode(corpus["vectors"]))
    like, unlike = [20, 21], [22]
    rows, scores, _ = got(cli("search", idx, *like_args(like, unlike), "--rescore", N))
    truth, truth_scores = brute_force(reference(decoded, like, unlike), decoded,
                                      excluded=like + unlike)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-4)


def test_binary_index_uses_the_kept_full_vectors(cli, corpus):
    idx = build(cli, corpus, "b1-full", "--dtype", "b1", "--keep-vectors")
    like = [30, 31]
    rows, scores, _ = got(cli("search", idx, *like_args(like), "--rescore", N))
    truth, truth_scores = brute_force(reference(corpus["vectors"], like), corpus["vectors"],
                                      excluded=like)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)


def test_binary_index_without_full_vectors_decodes_the_bits(cli, corpus):
    idx = build(cli, corpus, "b1", "--dtype", "b1")
    codec = open_index(str(idx)).codec
    decoded = codec.decode(codec.encode(corpus["vectors"]))
    rows, scores, _ = got(cli("search", idx, "--like", "d40", "--rescore", N))
    truth, truth_scores = brute_force(reference(decoded, [40]), decoded, excluded=[40])
    assert set(rows) == set(truth)  # the decoded bits tie often: compare the scores in order
    np.testing.assert_allclose(scores, truth_scores, atol=1e-4)
    # without rescoring the ranking is by hamming distance to the query's bits
    bits = codec.encode(corpus["vectors"])
    query_bits = np.packbits(reference(decoded, [40]) > 0)
    distances = np.unpackbits(bits ^ query_bits, axis=1).sum(1)
    distances[40] = DIM + 1
    _, scores, _ = got(cli("search", idx, "--like", "d40", "--exact"))
    np.testing.assert_allclose(scores, 1 - np.sort(distances)[:K] / DIM)


def test_pca_compressed_index_lifts_the_decoded_vectors_back(cli, corpus, tmp_path):
    """A stream compressed with PCA to 8 dimensions and int8: the liked vectors live in the
    reduced space; the query made of them scores like brute force there."""
    codes = tmp_path / "codes.arrow"
    r = cli("compress", corpus["src"], "--pca", 8, "--dtype", "int8", "-o", codes)
    assert r.exit_code == 0, r.stderr
    idx = build(cli, corpus, "pca", src=codes)
    codec = open_index(str(idx)).codec
    assert codec.out_dim == 8 and codec.input_dim == DIM
    decoded = codec.decode(codec.encode(corpus["vectors"]))
    like, unlike = [50, 51, 52], [53]
    rows, scores, _ = got(cli("search", idx, *like_args(like, unlike), "--rescore", N))
    truth, truth_scores = brute_force(reference(decoded, like, unlike), decoded,
                                      excluded=like + unlike)
    assert rows == list(truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-4)


def test_no_model_is_loaded(cli, corpus, monkeypatch):
    idx = build(cli, corpus, "hnsw")
    r = cli("search", idx, "--query", "anything")  # the recorded model would fail to load
    assert r.exit_code == 2 and UNLOADABLE in r.stderr

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("vecpipe.cli.models.load_model", refuse)
    rows, _, _ = got(cli("search", idx, "--like", "d1"))
    assert len(rows) == K


def test_table_on_a_terminal_has_a_like_heading(cli, corpus):
    idx = build(cli, corpus, "hnsw")
    r = cli("search", idx, "--like", "d1", "--like", "d2", "--unlike", "d3", "-k", 3,
            "--output-format", "table")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "like: d1, d2; unlike: d3"
    assert sum(line.strip().startswith(("1 ", "2 ", "3 ")) for line in lines) == 3


def test_k_hits_remain_when_every_row_but_k_is_named(cli, corpus, tmp_path):
    vectors = corpus["vectors"][:15]
    src = write_arrow(tmp_path / "small.arrow", [f"d{i}" for i in range(15)], vectors, {})
    assert cli("index", src, "-o", tmp_path / "small").exit_code == 0
    like = list(range(5))
    rows, _, _ = got(cli("search", tmp_path / "small", *like_args(like), "-k", 10))
    assert sorted(rows) == list(range(5, 15))
    rows, _, _ = got(cli("search", tmp_path / "small", *like_args(like), "-k", 50))
    assert len(rows) == 10  # fewer exist


def test_unknown_id_names_the_id_and_the_index(cli, corpus):
    idx = build(cli, corpus, "hnsw")
    r = cli("search", idx, "--like", "d1", "--unlike", "nope")
    assert r.exit_code == 1 and r.stdout == ""
    assert "'nope'" in r.stderr and str(idx) in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,words", [
    (["--query", "text"], "not both"),
    (["QUERIES"], "not both"),
    (["-m", "fake:16"], "-m/--model"),
    (["--prompt", "query: "], "--prompt"),
    (["--text-field", "title"], "--text-field"),
    (["--unlike", "d1"], "both --like and --unlike"),
])
def test_like_usage_errors(cli, corpus, args, words):
    idx = build(cli, corpus, "hnsw")
    args = [str(corpus["src"]) if arg == "QUERIES" else arg for arg in args]
    r = cli("search", idx, "--like", "d1", *args)
    assert r.exit_code == 2 and r.stdout == "" and words in r.stderr, r.stderr


def test_unlike_needs_like_and_like_needs_an_index_folder(cli, corpus):
    idx = build(cli, corpus, "hnsw")
    r = cli("search", idx, "--unlike", "d1")
    assert r.exit_code == 2 and "--unlike needs --like" in r.stderr
    r = cli("search", corpus["src"], "--like", "d1")
    assert r.exit_code == 2 and "index folder" in r.stderr


def test_bad_filter_and_fields_are_reported_before_the_model_loads(cli, corpus):
    """-m names a model that fails to load: the filter and field errors come first."""
    idx = build(cli, corpus, "hnsw")
    r = cli("search", idx, "--query", "x", "-m", "fake:bad", "--filter", "group ==")
    assert r.exit_code == 2 and "position" in r.stderr and "fake" not in r.stderr
    r = cli("search", idx, "--query", "x", "-m", "fake:bad", "--filter", "colour == 1")
    assert r.exit_code == 1 and "colour" in r.stderr and "fake" not in r.stderr
    r = cli("search", idx, "--query", "x", "-m", "fake:bad", "--fields", "colour")
    assert r.exit_code == 1 and "colour" in r.stderr and "fake" not in r.stderr
    r = cli("search", idx, "--query", "x", "-m", "fake:bad", "--filter", "group == 1")
    assert r.exit_code == 2 and "fake:bad" in r.stderr  # the model was next


@pytest.mark.slow
def test_a_like_search_imports_no_model_library(cli, corpus):
    import subprocess
    import sys

    idx = build(cli, corpus, "hnsw")
    script = ("import sys\nfrom vecpipe.cli import main\n"
              f"sys.argv = ['vecpipe', 'search', {str(idx)!r}, '--like', 'd1', '-q']\n"
              "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code\n"
              "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.count(b'"query_id":"like:d1"') == K
