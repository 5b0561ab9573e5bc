"""MTEB's result files: one TaskResult JSON per task, in the layout of MTEB's results folder
(DIR/<model name, "/" as "__">/<model revision>/<task name>.json, with a model_meta.json
beside it), so `mteb.ResultCache`, `TaskResult.from_disk` and the leaderboard tools load what
vecpipe measured. The scores are a task report's metric keys, which are MTEB's own."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

# The mteb release whose evaluators vecpipe's equal and whose TaskResult format this writes
# (tests/test_mteb_results.py checks it against the installed mteb).
MTEB_VERSION = "2.26.24"
NO_REVISION = "no_revision_available"  # MTEB's word for a revision nobody recorded
UNDETERMINED = ("und",)  # ISO 639-3 for "not known": MTEB counts a score only under a language
_NOT_SCORES = {"seconds"}  # report floats that are timings, not metrics


@dataclass(frozen=True)
class TaskIdentity:
    """What names a task in an MTEB file: its name, its dataset revision, the split scored and
    the languages (ISO 639-3 with script, e.g. eng-Latn)."""
    name: str
    revision: str
    split: str = "test"
    languages: tuple = UNDETERMINED


@dataclass(frozen=True)
class ModelIdentity:
    """The model an MTEB file is filed under: name and revision, and what its model_meta.json
    records (None where vecpipe does not know it)."""
    name: str
    revision: str = NO_REVISION
    embed_dim: int | None = None
    max_tokens: int | None = None


def scores(report: dict) -> dict:
    """A task report's metrics: its float values (counts, names and timings left out)."""
    return {key: value for key, value in report.items()
            if isinstance(value, float) and key not in _NOT_SCORES}


def task_result(task: TaskIdentity, report: dict, seconds: float) -> dict:
    """The TaskResult of one report, as MTEB's `TaskResult.to_dict` lays it out (one subset,
    "default", since vecpipe's inputs are one file or folder)."""
    split_scores = {**scores(report), "hf_subset": "default", "languages": list(task.languages),
                    "mteb_version": MTEB_VERSION}
    return {"dataset_revision": task.revision, "task_name": task.name,
            "mteb_version": MTEB_VERSION, "scores": {task.split: [split_scores]},
            "evaluation_time": seconds, "kg_co2_emissions": None, "date": time.time()}


def model_meta(model: ModelIdentity) -> dict:
    """model_meta.json: MTEB's ModelMeta fields, unknown ones null."""
    unknown = ("release_date", "languages", "n_parameters", "memory_usage_mb", "license",
               "open_weights", "public_training_code", "public_training_data",
               "use_instructions", "training_datasets")
    return {"name": model.name, "revision": model.revision, "embed_dim": model.embed_dim,
            "max_tokens": model.max_tokens, "framework": ["Sentence Transformers"],
            "similarity_fn_name": "cosine", "loader": None, "modalities": ["text"],
            "model_type": ["dense"], **dict.fromkeys(unknown)}


def result_path(directory: str, model: ModelIdentity, task_name: str) -> str:
    """Where MTEB's ResultCache looks for the task's result (its own name normalisation)."""
    folder = model.name.replace("/", "__").replace(" ", "_")
    return os.path.join(directory, folder, model.revision, f"{task_name}.json")


def save(directory: str, model: ModelIdentity, task: TaskIdentity, report: dict,
         seconds: float) -> str:
    """Write the task's result and the model's model_meta.json (each atomically: a reader
    never sees half a file); returns the result's path."""
    path = result_path(directory, model, task.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(os.path.join(os.path.dirname(path), "model_meta.json"), model_meta(model))
    _write_json(path, task_result(task, report, seconds))
    return path


def _write_json(path: str, value: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
