"""Long documents: token-window chunks, situated chunks and late chunking.

A `Chunking` splits each text into windows of `tokens` tokens (the tokenizer's own offsets give
each chunk's `char_start`/`char_end`), and says what is embedded for a chunk:
- plain: the chunk's text;
- situated (`context_tokens`): the chunk inside a template with the `context_tokens` tokens of
  the document around it (the chunk in the middle, moved inward at the document's edges), the
  input a situated model (SitEmb) expects; the chunk's row keeps its own text and offsets;
- late (`late`): one forward pass over the whole document (overlapping windows of the model's
  length beyond it, each token taken from the window it sits most central in), then each
  chunk's vector mean-pooled from its own tokens' outputs (Jina's late chunking).

numpy is imported inside functions; torch only by the late path of a real model.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from vecpipe.formats.errors import ParameterError

DEFAULT_TEMPLATE = "{context}\n\n{chunk}"
_PLACEHOLDER = re.compile(r"\{(context|chunk)\}")
LATE_OVERLAP = 4  # long late-chunked documents: windows overlap by 1/LATE_OVERLAP of their length


@dataclass(frozen=True)
class Chunk:
    row: int            # the text's index in the batch
    number: int         # the chunk's number within its text
    first_token: int    # [first_token, end_token) of the text's tokens (special ones left out)
    end_token: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Chunking:
    tokens: int
    overlap: int = 0
    context_tokens: int | None = None
    template: str = DEFAULT_TEMPLATE
    late: bool = False

    def __post_init__(self):
        if self.overlap >= self.tokens:
            raise ParameterError(f"chunk_overlap {self.overlap} must be smaller than "
                                 f"chunk_tokens {self.tokens}", "chunk_overlap")
        if self.late and self.context_tokens is not None:
            raise ParameterError("context_tokens: late chunking already gives each chunk its "
                                 "whole document; use one or the other", "context_tokens")
        if self.context_tokens is not None and self.context_tokens <= self.tokens:
            raise ParameterError(f"context_tokens {self.context_tokens} must exceed "
                                 f"chunk_tokens {self.tokens} (the context holds the chunk)",
                                 "context_tokens")
        check_template(self.template)

    @property
    def situated(self) -> bool:
        return self.context_tokens is not None

    def describe(self) -> dict:
        """The `chunking` entry of the embedded_text metadata; plain chunks keep the two keys
        files made before situated and late chunking record."""
        described = {"tokens": self.tokens, "overlap": self.overlap}
        if self.situated:
            described.update(context_tokens=self.context_tokens, template=self.template)
        if self.late:
            described["late"] = True
        return described

    def split(self, spans_per_text, lengths) -> list[Chunk]:
        """The chunks of each text, given each text's token (start, end) characters."""
        chunks = []
        for row, (spans, length) in enumerate(zip(spans_per_text, lengths)):
            for number, (first, end) in enumerate(token_windows(len(spans), self.tokens,
                                                                self.overlap)):
                start, stop = (spans[first][0], spans[end - 1][1]) if spans else (0, length)
                chunks.append(Chunk(row, number, first, end, start, stop))
        return chunks

    def embedded_text(self, text: str, spans, chunk: Chunk) -> str:
        """What the model reads for `chunk` of `text` (plain and situated chunks)."""
        piece = text[chunk.char_start:chunk.char_end]
        if not self.situated or not spans:
            return piece
        first, end = context_window(chunk.first_token, chunk.end_token, len(spans),
                                    self.context_tokens)
        context = text[spans[first][0]:spans[end - 1][1]]
        values = {"context": context, "chunk": piece}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def room_needed(self, template_tokens: int) -> int:
        """Tokens one embedded chunk takes in the model's window (plain or situated)."""
        if not self.situated:
            return self.tokens
        chunk_again = self.tokens if "{chunk}" in self.template else 0
        return self.context_tokens + chunk_again + template_tokens

    def template_text(self) -> str:
        """The template without its placeholders (its own tokens count against the window)."""
        return _PLACEHOLDER.sub("", self.template)


def check_template(template: str) -> None:
    if "{context}" not in template:
        raise ParameterError(f"context_template {template!r} has no {{context}}",
                             "context_template")
    unknown = set(re.findall(r"\{([^{}]*)\}", template)) - {"context", "chunk"}
    if unknown:
        raise ParameterError(f"context_template: unknown placeholder {{{sorted(unknown)[0]}}}"
                             " (use {context} and {chunk})", "context_template")


def token_windows(count: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[first, end) of each window of `size` of `count` tokens, `overlap` shared; a text
    without tokens is one (empty) window."""
    if count == 0:
        return [(0, 0)]
    windows, first = [], 0
    while True:
        end = min(first + size, count)
        windows.append((first, end))
        if end == count:
            return windows
        first += size - overlap


def context_window(first: int, end: int, count: int, size: int) -> tuple[int, int]:
    """[first, end) of the `size` tokens around the chunk [first, end): as many before as
    after, what one side lacks (at the document's edges) taken from the other."""
    extra = max(size - (end - first), 0)
    before = extra // 2
    start, stop = first - before, end + extra - before
    if start < 0:
        stop, start = stop - start, 0
    if stop > count:
        start, stop = max(0, start - (stop - count)), count
    return start, stop


# -- late chunking -----------------------------------------------------------------------------

@dataclass
class LateDocument:
    text: str
    chunks: list  # (first_token, end_token) of each chunk wanted


def late_windows(count: int, window: int) -> list[tuple[int, int]]:
    """[first, end) of the model windows that cover `count` tokens: one when they fit, else
    windows overlapping by window/LATE_OVERLAP, the last one ending at the last token."""
    if count <= window:
        return [(0, count)]
    step = window - window // LATE_OVERLAP
    starts = list(range(0, count - window, step)) + [count - window]
    return [(start, start + window) for start in starts]


def owners(count: int, windows) -> list[int]:
    """For each token, the window it sits most central in."""
    import numpy as np

    positions = np.arange(count)[:, None]
    first = np.array([w[0] for w in windows])[None, :]
    end = np.array([w[1] for w in windows])[None, :]
    distance = np.abs(positions - (first + end - 1) / 2)
    distance[(positions < first) | (positions >= end)] = np.inf
    return distance.argmin(axis=1)


def late_chunk_vectors(model, documents: list[LateDocument], prompt: str = ""):
    """float32 vectors (before normalization), one per chunk of each document in order: the
    mean of the chunk's token outputs over one pass through the whole document (`prompt`
    before each of its windows, as encode puts it before a text)."""
    import numpy as np

    if model.is_fake:
        return _fake_late_vectors(model, documents, prompt)
    prompt_ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt \
        else []
    window = model.max_length - model.special_tokens() - len(prompt_ids)
    token_ids = model.tokenizer([d.text for d in documents], add_special_tokens=False,
                                truncation=False, return_attention_mask=False)["input_ids"]
    pieces = [(row, first, end) for row, ids in enumerate(token_ids)
              for first, end in late_windows(len(ids), window)]
    outputs = model.window_token_outputs([prompt_ids + token_ids[row][first:end]
                                          for row, first, end in pieces], len(prompt_ids))
    pieces_of: dict = {}
    for i, (row, first, end) in enumerate(pieces):
        pieces_of.setdefault(row, []).append((i, (first, end)))
    vectors = []
    for row, (document, ids) in enumerate(zip(documents, token_ids)):
        mine = pieces_of[row]
        tokens = np.zeros((len(ids), outputs[mine[0][0]].shape[1]), dtype=np.float32)
        owner = owners(len(ids), [w for _, w in mine])
        for j, (piece, (first, end)) in enumerate(mine):
            taken = np.flatnonzero(owner == j)
            tokens[taken] = outputs[piece][taken - first]
        for first, end in document.chunks:
            vectors.append(tokens[first:end].mean(axis=0) if end > first
                           else outputs[mine[0][0]].mean(axis=0))
    return model.after_pooling(np.stack(vectors)) if vectors else \
        np.zeros((0, model.dim), dtype=np.float32)


def finish(vectors, normalize: bool, dim: int | None):
    """Pooled vectors cut to their first `dim` dimensions, then L2-normalized."""
    import numpy as np

    if dim is not None:
        vectors = vectors[:, :dim]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize and len(vectors):
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _fake_late_vectors(model, documents, prompt: str = ""):
    """fake:DIM models: each token's output a hash-seeded vector of the document and the
    token, so a chunk's vector depends on its whole document as a late chunk's does."""
    import numpy as np

    from vecpipe.core.embedder import fake_vectors

    vectors = []
    for document in documents:
        salt = hashlib.blake2b((prompt + document.text).encode(), digest_size=8).hexdigest()
        spans = model.token_spans([document.text])[0]
        tokens = fake_vectors([document.text[s:e] for s, e in spans], model.dim, salt,
                              normalize=False)
        for first, end in document.chunks:
            vectors.append(tokens[first:end].mean(axis=0) if end > first else
                           fake_vectors([document.text], model.dim, salt, False)[0])
    return np.array(vectors, dtype=np.float32).reshape(len(vectors), model.dim)


def late_key(text: str, first: int, end: int) -> str:
    """A late-chunked vector's identity (its document and token span), for the window's
    de-duplication and the cache: the NUL keeps it apart from any text a record holds."""
    return f"{first}:{end}\0{text}"


def parse_late_key(key: str) -> tuple[str, int, int]:
    span, text = key.split("\0", 1)
    first, end = span.split(":")
    return text, int(first), int(end)


def aggregate(scores, parents, how: str):
    """queries x documents scores from queries x chunks `scores`: each document's best chunk
    (`max`), the sum over its chunks (`sum`) or their mean (`mean`). `parents`: each chunk's
    document index, in order, every document with at least one chunk (what Chunking.split
    gives)."""
    import numpy as np

    if how not in AGGREGATES:
        raise ParameterError(f"aggregate {how!r}: use {' or '.join(AGGREGATES)}", "aggregate")
    starts = np.flatnonzero(np.diff(parents, prepend=-1))
    if how == "max":
        return np.maximum.reduceat(scores, starts, axis=1)
    summed = np.add.reduceat(scores, starts, axis=1)
    if how == "sum":
        return summed
    return summed / np.diff(np.append(starts, len(parents))).astype(np.float32)


AGGREGATES = ("max", "sum", "mean")
