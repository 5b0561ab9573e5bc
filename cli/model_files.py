"""What model folders' config files say, read without loading a model: the offline models
`vecpipe models` lists, and the model a dry run resolves (dim, max length, prompts)."""
from __future__ import annotations

import json
import os

from vecpipe.formats.errors import DataError, UsageError


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def is_model_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name))
               for name in ("modules.json", "config.json", "sentence_bert_config.json"))


def folder_bytes(path: str) -> int:
    """Bytes on disk under path; files reached through symlinks (a hub snapshot's blobs)
    counted once."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                real = os.path.realpath(os.path.join(root, name))
                if real not in seen:
                    seen.add(real)
                    total += os.path.getsize(real)
            except OSError:
                continue
    return total


def describe(path: str, name: str, source: str) -> dict:
    """What a model folder's config files say: dim, max length, prompts (no weights read)."""
    config = _read_json(os.path.join(path, "config.json")) or {}
    st_config = _read_json(os.path.join(path, "sentence_bert_config.json")) or {}
    prompts_config = _read_json(os.path.join(path, "config_sentence_transformers.json")) or {}
    modules = _read_json(os.path.join(path, "modules.json")) or []
    dim = None
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        module_config = _read_json(os.path.join(path, module.get("path", ""), "config.json")) \
            or {}
        if kind.endswith("Pooling") and dim is None:
            dim = module_config.get("word_embedding_dimension")
        elif kind.endswith("Dense") and module_config.get("out_features"):
            dim = module_config["out_features"]
    if dim is None:
        dim = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    max_length = st_config.get("max_seq_length") or config.get("max_position_embeddings")
    # --max-length may go past the window up to a BERT model's position table (cli/models.py)
    longest = max(max_length or 0, config.get("max_position_embeddings") or 0) \
        if config.get("model_type") == "bert" else max_length
    return {"name": name, "source": source, "dim": dim, "max_length": max_length,
            "longest_window": longest or None,
            "prompts": prompts_config.get("prompts") or {},
            "sentence_transformers": bool(modules),
            "architecture": (config.get("architectures") or [None])[0],
            "bytes": folder_bytes(path), "path": path}


def hub_cache_folders() -> list[str]:
    found = []
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            found.append(os.environ[variable])
    if os.environ.get("HF_HOME"):
        found.append(os.path.join(os.environ["HF_HOME"], "hub"))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    found.append(os.path.join(cache, "huggingface", "hub"))
    return list(dict.fromkeys(found))


def newest_snapshot(cache: str, entry: str) -> str | None:
    """The newest snapshot folder of a hub cache entry (`models--ORG--NAME`) that holds a
    model, or None."""
    snapshots = os.path.join(cache, entry, "snapshots")
    revisions = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    revisions = [r for r in revisions if is_model_folder(os.path.join(snapshots, r))]
    if not revisions:
        return None
    newest = max(revisions, key=lambda r: os.path.getmtime(os.path.join(snapshots, r)))
    return os.path.join(snapshots, newest)


def hub_models(cache: str) -> list[dict]:
    """Models in a Hugging Face hub cache: models--ORG--NAME/snapshots/REVISION/."""
    out = []
    if not os.path.isdir(cache):
        return out
    for entry in sorted(os.listdir(cache)):
        if not entry.startswith("models--"):
            continue
        snapshot = newest_snapshot(cache, entry)
        if snapshot is None:
            continue
        record = describe(snapshot, entry[len("models--"):].replace("--", "/"), "hf-cache")
        record["bytes"] = folder_bytes(os.path.join(cache, entry))
        out.append(record)
    return out


def folder_models(folder: str, source: str) -> list[dict]:
    """A model folder, or each model folder inside one (a sentence-transformers cache)."""
    folder = folder.rstrip(os.sep) or os.sep
    if is_model_folder(folder):
        return [describe(folder, os.path.basename(os.path.abspath(folder)), source)]
    if not os.path.isdir(folder):
        return []
    return [describe(os.path.join(folder, entry), entry, source)
            for entry in sorted(os.listdir(folder))
            if os.path.isdir(os.path.join(folder, entry))
            and is_model_folder(os.path.join(folder, entry))]


def offline_model(spec: str | None) -> dict:
    """The model `spec` names, as `describe` gives it, found without loading it or going
    online: `fake:DIM`, the bundled default, a model folder, or a hub name in a local cache.
    A name found nowhere is a DataError."""
    from vecpipe.cli import models

    if spec is not None and spec.startswith("fake:"):
        return {"name": spec, "source": "fake", "dim": models.parse_fake(spec),
                "max_length": None, "prompts": {}, "path": None}
    if spec is None or spec in models.BUNDLED_ALIASES:
        return describe(models.bundled_model_path(), models.BUNDLED_NAME, "bundled")
    if os.path.isdir(spec):
        if not is_model_folder(spec):
            raise DataError("not a model folder (no config.json or modules.json)", source=spec)
        return describe(os.path.abspath(spec), os.path.abspath(spec), "folder")
    if os.path.exists(spec):
        raise UsageError(f"model path {spec!r} is not a folder")
    found = cached_hub_model(spec)
    if found is None:
        raise DataError(f"model {spec!r} is not a folder, and not in the local model caches",
                        hint="`vecpipe models` lists the models usable offline; online, a run "
                             "downloads a hub model first")
    return found


def cached_hub_model(name: str) -> dict | None:
    """A hub model in a local cache (`NAME` alone also as sentence-transformers/NAME)."""
    names = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for full in names:
        for cache in hub_cache_folders():
            snapshot = newest_snapshot(cache, "models--" + full.replace("/", "--")) \
                if os.path.isdir(cache) else None
            if snapshot is not None:
                return describe(snapshot, full, "hf-cache")
        home = os.environ.get("SENTENCE_TRANSFORMERS_HOME")
        folder = os.path.join(home, full.replace("/", "_")) if home else None
        if folder and is_model_folder(folder):
            return describe(folder, full, "st-cache")
    return None
