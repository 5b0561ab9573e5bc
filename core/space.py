"""The vector space a set of vectors lives in, and the one comparison every command makes.

A `VectorSpace` is read from and written to the `vecpipe.*` metadata of a stream (and the
metadata an index manifest records). Two spaces are compared key by key; codecs by what they do
to the vectors (`Codec.identity`), so a parameter-free transform (truncation, float16) compares
equal however it was produced.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Mapping

from vecpipe.formats.errors import DataError

# Keys whose difference makes two vector sets incomparable.
IDENTITY_KEYS = ("model", "dim", "codec")
MODEL_KEYS = ("model", "model_sha")


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
        for key in keys:
            shown = _shown_difference(key, getattr(self, key), getattr(other, key))
            if shown is not None:
                return f"{key} differs: {name} has {shown[0]}, {other_name} has {shown[1]}"
        return None


def check_same_space(meta_a: Mapping[str, str], meta_b: Mapping[str, str], name_a: str,
                     name_b: str, keys: Iterable[str] = IDENTITY_KEYS,
                     force: bool = False) -> None:
    """Refuse to mix vectors whose spaces differ on `keys` (unless `force`)."""
    if force:
        return
    difference = VectorSpace.from_meta(meta_a).difference(VectorSpace.from_meta(meta_b),
                                                          name_a, name_b, keys)
    if difference is not None:
        raise SpaceMismatch(difference, hint="vectors from different models or codecs are "
                                             "not comparable")


def input_check(force: bool):
    """The `check` a RecordStream runs between its inputs: none when `force`."""
    return None if force else check_same_space


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


def _shown_difference(key: str, a: str | None, b: str | None, missing_agrees: bool = True):
    """None when `a` and `b` agree, else how to show each; codecs by what they do."""
    if a == b:
        return None
    if a is None or b is None:
        return None if missing_agrees else (repr(a), repr(b))
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
