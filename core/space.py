"""The vector space a set of vectors lives in, and the one comparison every command makes.

A `VectorSpace` is read from and written to the `vecpipe.*` metadata of a stream (and the
metadata an index manifest records). Two spaces are compared key by key; codecs by what they do
to the vectors (`Codec.identity`), so a parameter-free transform (truncation, float16) compares
equal however it was produced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Sequence

from vecpipe.formats.errors import DataError

# Keys whose difference makes two vector sets incomparable.
IDENTITY_KEYS = ("model", "dim", "codec", "layers", "pooling", "fde")
# Keys recorded only when set: absent means the model's default (all layers, its own pooling),
# so an absent key differs from a set one.
DEFAULT_WHEN_ABSENT = {"layers": "all layers", "pooling": "the model's own pooling",
                      "fde": "no FDE"}
MODEL_KEYS = ("model", "model_sha")
# What text was embedded: the fields, how they were joined, the chunking (JSON).
TEXT_KEY = "embedded_text"
TEXT_SEPARATOR = " "
# Documents that go into one index or one merged set must also agree on the text embedded;
# queries may come from another field than their documents, so query checks leave it out.
DOCUMENT_KEYS = IDENTITY_KEYS + (TEXT_KEY,)


class SpaceMismatch(DataError):
    """Two vector sets from different spaces; the CLI adds how to overrule the check."""


@dataclass(frozen=True)
class VectorSpace:
    """What makes vectors comparable, as the `vecpipe.*` metadata spells it (strings)."""

    model: str | None = None
    model_sha: str | None = None
    prompt: str | None = None
    dim: str | None = None
    normalized: str | None = None
    codec: str | None = None
    embedded_text: str | None = None
    layers: str | None = None    # the first N transformer layers only (2D Matryoshka)
    pooling: str | None = None   # a pooling mode other than the model's own
    fde: str | None = None       # MUVERA encodings of token vectors (core.fde), as JSON

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> "VectorSpace":
        return cls(**{field.name: meta.get(field.name) for field in fields(cls)})

    @classmethod
    def of_model(cls, model) -> "VectorSpace":
        """The space a loaded model embeds into (its name and weights' sha, when local)."""
        return cls(model=model.name, model_sha=model.sha or None)

    def meta(self) -> dict[str, str]:
        """The `vecpipe.*` keys (without the prefix) this space sets."""
        return {field.name: getattr(self, field.name) for field in fields(self)
                if getattr(self, field.name) is not None}

    def difference(self, other: "VectorSpace", name: str, other_name: str,
                   keys: Iterable[str] = IDENTITY_KEYS) -> str | None:
        """None when the two agree on `keys` (a key missing on one side agrees), else the
        first difference, e.g. `dim differs: a has '384', b has '128'`."""
        found = self.first_difference(other, keys)
        return None if found is None else _worded(found, name, other_name)

    def first_difference(self, other: "VectorSpace", keys: Iterable[str]):
        """(key, (how self shows it, how other shows it)) of the first key they differ on."""
        # vectors of unknown origin (no model recorded) say nothing by leaving a key out
        known = self.model is not None and other.model is not None
        for key in keys:
            shown = _shown_difference(key, getattr(self, key), getattr(other, key),
                                      absent_is_default=known)
            if shown is not None:
                return key, shown
        return None


def check_same_space(meta_a: Mapping[str, str], meta_b: Mapping[str, str], name_a: str,
                     name_b: str, keys: Iterable[str] = IDENTITY_KEYS,
                     force: bool = False) -> None:
    """Refuse to mix vectors whose spaces differ on `keys` (unless `force`)."""
    if force:
        return
    found = VectorSpace.from_meta(meta_a).first_difference(VectorSpace.from_meta(meta_b), keys)
    if found is None:
        return
    hint = ("documents embedded from other text do not rank alike; embed the same fields "
            "(and chunking) as the rest" if found[0] == TEXT_KEY
            else "vectors from different models or codecs are not comparable")
    raise SpaceMismatch(_worded(found, name_a, name_b), hint=hint)


def _worded(found, name: str, other_name: str) -> str:
    key, (shown, other_shown) = found
    return f"{key} differs: {name} has {shown}, {other_name} has {other_shown}"


def check_same_documents(meta_a: Mapping[str, str], meta_b: Mapping[str, str], name_a: str,
                         name_b: str, keys: Iterable[str] = DOCUMENT_KEYS,
                         force: bool = False) -> None:
    """check_same_space for document sets joined into one (an index, an appended or merged
    set): also the text embedded, which an older file may not record (then a note)."""
    check_same_space(meta_a, meta_b, name_a, name_b, keys=keys, force=force)
    if not force and TEXT_KEY in keys:
        note_unknown_text([(name_a, meta_a), (name_b, meta_b)])


def note_unknown_text(named: Sequence[tuple[str, Mapping[str, str]]]) -> None:
    """A note for each input that does not record the text embedded when another does: the
    texts are then not compared (files from before the key, or vectors from elsewhere)."""
    known = next(((name, meta[TEXT_KEY]) for name, meta in named if TEXT_KEY in meta), None)
    if known is None:
        return
    from vecpipe.core import notices

    for name, meta in named:
        if TEXT_KEY not in meta:
            notices.info(f"{name} does not record which text fields were embedded (unknown "
                         f"fields): not compared with {known[0]}'s {text_summary(known[1])}")


def input_check(force: bool, documents: bool = False):
    """The `check` a RecordStream runs between its inputs: none when `force`; `documents`:
    inputs read as one document set (also the text embedded)."""
    if force:
        return None
    return check_same_documents if documents else check_same_space


def embedded_text(fields: Sequence[str], chunking=None, separator: str = TEXT_SEPARATOR) -> str:
    """The `embedded_text` value: the text fields embedded, how they were joined, and the
    chunking (None, or a core.chunking.Chunking: its tokens, overlap, and situated context or
    late chunking when set)."""
    value = {"fields": list(fields), "separator": separator,
             "chunking": None if chunking is None else chunking.describe()}
    return json.dumps(value)


def parse_embedded_text(value: str) -> dict | None:
    """The `embedded_text` value as a dict; None when it is not one (written by hand?)."""
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def text_summary(value: str) -> str:
    """`'title' + 'text' joined by ' '`, `'text' in chunks of 256 tokens overlapping 32`."""
    parsed = parse_embedded_text(value)
    if parsed is None or not isinstance(parsed.get("fields"), list):
        return repr(value)
    shown = " + ".join(repr(str(name)) for name in parsed["fields"])
    if len(parsed["fields"]) > 1:
        shown += f" joined by {parsed.get('separator')!r}"
    chunking = parsed.get("chunking")
    if isinstance(chunking, dict):
        shown += (f" in chunks of {chunking.get('tokens')} tokens overlapping "
                  f"{chunking.get('overlap')}")
        if chunking.get("context_tokens"):
            shown += (f", each situated in {chunking['context_tokens']} tokens of context "
                      f"({chunking.get('template')!r})")
        if chunking.get("late"):
            shown += ", late-chunked (pooled from one pass over the document)"
    return shown


def check_model(meta: Mapping[str, str], model, source: str, spec: str | None,
                dim: int | None = None, keys: Iterable[str] = MODEL_KEYS,
                force: bool = False) -> None:
    """Refuse a model (`-m spec`, loaded as `model`) other than the one `meta` records, and one
    that makes vectors of another dimension than `dim`."""
    check_same_space(meta, VectorSpace.of_model(model).meta(), source, f"-m {spec}",
                     keys=keys, force=force)
    if dim is not None and model.dim != dim:
        raise DataError(f"model {model.name} makes {model.dim}-dimensional vectors, "
                        f"the vectors have {dim}", source=source)


def merged_meta(metas: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The keys on which all inputs agree (for outputs that combine several inputs)."""
    metas = list(metas)
    if not metas:
        return {}
    common = dict(metas[0])
    for meta in metas[1:]:
        common = {key: value for key, value in common.items()
                  if _shown_difference(key, meta.get(key), value, missing_agrees=False) is None}
    return common


def _shown_difference(key: str, a: str | None, b: str | None, missing_agrees: bool = True,
                      absent_is_default: bool = False):
    """None when `a` and `b` agree, else how to show each; codecs by what they do."""
    if a == b:
        return None
    if absent_is_default and key in DEFAULT_WHEN_ABSENT and (a is None or b is None):
        default = DEFAULT_WHEN_ABSENT[key]
        return (default if a is None else repr(a)), (default if b is None else repr(b))
    if a is None or b is None:
        return None if missing_agrees else (repr(a), repr(b))
    if key == TEXT_KEY:
        parsed = parse_embedded_text(a)
        same = parsed is not None and parsed == parse_embedded_text(b)
        return None if same else (text_summary(a), text_summary(b))
    if key != "codec":
        return repr(a), repr(b)
    from vecpipe.core.codec import codec_difference  # numpy: only when two codecs are compared

    return codec_difference(a, b)


# A model's own prompts for each role, as sentence-transformers' encode_query/encode_document.
ROLE_PROMPT_NAMES = {"query": ("query",), "doc": ("document", "passage", "corpus")}


def role_prompt(model, role: str, prompt: str | None = None, prompt_name: str | None = None,
                recorded: str | None = None) -> str:
    """The prompt that puts `role` ("query" or "doc") texts in the vectors' space: the given
    prompt or prompt name, else the one recorded with the vectors, else the model's own."""
    if prompt is not None or prompt_name is not None:
        return model.prompt_text(prompt, prompt_name)
    if recorded is not None:
        return recorded
    return next((model.prompts[name] for name in ROLE_PROMPT_NAMES[role]
                 if name in model.prompts), "")
