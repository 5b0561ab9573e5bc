"""What a new index is: `IndexSpec` (dimension, metric, dtype, layout, HNSW parameters, kept
full vectors, the vectors' metadata), and `spec_for_input`, the spec that follows an input's
vectors (float, codes or packed bits) and the choices made for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vecpipe.core.index_format import DTYPES, FLOAT_METRICS, METRICS
from vecpipe.formats.errors import DataError, ParameterError

KIND_DTYPE = {"float": "f32", "int8": "i8", "uint8": "i8", "bfloat16": "bf16", "bits": "b1",
              "pq": "pq"}


@dataclass
class IndexSpec:
    """What a new index is. `dim` is the index-space dimension (bits for b1); `metric` is the
    usearch metric; `score_metric` the float metric of rescoring and of i8 scores (the same as
    `metric` for float indexes); `full` describes kept full-precision vectors ({"dim", "dtype"})
    or is None; `metadata` holds the stream metadata of the vectors (model, codec...); `flat`
    keeps the vectors without an HNSW graph (exact search only); `planes` counts the bit planes
    of a multi-bit b1 index (the graph holds the first)."""

    dim: int
    metric: str = "cos"
    dtype: str = "f32"
    score_metric: str | None = None
    connectivity: int | None = None
    expansion_add: int | None = None
    expansion_search: int | None = None
    metadata: dict = field(default_factory=dict)
    query_prompt: str | None = None
    full: dict | None = None
    flat: bool = False
    planes: int = 1
    tokens: dict | None = None  # {"dim": N}: every row's token vectors kept (core.multivector)
    library: str = "usearch"    # the graph's library: usearch | faiss (core.faiss_graph)

    @property
    def layout(self) -> str:
        return "flat" if self.flat else "hnsw"

    @property
    def unit_ip(self) -> bool:
        """Cosine scored as the inner product of vectors scaled to unit length (usearch's
        ip kernel is the cheaper one; the vectors are scaled on their way in)."""
        return unit_ip(self.metric, self.score_metric)

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ParameterError(f"unknown metric {self.metric!r}; use {'|'.join(METRICS)}",
                                 "metric")
        if self.dtype not in DTYPES:
            raise ParameterError(f"unknown dtype {self.dtype!r}; use {'|'.join(DTYPES)}", "dtype")
        if (self.metric == "hamming") != (self.dtype == "b1"):
            raise ParameterError("the hamming metric goes with b1 vectors (and b1 with "
                                 "hamming)", "metric")
        self.score_metric = self.score_metric or (
            "cos" if self.metric == "hamming" else self.metric)
        if self.score_metric not in FLOAT_METRICS:
            raise ParameterError(f"score metric must be one of {'|'.join(FLOAT_METRICS)}",
                                 "metric")
        if self.dtype == "b1" and self.dim % 8:
            raise DataError(f"b1 needs a dimension divisible by 8, got {self.dim}")
        if self.planes != 1 and (self.dtype != "b1" or not 2 <= self.planes <= 8):
            raise ParameterError("2 to 8 bit planes, of b1 codes only", "dtype")
        if self.dtype == "pq" and self.score_metric not in ("cos", "ip"):
            raise ParameterError("PQ codes score the inner product with the query (cos or ip)",
                                 "metric")
        if self.dtype == "pq" and (not self.flat or self.connectivity or self.expansion_add
                                   or self.expansion_search):
            raise ParameterError("pq codes are scanned (asymmetric distances), not put in an "
                                 "HNSW graph: their index is flat, with no graph parameters",
                                 "hnsw")
        if self.flat and self.dtype == "bf16":
            raise ParameterError("a flat index keeps f32, f16, i8 or b1 vectors", "dtype",
                                 hint="f16 is half the size of f32")
        if self.flat and (self.connectivity or self.expansion_add or self.expansion_search):
            raise ParameterError("a flat index has no HNSW graph: its connectivity and "
                                 "expansion parameters do not apply", "hnsw")
        from vecpipe.core.faiss_graph import check_library

        check_library(self.library, self.metric, self.dtype, self.flat)
        if self.library == "faiss" and self.tokens:
            raise ParameterError("an index keeping token vectors (multi-vector) has a "
                                 "usearch graph", "library")


def vector_kind(arrow_type, meta: dict, codec) -> str:
    """float | int8 | uint8 | bfloat16 | bits | pq: what an input's `embedding` column
    holds."""
    import pyarrow as pa

    if pa.types.is_fixed_size_binary(arrow_type):
        return "bits"
    value_type = getattr(arrow_type, "value_type", None)
    if value_type is None:
        raise DataError(f"'embedding' has type {arrow_type}, expected a list of numbers")
    if pa.types.is_floating(value_type):
        return "float"
    if pa.types.is_int8(value_type):
        return "int8"
    if pa.types.is_uint8(value_type) and codec is not None and codec.to == "pq":
        return "pq"
    if pa.types.is_uint8(value_type):
        if codec is None or codec.to != "uint8":
            raise DataError("uint8 vectors without a uint8 codec in the metadata",
                            hint="index float vectors, or the output of `vecpipe compress`")
        return "uint8"
    if pa.types.is_uint16(value_type) and meta.get("dtype") == "bfloat16" and codec is not None:
        return "bfloat16"
    raise DataError(f"'embedding' holds {value_type} values; expected float, int8 codes or "
                    "packed bits")


def unit_ip(metric: str, score_metric: str | None) -> bool:
    """Whether an index of this (usearch) metric and score metric scores cosine as the inner
    product of unit vectors."""
    return metric == "ip" and score_metric == "cos"


def use_library(spec: IndexSpec, library: str, coded: bool = False) -> None:
    """Put the spec's graph in `library` (checked here, before any record is read; a missing
    faiss-cpu too). faiss scores cosine as the inner product of unit vectors, scaled on their
    way in, as usearch's ip graph of unit vectors does; `coded`: the vectors come through a
    codec, whose output a faiss graph does not scale."""
    from vecpipe.core.faiss_graph import check_library, import_faiss

    if library == "faiss" and spec.metric == "cos":
        if coded:
            raise ParameterError("a faiss graph scores cosine only of vectors without a codec",
                                 "library", hint="index the float vectors, or use a usearch "
                                                 "graph")
        spec.metric = "ip"
    check_library(library, spec.metric, spec.dtype, spec.flat)
    if library == "faiss":
        import_faiss()
    spec.library = library


def spec_for_input(kind: str, arrow_type, codec, meta: dict, metric: str | None = None,
                   dtype: str | None = None, keep_vectors: bool = False):
    """The IndexSpec of an input whose vectors are `kind` (`vector_kind`), and the codec target
    to fit on them (for i8/b1 on float input, else None). `metric`/`dtype` None: follow the
    input."""
    import pyarrow as pa

    value_type = getattr(arrow_type, "value_type", None)
    default = "f16" if kind == "float" and value_type == pa.float16() else KIND_DTYPE[kind]
    dtype = dtype or default
    if kind != "float" and dtype != default:
        raise ParameterError(f"the input holds {kind} codes, which index as dtype {default} "
                             "only", "dtype", hint="index the float vectors to choose another "
                                                   "dtype")
    _check_keep_vectors(kind, codec, keep_vectors)
    scored_by_codec = codec is not None and codec.scored_decoded
    if dtype == "b1":
        # bit planes rescore by the float query's dot product with what they decode to, as
        # Tencent's paper scores them (and search scores them in a stream)
        score_metric = metric if metric in FLOAT_METRICS else "ip" if scored_by_codec else None
        usearch_metric = "hamming"
        if metric not in (None, "hamming", *FLOAT_METRICS):
            raise ParameterError(f"unknown metric {metric!r}", "metric")
    else:
        if metric == "hamming":
            raise ParameterError("the hamming metric needs packed bits (dtype b1)", "metric")
        score_metric = metric or ("ip" if scored_by_codec else "cos")  # pq: ADC
        # scalar codes are not centred on zero, so a dot product of codes ranks poorly
        usearch_metric = "cos" if dtype == "i8" and score_metric == "ip" else score_metric
        if (usearch_metric == "cos" and dtype == "f32" and codec is None
                and meta.get("normalized") == "true"):
            usearch_metric = "ip"  # the same scores of unit vectors, usearch's cheaper kernel
    from vecpipe.core.codec import FITTED_INDEX_DTYPES

    fit_codec = FITTED_INDEX_DTYPES.get(dtype) if kind == "float" else None
    if fit_codec and codec is not None:
        raise ParameterError(f"the input is already compressed ({codec.describe()}); dtype "
                             f"{dtype} would compress it twice", "dtype",
                             hint="compress the float vectors in one step")
    if kind == "bits":  # packed bits: dim counts the bits of one plane
        dim = codec.out_dim if codec is not None else arrow_type.byte_width * 8
    else:               # i8/b1 fitted here keep every dimension (b1: one sign bit each)
        dim = arrow_type.list_size
    full = {"dim": arrow_type.list_size, "dtype": "float16" if value_type == pa.float16()
            else "float32"} if keep_vectors else None
    spec = IndexSpec(dim=dim, metric=usearch_metric, dtype=dtype, score_metric=score_metric,
                     metadata=meta, full=full, flat=kind == "pq",
                     planes=codec.bits if kind == "bits" and codec is not None else 1)
    return spec, fit_codec


def _check_keep_vectors(kind: str, codec, keep_vectors: bool) -> None:
    if keep_vectors and kind != "float":
        raise ParameterError("full vectors can be kept only from float input vectors; this "
                             "input holds codes", "keep_vectors",
                             hint="index the float vectors, quantized to i8 or b1, keeping "
                                  "them")
    reduced = codec is not None and (codec.out_dim != codec.input_dim or
                                     codec.pca_components is not None)
    if keep_vectors and reduced:
        # the stream holds only the reduced vectors, which the index holds anyway: kept, they
        # would rescore nothing, and rescoring compares them with full-size queries
        raise ParameterError(f"kept full vectors are for rescoring, but this input was "
                             f"reduced from {codec.input_dim} to {codec.out_dim} dimensions "
                             f"({codec.describe()}): the full vectors are not in it",
                             "keep_vectors", hint="index the uncompressed vectors, quantized "
                                                  "to i8 or b1, or keep no full vectors")
