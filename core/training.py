"""Fine-tuning a sentence-transformers model on training rows (`vecpipe train`).

The rows are those mine-negatives writes, in any of its shapes (triplet, n-tuple, labeled-pair,
labeled-list, with or without scores), or plain (query, positive) pairs. They are read into
`Example`s (anchor, positive, negatives, and the teacher's scores when the rows carry them),
then laid out as the columns the chosen loss wants. Training is sentence-transformers' own
trainer (Hugging Face's underneath: mixed precision, several GPUs under torchrun or
accelerate, checkpoints); vecpipe adds the reading, the named losses, an evaluator that scores
a BEIR split with vecpipe's exact search and metrics (the best checkpoint is kept by one of
them), resuming from a work folder beside the output, an output folder that appears whole, and
a recipe file of how the model was made.

torch, datasets and sentence-transformers are imported inside the functions that use them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from vecpipe.formats.errors import DataError, ParameterError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

RECIPE_FILE = "vecpipe-train.json"
JOB_FILE = "job.json"           # in the work folder: what an interrupted run was asked to do
WORK_SUFFIX = ".partial"        # the work folder: MODEL_DIR.partial beside MODEL_DIR
FINAL_FOLDER = "model"          # the finished model inside the work folder, renamed into place

LOSSES = ("mnrl", "cached-mnrl", "gist", "cached-gist", "margin-mse")
GUIDED_LOSSES = ("gist", "cached-gist")
CACHED_LOSSES = ("cached-mnrl", "cached-gist")
IN_BATCH_LOSSES = ("mnrl", "cached-mnrl", "gist", "cached-gist")
MARGIN_STRATEGIES = ("absolute", "relative")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
SHAPES = ("pairs", "triplet", "n-tuple", "labeled-pair", "labeled-list")
ANCHOR_FIELDS = ("query", "anchor")
DEFAULT_EVAL_METRIC = "ndcg_at_10"
CURVE_METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
EVALUATOR_NAME = "beir"
_CORPUS_BLOCK = 8192
_QUERY_BLOCK = 2048


# ---- reading training rows -------------------------------------------------------------------

@dataclass
class Example:
    """One training example: a query, its positive, its negatives (hardest first, as mined),
    and, when the rows carry them, the teacher's scores (positive first, then each negative)."""

    anchor: str
    positive: str
    negatives: list = field(default_factory=list)
    scores: list | None = None


@dataclass
class TrainingData:
    """The examples of the input files, the shape their rows had, and the files' fingerprint."""

    examples: list
    shape: str
    rows: int
    files: list          # [{"path", "bytes", "sha256"}] in input order
    sha256: str          # over every input's bytes, in order

    @property
    def has_scores(self) -> bool:
        return bool(self.examples) and all(e.scores is not None for e in self.examples)

    @property
    def fewest_negatives(self) -> int:
        return min((len(e.negatives) for e in self.examples), default=0)

    def fingerprint(self) -> dict:
        return {"sha256": self.sha256, "files": self.files, "shape": self.shape,
                "rows": self.rows, "examples": len(self.examples)}


def fingerprint_files(paths, names=None) -> tuple[list, str]:
    """sha256 of each file's bytes and one over all of them in order (the data fingerprint);
    `names` are the names recorded (default the paths)."""
    overall, files = hashlib.sha256(), []
    for path, name in zip(paths, names or paths):
        own, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                own.update(block)
                overall.update(block)
                size += len(block)
        files.append({"path": name, "bytes": size, "sha256": own.hexdigest()})
    return files, overall.hexdigest()


def row_shape(schema: "pa.Schema", source: str | None = None) -> tuple[str, str]:
    """(the anchor field, the shape) of training rows, from their field names."""
    import pyarrow as pa

    names = schema.names
    anchor = next((name for name in ANCHOR_FIELDS if name in names), None)
    if anchor is None or "positive" not in names:
        raise DataError(f"training rows need a `query` (or `anchor`) and a `positive` field; "
                        f"fields are {', '.join(names)}", source=source)
    if pa.types.is_list(schema.field("positive").type) \
            or pa.types.is_large_list(schema.field("positive").type):
        if "labels" not in names and "scores" not in names:
            raise DataError("rows with a list of texts need `labels` or `scores`",
                            source=source)
        return anchor, "labeled-list"
    if "negative" in names:
        return anchor, "triplet"
    if "negative_1" in names:
        return anchor, "n-tuple"
    if "label" in names or "score" in names:
        return anchor, "labeled-pair"
    return anchor, "pairs"


def read_training_rows(stream, paths, names=None) -> TrainingData:
    """The examples of a RecordStream over `paths` (fingerprinted by their bytes)."""
    schema = stream.schema
    if schema is None:
        raise DataError("no training rows: the input is empty", source=(names or paths)[0])
    anchor, shape = row_shape(schema, (names or paths)[0])
    builder = _BUILDERS[shape](anchor, schema.names)
    rows = 0
    for item in stream:
        records = item.batch.to_pylist()
        for offset, record in enumerate(records):
            builder.add(record, item.source, item.first_record + offset)
        rows += len(records)
    examples = builder.finish()
    if not examples:
        raise DataError("no training examples in the input", source=(names or paths)[0])
    files, digest = fingerprint_files(paths, names)
    return TrainingData(examples, shape, rows, files, digest)


def _text(record: dict, name: str, source, number) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise DataError(f"`{name}` must be a non-empty text", source=source, record=number)
    return value


def _score_list(record: dict, name: str, length: int, source, number) -> list | None:
    """The `scores` list of a row (positive then negatives), checked for its length."""
    values = record.get(name)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != length \
            or not all(isinstance(v, (int, float)) for v in values):
        raise DataError(f"`{name}` must be {length} numbers (positive, then each negative)",
                        source=source, record=number)
    return [float(v) for v in values]


class _Grouped:
    """Triplets and n-tuples: one example per (anchor, positive), its rows' negatives joined in
    order (triplet rows of one pair become one n-tuple; scores likewise)."""

    def __init__(self, anchor: str, names: list):
        self.anchor = anchor
        self.negative_fields = ["negative"] if "negative" in names else sorted(
            (n for n in names if re.fullmatch(r"negative_\d+", n)), key=lambda n: int(n[9:]))
        self.scored = "scores" in names
        self.by_pair: dict[tuple, Example] = {}

    def add(self, record: dict, source, number) -> None:
        anchor = _text(record, self.anchor, source, number)
        positive = _text(record, "positive", source, number)
        negatives = [record[n] for n in self.negative_fields if record.get(n) is not None]
        if not all(isinstance(n, str) and n for n in negatives):
            raise DataError("negatives must be non-empty texts", source=source, record=number)
        scores = _score_list(record, "scores", 1 + len(negatives), source, number) \
            if self.scored else None
        if self.scored and scores is None:
            raise DataError("`scores` is missing", source=source, record=number)
        example = self.by_pair.get((anchor, positive))
        if example is None:
            self.by_pair[(anchor, positive)] = Example(anchor, positive, negatives, scores)
            return
        example.negatives.extend(negatives)
        if scores is not None:
            example.scores.extend(scores[1:])

    def finish(self) -> list:
        return list(self.by_pair.values())


class _LabeledPairs:
    """labeled-pair rows: per anchor, label 1 rows are positives and label 0 rows negatives;
    each positive becomes an example with every negative of its anchor."""

    def __init__(self, anchor: str, names: list):
        self.anchor = anchor
        self.has_labels = "label" in names
        self.by_anchor: dict[str, tuple[list, list]] = {}

    def add(self, record: dict, source, number) -> None:
        if not self.has_labels:
            raise DataError("labeled-pair rows with scores instead of labels do not say which "
                            "text is the positive", source=source, record=number,
                            hint="mine the rows as n-tuple or labeled-list with scores")
        anchor = _text(record, self.anchor, source, number)
        text = _text(record, "positive", source, number)
        label = record.get("label")
        if label not in (0, 1):
            raise DataError(f"`label` must be 0 or 1, got {label!r}", source=source,
                            record=number)
        positives, negatives = self.by_anchor.setdefault(anchor, ([], []))
        (positives if label == 1 else negatives).append(text)

    def finish(self) -> list:
        return [Example(anchor, positive, list(negatives))
                for anchor, (positives, negatives) in self.by_anchor.items()
                for positive in positives]


class _LabeledLists:
    """labeled-list rows: the texts' first is the positive, the rest its negatives; `scores`
    (when present) are the teacher's, `labels` must mark the first text alone."""

    def __init__(self, anchor: str, names: list):
        self.anchor = anchor
        self.scored = "scores" in names
        self.examples: list = []

    def add(self, record: dict, source, number) -> None:
        anchor = _text(record, self.anchor, source, number)
        texts = record.get("positive")
        if not isinstance(texts, list) or not texts \
                or not all(isinstance(t, str) and t for t in texts):
            raise DataError("`positive` must be a list of non-empty texts", source=source,
                            record=number)
        labels = record.get("labels")
        if labels is not None and list(labels) != [1] + [0] * (len(texts) - 1):
            raise DataError("`labels` must mark the first text (1) as the positive and the "
                            "others (0) as negatives", source=source, record=number)
        scores = _score_list(record, "scores", len(texts), source, number) \
            if self.scored else None
        self.examples.append(Example(anchor, texts[0], texts[1:], scores))

    def finish(self) -> list:
        return self.examples


_BUILDERS = {"pairs": _Grouped, "triplet": _Grouped, "n-tuple": _Grouped,
             "labeled-pair": _LabeledPairs, "labeled-list": _LabeledLists}


# ---- the dataset a loss trains on --------------------------------------------------------------

def loss_columns(examples: list, loss: str) -> dict:
    """The columns of the training dataset, in the order the loss reads them: anchor, positive,
    then negatives (margin-mse: and `label`, the teacher's margins positive - negative).
    In-batch losses keep the fewest negatives any example has; the guided loss takes one
    negative per row (it reads at most a triplet), so each negative makes a row."""
    if loss in GUIDED_LOSSES:
        if min(len(e.negatives) for e in examples):
            rows = [(e.anchor, e.positive, [n]) for e in examples for n in e.negatives]
        else:
            rows = [(e.anchor, e.positive, []) for e in examples]
        return _columns(rows)
    kept = min(len(e.negatives) for e in examples)
    columns = _columns([(e.anchor, e.positive, e.negatives[:kept]) for e in examples])
    if loss == "margin-mse":
        margins = [[e.scores[0] - s for s in e.scores[1:kept + 1]] for e in examples]
        columns["label"] = [m[0] for m in margins] if kept == 1 else margins
    return columns


def _columns(rows: list) -> dict:
    width = len(rows[0][2]) if rows else 0
    columns = {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]}
    for i in range(width):
        columns[f"negative_{i + 1}"] = [r[2][i] for r in rows]
    return columns


def check_data_for_loss(data: TrainingData, loss: str) -> None:
    """Refuse data the loss cannot learn from, before any model loads."""
    if loss == "margin-mse":
        if not data.has_scores:
            raise ParameterError("margin-mse distils scores: the rows need `scores` (a "
                                 "cross-encoder's, as mined with scores)", "loss")
        if data.fewest_negatives == 0:
            raise ParameterError("margin-mse needs at least one negative per example", "loss")


# ---- losses ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    """A named loss and its modifiers: Matryoshka dimensions, adaptive layers (both together:
    2D Matryoshka), the cached variants' mini-batch, the guided loss's margin rule."""

    name: str = "mnrl"
    matryoshka_dims: tuple | None = None
    adaptive_layers: bool = False
    mini_batch_size: int = 32
    scale: float = 20.0               # MNRL's similarity scale
    temperature: float = 0.01         # GISTEmbed's (1 / scale)
    margin_strategy: str = "absolute"
    margin: float = 0.0

    def check(self, model_dim: int | None = None) -> None:
        if self.name not in LOSSES:
            raise ParameterError(f"unknown loss {self.name!r}; choose from {', '.join(LOSSES)}",
                                 "loss")
        if self.margin_strategy not in MARGIN_STRATEGIES:
            raise ParameterError(f"unknown margin strategy {self.margin_strategy!r}; choose "
                                 f"{' or '.join(MARGIN_STRATEGIES)}", "margin_strategy")
        if self.adaptive_layers and self.name in CACHED_LOSSES:
            raise ParameterError(f"adaptive layers do not work with {self.name} "
                                 "(sentence-transformers cannot combine them)",
                                 "adaptive_layers")
        dims = self.matryoshka_dims or ()
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ParameterError("Matryoshka dimensions must be distinct and positive",
                                 "matryoshka_dims")
        if model_dim is not None and any(d > model_dim for d in dims):
            raise ParameterError(f"a Matryoshka dimension exceeds the model's {model_dim}",
                                 "matryoshka_dims")

    def describe(self) -> dict:
        """The recipe's record: the loss, its parameters, and the modifiers around it."""
        described = {"name": self.name, "class": _LOSS_CLASSES[self.name]}
        if self.name in ("mnrl", "cached-mnrl"):
            described["scale"] = self.scale
        if self.name in GUIDED_LOSSES:
            described.update(temperature=self.temperature, margin_strategy=self.margin_strategy,
                             margin=self.margin)
        if self.name in CACHED_LOSSES:
            described["mini_batch_size"] = self.mini_batch_size
        modifier = self.modifier()
        if modifier is not None:
            described["modifier"] = modifier
            if self.matryoshka_dims:
                described["matryoshka_dims"] = list(self.matryoshka_dims)
        return described

    def modifier(self) -> str | None:
        if self.matryoshka_dims and self.adaptive_layers:
            return "Matryoshka2dLoss"
        if self.matryoshka_dims:
            return "MatryoshkaLoss"
        if self.adaptive_layers:
            return "AdaptiveLayerLoss"
        return None


_LOSS_CLASSES = {"mnrl": "MultipleNegativesRankingLoss",
                 "cached-mnrl": "CachedMultipleNegativesRankingLoss",
                 "gist": "GISTEmbedLoss", "cached-gist": "CachedGISTEmbedLoss",
                 "margin-mse": "MarginMSELoss"}


def build_loss(spec: LossSpec, model, guide=None):
    """sentence-transformers' loss for `spec` on `model` (`guide`: the guided losses' model),
    wrapped in its Matryoshka / adaptive-layer modifier."""
    from sentence_transformers.sentence_transformer import losses

    if spec.name in GUIDED_LOSSES and guide is None:
        raise ParameterError(f"{spec.name} needs a guide model", "guide")
    if spec.name == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=spec.scale)
    elif spec.name == "cached-mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=spec.scale,
                                                         mini_batch_size=spec.mini_batch_size)
    elif spec.name == "gist":
        loss = losses.GISTEmbedLoss(model, guide, temperature=spec.temperature,
                                    margin_strategy=spec.margin_strategy, margin=spec.margin)
    elif spec.name == "cached-gist":
        loss = losses.CachedGISTEmbedLoss(model, guide, temperature=spec.temperature,
                                          mini_batch_size=spec.mini_batch_size,
                                          margin_strategy=spec.margin_strategy,
                                          margin=spec.margin)
    else:
        loss = losses.MarginMSELoss(model)
    dims = list(spec.matryoshka_dims or ())
    if dims and spec.adaptive_layers:
        return losses.Matryoshka2dLoss(model, loss, dims)
    if dims:
        return losses.MatryoshkaLoss(model, loss, dims)
    if spec.adaptive_layers:
        return losses.AdaptiveLayerLoss(model, loss)
    return loss


# ---- hyperparameters and evaluation ----------------------------------------------------------

@dataclass(frozen=True)
class Hyperparameters:
    epochs: float = 1.0
    max_steps: int | None = None        # overrides epochs
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    max_length: int | None = None       # None: the model's own
    query_prompt: str | None = None
    doc_prompt: str | None = None
    precision: str = "auto"
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int | None = None    # None: about 20 notes over the run

    def check(self) -> None:
        for name in ("batch_size", "save_steps", "logging_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ParameterError(f"{name.replace('_', ' ')} must be at least 1", name)
        if self.max_steps is not None and self.max_steps < 1:
            raise ParameterError("steps must be at least 1", "max_steps")
        if self.max_steps is None and not self.epochs > 0:
            raise ParameterError("epochs must be above 0", "epochs")
        if not 0 <= self.warmup_ratio < 1:
            raise ParameterError("the warm-up ratio is in [0, 1)", "warmup_ratio")
        if not self.learning_rate > 0:
            raise ParameterError("the learning rate must be above 0", "learning_rate")
        if self.precision not in PRECISIONS:
            raise ParameterError(f"unknown precision {self.precision!r}", "precision")


@dataclass(frozen=True)
class EvalSpec:
    """Score a BEIR folder's split every `steps` steps (and keep the best checkpoint by
    `metric`, an MTEB key such as ndcg_at_10)."""

    folder: str
    split: str = "dev"
    steps: int = 100
    metric: str = DEFAULT_EVAL_METRIC
    batch_size: int = 32


def beir_evaluator(spec: EvalSpec, prompts: tuple, window: int | None = None):
    """A sentence-transformers evaluator that embeds the split's judged queries and the
    corpus with the model being trained, searches exactly by cosine (core.vectors.ExactSearch)
    and scores the run with core.retrieval_metrics (MTEB's cutoffs): the numbers `eval beir`
    reports for the same model. `window`: the token window texts are embedded with (the saved
    model's, when training truncates shorter)."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    from vecpipe.core import retrieval_metrics as metrics
    from vecpipe.formats.beir import beir_files, beir_qrels, read_queries

    files = beir_files(spec.folder, spec.split)
    qrels = beir_qrels(files.qrels)
    texts = read_queries(files.queries)
    queries = {qid: texts[qid] for qid in qrels if qid in texts}
    if not queries:
        raise DataError("no judged query found", source=files.queries)
    query_prompt, doc_prompt = prompts

    class BeirEvaluator(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = spec.metric
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch=-1, steps=-1) -> dict:
            training_window = model.max_seq_length
            model.max_seq_length = window or training_window
            try:
                run = search_corpus(model, files.corpus, queries, max(metrics.MTEB_KS),
                                    (query_prompt, doc_prompt), spec.batch_size)
            finally:
                model.max_seq_length = training_window
            means = metrics.evaluate(qrels, run, metrics.MTEB_KS).means
            if spec.metric not in means:
                raise ParameterError(f"the evaluation has no metric {spec.metric}", "metric")
            return self.prefix_name_to_metrics(means, EVALUATOR_NAME)

    return BeirEvaluator()


def search_corpus(model, corpus_path: str, queries: dict, depth: int, prompts: tuple,
                  batch_size: int) -> dict:
    """The run {query id: {doc id: score}} of an exact cosine search of the corpus."""
    from vecpipe.core.vectors import ExactSearch
    from vecpipe.formats.beir import corpus_batches

    query_prompt, doc_prompt = prompts
    encode = lambda texts, prompt: model.encode(  # noqa: E731
        texts, batch_size=batch_size, prompt=prompt or None, normalize_embeddings=True,
        convert_to_numpy=True, show_progress_bar=False).astype("float32")
    search = ExactSearch(encode(list(queries.values()), query_prompt), depth, "ip",
                         _QUERY_BLOCK)
    ids, offset = [], 0
    for block_ids, texts in corpus_batches(corpus_path, _CORPUS_BLOCK):
        if texts:
            search.add(encode(texts, doc_prompt), offset)
            ids.extend(block_ids.to_pylist())
            offset += len(texts)
    hits = search.hits()
    return {qid: {ids[row]: float(score) for row, score in zip(rows, scores) if row >= 0}
            for qid, rows, scores in zip(queries, hits.rows, hits.scores)}


# ---- the job -------------------------------------------------------------------------------------

@dataclass
class ModelRef:
    """A model as the recipe records it: the path loaded, its recorded name, its content hash."""

    path: str
    name: str
    sha256: str | None


@dataclass
class TrainingJob:
    data: TrainingData
    base: ModelRef
    output: str
    loss: LossSpec = field(default_factory=LossSpec)
    hyper: Hyperparameters = field(default_factory=Hyperparameters)
    evaluation: EvalSpec | None = None
    guide: ModelRef | None = None
    device: str = "auto"
    resume: bool = False
    trust_remote_code: bool = False

    def identity(self) -> dict:
        """What makes two runs the same job (a resumed run must be the interrupted one)."""
        return {"data": self.data.sha256, "base_model": self.base.sha256 or self.base.name,
                "loss": self.loss.describe(), "hyperparameters": asdict(self.hyper),
                "guide": None if self.guide is None else (self.guide.sha256 or self.guide.name),
                "evaluation": None if self.evaluation is None else asdict(self.evaluation)}


class InterruptedRun(DataError):
    """The work folder holds another run's checkpoints (resume it, or remove it)."""


def work_folder(output: str) -> str:
    return os.path.realpath(os.path.abspath(output)) + WORK_SUFFIX


def last_checkpoint(work: str) -> str | None:
    """The newest complete checkpoint-N of `work` (its trainer state is written last)."""
    found = []
    for name in os.listdir(work) if os.path.isdir(work) else ():
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(work, name, "trainer_state.json")):
            found.append((int(match.group(1)), os.path.join(work, name)))
    return max(found)[1] if found else None


def prepare_work(job: TrainingJob) -> str | None:
    """The work folder made ready: a new run gets an empty one, a resumed run keeps its own
    (the same job only). Returns the checkpoint to resume from (None: start at step 0)."""
    work = work_folder(job.output)
    recorded = os.path.join(work, JOB_FILE)
    if not main_process():  # under torchrun the first process checks and records the job
        return last_checkpoint(work) if job.resume else None
    if os.path.isdir(work) and not job.resume:
        if os.listdir(work):
            raise InterruptedRun("an interrupted training run left its checkpoints here",
                                 source=work)
    if job.resume and os.path.isfile(recorded):
        with open(recorded, encoding="utf-8") as f:
            before = json.load(f)
        differing = [key for key, value in job.identity().items() if before.get(key) != value]
        if differing:
            raise InterruptedRun(f"the interrupted run here differs in {', '.join(differing)}",
                                 source=work)
    os.makedirs(work, exist_ok=True)
    with open(recorded, "w", encoding="utf-8") as f:
        json.dump(job.identity(), f, indent=2)
    return last_checkpoint(work) if job.resume else None


def main_process() -> bool:
    """Whether this is the first (or only) process of a several-GPU launch (torchrun and
    accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def precision_flags(precision: str, on_gpu: bool, bf16_ok: bool) -> dict:
    """The trainer's bf16/fp16 switches: auto is bf16 (fp16 where the GPU lacks it) on a GPU,
    float32 on a CPU."""
    if precision == "auto":
        precision = ("bfloat16" if bf16_ok else "float16") if on_gpu else "float32"
    if precision == "float16" and not on_gpu:
        raise ParameterError("float16 mixed precision needs a GPU", "precision")
    return {"bf16": precision == "bfloat16", "fp16": precision == "float16",
            "precision": precision}


def training_arguments(job: TrainingJob, work: str, on_gpu: bool, bf16_ok: bool):
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainingArguments

    h = job.hyper
    flags = precision_flags(h.precision, on_gpu, bf16_ok)
    settings = dict(
        output_dir=work, num_train_epochs=h.epochs, max_steps=h.max_steps or -1,
        per_device_train_batch_size=h.batch_size, learning_rate=h.learning_rate,
        # a float below 1 is a ratio of the steps (transformers 5 retired warmup_ratio)
        warmup_steps=float(h.warmup_ratio), weight_decay=h.weight_decay, seed=h.seed,
        data_seed=h.seed, bf16=flags["bf16"], fp16=flags["fp16"],
        use_cpu=job.device == "cpu", save_strategy="steps", save_steps=h.save_steps,
        save_total_limit=h.save_total_limit, report_to="none",
        logging_steps=h.logging_steps or logging_interval(h, len(job.data.examples)),
        disable_tqdm=True, dataloader_drop_last=False,
        dataloader_pin_memory=on_gpu,  # pinned memory feeds a GPU; on CPU torch warns of it
        batch_sampler=BatchSamplers.NO_DUPLICATES if job.loss.name in IN_BATCH_LOSSES
        else BatchSamplers.BATCH_SAMPLER,
        prompts=_column_prompts(job) or None)
    if job.evaluation is not None:
        steps = job.evaluation.steps
        settings.update(eval_strategy="steps", eval_steps=steps, save_steps=steps,
                        load_best_model_at_end=True,
                        metric_for_best_model=f"eval_{EVALUATOR_NAME}_{job.evaluation.metric}",
                        greater_is_better=True,
                        # the base model's score opens the curve (a resumed run has it)
                        eval_on_start=not job.resume or last_checkpoint(work) is None)
    return SentenceTransformerTrainingArguments(**settings), flags["precision"]


def logging_interval(h: Hyperparameters, examples: int) -> int:
    """Steps between loss notes: about 20 over the run, at most 50 apart."""
    import math

    steps = h.max_steps or math.ceil(math.ceil(examples / h.batch_size) * h.epochs)
    return max(1, min(50, steps // 20))


def _column_prompts(job: TrainingJob) -> dict:
    """Prompts by dataset column: the query prompt for anchors, the document prompt for the
    rest (the trainer prepends them)."""
    h = job.hyper
    width = job.data.fewest_negatives if job.loss.name not in GUIDED_LOSSES else \
        min(job.data.fewest_negatives, 1)
    prompts = {}
    if h.query_prompt:
        prompts["anchor"] = h.query_prompt
    if h.doc_prompt:
        prompts.update({name: h.doc_prompt for name in
                        ["positive", *[f"negative_{i + 1}" for i in range(width)]]})
    return prompts


class _Progress:
    """What the trainer's callbacks learn: the first step this process ran (a resumed run
    starts after its checkpoint's) and the seconds it trained."""

    def __init__(self):
        self.first_step = None
        self.started = time.perf_counter()


def _progress_callback(progress: _Progress):
    """Notes on stderr instead of the trainer's prints on stdout (which carries data only)."""
    from transformers import TrainerCallback

    from vecpipe.core import notices

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress.first_step is None:
                progress.first_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {key: value for key, value in (logs or {}).items()
                     if key in ("loss", "learning_rate") or key.endswith(tuple(CURVE_METRICS))}
            if shown:
                notices.info(f"step {state.global_step}/{state.max_steps}: " + ", ".join(
                    f"{key.replace(f'eval_{EVALUATOR_NAME}_', '')} {value:.4g}"
                    for key, value in shown.items()))

    return Watch()


def load_model(ref: ModelRef, device: str, trust_remote_code: bool = False):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # stderr carries vecpipe's notes (quiet silences them): no library bars or chatter
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()

    return SentenceTransformer(ref.path, device=None if device == "auto" else device,
                               trust_remote_code=trust_remote_code)


def _require_trainer_packages() -> None:
    """sentence-transformers' trainer needs datasets and accelerate, which it does not
    install itself."""
    import importlib.util

    missing = [name for name in ("datasets", "accelerate")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"training needs {' and '.join(missing)}, not installed here",
                         hint="pip install 'vecpipe[train]'")


def train(job: TrainingJob) -> dict:
    """Train, save the model with its recipe into the work folder, rename it into place and
    remove the work folder. Returns the recipe."""
    _require_trainer_packages()
    import torch
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer
    from transformers.trainer_callback import PrinterCallback

    from vecpipe.core.index_format import swap_into_place

    job.hyper.check()
    check_data_for_loss(job.data, job.loss.name)
    checkpoint = prepare_work(job)
    work = work_folder(job.output)
    model = load_model(job.base, job.device, job.trust_remote_code)
    job.loss.check(model.get_embedding_dimension())
    # a shorter window makes training cheaper; the saved model keeps its own
    window = model.max_seq_length
    if job.hyper.max_length is not None:
        model.max_seq_length = job.hyper.max_length
    guide = load_model(job.guide, job.device, job.trust_remote_code) \
        if job.guide is not None else None
    on_gpu = job.device != "cpu" and torch.cuda.is_available()
    args, precision = training_arguments(job, work, on_gpu,
                                         on_gpu and torch.cuda.is_bf16_supported())
    evaluator = None if job.evaluation is None else beir_evaluator(
        job.evaluation, (job.hyper.query_prompt, job.hyper.doc_prompt), window)
    progress = _Progress()
    # our own widget examples: the model card's sampler draws on the global random state and
    # shows a progress bar of its own
    model.model_card_data.widget = widget_examples(job.data.examples)
    trainer = SentenceTransformerTrainer(
        model=model, args=args,
        train_dataset=Dataset.from_dict(loss_columns(job.data.examples, job.loss.name)),
        loss=build_loss(job.loss, model, guide), evaluator=evaluator,
        callbacks=[_progress_callback(progress)])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=checkpoint)
    if not trainer.is_world_process_zero():
        return {}
    recipe = make_recipe(job, trainer.state, checkpoint, progress, precision)
    final = os.path.join(work, FINAL_FOLDER)
    shutil.rmtree(final, ignore_errors=True)
    model.max_seq_length = window
    model.save(final)
    write_recipe(final, recipe)
    swap_into_place(final, os.path.realpath(os.path.abspath(job.output)))
    shutil.rmtree(work, ignore_errors=True)
    return recipe


def widget_examples(examples: list, count: int = 5) -> list:
    """The model card's examples: the first queries, each with its positive and negatives
    (and other queries' positives, to show four texts)."""
    positives = [e.positive for e in examples]
    widget = []
    for i, example in enumerate(examples[:count]):
        others = positives[i + 1:] + positives[:i]
        sentences = ([example.positive, *example.negatives] + others)[:3]
        widget.append({"source_sentence": example.anchor, "sentences": sentences})
    return widget


def make_recipe(job: TrainingJob, state, checkpoint, progress: _Progress,
                precision: str) -> dict:
    from vecpipe.formats import __version__

    recipe = {"vecpipe_version": __version__,
              "base_model": _model_record(job.base),
              "data": job.data.fingerprint(),
              "loss": job.loss.describe(),
              "hyperparameters": asdict(job.hyper),
              "precision": precision,
              "steps": state.global_step, "epochs": round(float(state.epoch or 0), 4),
              "resumed_from_step": _checkpoint_step(checkpoint),
              "first_step_this_run": progress.first_step,
              "train_seconds_this_run": round(time.perf_counter() - progress.started, 2),
              "loss_curve": [{"step": e["step"], "loss": e["loss"]}
                             for e in state.log_history if "loss" in e]}
    if job.guide is not None:
        recipe["guide"] = _model_record(job.guide)
    if job.evaluation is not None:
        recipe["evaluation"] = asdict(job.evaluation)
        recipe["eval_curve"] = eval_curve(state.log_history, job.evaluation.metric)
        recipe["best"] = {"checkpoint_step": _checkpoint_step(state.best_model_checkpoint),
                          job.evaluation.metric: state.best_metric}
    return recipe


def _model_record(ref: ModelRef) -> dict:
    """A model by its recorded name and content hash (not this machine's path to it)."""
    return {"name": ref.name, "sha256": ref.sha256}


def eval_curve(log_history: list, metric: str) -> list:
    """[{step, epoch, metric: value...}] of every evaluation the trainer logged."""
    prefix = f"eval_{EVALUATOR_NAME}_"
    shown = dict.fromkeys([metric, *CURVE_METRICS])
    return [{"step": entry["step"], "epoch": round(float(entry.get("epoch", 0)), 4),
             **{name: entry[prefix + name] for name in shown if prefix + name in entry}}
            for entry in log_history if prefix + metric in entry]


def _checkpoint_step(path: str | None) -> int | None:
    match = re.search(r"checkpoint-(\d+)$", path or "")
    return int(match.group(1)) if match else None


def write_recipe(folder: str, recipe: dict) -> None:
    with open(os.path.join(folder, RECIPE_FILE), "w", encoding="utf-8") as f:
        json.dump(recipe, f, indent=2)
        f.write("\n")


def read_recipe(folder: str) -> dict | None:
    path = os.path.join(folder, RECIPE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{RECIPE_FILE} is not readable ({err})", source=folder) from None
