"""The embedding runtime: a loaded sentence-transformers model (or a `fake:DIM` one) that turns
texts into float32 vectors, in one call (`encode`) or as a stream (`tokenize()`, from another
thread if you like, then `embed_features()`), or on a pool of devices.

Loading (model names, the bundled default, the per-process cache) is the CLI's; exported
backends (ONNX, OpenVINO) are core.onnx_runtime's `runtime`, features -> token embeddings, with
pooling left to sentence-transformers' modules.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from vecpipe.formats.errors import ParameterError, UsageError

_FAKE_TOKEN = re.compile(r"\S+")


@dataclass
class Embedder:
    """A model ready to encode, plus what goes into the stream metadata."""

    name: str                 # recorded as vecpipe.model
    sha: str | None           # recorded as vecpipe.model_sha (hash of the weights, when local)
    dim: int
    max_length: int | None    # the model's token window (None for fake models)
    device: str
    st: object = None         # the SentenceTransformer (None for fake models)
    prompts: dict = field(default_factory=dict)
    backend: str = "torch"
    runtime: object = None    # exported backends: features -> token embeddings (torch tensor)
    path: str | None = None   # local folder of the weights, when there is one
    precision: str = "float32"  # what the model computes in (the vectors stay float32)
    layers: int | None = None   # run only the first `layers` transformer layers (None: all)
    pooling: str | None = None  # pooling mode instead of the model's own (None: its own)
    _modules: list | None = None  # torch: the modules to run when layers/pooling are set

    @property
    def is_fake(self) -> bool:
        return self.st is None

    @property
    def tokenizer(self):
        return None if self.st is None else self.st.tokenizer

    @property
    def normalizes(self) -> bool:
        """Whether the model's own last module L2-normalizes (MiniLM's does)."""
        if self.st is None:
            return False
        modules = list(self.st.children())
        return bool(modules) and type(modules[-1]).__name__ == "Normalize"

    @property
    def num_layers(self) -> int | None:
        """The transformer's layer count (None when unknown: fake or unusual models)."""
        if self.st is None:
            return None
        return getattr(self.st[0].auto_model.config, "num_hidden_layers", None)

    @property
    def own_pooling(self) -> str | None:
        """The pooling mode of the model's own Pooling module (None without one)."""
        pooling = _pooling_module(self.st)
        mode = getattr(pooling, "pooling_mode", None)
        return mode if isinstance(mode, str) else None

    def with_space(self, layers: int | None = None, pooling: str | None = None) -> "Embedder":
        """This model (sharing its weights) cut to its first `layers` layers and pooled by
        `pooling`; a value that changes nothing (all layers, the model's own pooling) is
        dropped, so it is not recorded. ParameterError names a value that cannot work."""
        from dataclasses import replace

        layers = _check_layers(layers, self.num_layers, self.is_fake)
        pooling = _check_pooling(pooling, self.own_pooling)
        if layers is not None and self.runtime is not None:
            raise ParameterError(f"layers {layers}: the {self.backend} backend runs the whole "
                                 "exported model; use the torch or numpy backend", "layers")
        if layers == self.layers and pooling == self.pooling:
            return self
        model = replace(self, layers=layers, pooling=pooling, _modules=None)
        if model.st is not None and (layers or pooling):
            model._modules = _space_modules(model.st, pooling)
        return model

    def prompt_text(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The literal prompt: `prompt` itself, or the model's prompt named `prompt_name` ('' for
        none)."""
        if prompt is not None and prompt_name is not None:
            raise UsageError("give a prompt or a prompt name, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                known = ", ".join(sorted(self.prompts)) or "none"
                raise UsageError(f"model {self.name} has no prompt named {prompt_name!r} "
                                 f"(it has: {known})")
            return self.prompts[prompt_name]
        return prompt or ""

    def encode(self, texts: list[str], batch_size: int = 32, prompt: str = "",
               normalize: bool = True, dim: int | None = None):
        """float32 vectors (len(texts) x (dim or self.dim)), in input order."""
        import numpy as np

        texts = list(texts)
        if self.st is not None and self.backend == "torch" and self._modules is None:
            vectors = self.st.encode(texts, batch_size=batch_size, prompt=prompt or None,
                                     normalize_embeddings=normalize, convert_to_numpy=True,
                                     show_progress_bar=False, truncate_dim=dim)
            return np.asarray(vectors, dtype=np.float32).reshape(len(texts), dim or self.dim)
        out = np.empty((len(texts), dim or self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            features = self.tokenize([texts[i] for i in rows], prompt)
            out[rows] = self.embed_features(features, normalize, dim)
        return out

    def tokenize(self, texts: list[str], prompt: str = ""):
        """Model inputs for one batch (padded to its longest text, truncated to the window).

        Exactly what sentence-transformers' encode feeds the model, so results match it.
        """
        if self.st is None:
            return [prompt + text for text in texts]
        return self.st.preprocess(list(texts), prompt=prompt or None)

    def embed_features(self, features, normalize: bool = True, dim: int | None = None):
        """float32 vectors for one tokenized batch: truncated to `dim`, then normalized."""
        if self.st is None:
            vectors = fake_vectors(features, self.dim, self._fake_salt(),
                                   normalize and dim is None)
            return _finish_numpy(vectors, normalize, dim)
        import torch

        with torch.inference_mode():
            if self.runtime is None and self._modules is not None:
                embedded = self._forward_cut(features)
            elif self.runtime is None:
                from sentence_transformers.util import batch_to_device

                embedded = self.st(batch_to_device(features, self.st.device))
            else:
                embedded = self._pool(features, self.runtime(features))
            return pooled_vectors(embedded, normalize, dim).cpu().numpy()

    def _pool(self, features, token_embeddings):
        """Run sentence-transformers' modules after the transformer (pooling, dense, normalize)."""
        features = dict(features, token_embeddings=token_embeddings)
        for module in (self._modules or list(self.st.children()))[1:]:
            features = module(features)
        return features

    def _forward_cut(self, features):
        """The torch forward with the layer count and pooling of with_space."""
        from sentence_transformers.util import batch_to_device

        features = batch_to_device(features, self.st.device)
        with _first_layers(self.st[0].auto_model, self.layers):
            features = self._modules[0](features)
        for module in self._modules[1:]:
            features = module(features)
        return features

    def check_late_chunking(self) -> None:
        """Late chunking mean-pools token outputs: refuse a model pooled otherwise."""
        if self.is_fake:
            return
        pooling = self.pooling or self.own_pooling or "no Pooling module"
        if pooling != "mean":
            raise ParameterError(f"late_chunking: model {self.name} pools by {pooling}, and "
                                 "late chunking averages token outputs (pooling mean?)",
                                 "late_chunking")

    def window_token_outputs(self, pieces: list[list[int]], skip: int = 0) -> list:
        """The transformer's output for each token of each piece (token ids that fit the
        window, special tokens added here) but its first `skip` (a prompt's), as float32
        arrays (tokens x hidden)."""
        import torch

        features, starts = self._window_features(pieces)
        with torch.inference_mode():
            if self.runtime is not None:
                tokens = self.runtime(features)
            else:
                from sentence_transformers.util import batch_to_device

                features = batch_to_device(features, self.st.device)
                with _first_layers(self.st[0].auto_model, self.layers):
                    tokens = self.st[0](features)["token_embeddings"]
            tokens = tokens.float().cpu().numpy()
        # a piece without tokens (a text the tokenizer drops entirely): its special tokens'
        prefix = len(self._special_ids()[0]) + skip
        return [tokens[row, start + prefix:start + prefix + len(ids) - skip] if len(ids) > skip
                else tokens[row, start:start + self.special_tokens()]
                for row, (ids, start) in enumerate(zip(pieces, starts))]

    def _special_ids(self) -> tuple[list, list]:
        """The token ids the tokenizer puts before and after a text's own."""
        tokenizer = self.tokenizer
        inner = tokenizer("a", add_special_tokens=False)["input_ids"]
        whole = tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(whole)) if whole[i:i + len(inner)] == inner)
        return whole[:start], whole[start + len(inner):]

    def _window_features(self, pieces: list[list[int]]) -> tuple[dict, list[int]]:
        """Model inputs (torch tensors, padded on the tokenizer's side) for token-id pieces,
        and where each row's tokens start."""
        import torch

        before, after = self._special_ids()
        rows = [before + list(ids) + after for ids in pieces]
        length = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        left = self.tokenizer.padding_side == "left"
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        starts = [length - len(row) if left else 0 for row in rows]
        for i, (row, start) in enumerate(zip(rows, starts)):
            ids[i, start:start + len(row)] = torch.tensor(row)
            mask[i, start:start + len(row)] = 1
        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        return features, starts

    def after_pooling(self, pooled):
        """Pooled vectors (numpy) through the modules after the model's Pooling (a Dense, a
        Normalize), as float32 numpy."""
        import numpy as np
        import torch

        modules = list(self.st.children())
        after = modules[modules.index(_pooling_module(self.st)) + 1:]
        if not after:
            return np.asarray(pooled, dtype=np.float32)
        features = {"sentence_embedding": torch.from_numpy(pooled).to(self.st.device)}
        with torch.inference_mode():
            for module in after:
                features = module(features)
        return features["sentence_embedding"].float().cpu().numpy()

    def _fake_salt(self) -> str:
        """Fake vectors of another layer count or pooling are other vectors."""
        return "" if not (self.layers or self.pooling) else f"{self.layers}|{self.pooling}|"

    def token_lengths(self, texts: list[str], prompt: str = "") -> list[int]:
        """Model tokens of each text with the prompt, special tokens included, truncated to the
        window: what a batch of them pads to."""
        if self.st is None:
            return [len(_FAKE_TOKEN.findall(prompt + text)) + 2 for text in texts]
        encoded = self.tokenizer([prompt + text for text in texts], add_special_tokens=True,
                                 truncation=bool(self.max_length), max_length=self.max_length,
                                 return_attention_mask=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def count_truncated(self, texts: list[str], features, prompt: str = "") -> int:
        """How many texts of a tokenized batch did not fit the model's window."""
        if self.st is None or not self.max_length:
            return 0
        lengths = features["attention_mask"].sum(dim=1).tolist()
        at_cap = [prompt + text for text, n in zip(texts, lengths) if n >= self.max_length]
        if not at_cap:
            return 0
        full = self.tokenizer(at_cap, add_special_tokens=True, truncation=False,
                              return_attention_mask=False)["input_ids"]
        return sum(len(ids) > self.max_length for ids in full)

    def token_spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        """Character (start, end) of every token of each text, special tokens left out."""
        if self.st is None:
            return [[m.span() for m in _FAKE_TOKEN.finditer(text)] for text in texts]
        encoded = self.tokenizer(list(texts), add_special_tokens=False, truncation=False,
                                 return_offsets_mapping=True, return_attention_mask=False)
        return [[tuple(span) for span in spans] for spans in encoded["offset_mapping"]]

    def special_tokens(self) -> int:
        """Tokens the tokenizer adds around one text ([CLS] and [SEP] for BERT)."""
        if self.st is None:
            return 0
        return self.tokenizer.num_special_tokens_to_add(pair=False)

    def prompt_tokens(self, prompt: str) -> int:
        if self.st is None or not prompt:
            return 0
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def start_pool(self, devices: list[str]):
        """sentence-transformers' multi-process pool, one worker per device."""
        if self.st is None or self.backend != "torch":
            raise UsageError("a pool of devices needs the torch backend and a real model")
        if self._modules is not None:
            raise UsageError("a pool of devices runs the whole model with its own pooling")
        cpu_workers = sum(d == "cpu" for d in devices)
        saved = os.environ.get("OMP_NUM_THREADS")
        if cpu_workers:  # the children read it at start-up: share the cores, no oversubscription
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_workers))
        try:
            return self.st.start_multi_process_pool(target_devices=devices)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved

    def encode_pool(self, pool, texts: list[str], batch_size: int = 32, prompt: str = "",
                    normalize: bool = True, dim: int | None = None):
        import numpy as np

        vectors = self.st.encode(list(texts), pool=pool, batch_size=batch_size,
                                 prompt=prompt or None, normalize_embeddings=normalize,
                                 truncate_dim=dim, convert_to_numpy=True,
                                 show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), dim or self.dim)

    def stop_pool(self, pool) -> None:
        self.st.stop_multi_process_pool(pool)

    def vector_settings(self, prompt: str = "", dim: int | None = None,
                        normalize: bool = True) -> dict:
        """Everything besides the text that decides a vector: the key space of
        vecpipe.core.cache (embed and eval share cached vectors through it)."""
        settings = {"model": self.name, "model_sha": self.sha, "prompt": prompt,
                    "dim": dim or self.dim, "normalize": normalize, "backend": self.backend,
                    "max_length": self.max_length, "dtype": self.precision}
        # only when set, so that caches made before these keys stay valid
        settings.update(self.space_options())
        return settings

    def space_options(self) -> dict:
        """layers and pooling, when with_space set them (what queries must be embedded with)."""
        return {key: value for key, value in (("layers", self.layers),
                                              ("pooling", self.pooling)) if value is not None}

    def metadata(self, prompt: str = "", normalized: bool = True, dim: int | None = None) -> dict:
        """The `vecpipe.*` keys describing vectors this model produced: their VectorSpace,
        then how they were made."""
        from vecpipe.core.space import VectorSpace
        from vecpipe.formats import __version__

        space = VectorSpace(model=self.name, model_sha=self.sha or None, prompt=prompt or None,
                            dim=str(dim or self.dim),
                            normalized="true" if normalized else "false",
                            layers=None if self.layers is None else str(self.layers),
                            pooling=self.pooling)
        meta = {**space.meta(), "dtype": "float32", "version": __version__}
        if self.backend != "torch":
            meta["backend"] = self.backend
        if self.precision != "float32":
            meta["precision"] = self.precision
        return meta


POOLING_MODES = ("cls", "mean", "max", "lasttoken", "weightedmean")


def _check_layers(layers, total, fake: bool) -> int | None:
    if layers is None:
        return None
    if layers < 1 or (total is not None and layers > total):
        raise ParameterError(f"layers {layers}: the model has 1 to {total} layers", "layers")
    if total is None and not fake:
        raise ParameterError("layers: the model does not say how many layers it has",
                             "layers")
    return None if layers == total else layers


def _check_pooling(pooling, own) -> str | None:
    if pooling is not None and pooling not in POOLING_MODES:
        raise ParameterError(f"pooling {pooling!r}: use {'|'.join(POOLING_MODES)}", "pooling")
    return None if pooling == own else pooling


def _pooling_module(st):
    modules = [] if st is None else list(st.children())
    return next((m for m in modules if type(m).__name__ == "Pooling"), None)


def _space_modules(st, pooling: str | None) -> list:
    """The model's modules, its Pooling module replaced by one pooling by `pooling`."""
    modules = list(st.children())
    if pooling is None:
        return modules
    own = _pooling_module(st)
    if own is None:
        raise ParameterError("pooling: the model has no Pooling module to replace", "pooling")
    from sentence_transformers.models import Pooling

    replacement = Pooling(own.embedding_dimension, pooling_mode=pooling,
                          include_prompt=own.include_prompt)
    return [replacement if module is own else module for module in modules]


class _first_layers:
    """Within it, `model` runs only its first `count` layers (None: all): the layer list (the
    ModuleList as long as the config's layer count) swapped for its head, then put back."""

    def __init__(self, model, count: int | None):
        self.model, self.count, self.swapped = model, count, None

    def __enter__(self):
        if self.count is None:
            return self
        import torch

        total = self.model.config.num_hidden_layers
        for module in self.model.modules():
            for name, child in module.named_children():
                if isinstance(child, torch.nn.ModuleList) and len(child) == total:
                    self.swapped = (module, name, child)
                    setattr(module, name, torch.nn.ModuleList(list(child)[:self.count]))
                    return self
        raise ParameterError("layers: cannot find the model's list of layers", "layers")

    def __exit__(self, *exc) -> None:
        if self.swapped is not None:
            module, name, child = self.swapped
            setattr(module, name, child)


def pooled_vectors(embedded, normalize: bool, dim: int | None):
    """A forward pass's sentence embeddings (torch) cut to `dim`, as float32, normalized."""
    import torch

    vectors = embedded["sentence_embedding"]
    if dim is not None:
        vectors = vectors[:, :dim]
    vectors = vectors.float()
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors


def _finish_numpy(vectors, normalize: bool, dim: int | None):
    import numpy as np

    if dim is not None:
        vectors = np.ascontiguousarray(vectors[:, :dim])
    if normalize and dim is not None and len(vectors):
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def fake_vectors(texts, dim: int, prompt: str = "", normalize: bool = True):
    """Deterministic hash-seeded Gaussian vectors: same text, same vector, on any machine."""
    import numpy as np

    out = np.empty((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        seed = int.from_bytes(hashlib.blake2b((prompt + text).encode(), digest_size=8).digest(),
                              "little")
        out[row] = np.random.default_rng(seed).standard_normal(dim)
    if normalize and len(texts):
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out
