"""The compress codec: a fitted, serialisable transform from float32 embeddings to compact codes.

Steps, each optional, always applied in this order:

1. `dim`: keep the leading `dim` dimensions (Matryoshka truncation), re-normalise.
2. `pca`: project on the top `pca` principal directions of the calibration sample, re-normalise.
   The directions are those of the uncentred second moment (numpy `eigh` of X^T X, i.e. a
   truncated SVD), which best preserve dot products. Centring on the corpus mean (textbook PCA)
   lost 2.5-3.3 more nDCG@10 points on NFCorpus with MiniLM (0.268 vs 0.301 at 128 dims;
   float32 0.316): queries and documents do not share a mean, and the mean direction carries
   ranking signal.
   `center=True` (compress --pca-center, as PCA-RAG and scikit-learn's PCA do) is the textbook
   option: the directions are those of the centred covariance, and the calibration mean is
   subtracted before projecting (`x - mean`, saved with the codec, so queries are centred by
   the same mean). With `normalize`, a vector is made unit length before centring (the space
   the mean was taken in, and project stays blind to a vector's scale as uncentred PCA is) and
   the projection is re-normalised as in the uncentred path, so dot products are the cosines
   of the centred, projected vectors.
3. `to`: quantise to float32 (none), float16, bfloat16, int8/uint8 (per-dimension ranges fitted on
   the calibration sample, optionally at quantiles; values outside are clipped, never wrapped),
   or binary/ubinary (sign bits).

Re-normalising happens only when the codec was fitted with `normalize=True` (the input vectors
were unit length), so dot products in the reduced space are cosines again.

Vocabulary used by every caller (compress, index, search):

- `project(x)`: steps 1-2; float32 in the *reduced space* (`out_dim` columns).
- `encode(x)`: project + quantise -> codes (numpy, `code_dtype`).
- `decode(codes)`: float32 reconstruction of `project(x)` (not of x: dropped dims are gone).
- `transform(q)`: a float query in *code coordinates*: `transform(q) @ code_matrix(c).T` ranks
  documents exactly like `project(q) @ decode(c).T` (they differ by a per-query constant,
  `offset(q)`). This is asymmetric scoring: float queries against int8/binary codes lose far less
  than quantising the query too.
- `score(q, codes)`: `project(q) @ decode(codes).T`, computed as above (brute force / rescoring).

How codes are carried (numpy / Arrow `embedding` column / JSONL):

- float16: float16 / fixed_size_list<float16> / numbers.
- bfloat16: uint16 holding the upper half of the float32 bit pattern (rounded to nearest even) /
  fixed_size_list<uint16> / integers 0-65535. Arrow has no bfloat16 type; uint16 keeps the two
  bytes per value, and `vecpipe.dtype = bfloat16` plus the codec say how to read them.
- int8 / uint8: fixed_size_list<int8|uint8> / integers. Code k of dimension i stands for
  `low[i] + (k + 128) * step[i]` (int8) or `low[i] + k * step[i]` (uint8), step = range / 255.
- binary / ubinary: uint8 (rows x ceil(dim/8)) sign bits `x > 0` packed by `numpy.packbits`
  (dimension 0 is the most significant bit of byte 0) / fixed_size_binary / 0-255 integers.
  Both names give the same bytes: sentence-transformers' `ubinary` exactly; its `binary` is the
  same bytes minus 128 as int8, a representation vecpipe does not need since Arrow carries bytes.
  `decode` maps a bit to the calibration mean of the values on its side of zero (per dimension).

JSONL carries no metadata: a reader of JSONL codes needs the codec (`compress --codec FILE`);
`codes_from_matrix` turns the float32 numbers the JSONL reader produces back into codes.

Serialisation: `to_json()` is canonical (sorted keys, arrays as base64 of little-endian float32),
so two streams have the same codec exactly when their `vecpipe.codec` strings are equal. The PCA
projection is embedded in the JSON (384x128 float32 is ~260 KB of base64), together with its
SHA-256 (`pca.sha256`, the "PCA hash"): a stream or index then describes itself completely and
a user never has to keep a side file next to it; `index` stores the same JSON in its folder. A
codec without PCA is a few KB. A centred codec adds `pca.mean`, and its hash covers the
directions then the mean; a codec without `pca.mean` (every earlier one) is uncentred.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Callable, Iterator, Mapping

import numpy as np

from vecpipe.formats.errors import DataError, UsageError

FORMAT_VERSION = 1
TARGETS = ("float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary", "pq")
BIT_TARGETS = ("binary", "ubinary")
SCALAR_TARGETS = ("int8", "uint8")
# The index storage types (index --dtype) whose codes come from a codec fitted on the vectors.
FITTED_INDEX_DTYPES = {"i8": "int8", "b1": "binary"}
_CODE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                "int8": np.int8, "uint8": np.uint8, "binary": np.uint8, "ubinary": np.uint8,
                "pq": np.uint8}
_CODE_OFFSET = {"int8": 128.0, "uint8": 0.0}  # code k of a scalar target is level k + offset
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


class Codec:
    """A fitted transform. Build with `Codec.fit(...)` or `Codec.from_json(...)`."""

    def __init__(self, to: str, input_dim: int, *, dim: int | None = None,
                 pca_components: np.ndarray | None = None,
                 pca_explained: float | None = None, pca_mean: np.ndarray | None = None,
                 normalize: bool = True,
                 low: np.ndarray | None = None, high: np.ndarray | None = None,
                 clip_quantile: float | None = None, calibration_rows: int | None = None,
                 model: str | None = None, scales: np.ndarray | None = None,
                 pq=None):
        if to not in TARGETS:
            raise UsageError(f"unknown codec target {to!r}; choose from {', '.join(TARGETS)}")
        self.to = to
        self.input_dim = int(input_dim)
        self.dim = None if dim is None else int(dim)
        self.pca_components = _f32_or_none(pca_components)  # (truncated dim) x out_dim
        self.pca_explained = pca_explained
        self.pca_mean = _f32_or_none(pca_mean)  # (truncated dim,) for centred PCA, else None
        self.normalize = bool(normalize)
        self.low = _f32_or_none(low)    # scalar: range start; bits: level of a 0 bit
        self.high = _f32_or_none(high)  # scalar: range end; bits: level of a 1 bit
        self.clip_quantile = clip_quantile
        self.calibration_rows = calibration_rows
        self.model = model
        self.scales = _f32_or_none(scales)  # multi-bit binary: plane x out_dim residual scales
        self.pq = pq  # a core.pq.ProductQuantizer for the pq target

    # ----- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, sample: np.ndarray, to: str = "float32", dim: int | None = None,
            pca: int | None = None, clip_quantile: float | None = None, *,
            normalize: bool = True, model: str | None = None,
            center: bool = False, bits: int = 1, pq_m: int | None = None, pq_bits: int = 8,
            opq: bool = False) -> "Codec":
        """Fit on a calibration sample (rows x input_dim float vectors); `center`: centred
        PCA (see the module docstring); `bits`: bit planes of a binary target; `pq_*`, `opq`:
        the product quantiser of the pq target."""
        sample = _as_matrix(sample)
        rows, input_dim = sample.shape
        if to not in TARGETS:
            raise UsageError(f"unknown codec target {to!r}; choose from {', '.join(TARGETS)}")
        _check_fit_options(to, input_dim, rows, dim, pca, clip_quantile)
        _check_code_options(to, bits, pq_m, opq)
        if center and pca is None:
            raise UsageError("centring applies to PCA only: give a number of PCA components")
        codec = cls(to, input_dim, dim=dim, normalize=normalize, clip_quantile=clip_quantile,
                    calibration_rows=rows, model=model)
        reduced = codec._truncate(sample)
        if pca is not None:
            if center:
                codec.pca_mean = codec._renormalize(reduced).mean(
                    axis=0, dtype=np.float64).astype(np.float32)
            codec.pca_components, codec.pca_explained = _fit_pca(codec._centre(reduced), pca)
            reduced = codec._pca(reduced)
        if to in SCALAR_TARGETS:
            codec.low, codec.high = _fit_ranges(reduced, clip_quantile)
        elif to in BIT_TARGETS and bits > 1:
            codec.scales = fit_residual_scales(reduced, bits)
        elif to in BIT_TARGETS:
            codec.low, codec.high = _fit_bit_levels(reduced)
        elif to == "pq":
            from vecpipe.core.pq import ProductQuantizer

            codec.pq = ProductQuantizer.train(reduced, pq_m, pq_bits, opq=opq)
        return codec

    # ----- shape facts ---------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        """Dimensions after truncation/PCA (for bit targets: bits, not bytes)."""
        if self.pca_components is not None:
            return int(self.pca_components.shape[1])
        return self.dim or self.input_dim

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(_CODE_DTYPES[self.to])

    @property
    def bits(self) -> int:
        """Bit planes of a binary target (1: sign bits), else 1."""
        return 1 if self.scales is None else int(self.scales.shape[0])

    @property
    def plane_width(self) -> int:
        """Bytes of one plane of packed bits."""
        return (self.out_dim + 7) // 8

    @property
    def code_width(self) -> int:
        """Columns of a code matrix: out_dim, bytes of packed bits (every plane), or the
        sub-vector numbers of pq."""
        if self.to == "pq":
            return self.pq.m
        return self.plane_width * self.bits if self.to in BIT_TARGETS else self.out_dim

    @property
    def bytes_per_vector(self) -> int:
        return self.code_width * self.code_dtype.itemsize

    @property
    def is_centred(self) -> bool:
        return self.pca_mean is not None

    @property
    def is_bits(self) -> bool:
        return self.to in BIT_TARGETS

    @property
    def scored_decoded(self) -> bool:
        """PQ codes and several bit planes: ranked by the float query against what they decode
        to (ADC; the planes' scale-weighted sum), which no usearch metric computes."""
        return self.to == "pq" or self.bits > 1

    def describe(self) -> str:
        """A short human description, e.g. `384 -> pca 128 -> int8 (128 B/vector)`."""
        steps = [str(self.input_dim)]
        if self.dim is not None:
            steps.append(f"dim {self.dim}")
        if self.pca_components is not None:
            steps.append(f"pca {self.out_dim}" + (" centred" if self.is_centred else ""))
        steps.append(self.to + (f" {self.bits} bits" if self.bits > 1 else "")
                     + (self._pq_description() if self.to == "pq" else ""))
        return " -> ".join(steps) + f" ({self.bytes_per_vector} B/vector)"

    # ----- the transform -------------------------------------------------------------------
    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Truncation and PCA (float32, out_dim columns)."""
        vectors = self._check_input(vectors)
        reduced = self._truncate(vectors)
        if self.pca_components is not None:
            reduced = self._pca(reduced)
        return reduced

    def pca_input(self, vectors: np.ndarray) -> np.ndarray:
        """What the PCA directions are applied to: the truncated vectors, centred on the
        calibration mean for a centred codec (float32)."""
        return self._centre(self._truncate(self._check_input(vectors)))

    def lift(self, reduced: np.ndarray) -> np.ndarray:
        """Vectors of the reduced space (`project`'s output) -> the input space, such that
        `project(lift(r))` is `r` (re-normalised when the codec normalises): PCA undone with
        its orthonormal directions (plus the mean, scaled so the vector is unit length before
        centring when the codec normalises), truncated dimensions filled with zeros."""
        vectors = _as_matrix(reduced)
        if self.pca_components is not None:
            vectors = vectors @ self.pca_components.T
            if self.is_centred:
                vectors = _uncentre(vectors, self.pca_mean, self.normalize)
        if vectors.shape[1] < self.input_dim:
            vectors = np.pad(vectors, ((0, 0), (0, self.input_dim - vectors.shape[1])))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """float32 vectors (rows x input_dim) -> codes (rows x code_width, code_dtype)."""
        return self.quantize(self.project(vectors))

    def quantize(self, reduced: np.ndarray) -> np.ndarray:
        """Vectors already in the reduced space -> codes."""
        reduced = np.asarray(reduced, dtype=np.float32)
        if self.to == "float32":
            return np.ascontiguousarray(reduced)
        if self.to == "float16":
            return np.clip(reduced, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
        if self.to == "bfloat16":
            return float32_to_bfloat16_bits(reduced)
        if self.to in SCALAR_TARGETS:
            levels = (reduced - self.low) / self._steps()
            np.rint(levels, out=levels)
            np.clip(levels, 0, 255, out=levels)
            levels -= _CODE_OFFSET[self.to]
            return levels.astype(self.code_dtype)
        if self.to == "pq":
            return self.pq.encode(reduced)
        if self.bits > 1:
            return residual_planes(reduced, self.scales)
        return np.packbits(reduced > 0, axis=-1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> float32 reconstruction of `project(x)`."""
        codes = self._check_codes(codes)
        if self.to in ("float32", "float16"):
            return codes.astype(np.float32)
        if self.to == "bfloat16":
            return bfloat16_bits_to_float32(codes)
        if self.to in SCALAR_TARGETS:
            return (self.low + (codes.astype(np.float32) + _CODE_OFFSET[self.to])
                    * self._steps()).astype(np.float32)
        if self.to == "pq":
            return self.pq.decode(codes)
        if self.bits > 1:
            return _planes_sum(codes, self.out_dim, self.scales)
        bits = self.code_matrix(codes)
        return (self.low + bits * (self.high - self.low)).astype(np.float32)

    def code_matrix(self, codes: np.ndarray) -> np.ndarray:
        """Codes as float32 numbers, one column per reduced dimension (bits unpacked to 0/1)."""
        codes = self._check_codes(codes)
        if self.to in BIT_TARGETS:
            return unpack_planes(codes, self.out_dim, self.bits)
        if self.to == "pq":
            return self.pq.decode(codes)
        if self.to == "bfloat16":
            return bfloat16_bits_to_float32(codes)
        return codes.astype(np.float32)

    def transform(self, queries: np.ndarray) -> np.ndarray:
        """Float queries in code coordinates: `transform(q) @ code_matrix(c).T + offset(q)`
        equals `project(q) @ decode(c).T`, so without the offset it ranks the same."""
        reduced = self.project(queries)
        if self.to in SCALAR_TARGETS:
            return (reduced * self._steps()).astype(np.float32)
        if self.to in BIT_TARGETS and self.bits > 1:
            return (2 * reduced[:, None, :] * self.scales).reshape(len(reduced), -1)
        if self.to in BIT_TARGETS:
            return (reduced * (self.high - self.low)).astype(np.float32)
        return reduced

    def offset(self, queries: np.ndarray) -> np.ndarray:
        """The per-query constant that turns `transform(q) @ code_matrix(c).T` into a score."""
        reduced = self.project(queries)
        if self.to in SCALAR_TARGETS:
            zero = self.low + _CODE_OFFSET[self.to] * self._steps()
            return (reduced @ zero).astype(np.float32)
        if self.to in BIT_TARGETS and self.bits > 1:
            return -(reduced @ self.scales.sum(axis=0)).astype(np.float32)
        if self.to in BIT_TARGETS:
            return (reduced @ self.low).astype(np.float32)
        return np.zeros(len(reduced), dtype=np.float32)

    def score(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Asymmetric scores (queries x codes): float queries against the decoded codes
        (pq: ADC, q . reconstruction)."""
        if self.to == "pq":
            return self.pq.scores(self.project(queries), self._check_codes(codes))
        matrix = self.code_matrix(codes)
        return self.transform(queries) @ matrix.T + self.offset(queries)[:, None]

    # ----- Arrow and JSONL -----------------------------------------------------------------
    def arrow_type(self):
        import pyarrow as pa

        if self.to in BIT_TARGETS:
            return pa.binary(self.code_width)
        return pa.list_(pa.from_numpy_dtype(self.code_dtype), self.code_width)

    def to_arrow(self, codes: np.ndarray):
        """Codes as the `embedding` column type (fixed_size_list or fixed_size_binary)."""
        from vecpipe.formats.schema import numpy_to_packed_bits, numpy_to_vectors

        codes = self._check_codes(codes)
        return numpy_to_packed_bits(codes) if self.is_bits else numpy_to_vectors(codes)

    def codes_from_matrix(self, matrix: np.ndarray, source: str | None = None) -> np.ndarray:
        """Codes read back from any numeric matrix (Arrow codes, or the float32 numbers the JSONL
        reader makes of them): checks width, integrality and range; never wraps."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[1] != self.code_width:
            width = matrix.shape[1] if matrix.ndim == 2 else "?"
            raise DataError(f"vectors have {width} values, the codec ({self.describe()}) "
                            f"makes {self.code_width}", source=source,
                            hint="was this stream compressed with this codec?")
        if matrix.dtype == self.code_dtype:
            return matrix
        if self.to in ("float32", "float16"):
            return matrix.astype(self.code_dtype)
        info = np.iinfo(self.code_dtype)
        bad = (matrix < info.min) | (matrix > info.max)
        if matrix.dtype.kind == "f":
            bad |= ~np.isfinite(matrix) | (matrix != np.round(matrix))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DataError(f"value {matrix[row][bad[row]][0]!r} is not a {self.to} code "
                            f"(integers {info.min}..{info.max})", source=source, record=row + 1)
        return matrix.astype(self.code_dtype)

    def metadata(self) -> dict[str, str]:
        """The `vecpipe.*` keys a compressed stream carries."""
        return {"codec": self.to_json(), "dtype": self.to, "dim": str(self.out_dim)}

    # ----- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"format": FORMAT_VERSION, "to": self.to, "input_dim": self.input_dim,
                "dim": self.dim, "normalize": self.normalize, "model": self.model,
                "calibration_rows": self.calibration_rows, "pca": None, "levels": None}
        if self.pca_components is not None:
            components = _encode_array(self.pca_components)
            data["pca"] = {"components": components, "kept_energy": self.pca_explained,
                           "sha256": _array_hash(*self._pca_arrays())}
            if self.is_centred:  # absent in uncentred codecs, whose JSON stays as it was
                data["pca"]["mean"] = _encode_array(self.pca_mean)
        if self.low is not None:
            data["levels"] = {"low": _encode_array(self.low), "high": _encode_array(self.high),
                              "clip_quantile": self.clip_quantile}
        if self.scales is not None:  # keys absent from 1-bit codecs, whose JSON stays as it was
            data["planes"] = {"bits": self.bits, "scales": _encode_array(self.scales)}
        if self.pq is not None:
            data["pq"] = {"centroids": _encode_array(self.pq.centroids),
                          "rotation": None if self.pq.rotation is None
                          else _encode_array(self.pq.rotation)}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def identity(self) -> str:
        """The canonical form compared between streams: only what changes the vectors. How
        the codec was fitted (calibration rows, quantile, kept energy, the model, recorded
        under its own key) is left out, so a parameter-free transform (truncation, float16)
        compares equal however it was produced, and a fitted one by its parameters."""
        data = self.to_dict()
        del data["calibration_rows"], data["model"]
        if data["dim"] == self.input_dim:
            data["dim"] = None  # truncation to every dimension keeps the vectors
        if data["pca"]:
            data["pca"] = {"sha256": data["pca"]["sha256"]}
        if data["levels"]:
            data["levels"] = {key: data["levels"][key] for key in ("low", "high")}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def query_dims(self) -> tuple[int, ...]:
        """Dimensions of float vectors `project` takes: the input's and, for truncation
        without PCA, the truncated one (truncating again changes nothing; `embed --dim`)."""
        if self.dim is not None and self.pca_components is None and self.dim != self.input_dim:
            return self.input_dim, self.dim
        return (self.input_dim,)

    def expected_dims(self) -> str:
        """`384` or `384 (or 128, already truncated)`, for error messages."""
        dims = self.query_dims
        return str(dims[0]) + (f" (or {dims[1]}, already truncated)" if len(dims) > 1 else "")

    @classmethod
    def from_dict(cls, data: Mapping) -> "Codec":
        try:
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported codec format {data.get('format')!r}")
            pca = data.get("pca") or {}
            levels = data.get("levels") or {}
            planes, pq_data = data.get("planes") or {}, data.get("pq")
            codec = cls(data["to"], data["input_dim"], dim=data.get("dim"),
                        pca_components=_decode_array(pca.get("components")),
                        pca_explained=pca.get("kept_energy"),
                        pca_mean=_decode_array(pca.get("mean")),
                        normalize=data.get("normalize", True),
                        low=_decode_array(levels.get("low")),
                        high=_decode_array(levels.get("high")),
                        clip_quantile=levels.get("clip_quantile"),
                        calibration_rows=data.get("calibration_rows"), model=data.get("model"),
                        scales=_decode_array(planes.get("scales")), pq=_pq_from_dict(pq_data))
            if pca and pca.get("sha256") != _array_hash(*codec._pca_arrays()):
                raise ValueError("PCA projection does not match its sha256")
            codec._check_consistent()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"invalid codec: {err}") from None
        return codec

    @classmethod
    def from_json(cls, text: str | bytes) -> "Codec":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise DataError(f"invalid codec JSON: {err}") from None
        if not isinstance(data, dict):
            raise DataError("invalid codec JSON: expected an object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str) -> "Codec":
        """Read a codec file written by `compress --save-codec`."""
        try:
            with open(path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            raise DataError("no such codec file", source=path) from None
        except OSError as err:
            raise DataError(f"cannot read codec file: {err.strerror}", source=path) from None
        try:
            return cls.from_json(text)
        except DataError as err:
            raise err.located(path)

    def __eq__(self, other) -> bool:
        return isinstance(other, Codec) and self.identity() == other.identity()

    def __repr__(self) -> str:
        return f"<Codec {self.describe()}>"

    # ----- internals -----------------------------------------------------------------------
    def _check_input(self, vectors: np.ndarray) -> np.ndarray:
        vectors = _as_matrix(vectors)
        if vectors.shape[1] not in self.query_dims:
            raise DataError(f"vectors have {vectors.shape[1]} dimensions, the codec expects "
                            f"{self.expected_dims()}", hint="use the codec fitted on vectors "
                                                            "of the same model")
        return vectors

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim == 1:
            codes = codes[None, :]
        if codes.shape[1] != self.code_width or codes.dtype != self.code_dtype:
            raise DataError(f"codes are {codes.dtype} x {codes.shape[1]}, the codec makes "
                            f"{self.code_dtype} x {self.code_width}")
        return codes

    def _truncate(self, vectors: np.ndarray) -> np.ndarray:
        if self.dim is None or self.dim == self.input_dim:
            return vectors
        return self._renormalize(vectors[:, :self.dim])

    def _pca(self, vectors: np.ndarray) -> np.ndarray:
        return self._renormalize(self._centre(vectors) @ self.pca_components)

    def _centre(self, vectors: np.ndarray) -> np.ndarray:
        if self.pca_mean is None:
            return vectors
        return self._renormalize(vectors) - self.pca_mean

    def _pca_arrays(self) -> tuple[np.ndarray, ...]:
        """What the PCA hash covers: the directions, and the mean of a centred codec."""
        if self.pca_mean is None:
            return (self.pca_components,)
        return self.pca_components, self.pca_mean

    def _renormalize(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.normalize:
            return vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1)

    def _pq_description(self) -> str:
        return (f" m{self.pq.m}x{self.pq.bits}" + (" opq" if self.pq.rotation is not None
                                                   else ""))

    def _steps(self) -> np.ndarray:
        steps = (self.high - self.low) / 255
        return np.where(steps > 0, steps, 1).astype(np.float32)

    def _check_consistent(self) -> None:
        if self.dim is not None and not 0 < self.dim <= self.input_dim:
            raise ValueError(f"dim {self.dim} outside 1..{self.input_dim}")
        reduced_dim = self.dim or self.input_dim
        if self.pca_components is not None and (
                self.pca_components.ndim != 2 or self.pca_components.shape[0] != reduced_dim):
            raise ValueError("PCA projection shape does not match the dimensions")
        if self.pca_mean is not None and (self.pca_components is None
                                          or self.pca_mean.shape != (reduced_dim,)):
            raise ValueError("PCA mean does not match the dimensions")
        if self.scales is not None and (self.to not in BIT_TARGETS or self.scales.ndim != 2
                                        or self.scales.shape[1] != self.out_dim):
            raise ValueError(f"bit-plane scales need a binary target of {self.out_dim} values")
        if (self.to == "pq") != (self.pq is not None) or (
                self.pq is not None and self.pq.dim != self.out_dim):
            raise ValueError(f"a pq codec needs centroids for {self.out_dim} dimensions")
        needs_levels = self.to in SCALAR_TARGETS or (self.to in BIT_TARGETS and self.bits == 1)
        if needs_levels and (self.low is None or self.high is None
                             or self.low.shape != (self.out_dim,)
                             or self.high.shape != (self.out_dim,)):
            raise ValueError(f"{self.to} codec needs low/high levels of {self.out_dim} values")


def first_vectors(items: Iterator, rows: int, vectors_of: Callable) -> tuple[list, np.ndarray]:
    """(the batches read, the first `rows` vectors of them as one float32 matrix): reads
    `items` until `rows` vectors are in hand, through `vectors_of(item)`. Memory holds at
    most `rows` rows plus one batch; the caller goes on with the batches read, then `items`."""
    buffered, parts, count = [], [], 0
    while count < rows:
        item = next(items, None)
        if item is None:
            break
        buffered.append(item)
        vectors = vectors_of(item)[:rows - count]
        parts.append(vectors)
        count += len(vectors)
    return buffered, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def fit_on_first(items: Iterator, rows: int, vectors_of: Callable, to: str,
                 **options) -> tuple[Codec, list]:
    """A `to` codec (`options` as `Codec.fit`'s) fitted on the first `rows` vectors of `items`
    (see `first_vectors`), and the batches read to fit it."""
    buffered, sample = first_vectors(items, rows, vectors_of)
    return Codec.fit(sample, to=to, **options), buffered


def codec_from_meta(meta: Mapping[str, str], source: str | None = None) -> Codec | None:
    """The codec recorded in a stream's `vecpipe.*` metadata (`codec` key), or None."""
    text = meta.get("codec")
    if not text:
        return None
    try:
        return Codec.from_json(text)
    except DataError as err:
        err.message = f"vecpipe.codec metadata: {err.message}"
        raise err.located(source)


def accepted_query_dims(meta: Mapping[str, str], dim: int) -> tuple[tuple[int, ...], str]:
    """(the float query dimensions vectors described by `meta` take, how to say it): those of
    their codec (its input, or already truncated, see `Codec.query_dims`), or `dim`."""
    codec = codec_from_meta(meta)
    if codec is None:
        return (dim,), str(dim)
    return codec.query_dims, codec.expected_dims()


def codec_difference(text_a: str, text_b: str) -> tuple[str, str] | None:
    """None when two `vecpipe.codec` values make the same vectors (see `Codec.identity`), else
    how to show each, e.g. `384 -> dim 128 -> int8 (128 B/vector)` and the same with
    `; levels differ`. A value that is not a codec (merge's `none`) is shown as it is."""
    if text_a == text_b:
        return None
    try:
        a, b = Codec.from_json(text_a), Codec.from_json(text_b)
    except DataError:
        return repr(text_a[:200]), repr(text_b[:200])
    if a.identity() == b.identity():
        return None
    data_a, data_b = json.loads(a.identity()), json.loads(b.identity())
    fields = [key for key in sorted(data_a) if data_a[key] != data_b[key]]
    return a.describe(), f"{b.describe()}; {' and '.join(fields)} differ"


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16), rounding to nearest even like torch and CPUs do."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def hamming_distances(query_bits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Bit differences between packed-bit queries and codes (queries x codes, int32)."""
    query_bits = np.asarray(query_bits, dtype=np.uint8)
    codes = np.asarray(codes, dtype=np.uint8)
    out = np.empty((len(query_bits), len(codes)), dtype=np.int32)
    for row, query in enumerate(query_bits):
        out[row] = _POPCOUNT[codes ^ query].sum(axis=1, dtype=np.int32)
    return out


def residual_planes(reduced: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Multi-bit residual binarisation (Tencent's BEBR): plane k holds the signs of what
    planes 0..k-1 left, `r_k = r_{k-1} - s_k * sign_k` from r_0 = x (a bit is r > 0, sign
    +1, else -1). Packed planes side by side (rows x planes * ceil(dim/8) uint8)."""
    residual = np.array(reduced, dtype=np.float32)
    planes = []
    for scale in scales:
        positive = residual > 0
        planes.append(np.packbits(positive, axis=-1))
        residual -= np.where(positive, scale, -scale)
    return np.concatenate(planes, axis=1)


def fit_residual_scales(reduced: np.ndarray, bits: int) -> np.ndarray:
    """Per plane and dimension, mean |residual| on the calibration rows: the least-squares
    scale of that plane's signs (planes x dim float32)."""
    residual = np.array(reduced, dtype=np.float64)
    scales = np.empty((bits, residual.shape[1]))
    for plane in range(bits):
        scales[plane] = np.abs(residual).mean(axis=0)
        residual -= np.where(residual > 0, scales[plane], -scales[plane])
    return scales.astype(np.float32)


def unpack_planes(codes: np.ndarray, dim: int, planes: int) -> np.ndarray:
    """Packed planes -> 0/1 float32 (rows x planes * dim), plane after plane."""
    width = (dim + 7) // 8
    return np.concatenate([np.unpackbits(codes[:, p * width:(p + 1) * width], axis=-1,
                                         count=dim) for p in range(planes)],
                          axis=1).astype(np.float32)


def _planes_sum(codes: np.ndarray, dim: int, scales: np.ndarray) -> np.ndarray:
    """sum_k s_k * sign_k of packed planes, as 2 * sum_k s_k * bit_k - sum_k s_k, one plane
    at a time: no rows x planes * dim float matrix (rescoring decodes many candidates)."""
    width = (dim + 7) // 8
    out = np.empty((len(codes), dim), dtype=np.float32)
    out[:] = -scales.sum(axis=0, dtype=np.float32)
    term = np.empty_like(out)
    for plane, scale in enumerate(scales):
        bits = np.unpackbits(codes[:, plane * width:(plane + 1) * width], axis=-1, count=dim)
        np.multiply(bits, 2 * scale, out=term)
        out += term
    return out


def _pq_from_dict(data):
    if not data:
        return None
    from vecpipe.core.pq import ProductQuantizer

    centroids = _decode_array(data["centroids"])
    if centroids.ndim != 3 or centroids.shape[1] not in [2 ** b for b in range(1, 9)]:
        raise ValueError("pq centroids must be m x 2^bits x sub-dimensions")
    return ProductQuantizer(centroids, _decode_array(data.get("rotation")))


# ----- fitting helpers -----------------------------------------------------------------------
def _check_code_options(to, bits, pq_m, opq) -> None:
    if bits != 1 and to not in BIT_TARGETS:
        raise UsageError("bit planes apply to binary targets only")
    if not 1 <= bits <= 8:
        raise UsageError(f"binary bit planes must be between 1 and 8, not {bits}")
    if (pq_m is not None or opq) and to != "pq":
        raise UsageError("PQ sub-vectors and OPQ apply to the pq target only")
    if to == "pq" and pq_m is None:
        raise UsageError("the pq target needs a number of sub-vectors (m)")


def _check_fit_options(to, input_dim, rows, dim, pca, clip_quantile) -> None:
    if rows == 0:
        raise DataError("no vectors to calibrate the codec on")
    if dim is not None and not 0 < dim <= input_dim:
        raise UsageError(f"dim {dim} must be between 1 and the input's {input_dim} dimensions")
    reduced_dim = dim or input_dim
    if pca is not None:
        if not 0 < pca <= reduced_dim:
            raise UsageError(f"pca {pca} must be between 1 and {reduced_dim} dimensions")
        if rows < pca:
            raise DataError(f"PCA with {pca} components needs at least {pca} calibration rows, "
                            f"got {rows}", hint="calibrate on more rows or keep fewer PCA components")
    if clip_quantile is not None:
        if to not in SCALAR_TARGETS:
            raise UsageError("a clip quantile applies to int8/uint8 only")
        if not 0 <= clip_quantile < 0.5:
            raise UsageError("the clip quantile must be in [0, 0.5), e.g. 0.001")


def _fit_pca(vectors: np.ndarray, components: int):
    """The top principal directions of the sample as given (dim x components) and the share
    of the squared norm they keep: of the uncentred second moment, or, for a sample centred
    already, of the covariance (the share of variance, scikit-learn's explained variance)."""
    sample = vectors.astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(sample.T @ sample)
    order = np.argsort(eigenvalues)[::-1][:components]
    directions = eigenvectors[:, order]
    # eigh's signs are arbitrary; fix them so the same sample gives the same codec everywhere
    flip = np.sign(directions[np.abs(directions).argmax(axis=0), np.arange(components)])
    directions *= np.where(flip == 0, 1, flip)
    total = float(np.clip(eigenvalues, 0, None).sum())
    kept = float(np.clip(eigenvalues[order], 0, None).sum() / total) if total > 0 else 1.0
    return directions.astype(np.float32), round(kept, 6)


def _uncentre(directions: np.ndarray, mean: np.ndarray, unit: bool) -> np.ndarray:
    """`mean + t * d` per row d: t = 1, or with `unit` the t > 0 that makes it unit length,
    so that normalising and centring it gives back a multiple of d (needs |mean| < 1, true of
    the mean of distinct unit vectors)."""
    if not unit:
        return directions + mean
    d = directions.astype(np.float64)
    m = mean.astype(np.float64)
    dd = np.maximum((d * d).sum(axis=1), 1e-30)
    md = d @ m
    t = (-md + np.sqrt(np.maximum(md * md + dd * (1.0 - m @ m), 0.0))) / dd
    return (m + t[:, None] * d).astype(np.float32)


def _fit_ranges(vectors: np.ndarray, clip_quantile: float | None):
    if clip_quantile:
        low = np.quantile(vectors, clip_quantile, axis=0)
        high = np.quantile(vectors, 1 - clip_quantile, axis=0)
    else:
        low, high = vectors.min(axis=0), vectors.max(axis=0)
    return low.astype(np.float32), high.astype(np.float32)


def _fit_bit_levels(vectors: np.ndarray):
    """Per dimension, the mean of the calibration values at or below zero (a 0 bit) and above
    zero (a 1 bit): the least-squares reconstruction of each bit. A side no sample fell on
    mirrors the other."""
    positive = vectors > 0
    count_pos = positive.sum(axis=0)
    count_neg = len(vectors) - count_pos
    sum_pos = np.where(positive, vectors, 0).sum(axis=0, dtype=np.float64)
    sum_neg = np.where(positive, 0, vectors).sum(axis=0, dtype=np.float64)
    high = np.divide(sum_pos, count_pos, out=np.full(vectors.shape[1], np.nan),
                     where=count_pos > 0)
    low = np.divide(sum_neg, count_neg, out=np.full(vectors.shape[1], np.nan),
                    where=count_neg > 0)
    high = np.where(np.isnan(high), np.where(np.isnan(low), 1.0, -low), high)
    low = np.where(np.isnan(low), -high, low)
    low = np.where(low == high, low - 1.0, low)  # a dimension that is always 0
    return low.astype(np.float32), high.astype(np.float32)


# ----- small helpers -------------------------------------------------------------------------
def _as_matrix(vectors) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2:
        raise DataError(f"expected a matrix of vectors, got {vectors.ndim} dimensions")
    if vectors.dtype.kind != "f":
        raise DataError(f"expected float vectors, got {vectors.dtype}")
    return vectors.astype(np.float32, copy=False)


def _f32_or_none(array) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.float32)


def _encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes())
            .decode("ascii")}


def _decode_array(data) -> np.ndarray | None:
    if data is None:
        return None
    raw = base64.b64decode(data["float32_base64"], validate=True)
    shape = tuple(int(n) for n in data["shape"])
    if len(raw) != 4 * int(np.prod(shape)):
        raise ValueError(f"array of shape {shape} has {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def _array_hash(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()
