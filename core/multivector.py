"""Multi-vector records (`embed --multi-vector`) and the index folder's token store.

Each record gets, beside its pooled `embedding`, the model's token embeddings: one vector per
non-padding token of the model's input (special tokens such as [CLS] and [SEP] kept, as ColBERT
keeps its markers), each L2-normalized, as `token_vectors`
(`list<fixed_size_list<float32, dim>>`) and `token_count` (int32). For a model trained for late
interaction (ColBERT, PyLate) these are its multi-vector representation; for a plain
sentence-transformers model (the bundled MiniLM) they are the transformer's last hidden states,
an untrained but usable one. A `fake:DIM` model makes one fake vector per whitespace token.

The stream's `vecpipe.multi_vector` metadata (JSON) says how the token vectors were made.
core.fde turns token sets into single vectors; an index keeps the documents' token vectors
(`tokens.npy`, every token of every row in row order, and `token_offsets.npy`, rows + 1 int64
offsets, both memory-mapped) so search can rescore candidates by exact Chamfer similarity.
"""
from __future__ import annotations

import json
import os

from vecpipe.core.index_format import TOKEN_OFFSETS as OFFSETS_FILE, TOKENS as TOKENS_FILE
from vecpipe.formats.errors import DataError

TOKEN_VECTORS, TOKEN_COUNT = "token_vectors", "token_count"
META_KEY = "multi_vector"
_FAKE_SALT = "token|"


def token_dim(model) -> int:
    """Dimensions of the model's token embeddings (the transformer's width; a Dense module
    after pooling makes the pooled vectors another size)."""
    if model.is_fake:
        return model.dim
    first = model.st[0]
    size = getattr(first, "get_embedding_dimension", None) or getattr(
        first, "get_word_embedding_dimension", None)
    return int(size()) if size is not None else model.dim


def metadata_value(model) -> str:
    """The `vecpipe.multi_vector` value of token vectors from `model`."""
    return json.dumps({"source": "fake whitespace tokens" if model.is_fake
                       else "token_embeddings", "dim": token_dim(model), "normalized": True,
                       "special_tokens": not model.is_fake}, sort_keys=True)


def check_model(model) -> None:
    """Token vectors come from the torch runtime or a fake model."""
    from vecpipe.formats.errors import ParameterError

    if not model.is_fake and (model.st is None or model.backend != "torch"
                              or model.runtime is not None):
        raise ParameterError(f"backend {model.backend}: token vectors (multi-vector) need "
                             "the torch backend", "backend")
    if model.layers is not None:
        raise ParameterError(f"layers {model.layers}: token vectors (multi-vector) come from "
                             "every layer", "layers")


def token_vectors(model, texts, batch_size: int = 32, prompt: str = "") -> list:
    """Per text, its L2-normalized token vectors (tokens x token_dim float32), in order."""
    import numpy as np

    texts = list(texts)
    check_model(model)
    if model.is_fake:
        from vecpipe.core.embedder import _FAKE_TOKEN, fake_vectors

        out = []
        for text in texts:
            words = _FAKE_TOKEN.findall(prompt + text)
            out.append(fake_vectors(words, model.dim, _FAKE_SALT) if words
                       else np.zeros((0, model.dim), np.float32))
        return out
    import torch
    from sentence_transformers.util import batch_to_device

    out = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    transformer = model.st[0]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        features = batch_to_device(model.tokenize([texts[i] for i in rows], prompt),
                                   model.st.device)
        with torch.inference_mode():
            embedded = transformer(features)
        tokens = torch.nn.functional.normalize(embedded["token_embeddings"].float(), p=2,
                                               dim=-1)
        mask = features["attention_mask"].bool()
        for slot, row in enumerate(rows):
            out[row] = tokens[slot][mask[slot]].cpu().numpy()
    return out


def token_fields(dim: int) -> list:
    import pyarrow as pa

    return [pa.field(TOKEN_VECTORS, pa.list_(pa.list_(pa.float32(), dim))),
            pa.field(TOKEN_COUNT, pa.int32())]


def with_token_fields(schema, dim: int):
    """`schema` with token_vectors and token_count last (replacing input columns of those
    names)."""
    import pyarrow as pa

    kept = [f for f in schema if f.name not in (TOKEN_VECTORS, TOKEN_COUNT)]
    return pa.schema(kept + token_fields(dim), metadata=schema.metadata)


def token_arrays(sets, dim: int):
    """(token_vectors, token_count) Arrow arrays of a list of (tokens x dim) arrays."""
    import numpy as np
    import pyarrow as pa

    counts = np.array([len(s) for s in sets], dtype=np.int32)
    offsets = np.zeros(len(sets) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in sets]) if sets \
        else np.zeros(0, np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), vectors), pa.array(counts)


def with_token_columns(batch, sets, dim: int, schema):
    """`batch` (already of schema minus the token fields) with the token columns of `sets`."""
    import pyarrow as pa

    vectors, counts = token_arrays(sets, dim)
    columns = [batch.column(f.name) for f in schema if f.name not in (TOKEN_VECTORS,
                                                                       TOKEN_COUNT)]
    return pa.RecordBatch.from_arrays(columns + [vectors, counts], schema=schema)


def read_tokens(item, dim: int | None = None):
    """(flat float32 tokens, int64 offsets) of a SourceBatch's token_vectors column; a
    DataError names the file and record of a null, ragged or non-finite one."""
    import numpy as np
    import pyarrow as pa

    batch = item.batch
    if TOKEN_VECTORS not in batch.schema.names:
        raise DataError(f"records have no {TOKEN_VECTORS!r} column (fields: "
                        f"{', '.join(batch.schema.names)})", source=item.source,
                        hint="embed them with token vectors (multi-vector)")
    column = batch.column(TOKEN_VECTORS)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{TOKEN_VECTORS} is null", source=item.source,
                        record=item.first_record + row)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    values = column.values.slice(int(column.offsets[0].as_py()), int(offsets[-1]))
    tokens = _token_matrix(values, item, offsets)
    if dim is not None and len(tokens) and tokens.shape[1] != dim:
        raise DataError(f"token vectors have {tokens.shape[1]} dimensions, expected {dim}",
                        source=item.source, record=item.first_record)
    finite = np.isfinite(tokens).all(axis=1)
    if not finite.all():
        row = int(np.searchsorted(offsets, int(np.argmin(finite)), side="right")) - 1
        raise DataError(f"{TOKEN_VECTORS} hold NaN or infinity", source=item.source,
                        record=item.first_record + row)
    return tokens, offsets


def _token_matrix(values, item, offsets):
    import numpy as np
    import pyarrow as pa

    if pa.types.is_fixed_size_list(values.type):
        dim = values.type.list_size
        flat = values.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat, dtype=np.float32).reshape(len(values), dim)
    # JSONL: lists of lists of numbers; every token the same width
    lengths = values.value_lengths().to_numpy(zero_copy_only=False) if len(values) else []
    if len(values) and (values.null_count or (lengths != lengths[0]).any()):
        bad = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False)
                             | (lengths != lengths[0]))[0]
        row = int(np.searchsorted(offsets, bad, side="right")) - 1
        raise DataError(f"{TOKEN_VECTORS}: every token vector must have the same dimensions",
                        source=item.source, record=item.first_record + row)
    dim = int(lengths[0]) if len(values) else 0
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(values), dim)


class TokenColumns:
    """What embed adds for --multi-vector: the schema, the metadata and each batch's token
    columns. `model` is the embedder to encode with: for a torch model, one forward pass
    gives both the pooled vectors and the token vectors, kept here by text until their part
    is written; texts it did not embed (cache hits, a text repeated in another part) get a
    pass of the transformer of their own."""

    def __init__(self, model, batch_size: int, prompt: str):
        check_model(model)
        self.batch_size, self.prompt = batch_size, prompt
        self.dim = token_dim(model)
        self.base = model
        self.model = model if model.is_fake or model._modules is not None \
            else _SinglePass(model)

    def schema(self, schema):
        return with_token_fields(schema, self.dim)

    def added(self, batch, texts, schema):
        kept = self.model.kept if isinstance(self.model, _SinglePass) else {}
        sets = [kept.get(text) for text in texts]
        missing = [i for i, found in enumerate(sets) if found is None]
        if missing:
            made = token_vectors(self.base, [texts[i] for i in missing], self.batch_size,
                                 self.prompt)
            for i, tokens in zip(missing, made):
                sets[i] = tokens
        for text in texts:
            kept.pop(text, None)
        return with_token_columns(batch, sets, self.dim, schema)


class _SinglePass:
    """An Embedder whose embed_features also keeps each text's token vectors (the texts come
    from its tokenize calls, made in the same order by the Encoder's reading thread)."""

    def __init__(self, model):
        import collections

        self._model = model
        self._texts = collections.deque()
        self.kept = {}

    def __getattr__(self, name):
        return getattr(self._model, name)

    def tokenize(self, texts, prompt: str = ""):
        self._texts.append(list(texts))
        return self._model.tokenize(texts, prompt)

    def embed_features(self, features, normalize: bool = True, dim: int | None = None):
        """As Embedder.embed_features (the plain torch path), keeping the token vectors."""
        import torch
        from sentence_transformers.util import batch_to_device

        from vecpipe.core.embedder import pooled_vectors

        texts = self._texts.popleft()
        with torch.inference_mode():
            embedded = self._model.st(batch_to_device(features, self._model.st.device))
            vectors = pooled_vectors(embedded, normalize, dim)
            tokens = torch.nn.functional.normalize(embedded["token_embeddings"].float(), p=2,
                                                   dim=-1)
            mask = embedded["attention_mask"].bool()
            for row, text in enumerate(texts):
                self.kept[text] = tokens[row][mask[row]].cpu().numpy()
            return vectors.cpu().numpy()


def embed_meta(model, multi_vector: bool) -> dict:
    """The keys embed sets (None: removed): token vectors recorded or not; an input's FDE
    (compress --fde) no longer describes the new vectors."""
    return {META_KEY: metadata_value(model) if multi_vector else None, "fde": None,
            "fde_side": None}


def without_token_fields(schema):
    """`schema` without token columns (an input's go stale once its text is embedded again)."""
    import pyarrow as pa

    return pa.schema([f for f in schema if f.name not in (TOKEN_VECTORS, TOKEN_COUNT)],
                     metadata=schema.metadata)


# ----- the token store of an index folder ------------------------------------------------------
class TokenStoreWriter:
    """Appends rows' token sets to `folder`/tokens.npy and token_offsets.npy (row order)."""

    def __init__(self, folder: str, dim: int):
        self.folder, self.dim = folder, dim
        self.tokens = open(os.path.join(folder, TOKENS_FILE + ".part"), "wb")
        self.offsets = [0]
        self.count = 0

    def add(self, tokens, offsets) -> None:
        import numpy as np

        tokens = np.ascontiguousarray(tokens, dtype="<f4")
        if len(tokens) and tokens.shape[1] != self.dim:
            raise DataError(f"token vectors have {tokens.shape[1]} dimensions, the index "
                            f"keeps {self.dim}")
        self.tokens.write(tokens.tobytes())
        base = self.offsets[-1]
        self.offsets.extend((np.asarray(offsets[1:], dtype=np.int64) + base).tolist())
        self.count += len(tokens)

    def close(self) -> list[str]:
        """Write the .npy files; returns their names."""
        import numpy as np

        self.tokens.close()
        part = os.path.join(self.folder, TOKENS_FILE + ".part")
        path = os.path.join(self.folder, TOKENS_FILE)
        header_source = np.lib.format.open_memmap(path, mode="w+", dtype="<f4",
                                                  shape=(self.count, self.dim))
        with open(part, "rb") as src:
            flat = header_source.reshape(-1)
            done = 0
            while True:
                block = src.read(1 << 24)
                if not block:
                    break
                values = np.frombuffer(block, dtype="<f4")
                flat[done:done + len(values)] = values
                done += len(values)
        header_source.flush()
        del header_source
        os.remove(part)
        np.save(os.path.join(self.folder, OFFSETS_FILE), np.asarray(self.offsets, np.int64))
        return [TOKENS_FILE, OFFSETS_FILE]

    def abort(self) -> None:
        self.tokens.close()


class TokenStore:
    """An index folder's kept token vectors, memory-mapped: `scores(query, rows)` is the exact
    Chamfer similarity of a query's token vectors with those rows."""

    def __init__(self, folder: str, rows: int, dim: int):
        import numpy as np

        self.tokens = np.load(os.path.join(folder, TOKENS_FILE), mmap_mode="r")
        self.offsets = np.load(os.path.join(folder, OFFSETS_FILE))
        if self.offsets.shape != (rows + 1,) or self.tokens.ndim != 2 or \
                self.tokens.shape[1] != dim or int(self.offsets[-1]) != len(self.tokens) or \
                int(self.offsets[0]) != 0 or (np.diff(self.offsets) < 0).any():
            raise DataError(f"{TOKENS_FILE} and {OFFSETS_FILE} do not match the index's "
                            f"{rows} rows of {dim}-dimensional tokens", source=folder)
        self.dim = dim

    def tokens_of(self, rows):
        """(flat tokens, offsets) of `rows`, in that order."""
        import numpy as np

        from vecpipe.core.fde import pack_sets

        return pack_sets([self.tokens[self.offsets[r]:self.offsets[r + 1]] for r in rows]) \
            if len(rows) else (np.zeros((0, self.dim), np.float32), np.zeros(1, np.int64))

    def scores(self, query, rows):
        """Chamfer similarity of `query` (tokens x dim) with each of `rows` (float32)."""
        from vecpipe.core.fde import chamfer_scores

        tokens, offsets = self.tokens_of(rows)
        return chamfer_scores(query, tokens, offsets)


def chamfer_rescored(hits, query_sets, store: TokenStore, k: int, min_score=None):
    """First-stage hits (e.g. an FDE search's k*M candidates) re-ranked by the exact Chamfer
    similarity of each query's token vectors with the candidates' kept ones; k kept."""
    import numpy as np

    from vecpipe.core.vectors import sorted_hits

    rows = hits.rows
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    for i, query in enumerate(query_sets):
        valid = rows[i] >= 0
        if valid.any():
            scores[i, valid] = store.scores(query, rows[i][valid])
    return sorted_hits(rows, scores, k).thresholded(min_score)
