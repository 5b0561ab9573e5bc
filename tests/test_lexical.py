"""The lexical (BM25) index kind: `index --lexical` + `search` against bm25s run directly with
the same settings (scores to 1e-6), stored fields, filters, append, refusals; and on NFCorpus
nDCG@10 equal to bm25s's run scored the same way."""
import json

import numpy as np
import pytest


DOCS = [
    ("d1", "en", "The cat sat on the mat and looked at the other cats."),
    ("d2", "en", "Dogs chase cats; cats run up trees."),
    ("d3", "fr", "Le chat est sur le tapis."),
    ("d4", "en", "Statins lower cholesterol and may reduce cancer risk."),
    ("d5", "en", "Running shoes for running on trees? No: on roads."),
    ("d6", "en", "Breast cancer survival and statin use in a cohort study."),
    ("d7", "en", "A mat for yoga, a mat for cats."),
]
QUERIES = ["cats on mats", "statin cancer", "running", "tapis chat", "nothing matches xyzzy"]


def bm25s_scores(texts, queries, **settings):
    """bm25s itself: every query's full score vector over the corpus."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    model = bm25s.BM25(method=settings.get("method", "lucene"), k1=settings.get("k1", 1.5),
                       b=settings.get("b", 0.75))
    model.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False,
                            show_progress=False)
    return [model.get_scores(query) for query in tokens]


@pytest.fixture
def corpus(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "docs.jsonl",
                       [{"id": i, "lang": lang, "text": text} for i, lang, text in DOCS])


def search(cli, index, *args):
    r = cli("search", index, *[a for q in QUERIES for a in ("--query", q)], "--output-format",
            "jsonl", *args)
    assert r.exit_code == 0, r
    return r.records()


def expected_hits(scores, k, allowed=None):
    """(id, score) of the top k rows scoring above 0, ties to the lower row."""
    out = []
    for row in sorted(range(len(DOCS)), key=lambda r: (-scores[r], r)):
        if scores[row] > 0 and (allowed is None or row in allowed) and len(out) < k:
            out.append((DOCS[row][0], float(scores[row])))
    return out


@pytest.mark.parametrize("settings", [{}, {"k1": 1.2, "b": 0.5}, {"method": "robertson"}])
def test_scores_equal_bm25s(cli, corpus, tmp_path, settings):
    index = tmp_path / "idx"
    options = [a for key, value in settings.items()
               for a in ({"k1": "--k1", "b": "--b", "method": "--bm25-method"}[key], value)]
    r = cli("index", corpus, "--lexical", "-o", index, "--fields", "lang", *options)
    assert r.exit_code == 0, r
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["layout"] == "lexical"
    assert manifest["lexical"]["k1"] == settings.get("k1", 1.5)
    hits = search(cli, index, "-k", 3, "--fields", "lang")
    reference = bm25s_scores([text for _, _, text in DOCS], QUERIES, **settings)
    for number, scores in enumerate(reference, start=1):
        got = [(h["id"], h["score"]) for h in hits if h["query_id"] == f"q{number}"]
        want = expected_hits(scores, 3)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-6)
    assert all(set(h) == {"query_id", "rank", "id", "score", "lang"} for h in hits)


def test_filter_is_exact_and_append_rescores(cli, tmp_path, write_jsonl):
    index = tmp_path / "idx"
    first = write_jsonl(tmp_path / "first.jsonl", [{"id": i, "lang": lang, "text": text}
                                                   for i, lang, text in DOCS[:4]])
    rest = write_jsonl(tmp_path / "rest.jsonl", [{"id": i, "lang": lang, "text": text}
                                                 for i, lang, text in DOCS[4:]])
    assert cli("index", first, "--lexical", "-o", index, "--fields", "lang").exit_code == 0
    r = cli("index", rest, "--lexical", "--append", "-o", index)
    assert r.exit_code == 0, r
    reference = bm25s_scores([text for _, _, text in DOCS], QUERIES)
    allowed = {row for row, (_, lang, _) in enumerate(DOCS) if lang == "en"}
    hits = search(cli, index, "-k", 2, "--filter", 'lang == "en"')
    for number, scores in enumerate(reference, start=1):
        got = [(h["id"], h["score"]) for h in hits if h["query_id"] == f"q{number}"]
        want = expected_hits(scores, 2, allowed)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--lexical", "--dtype", "i8"], "--dtype"),
    (["--k1", "1.2"], "--k1"),
    (["--lexical", "--stemmer", "klingon"], "klingon"),
    (["--lexical", "--text-field", "body"], "body"),
])
def test_index_refusals_are_one_line(cli, corpus, tmp_path, args, message):
    r = cli("index", corpus, "-o", tmp_path / "idx", *args)
    assert r.exit_code in (1, 2), r
    assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "idx").exists()


def test_search_refuses_vector_options_and_queries(cli, corpus, tmp_path, write_jsonl):
    index = tmp_path / "idx"
    assert cli("index", corpus, "--lexical", "-o", index).exit_code == 0
    r = cli("search", index, "--query", "cats", "-m", "fake:4")
    assert r.exit_code == 2 and "lexical" in r.stderr
    vectors = write_jsonl(tmp_path / "v.jsonl", [{"id": "v", "embedding": [0.5, 0.5]}])
    r = cli("search", index, vectors)
    assert r.exit_code == 1 and "searched with text" in r.stderr


@pytest.mark.slow
def test_nfcorpus_ndcg_equals_bm25s(cli, tmp_path, nfcorpus, write_jsonl):
    """Title + text as MTEB joins them; both runs scored by vecpipe eval (pytrec_eval-equal).
    bm25s pads a short top k with zero-score rows, which vecpipe leaves out: dropped here."""
    import bm25s
    import Stemmer

    docs = [json.loads(line) for line in open(nfcorpus / "corpus.jsonl", encoding="utf-8")]
    queries = [json.loads(line) for line in open(nfcorpus / "queries.jsonl", encoding="utf-8")]
    judged = {line.split("\t")[0] for line in open(nfcorpus / "qrels" / "test.tsv")}
    queries = [q for q in queries if q["_id"] in judged]
    texts = [(d.get("title") or "") + " " + d["text"] for d in docs]
    stemmer = Stemmer.Stemmer("english")
    model = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    model.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    found, scores = model.retrieve(bm25s.tokenize([q["text"] for q in queries], stopwords="en",
                                                  stemmer=stemmer, show_progress=False),
                                   k=100, show_progress=False)
    with open(tmp_path / "bm25s.trec", "w") as run:
        for query, rows, values in zip(queries, found, scores):
            for rank, (row, score) in enumerate(zip(rows, values), start=1):
                if score > 0:
                    run.write(f"{query['_id']} Q0 {docs[row]['_id']} {rank} {score:.9g} b\n")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": d["_id"], "title": d.get("title"),
                                                      "text": d["text"]} for d in docs])
    asked = write_jsonl(tmp_path / "queries.jsonl", [{"id": q["_id"], "text": q["text"]}
                                                     for q in queries])
    assert cli("index", corpus, "--lexical", "--text-field", "title", "--text-field", "text",
               "-o", tmp_path / "idx").exit_code == 0
    r = cli("search", tmp_path / "idx", asked, "-k", 100, "--output-format", "trec",
            "-o", tmp_path / "vecpipe.trec")
    assert r.exit_code == 0, r
    ndcg = {}
    for name in ("bm25s", "vecpipe"):
        r = cli("eval", "retrieval", tmp_path / f"{name}.trec", "--qrels",
                nfcorpus / "qrels" / "test.tsv", "--output-format", "jsonl")
        assert r.exit_code == 0, r
        ndcg[name] = r.records()[0]["ndcg_at_10"]
    assert abs(ndcg["vecpipe"] - ndcg["bm25s"]) <= 1e-6, ndcg
    assert 0.30 < ndcg["vecpipe"] < 0.35  # BEIR's published BM25: 0.325


def test_mine_negatives_refuses_a_lexical_corpus(cli, corpus, tmp_path, write_jsonl):
    index = tmp_path / "idx"
    assert cli("index", corpus, "--lexical", "--fields", "text", "-o", index).exit_code == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "cats", "positive": DOCS[0][2]}])
    r = cli("mine-negatives", pairs, "--corpus", index, "-m", "fake:8", "-n", 1,
            "-o", tmp_path / "out.jsonl")
    assert r.exit_code == 2, r
    assert "no vectors to mine" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out.jsonl").exists()


def test_append_across_kinds_is_refused_in_one_line(cli, corpus, tmp_path, write_jsonl):
    lexical, dense = tmp_path / "lexical", tmp_path / "dense"
    vectors = write_jsonl(tmp_path / "v.jsonl", [{"id": "v", "embedding": [0.5, 0.5]}])
    assert cli("index", corpus, "--lexical", "-o", lexical).exit_code == 0
    assert cli("index", vectors, "-o", dense).exit_code == 0
    for args, code, message in [((vectors, "--append", "-o", lexical), 1, "no field 'text'"),
                                ((corpus, "--lexical", "--append", "-o", dense), 2,
                                 "holds vectors"),
                                ((corpus, "--append", "-o", dense), 1, "'embedding'")]:
        r = cli("index", *args)
        assert r.exit_code == code, (args, r)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2,
                    reason="bm25s's per-document arithmetic is float32 under NumPy 1 promotion")
@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_matrix_is_bm25s_own_to_the_bit(method):
    """core/lexical.py scores all (row, term) pairs at once; bm25s loops over documents."""
    import bm25s

    from vecpipe.core.lexical import LexicalSettings, Tokenizer, _bm25_matrix, _compacted

    settings = LexicalSettings(method=method, k1=1.2, b=0.6)
    tokenizer = Tokenizer(settings)
    tokens = tokenizer.documents([text for _, _, text in DOCS] + ["", "the a of"])
    flat, offsets, terms = _compacted(tokens, tokenizer.terms)
    ours = _bm25_matrix(settings, flat, offsets, len(terms))
    model = bm25s.BM25(k1=1.2, b=0.6, delta=settings.delta, method=method, dtype="float32",
                       int_dtype="int32")
    theirs = model.build_index_from_ids(list(range(len(terms))), tokens, show_progress=False)
    theirs["nonoccurrence"] = model.nonoccurrence_array
    for key in ("data", "indices", "indptr", "nonoccurrence"):
        if theirs[key] is None:
            assert ours[key] is None
        else:
            assert ours[key].dtype == theirs[key].dtype, key
            assert ours[key].tobytes() == theirs[key].tobytes(), key
    assert ours["num_docs"] == theirs["num_docs"]


@pytest.mark.parametrize("policy", ["first", "last"])
def test_duplicate_ids_across_and_within_batches(cli, tmp_path, write_jsonl, policy):
    """Two inputs (two batches): the second repeats d1 (and d5 twice); first keeps the first
    text, last gives the row the last one; scores as bm25s's on the corpus that results."""
    first = write_jsonl(tmp_path / "first.jsonl", [{"id": i, "text": text}
                                                   for i, _, text in DOCS[:4]])
    again = [("d5", DOCS[4][2]), ("d1", "statin cancer cohort"), ("d6", DOCS[5][2]),
             ("d5", "running cats"), ("d7", DOCS[6][2])]
    rest = write_jsonl(tmp_path / "rest.jsonl", [{"id": i, "text": t} for i, t in again])
    index = tmp_path / "idx"
    r = cli("index", first, rest, "--lexical", "-o", index, "--on-duplicate", policy)
    assert r.exit_code == 0, r
    texts = {i: text for i, _, text in DOCS}
    if policy == "last":
        texts.update(d1="statin cancer cohort", d5="running cats")
    reference = bm25s_scores(list(texts.values()), QUERIES)
    hits = search(cli, index, "-k", 3)
    for number, scores in enumerate(reference, start=1):
        got = [(h["id"], h["score"]) for h in hits if h["query_id"] == f"q{number}"]
        want = expected_hits(scores, 3)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-6)


@pytest.mark.parametrize("stopwords", ["xx", ["a"]])
def test_a_damaged_stopwords_setting_is_one_line(cli, corpus, tmp_path, stopwords):
    index = tmp_path / "idx"
    assert cli("index", corpus, "--lexical", "-o", index).exit_code == 0
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["lexical"]["stopwords"] = stopwords
    (index / "manifest.json").write_text(json.dumps(manifest))
    r = cli("search", index, "--query", "cats")
    assert r.exit_code == 1, r
    assert "invalid 'lexical' settings" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
