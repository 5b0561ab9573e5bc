"""eval pair-classification, reranking, bitext-mining, summarization, classification and
clustering equal MTEB 2's own evaluators on the same vectors.

Where MTEB's task class can run on precomputed vectors, the test runs MTEB's whole task
(`task.evaluate`) with a tiny encoder that looks each text up in a table of vectors (`Lookup`):
pair classification, bitext mining, summarization, classification and clustering. Reranking
goes through MTEB's AbsTaskReranking._process_example (its ids) and calculate_retrieval_scores
(pytrec_eval plus its MRR), the lowest level that takes scores. The deterministic tasks get
float64 vectors on both sides; classification and clustering get the float32 vectors vecpipe
reads (scikit-learn keeps float32, so the dtype is part of the numbers) and, seeded alike, are
equal, not within noise: vecpipe reproduces MTEB's sampling exactly.
"""
import random

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core import task_metrics as tm

TOL = 1e-6


# ---------------------------------------------------------------- helpers

def vectors(array) -> pa.Array:
    array = np.asarray(array, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.ravel()), array.shape[1])


def vector_lists(arrays) -> pa.Array:
    return pa.array([np.asarray(a, np.float32).tolist() for a in arrays],
                    type=pa.list_(pa.list_(pa.float32())))


def write_arrow(path, columns: dict):
    table = pa.table(columns)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def lookup_encoder(table: dict):
    """An MTEB encoder whose vectors are `table[text]` (precomputed), cosine similarity."""
    from mteb.similarity_functions import cos_sim, pairwise_cos_sim

    class Lookup:
        def encode(self, inputs, **kwargs):
            return np.stack([table[text] for batch in inputs for text in batch["text"]])

        def similarity(self, a, b):
            return cos_sim(a, b)

        def similarity_pairwise(self, a, b):
            return pairwise_cos_sim(a, b)

        @property
        def mteb_model_meta(self):
            return None

    return Lookup()


def run_task(task, table: dict) -> dict:
    return task.evaluate(lookup_encoder(table), split="test",
                         encode_kwargs={"batch_size": 16})["default"]


def with_data(base, dataset, seed=42, **attributes):
    """An MTEB mock task (seeded as MTEB seeds it) whose data is `dataset` (a DatasetDict)."""
    def load_data(self, **kwargs):
        self.dataset = dataset
        self.data_loaded = True

    return type("Task", (base,), {"load_data": load_data, **attributes})(seed=seed)


@pytest.fixture
def mteb():
    return pytest.importorskip("mteb")


def one_record(result):
    assert result.exit_code == 0, result
    records = result.records()
    assert len(records) == 1 and result.stdout.count("\n") == 1  # one JSON line on a pipe
    return records[0]


# ---------------------------------------------------------------- pair classification

def pair_data(seed=0, n=60, dim=8):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    b = (a * labels[:, None] + rng.normal(scale=1.2, size=(n, dim))).astype(np.float32)
    b[5], a[5], labels[5] = b[4], a[4], 1 - labels[4]  # a tied score with the other label
    a[7] = 0.0  # a zero vector: cosine as sklearn's paired distance has it
    return a, b, labels


def mteb_pair_classification(a, b, labels):
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.pair_classification import MockPairClassificationTask

    n = len(labels)
    data = DatasetDict({"test": Dataset.from_dict({
        "sentence1": [f"a{i}" for i in range(n)], "sentence2": [f"b{i}" for i in range(n)],
        "labels": [int(x) for x in labels]})})
    table = {f"a{i}": a[i].astype(np.float64) for i in range(n)}
    table |= {f"b{i}": b[i].astype(np.float64) for i in range(n)}
    return run_task(with_data(MockPairClassificationTask, data), table)


def test_pair_classification_equals_mteb(cli, tmp_path, mteb):
    a, b, labels = pair_data()
    path = write_arrow(tmp_path / "pairs.arrow", {"e1": vectors(a), "e2": vectors(b),
                                                  "same": labels})
    record = one_record(cli("eval", "pair-classification", path, "--pair", "e1,e2",
                            "--label", "same"))
    ref = mteb_pair_classification(a, b, labels)
    for name in tm.PAIR_SIMILARITIES:
        for metric in tm.PAIR_METRICS:
            assert record[f"{name}_{metric}"] == pytest.approx(ref[f"{name}_{metric}"],
                                                               abs=TOL), (name, metric)
    for metric in tm.PAIR_METRICS:
        # MTEB's max_ also takes the model's own similarity ("similarity_"), cosine for these
        # models: equal to cosine_ but on a zero vector (torch's cosine 0, sklearn's 0.5)
        ours = max(ref[f"{name}_{metric}"] for name in tm.PAIR_SIMILARITIES)
        assert record[f"max_{metric}"] == pytest.approx(ours, abs=TOL)
    assert record["main_score"] == record["max_ap"] and record["pairs"] == 60


def test_pair_classification_embeds_text_fields(cli, tmp_path, write_jsonl, mteb):
    from vecpipe.cli.models import load_model

    rng = random.Random(3)
    words = ["cat", "dog", "sun", "rain", "tree", "car", "sea", "hill"]
    rows = [{"sentence1": " ".join(rng.choices(words, k=3)),
             "sentence2": " ".join(rng.choices(words, k=3)), "labels": i % 2}
            for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    record = one_record(cli("eval", "pair-classification", path, "-m", "fake:16"))
    fake = load_model("fake:16")
    a = fake.encode([r["sentence1"] for r in rows], 32, "", normalize=False)
    b = fake.encode([r["sentence2"] for r in rows], 32, "", normalize=False)
    ref = mteb_pair_classification(a, b, [r["labels"] for r in rows])
    for key in ("cosine_ap", "dot_f1", "euclidean_accuracy", "manhattan_recall", "max_ap"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    assert record["model"] == "fake:16"


def test_pair_classification_errors(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", [{"sentence1": [1.0, 0.0], "sentence2": [0.0, 1.0],
                                               "labels": 1},
                                              {"sentence1": [1.0, 0.0], "sentence2": [1.0, 1.0],
                                               "labels": 2}])
    r = cli("eval", "pair-classification", path)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("vecpipe eval pair-classification: error: field 'labels' holds 2")
    assert f"({path}:2)" in r.stderr
    r = cli("eval", "pair-classification", path, "--label", "gold")
    assert r.exit_code == 1 and r.stdout == "" and len(r.stderr.splitlines()) <= 2
    assert "no field 'gold'" in r.stderr and str(path) in r.stderr.splitlines()[0]
    r = cli("eval", "pair-classification", path, "--fail-under", "nosuch=1")
    assert r.exit_code == 2 and r.stdout == ""


def test_pair_classification_fail_under(cli, tmp_path):
    a, b, labels = pair_data()
    path = write_arrow(tmp_path / "pairs.arrow", {"sentence1": vectors(a),
                                                  "sentence2": vectors(b), "labels": labels})
    ok = cli("eval", "pair-classification", path, "--fail-under", "max_ap=0.1")
    assert ok.exit_code == 0, ok
    low = cli("eval", "pair-classification", path, "--fail-under", "max_ap=0.999")
    assert low.exit_code == 1 and len(low.records()) == 1  # the report first, then the failure
    assert "below --fail-under: max_ap = " in low.stderr


# ---------------------------------------------------------------- reranking

def rerank_data(seed=1, queries=12, dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(queries, dim)).astype(np.float32)
    positives = [(q[i] + rng.normal(scale=1.5, size=(rng.integers(1, 4), dim)))
                 .astype(np.float32) for i in range(queries)]
    negatives = [rng.normal(size=(rng.integers(2, 7), dim)).astype(np.float32)
                 for _ in range(queries)]
    negatives[3] = negatives[3][:0]  # no negative: left out, as MTEB filters it
    positives[7] = np.concatenate([positives[7], negatives[7][:1]])  # a tie across the labels
    return q, positives, negatives


def mteb_reranking(q, positives, negatives):
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores
    from mteb.abstasks.text.reranking import AbsTaskReranking
    from mteb.similarity_functions import cos_sim

    kept = [i for i in range(len(q)) if len(positives[i]) and len(negatives[i])]
    results, qrels = {}, {}
    for idx, i in enumerate(kept):
        example = AbsTaskReranking._process_example(
            None, {"query": i, "positive": list(range(len(positives[i]))),
                   "negative": list(range(len(negatives[i])))}, "test", idx)
        docs = np.concatenate([positives[i], negatives[i]]).astype(np.float64)
        scores = cos_sim(q[i].astype(np.float64), docs)[0].tolist()
        results[example["query_id"]] = dict(zip(example["doc_ids"], scores))
        qrels[example["query_id"]] = dict(zip(example["doc_ids"], example["relevance_scores"]))
    return calculate_retrieval_scores(results, qrels, list(tm.RERANK_KS)), len(kept)


def test_reranking_equals_mteb(cli, tmp_path, mteb):
    q, positives, negatives = rerank_data()
    path = write_arrow(tmp_path / "rerank.arrow", {
        "query": vectors(q), "positive": vector_lists(positives),
        "negative": vector_lists(negatives)})
    record = one_record(cli("eval", "reranking", path))
    ref, kept = mteb_reranking(q, positives, negatives)
    assert record["queries"] == kept == 11 and record["left_out"] == 1
    per_query = ref.all_scores  # pytrec_eval's, before MTEB rounds the means to 5 digits
    for k in tm.RERANK_KS:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"),
                             ("precision", "P")):
            mean = np.mean([scores[f"{theirs}_{k}"] for scores in per_query.values()])
            assert record[f"{ours}_at_{k}"] == pytest.approx(mean, abs=1e-12)
        assert record[f"mrr_at_{k}"] == pytest.approx(ref.mrr[f"MRR@{k}"], abs=1e-12)
    assert record["ndcg_at_10"] == pytest.approx(ref.ndcg["NDCG@10"], abs=5e-6)  # rounded
    assert record["main_score"] == record["map_at_1000"]
    assert record["map_at_1000"] == pytest.approx(ref.map["MAP@1000"], abs=5e-6)


def test_reranking_embeds_text_and_fails_under(cli, tmp_path, write_jsonl, mteb):
    from vecpipe.cli.models import load_model

    rows = [{"query": f"question {i}", "positive": [f"answer {i}", f"reply {i}"],
             "negative": [f"other {j}" for j in range(i % 3 + 1)]} for i in range(8)]
    path = write_jsonl(tmp_path / "rerank.jsonl", rows)
    r = cli("eval", "reranking", path, "-m", "fake:16", "--fail-under", "map@1000=0.999")
    assert r.exit_code == 1 and "below --fail-under: map_at_1000" in r.stderr
    record = r.records()[0]
    fake = load_model("fake:16")
    q = fake.encode([row["query"] for row in rows], 32, "", normalize=False)
    pos = [fake.encode(row["positive"], 32, "", normalize=False) for row in rows]
    neg = [fake.encode(row["negative"], 32, "", normalize=False) for row in rows]
    ref, _ = mteb_reranking(q, pos, neg)
    assert record["mrr_at_10"] == pytest.approx(ref.mrr["MRR@10"], abs=TOL)
    assert record["map_at_1000"] == pytest.approx(ref.map["MAP@1000"], abs=5e-6)
    r = cli("eval", "reranking", path, "--triple", "query,positives,negative", "-m", "fake:8")
    assert r.exit_code == 1 and "no field 'positives'" in r.stderr and str(path) in r.stderr


@pytest.mark.slow
def test_reranking_with_the_bundled_model_equals_mteb_on_sentence_transformers(
        cli, tmp_path, write_jsonl, bundled_model, mteb):
    rows = [{"query": "How do I install a package with pip?",
             "positive": ["Run pip install followed by the package name."],
             "negative": ["The weather is sunny today.", "Bake the bread for an hour.",
                          "pip is a small seed of a fruit."]},
            {"query": "What do cats eat?",
             "positive": ["Cats are carnivores and eat meat.", "Cat food is mostly fish."],
             "negative": ["Dogs like to chase balls.", "Install Python from its website."]}]
    path = write_jsonl(tmp_path / "rerank.jsonl", rows)
    record = one_record(cli("eval", "reranking", path))
    st = bundled_model  # sentence-transformers itself, as MTEB would run it
    ref, _ = mteb_reranking(st.encode([r["query"] for r in rows]),
                            [st.encode(r["positive"]) for r in rows],
                            [st.encode(r["negative"]) for r in rows])
    assert record["mrr_at_10"] == pytest.approx(ref.mrr["MRR@10"], abs=TOL)
    assert record["map_at_1000"] == pytest.approx(ref.map["MAP@1000"], abs=5e-6)
    assert record["model"] == "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------- bitext mining

def test_bitext_mining_equals_mteb(cli, tmp_path, mteb):
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.bitext_mining import MockBitextMiningTask

    rng = np.random.default_rng(2)
    n = 50
    a = rng.normal(size=(n, 8)).astype(np.float32)
    b = (a + rng.normal(scale=1.1, size=(n, 8))).astype(np.float32)
    b[10] = b[11]  # two rows alike: one must miss
    path = write_arrow(tmp_path / "bitext.arrow", {"sentence1": vectors(a),
                                                   "sentence2": vectors(b)})
    record = one_record(cli("eval", "bitext-mining", path))
    data = DatasetDict({"test": Dataset.from_dict({
        "sentence1": [f"a{i}" for i in range(n)], "sentence2": [f"b{i}" for i in range(n)]})})
    table = {f"a{i}": a[i].astype(np.float64) for i in range(n)}
    table |= {f"b{i}": b[i].astype(np.float64) for i in range(n)}
    ref = run_task(with_data(MockBitextMiningTask, data), table)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    assert 0 < record["accuracy"] < 1 and record["pairs"] == n
    assert record["main_score"] == record["f1"]  # MTEB's bitext tasks (its mock uses accuracy)


def test_bitext_mining_fail_under_and_bad_field(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "b.jsonl", [{"de": f"satz {i}", "en": f"sentence {i}"}
                                              for i in range(5)])
    r = cli("eval", "bitext-mining", path, "--pair", "de,en", "-m", "fake:8",
            "--fail-under", "f1=1.01")
    assert r.exit_code == 1 and len(r.records()) == 1 and "below --fail-under" in r.stderr
    r = cli("eval", "bitext-mining", path, "-m", "fake:8")
    assert r.exit_code == 1 and r.stdout == ""
    assert f"no field 'sentence1'; fields are de, en ({path})" in r.stderr


# ---------------------------------------------------------------- summarization

def test_summarization_equals_mteb(cli, tmp_path, mteb):
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.summarization import MockSummarizationTask

    rng = np.random.default_rng(3)
    texts, dim = 9, 8
    humans = [rng.normal(size=(rng.integers(1, 4), dim)).astype(np.float32)
              for _ in range(texts)]
    machines = [(humans[i][:1] + rng.normal(scale=1.0, size=(rng.integers(3, 7), dim)))
                .astype(np.float32) for i in range(texts)]
    gold = [np.round(rng.random(len(m)) * 4) / 4 for m in machines]  # ties in the gold
    gold[2] = np.full(len(machines[2]), 0.5)  # all equal: left out
    path = write_arrow(tmp_path / "summ.arrow", {
        "machine_summaries": vector_lists(machines), "human_summaries": vector_lists(humans),
        "relevance": pa.array([g.tolist() for g in gold])})
    record = one_record(cli("eval", "summarization", path))
    table = {}
    for i in range(texts):
        table |= {f"h{i}_{j}": v.astype(np.float64) for j, v in enumerate(humans[i])}
        table |= {f"m{i}_{j}": v.astype(np.float64) for j, v in enumerate(machines[i])}
    data = DatasetDict({"test": Dataset.from_dict({
        "text": [f"t{i}" for i in range(texts)],
        "human_summaries": [[f"h{i}_{j}" for j in range(len(humans[i]))] for i in range(texts)],
        "machine_summaries": [[f"m{i}_{j}" for j in range(len(machines[i]))]
                              for i in range(texts)],
        "relevance": [g.tolist() for g in gold]})})
    ref = run_task(with_data(MockSummarizationTask, data), table)
    for key in ("cosine_spearman", "cosine_pearson", "dot_spearman", "dot_pearson",
                "main_score"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    assert record["texts"] == texts - 1 and record["left_out"] == 1


def test_summarization_errors(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"machine_summaries": ["a", "b"], "human_summaries": ["h"], "relevance": [1, 2]},
        {"machine_summaries": ["a", "b"], "human_summaries": ["h"], "relevance": [1]}])
    r = cli("eval", "summarization", path, "-m", "fake:8")
    assert r.exit_code == 1 and "2 machine summaries but 1 scores" in r.stderr
    assert f"({path}:2)" in r.stderr


# ---------------------------------------------------------------- classification

def blobs(seed, n, classes, dim=8, scale=2.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=scale, size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def mteb_classification(train_x, train_y, test_x, test_y, **attributes):
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.classification import MockClassificationTask

    data = DatasetDict({
        "train": Dataset.from_dict({"text": [f"tr{i}" for i in range(len(train_y))],
                                    "label": [int(y) for y in train_y]}),
        "test": Dataset.from_dict({"text": [f"te{i}" for i in range(len(test_y))],
                                   "label": [int(y) for y in test_y]})})
    table = {f"tr{i}": train_x[i] for i in range(len(train_y))}
    table |= {f"te{i}": test_x[i] for i in range(len(test_y))}
    return run_task(with_data(MockClassificationTask, data, **attributes), table)


@pytest.mark.parametrize("classes", [3, 2])
def test_classification_equals_mteb(cli, tmp_path, mteb, classes):
    pytest.importorskip("sklearn")
    train_x, train_y = blobs(4, 120, classes, scale=0.7)
    test_x, test_y = blobs(5, 60, classes, scale=0.7)
    train = write_arrow(tmp_path / "train.arrow", {"embedding": vectors(train_x),
                                                   "label": train_y})
    test = write_arrow(tmp_path / "test.arrow", {"embedding": vectors(test_x), "label": test_y})
    record = one_record(cli("eval", "classification", test, "--train", train, "--vector-field",
                            "embedding", "--samples-per-label", "6", "--experiments", "4"))
    ref = mteb_classification(train_x, train_y, test_x, test_y, samples_per_label=6,
                              n_experiments=4)
    for key in ("accuracy", "f1", "f1_weighted", "precision", "precision_weighted", "recall",
                "recall_weighted", "main_score"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    if classes == 2:
        assert record["ap"] == pytest.approx(ref["ap"], abs=TOL)
        assert record["ap_weighted"] == pytest.approx(ref["ap_weighted"], abs=TOL)
    else:
        assert record["ap"] is None and np.isnan(ref["ap"])
    assert record["train"] == 120 and record["test"] == 60 and record["experiments"] == 4
    assert 0.3 < record["accuracy"] < 1  # a task that is neither trivial nor hopeless


def test_classification_split_field_text_and_seed(cli, tmp_path, write_jsonl, mteb):
    pytest.importorskip("sklearn")
    from vecpipe.cli.models import load_model

    rng = random.Random(5)
    topics = {"sport": ["goal", "match", "team"], "food": ["bread", "soup", "salt"],
              "tech": ["chip", "code", "disk"]}
    rows = [{"text": " ".join(rng.choices(words, k=2) + rng.choices(sum(topics.values(), []))),
             "label": topic, "split": "train" if i % 3 else "test"}
            for i, (topic, words) in enumerate(rng.choices(list(topics.items()), k=90))]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    args = ("eval", "classification", path, "--split-field", "split", "-m", "fake:16",
            "--samples-per-label", "5", "--experiments", "3")
    record = one_record(cli(*args))
    fake = load_model("fake:16")
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    names = sorted(topics)
    ref = mteb_classification(fake.encode([r["text"] for r in train], 32, "", normalize=False),
                              [names.index(r["label"]) for r in train],
                              fake.encode([r["text"] for r in test], 32, "", normalize=False),
                              [names.index(r["label"]) for r in test],
                              samples_per_label=5, n_experiments=3)
    assert record["accuracy"] == pytest.approx(ref["accuracy"], abs=TOL)
    assert record["f1"] == pytest.approx(ref["f1"], abs=TOL)
    other = one_record(cli(*args, "--seed", "7"))
    assert other["accuracy"] != record["accuracy"] or other["f1"] != record["f1"]


def test_classification_usage_and_missing_sklearn(cli, tmp_path, write_jsonl, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t {i}", "label": i % 2,
                                               "split": "train" if i % 2 else "test"}
                                              for i in range(20)])
    r = cli("eval", "classification", path, "-m", "fake:8")  # neither --train nor a split
    assert r.exit_code == 2 and r.stdout == ""
    r = cli("eval", "classification", "--train", "-", "-m", "fake:8")  # stdin twice
    assert r.exit_code == 2 and "stdin (-) can be read only once" in r.stderr
    r = cli("eval", "classification", path, "--split-field", "part", "-m", "fake:8")
    assert r.exit_code == 1 and "no field 'part'" in r.stderr and str(path) in r.stderr
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    r = cli("eval", "classification", path, "--split-field", "split", "-m", "fake:8")
    assert r.exit_code != 0 and r.stdout == ""
    assert "pip install 'vecpipe[eval]'" in r.stderr


def test_multilabel_classification_equals_mteb(cli, tmp_path, mteb):
    pytest.importorskip("sklearn")
    from datasets import Dataset, DatasetDict
    from mteb.mocks.mock_tasks.classification import MockMultilabelClassification

    rng = np.random.default_rng(10)
    centres = rng.normal(scale=1.5, size=(4, 8))

    def draw(n):
        sets = [sorted(set(rng.choice(4, size=rng.integers(1, 3)).tolist())) for _ in range(n)]
        x = np.stack([centres[s].sum(0) for s in sets]) + rng.normal(size=(n, 8))
        return x.astype(np.float32), sets
    train_x, train_y = draw(100)
    test_x, test_y = draw(50)
    test_y[3] = [9]  # a label the training set lacks
    train = write_arrow(tmp_path / "train.arrow", {"embedding": vectors(train_x),
                                                   "label": train_y})
    test = write_arrow(tmp_path / "test.arrow", {"embedding": vectors(test_x), "label": test_y})
    record = one_record(cli("eval", "classification", test, "--train", train, "--vector-field",
                            "embedding", "--samples-per-label", "6", "--experiments", "3",
                            "--seed", "5"))
    data = DatasetDict({
        "train": Dataset.from_dict({"text": [f"tr{i}" for i in range(100)], "label": train_y}),
        "test": Dataset.from_dict({"text": [f"te{i}" for i in range(50)], "label": test_y})})
    table = {f"tr{i}": train_x[i] for i in range(100)} | {f"te{i}": test_x[i] for i in range(50)}
    ref = run_task(with_data(MockMultilabelClassification, data, seed=5, samples_per_label=6,
                             n_experiments=3), table)
    assert record["multilabel"] is True and record["labels"] == 5
    for key in ("accuracy", "lrap", "f1", "hamming"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    assert record["main_score"] == record["accuracy"]


def test_classification_errors_name_the_input_record(cli, tmp_path, write_jsonl):
    pytest.importorskip("sklearn")
    rows = [{"embedding": [1.0, 0.0], "label": i % 2, "split": "test" if i < 4 else "train"}
            for i in range(12)]
    rows[6]["embedding"] = [1.0]  # the 7th record: the 3rd training one
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    r = cli("eval", "classification", path, "--split-field", "split", "--vector-field",
            "embedding")
    assert r.exit_code == 1 and r.stdout == "" and f"({path}:7)" in r.stderr, r


# ---------------------------------------------------------------- clustering

def mteb_clustering(x, labels, **attributes):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.mocks.mock_tasks.clustering import LegacyMockClusteringFastTask

    assert issubclass(LegacyMockClusteringFastTask, AbsTaskClustering)  # the fast protocol
    data = DatasetDict({"test": Dataset.from_dict({
        "sentences": [f"s{i}" for i in range(len(labels))], "labels": labels})})
    table = {f"s{i}": x[i] for i in range(len(labels))}
    return run_task(with_data(LegacyMockClusteringFastTask, data, **attributes), table)


def test_clustering_equals_mteb(cli, tmp_path, mteb):
    pytest.importorskip("sklearn")
    x, labels = blobs(6, 150, 4, scale=1.0)
    path = write_arrow(tmp_path / "c.arrow", {"embedding": vectors(x), "labels": labels})
    record = one_record(cli("eval", "clustering", path, "--vector-field", "embedding",
                            "--experiments", "5", "--bootstrap-size", "80",
                            "--max-documents", "120"))
    ref = mteb_clustering(x, [int(v) for v in labels], n_clusters=5,
                          max_documents_per_cluster=80, max_document_to_embed=120,
                          max_fraction_of_documents_to_embed=None, k_mean_batch_size=512)
    for key in ("v_measure", "v_measure_std", "ami", "ami_std", "main_score"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    assert record["documents"] == 120 and record["clusters"] == 4
    assert 0.2 < record["v_measure"] < 1


def test_clustering_hierarchical_labels_equal_mteb(cli, tmp_path, write_jsonl, mteb):
    pytest.importorskip("sklearn")
    x, labels = blobs(7, 90, 6, scale=1.5)
    # integer labels: MTEB marks a missing level -1 and leaves it out; with text labels its
    # numpy array turns that -1 into the text "-1", a cluster of its own (vecpipe leaves the
    # record out of the level whatever the labels are)
    levels = [[v // 3, 10 + v] if i % 5 else [v // 3] for i, v in enumerate(labels.tolist())]
    path = write_jsonl(tmp_path / "c.jsonl", [{"embedding": v.tolist(), "labels": lv}
                                              for v, lv in zip(x, levels)])
    record = one_record(cli("eval", "clustering", path, "--vector-field", "embedding",
                            "--experiments", "3", "--bootstrap-size", "60", "--seed", "3"))
    ref = mteb_clustering(x, levels, n_clusters=3, max_documents_per_cluster=60,
                          max_document_to_embed=None, max_fraction_of_documents_to_embed=None,
                          seed=3)
    assert record["levels"] == 2
    for key in ("v_measure", "v_measure_std", "ami"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key


def test_legacy_clustering_equals_mteb(cli, tmp_path, mteb):
    pytest.importorskip("sklearn")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
    from mteb.mocks.mock_tasks.clustering import MockClusteringTask

    assert issubclass(MockClusteringTask, AbsTaskClusteringLegacy)
    sets = [blobs(11 + i, n, k, scale=1.2) for i, (n, k) in enumerate([(60, 3), (45, 5),
                                                                       (30, 2)])]
    sets.append((sets[2][0][:10], np.zeros(10, dtype=np.int64)))  # one label: V-measure 1
    path = write_arrow(tmp_path / "sets.arrow", {
        "sentences": vector_lists([x for x, _ in sets]),
        "labels": pa.array([y.tolist() for _, y in sets])})
    record = one_record(cli("eval", "clustering", path, "--legacy", "--vector-field",
                            "sentences"))
    table = {f"s{i}_{j}": x[j] for i, (x, _) in enumerate(sets) for j in range(len(x))}
    data = DatasetDict({"test": Dataset.from_dict({
        "sentences": [[f"s{i}_{j}" for j in range(len(x))] for i, (x, _) in enumerate(sets)],
        "labels": [y.tolist() for _, y in sets]})})
    ref = run_task(with_data(MockClusteringTask, data), table)
    assert record["sets"] == 4 and record["documents"] == 145
    for key in ("v_measure", "v_measure_std", "main_score"):
        assert record[key] == pytest.approx(ref[key], abs=TOL), key
    short = write_arrow(tmp_path / "short.arrow", {
        "sentences": vector_lists([x for x, _ in sets]),
        "labels": pa.array([y.tolist()[:-1] if i == 1 else y.tolist()
                            for i, (_, y) in enumerate(sets)])})
    r = cli("eval", "clustering", short, "--legacy", "--vector-field", "sentences")
    assert r.exit_code == 1 and r.stdout == ""
    assert "'labels' must list one label for each of the 45 items" in r.stderr
    assert f"({short}:2)" in r.stderr


def test_clustering_text_fail_under_and_bad_label(cli, tmp_path, write_jsonl, mteb):
    pytest.importorskip("sklearn")
    from vecpipe.cli.models import load_model

    rows = [{"sentences": f"item {i % 4} number {i}", "labels": i % 4} for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    args = ("eval", "clustering", path, "--text-field", "sentences", "-m", "fake:16",
            "--experiments", "2", "--bootstrap-size", "30")
    record = one_record(cli(*args))
    fake = load_model("fake:16")
    ref = mteb_clustering(fake.encode([r["sentences"] for r in rows], 32, "", normalize=False),
                          [r["labels"] for r in rows], n_clusters=2,
                          max_documents_per_cluster=30, max_document_to_embed=None,
                          max_fraction_of_documents_to_embed=None)
    assert record["v_measure"] == pytest.approx(ref["v_measure"], abs=TOL)
    low = cli(*args, "--fail-under", "v_measure=1.01")
    assert low.exit_code == 1 and "below --fail-under: v_measure" in low.stderr
    r = cli("eval", "clustering", path, "--text-field", "sentences", "--label", "topic",
            "-m", "fake:8")
    assert r.exit_code == 1 and r.stdout == ""
    [line] = [x for x in r.stderr.splitlines() if not x.startswith("hint:")]
    assert line.startswith("vecpipe eval clustering: error: no field 'topic'") and \
        line.endswith(f"({path})")


# ---------------------------------------------------------------- the library directly

def test_average_precision_equals_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    assert tm.average_precision(labels, scores) == pytest.approx(
        sklearn_metrics.average_precision_score(labels, scores), abs=1e-12)


def test_weighted_scores_equal_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(9)
    truth, predicted = rng.integers(0, 12, 300), rng.integers(0, 15, 300)
    ours = tm.weighted_scores(truth, predicted)
    for name in ("precision", "recall", "f1"):
        ref = getattr(sklearn_metrics, f"{name}_score")(truth, predicted, average="weighted",
                                                       zero_division=0)
        assert ours[name] == pytest.approx(ref, abs=1e-12)
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truth, predicted))
