"""Model soups: weight-space merging of models fine-tuned from one base (linear averages and
per-tensor slerp), with the checks that the models match and a souped model saved atomically
with a record of how it was made."""
from __future__ import annotations

import os
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
