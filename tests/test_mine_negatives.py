"""vecpipe mine-negatives: rules checked against a plain-loop reference (fake models), outputs
checked against sentence-transformers' mine_hard_negatives (bundled MiniLM), errors and stats."""
import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.cli.models import load_model
from vecpipe.core.embedder import fake_vectors
from vecpipe.formats import schema as names

DATA = Path(__file__).resolve().parent / "data" / "mine"
DIM = 16
FAKE = f"fake:{DIM}"


# ---- fixtures and references -------------------------------------------------------------

def make_corpus(count=80):
    words = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "glass"]
    return [{"id": f"d{i}", "text": f"{words[i % 8]} {words[(i * 3) % 8]} note {i}"}
            for i in range(count)]


def make_pairs(corpus, queries=12):
    pairs = []
    for q in range(queries):
        text = f"question {q} about {corpus[q]['text'].split()[0]}"
        pairs.append({"query": text, "positive_id": corpus[q]["id"]})
        if q % 3 == 0:  # a second positive, given by text only
            pairs.append({"query": text, "positive": corpus[q + 40]["text"]})
        if q == 5:  # the same pair twice: one positive, but it widens the search
            pairs += [pairs[-1]] * 3
    return pairs


def embeddings_file(path, corpus, dim=DIM):
    """An Arrow file of fake:DIM vectors with the metadata `vecpipe embed` writes."""
    texts = [d["text"] for d in corpus]
    table = pa.table({"id": [d["id"] for d in corpus], "text": texts,
                      "embedding": names.numpy_to_vectors(fake_vectors(texts, dim))})
    table = table.replace_schema_metadata(
        names.with_meta(table.schema, load_model(f"fake:{dim}").metadata()).metadata)
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.fixture
def small(tmp_path, write_jsonl):
    corpus = make_corpus()
    pairs = make_pairs(corpus)
    return (write_jsonl(tmp_path / "pairs.jsonl", pairs),
            write_jsonl(tmp_path / "corpus.jsonl", corpus), pairs, corpus)


def reference(pairs, corpus, n=3, range_min=0, range_max=50, absolute_margin=None,
              relative_margin=None, max_score=None, min_score=None, guide=None):
    """The rules written as plain loops over a full ranking of the distinct texts (fake model
    vectors)."""
    texts = list(dict.fromkeys(d["text"] for d in corpus))
    text_of = {d["id"]: d["text"] for d in corpus}
    vectors = fake_vectors(texts, DIM)
    groups = {}
    for p in pairs:
        positive = p.get("positive") or text_of[p["positive_id"]]
        group = groups.setdefault(p["query"], [])
        if positive not in group:
            group.append(positive)
    records = [p["query"] for p in pairs]
    depth = range_max + max(records.count(q) for q in groups)
    out = {}
    for query, positives in groups.items():
        q = fake_vectors([query], DIM)[0]
        score = {t: float(np.float32(vectors[i] @ q)) for i, t in enumerate(texts)}
        ranked = sorted(range(len(texts)), key=lambda i: (-vectors[i] @ q, i))[:depth]
        weakest = min(float(fake_vectors([t], DIM)[0] @ q) for t in positives)
        seen, survivors = set(), []
        for i in ranked:
            t, s = texts[i], score[texts[i]]
            if t in positives or t == query or t in seen:
                continue
            seen.add(t)
            if absolute_margin is not None and s + absolute_margin > weakest:
                continue
            if relative_margin is not None and s > weakest - abs(weakest) * relative_margin:
                continue
            if max_score is not None and s > max_score:
                continue
            if min_score is not None and s < min_score:
                continue
            if guide is not None and guide(query, t) >= min(guide(query, p) for p in positives):
                continue
            survivors.append(t)
        out[query] = survivors[:range_max][range_min:][:n]
    return out, groups


def negatives_by_query(records, anchor="query"):
    found = {}
    for r in records:
        negatives = found.setdefault(r[anchor], [])
        if r["negative"] not in negatives:
            negatives.append(r["negative"])
    return found


# ---- the rules (fake model) ----------------------------------------------------------------

@pytest.mark.parametrize("extra,rules", [
    ([], {}),
    (["--range-min", "4", "--range-max", "9"], {"range_min": 4, "range_max": 9}),
    (["--absolute-margin", "0.05"], {"absolute_margin": 0.05}),
    (["--relative-margin", "0.1", "--max-score", "0.3"], {"relative_margin": 0.1,
                                                          "max_score": 0.3}),
    (["--min-score", "0.0", "--range-min", "2"], {"min_score": 0.0, "range_min": 2}),
])
def test_rules_match_plain_loop_reference(cli, small, extra, rules):
    pairs_path, corpus_path, pairs, corpus = small
    r = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "3",
            "--on-short", "keep", "--output-format", "jsonl", *extra)
    assert r.exit_code == 0, r
    expected, groups = reference(pairs, corpus, n=3, **rules)
    got = negatives_by_query(r.records())
    assert got == {q: negs for q, negs in expected.items() if negs}
    rows = r.records()
    assert len(rows) == sum(len(groups[q]) * len(negs) for q, negs in expected.items())
    for row in rows:
        assert row["negative"] not in groups[row["query"]]


def test_positives_by_id_and_text_and_the_query_itself_are_never_negatives(cli, tmp_path,
                                                                          write_jsonl):
    corpus = make_corpus(30)
    corpus.append({"id": "dup", "text": corpus[1]["text"]})        # a positive's twin
    corpus.append({"id": "q-self", "text": "question zero"})        # the query's own text
    corpus.append({"id": "Q7", "text": "something else entirely"})  # the query's own id
    pairs = [{"query": "question zero", "query_id": "Q7", "positive_id": "d1"},
             {"query": "question zero", "positive": corpus[2]["text"]}]
    r = cli("mine-negatives", write_jsonl(tmp_path / "p.jsonl", pairs), "--corpus",
            write_jsonl(tmp_path / "c.jsonl", corpus), "-m", FAKE, "-n", "30", "--range-max",
            "40", "--on-short", "keep", "--output-format", "jsonl",
            "--save-stats", tmp_path / "stats.json")
    assert r.exit_code == 0, r
    negatives = {row["negative"] for row in r.records()}
    banned = {corpus[1]["text"], corpus[2]["text"], "question zero", "something else entirely"}
    assert not negatives & banned
    assert len(negatives) == 33 - 5   # everything else, each text once
    stats = json.loads((tmp_path / "stats.json").read_text())
    # the twin is searched once, as its first record (d1), so it is no separate candidate
    assert stats["corpus_repeated_texts"] == 1 and stats["candidates_seen"] == 32
    assert stats["removed"]["known_positive"] == 2 and stats["removed"]["query_itself"] == 2
    assert stats["queries_short"] == 1


def test_duplicate_texts_give_one_negative(cli, tmp_path, write_jsonl):
    corpus = make_corpus(20) + [{"id": f"copy{i}", "text": "apple apple note 0 again"}
                                for i in range(3)]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "apple apple note 0 agai",
                                                "positive_id": "d5"}])
    index = tmp_path / "idx"
    assert cli("index", embeddings_file(tmp_path / "e.arrow", corpus), "-o", index,
               "--fields", "text", "-q").exit_code == 0
    args = ["-n", "21", "--on-short", "keep", "--output-format", "jsonl"]
    searched_once = cli("mine-negatives", pairs, "--corpus",
                        write_jsonl(tmp_path / "c.jsonl", corpus), "-m", FAKE, *args,
                        "--save-stats", tmp_path / "exact.json")
    all_searched = cli("mine-negatives", pairs, "--corpus", index, "--exact", *args,
                       "--save-stats", tmp_path / "index.json")
    for result in (searched_once, all_searched):
        negatives = [row["negative"] for row in result.records()]
        assert len(negatives) == len(set(negatives)) == 23 - 1 - 2
    exact = json.loads((tmp_path / "exact.json").read_text())
    assert exact["corpus_repeated_texts"] == 2 and exact["removed"]["duplicate_text"] == 0
    index_stats = json.loads((tmp_path / "index.json").read_text())
    assert index_stats["removed"]["duplicate_text"] == 2


def test_random_sampling_is_seeded_and_inside_the_window(cli, small):
    pairs_path, corpus_path, pairs, corpus = small
    common = ["mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "3",
              "--range-min", "2", "--range-max", "15", "--sampling", "random",
              "--with-scores", "--output-format", "jsonl"]
    first, again, other = (cli(*common, "--seed", s).records() for s in ("1", "1", "2"))
    assert first == again and first != other
    window, _ = reference(pairs, corpus, n=13, range_min=2, range_max=15)
    for query, negatives in negatives_by_query(first).items():
        assert len(negatives) == 3 and set(negatives) <= set(window[query])
        scores = [row["scores"][1] for row in first if row["query"] == query][:3]
        assert scores == sorted(scores, reverse=True)


def test_on_short_drop_keep_and_counts(cli, small, tmp_path):
    pairs_path, corpus_path, pairs, corpus = small
    args = ["mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "4",
            "--max-score", "0.4", "--range-max", "6", "--output-format", "jsonl"]
    expected, groups = reference(pairs, corpus, n=4, max_score=0.4, range_max=6)
    short = {q for q, negs in expected.items() if len(negs) < 4}
    assert short and len(short) < len(expected)  # the case is meaningful
    dropped = cli(*args, "--save-stats", tmp_path / "d.json")
    kept = cli(*args, "--on-short", "keep")
    assert set(negatives_by_query(dropped.records())) == set(expected) - short
    assert negatives_by_query(kept.records()) == {q: n for q, n in expected.items() if n}
    stats = json.loads((tmp_path / "d.json").read_text())
    assert stats["queries_short"] == stats["queries_dropped"] == len(short)
    assert f"{len(short)} queries short" in dropped.stderr


def test_layouts_and_scores(cli, small):
    pairs_path, corpus_path, pairs, corpus = small
    base = ["mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "2",
            "--output-format", "jsonl"]
    expected, groups = reference(pairs, corpus, n=2)
    tuples = cli(*base, "--shape", "n-tuple", "--with-scores").records()
    assert list(tuples[0]) == ["query", "positive", "negative_1", "negative_2", "scores"]
    assert len(tuples) == sum(len(g) for g in groups.values())
    row = tuples[0]
    assert [row["negative_1"], row["negative_2"]] == expected[row["query"]]
    q = fake_vectors([row["query"]], DIM)[0]
    direct = [float(fake_vectors([t], DIM)[0] @ q) for t in
              (row["positive"], row["negative_1"], row["negative_2"])]
    assert row["scores"] == pytest.approx(direct, abs=1e-5)
    pairs_out = cli(*base, "--shape", "labeled-pair").records()
    first_query = [r for r in pairs_out if r["query"] == row["query"]]
    assert [r["label"] for r in first_query] == [1] * len(groups[row["query"]]) + [0, 0]
    lists = cli(*base, "--shape", "labeled-list").records()
    assert lists[0]["positive"][1:] == expected[lists[0]["query"]]
    assert lists[0]["labels"] == [1, 0, 0]


def test_embeddings_stream_and_index_folder_give_the_same_rows(cli, small, tmp_path):
    pairs_path, corpus_path, pairs, corpus = small
    stream = embeddings_file(tmp_path / "emb.arrow", corpus)
    assert cli("index", stream, "-o", tmp_path / "idx", "--fields", "text", "-q").exit_code == 0
    args = ["-n", "3", "--relative-margin", "0.05", "--output-format", "jsonl"]
    from_text = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, *args)
    from_stream = cli("mine-negatives", pairs_path, "--corpus", stream, *args)
    from_index = cli("mine-negatives", pairs_path, "--corpus", tmp_path / "idx", "--exact",
                     *args)
    assert from_text.exit_code == from_stream.exit_code == from_index.exit_code == 0
    assert from_text.records() == from_stream.records() == from_index.records()
    mismatch = cli("mine-negatives", pairs_path, "--corpus", stream, "-m", "fake:8", *args)
    assert mismatch.exit_code == 1 and "model differs" in mismatch.stderr


def test_binary_index_scores_with_its_full_vectors(cli, small, tmp_path):
    pairs_path, corpus_path, pairs, corpus = small
    stream = embeddings_file(tmp_path / "emb.arrow", corpus, dim=64)
    for name, extra in (("bits", []), ("bits-full", ["--keep-vectors"])):
        r = cli("index", stream, "-o", tmp_path / name, "--fields", "text", "--dtype", "b1",
                "-q", *extra)
        assert r.exit_code == 0, r
    args = ["-n", "3", "--with-scores", "--output-format", "jsonl"]
    refused = cli("mine-negatives", pairs_path, "--corpus", tmp_path / "bits", *args)
    assert refused.exit_code == 1 and "--keep-vectors" in refused.stderr
    r = cli("mine-negatives", pairs_path, "--corpus", tmp_path / "bits-full", *args)
    assert r.exit_code == 0, r
    for row in r.records():  # cosines of the float vectors, positive and negative alike
        q, p, n = fake_vectors([row["query"], row["positive"], row["negative"]], 64)
        assert row["scores"] == pytest.approx([q @ p, q @ n], abs=1e-5)


def test_beir_folder_and_positives_as_corpus(cli, tmp_path, write_jsonl):
    corpus = make_corpus(40)
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": d["id"], "title": "", "text": d["text"]}
                                          for d in corpus])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"}
                                           for i in range(6)])
    with open(folder / "qrels" / "train.tsv", "w", newline="") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["query-id", "corpus-id", "score"])
        for i in range(6):
            out.writerows([[f"q{i}", f"d{i}", 1], [f"q{i}", f"d{i + 10}", 0]])
    r = cli("mine-negatives", "--beir", folder, "-m", FAKE, "-n", "2", "--output-format",
            "jsonl")
    assert r.exit_code == 0, r
    pairs = [{"query": f"question {i}", "positive_id": f"d{i}"} for i in range(6)]
    expected, _ = reference(pairs, corpus, n=2)
    assert negatives_by_query(r.records()) == expected  # score-0 judgements are no positives
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):  # gzipped, as eval beir
        path = folder / name
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    gzipped = cli("mine-negatives", "--beir", folder, "-m", FAKE, "-n", "2", "--output-format",
                  "jsonl")
    assert negatives_by_query(gzipped.records()) == expected
    # without --corpus, the positives' texts are the corpus (sentence-transformers' default)
    text_pairs = [{"query": f"question {i}", "positive": corpus[i]["text"]} for i in range(6)]
    alone = cli("mine-negatives", write_jsonl(tmp_path / "p.jsonl", text_pairs), "-m", FAKE,
                "-n", "2", "--output-format", "jsonl")
    expected, _ = reference(text_pairs, corpus[:6], n=2)
    assert negatives_by_query(alone.records()) == expected


@pytest.mark.slow
def test_guide_model_vetoes_candidates_it_finds_as_close_as_the_positive(cli, tmp_path,
                                                                        write_jsonl):
    corpus = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()]
    texts = [d["text"] for d in corpus] + sorted({p["query"] for p in pairs})
    vector = dict(zip(texts, load_model(None).st.encode(texts, normalize_embeddings=True)))

    def guide_score(query, text):
        return float(vector[query] @ vector[text])

    r = cli("mine-negatives", DATA / "pairs.jsonl", "--corpus", DATA / "corpus.jsonl", "-m",
            FAKE, "--guide", "default", "-n", "25", "--range-max", "30", "--on-short", "keep",
            "--output-format", "jsonl", "--save-stats", tmp_path / "s.json")
    assert r.exit_code == 0, r
    expected, _ = reference(pairs, corpus, n=25, range_max=30, guide=guide_score)
    plain, _ = reference(pairs, corpus, n=25, range_max=30)
    assert negatives_by_query(r.records()) == {q: n for q, n in expected.items() if n}
    assert expected != plain
    assert json.loads((tmp_path / "s.json").read_text())["removed"]["guide"] > 0


# ---- errors and reporting --------------------------------------------------------------------

def test_bad_input_is_one_line_exit_1_and_nothing_written(cli, small, tmp_path, write_jsonl):
    pairs_path, corpus_path, pairs, corpus = small
    out = tmp_path / "out.jsonl"
    bad_id = write_jsonl(tmp_path / "bad.jsonl", pairs[:2] + [{"query": "x",
                                                               "positive_id": "nope"}])
    r = cli("mine-negatives", bad_id, "--corpus", corpus_path, "-m", FAKE, "-o", out)
    assert r.exit_code == 1 and r.stdout == "" and not out.exists()
    assert "'nope' is not in the corpus" in r.stderr and f"{bad_id}:3" in r.stderr
    no_query = write_jsonl(tmp_path / "nq.jsonl", [{"text": "a", "positive": "b"}])
    r = cli("mine-negatives", no_query, "--corpus", corpus_path, "-m", FAKE)
    assert r.exit_code == 1 and "`query` or `anchor`" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["-n", "10", "--range-max", "5"], "cannot take 10 negatives"),
    (["--shape", "jsonl"], "unknown --shape"),
    (["--shape", "n-tuple", "--on-short", "keep"], "exactly -n negatives"),
    (["--sampling", "best"], "unknown --sampling"),
])
def test_impossible_options_are_usage_errors(cli, small, args, message):
    pairs_path, corpus_path, _, _ = small
    r = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, *args)
    assert r.exit_code == 2 and message in r.stderr and r.stdout == ""


def test_parquet_output_stats_and_quiet(cli, small, tmp_path):
    import pyarrow.parquet as pq

    pairs_path, corpus_path, pairs, corpus = small
    out = tmp_path / "train.parquet"
    r = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, "-o", out,
            "--save-stats", tmp_path / "s.json", "--shape", "n-tuple", "-n", "2", "-q")
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == ""
    table = pq.read_table(out)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert table.num_rows == stats["rows_written"] > 0
    assert stats["queries"] == 12 and stats["negatives"] == 24
    assert stats["options"]["range_max"] == 50 and -1 <= stats["mean_negative_score"] <= 1
    assert stats["options"]["shape"] == "n-tuple" and "layout" not in stats["options"]


def test_exact_top_k_by_blocks_equals_a_full_sort():
    from vecpipe.core.vectors import exact_top_k

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((1000, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    hits = exact_top_k(queries, corpus, 25, block_rows=64)
    full = queries @ corpus.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :25]
    assert (hits.rows == expected).all()
    assert np.allclose(hits.scores, np.take_along_axis(full, expected, 1))


# ---- sentence-transformers' mine_hard_negatives (bundled MiniLM) ----------------------------

def st_mine(pairs, corpus_texts, cache, **options):
    pytest.importorskip("datasets")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    dataset = Dataset.from_dict({"query": [p["query"] for p in pairs],
                                 "positive": [p["positive"] for p in pairs]})
    return mine_hard_negatives(dataset, load_model(None).st, corpus=corpus_texts,
                               cache_folder=str(cache), verbose=False, **options).to_list()


def assert_same_rows(ours, theirs):
    """Texts equal; scores equal to float32 rounding (torch and numpy sum differently)."""
    assert len(ours) == len(theirs)
    for mine, peer in zip(ours, theirs):
        assert mine.keys() == peer.keys()
        for key in mine:
            if key in ("scores", "score"):
                assert mine[key] == pytest.approx(peer[key], abs=1e-5)
            else:
                assert mine[key] == peer[key], key


ST_CASES = [
    ({"num_negatives": 3, "range_max": 10}, ["-n", "3", "--range-max", "10", "--on-short",
                                             "keep"]),
    ({"num_negatives": 3, "range_min": 2, "range_max": 10, "relative_margin": 0.05,
      "output_scores": True},
     ["-n", "3", "--range-min", "2", "--range-max", "10", "--relative-margin", "0.05",
      "--with-scores", "--on-short", "keep"]),
    ({"num_negatives": 4, "range_max": 20, "absolute_margin": 0.1, "max_score": 0.5,
      "output_format": "n-tuple", "output_scores": True},
     ["-n", "4", "--range-max", "20", "--absolute-margin", "0.1", "--max-score", "0.5",
      "--shape", "n-tuple", "--with-scores"]),
    ({"num_negatives": 2, "range_max": 8, "min_score": 0.1, "output_format": "labeled-pair"},
     ["-n", "2", "--range-max", "8", "--min-score", "0.1", "--shape", "labeled-pair",
      "--on-short", "keep"]),
    ({"num_negatives": 3, "range_max": 8, "relative_margin": 0.1, "output_format":
      "labeled-list", "output_scores": True},
     ["-n", "3", "--range-max", "8", "--relative-margin", "0.1", "--shape", "labeled-list",
      "--with-scores", "--on-short", "keep"]),
]


@pytest.fixture(scope="module")
def st_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("st-cache")


@pytest.mark.parametrize("theirs,ours", ST_CASES, ids=lambda c: str(c)[:40])
@pytest.mark.slow
def test_equals_sentence_transformers_on_the_committed_set(cli, st_cache, theirs, ours):
    pairs = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text()
              .splitlines()]
    expected = st_mine(pairs, corpus, st_cache, **theirs)
    r = cli("mine-negatives", DATA / "pairs.jsonl", "--corpus", DATA / "corpus.jsonl",
            "--output-format", "jsonl", *ours)
    assert r.exit_code == 0, r
    assert_same_rows(r.records(), expected)


@pytest.mark.slow
def test_equals_sentence_transformers_on_nfcorpus_train(cli, nfcorpus, tmp_path, write_jsonl):
    """NFCorpus train pairs of 25 queries against 300 documents (titles, to keep the test
    fast); sentence-transformers embeds the corpus once and we mine from those vectors."""
    docs = [json.loads(line) for line in (nfcorpus / "corpus.jsonl").read_text().splitlines()]
    queries = {json.loads(line)["_id"]: json.loads(line)["text"]
               for line in (nfcorpus / "queries.jsonl").read_text().splitlines()}
    judged = {}
    with open(nfcorpus / "qrels" / "train.tsv", newline="") as f:
        for row in list(csv.reader(f, delimiter="\t"))[1:]:
            judged.setdefault(row[0], []).append(row[1])
    chosen = [q for q, ids in judged.items() if len(ids) <= 8][:25]
    wanted = {d for q in chosen for d in judged[q]}
    docs = [d for d in docs if d["_id"] in wanted] + \
        [d for d in docs if d["_id"] not in wanted][:300 - len(wanted)]
    title = {d["_id"]: d["title"] for d in docs}
    pairs = [{"query": queries[q], "positive": title[d], "positive_id": d}
             for q in chosen for d in judged[q]]
    corpus_texts = [d["title"] for d in docs]
    expected = st_mine(pairs, corpus_texts, tmp_path, num_negatives=5, range_min=3,
                       range_max=30, relative_margin=0.05, output_scores=True)
    # the corpus vectors sentence-transformers cached, in its de-duplicated corpus order
    st_order = list(dict.fromkeys(corpus_texts + [p["positive"] for p in pairs]))
    cached = np.load(next(tmp_path.glob("corpus_embeddings_*.npy")))
    vector_of = dict(zip(st_order, cached))
    table = pa.table({"id": [d["_id"] for d in docs], "text": corpus_texts,
                      "embedding": names.numpy_to_vectors(
                          np.stack([vector_of[t] for t in corpus_texts]))})
    table = table.replace_schema_metadata(
        names.with_meta(table.schema, load_model(None).metadata()).metadata)
    with pa.ipc.new_file(tmp_path / "corpus.arrow", table.schema) as writer:
        writer.write_table(table)
    r = cli("mine-negatives", write_jsonl(tmp_path / "pairs.jsonl", pairs), "--corpus",
            tmp_path / "corpus.arrow", "-n", "5", "--range-min", "3", "--range-max", "30",
            "--relative-margin", "0.05", "--with-scores", "--on-short", "keep",
            "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert_same_rows(r.records(), expected)


@pytest.mark.slow
def test_cross_encoder_rescoring_equals_sentence_transformers(cli, tmp_path, st_cache,
                                                              bundled_model_path):
    """A randomly initialised one-layer cross-encoder built from the bundled model's config
    (no cross-encoder is available offline): the plumbing, not the quality, is under test."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(bundled_model_path, num_labels=1,
                                        num_hidden_layers=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "ce")
    AutoTokenizer.from_pretrained(bundled_model_path).save_pretrained(tmp_path / "ce")
    from sentence_transformers import CrossEncoder

    pairs = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text()
              .splitlines()]
    # sentence-transformers rescores only when a score rule is set; a max score of 10 is one
    # that removes nothing
    expected = st_mine(pairs, corpus, st_cache, cross_encoder=CrossEncoder(str(tmp_path / "ce")),
                       num_negatives=3, range_max=10, max_score=10.0, output_scores=True)
    r = cli("mine-negatives", DATA / "pairs.jsonl", "--corpus", DATA / "corpus.jsonl",
            "--cross-encoder", tmp_path / "ce", "-n", "3", "--range-max", "10",
            "--max-score", "10", "--with-scores", "--on-short", "keep", "--output-format",
            "jsonl")
    assert r.exit_code == 0, r
    assert_same_rows(r.records(), expected)


@pytest.mark.slow
def test_pipeline_from_an_arrow_pipe_into_head(tmp_path, small, write_jsonl):
    """A shell user: pairs through `convert` (Arrow on the pipe), output cut short by head."""
    import subprocess
    import sys

    pairs_path, corpus_path, _, _ = small
    cmd = [sys.executable, "-m", "vecpipe.cli"]
    convert = subprocess.Popen(cmd + ["convert", str(pairs_path), "-q"], stdout=subprocess.PIPE)
    mine = subprocess.Popen(cmd + ["mine-negatives", "--corpus", str(corpus_path), "-m", FAKE,
                                   "--output-format", "jsonl", "-q"],
                            stdin=convert.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    convert.stdout.close()
    head = subprocess.run(["head", "-1"], stdin=mine.stdout, capture_output=True)
    mine.stdout.close()
    assert mine.wait() == 0 and convert.wait() == 0 and mine.stderr.read() == b""
    assert json.loads(head.stdout)["query"] == "question 0 about apple"
