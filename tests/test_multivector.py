"""Multi-vector retrieval end to end: embed --multi-vector, compress --fde, index keeping the
token vectors, search --rescore by exact Chamfer; against numpy brute force and core.fde."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.fde import Fde, FdeConfig, chamfer_scores, pack_sets
from vecpipe.formats import schema as names

WORDS = ("apple banana cherry grape lemon mango olive peach pear plum quince rice sage "
         "thyme tomato vanilla walnut yam zucchini basil").split()


def documents(count=30, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))}
            for i in range(count)]


def query_records(seed=1):
    rng = np.random.default_rng(seed)
    return [{"id": f"q{i}", "text": " ".join(rng.choice(WORDS, size=3))} for i in range(8)]


def read_table(path):
    data = open(path, "rb").read()
    if data.startswith(b"ARROW1"):
        return pa.ipc.open_file(pa.py_buffer(data)).read_all()
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def token_matrix(table, row):
    return np.array(table.column("token_vectors")[row].as_py(), dtype=np.float32)


@pytest.fixture
def multi(cli, tmp_path, write_jsonl):
    """docs.arrow and queries.arrow embedded with --multi-vector (fake:16)."""
    write_jsonl(tmp_path / "docs.jsonl", documents())
    write_jsonl(tmp_path / "queries.jsonl", query_records())
    for name in ("docs", "queries"):
        result = cli("embed", tmp_path / f"{name}.jsonl", "-m", "fake:16", "--multi-vector",
                     "-o", tmp_path / f"{name}.arrow")
        assert result.exit_code == 0, result.stderr
    return tmp_path


def test_embed_multi_vector_writes_unit_token_vectors_per_token(multi):
    table = read_table(multi / "docs.arrow")
    assert table.schema.field("token_vectors").type == pa.list_(pa.list_(pa.float32(), 16))
    assert table.schema.field("token_count").type == pa.int32()
    meta = names.read_meta(table.schema)
    assert json.loads(meta["multi_vector"])["dim"] == 16
    for row, doc in enumerate(documents()):
        tokens = token_matrix(table, row)
        assert len(tokens) == len(doc["text"].split()) == table.column("token_count")[row].as_py()
        np.testing.assert_allclose(np.linalg.norm(tokens, axis=1), 1, rtol=1e-5)
    # the same word is the same vector wherever it appears (deterministic fake tokens)
    first = documents()[0]["text"].split()
    again = read_table(multi / "docs.arrow")
    assert np.array_equal(token_matrix(again, 0), token_matrix(table, 0))
    assert len(set(map(tuple, token_matrix(table, 0).round(5).tolist()))) == len(set(first))


def test_embed_again_without_multi_vector_drops_the_stale_tokens(cli, multi):
    result = cli("embed", multi / "docs.arrow", "-m", "fake:8", "-o", multi / "again.arrow")
    assert result.exit_code == 0, result.stderr
    table = read_table(multi / "again.arrow")
    assert "token_vectors" not in table.schema.names
    assert "multi_vector" not in names.read_meta(table.schema)


def test_info_shows_the_multi_vector_metadata(cli, multi):
    result = cli("info", multi / "docs.arrow", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert "multi_vector" in json.loads(result.stdout)["metadata"]


@pytest.mark.parametrize("args,words", [
    (("--device", "cpu,cpu"), "one device"),
    (("--backend", "onnx"), "--backend torch"),
    (("--layers", "2"), "--layers"),
    (("--engine", "ray"), "--engine ray")])
def test_embed_multi_vector_refuses_what_it_cannot_combine_with(cli, tmp_path, write_jsonl,
                                                                args, words):
    write_jsonl(tmp_path / "d.jsonl", documents(3))
    result = cli("embed", tmp_path / "d.jsonl", "-m", "fake:8", "--multi-vector", *args)
    assert result.exit_code == 2, result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_compress_fde_encodes_each_token_set_as_core_fde_does(cli, multi):
    result = cli("compress", multi / "docs.arrow", "--fde", "--fde-reps", "3",
                 "--fde-simhash", "2", "--fde-proj-dim", "4", "--fde-dim", "40",
                 "--fde-seed", "9", "-o", multi / "fde.arrow")
    assert result.exit_code == 0, result.stderr
    source, table = read_table(multi / "docs.arrow"), read_table(multi / "fde.arrow")
    meta = names.read_meta(table.schema)
    config = FdeConfig.from_json(meta["fde"])
    assert config == FdeConfig(token_dim=16, reps=3, simhash=2, proj_dim=4, final_dim=40,
                               seed=9)
    assert meta["fde_side"] == "document" and meta["dim"] == "40"
    assert meta["normalized"] == "false"
    sets = [token_matrix(source, row) for row in range(source.num_rows)]
    want = Fde(config).encode(*pack_sets(sets), "document")
    got = names.vectors_to_numpy(table.column("embedding"))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert table.column("token_vectors").equals(source.column("token_vectors"))


def test_compress_fde_query_side_sums(cli, multi):
    result = cli("compress", multi / "queries.arrow", "--fde", "--fde-reps", "2",
                 "--fde-simhash", "3", "--fde-side", "query", "-o", multi / "qfde.arrow")
    assert result.exit_code == 0, result.stderr
    source, table = read_table(multi / "queries.arrow"), read_table(multi / "qfde.arrow")
    config = FdeConfig.from_json(names.read_meta(table.schema)["fde"])
    sets = [token_matrix(source, row) for row in range(source.num_rows)]
    np.testing.assert_allclose(names.vectors_to_numpy(table.column("embedding")),
                               Fde(config).encode(*pack_sets(sets), "query"), rtol=1e-6)


def test_compress_fde_without_token_vectors_names_the_file(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "embedding": [0.1, 0.2]}])
    result = cli("compress", path, "--fde")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[0]
    assert "token_vectors" in line and "plain.jsonl" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,words", [
    (("--fde", "--dtype", "int8"), "--dtype"),
    (("--fde-reps", "4"), "--fde-reps configures --fde"),
    (("--fde", "--fde-side", "both"), "--fde-side"),
    (("--fde", "--fde-simhash", "17"), "--fde-simhash")])
def test_compress_fde_usage_errors(cli, multi, args, words):
    result = cli("compress", multi / "docs.arrow", *args)
    assert result.exit_code == 2, result.stderr
    assert words in result.stderr


def _round_trip(cli, multi, *index_args):
    result = cli("compress", multi / "docs.arrow", "--fde", "--fde-reps", "4",
                 "--fde-simhash", "3", "-o", multi / "fde.arrow")
    assert result.exit_code == 0, result.stderr
    result = cli("index", multi / "fde.arrow", "-o", multi / "idx", *index_args)
    assert result.exit_code == 0, result.stderr


def exact_chamfer_top(multi, k):
    docs, queries = read_table(multi / "docs.arrow"), read_table(multi / "queries.arrow")
    tokens, offsets = pack_sets([token_matrix(docs, r) for r in range(docs.num_rows)])
    ids = docs.column("id").to_pylist()
    top = {}
    for row in range(queries.num_rows):
        scores = chamfer_scores(token_matrix(queries, row), tokens, offsets)
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        top[queries.column("id")[row].as_py()] = ([ids[i] for i in order], scores[order])
    return top


def hits_by_query(records):
    out = {}
    for hit in records:
        out.setdefault(hit["query_id"], []).append(hit)
    return out


@pytest.mark.parametrize("flat,rescore", [(False, "6"), (True, "6"), (False, "chamfer:6")])
def test_search_rescore_returns_the_exact_chamfer_top_hits(cli, multi, parse_records, flat,
                                                           rescore):
    _round_trip(cli, multi, *(["--flat"] if flat else []))
    manifest = json.loads((multi / "idx" / "manifest.json").read_text())
    assert manifest["tokens"] == {"dim": 16} and manifest["metric"] == "ip"
    assert {"tokens.npy", "token_offsets.npy"} <= set(manifest["files"])
    # k * rescore covers every document: the rescored top 5 is exact Chamfer's
    result = cli("search", multi / "idx", multi / "queries.arrow", "-k", "5", "--rescore",
                 rescore, "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    got = hits_by_query(parse_records(result.stdout_bytes))
    for query_id, (ids, scores) in exact_chamfer_top(multi, 5).items():
        assert [h["id"] for h in got[query_id]] == ids
        np.testing.assert_allclose([h["score"] for h in got[query_id]], scores, rtol=1e-5)


def test_text_queries_are_embedded_as_token_vectors(cli, multi, parse_records):
    _round_trip(cli, multi)
    from_tokens = cli("search", multi / "idx", multi / "queries.arrow", "-k", "3",
                      "--rescore", "4", "--output-format", "jsonl")
    from_text = cli("search", multi / "idx", multi / "queries.jsonl", "-k", "3",
                    "--rescore", "4", "--output-format", "jsonl")
    assert from_tokens.exit_code == 0 and from_text.exit_code == 0, from_text.stderr
    assert parse_records(from_tokens.stdout_bytes) == parse_records(from_text.stdout_bytes)


def test_search_without_rescore_ranks_by_the_fde_inner_product(cli, multi, parse_records):
    _round_trip(cli, multi, "--flat")
    result = cli("search", multi / "idx", multi / "queries.arrow", "-k", "30",
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    docs_fde = read_table(multi / "fde.arrow")
    config = FdeConfig.from_json(names.read_meta(docs_fde.schema)["fde"])
    queries = read_table(multi / "queries.arrow")
    q = Fde(config).encode(*pack_sets([token_matrix(queries, r)
                                        for r in range(queries.num_rows)]), "query")
    d = names.vectors_to_numpy(docs_fde.column("embedding"))
    got = hits_by_query(parse_records(result.stdout_bytes))
    for row, query_id in enumerate(queries.column("id").to_pylist()):
        np.testing.assert_allclose(sorted((h["score"] for h in got[query_id]), reverse=True),
                                   np.sort(d @ q[row])[::-1], rtol=1e-4, atol=1e-5)


def test_index_refuses_query_side_fdes(cli, multi):
    cli("compress", multi / "docs.arrow", "--fde", "--fde-side", "query", "-o",
        multi / "q.arrow")
    result = cli("index", multi / "q.arrow", "-o", multi / "idx")
    assert result.exit_code == 1 and "query-side" in result.stderr


def test_append_to_a_token_index_is_refused(cli, multi):
    _round_trip(cli, multi)
    result = cli("index", multi / "fde.arrow", "-o", multi / "idx", "--append",
                 "--on-duplicate", "first")
    assert result.exit_code == 2 and "token vectors" in result.stderr


def test_rescore_needs_the_kept_token_vectors(cli, multi):
    cli("compress", multi / "docs.arrow", "--fde", "--fde-reps", "2", "--fde-simhash", "2",
        "-o", multi / "fde.arrow")
    table = read_table(multi / "fde.arrow")
    table = table.drop_columns(["token_vectors"])
    with pa.OSFile(str(multi / "bare.arrow"), "wb") as f, \
            pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    assert cli("index", multi / "bare.arrow", "-o", multi / "idx").exit_code == 0
    result = cli("search", multi / "idx", multi / "queries.arrow", "--rescore", "4")
    assert result.exit_code == 2 and "token vectors" in result.stderr
    plain = cli("search", multi / "idx", multi / "queries.arrow", "--output-format", "jsonl")
    assert plain.exit_code == 0, plain.stderr


def test_queries_without_tokens_or_text_are_refused(cli, multi, write_jsonl):
    _round_trip(cli, multi)
    path = write_jsonl(multi / "vec.jsonl", [{"id": "q", "embedding": [0.0] * 16}])
    result = cli("search", multi / "idx", path)
    assert result.exit_code == 1 and "token_vectors" in result.stderr


def test_fde_parameters_are_part_of_the_vector_space():
    from vecpipe.core.space import SpaceMismatch, check_same_space

    a = {"model": "fake:16", "fde": FdeConfig(token_dim=16, seed=1).to_json()}
    b = {"model": "fake:16", "fde": FdeConfig(token_dim=16, seed=2).to_json()}
    check_same_space(a, dict(a), "a", "b")
    with pytest.raises(SpaceMismatch, match="fde differs"):
        check_same_space(a, b, "a", "b")
    with pytest.raises(SpaceMismatch, match="no FDE"):
        check_same_space(a, {"model": "fake:16"}, "a", "b")


@pytest.mark.slow
def test_real_token_vectors_are_sentence_transformers_token_embeddings(
        cli, tmp_path, write_jsonl, bundled_model):
    texts = ["Late interaction keeps one vector per token.", "Short one.", "Short one.",
             "A third text, longer than the second, in the same batch."]
    write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    result = cli("embed", tmp_path / "d.jsonl", "--multi-vector", "-o", tmp_path / "d.arrow")
    assert result.exit_code == 0, result.stderr
    table = read_table(tmp_path / "d.arrow")
    for row, text in enumerate(texts):
        want = bundled_model.encode([text], output_value="token_embeddings")[0].numpy()
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        got = token_matrix(table, row)
        assert got.shape == want.shape  # [CLS] ... [SEP], no padding
        np.testing.assert_allclose(got, want, atol=1e-5)
    ids = bundled_model.tokenizer(texts[1])["input_ids"]
    assert table.column("token_count")[1].as_py() == len(ids)
    # one forward pass makes both: the pooled vectors are sentence-transformers' own, as a
    # plain embed's are (which runs bert_encoder.TorchBert: equal to float
    # rounding)
    pooled = names.vectors_to_numpy(table.column("embedding"))
    np.testing.assert_allclose(pooled, bundled_model.encode(texts, normalize_embeddings=True),
                               atol=1e-6)
    result = cli("embed", tmp_path / "d.jsonl", "-o", tmp_path / "plain.arrow")
    assert result.exit_code == 0, result.stderr
    plain = read_table(tmp_path / "plain.arrow")
    np.testing.assert_allclose(names.vectors_to_numpy(plain.column("embedding")), pooled,
                               atol=1e-6)


@pytest.mark.slow
def test_real_fde_recall_against_exact_chamfer_rises_with_repetitions(
        cli, tmp_path, write_jsonl, nfcorpus):
    """On 200 NFCorpus documents with the bundled MiniLM's token vectors: the FDE ranking's
    recall@10 of exact Chamfer's top 10 improves with R, and rescoring the top 50 nearly
    recovers it."""
    from vecpipe.cli.models import load_model
    from vecpipe.core.multivector import token_vectors

    corpus = [json.loads(line) for line in open(nfcorpus / "corpus.jsonl")][:200]
    queries = [json.loads(line) for line in open(nfcorpus / "queries.jsonl")][:30]
    model = load_model(None, "cpu")
    d_tokens, d_offsets = pack_sets(token_vectors(model, [d["text"] for d in corpus]))
    q_sets = token_vectors(model, [q["text"] for q in queries])
    truth = [set(np.argsort(-chamfer_scores(q, d_tokens, d_offsets))[:10]) for q in q_sets]
    recalls = []
    for reps in (1, 10):
        fde = Fde(FdeConfig(token_dim=384, reps=reps, simhash=4, proj_dim=32))
        d = fde.encode(d_tokens, d_offsets)
        q = fde.encode(*pack_sets(q_sets), "query")
        found = np.argsort(-(q @ d.T), axis=1)
        recalls.append(np.mean([len(set(f[:10]) & t) / 10 for f, t in zip(found, truth)]))
        rescored = []
        for qs, f in zip(q_sets, found[:, :50]):
            tokens, offsets = pack_sets([d_tokens[d_offsets[c]:d_offsets[c + 1]] for c in f])
            rescored.append(set(f[np.argsort(-chamfer_scores(qs, tokens, offsets))[:10]]))
    assert recalls[1] > recalls[0]
    assert np.mean([len(r & t) / 10 for r, t in zip(rescored, truth)]) >= 0.8


def test_an_fde_stream_is_searched_through_an_index(cli, multi):
    cli("compress", multi / "docs.arrow", "--fde", "--fde-reps", "2", "--fde-simhash", "2",
        "-o", multi / "fde.arrow")
    result = cli("search", multi / "fde.arrow", multi / "queries.arrow")
    assert result.exit_code == 2 and "index" in result.stderr


@pytest.mark.slow
def test_real_text_queries_match_embedded_token_queries(cli, tmp_path, write_jsonl,
                                                        parse_records):
    """search embeds text queries' token vectors with the torch transformer (its default
    backend for text is the torch-free one, which has no token vectors): the same hits and
    Chamfer scores as queries embedded by embed --multi-vector."""
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(
        ["Vitamin D and bone health in older adults.", "Cholesterol feeds breast cancer cells.",
         "Green tea and the risk of stroke.", "Fiber intake lowers colon cancer risk.",
         "Sleep, melatonin and shift work."])]
    write_jsonl(tmp_path / "d.jsonl", docs)
    write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "text": "breast cancer cholesterol"},
                                       {"id": "q2", "text": "tea and stroke"}])
    for name in ("d", "q"):
        assert cli("embed", tmp_path / f"{name}.jsonl", "--multi-vector", "-o",
                   tmp_path / f"{name}.arrow").exit_code == 0
    assert cli("compress", tmp_path / "d.arrow", "--fde", "--fde-reps", "4", "--fde-simhash",
               "2", "--fde-proj-dim", "32", "-o", tmp_path / "f.arrow").exit_code == 0
    assert cli("index", tmp_path / "f.arrow", "-o", tmp_path / "idx").exit_code == 0
    runs = [cli("search", tmp_path / "idx", tmp_path / q, "-k", "3", "--rescore", "2",
                "--output-format", "jsonl") for q in ("q.jsonl", "q.arrow")]
    assert all(r.exit_code == 0 for r in runs), runs[0].stderr
    text_hits, token_hits = (parse_records(r.stdout_bytes) for r in runs)
    assert [h["id"] for h in text_hits] == [h["id"] for h in token_hits]
    np.testing.assert_allclose([h["score"] for h in text_hits],
                               [h["score"] for h in token_hits], rtol=1e-4)
    assert text_hits[0]["id"] == "d1" and text_hits[3]["id"] == "d2"


def test_multi_vector_with_the_cache_and_chunks(cli, tmp_path, write_jsonl):
    write_jsonl(tmp_path / "d.jsonl", documents(6))
    runs = []
    for _ in range(2):  # the second run's pooled vectors come from the cache
        result = cli("embed", tmp_path / "d.jsonl", "-m", "fake:8", "--multi-vector",
                     "--cache", tmp_path / "cache", "-o", tmp_path / "c.arrow")
        assert result.exit_code == 0, result.stderr
        runs.append(read_table(tmp_path / "c.arrow"))
    assert runs[0].equals(runs[1])
    result = cli("embed", tmp_path / "d.jsonl", "-m", "fake:8", "--multi-vector",
                 "--chunk-tokens", "3", "-o", tmp_path / "chunks.arrow")
    assert result.exit_code == 0, result.stderr
    table = read_table(tmp_path / "chunks.arrow")
    for row, text in enumerate(table.column("text").to_pylist()):
        assert table.column("token_count")[row].as_py() == len(text.split()) <= 3


@pytest.mark.parametrize("args,words", [(("--on-duplicate", "last"), "duplicates"),
                                        (("--shard", "0/2"), "--shard")])
def test_index_refuses_what_the_token_store_cannot_do_yet(cli, multi, args, words):
    cli("compress", multi / "docs.arrow", "--fde", "--fde-reps", "2", "--fde-simhash", "2",
        "-o", multi / "fde.arrow")
    result = cli("index", multi / "fde.arrow", "-o", multi / "idx", *args)
    assert result.exit_code == 2 and words in result.stderr, result.stderr


def test_compress_fde_reads_token_vectors_from_jsonl(cli, multi, write_jsonl, parse_records):
    converted = cli("convert", multi / "docs.arrow", "-o", multi / "docs.jsonl")
    assert converted.exit_code == 0, converted.stderr
    for name in ("docs.arrow", "docs.jsonl"):
        result = cli("compress", multi / name, "--fde", "--fde-reps", "2", "--fde-simhash",
                     "2", "-o", multi / f"{name}.fde.arrow")
        assert result.exit_code == 0, result.stderr
    a, b = (read_table(multi / f"{n}.fde.arrow") for n in ("docs.arrow", "docs.jsonl"))
    np.testing.assert_allclose(names.vectors_to_numpy(a.column("embedding")),
                               names.vectors_to_numpy(b.column("embedding")), rtol=1e-6)
    bad = write_jsonl(multi / "bad.jsonl", [{"id": "a", "token_vectors": [[0.1, 0.2]]},
                                            {"id": "b", "token_vectors": [[0.1], [0.3, 0.4]]}])
    result = cli("compress", bad, "--fde")
    assert result.exit_code == 1 and "bad.jsonl:2" in result.stderr, result.stderr


def test_rescore_chamfer_needs_an_index_of_fdes_and_a_multiple_is_an_integer(cli, tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "a", "text": "one two"}\n{"id": "b", "text": "three"}\n')
    assert cli("embed", docs, "-m", "fake:8", "-o", tmp_path / "v.arrow").exit_code == 0
    assert cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx").exit_code == 0
    result = cli("search", tmp_path / "idx", "--query", "one", "-m", "fake:8", "--rescore",
                 "chamfer")
    assert result.exit_code == 2 and "--rescore chamfer: INDEX is not an index of FDEs" in \
        result.stderr, result
    for bad in ("0", "chamfer:x", "chamfers"):
        result = cli("search", tmp_path / "idx", "--query", "one", "-m", "fake:8",
                     "--rescore", bad)
        assert result.exit_code == 2 and "give a multiple of k" in result.stderr, result
