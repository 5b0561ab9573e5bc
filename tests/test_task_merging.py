"""merge --models --base: task arithmetic, TIES and DARE on task vectors, and --search-weights
(Self Positioning's weight search, on a grid). Checked against numpy written here from the
papers (TIES: Yadav et al. 2023; DARE: Yu et al. 2023), against pytrec_eval for the probe
metric, and against sentence-transformers' own encode."""
import copy
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vecpipe.core import model_soup

TINYBEIR = Path(__file__).parent / "data" / "eval" / "tinybeir"


def numpy_ties(base, tensors, weights, density):
    """TIES as its paper states it: keep each task vector's top `density` entries by
    magnitude, elect the sign of the summed trimmed vectors (+ on 0), average the weighted
    entries that carry the elected sign."""
    return numpy_ties_and_ties(base, tensors, weights, density)[0]


def numpy_ties_and_ties(base, tensors, weights, density):
    """numpy_ties, and where a magnitude tie at a task vector's cut leaves the kept entry to
    the implementation (float32 weights do tie)."""
    taus, tied = [], np.zeros(base.shape, dtype=bool)
    for tensor in tensors:
        tau = tensor.astype(np.float64) - base
        keep = int(density * tau.size)
        magnitudes = np.abs(tau.ravel())
        order = np.argsort(-magnitudes, kind="stable")
        flat = np.zeros(tau.size)
        flat[order[:keep]] = tau.ravel()[order[:keep]]
        if 0 < keep < tau.size and magnitudes[order[keep]] == magnitudes[order[keep - 1]]:
            tied |= np.abs(tau) == magnitudes[order[keep - 1]]
        taus.append(flat.reshape(tau.shape))
    taus = np.stack(taus)
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(taus) == elected
    weighted = taus * np.asarray(weights, dtype=np.float64).reshape(-1, *[1] * base.ndim)
    total = np.where(agrees, weighted, 0).sum(axis=0)
    return base + total / np.maximum(agrees.sum(axis=0), 1), tied


def random_models(shape=(16, 24), count=2, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    return base, [base + rng.standard_normal(shape) for _ in range(count)]


def test_task_arithmetic_is_base_plus_weighted_task_vectors():
    base, (a, b) = random_models()
    merged = model_soup.task_vector_merge(base, [a, b], [0.3, 1.2])
    assert np.allclose(merged, base + 0.3 * (a - base) + 1.2 * (b - base), atol=1e-12)
    assert np.allclose(model_soup.task_vector_merge(base, [a, b], [0, 1]), b, atol=1e-12)
    assert np.array_equal(model_soup.task_vector_merge(base, [a, b], [0, 0]), base)
    assert model_soup.task_vector_merge(base.astype(np.float32), [a, b], [1, 0]).dtype \
        == np.float32


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.4)])
def test_ties_against_numpy(density, weights):
    base, tensors = random_models(count=3, seed=1)
    merged = model_soup.task_vector_merge(base, tensors, [*weights, 0.5], "ties", density)
    assert np.allclose(merged, numpy_ties(base, tensors, [*weights, 0.5], density), atol=1e-12)


def test_ties_keeps_only_the_largest_entries_of_one_model():
    base, (a,) = random_models(count=1, seed=2)
    merged = model_soup.task_vector_merge(base, [a], [1.0], "ties", 0.25)
    changed = merged != base
    assert changed.sum() == int(0.25 * base.size)
    assert np.abs(a - base)[changed].min() >= np.abs(a - base)[~changed].max()


def test_dare_drops_and_rescales_seeded():
    import torch

    base, (a, b) = random_models(shape=(200, 50), seed=3)
    weights, density = (0.6, 0.3), 0.25
    state = {"w": torch.from_numpy(base), "ids": torch.arange(4)}
    states = [{"w": torch.from_numpy(a), "ids": torch.arange(4) + 9},
              {"w": torch.from_numpy(b), "ids": torch.arange(4) + 7}]
    before = torch.get_rng_state()
    merged = model_soup.task_state(state, states, weights, "dare", density, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator untouched
    assert torch.equal(merged["ids"], state["ids"])  # non-float tensors from the base
    delta = merged["w"].numpy() - base
    ta, tb = weights[0] * (a - base) / density, weights[1] * (b - base) / density
    options = np.stack([np.zeros_like(ta), ta, tb, ta + tb])
    nearest = np.abs(options - delta).min(axis=0)
    assert nearest.max() < 1e-9  # every entry: dropped or kept-and-rescaled, per model
    kept_a = np.isclose(delta, ta) | np.isclose(delta, ta + tb)
    assert abs(kept_a.mean() - density) < 0.02  # 10,000 Bernoulli(0.25) draws: sd 0.004
    again = model_soup.task_state(state, states, weights, "dare", density, seed=5)
    other = model_soup.task_state(state, states, weights, "dare", density, seed=6)
    assert torch.equal(again["w"], merged["w"]) and not torch.equal(other["w"], merged["w"])


def test_grid_and_best_point():
    grid = model_soup.weight_grid([0, 0.5, 1], 2)
    assert grid == list(itertools.product([0, 0.5, 1], repeat=2))
    table = [((0, 0), 0.3), ((0, 1), 0.5), ((1, 0), 0.5), ((1, 1), 0.1)]
    assert model_soup.best_point(table) == (0, 1)  # the first on a tie


def test_probe_split_prefers_dev(tmp_path):
    folder = tmp_path / "probe"
    (folder / "qrels").mkdir(parents=True)
    (folder / "qrels" / "train.tsv").write_text("")
    assert model_soup.probe_split(str(folder)) == "train"
    (folder / "qrels" / "test.tsv").write_text("")
    assert model_soup.probe_split(str(folder)) == "test"
    (folder / "qrels" / "dev.tsv").write_text("")
    assert model_soup.probe_split(str(folder)) == "dev"


@pytest.mark.parametrize("args, message", [
    (["--method", "ties"], "give the models' --base"),
    (["--density", "0.3"], "--density works on task vectors"),
    (["--search-weights"], "--search-weights works on task vectors"),
    (["--base", "default", "--density", "0.3"], "--density applies to --method ties or dare"),
    (["--base", "default", "--method", "ties", "--seed", "1"], "--seed applies to --method"),
    (["--base", "default", "--method", "dare", "--density", "0"], "must be in (0, 1]"),
    (["--base", "default", "--method", "slerp"], "not 'slerp'"),
    (["--base", "default", "--search-weights"], "needs --probe DIR"),
    (["--base", "default", "--probe", "x"], "need --search-weights"),
    (["--base", "default", "--sgd-steps", "2"], "need --search-weights"),
    (["--base", "default", "--method", "ties", "--search-weights", "--probe", "x",
      "--sgd-steps", "2"], "--method linear"),
    (["--base", "default", "--search-weights", "--probe", "x", "--weights", "1"],
     "not both"),
    (["--base", "default", "--search-weights", "--probe", "x", "--weight-grid", "a,b"], "bad --weight-grid"),
])
def test_task_usage_errors(cli, tmp_path, args, message):
    r = cli("merge", "--models", "default", *args, "-o", tmp_path / "soup")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "soup").exists()


def test_task_options_need_models(cli, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "a.jsonl", [{"id": "1"}])
    r = cli("merge", data, "--base", "default")
    assert r.exit_code == 2 and "--base applies only with --models" in r.stderr


# ---- through the CLI, on the bundled model ----------------------------------------------------

def perturb(bundled_model, folder, scale, seed):
    import torch

    st = copy.deepcopy(bundled_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in st.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    st.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, bundled_model):
    """Two stand-in fine-tunes of the bundled model: a mild and a strong perturbation."""
    root = tmp_path_factory.mktemp("tuned")
    return (perturb(bundled_model, root / "mild", 0.01, 1),
            perturb(bundled_model, root / "strong", 0.05, 2))


def float_states(*folders):
    from sentence_transformers import SentenceTransformer

    states = [SentenceTransformer(str(folder), device="cpu").state_dict() for folder in folders]
    return [{k: v.double().numpy() for k, v in s.items() if v.is_floating_point()}
            for s in states]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("linear", []), ("ties", ["--density", "0.3"])])
def test_task_merge_against_numpy_on_state_dicts(cli, tmp_path, bundled_model_path, tuned,
                                                 method, extra):
    out = tmp_path / "soup"
    r = cli("merge", "--models", *tuned, "--base", "default", "--weights", "0.8,0.4",
            "--method", method, *extra, "-o", out)
    assert r.exit_code == 0, r.stderr
    base, a, b, soup = float_states(bundled_model_path, *tuned, out)
    for key in base:
        if method == "linear":
            expected = base[key] + 0.8 * (a[key] - base[key]) + 0.4 * (b[key] - base[key])
            tied = np.zeros(expected.shape, dtype=bool)
        else:
            expected, tied = numpy_ties_and_ties(base[key], [a[key], b[key]], [0.8, 0.4], 0.3)
        assert tied.sum() <= 4, key
        assert np.allclose(soup[key][~tied], expected[~tied], atol=1e-6), key
    recipe = json.loads((out / "vecpipe-merge.json").read_text())
    assert recipe["method"] == method and recipe["weights"] == [0.8, 0.4]
    assert recipe["base"]["name"] and [m["name"] for m in recipe["models"]] == \
        [str(t) for t in tuned]


@pytest.fixture
def probe(tmp_path):
    """tinybeir with its test judgments as the dev split (the split a probe is scored on)."""
    folder = tmp_path / "probe"
    shutil.copytree(TINYBEIR, folder)
    shutil.copy(folder / "qrels" / "test.tsv", folder / "qrels" / "dev.tsv")
    return folder


def pytrec_ndcg10(st, folder):
    import pytrec_eval

    rows = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = {q["_id"]: q["text"] for q in
               map(json.loads, (folder / "queries.jsonl").read_text().splitlines())}
    qrels = {}
    for line in (folder / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(score)
    judged = [qid for qid in qrels if qid in queries]
    docs = st.encode([(r.get("title", "") + " " + r["text"]).strip() for r in rows],
                     normalize_embeddings=True)
    scores = st.encode([queries[q] for q in judged], normalize_embeddings=True) @ docs.T
    run = {qid: {rows[i]["_id"]: float(s) for i, s in enumerate(line)}
           for qid, line in zip(judged, scores)}
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in measured.values()]))


@pytest.mark.slow
def test_search_weights_keeps_the_best_grid_point(cli, tmp_path, bundled_model,
                                                  bundled_model_path, tuned, probe):
    import torch

    out = tmp_path / "soup"
    r = cli("merge", "--models", *tuned, "--base", "default", "--search-weights", "--probe",
            probe, "--weight-grid", "0,1", "-o", out)
    assert r.exit_code == 0, r.stderr
    base, a, b = float_states(bundled_model_path, *tuned)
    model = copy.deepcopy(bundled_model)
    expected = []
    for point in itertools.product([0.0, 1.0], repeat=2):
        state = {k: torch.from_numpy(base[k] + point[0] * (a[k] - base[k])
                                     + point[1] * (b[k] - base[k])).float() for k in base}
        model.load_state_dict(state, strict=False)
        expected.append((list(point), pytrec_ndcg10(model, probe)))
    recipe = json.loads((out / "vecpipe-merge.json").read_text())
    table = [(row["weights"], row["ndcg_at_10"]) for row in recipe["search"]["table"]]
    assert [w for w, _ in table] == [w for w, _ in expected]
    assert np.allclose([s for _, s in table], [s for _, s in expected], atol=1e-4)
    best = max(expected, key=lambda row: row[1])
    assert recipe["weights"] == best[0] and recipe["search"]["split"] == "dev"
    assert len({round(s, 4) for _, s in expected}) > 1, "the probe should tell the points apart"
    assert "best weights" in r.stderr and r.stderr.count("ndcg_at_10") >= 5
    assert "sgd" not in recipe["search"]
    soup = float_states(out)[0]
    for key in base:
        want = base[key] + best[0][0] * (a[key] - base[key]) + best[0][1] * (b[key] - base[key])
        assert np.allclose(soup[key], want, atol=1e-6), key


def contrastive_loss(st, state, pairs):
    """In-batch InfoNCE (cosine x 20) of `st` with `state` loaded, written here from the
    definition with sentence-transformers' own encode."""
    st.load_state_dict(state, strict=False)
    queries = st.encode([q for q, _ in pairs], normalize_embeddings=True)
    docs = st.encode([d for _, d in pairs], normalize_embeddings=True)
    logits = 20.0 * queries.astype(np.float64) @ docs.astype(np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - np.diag(logits)))


@pytest.mark.slow
def test_sgd_step_follows_the_probe_loss_gradient(bundled_model, bundled_model_path, tuned,
                                                  probe):
    """One Adam step moves each weight by the learning rate against the sign of the
    gradient: checked against a finite-difference gradient of the loss computed here."""
    import torch
    from sentence_transformers import SentenceTransformer

    # one relevant document per query: the batch (every pair) is then not random
    (probe / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq2\td2\t1\nq3\td9\t1\nq4\td6\t1\n")
    states = [SentenceTransformer(str(t), device="cpu").state_dict() for t in tuned]
    base = bundled_model.state_dict()
    probe_set = model_soup.read_probe(str(probe))
    model = copy.deepcopy(bundled_model)
    start = [0.5, 0.5]
    moved, losses = model_soup.optimised_weights(model, base, states, start, probe_set, 1)

    floats = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    taus = [{k: s[k].double() - floats[k] for k in floats} for s in states]
    pairs = [(q, d) for q, (d,) in model_soup.probe_pairs(probe_set)]
    reference = copy.deepcopy(bundled_model)

    def loss(w):
        return contrastive_loss(reference, {k: (floats[k] + w[0] * taus[0][k]
                                                + w[1] * taus[1][k]).float() for k in floats},
                                pairs)

    assert losses[0] == pytest.approx(loss(start), abs=1e-4)
    h = 1e-2
    gradient = [(loss([0.5 + h, 0.5]) - loss([0.5 - h, 0.5])) / (2 * h),
                (loss([0.5, 0.5 + h]) - loss([0.5, 0.5 - h])) / (2 * h)]
    expected = [s - model_soup.SGD_LEARNING_RATE * np.sign(g) for s, g in zip(start, gradient)]
    assert moved == pytest.approx(expected, abs=1e-4), (gradient, moved)
    assert all(torch.equal(value, base[key]) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_sgd_steps_through_the_cli_keep_the_better_point(cli, tmp_path, bundled_model,
                                                         bundled_model_path, tuned, probe):
    import torch

    out = tmp_path / "soup"
    r = cli("merge", "--models", *tuned, "--base", "default", "--search-weights", "--probe",
            probe, "--weight-grid", "1", "--sgd-steps", "2", "-o", out)
    assert r.exit_code == 0, r.stderr
    recipe = json.loads((out / "vecpipe-merge.json").read_text())
    sgd = recipe["search"]["sgd"]
    assert sgd["start"] == [1.0, 1.0] and len(sgd["losses"]) == 2
    assert all(0 < abs(w - 1) <= 2 * model_soup.SGD_LEARNING_RATE + 1e-6
               for w in sgd["weights"])  # Adam moves a weight by at most ~lr a step
    base, a, b = float_states(bundled_model_path, *tuned)
    model = copy.deepcopy(bundled_model)
    w = sgd["weights"]
    model.load_state_dict({k: torch.from_numpy(base[k] + w[0] * (a[k] - base[k])
                                               + w[1] * (b[k] - base[k])).float()
                           for k in base}, strict=False)
    assert sgd["ndcg_at_10"] == pytest.approx(pytrec_ndcg10(model, probe), abs=1e-4)
    grid_score = recipe["search"]["table"][0]["ndcg_at_10"]
    assert recipe["weights"] == (w if sgd["ndcg_at_10"] > grid_score else [1.0, 1.0])
    assert "SGD steps from 1,1" in r.stderr
