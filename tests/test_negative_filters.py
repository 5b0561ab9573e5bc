"""mine-negatives' filters (per-positive margin, positive similarity, relevance levels, per-record
prompts, guide prompts, every scorer's scores), each checked against a direct numpy computation
on fake-model vectors."""
import csv
import json

import pytest

from vecpipe.core.embedder import fake_vectors

DIM = 16
FAKE = f"fake:{DIM}"
WORDS = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "glass"]


def make_corpus(count=80):
    return [{"id": f"d{i}", "text": f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} note {i}"}
            for i in range(count)]


def make_pairs(corpus, queries=10, extra=None):
    """Every query with three positives (by id), so per-positive thresholds differ."""
    pairs = []
    for q in range(queries):
        for d in (q, q + 20, q + 40):
            pairs.append({"query": f"question {q} about {WORDS[q % 8]}",
                          "positive_id": corpus[d]["id"], **(extra(q) if extra else {})})
    return pairs


def vec(text, prompt=""):
    return fake_vectors([text], DIM, prompt)[0]


def ranking(query_vector, texts, banned, depth=None):
    """The `depth` best corpus texts by score (ties: the earlier text), then without
    `banned`."""
    vectors = fake_vectors(texts, DIM)
    scores = vectors @ query_vector
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[:depth]
    return [(texts[i], float(scores[i])) for i in order if texts[i] not in banned]


def run_jsonl(cli, *args):
    r = cli("mine-negatives", *args, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    return r.records()


def by_pair(rows, anchor="query"):
    found = {}
    for row in rows:
        found.setdefault((row[anchor], row["positive"]), []).append(row["negative"])
    return found


@pytest.fixture
def small(tmp_path, write_jsonl):
    corpus = make_corpus()
    pairs = make_pairs(corpus)
    return (write_jsonl(tmp_path / "pairs.jsonl", pairs),
            write_jsonl(tmp_path / "corpus.jsonl", corpus), pairs, corpus)


def groups_of(pairs, corpus):
    text_of = {d["id"]: d["text"] for d in corpus}
    groups = {}
    for p in pairs:
        groups.setdefault(p["query"], []).append(text_of[p["positive_id"]])
    return groups


# ---- --margin-per positive (NV-Retriever TopK-PercPos) ---------------------------------------

def test_margin_per_positive_gives_each_pair_its_own_threshold(cli, small, tmp_path):
    pairs_path, corpus_path, pairs, corpus = small
    texts = [d["text"] for d in corpus]
    args = [pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "4", "--relative-margin",
            "0.1", "--on-short", "keep", "--range-max", "60"]
    r = cli("mine-negatives", *args, "--margin-per", "positive", "--with-scores",
            "--save-stats", tmp_path / "s.json", "--output-format", "jsonl")
    assert r.exit_code == 0 and "pairs short of negatives" in r.stderr, r
    rows = r.records()
    expected, removed = {}, 0
    for query, positives in groups_of(pairs, corpus).items():
        q = vec(query)
        candidates = ranking(q, texts, set(positives), 60 + 3)
        for positive in positives:
            own = float(vec(positive) @ q)
            kept = [t for t, s in candidates if s <= own - abs(own) * 0.1]
            removed += len(candidates) - len(kept)
            if kept:
                expected[(query, positive)] = kept[:4]
    assert by_pair(rows) == expected
    for row in rows:  # the positive's own score in every row
        assert row["scores"][0] == pytest.approx(float(vec(row["positive"]) @ vec(row["query"])),
                                                 abs=1e-5)
    assert json.loads((tmp_path / "s.json").read_text())["removed"]["relative_margin"] == removed
    weakest = by_pair(run_jsonl(cli, *args))  # today's rule: the same negatives for all
    assert weakest != expected
    for query, positives in groups_of(pairs, corpus).items():
        assert len({tuple(weakest.get((query, p), [])) for p in positives}) == 1


def test_margin_per_positive_absolute_margin(cli, small):
    pairs_path, corpus_path, pairs, corpus = small
    texts = [d["text"] for d in corpus]
    rows = run_jsonl(cli, pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "3",
                     "--absolute-margin", "0.2", "--margin-per", "positive", "--on-short",
                     "keep")
    expected = {}
    for query, positives in groups_of(pairs, corpus).items():
        q = vec(query)
        candidates = ranking(q, texts, set(positives), 50 + 3)
        for positive in positives:
            own = float(vec(positive) @ q)
            kept = [t for t, s in candidates if s + 0.2 <= own]
            if kept:
                expected[(query, positive)] = kept[:3]
    assert by_pair(rows) == expected


def test_margin_per_positive_in_every_shape(cli, small):
    pairs_path, corpus_path, _, _ = small
    args = [pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "3", "--relative-margin",
            "0.1", "--margin-per", "positive"]
    triplets = by_pair(run_jsonl(cli, *args))     # short pairs dropped: all have 3
    tuples = run_jsonl(cli, *args, "--shape", "n-tuple")
    assert {(r["query"], r["positive"]): [r[f"negative_{i}"] for i in (1, 2, 3)]
            for r in tuples} == triplets
    labeled = run_jsonl(cli, *args, "--shape", "labeled-pair")
    assert len(labeled) == 4 * len(triplets)
    for start in range(0, len(labeled), 4):
        group = labeled[start:start + 4]
        assert [r["label"] for r in group] == [1, 0, 0, 0]
        assert [r["positive"] for r in group[1:]] == \
            triplets[(group[0]["query"], group[0]["positive"])]


# ---- --max-positive-similarity (LG-ANNA) -----------------------------------------------------

def test_max_positive_similarity_drops_candidates_close_to_a_positive(cli, small, tmp_path):
    pairs_path, corpus_path, pairs, corpus = small
    texts = [d["text"] for d in corpus]
    rows = run_jsonl(cli, pairs_path, "--corpus", corpus_path, "-m", FAKE, "-n", "30",
                     "--range-max", "60", "--max-positive-similarity", "0.3", "--on-short",
                     "keep", "--save-stats", tmp_path / "s.json")
    expected, removed = {}, 0
    for query, positives in groups_of(pairs, corpus).items():
        candidates = ranking(vec(query), texts, set(positives), 60 + 3)
        near = fake_vectors([t for t, _ in candidates], DIM) @ fake_vectors(positives, DIM).T
        kept = [t for (t, _), cos in zip(candidates, near.max(axis=1)) if cos < 0.3]
        removed += len(candidates) - len(kept)
        expected[query] = kept[:30]
    got = {}
    for (query, _), negatives in by_pair(rows).items():
        got[query] = negatives
    assert got == expected
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["removed"]["max_positive_similarity"] == removed > 0


def test_max_positive_similarity_on_an_index_and_for_text_positives(cli, small, tmp_path,
                                                                   write_jsonl):
    """An index folder's vectors give the same rows; positives given as text only (not in the
    corpus) are embedded with the corpus model."""
    import pyarrow as pa

    from vecpipe.cli.models import load_model
    from vecpipe.formats import schema as names

    pairs_path, corpus_path, pairs, corpus = small
    texts = [d["text"] for d in corpus]
    table = pa.table({"id": [d["id"] for d in corpus], "text": texts,
                      "embedding": names.numpy_to_vectors(fake_vectors(texts, DIM))})
    table = table.replace_schema_metadata(
        names.with_meta(table.schema, load_model(FAKE).metadata()).metadata)
    with pa.ipc.new_file(tmp_path / "e.arrow", table.schema) as writer:
        writer.write_table(table)
    assert cli("index", tmp_path / "e.arrow", "-o", tmp_path / "idx", "--fields", "text",
               "-q").exit_code == 0
    args = ["-n", "20", "--max-positive-similarity", "0.3", "--on-short", "keep"]
    from_index = run_jsonl(cli, pairs_path, "--corpus", tmp_path / "idx", "--exact", *args)
    from_text = run_jsonl(cli, pairs_path, "--corpus", corpus_path, "-m", FAKE, *args)
    assert from_index == from_text
    text_pairs = [{"query": "question 1 about river", "positive": "a text outside the corpus"}]
    rows = run_jsonl(cli, write_jsonl(tmp_path / "p.jsonl", text_pairs), "--corpus",
                     corpus_path, "-m", FAKE, "-n", "60", "--range-max", "80",
                     "--max-positive-similarity", "0.2", "--on-short", "keep")
    positive = vec("a text outside the corpus")
    candidates = ranking(vec(text_pairs[0]["query"]), texts, set())
    expected = [t for t, _ in candidates if vec(t) @ positive < 0.2]
    assert [row["negative"] for row in rows] == expected[:60]


# ---- --min-relevance on graded qrels ---------------------------------------------------------

def graded_beir(folder, write_jsonl, corpus):
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": d["id"], "title": "", "text": d["text"]}
                                          for d in corpus])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"}
                                           for i in range(6)])
    grades = {}
    with open(folder / "qrels" / "train.tsv", "w", newline="") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["query-id", "corpus-id", "score"])
        for i in range(6):  # a grade-1 judgment before the grade-2 one, as qrels may list them
            for doc, grade in ((i + 10, 1), (i, 2), (i + 20, 0), (i + 30, 1)):
                out.writerow([f"q{i}", f"d{doc}", grade])
                grades[(f"question {i}", corpus[doc]["text"])] = grade
    return grades


def test_min_relevance_positives_and_the_graded_below_are_no_negatives(cli, tmp_path,
                                                                      write_jsonl):
    corpus = make_corpus(50)
    texts = [d["text"] for d in corpus]
    grades = graded_beir(tmp_path / "beir", write_jsonl, corpus)
    common = ["--beir", tmp_path / "beir", "-m", FAKE, "-n", "45", "--on-short", "keep",
              "--range-max", "48"]
    for level in (1, 2):
        rows = run_jsonl(cli, *common, "--min-relevance", str(level), "--save-stats",
                         tmp_path / "s.json")
        expected, removed = {}, 0
        for i in range(6):
            query = f"question {i}"
            positives = [t for (q, t), g in grades.items() if q == query and g >= level]
            judged = {t for (q, t), g in grades.items() if q == query and 0 < g}
            candidates = ranking(vec(query), texts, set(positives), 48 + len(positives))
            negatives = [t for t, _ in candidates if t not in judged]
            removed += len(candidates) - len(negatives)
            expected.update({(query, p): negatives[:45] for p in positives})
        assert by_pair(rows) == expected
        stats = json.loads((tmp_path / "s.json").read_text())
        assert stats["removed"]["judged_relevant"] == removed
        assert (removed > 0) == (level == 2)
    plain = run_jsonl(cli, *common)
    assert by_pair(plain) == by_pair(run_jsonl(cli, *common, "--min-relevance", "1"))


def test_min_relevance_needs_beir_and_a_judgment_at_the_level(cli, small, tmp_path,
                                                             write_jsonl):
    pairs_path, corpus_path, _, corpus = small
    r = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE,
            "--min-relevance", "2")
    assert r.exit_code == 2 and "--beir" in r.stderr
    graded_beir(tmp_path / "beir", write_jsonl, make_corpus(50))
    r = cli("mine-negatives", "--beir", tmp_path / "beir", "-m", FAKE, "--min-relevance", "3")
    assert r.exit_code == 1 and "graded 3 or more" in r.stderr and r.stdout == ""
    r = cli("mine-negatives", "--beir", tmp_path / "beir", "-m", FAKE, "--min-relevance", "0")
    assert r.exit_code == 2 and "above 0" in r.stderr


# ---- --prompt-field (per-record instructions) ------------------------------------------------

def test_prompt_field_embeds_each_query_with_its_own_instruction(cli, small, tmp_path,
                                                                write_jsonl):
    _, corpus_path, _, corpus = small
    texts = [d["text"] for d in corpus]
    tasks = ["Retrieve a fact: ", "Find a similar note: ", None]
    pairs = make_pairs(corpus, 6, extra=lambda q: {"task": tasks[q % 3]})
    pairs.append({**pairs[0], "task": "Another task: "})  # same text, another task
    rows = run_jsonl(cli, write_jsonl(tmp_path / "p.jsonl", pairs), "--corpus", corpus_path,
                     "-m", FAKE, "-n", "3", "--prompt-field", "task", "--query-prompt", "Q: ")
    assert list(rows[0]) == ["query", "task", "positive", "negative"]
    got = {}
    for row in rows:
        got.setdefault((row["task"], row["query"]), set()).add(row["negative"])
    expected = {}
    for p in pairs:
        expected.setdefault((p["task"], p["query"]), []).append(
            next(d["text"] for d in corpus if d["id"] == p["positive_id"]))
    assert set(got) == set(expected)
    for (task, query), positives in expected.items():
        q = vec(query, "Q: " if task is None else task)
        assert got[(task, query)] == {t for t, _ in ranking(q, texts, set(positives))[:3]}


# ---- the guide's prompts and every scorer's scores -------------------------------------------

def test_guide_prompts_and_guide_scores(cli, small):
    pairs_path, corpus_path, pairs, corpus = small
    texts = [d["text"] for d in corpus]
    rows = run_jsonl(cli, pairs_path, "--corpus", corpus_path, "-m", FAKE, "--guide", FAKE,
                     "--guide-query-prompt", "gq: ", "--guide-doc-prompt", "gd: ", "-n", "20",
                     "--range-max", "60", "--on-short", "keep", "--all-scores")
    assert list(rows[0]) == ["query", "positive", "negative", "scores", "guide_scores"]

    def guide(query, text):
        return float(vec(query, "gq: ") @ vec(text, "gd: "))

    expected = {}
    for query, positives in groups_of(pairs, corpus).items():
        weakest = min(guide(query, p) for p in positives)
        candidates = ranking(vec(query), texts, set(positives), 60 + 3)
        expected[query] = [t for t, _ in candidates if guide(query, t) < weakest][:20]
    got = {}
    for row in rows:
        got.setdefault(row["query"], [])
        if row["negative"] not in got[row["query"]]:
            got[row["query"]].append(row["negative"])
        assert row["guide_scores"] == pytest.approx(
            [guide(row["query"], row["positive"]), guide(row["query"], row["negative"])],
            abs=1e-5)
    assert got == {q: n for q, n in expected.items() if n}


@pytest.mark.slow
def test_cross_encoder_scores_come_with_the_retriever_scores(cli, small, cross_encoder):
    from sentence_transformers import CrossEncoder

    pairs_path, corpus_path, _, _ = small
    rows = run_jsonl(cli, pairs_path, "--corpus", corpus_path, "-m", FAKE, "--cross-encoder",
                     cross_encoder, "-n", "2", "--shape", "n-tuple", "--all-scores")
    assert list(rows[0])[-2:] == ["scores", "retriever_scores"]
    model = CrossEncoder(cross_encoder)
    for row in rows[:6]:
        texts = [row["positive"], row["negative_1"], row["negative_2"]]
        assert row["retriever_scores"] == pytest.approx(
            [float(vec(t) @ vec(row["query"])) for t in texts], abs=1e-5)
        assert row["scores"] == pytest.approx(
            model.predict([(row["query"], t) for t in texts]).tolist(), abs=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--margin-per", "pair"], "unknown --margin-per"),
    (["--max-positive-similarity", "2"], "between -1 and 1"),
    (["--guide-query-prompt", "x"], "need --guide"),
    (["--prompt-field", "positive"], "also a column"),
    (["--prompt-field", "task", "--beir", "x"], "PAIRS"),
])
def test_filter_usage_errors(cli, small, args, message):
    pairs_path, corpus_path, _, _ = small
    r = cli("mine-negatives", pairs_path, "--corpus", corpus_path, "-m", FAKE, *args)
    assert r.exit_code == 2 and message in r.stderr and r.stdout == ""


# ---- NFCorpus's graded qrels -----------------------------------------------------------------

@pytest.mark.slow
def test_min_relevance_on_nfcorpus_graded_qrels(cli, nfcorpus, tmp_path):
    """NFCorpus test qrels grade 1 and 2: with level 2 only grade-2 documents are positives,
    and no grade-1 document of a query is among its negatives."""
    docs = [json.loads(line) for line in (nfcorpus / "corpus.jsonl").read_text().splitlines()]
    text_of = {d["_id"]: f"{d['title']} {d['text']}".strip() for d in docs}
    queries = {json.loads(line)["_id"]: json.loads(line)["text"]
               for line in (nfcorpus / "queries.jsonl").read_text().splitlines()}
    graded = {}
    with open(nfcorpus / "qrels" / "test.tsv", newline="") as f:
        for query_id, doc_id, grade in list(csv.reader(f, delimiter="\t"))[1:]:
            grades = graded.setdefault(queries[query_id], {})  # texts repeat: the best grade
            grades[text_of[doc_id]] = max(int(grade), grades.get(text_of[doc_id], 0))
    assert {g for grades in graded.values() for g in grades.values()} >= {1, 2}
    rows = run_jsonl(cli, "--beir", nfcorpus, "--split", "test", "-m", FAKE, "-n", "20",
                     "--range-max", "40", "--min-relevance", "2", "--shape", "labeled-list",
                     "--save-stats", tmp_path / "s.json")
    got = {}
    for row in rows:
        got.setdefault(row["query"], set()).add(row["positive"][0])
        assert not set(row["positive"][1:]) & set(graded[row["query"]])
    expected = {q: {t for t, g in grades.items() if g >= 2} for q, grades in graded.items()}
    assert got == {q: p for q, p in expected.items() if p}
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["removed"]["judged_relevant"] > 0
