"""A runtime for plain BERT-family sentence-transformers folders without sentence-transformers:
tokenizers + safetensors + a BERT forward pass of its own, in numpy (Bert: no torch at all, loads
in a fraction of a second, so one-off query encodings start fast: search's default) or in torch
(TorchBert: torch's speed without the seconds transformers and sentence-transformers take to
import: embed's torch backend on a CPU). It computes what sentence-transformers computes (the
same token ids, exact GELU, the same pooling), so its vectors equal the sentence-transformers
model's to float rounding.

Only folders it can run exactly are taken; anything else raises NotEligible with the reason, and
the caller falls back to the sentence-transformers Embedder (cli/models.py decides).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial

from vecpipe.core.embedder import Embedder

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max"}
_OTHER_POOLING_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                       "pooling_mode_lasttoken")
# BertTokenizer settings that override tokenizer.json's normalizer when they disagree with it.
_NORMALIZER_SETTINGS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                        "tokenize_chinese_chars": "handle_chinese_chars"}
TORCH_PRECISIONS = ("float32", "bfloat16")  # TorchBert's


class NotEligible(Exception):
    """The folder is not a model this runtime computes exactly; str() says why."""


@dataclass
class ModelPlan:
    """What a folder's files say about the model, checked eligible."""

    config: dict
    pooling: str                # mean | cls | max
    normalize: bool             # ends with a Normalize module
    max_length: int
    prompts: dict = field(default_factory=dict)


def read_plan(folder: str) -> ModelPlan:
    """The folder's model plan, or NotEligible naming the first thing this runtime cannot run."""
    modules = _json(folder, "modules.json")
    types = [module.get("type") for module in modules]
    if types[:2] != [_TRANSFORMER, _POOLING] or types[2:] not in ([], [_NORMALIZE]):
        raise NotEligible(f"modules are {', '.join(t.rsplit('.', 1)[-1] for t in types)}; this "
                          "runtime runs Transformer + Pooling (+ Normalize)")
    if modules[0].get("path", "") not in ("", "."):
        raise NotEligible("the transformer is not in the folder itself")
    config = _json(folder, "config.json")
    _check_config(config)
    for name in ("tokenizer.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise NotEligible(f"no {name}")
    bert_config = _json(folder, "sentence_bert_config.json")
    if not isinstance(bert_config.get("max_seq_length"), int):
        raise NotEligible("sentence_bert_config.json gives no max_seq_length")
    if bert_config.get("do_lower_case") and not _normalizer(folder).get("lowercase"):
        raise NotEligible("do_lower_case with a tokenizer that does not lowercase")
    _check_tokenizer_config(folder)
    st_config = _json(folder, "config_sentence_transformers.json", missing={})
    if st_config.get("default_prompt_name"):
        raise NotEligible("the model sets a default prompt")
    return ModelPlan(config=config, pooling=_pooling_mode(folder, modules[1], config),
                     normalize=len(types) == 3,
                     max_length=min(bert_config["max_seq_length"],
                                    config["max_position_embeddings"]),
                     prompts={**_default_prompts(), **(st_config.get("prompts") or {})})


def _default_prompts() -> dict:
    """The prompts sentence-transformers gives every model: from version 6 on, blank `query`
    and `document` ones (so `--prompt-name query` works on any model, as with torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("sentence-transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return {}
    return {"query": "", "document": ""} if major >= 6 else {}


def _json(folder: str, name: str, missing=None):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if missing is not None:
            return missing
        raise NotEligible(f"no {name}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise NotEligible(f"cannot read {name}: {err}") from None


def _check_config(config: dict) -> None:
    wanted = {"model_type": "bert", "hidden_act": "gelu",
              "position_embedding_type": "absolute"}
    for key, value in wanted.items():
        if config.get(key, value if key == "position_embedding_type" else None) != value:
            raise NotEligible(f"config.json {key} is {config.get(key)!r}, not {value!r}")
    for key in ("is_decoder", "add_cross_attention"):
        if config.get(key):
            raise NotEligible(f"config.json sets {key}")
    if config.get("auto_map"):
        raise NotEligible("config.json names its own Python code (auto_map)")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise NotEligible("hidden_size is not a multiple of num_attention_heads")


def _normalizer(folder: str) -> dict:
    """tokenizer.json's BertNormalizer settings ({} for another normalizer)."""
    normalizer = _json(folder, "tokenizer.json").get("normalizer") or {}
    return normalizer if normalizer.get("type") == "BertNormalizer" else {}


def _check_tokenizer_config(folder: str) -> None:
    settings = _json(folder, "tokenizer_config.json", missing={})
    if settings.get("padding_side", "right") != "right" \
            or settings.get("truncation_side", "right") != "right":
        raise NotEligible("the tokenizer pads or truncates on the left")
    normalizer = _normalizer(folder)
    for key, norm_key in _NORMALIZER_SETTINGS.items():
        if key in settings and normalizer and settings[key] != normalizer.get(norm_key):
            raise NotEligible(f"tokenizer_config.json {key} disagrees with tokenizer.json")


def _pooling_mode(folder: str, module: dict, config: dict) -> str:
    settings = _json(os.path.join(folder, module.get("path", "")), "config.json")
    if settings.get("include_prompt", True) is False:
        raise NotEligible("pooling leaves the prompt out (include_prompt false)")
    modes = settings.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _POOLING_MODES.items() if settings.get(key)]
        modes += [key for key in _OTHER_POOLING_KEYS if settings.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes) or ["mean"]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES.values():
        raise NotEligible(f"pooling {'+'.join(map(str, modes))}; this runtime pools by mean, "
                          "cls or max")
    dim = settings.get("embedding_dimension", settings.get("word_embedding_dimension"))
    if dim != config["hidden_size"]:
        raise NotEligible("the pooling dimension is not the transformer's")
    return modes[0]


def load(folder: str, name: str, sha: str | None, forward: str = "numpy",
         precision: str = "float32") -> BertEncoder:
    """The folder's model, ready to encode, its forward pass in `forward` (numpy, or torch in
    `precision`: float32 or bfloat16); NotEligible when this runtime cannot run it."""
    plan = read_plan(folder)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(plan.max_length)
    weights_path = os.path.join(folder, "model.safetensors")
    try:
        if forward == "torch":
            from safetensors.torch import load_file

            bert = TorchBert(plan.config, partial(bert_weight, load_file(weights_path)),
                             precision)
        else:
            from safetensors.numpy import load_file

            bert = Bert(plan.config, partial(bert_weight, load_file(weights_path)))
    except KeyError as err:
        raise NotEligible(f"model.safetensors has no weight {err}") from None
    return BertEncoder(name=name, sha=sha, dim=plan.config["hidden_size"],
                       max_length=plan.max_length, device="cpu", prompts=plan.prompts,
                       backend=forward, path=folder, bert=bert, text_tokenizer=tokenizer,
                       model_pooling=plan.pooling, normalized_by_model=plan.normalize,
                       precision=precision)


def bert_parts(config: dict, weight, linear) -> tuple[tuple, list[dict]]:
    """BertModel's weights by role, in a forward pass's own form: `weight(key)` gives one
    weight, `linear(*keys)` the (matrix, bias) of those projections taken as one product.
    Returns (word table, position table, token type 0's row, (gain, bias) of the embeddings'
    norm) and one dict per layer."""
    embeddings = (weight("embeddings.word_embeddings.weight"),
                  weight("embeddings.position_embeddings.weight"),
                  weight("embeddings.token_type_embeddings.weight")[0],
                  (weight("embeddings.LayerNorm.weight"), weight("embeddings.LayerNorm.bias")))
    layers = []
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        layers.append({
            "qkv": linear(*(p + "attention.self." + name for name in ("query", "key", "value"))),
            "attention_out": linear(p + "attention.output.dense"),
            "attention_norm": (weight(p + "attention.output.LayerNorm.weight"),
                               weight(p + "attention.output.LayerNorm.bias")),
            "intermediate": linear(p + "intermediate.dense"),
            "output": linear(p + "output.dense"),
            "output_norm": (weight(p + "output.LayerNorm.weight"),
                            weight(p + "output.LayerNorm.bias")),
        })
    return embeddings, layers


def bert_weight(weights: dict, key: str):
    """A BertModel weight by its name, in a file saved from BertModel or from a model around it
    (`bert.`/`model.` prefixes); KeyError naming it when absent."""
    for prefix in ("", "bert.", "model."):
        if prefix + key in weights:
            return weights[prefix + key]
    raise KeyError(key)


class Bert:
    """BertModel's forward pass (inference: no dropout) in float32 numpy."""

    def __init__(self, config: dict, weight_named):
        """`weight_named(key)`: the BertModel weight of that name (bert_weight)."""
        import numpy as np

        def weight(key):
            return weight_named(key).astype("float32", copy=False)

        def linear(*keys):  # x @ matrix + bias; several projections of x as one product
            return (np.concatenate([weight(key + ".weight").T for key in keys], axis=1),
                    np.concatenate([weight(key + ".bias") for key in keys]))

        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        embeddings, self.layers = bert_parts(config, weight, linear)
        self.word, self.position, self.token_type, self.embed_norm = embeddings

    def __call__(self, input_ids, attention_mask, layers: int | None = None):
        """Token embeddings (batch x tokens x hidden) after the first `layers` layers (None:
        all), right-padded inputs."""
        import numpy as np

        batch, length = input_ids.shape
        x = self.word[input_ids] + self.position[:length] + self.token_type
        x = _layer_norm(x.reshape(batch * length, -1), *self.embed_norm, self.eps)
        # As transformers: a large negative score on padded keys, so they get no attention.
        key_bias = ((1.0 - attention_mask) * np.finfo(np.float32).min).astype(np.float32)
        key_bias = key_bias[:, None, None, :]
        for layer in self.layers[:layers]:
            x = self._layer(x, layer, batch, length, key_bias)
        return x.reshape(batch, length, -1)

    def _layer(self, x, layer, batch, length, key_bias):
        import numpy as np

        hidden = x.shape[1]
        width = hidden // self.heads

        qkv = _linear(x, *layer["qkv"]).reshape(batch, length, 3, self.heads, width)
        query, key, value = (np.ascontiguousarray(qkv[:, :, i].transpose(0, 2, 1, 3))
                             for i in range(3))  # BLAS needs contiguous
        keys_t = np.ascontiguousarray(key.transpose(0, 1, 3, 2))
        scores = query @ keys_t / np.float32(math.sqrt(width)) + key_bias
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ value).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
        x = _layer_norm(_linear(context, *layer["attention_out"]) + x,
                        *layer["attention_norm"], self.eps)
        inner = gelu(_linear(x, *layer["intermediate"]))
        return _layer_norm(_linear(inner, *layer["output"]) + x, *layer["output_norm"],
                           self.eps)


class TorchBert:
    """BertModel's forward pass in torch, called like Bert: numpy token ids and mask in,
    float32 numpy token embeddings out; weights and activations in `precision` (float32 or
    bfloat16). The attention is torch's scaled_dot_product_attention, as transformers' own
    BERT uses, so it runs at the speed of sentence-transformers' torch backend."""

    def __init__(self, config: dict, weight_named, precision: str = "float32"):
        """`weight_named(key)`: the BertModel weight of that name (bert_weight)."""
        import torch

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]

        def weight(key):
            return weight_named(key).to(dtype).contiguous()

        def linear(*keys):  # several projections of one input as one matrix product
            return (torch.cat([weight(key + ".weight") for key in keys]),
                    torch.cat([weight(key + ".bias") for key in keys]))

        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        embeddings, self.layers = bert_parts(config, weight, linear)
        self.word, self.position, self.token_type, self.embed_norm = embeddings

    def __call__(self, input_ids, attention_mask, layers: int | None = None):
        """Token embeddings (batch x tokens x hidden, float32 numpy) after the first `layers`
        layers (None: all), right-padded inputs."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids)
            length = ids.shape[1]
            x = F.embedding(ids, self.word) + self.position[:length] + self.token_type
            x = F.layer_norm(x, x.shape[-1:], *self.embed_norm, self.eps)
            attends = torch.from_numpy(attention_mask).bool()[:, None, None, :]
            for layer in self.layers[:layers]:
                x = self._layer(x, layer, attends)
            return x.float().numpy()

    def _layer(self, x, layer, attends):
        import torch.nn.functional as F

        batch, length, hidden = x.shape
        width = hidden // self.heads
        qkv = F.linear(x, *layer["qkv"]).view(batch, length, 3, self.heads, width)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attends,
                                                 scale=1.0 / math.sqrt(width))
        context = context.transpose(1, 2).reshape(batch, length, hidden)
        x = F.layer_norm(F.linear(context, *layer["attention_out"]) + x, (hidden,),
                         *layer["attention_norm"], self.eps)
        inner = F.gelu(F.linear(x, *layer["intermediate"]))
        return F.layer_norm(F.linear(inner, *layer["output"]) + x, (hidden,),
                            *layer["output_norm"], self.eps)


def _linear(x, weight_t, bias):
    out = x @ weight_t
    out += bias
    return out


def _layer_norm(x, gain, bias, eps):
    import numpy as np

    centered = x - x.mean(-1, keepdims=True)
    variance = (centered * centered).mean(-1, keepdims=True)
    centered /= np.sqrt(variance + np.float32(eps))
    centered *= gain
    centered += bias
    return centered


# erfc(z) for z >= 0: Numerical Recipes' erfcc, a Chebyshev fit with fractional error < 1.2e-7.
# Evaluated in float32, GELU through it stays within 2.5e-7 * max(|x|, 1) of the exact-erf GELU
# (tests/test_bert_encoder.py measures it against math.erf): about float32's own rounding.
_ERFC_COEFFICIENTS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                      0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def erfc_nonnegative(z):
    import numpy as np

    t = 1.0 / (1.0 + np.float32(0.5) * z)
    poly = np.full_like(z, _ERFC_COEFFICIENTS[-1])
    for coefficient in _ERFC_COEFFICIENTS[-2::-1]:
        poly *= t
        poly += np.float32(coefficient)
    poly -= z * z
    np.exp(poly, out=poly)
    poly *= t
    return poly


def gelu(x):
    """BERT's "gelu", x * Phi(x) with the exact erf (not the tanh approximation), float32.

    Written as torch computes it, x * 0.5 * (1 + erf(x / sqrt 2)), so that far negative inputs
    give 0 as there, not denormal numbers (which would make the next matrix product crawl)."""
    import numpy as np

    x = x.astype(np.float32, copy=False)
    erfc = erfc_nonnegative(np.abs(x) * np.float32(1.0 / math.sqrt(2.0)))
    one = np.float32(1.0)
    # 1 + erf: 2 - erfc above 0; below, 1 - (1 - erfc), rounded through erf as torch's is
    one_plus_erf = np.where(x >= 0, one + (one - erfc), one - (one - erfc))
    one_plus_erf *= np.float32(0.5)
    one_plus_erf *= x
    return one_plus_erf


@dataclass
class BertEncoder(Embedder):
    """An Embedder (same interface) whose forward pass is Bert (numpy) or TorchBert; features
    are numpy arrays."""

    bert: object = None                  # Bert or TorchBert
    text_tokenizer: object = None        # a tokenizers.Tokenizer, truncating to max_length
    model_pooling: str = "mean"          # the folder's own pooling (`pooling` overrides it)
    normalized_by_model: bool = False
    _untruncated: object = None

    @property
    def is_fake(self) -> bool:
        return False

    @property
    def normalizes(self) -> bool:
        return self.normalized_by_model

    @property
    def num_layers(self) -> int:
        return len(self.bert.layers)

    @property
    def own_pooling(self) -> str:
        return self.model_pooling

    def check_late_chunking(self) -> None:
        from vecpipe.formats.errors import ParameterError

        raise ParameterError("late_chunking: the numpy backend pools inside its own forward "
                             "pass; use the torch backend", "late_chunking")

    def limit_window(self, max_length: int) -> None:
        """Truncate inputs to `max_length` tokens (at most the model's window)."""
        self.max_length = max_length
        self.text_tokenizer.enable_truncation(max_length)

    def tokenize(self, texts: list[str], prompt: str = ""):
        """input_ids and attention_mask (int64, right-padded to the batch's longest text)."""
        import numpy as np

        encodings = self.text_tokenizer.encode_batch([prompt + text for text in texts])
        length = max((len(e.ids) for e in encodings), default=0)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, :len(encoding.ids)] = encoding.ids
            mask[row, :len(encoding.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def embed_features(self, features, normalize: bool = True, dim: int | None = None):
        import numpy as np

        mask = features["attention_mask"]
        tokens = self.bert(features["input_ids"], mask.astype(np.float32), self.layers)
        vectors = _pool(tokens, mask, self.pooling or self.model_pooling)
        if self.normalized_by_model:
            vectors = _unit(vectors)
        if dim is not None:
            vectors = np.ascontiguousarray(vectors[:, :dim])
        return _unit(vectors) if normalize else vectors

    def token_lengths(self, texts: list[str], prompt: str = "") -> list[int]:
        encodings = self.text_tokenizer.encode_batch([prompt + text for text in texts])
        return [len(encoding.ids) for encoding in encodings]

    def count_truncated(self, texts: list[str], features, prompt: str = "") -> int:
        lengths = features["attention_mask"].sum(axis=1).tolist()
        at_cap = [prompt + text for text, n in zip(texts, lengths) if n >= self.max_length]
        if not at_cap:
            return 0
        full = self._full_tokenizer().encode_batch(at_cap)
        return sum(len(encoding.ids) > self.max_length for encoding in full)

    def _full_tokenizer(self):
        """The tokenizer without truncation (made once, when first needed)."""
        if self._untruncated is None:
            from tokenizers import Tokenizer

            self._untruncated = Tokenizer.from_str(self.text_tokenizer.to_str())
            self._untruncated.no_truncation()
        return self._untruncated

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        encodings = self._full_tokenizer().encode_batch(list(texts), add_special_tokens=False)
        return [[tuple(span) for span in encoding.offsets] for encoding in encodings]

    def special_tokens(self) -> int:
        return self.text_tokenizer.num_special_tokens_to_add(False)

    def prompt_tokens(self, prompt: str) -> int:
        if not prompt:
            return 0
        return len(self._full_tokenizer().encode(prompt, add_special_tokens=False).ids)


def _pool(tokens, mask, mode: str):
    """sentence-transformers' Pooling over the attended tokens (right padding)."""
    import numpy as np

    if mode == "cls":
        return np.ascontiguousarray(tokens[:, 0])
    if mode == "lasttoken":
        last = np.maximum(mask.sum(axis=1) - 1, 0)
        return np.ascontiguousarray(tokens[np.arange(len(tokens)), last])
    weights = mask[:, :, None].astype(np.float32)
    if mode == "weightedmean":  # position weights 1, 2, ... over the attended tokens
        weights = weights * np.arange(1, tokens.shape[1] + 1, dtype=np.float32)[None, :, None]
    if mode == "max":
        return np.where(weights > 0, tokens, -np.inf).max(axis=1).astype(np.float32)
    counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
    return ((tokens * weights).sum(axis=1) / counts).astype(np.float32)


def _unit(vectors):
    """torch.nn.functional.normalize: x / max(|x|, 1e-12)."""
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
