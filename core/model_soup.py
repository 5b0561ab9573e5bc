"""Model soups: weight-space merging of models fine-tuned from one base (linear averages and
per-tensor slerp; from a base model, task arithmetic, TIES and DARE on the task vectors, and
their weights searched on a small probe set, the grid form of Self Positioning, Li et al.
2024), with the checks that the models match and a souped model saved atomically with a record
of how it was made."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from vecpipe.formats.errors import DataError

if TYPE_CHECKING:
    import numpy as np

PROVENANCE_FILE = "vecpipe-merge.json"


def linear_merge(tensors: Sequence["np.ndarray"], weights: Sequence[float]) -> "np.ndarray":
    """sum(w_i * t_i), computed in float64 and returned in the first tensor's dtype."""
    import numpy as np

    total = np.zeros(tensors[0].shape, dtype=np.float64)
    for tensor, weight in zip(tensors, weights):
        if weight:
            total += weight * tensors_as_float64(tensor)
    return total.astype(tensors[0].dtype)


def slerp_merge(a: "np.ndarray", b: "np.ndarray", t: float,
                parallel_threshold: float = 0.9995) -> "np.ndarray":
    """Spherical interpolation from `a` (t=0) to `b` (t=1) along the arc between the two
    tensors seen as flat vectors; linear when they are (anti)parallel or one is zero, where the
    arc is undefined or numerically unstable."""
    import numpy as np

    if t == 0:
        return a.copy()
    if t == 1:
        return b.astype(a.dtype, copy=True)
    va, vb = tensors_as_float64(a).ravel(), tensors_as_float64(b).ravel()
    norm_a, norm_b = np.linalg.norm(va), np.linalg.norm(vb)
    if norm_a == 0 or norm_b == 0:
        return linear_merge([a, b], [1 - t, t])
    cos = float(np.clip(va @ vb / (norm_a * norm_b), -1.0, 1.0))
    if abs(cos) > parallel_threshold:
        return linear_merge([a, b], [1 - t, t])
    omega = np.arccos(cos)
    sin_omega = np.sin(omega)
    mixed = (np.sin((1 - t) * omega) / sin_omega) * va + (np.sin(t * omega) / sin_omega) * vb
    return mixed.reshape(a.shape).astype(a.dtype)


def tensors_as_float64(tensor: "np.ndarray") -> "np.ndarray":
    import numpy as np

    return np.asarray(tensor, dtype=np.float64)


def compare_state_shapes(named: Sequence[tuple[str, dict]]) -> None:
    """Refuse models whose state dicts differ in keys or tensor shapes (given as
    (name, {key: shape})), naming the first difference."""
    first_name, first = named[0]
    for name, shapes in named[1:]:
        only_first = sorted(set(first) - set(shapes))
        only_other = sorted(set(shapes) - set(first))
        if only_first or only_other:
            key, owner = (only_first[0], first_name) if only_first else (only_other[0], name)
            count = len(only_first) + len(only_other)
            raise DataError(f"models have different architectures: {count} weight(s) differ, "
                            f"e.g. {key!r} only in {owner} ({first_name} vs {name})",
                            hint="weight merging needs models fine-tuned from one base model")
        for key in first:
            if tuple(first[key]) != tuple(shapes[key]):
                raise DataError(f"models have different architectures: {key!r} is "
                                f"{tuple(first[key])} in {first_name} but {tuple(shapes[key])} "
                                f"in {name}",
                                hint="weight merging needs models fine-tuned from one base "
                                     "model")


def check_same_modules(loaded) -> None:
    """Same module stack, module settings (pooling mode, max length...), transformer config and
    tokenizer vocabulary as the first model; weights are checked separately."""
    first = loaded[0]
    reference = module_description(first.st)
    for model in loaded[1:]:
        description = module_description(model.st)
        for what in reference:
            if reference[what] != description[what]:
                raise DataError(f"models differ in {what} "
                                f"({difference(reference[what], description[what])}): "
                                f"{first.name} vs {model.name}",
                                hint="weight merging needs models fine-tuned from one base "
                                     "model, with the same tokenizer and pooling")


def module_description(st) -> dict:
    ignored = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}
    configs, model_config = [], {}
    for module in st:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        configs.append((type(module).__name__, config))
        if hasattr(module, "auto_model"):
            model_config = {k: v for k, v in module.auto_model.config.to_dict().items()
                            if k not in ignored}
    return {"module stack": [name for name, _ in configs],
            "module settings": configs,
            "transformer config": model_config,
            "tokenizer vocabulary": st.tokenizer.get_vocab() if st.tokenizer else None}


def difference(a, b) -> str:
    """The first few differing entries of two descriptions, briefly."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(difference(x, y) for x, y in zip(a, b) if x != y)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2 \
            and a[0] == b[0]:  # (module name, settings)
        return f"{a[0]}: {difference(a[1], b[1])}"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        if len(a) > 1000:  # a vocabulary
            return f"{len(keys)} of {len(a)} tokens differ"
        return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3]) + \
            (" ..." if len(keys) > 3 else "")
    text = f"{a!r} vs {b!r}"
    return text if len(text) <= 200 else text[:200] + "..."


def merged_state(states, weights, t) -> dict:
    """The merged state dict (torch tensors); non-float tensors (ids, counters) come from the
    first model."""
    import torch

    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        arrays = [state[key].detach().cpu().numpy() for state in states]
        if t is None:
            result = linear_merge(arrays, weights)
        else:
            result = slerp_merge(arrays[0], arrays[1], t)
        merged[key] = torch.from_numpy(result)
    return merged


def save_model(loaded, merged, output: str, recipe: dict) -> None:
    """A copy of the first model with the merged weights, saved to a temporary sibling folder
    and renamed into place (with a record of how it was made)."""
    import copy
    import json
    import shutil

    from vecpipe.core.index_format import real_folder, swap_into_place, temporary_sibling
    from vecpipe.formats import __version__

    soup = copy.deepcopy(loaded[0].st)
    soup.load_state_dict(merged)
    output = real_folder(output)
    tmp = temporary_sibling(output)
    try:
        soup.save(tmp)
        provenance = dict(recipe, models=[{"name": m.name, "sha": m.sha} for m in loaded],
                          vecpipe_version=__version__)
        with open(os.path.join(tmp, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)
        swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- task vectors: task arithmetic, TIES, DARE (from a base model) --------------------------

TASK_METHODS = ("linear", "ties", "dare")


def task_vector_merge(base: "np.ndarray", tensors: Sequence["np.ndarray"],
                      weights: Sequence[float], method: str = "linear",
                      density: float = 1.0) -> "np.ndarray":
    """base + the merge of the task vectors t_i - base, in float64, returned in base's dtype.
    linear: task arithmetic, sum(w_i * tau_i). ties and dare: peft's merge_utils (TIES, Yadav
    et al. 2023: the top `density` of each tau by magnitude, a sign elected per entry from the
    sum of the trimmed taus, the mean of the weighted entries that agree with it; DARE, Yu et
    al. 2023: entries kept with probability `density` from torch's global generator, rescaled
    by 1/density, then summed with the weights)."""
    import numpy as np

    origin = tensors_as_float64(base)
    taus = [tensors_as_float64(tensor) - origin for tensor in tensors]
    if method == "linear":
        mixed = sum((weight * tau for weight, tau in zip(weights, taus) if weight),
                    np.zeros_like(origin))
    else:
        mixed = peft_merge(method, taus, weights, density)
    return (origin + mixed).astype(base.dtype)


def peft_merge(method: str, taus, weights, density: float) -> "np.ndarray":
    import warnings

    import torch

    merge_utils = peft_merge_utils()
    stacked = [torch.from_numpy(tau) for tau in taus]
    factors = torch.tensor(list(weights), dtype=torch.float64)
    merge = merge_utils.ties if method == "ties" else merge_utils.dare_linear
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The density")  # density 1: nothing dropped, fine
        return merge(stacked, factors, density).numpy()


def peft_merge_utils():
    try:
        from peft.utils import merge_utils
    except ImportError:
        raise DataError("TIES and DARE merging need the peft package",
                        hint="pip install peft") from None
    return merge_utils


def task_state(base: dict, states, weights, method: str = "linear", density: float = 1.0,
               seed: int = 0) -> dict:
    """The merged state dict (torch tensors) of `states` as task vectors from `base`;
    non-float tensors come from the base. DARE's drops are seeded once per merge, tensors in
    the state dict's order, the caller's torch generator left as it was."""
    import torch

    merged = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for key, origin in base.items():
            if not origin.is_floating_point():
                merged[key] = origin.clone()
                continue
            arrays = [state[key].detach().cpu().numpy() for state in states]
            merged[key] = torch.from_numpy(task_vector_merge(
                origin.detach().cpu().numpy(), arrays, weights, method, density))
    return merged


# ---- Self Positioning: task-vector weights searched on a probe set --------------------------

@dataclass
class Probe:
    """A small BEIR folder read whole: judged queries, every document, the judgments."""

    folder: str
    split: str
    queries: dict
    doc_ids: list
    documents: list
    qrels: dict


def probe_split(folder: str) -> str:
    """The split a probe folder is scored on: its dev split, else its only one, else test."""
    from vecpipe.formats.beir import splits

    known = splits(folder)
    return "dev" if "dev" in known else known[0] if len(known) == 1 else "test"


def read_probe(folder: str) -> Probe:
    from vecpipe.formats.beir import beir_files, beir_qrels, corpus_batches, read_queries

    split = probe_split(folder)
    files = beir_files(folder, split)
    qrels = beir_qrels(files.qrels)
    texts = read_queries(files.queries)
    queries = {qid: texts[qid] for qid in qrels if qid in texts}
    if not queries:
        raise DataError("no judged query found", source=files.queries)
    doc_ids, documents = [], []
    for ids, batch in corpus_batches(files.corpus, 8192):
        doc_ids.extend(ids.to_pylist())
        documents.extend(batch)
    if not documents:
        raise DataError("the corpus is empty", source=files.corpus)
    return Probe(folder, split, queries, doc_ids, documents, qrels)


def probe_score(st, probe: Probe, key: str, batch_size: int = 32) -> float:
    """`key` (an MTEB metric key, e.g. ndcg_at_10) of `st` on the probe: queries and documents
    embedded without prompts and searched exactly by cosine, as `eval beir` does."""
    from vecpipe.core.retrieval_metrics import evaluate
    from vecpipe.core.vectors import exact_top_k

    def embed(texts):
        return st.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)

    metric, _, k = key.rpartition("_at_")
    hits = exact_top_k(embed(list(probe.queries.values())), embed(probe.documents), int(k))
    run = {qid: {probe.doc_ids[row]: float(score) for row, score in zip(rows, scores)
                 if row >= 0}
           for qid, rows, scores in zip(probe.queries, hits.rows, hits.scores)}
    return evaluate(probe.qrels, run, (int(k),), (metric,)).means[key]


def weight_grid(values: Sequence[float], count: int) -> list[tuple[float, ...]]:
    """Every weight vector of `count` weights taken from `values` (the Cartesian product)."""
    import itertools

    return list(itertools.product(values, repeat=count))


def best_point(table: Sequence[tuple[tuple[float, ...], float]]) -> tuple[float, ...]:
    """The weights scoring highest; the first in grid order on a tie."""
    return max(table, key=lambda row: row[1])[0]


SGD_LEARNING_RATE = 0.02  # Adam on the weights themselves: a few steps move them by ~0.1-0.5
SGD_BATCH = 16            # distinct judged queries per step, one relevant document each
SGD_SCALE = 20.0          # cosine logits x 20, sentence-transformers' MNRL default


def probe_pairs(probe: Probe) -> list[tuple[str, list[str]]]:
    """(query text, its relevant documents' texts) for every judged query with one."""
    text_of = dict(zip(probe.doc_ids, probe.documents))
    pairs = []
    for qid, text in probe.queries.items():
        relevant = [text_of[doc] for doc, grade in probe.qrels[qid].items()
                    if grade >= 1 and doc in text_of]
        if relevant:
            pairs.append((text, relevant))
    return pairs


def optimised_weights(st, base: dict, states, start: Sequence[float], probe: Probe,
                      steps: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """The weights after `steps` Adam steps from `start` on the probe's in-batch contrastive
    loss (InfoNCE over judged query-document pairs) of base + sum(w_i * tau_i), gradients
    taken through the merged model with respect to the weights only (the paper's search by
    SGD in the interpolation space of the task vectors). Returns the weights and the loss of
    every step."""
    import random

    import torch
    from torch.func import functional_call

    keys = [key for key, value in base.items() if value.is_floating_point()]
    origin = {key: base[key].detach().float() for key in keys}
    taus = {key: torch.stack([state[key].detach().float() - origin[key] for state in states])
            for key in keys}
    weights = torch.tensor(list(start), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=SGD_LEARNING_RATE)
    pairs, rng, losses = probe_pairs(probe), random.Random(seed), []
    if len(pairs) < 2:
        raise DataError("the probe needs two judged queries with a relevant document",
                        source=probe.folder)

    def embed(params, texts):
        features = st.preprocess(texts)
        return torch.nn.functional.normalize(
            functional_call(st, params, (features,))["sentence_embedding"], dim=-1)

    st.eval()  # no dropout: two weights need no regularising, and the search is repeatable
    for _ in range(steps):
        batch = rng.sample(pairs, min(SGD_BATCH, len(pairs)))
        params = {key: origin[key] + torch.tensordot(weights, taus[key], dims=1)
                  for key in keys}
        scores = SGD_SCALE * embed(params, [q for q, _ in batch]) @ \
            embed(params, [rng.choice(docs) for _, docs in batch]).T
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return [float(w) for w in weights.detach()], losses
