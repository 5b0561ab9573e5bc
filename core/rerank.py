"""Reranking: the first stage's top hits of each query rescored by a cross-encoder, a model
that reads the query and the document text together (sentence-transformers' `CrossEncoder`, or
anything with its `predict(pairs, batch_size=..., ...)`).

Only the top `depth` hits of each query are rescored, and only they come back, reordered by
the new score (ties keep the first stage's order): a hit below the depth was never read by
the cross-encoder, so its score would not compare with theirs. `depth` must be at least the
k hits asked for. The document text is the stored fields joined as embed joins them
(`document_fields`); the query text is the query's own (vector queries have none).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from vecpipe.core.space import TEXT_KEY, TEXT_SEPARATOR, parse_embedded_text
from vecpipe.core.vectors import Hits
from vecpipe.formats.errors import DataError, ParameterError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

RERANK_KEY = "rerank"            # the output's vecpipe.rerank metadata (JSON)
FIRST_SCORE = "first_score"      # the first stage's score, when it is kept beside the new one
DEFAULT_FIELD = "text"


@dataclass(frozen=True)
class DocumentFields:
    """The stored fields a cross-encoder reads as a document's text, and their separator."""

    names: tuple[str, ...]
    separator: str = TEXT_SEPARATOR

    def texts(self, table: "pa.Table") -> list[str]:
        """Each row's text: the fields' non-empty values joined by the separator."""
        columns = [table.column(name).to_pylist() for name in self.names]
        return [self.separator.join(value for value in values if value)
                for values in zip(*columns)]


def document_fields(meta: Mapping[str, str], stored: Sequence[str],
                    given: Sequence[str] | None = None, schema: "pa.Schema | None" = None
                    ) -> DocumentFields:
    """`given`, else the fields the vectors were embedded from (the `embedded_text`
    metadata, with its separator), else `text`; each must be stored (and text, when `schema`
    says what the fields hold). A ParameterError("fields") otherwise."""
    separator, origin = TEXT_SEPARATOR, ""
    if given:
        names = list(dict.fromkeys(given))
    else:
        embedded = parse_embedded_text(meta.get(TEXT_KEY, "")) or {}
        names = [str(name) for name in embedded.get("fields") or ()]
        if names:
            origin = " (the text the vectors were embedded from)"
            if isinstance(embedded.get("separator"), str):
                separator = embedded["separator"]
        else:
            names = [DEFAULT_FIELD]
    missing = [name for name in names if name not in stored]
    if missing:
        raise ParameterError(f"{missing[0]!r}{origin} is not stored, so the cross-encoder "
                             f"has no document text (stored: {', '.join(stored)})", "fields",
                             hint="store the field when indexing, or name a stored text field")
    if schema is not None:
        _check_text(schema, names)
    return DocumentFields(tuple(names), separator)


def _check_text(schema: "pa.Schema", names) -> None:
    import pyarrow as pa

    for name in names:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind) or str(kind) == "string_view"):
            raise ParameterError(f"{name!r} holds {kind}, not text", "fields")


@dataclass
class Reranker:
    """A cross-encoder with the settings of one search: `depth` hits rescored per query,
    `batch_size` pairs per model call, `prompt` (None: the model's default prompt, if any).
    `name`/`sha` are what the output metadata records (the model's name or folder, and the
    sha256 prefix of a local folder's weights)."""

    model: object
    name: str
    depth: int
    batch_size: int = 32
    prompt: str | None = None
    sha: str | None = None
    keep_first_score: bool = False
    fields: DocumentFields = field(default_factory=lambda: DocumentFields((DEFAULT_FIELD,)))

    def __post_init__(self):
        if self.depth < 1:
            raise ParameterError("the reranking depth must be at least 1", "depth")
        if self.batch_size < 1:
            raise ParameterError("the batch size must be at least 1", "batch_size")

    def check_k(self, k: int) -> None:
        """Only the reranked hits are returned, so k of them need a depth of at least k."""
        if self.depth < k:
            raise ParameterError(f"{self.depth} is below k ({k}): only the reranked hits are "
                                 "returned", "depth")

    def metadata(self) -> dict:
        """The `vecpipe.rerank` value: what rescored the hits and how."""
        record = {"model": self.name, "model_sha": self.sha, "depth": self.depth,
                  "fields": list(self.fields.names), "separator": self.fields.separator,
                  "prompt": self.resolved_prompt(), "max_length": self._max_length(),
                  "activation": self._activation(),
                  "scores": "beside" if self.keep_first_score else "replace"}
        return {RERANK_KEY: json.dumps(record)}

    def resolved_prompt(self) -> str | None:
        """The prompt `predict` prepends: ours, else the model's default one (or none)."""
        if self.prompt is not None:
            return self.prompt
        prompts = getattr(self.model, "prompts", None) or {}
        return prompts.get(getattr(self.model, "default_prompt_name", None)) or None

    def _max_length(self):
        return getattr(self.model, "max_seq_length", None)

    def _activation(self):
        function = getattr(self.model, "activation_fn", None)
        return None if function is None else type(function).__name__

    def scores(self, pairs: list) -> "np.ndarray":
        """The model's score of each (query, document) pair, float32, one per pair."""
        import numpy as np

        if not pairs:
            return np.zeros(0, np.float32)
        options = {"batch_size": self.batch_size, "show_progress_bar": False,
                   "convert_to_numpy": True}
        if self.prompt is not None:
            options["prompt"] = self.prompt
        scores = np.asarray(self.model.predict(pairs, **options), dtype=np.float32)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape != (len(pairs),):
            raise DataError(f"cross-encoder {self.name!r} gives {scores.shape[-1]} scores a "
                            "pair; reranking needs one (a relevance score)")
        return scores

    def rerank(self, queries: Sequence[str | None], hits: Hits,
               documents: Callable[["np.ndarray"], list]) -> tuple[Hits, "np.ndarray"]:
        """(the top `depth` hits of each query reordered by the cross-encoder's scores, the
        first stage's scores aligned with them). `queries[i]` is query i's text;
        `documents(rows)` the texts of those rows. Every pair of the batch goes to the model
        in one call (it batches them by `batch_size`)."""
        import numpy as np

        _check_texts(queries)
        rows = hits.rows[:, :self.depth]
        first = hits.scores[:, :self.depth].astype(np.float32)
        found = rows >= 0
        query_of, _ = np.nonzero(found)
        texts = documents(rows[found]) if found.any() else []
        new = np.full(rows.shape, -np.inf, dtype=np.float32)
        new[found] = self.scores([(queries[q], text) for q, text in zip(query_of, texts)])
        # descending new score; ties and the first-stage order are the same thing: by column
        order = np.argsort(-new, axis=1, kind="stable")
        rows, first = np.take_along_axis(rows, order, 1), np.take_along_axis(first, order, 1)
        new = np.take_along_axis(new, order, 1)
        first[rows < 0] = np.nan
        return Hits(rows, new), first


def _check_texts(queries) -> None:
    vector = next((number for number, text in enumerate(queries) if text is None), None)
    if vector is not None:
        raise ParameterError("vector queries cannot be reranked: the cross-encoder reads the "
                             "query text", "model", hint="give text queries")


def documents_of(table: "pa.Table", fields: DocumentFields) -> Callable[["np.ndarray"], list]:
    """`documents(rows)` for `Reranker.rerank`: texts of `table`'s rows (row i = hit row i)."""
    def documents(rows):
        import pyarrow as pa

        return fields.texts(table.select(list(fields.names)).take(pa.array(rows)))
    return documents
