"""A benchmark suite: its file (tasks run against models), the comparison of every model with
the first (a paired bootstrap of the main score), and MMTEB's Borda rank.

The suite file is TOML or JSON:

    models = ["default", "./finetuned"]       # the first is the baseline
    [[tasks]]
    name = "NFCorpus"                         # the task's name (its MTEB file's too)
    command = "beir"                          # an eval task command
    args = ["../shared/data/nfcorpus"]        # its arguments; paths relative to the file
    revision = "ec0fa4fe99da2ff19ca1214b7966684033a58814"   # optional: the dataset revision
    languages = "eng-Latn"                    # optional
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from vecpipe.formats.errors import DataError

TASK_COMMANDS = ("beir", "sts", "pair-classification", "reranking", "bitext-mining",
                 "summarization", "classification", "clustering")
RESAMPLES = 1000  # bootstrap resamples of each comparison
ALPHA = 0.05      # the p-value under which a difference is marked


@dataclass(frozen=True)
class SuiteTask:
    name: str
    command: str
    args: tuple = ()
    revision: str | None = None
    languages: str | None = None


@dataclass(frozen=True)
class Suite:
    path: str
    models: tuple
    tasks: tuple = field(default_factory=tuple)

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def read_suite(path: str) -> Suite:
    """The suite file, checked: at least one model and one task, known task commands."""
    data = _parse(path)
    models = data.get("models", ["default"])
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise DataError("models must be a list of model names or folders", source=path)
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise DataError("no tasks: add [[tasks]] tables with a name, a command and args",
                        source=path)
    return Suite(path, tuple(models), tuple(_task(t, path, i + 1) for i, t in enumerate(tasks)))


def _parse(path: str) -> dict:
    from vecpipe.formats.readers import open_input

    stream, _, _ = open_input(path)
    with stream:
        raw = stream.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        message, line = _error_line(err)
        raise DataError(f"not a suite file: {message}", source=path, record=line) from None
    if not isinstance(data, dict):
        raise DataError("a suite file is a table of models and tasks", source=path)
    unknown = sorted(set(data) - {"models", "tasks"})
    if unknown:
        raise DataError(f"unknown key {unknown[0]!r}; a suite has models and tasks", source=path)
    return data


def _error_line(err: Exception) -> tuple[str, int | None]:
    """The parser's message without its position, and the line it names (JSON's lineno,
    TOML's "(at line N, column M)")."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg, err.lineno
    message = str(err).splitlines()[0]
    at = re.search(r"\s*\(at line (\d+), column \d+\)$", message)
    return (message[:at.start()], int(at.group(1))) if at else (message, None)


def _task(entry, path: str, number: int) -> SuiteTask:
    where = f"task {number}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} is not a table", source=path)
    unknown = sorted(set(entry) - {"name", "command", "args", "revision", "languages"})
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}", source=path)
    name, command, args = entry.get("name"), entry.get("command"), entry.get("args", [])
    if not isinstance(name, str) or not name:
        raise DataError(f"{where} has no name", source=path)
    if command not in TASK_COMMANDS:
        raise DataError(f"{where} ({name}): command {command!r} is not one of "
                        f"{', '.join(TASK_COMMANDS)}", source=path)
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
        raise DataError(f"{where} ({name}): args must be a list of strings", source=path)
    return SuiteTask(name, command, tuple(str(a) for a in args), entry.get("revision"),
                     entry.get("languages"))


def compare(base_units, other_units, seed: int = 0) -> float | None:
    """Two-sided p-value of the difference in main score between two models on one task, by a
    paired bootstrap over the task's units (queries, experiments, pairs...): resample the
    units, take the difference each time, and count how often it lands as far from the
    observed difference as zero is. Units are a list of per-unit main scores (the main score
    is their mean) or Units; None when a task has none or the two are not the same units."""
    import numpy as np

    (score_a, count), (score_b, count_b) = _scorer(base_units), _scorer(other_units)
    if score_a is None or score_b is None or count != count_b or count < 2:
        return None
    every = np.arange(count)
    observed = score_b(every) - score_a(every)
    rng = np.random.default_rng(seed)
    far = 0
    for _ in range(RESAMPLES):
        rows = rng.integers(0, count, count)
        far += abs(score_b(rows) - score_a(rows) - observed) >= abs(observed)
    return float((far + 1) / (RESAMPLES + 1))


@dataclass(frozen=True)
class Units:
    """A task's main score as a function of a selection (an index array, repeats allowed) of
    its `count` units, for main scores that are not a mean over units (Spearman, AP, F1)."""
    score_on: object
    count: int


def _scorer(units):
    import numpy as np

    if units is None:
        return None, 0
    if isinstance(units, Units):
        return units.score_on, units.count
    values = np.asarray(units, np.float64)
    return (lambda rows: float(values[rows].mean())), values.size


def borda_ranks(scores: list[list[float | None]]) -> list[int]:
    """MMTEB's Borda rank of models (rows) over tasks (columns): in each task a model earns
    n - its rank (average rank for ties, highest score first; a missing score earns
    nothing), summed; the totals ranked with ties sharing the best rank."""
    models = len(scores)
    totals = [0.0] * models
    for task in range(len(scores[0]) if scores else 0):
        present = [(scores[m][task], m) for m in range(models) if scores[m][task] is not None]
        for model, rank in _average_ranks(present).items():
            totals[model] += models - rank
    return [1 + sum(other > total for other in totals) for total in totals]


def _average_ranks(values: list[tuple[float, int]]) -> dict[int, float]:
    """Rank 1 for the highest value; tied values share their ranks' mean."""
    ordered = sorted(values, key=lambda item: -item[0])
    ranks, i = {}, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][0] == ordered[i][0]:
            j += 1
        for _, model in ordered[i:j + 1]:
            ranks[model] = (i + j) / 2 + 1
        i = j + 1
    return ranks
