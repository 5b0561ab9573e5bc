"""vecpipe train: the rows of every mine-negatives shape read back, each named loss training a
tiny BERT (hidden 32, 2 layers) a few steps and moving its loss, GISTEmbed's masking on a
hand-built batch, evaluation on a BEIR split with vecpipe's own numbers, resume after a kill,
the recipe's data fingerprint, and the errors for bad input."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpipe.core import training
from vecpipe.core.mining import Mined, shape_batch, shape_schema

REPO = Path(__file__).resolve().parent.parent
TINY_BEIR = REPO / "tests" / "data" / "eval" / "tinybeir"
FAST = ("--device", "cpu", "--batch-size", "4", "--learning-rate", "1e-3", "-q")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, bundled_model_path):
    """A randomly initialised 2-layer BERT with the bundled model's tokenizer (mean pooling,
    normalised): trains a step in milliseconds."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    model = SentenceTransformer(modules=[Transformer(str(folder / "hf"), max_seq_length=64),
                                         Pooling(32, "mean"), Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return str(folder / "st")


TOPICS = ["coffee", "tea", "rivers", "mountains", "violins", "pianos", "comets", "planets"]


def _mined(count=16, negatives=3):
    """Mining outcomes as mine-negatives holds them, with cross-encoder-like scores."""
    return [Mined(query=f"what about {TOPICS[i % 8]} number {i}",
                  positives=[f"{TOPICS[i % 8]} fact {i}: a passage on {TOPICS[i % 8]}"],
                  positive_scores=[0.9],
                  negatives=[f"{TOPICS[(i + j + 1) % 8]} note {i}-{j}" for j in range(negatives)],
                  negative_scores=[0.5 - 0.1 * j for j in range(negatives)])
            for i in range(count)]


def write_rows(path, shape, with_scores=False, mined=None):
    """Rows exactly as mine-negatives writes them (its own schema and row functions)."""
    mined = mined or _mined()
    schema = shape_schema(shape, "query", len(mined[0].negatives), with_scores)
    pq.write_table(pa.Table.from_batches([shape_batch(shape, schema, mined, with_scores)]), path)
    return path


def recipe_of(folder) -> dict:
    return json.loads((Path(folder) / training.RECIPE_FILE).read_text())


def weights_of(folder):
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# ---- reading every shape -------------------------------------------------------------------

def _read(path):
    from vecpipe.formats.readers import RecordStream

    return training.read_training_rows(RecordStream([str(path)]), [str(path)])


@pytest.mark.parametrize("shape", ["triplet", "n-tuple", "labeled-list"])
@pytest.mark.parametrize("with_scores", [False, True])
def test_every_mined_shape_reads_back_as_the_mined_examples(tmp_path, shape, with_scores):
    mined = _mined(count=5)
    data = _read(write_rows(tmp_path / "rows.parquet", shape, with_scores, mined))
    assert data.shape == shape
    assert [(e.anchor, e.positive, e.negatives) for e in data.examples] == [
        (m.query, m.positives[0], m.negatives) for m in mined]
    expected = [[0.9, 0.5, 0.4, 0.3]] * 5 if with_scores else [None] * 5
    assert [e.scores and [round(s, 6) for s in e.scores] for e in data.examples] == expected


def test_labeled_pairs_group_by_query(tmp_path):
    mined = _mined(count=4)
    data = _read(write_rows(tmp_path / "rows.parquet", "labeled-pair", False, mined))
    assert data.shape == "labeled-pair" and data.rows == 4 * 4
    assert [(e.anchor, e.positive, e.negatives) for e in data.examples] == [
        (m.query, m.positives[0], m.negatives) for m in mined]


def test_plain_pairs_have_no_negatives(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q1", "positive": "p1"},
                                                  {"anchor": "ignored", "query": "q2",
                                                   "positive": "p2"}])
    data = _read(path)
    assert data.shape == "pairs" and [(e.anchor, e.positive, e.negatives)
                                      for e in data.examples] == [("q1", "p1", []),
                                                                  ("q2", "p2", [])]


def test_loss_columns_fit_each_loss():
    examples = [training.Example("a1", "p1", ["n1", "m1"], [0.9, 0.2, 0.4]),
                training.Example("a2", "p2", ["n2"], [0.8, 0.1])]
    assert training.loss_columns(examples, "mnrl") == {
        "anchor": ["a1", "a2"], "positive": ["p1", "p2"], "negative_1": ["n1", "n2"]}
    assert training.loss_columns(examples, "gist") == {  # one negative a row
        "anchor": ["a1", "a1", "a2"], "positive": ["p1", "p1", "p2"],
        "negative_1": ["n1", "m1", "n2"]}
    margins = training.loss_columns(examples, "margin-mse")["label"]
    assert margins == pytest.approx([0.7, 0.7])


# ---- every loss trains -----------------------------------------------------------------------

LOSS_RUNS = {
    "mnrl": ("--loss", "mnrl"),
    "cached-mnrl": ("--loss", "cached-mnrl", "--mini-batch-size", "2"),
    "gist": ("--loss", "gist", "--guide", "{tiny}"),
    "cached-gist": ("--loss", "cached-gist", "--guide", "{tiny}", "--relative-margin", "0.05",
                    "--mini-batch-size", "2"),
    "margin-mse": ("--loss", "margin-mse"),
    "matryoshka": ("--loss", "mnrl", "--matryoshka-dims", "32,16,8"),
    "adaptive-layers": ("--loss", "mnrl", "--adaptive-layers"),
    "matryoshka-2d": ("--loss", "mnrl", "--matryoshka-dims", "32,16", "--adaptive-layers"),
}
RECORDED = {"mnrl": ("MultipleNegativesRankingLoss", None),
            "cached-mnrl": ("CachedMultipleNegativesRankingLoss", None),
            "gist": ("GISTEmbedLoss", None), "cached-gist": ("CachedGISTEmbedLoss", None),
            "margin-mse": ("MarginMSELoss", None),
            "matryoshka": ("MultipleNegativesRankingLoss", "MatryoshkaLoss"),
            "adaptive-layers": ("MultipleNegativesRankingLoss", "AdaptiveLayerLoss"),
            "matryoshka-2d": ("MultipleNegativesRankingLoss", "Matryoshka2dLoss")}


def _loss_run_params():
    return [pytest.param(name, marks=() if name == "mnrl" else pytest.mark.slow)
            for name in LOSS_RUNS]


@pytest.mark.parametrize("name", _loss_run_params())
def test_each_loss_trains_a_few_steps_and_moves_the_loss(cli, tmp_path, tiny_model, name):
    rows = write_rows(tmp_path / "rows.parquet", "n-tuple", with_scores=True)
    args = [a.format(tiny=tiny_model) for a in LOSS_RUNS[name]]
    r = cli("train", rows, "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "6",
            *FAST, *args)
    assert r.exit_code == 0, r
    recipe = recipe_of(tmp_path / "model")
    curve = [point["loss"] for point in recipe["loss_curve"]]
    assert recipe["steps"] == 6 and len(curve) >= 3
    assert curve[-1] < curve[0], curve
    recorded_class, modifier = RECORDED[name]
    assert recipe["loss"]["class"] == recorded_class
    assert recipe["loss"].get("modifier") == modifier
    before, after = weights_of(tiny_model), weights_of(tmp_path / "model")
    assert any(abs(after[key] - before[key]).max() > 1e-6 for key in before)
    assert not (tmp_path / "model.partial").exists()


# ---- GISTEmbed's guided masking ------------------------------------------------------------------

def _gist_reference(embed, guide_embed, columns, margin_strategy, margin, temperature):
    """GISTEmbed's loss written out: each similarity matrix (anchor-positive, anchor-anchor,
    positive-positive, anchor-negative) with the candidates the guide rates above the
    threshold (positive's guide score less the margin) set to -inf, the true positives kept;
    cross-entropy on the diagonal. Returns (loss, the masks)."""
    import torch
    import torch.nn.functional as F

    a, p, n = (embed(columns[k]) for k in ("anchor", "positive", "negative_1"))
    ga, gp, gn = (guide_embed(columns[k]) for k in ("anchor", "positive", "negative_1"))
    sim = lambda x, y: F.cosine_similarity(x.unsqueeze(1), y.unsqueeze(0), dim=-1)  # noqa: E731
    guided_positive = sim(ga, gp).diagonal().view(-1, 1)
    if margin_strategy == "absolute":
        threshold = guided_positive - margin
    else:
        threshold = guided_positive - guided_positive.abs() * margin
    masks, blocks = [], []
    for model_sim, guide_sim, keep_diagonal in ((sim(a, p), sim(ga, gp), True),
                                                (sim(a, a), sim(ga, ga), False),
                                                (sim(p, p), sim(gp, gp), False),
                                                (sim(a, n), sim(ga, gn), False)):
        mask = guide_sim > threshold
        if keep_diagonal:
            mask &= ~torch.eye(len(mask), dtype=torch.bool)
        masks.append(mask)
        blocks.append(model_sim.masked_fill(mask, -torch.inf))
    scores = torch.cat(blocks, dim=1) / temperature
    return F.cross_entropy(scores, torch.arange(len(a))), masks


@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("relative", 0.05)])
def test_gist_masks_in_batch_candidates_the_guide_rates_above_the_positive(
        tiny_model, bundled_model_path, strategy, margin):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model, device="cpu").eval()
    guide = SentenceTransformer(bundled_model_path, device="cpu").eval()
    # query 0's negative repeats query 0 itself: the guide rates it far above its positive
    columns = {"anchor": ["how do comets form", "best violin makers",
                          "why do rivers meander"],
               "positive": ["Comets form from ice and dust in the outer solar system.",
                            "Stradivari made the most famous violins.",
                            "Rivers meander as erosion cuts the outer bank."],
               "negative_1": ["how do comets form", "Pianos have 88 keys.",
                              "Mountains rise where plates collide."]}
    spec = training.LossSpec("gist", margin_strategy=strategy, margin=margin)
    loss = training.build_loss(spec, model, guide)
    features = [model.preprocess(columns[k]) for k in ("anchor", "positive", "negative_1")]
    with torch.no_grad():
        value = loss(features, None)

        def embed_with(st):
            return lambda texts: st.encode(texts, convert_to_tensor=True)

        expected, masks = _gist_reference(embed_with(model), embed_with(guide), columns,
                                          strategy, margin, spec.temperature)
        unmasked, _ = _gist_reference(embed_with(model), embed_with(guide), columns,
                                      strategy, -10.0 if strategy == "absolute" else -100.0,
                                      spec.temperature)
    anchor_negative = masks[3]
    assert anchor_negative[0, 0], "the guide should mask query 0's copy of itself"
    assert not anchor_negative[1, 1] and not anchor_negative[2, 2]
    assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert abs(value.item() - unmasked.item()) > 1e-3


# ---- evaluation while training -----------------------------------------------------------------

def _beir_from_mined(folder: Path, mined) -> Path:
    """A BEIR folder whose dev split asks each mined query for its positive."""
    folder.mkdir()
    docs = [(f"p{i}", m.positives[0]) for i, m in enumerate(mined)]
    docs += [(f"n{i}-{j}", text) for i, m in enumerate(mined) for j, text in enumerate(m.negatives)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n"
                                                 for d, t in docs))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": m.query}) + "\n" for i, m in enumerate(mined)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tp{i}\t1\n" for i in range(len(mined))))
    return folder


@pytest.mark.slow
def test_evaluation_keeps_the_best_checkpoint_by_vecpipes_own_metric(cli, tmp_path,
                                                                      tiny_model):
    mined = _mined(count=16)
    rows = write_rows(tmp_path / "rows.parquet", "n-tuple", mined=mined)
    beir = _beir_from_mined(tmp_path / "beir", mined)
    r = cli("train", rows, "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "8",
            "--eval-beir", beir, "--eval-steps", "2", "--eval-metric", "mrr@10", *FAST)
    assert r.exit_code == 0, r
    recipe = recipe_of(tmp_path / "model")
    curve = recipe["eval_curve"]
    assert [point["step"] for point in curve] == [0, 2, 4, 6, 8]  # step 0: the base model
    best = max(curve[1:], key=lambda point: point["mrr_at_10"])
    assert recipe["best"] == {"checkpoint_step": best["step"], "mrr_at_10": best["mrr_at_10"]}
    # the folder holds the best checkpoint, and `eval beir` scores it as training did
    r = cli("eval", "beir", beir, "-m", tmp_path / "model", "--split", "dev",
            "--output-format", "jsonl")
    assert r.exit_code == 0, r
    [report] = r.records()
    assert report["mrr_at_10"] == pytest.approx(best["mrr_at_10"], abs=1e-6)
    assert report["ndcg_at_10"] == pytest.approx(best["ndcg_at_10"], abs=1e-6)


# ---- the recipe and the data fingerprint -------------------------------------------------------

def test_recipe_records_the_data_fingerprint_and_info_shows_it(cli, tmp_path, tiny_model):
    first = write_rows(tmp_path / "a.parquet", "triplet")
    r = cli("train", first, "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "2",
            "--max-length", "16", *FAST)
    assert r.exit_code == 0, r
    recipe = recipe_of(tmp_path / "model")
    assert recipe["hyperparameters"]["max_length"] == 16  # trained on 16 tokens; saved with 64
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(tmp_path / "model"), device="cpu").max_seq_length == 64
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert recipe["data"]["sha256"] == digest
    assert recipe["data"]["files"] == [{"path": str(first), "bytes": first.stat().st_size,
                                        "sha256": digest}]
    assert recipe["data"]["shape"] == "triplet"
    assert recipe["base_model"]["sha256"].startswith("sha256:")
    assert recipe["hyperparameters"]["max_steps"] == 2 and recipe["vecpipe_version"]
    info = cli("info", tmp_path / "model", "--output-format", "json")
    assert info.exit_code == 0, info
    [facts] = json.loads(info.stdout)
    assert facts["kind"] == "model" and facts["recipe"] == recipe

    changed = write_rows(tmp_path / "b.parquet", "triplet", mined=_mined(count=15))
    r = cli("train", changed, "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "2",
            *FAST)
    assert r.exit_code == 0, r  # an earlier trained model is replaced
    assert recipe_of(tmp_path / "model")["data"]["sha256"] == \
        hashlib.sha256(changed.read_bytes()).hexdigest() != digest


def test_stdin_is_fingerprinted_too(cli, tmp_path, tiny_model):
    rows = b"".join(json.dumps({"query": f"q {i}", "positive": f"p {i}"}).encode() + b"\n"
                    for i in range(8))
    r = cli("train", "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "1", *FAST,
            input=rows)
    assert r.exit_code == 0, r
    data = recipe_of(tmp_path / "model")["data"]
    assert data["files"][0]["path"] == "<stdin>"
    assert data["sha256"] == hashlib.sha256(rows).hexdigest()


@pytest.mark.slow
def test_a_quiet_run_leaves_stderr_empty_in_a_real_process(tmp_path, tiny_model):
    """Libraries' warnings (the DataLoader's pin_memory on a CPU) reach a real stderr, which
    the in-process runner does not show."""
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    done = subprocess.run([sys.executable, "-m", "vecpipe.cli", "train", str(rows), "-o",
                           str(tmp_path / "model"), "-m", tiny_model, "--max-steps", "2",
                           *FAST[2:]],  # the device left to choose: pin_memory's case
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


# ---- resume after a kill ---------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_checkpoint(tmp_path, tiny_model, cli):
    rows = write_rows(tmp_path / "rows.parquet", "n-tuple", mined=_mined(count=64))
    out = tmp_path / "model"
    command = [sys.executable, "-m", "vecpipe.cli", "train", str(rows), "-o", str(out), "-m",
               tiny_model, "--max-steps", "120", "--save-steps", "40", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = Path(str(out) + training.WORK_SUFFIX)
    deadline = time.monotonic() + 120
    while training.last_checkpoint(str(work)) is None and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not out.exists()  # the output appears only when finished
    reached = int(training.last_checkpoint(str(work)).rsplit("-", 1)[1])
    assert 40 <= reached < 120

    again = cli(*command[3:])  # without --resume: the leftover is not silently discarded
    assert again.exit_code == 1 and "interrupted training run" in again.stderr
    assert "--resume" in again.stderr

    resumed = cli(*command[3:], "--resume")
    assert resumed.exit_code == 0, resumed
    recipe = recipe_of(out)
    assert recipe["steps"] == 120
    assert recipe["resumed_from_step"] >= reached
    assert recipe["first_step_this_run"] == recipe["resumed_from_step"] + 1
    assert not work.exists()


def test_resume_refuses_a_different_job(cli, tmp_path, tiny_model):
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    out = tmp_path / "model"
    work = Path(str(out) + training.WORK_SUFFIX)
    work.mkdir()
    (work / training.JOB_FILE).write_text(json.dumps({"data": "0" * 64}))
    r = cli("train", rows, "-o", out, "-m", tiny_model, "--max-steps", "1", "--resume", *FAST)
    assert r.exit_code == 1 and "differs in data" in r.stderr, r


# ---- bad input and bad options -------------------------------------------------------------------

def test_a_bad_record_is_named_by_file_and_record(cli, tmp_path, write_jsonl, tiny_model):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"query": "q1", "positive": "p1", "negative": "n1"},
        {"query": "q2", "positive": "", "negative": "n2"}])
    r = cli("train", path, "-o", tmp_path / "model", "-m", tiny_model, *FAST)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"vecpipe train: error: `positive` must be a non-empty text ({path}:2)"]
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


def test_rows_without_a_positive_are_refused(cli, tmp_path, write_jsonl, tiny_model):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"query": "q1", "text": "t"}])
    r = cli("train", path, "-o", tmp_path / "model", "-m", tiny_model, *FAST)
    assert r.exit_code == 1 and "need a `query` (or `anchor`) and a `positive`" in r.stderr


@pytest.mark.parametrize("args,words", [
    (("--loss", "margin-mse"), "--loss: margin-mse distils scores"),
    (("--loss", "gist"), "--loss gist needs --guide"),
    (("--guide", "default"), "--guide applies to --loss gist"),
    (("--relative-margin", "0.1"), "apply to the gist losses"),
    (("--loss", "cached-mnrl", "--adaptive-layers"), "--adaptive-layers: adaptive layers do "
                                                    "not work with cached-mnrl"),
    (("--matryoshka-dims", "64,x"), "--matryoshka-dims '64,x'"),
    (("--matryoshka-dims", "64"), "--matryoshka-dims: a Matryoshka dimension exceeds"),
    (("--loss", "nope"), "--loss: unknown loss 'nope'"),
    (("--device", "cuda:1"), "--device cuda:1"),
    (("--eval-metric", "nope@x", "--eval-beir", str(TINY_BEIR)), "bad metric"),
    (("--precision", "float16"), "--precision: float16 mixed precision needs a GPU"),
])
def test_usage_errors_name_the_option(cli, tmp_path, tiny_model, args, words):
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    r = cli("train", rows, "-o", tmp_path / "model", "-m", tiny_model, "--max-steps", "1",
            *FAST, *args)
    assert r.exit_code == 2 and r.stdout == "", r
    assert words in r.stderr.splitlines()[0], r.stderr


def test_a_folder_of_other_data_is_not_replaced(cli, tmp_path, tiny_model):
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    r = cli("train", rows, "-o", tmp_path / "model", "-m", tiny_model, *FAST)
    assert r.exit_code == 2 and "refusing to replace it" in r.stderr
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


def test_a_fake_model_cannot_be_trained(cli, tmp_path):
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    r = cli("train", rows, "-o", tmp_path / "model", "-m", "fake:8", *FAST)
    assert r.exit_code == 2 and "fake:8 is a fake model" in r.stderr


def test_missing_trainer_packages_name_the_extra(cli, tmp_path, tiny_model, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    rows = write_rows(tmp_path / "rows.parquet", "triplet")
    r = cli("train", rows, "-o", tmp_path / "model", "-m", tiny_model, *FAST)
    assert r.exit_code == 2 and "needs accelerate" in r.stderr and "vecpipe[train]" in r.stderr
    assert not (tmp_path / "model").exists()
