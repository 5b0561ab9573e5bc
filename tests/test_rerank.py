"""search --rerank: a cross-encoder rescoring the first stage's top hits. The reference is
sentence-transformers' own CrossEncoder.predict on the same (query, document) pairs. No
cross-encoder ships offline, so one is built from the bundled encoder's weights with a seeded,
untrained one-score head: the plumbing is under test, not the ranking quality. Core tests use a
stand-in model with CrossEncoder's predict (fast)."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.rerank import (FIRST_SCORE, RERANK_KEY, DocumentFields, Reranker,
                                 document_fields, documents_of)
from vecpipe.core.space import embedded_text
from vecpipe.core.vectors import Hits
from vecpipe.formats.errors import DataError, ParameterError

DOCS = [
    ("d0", "Vitamin D", "Vitamin D deficiency is common in northern countries in winter."),
    ("d1", "Statins", "Statins lower LDL cholesterol and the risk of heart attacks."),
    ("d2", "Sleep", "Too little sleep raises blood pressure and appetite."),
    ("d3", "Coffee", "Coffee drinkers have a lower risk of type 2 diabetes in cohort studies."),
    ("d4", "Salt", "A diet high in salt raises blood pressure in most adults."),
    ("d5", "Fibre", "Dietary fibre feeds gut bacteria and lowers cholesterol."),
    ("d6", "Running", "Regular running improves heart health and mood."),
    ("d7", "Sugar", "Sugary drinks are linked to weight gain and type 2 diabetes."),
    ("d8", "Fish oil", "Omega-3 fatty acids from fish oil lower triglycerides."),
    ("d9", "Green tea", "Green tea contains catechins, antioxidants studied for cancer."),
    ("d10", "Smoking", "Smoking is the leading preventable cause of lung cancer."),
    ("d11", "Iron", "Iron deficiency causes anaemia and tiredness."),
]
QUERIES = ["does coffee prevent diabetes", "what raises blood pressure",
           "how to lower cholesterol", "causes of cancer"]


# ---- core, with a stand-in model -------------------------------------------------------------

class WordOverlap:
    """CrossEncoder's predict for tests: words shared by query and document (ties plenty);
    records every call's batch size and pairs."""

    def __init__(self, labels=1):
        self.calls, self.labels = [], labels
        self.prompts, self.default_prompt_name, self.max_seq_length = {}, None, 512

    def predict(self, pairs, batch_size=32, show_progress_bar=None, convert_to_numpy=True,
                prompt=None):
        self.calls.append((batch_size, list(pairs), prompt))
        scores = np.array([len(set(q.lower().split()) & set(d.lower().split()))
                           for q, d in pairs], dtype=np.float32)
        return np.repeat(scores[:, None], self.labels, 1) if self.labels > 1 else scores


def table():
    return pa.table({"id": [d[0] for d in DOCS], "title": [d[1] for d in DOCS],
                     "text": [d[2] for d in DOCS], "year": list(range(len(DOCS)))})


def first_stage(queries, width, seed=0):
    """Hits over DOCS in a random order with descending first-stage scores; query 1 has only
    three hits (the rest -1)."""
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(len(DOCS))[:width] for _ in queries]).astype(np.int64)
    scores = np.sort(rng.random(rows.shape).astype(np.float32), axis=1)[:, ::-1].copy()
    rows[1, 3:], scores[1, 3:] = -1, -np.inf
    return Hits(rows, scores)


def plain_rerank(queries, hits, texts, depth, score):
    """The reference: per query, the top `depth` live hits sorted by score, ties by rank."""
    out = []
    for q, (rows, firsts) in enumerate(zip(hits.rows, hits.scores)):
        live = [(row, first) for row, first in zip(rows[:depth], firsts[:depth]) if row >= 0]
        scored = [(score(queries[q], texts[row]), rank, row, first)
                  for rank, (row, first) in enumerate(live)]
        out.append([(row, s, first) for s, _, row, first in
                    sorted(scored, key=lambda t: (-t[0], t[1]))])
    return out


@pytest.mark.parametrize("depth", [1, 4, 8, 12])
def test_rerank_orders_the_top_depth_by_the_model_and_keeps_first_scores(depth):
    model = WordOverlap()
    fields = DocumentFields(("title", "text"))
    reranker = Reranker(model, "overlap", depth=depth, batch_size=5, fields=fields)
    hits = first_stage(QUERIES, 10)
    new, first = reranker.rerank(QUERIES, hits, documents_of(table(), fields))
    texts = [f"{title} {text}" for _, title, text in DOCS]
    expected = plain_rerank(QUERIES, hits, texts, depth,
                            lambda q, d: len(set(q.lower().split()) & set(d.lower().split())))
    assert new.rows.shape == (len(QUERIES), min(depth, 10))
    for q, wanted in enumerate(expected):
        live = new.rows[q] >= 0
        assert new.rows[q][live].tolist() == [row for row, _, _ in wanted]
        assert new.scores[q][live].tolist() == [s for _, s, _ in wanted]
        assert first[q][live].tolist() == pytest.approx([f for _, _, f in wanted])
        assert not live[live.sum():].any()  # the missing hits stay at the end
    # one model call for the whole batch, batched by batch_size inside it
    assert len(model.calls) == 1 and model.calls[0][0] == 5
    assert len(model.calls[0][1]) == (new.rows >= 0).sum()


def test_depth_below_k_vector_queries_and_multi_label_models_are_refused():
    reranker = Reranker(WordOverlap(), "overlap", depth=5)
    reranker.check_k(5)
    with pytest.raises(ParameterError, match="5 is below k") as err:
        reranker.check_k(6)
    assert err.value.parameter == "depth"
    fields = DocumentFields(("text",))
    with pytest.raises(ParameterError, match="vector queries cannot be reranked"):
        reranker.rerank([QUERIES[0], None, *QUERIES[2:]], first_stage(QUERIES, 5),
                        documents_of(table(), fields))
    with pytest.raises(DataError, match="gives 3 scores a pair"):
        Reranker(WordOverlap(labels=3), "three", depth=5).rerank(
            QUERIES, first_stage(QUERIES, 5), documents_of(table(), fields))
    with pytest.raises(ParameterError):
        Reranker(WordOverlap(), "overlap", depth=0)


def test_no_hits_at_all_calls_no_model():
    model = WordOverlap()
    empty = Hits(np.full((2, 3), -1, np.int64), np.full((2, 3), -np.inf, np.float32))
    new, _ = Reranker(model, "m", depth=3).rerank(["a", "b"], empty,
                                                  documents_of(table(), DocumentFields(("text",))))
    assert (new.rows == -1).all() and model.calls == []


def test_document_fields_given_embedded_or_text_and_must_be_stored():
    stored = ["id", "title", "text", "year"]
    meta = {"embedded_text": embedded_text(["title", "text"])}
    assert document_fields(meta, stored).names == ("title", "text")
    assert document_fields({}, stored).names == ("text",)
    assert document_fields(meta, stored, ["text", "text"]).names == ("text",)
    with pytest.raises(ParameterError, match="'body' is not stored") as err:
        document_fields({}, stored, ["body"])
    assert err.value.parameter == "fields"
    with pytest.raises(ParameterError, match="the text the vectors were embedded from"):
        document_fields({"embedded_text": embedded_text(["abstract"])}, stored)
    with pytest.raises(ParameterError, match="'text' is not stored"):
        document_fields({}, ["id", "title"])
    with pytest.raises(ParameterError, match="holds int64, not text"):
        document_fields({}, stored, ["year"], schema=table().schema)


def test_document_texts_skip_null_fields():
    docs = pa.table({"title": ["A", None, None], "text": ["x", "y", None]})
    assert DocumentFields(("title", "text")).texts(docs) == ["A x", "y", ""]


def test_metadata_records_model_depth_fields_prompt_and_window():
    model = WordOverlap()
    model.prompts, model.default_prompt_name = {"query": "query: "}, "query"
    reranker = Reranker(model, "/models/ce", depth=7, sha="abc", keep_first_score=True,
                        fields=DocumentFields(("title", "text")))
    record = json.loads(reranker.metadata()[RERANK_KEY])
    assert record == {"model": "/models/ce", "model_sha": "abc", "depth": 7,
                      "fields": ["title", "text"], "separator": " ", "prompt": "query: ",
                      "max_length": 512, "activation": None, "scores": "beside"}
    reranker.prompt = "Q: "
    reranker.rerank(QUERIES[:1], Hits(np.array([[0, 1]]), np.array([[0.5, 0.4]], np.float32)),
                    documents_of(table(), DocumentFields(("text",))))
    assert model.calls[-1][2] == "Q: "
    assert json.loads(reranker.metadata()[RERANK_KEY])["prompt"] == "Q: "
    assert FIRST_SCORE == "first_score"


# ---- the real thing: a cross-encoder from the bundled weights (conftest) -------------------------

@pytest.fixture(scope="module")
def reference(cross_encoder):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(cross_encoder, device="cpu")


def pair_texts(fields=("title", "text")):
    by_id = {doc_id: dict(zip(("title", "text"), rest)) for doc_id, *rest in DOCS}
    return {doc_id: " ".join(values[f] for f in fields) for doc_id, values in by_id.items()}


@pytest.mark.slow
def test_loaded_cross_encoder_scores_equal_cross_encoder_predict(cross_encoder, reference):
    from vecpipe.cli.models import cross_encoder_identity, load_cross_encoder

    fields = DocumentFields(("title", "text"))
    hits = first_stage(QUERIES, 10, seed=3)
    texts = [f"{title} {text}" for _, title, text in DOCS]
    expected = plain_rerank(QUERIES, hits, texts, 8,
                            lambda q, d: reference.predict([(q, d)])[0])
    for batch_size in (1, 3, 64):
        model = load_cross_encoder(cross_encoder, device="cpu")
        name, sha = cross_encoder_identity(cross_encoder)
        reranker = Reranker(model, name, depth=8, batch_size=batch_size, sha=sha,
                            fields=fields)
        new, first = reranker.rerank(QUERIES, hits, documents_of(table(), fields))
        for q, wanted in enumerate(expected):
            live = new.rows[q] >= 0
            assert new.rows[q][live].tolist() == [row for row, _, _ in wanted]
            np.testing.assert_allclose(new.scores[q][live], [s for _, s, _ in wanted],
                                       rtol=0, atol=1e-6)
    assert np.ptp(new.scores[new.rows >= 0]) > 0.05  # the head tells documents apart
    assert reranker.sha and reranker.name == cross_encoder


@pytest.mark.slow
def test_max_length_and_prompt_are_those_of_cross_encoder(cross_encoder):
    from sentence_transformers import CrossEncoder

    from vecpipe.cli.models import load_cross_encoder

    short = CrossEncoder(cross_encoder, device="cpu", max_length=8)
    pairs = [(q, text) for q in QUERIES for _, _, text in DOCS[:3]]
    ours = Reranker(load_cross_encoder(cross_encoder, device="cpu", max_length=8), "ce",
                    depth=3, prompt="query: ")
    np.testing.assert_allclose(ours.scores(pairs), short.predict(pairs, prompt="query: "),
                               rtol=0, atol=1e-6)
    full = CrossEncoder(cross_encoder, device="cpu").predict(pairs, prompt="query: ")
    assert np.abs(ours.scores(pairs) - full).max() > 1e-4  # the window did cut them
    with pytest.raises(ParameterError, match="window is 1 to 512"):
        load_cross_encoder(cross_encoder, device="cpu", max_length=513)


@pytest.mark.slow
def test_an_embedding_model_is_not_taken_for_a_cross_encoder(bundled_model_path):
    from vecpipe.cli.models import load_cross_encoder

    with pytest.raises(DataError, match="encoder without a scoring head .BertModel."):
        load_cross_encoder(bundled_model_path, device="cpu")


# ---- the command -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """DOCS embedded from title + text with a fake model, indexed storing both; and queries."""
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("rerank-index")
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n"
                            for i, t, x in DOCS))
    runner = CliRunner()
    for args in (["embed", docs, "-m", "fake:16", "--text-field", "title", "--text-field",
                  "text", "-o", folder / "emb.arrow"],
                 ["index", folder / "emb.arrow", "-o", folder / "idx", "--fields", "title,text"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    queries = folder / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{n}", "text": q}) + "\n"
                               for n, q in enumerate(QUERIES)))
    return folder / "idx", queries


def by_query(records):
    out = {}
    for record in records:
        out.setdefault(record["query_id"], []).append(record)
    for hits in out.values():
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    return out


def expected_run(first, reference, depth, k, fields=("title", "text")):
    """The first stage's top `depth` hits of each query rescored by CrossEncoder.predict,
    sorted by that score (ties by first-stage rank), cut to k: (id, score, first score)."""
    texts, text_of = pair_texts(fields), dict(zip([f"q{n}" for n in range(len(QUERIES))],
                                                  QUERIES))
    out = {}
    for query_id, hits in first.items():
        top = hits[:depth]
        scores = reference.predict([(text_of[query_id], texts[h["id"]]) for h in top])
        order = sorted(range(len(top)), key=lambda i: (-scores[i], i))[:k]
        out[query_id] = [(top[i]["id"], float(scores[i]), top[i]["score"]) for i in order]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("depth,k", [(8, 5), (12, 12), (3, 1)])
def test_search_rerank_equals_cross_encoder_predict(cli, indexed, cross_encoder, reference,
                                                    depth, k):
    index, queries = indexed
    first = cli("search", index, queries, "-k", depth, "--exact", "--output-format", "jsonl")
    assert first.exit_code == 0, first
    r = cli("search", index, queries, "-k", k, "--exact", "--rerank", cross_encoder,
            "--rerank-depth", depth, "--keep-first-score", "--fields", "text",
            "--output-format", "jsonl")
    assert r.exit_code == 0, r
    expected = expected_run(by_query(first.records()), reference, depth, k)
    got = by_query(r.records())
    assert sorted(got) == sorted(expected)
    for query_id, hits in got.items():
        assert [h["id"] for h in hits] == [i for i, _, _ in expected[query_id]]
        np.testing.assert_allclose([h["score"] for h in hits],
                                   [s for _, s, _ in expected[query_id]], rtol=0, atol=1e-6)
        assert [h[FIRST_SCORE] for h in hits] == pytest.approx(
            [f for _, _, f in expected[query_id]], abs=1e-6)
        assert all(set(h) == {"query_id", "rank", "id", "score", FIRST_SCORE, "text"}
                   for h in hits)
    assert r.stderr.strip().endswith(f"{len(QUERIES) * k} hits for {len(QUERIES)} queries")


@pytest.mark.slow
def test_search_rerank_field_batch_size_and_metadata(cli, indexed, cross_encoder, reference,
                                                     tmp_path):
    import pyarrow.parquet as pq

    index, queries = indexed
    first = by_query(cli("search", index, queries, "-k", 6, "--exact",
                         "--output-format", "jsonl").records())
    expected = expected_run(first, reference, 6, 4, fields=("text",))
    runs = []
    for batch_size in (1, 64):
        out = tmp_path / f"run{batch_size}.parquet"
        r = cli("search", index, queries, "-k", 4, "--exact", "--rerank", cross_encoder,
                "--rerank-depth", 6, "--rerank-field", "text", "--batch-size", batch_size,
                "-o", out)
        assert r.exit_code == 0, r
        runs.append(pq.read_table(out))
    assert runs[0].column("id").to_pylist() == runs[1].column("id").to_pylist()
    np.testing.assert_allclose(runs[0].column("score").to_numpy(),
                               runs[1].column("score").to_numpy(), rtol=0, atol=1e-6)
    got = by_query(runs[0].to_pylist())
    for query_id, hits in got.items():
        assert [h["id"] for h in hits] == [i for i, _, _ in expected[query_id]]
        assert FIRST_SCORE not in hits[0]  # replaced by default
    record = json.loads(runs[0].schema.metadata[f"vecpipe.{RERANK_KEY}".encode()])
    assert record["model"] == cross_encoder and record["depth"] == 6
    assert record["fields"] == ["text"] and record["scores"] == "replace"
    assert record["model_sha"] and record["max_length"] == 512


@pytest.mark.slow
@pytest.mark.parametrize("args,code,message", [
    (["--rerank-field", "body"], 1, "--rerank-field: 'body' is not stored"),
    (["--rerank-depth", "3", "-k", "5"], 2, "--rerank-depth: 3 is below k (5)"),
    (["--rerank-max-length", "100000"], 2, "--rerank-max-length: 100000 tokens"),
])
def test_search_rerank_errors(cli, indexed, cross_encoder, args, code, message):
    index, queries = indexed
    r = cli("search", index, queries, "--rerank", cross_encoder, "--output-format", "jsonl",
            *args)
    assert r.exit_code == code, r
    assert len(r.stderr.strip().splitlines()) <= 2 and message in r.stderr
    assert r.stdout == ""


def test_search_rerank_refuses_before_loading_anything(cli, indexed, tmp_path):
    index, queries = indexed
    vectors = tmp_path / "vectors.jsonl"
    vectors.write_text(json.dumps({"id": "v", "embedding": [0.25] * 16}) + "\n")
    for args, code, message in [
            ([vectors, "--rerank", tmp_path], 2, "--rerank: vector queries cannot be reranked"),
            (["--like", "d1", "--rerank", tmp_path], 2, "--rerank needs text queries"),
            ([queries, "--rerank-depth", "5"], 2, "--rerank-depth needs --rerank"),
            ([queries, "--keep-first-score"], 2, "--keep-first-score needs --rerank")]:
        r = cli("search", index, *args, "--output-format", "jsonl")
        assert r.exit_code == code, (args, r)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, (args, r)


@pytest.mark.slow
def test_an_embedding_model_given_to_rerank_is_one_line(cli, indexed, bundled_model_path):
    index, queries = indexed
    r = cli("search", index, queries, "--rerank", bundled_model_path, "--output-format", "jsonl")
    assert r.exit_code == 1
    assert "an embedding model, not a cross-encoder" in r.stderr.splitlines()[0]
