"""Exported backends for core.embedder: the model's transformer as ONNX, run by onnxruntime
(float32 or dynamically quantized int8) or compiled by OpenVINO.

sentence-transformers' own ONNX path needs optimum, which does not install next to transformers 5,
so the export is done here with torch.onnx: the transformer alone (input ids and masks in, token
embeddings out). Pooling and normalization stay sentence-transformers' modules (core.embedder).

Files, each made once and atomically, beside the weights (`<model>/onnx/`) or, when that folder is
not writable, in the export folder given (else ~/.cache/vecpipe/onnx/):
  vecpipe-<sha>-fp32.onnx       plain ONNX ops (eager attention traced): OpenVINO reads this one
  vecpipe-<sha>-fp32-opt.onnx   onnxruntime's transformer fusions (attention, layer norm, GELU);
                                kept only when its output matches the plain file's
  vecpipe-<sha>-int8.onnx       the fused file with int8 weights in 7 bits (dynamic
                                quantization, reduce_range: CPUs without VNNI)
  vecpipe-<sha>-int8-full.onnx  the same in the whole 8-bit range, on CPUs with VNNI
Measured here (2 shared cores): fused float32 ~1.15x the unfused graph, fused int8 ~1.3x the
unfused int8 and ~1.8x torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import warnings

from vecpipe.formats.errors import DataError, UsageError

from vecpipe.core import notices
from vecpipe.core.cpu import has_vnni

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17


def runtime_for(model, backend: str, device: str, export_dir: str | None, dtype: str = "auto"):
    """A callable: tokenized features -> token embeddings (torch tensor), for `backend`."""
    plain = ensure_export(model, export_dir)
    if backend == "openvino":
        return OpenVinoRuntime(plain, device, bfloat16=dtype == "bfloat16")
    fused = ensure_fused(plain, model.st)
    if backend == "onnx":
        return OrtRuntime(fused, device)
    full_range = has_vnni()
    return OrtRuntime(ensure_int8(fused, full_range), device,
                      precision="int8" if full_range else "int8-reduced-range")


def export_folder(model, export_dir: str | None) -> str:
    """`<model>/onnx` when writable, else a folder per model under the export/cache dir."""
    if model.path:
        beside = os.path.join(model.path, "onnx")
        parent = beside if os.path.isdir(beside) else model.path
        if os.access(parent, os.W_OK):
            return beside
    root = export_dir or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                      or os.path.expanduser("~/.cache"), "vecpipe")
    key = hashlib.blake2b(f"{model.name}\0{model.sha}".encode(), digest_size=8).hexdigest()
    return os.path.join(root, "onnx", key)


def ensure_export(model, export_dir: str | None) -> str:
    """The float32 ONNX file of `model`'s transformer, exported on first use."""
    folder = export_folder(model, export_dir)
    path = os.path.join(folder, f"vecpipe-{model.sha or 'hub'}-fp32.onnx")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        notices.info(f"exporting {model.name} to ONNX (once): {path}")
        with _atomic_path(path) as tmp:
            export_transformer(model.st, tmp)
    return path


def ensure_fused(plain_path: str, st) -> str:
    """The file with onnxruntime's transformer fusions, or the plain one where fusing fails or
    changes the output."""
    path = plain_path.replace("-fp32.onnx", "-fp32-opt.onnx")
    if os.path.isfile(path):
        return path
    notices.info(f"optimizing the ONNX graph (once): {path}")
    with _atomic_path(path) as tmp:
        if not fuse_transformer(plain_path, tmp, st):
            notices.warn("onnxruntime could not fuse this model's graph; using the plain export")
            return plain_path
    return path


def ensure_int8(fp32_path: str, full_range: bool) -> str:
    """A dynamically quantized (int8 weights) copy of an exported model, made on first use:
    weights in their whole 8-bit range, or in 7 bits (reduce_range) for CPUs without VNNI."""
    suffix = "-int8-full.onnx" if full_range else "-int8.onnx"
    path = re.sub(r"-fp32(-opt)?\.onnx$", suffix, fp32_path)
    if not os.path.isfile(path):
        notices.info(f"quantizing to int8 (once): {path}")
        with _atomic_path(path) as tmp:
            quantize_int8(fp32_path, tmp, reduce_range=not full_range)
    return path


@contextlib.contextmanager
def _atomic_path(path: str):
    """A temporary name beside `path`, renamed onto it when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=".vecpipe-", suffix=".onnx", dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _transformer_module(st):
    modules = list(st.children())
    first = modules[0] if modules else None
    config = getattr(first, "modality_config", {}).get("text", {})
    if (type(first).__name__ != "Transformer" or config.get("method") != "forward"
            or config.get("method_output_name") not in ("last_hidden_state",
                                                        ["last_hidden_state"])):
        raise UsageError("this model cannot run on an exported backend (its first module is not "
                         "a plain text transformer)")
    return first


def export_transformer(st, path: str) -> None:
    """torch.onnx export of the transformer: named inputs in, last_hidden_state out."""
    import torch

    transformer = _transformer_module(st)
    tokenizer = st.tokenizer
    names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names]
    # Two texts of different lengths, so the traced graph contains the padding-mask path.
    sample = tokenizer(["vecpipe", "a longer sample text, so that the batch holds padding"],
                       padding=True, return_tensors="pt")

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs)), return_dict=True).last_hidden_state

    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    inner = transformer.model
    wrapped = Wrapped(inner).eval().float()
    attention = getattr(inner.config, "_attn_implementation", None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), \
            torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # Eager attention traces to the plain MatMul/Softmax pattern onnxruntime can fuse.
            if attention and hasattr(inner, "set_attn_implementation"):
                inner.set_attn_implementation("eager")
            torch.onnx.export(wrapped, tuple(sample[n] for n in names), path,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=_OPSET, dynamo=False)
        except Exception as err:  # noqa: BLE001 - many exporter failures, one message
            raise DataError(f"ONNX export failed: {type(err).__name__}: {err}") from None
        finally:
            if attention and hasattr(inner, "set_attn_implementation"):
                inner.set_attn_implementation(attention)


def fuse_transformer(src: str, dst: str, st) -> bool:
    """onnxruntime's BERT-family fusions into `dst`; False when they do not apply or change the
    output (checked on a padded sample against the plain graph)."""
    from onnxruntime.transformers import optimizer

    config = _transformer_module(st).model.config
    heads = getattr(config, "num_attention_heads", 0)
    hidden = getattr(config, "hidden_size", 0)
    try:
        with _quiet_logging():
            fused = optimizer.optimize_model(src, model_type="bert", num_heads=heads,
                                             hidden_size=hidden)
            if not fused.get_fused_operator_statistics().get("Attention"):
                return False
            fused.save_model_to_file(dst)
    except Exception:  # noqa: BLE001 - fusion is an optimization; the plain graph still works
        return False
    sample = st.tokenizer(["vecpipe", "a longer sample text, so that the batch holds padding"],
                          padding=True, return_tensors="np")
    plain, optimized = OrtRuntime(src, "cpu"), OrtRuntime(dst, "cpu")
    difference = (plain(sample) - optimized(sample)).abs().max().item()
    return difference < 1e-3


def quantize_int8(src: str, dst: str, reduce_range: bool) -> None:
    """Dynamic quantization: int8 weights per channel (MatMul, fused Attention), activations
    quantized on the fly.

    reduce_range keeps 7-bit weights: without VNNI (AVX2, AVX-512 without VNNI) the u8*s8
    pair sums of vpmaddubsw saturate at 16 bits. With VNNI the whole range is exact and closer
    to float32 (bench/int8_range.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logging():  # quantize_dynamic warns about optional pre-processing
        # DefaultTensorType: fused contrib ops (Attention...) defeat ONNX shape inference.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, extra_options={"DefaultTensorType": 1})


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class OrtRuntime:
    """onnxruntime session over an exported transformer; `precision` is what its weights are."""

    def __init__(self, path: str, device: str, precision: str = "float32"):
        self.precision = precision
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Like OMP_WAIT_POLICY=PASSIVE for torch: idle threads must not spin on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, features):
        import torch

        feed = {name: _as_int64(features, name) for name in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


class OpenVinoRuntime:
    """The exported ONNX file compiled by OpenVINO for the CPU.

    The precision is always set explicitly: OpenVINO's CPU plugin otherwise picks bfloat16 on
    CPUs with AMX or AVX512-BF16, so the same command would give other vectors on another machine.
    """

    def __init__(self, path: str, device: str, bfloat16: bool = False):
        import openvino as ov

        if device != "cpu":
            raise UsageError(f"OpenVINO runs on the CPU here, not on {device}")
        core = ov.Core()
        # Without bfloat16 support it runs float32: `precision` says which, the caller tells.
        if bfloat16 and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            bfloat16 = False
        self.precision = "bfloat16" if bfloat16 else "float32"
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32"}
        self.compiled = core.compile_model(core.read_model(path), "CPU", hint)
        self.names = [port.get_any_name() for port in self.compiled.inputs]

    def __call__(self, features):
        import torch

        result = self.compiled({name: _as_int64(features, name) for name in self.names})
        return torch.from_numpy(result[self.compiled.output(0)].copy())


def _as_int64(features, name: str):
    import numpy as np

    if name not in features and name == "token_type_ids":
        return np.zeros(tuple(features["input_ids"].shape), dtype=np.int64)
    value = features[name]
    value = value.numpy() if hasattr(value, "numpy") else value
    return np.ascontiguousarray(value, dtype=np.int64)
