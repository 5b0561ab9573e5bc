"""Fine-tune an embedding model on mined training rows (sentence-transformers' trainer)."""
import contextlib
import os
from typing import Annotated, List, Optional

import typer

from vecpipe.cli import options


def run(data: Annotated[Optional[List[str]], typer.Argument(
            help="Training rows as mine-negatives writes them (triplet, n-tuple, labeled-pair, "
                 "labeled-list, with or without scores) or (query, positive) pairs; any "
                 "format. - for stdin (the default).", show_default=False, metavar="DATA")]
        = None,
        output: options.OutputFolder = ...,
        model: options.Model = None,
        loss: Annotated[str, typer.Option(
            "--loss", help="mnrl (multiple-negatives ranking: in-batch and hard negatives), "
                           "cached-mnrl (the same with gradient caching: large batches in "
                           "--mini-batch-size pieces), gist / cached-gist (GISTEmbed: "
                           "--guide masks false negatives), margin-mse (distils the rows' "
                           "scores, e.g. a cross-encoder's).", metavar="NAME")] = "mnrl",
        guide: options.Guide = None,
        absolute_margin: options.AbsoluteMargin = None,
        relative_margin: options.RelativeMargin = None,
        matryoshka_dims: Annotated[Optional[str], typer.Option(
            "--matryoshka-dims", help="Train the loss at these leading dimensions too "
                                      "(MatryoshkaLoss), e.g. 384,256,128,64.",
            metavar="D,D", show_default=False)] = None,
        adaptive_layers: Annotated[bool, typer.Option(
            "--adaptive-layers", help="Train the loss at earlier layers too "
                                      "(AdaptiveLayerLoss; with --matryoshka-dims: 2D "
                                      "Matryoshka, Matryoshka2dLoss).")] = False,
        mini_batch_size: Annotated[int, typer.Option(
            "--mini-batch-size", min=1, help="cached-mnrl, cached-gist: texts embedded at "
                                             "a time (memory), whatever --batch-size is.")]
        = 32,
        epochs: Annotated[float, typer.Option(
            "--epochs", help="Passes over the data (a fraction is allowed).")] = 1.0,
        max_steps: Annotated[Optional[int], typer.Option(
            "--max-steps", min=1, help="Stop after N optimizer steps instead (overrides "
                                       "--epochs).", metavar="N", show_default=False)] = None,
        batch_size: options.BatchSize = 32,
        learning_rate: Annotated[float, typer.Option(
            "--learning-rate", help="Peak learning rate (AdamW, linear decay).",
            metavar="LR")] = 2e-5,
        warmup_ratio: Annotated[float, typer.Option(
            "--warmup-ratio", help="Fraction of the steps spent warming the learning rate "
                                   "up.", metavar="R")] = 0.1,
        seed: options.Seed = 0,
        max_length: options.MaxLength = None,
        query_prompt: options.QueryPrompt = None,
        doc_prompt: options.DocPrompt = None,
        eval_beir: Annotated[Optional[str], typer.Option(
            "--eval-beir", help="Score this BEIR folder's --split (default dev) every "
                                "--eval-steps with vecpipe's exact search and metrics, and "
                                "keep the checkpoint that scores best on --eval-metric.",
            metavar="DIR", show_default=False)] = None,
        split: options.Split = "dev",
        eval_steps: Annotated[int, typer.Option(
            "--eval-steps", min=1, help="With --eval-beir: steps between evaluations (and "
                                        "checkpoints).", metavar="N")] = 100,
        eval_metric: Annotated[str, typer.Option(
            "--eval-metric", help="With --eval-beir: the metric that picks the best "
                                  "checkpoint.", metavar="METRIC")] = "ndcg@10",
        save_steps: Annotated[int, typer.Option(
            "--save-steps", min=1, help="Steps between checkpoints in DIR.partial/ (what "
                                        "--resume continues from); --eval-steps with "
                                        "--eval-beir.", metavar="N")] = 500,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue an interrupted run from the last checkpoint in "
                             "DIR.partial/ (same data and options; starts afresh when there "
                             "is none).")] = False,
        precision: options.Precision = "auto",
        device: options.Device = "auto",
        input_format: options.InputFormat = "auto",
        trust_remote_code: options.TrustRemoteCode = False,
        quiet: options.Quiet = False):
    """Fine-tune a sentence-transformers model (-m, default the bundled all-MiniLM-L6-v2) on
    training rows and write it to the folder -o DIR. The rows are read whole: each (query,
    positive) pair's negatives are joined in order (triplet rows of one pair make one
    n-tuple); in-batch losses train on the fewest negatives any pair has, and batches never
    repeat a text (sentence-transformers' no-duplicates sampler). Checkpoints go to
    DIR.partial/ beside DIR; the finished model is saved there and renamed to DIR, which
    never holds half a model. DIR carries vecpipe-train.json, the recipe `vecpipe info DIR`
    shows: the data's sha256, the loss, the hyperparameters, the base model's hash, the
    vecpipe version, the loss curve and, with --eval-beir, the evaluation curve and the best
    step. --max-length shortens the token window while training only (the evaluations and
    the saved model use the model's own). Runs on a CPU for small models and data; on GPUs with mixed precision (--precision
    auto), and on several GPUs when launched through torchrun or accelerate (one process per
    GPU).

    \b
    Example:
      vecpipe mine-negatives --beir data --split train --relative-margin 0.05 -o triplets.parquet
      vecpipe train triplets.parquet -o model/ --loss mnrl --epochs 1
      vecpipe train triplets.parquet -o model/ --eval-beir data --eval-steps 50 --resume
      vecpipe train scored.parquet -o model/ --loss margin-mse --matryoshka-dims 384,128
      vecpipe train pairs.jsonl -o model/ --loss gist --guide default --max-steps 200
    """
    from vecpipe.core import training
    from vecpipe.core.index_format import check_target, real_folder

    spec = loss_spec(loss, guide, absolute_margin, relative_margin, matryoshka_dims,
                     adaptive_layers, mini_batch_size)
    hyper = training.Hyperparameters(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
        warmup_ratio=warmup_ratio, seed=seed, max_length=max_length, query_prompt=query_prompt,
        doc_prompt=doc_prompt, precision=precision, save_steps=save_steps)
    evaluation = eval_spec(eval_beir, split, eval_steps, eval_metric, batch_size)
    check_device(device)
    with flagged():
        spec.check()
        hyper.check()
    check_target(output, training.RECIPE_FILE, "a trained model")
    check_output_apart(data or ["-"], output)
    train_data = read_data(data or ["-"], input_format)
    with flagged():
        training.check_data_for_loss(train_data, spec.name)
    job = training.TrainingJob(data=train_data, base=model_ref(model), output=real_folder(output),
                               loss=spec, hyper=hyper, evaluation=evaluation,
                               guide=model_ref(guide) if guide else None, device=device,
                               resume=resume, trust_remote_code=trust_remote_code)
    try:
        with flagged():
            recipe = training.train(job)
    except training.InterruptedRun as err:
        err.hint = "--resume continues it (same data and options); remove it to start over"
        raise
    report(recipe, output)


# core's parameters as this command's options (core names the concept, the command the flag)
OPTION_OF = {"loss": "--loss", "guide": "--guide", "margin_strategy": "--relative-margin",
             "adaptive_layers": "--adaptive-layers", "matryoshka_dims": "--matryoshka-dims",
             "batch_size": "--batch-size", "save_steps": "--save-steps",
             "max_steps": "--max-steps", "epochs": "--epochs", "warmup_ratio": "--warmup-ratio",
             "learning_rate": "--learning-rate", "precision": "--precision",
             "metric": "--eval-metric", "logging_steps": "--max-steps"}


@contextlib.contextmanager
def flagged():
    """core's ParameterErrors as usage errors that name the option."""
    from vecpipe.formats.errors import ParameterError, UsageError

    try:
        yield
    except ParameterError as err:
        raise UsageError(f"{OPTION_OF.get(err.parameter, '--' + err.parameter)}: "
                         f"{err.message}", hint=err.hint) from None


def loss_spec(loss, guide, absolute_margin, relative_margin, matryoshka_dims,
              adaptive_layers, mini_batch_size):
    from vecpipe.core import training
    from vecpipe.formats.errors import UsageError

    guided = loss in training.GUIDED_LOSSES
    if guided and guide is None:
        raise UsageError(f"--loss {loss} needs --guide MODEL (e.g. --guide default)")
    if guide is not None and not guided:
        raise UsageError("--guide applies to --loss gist or cached-gist")
    if not guided and (absolute_margin is not None or relative_margin is not None):
        raise UsageError("--absolute-margin and --relative-margin apply to the gist losses "
                         "(the guide's margin)")
    if absolute_margin is not None and relative_margin is not None:
        raise UsageError("give --absolute-margin or --relative-margin, not both: GISTEmbed "
                         "applies one margin rule")
    strategy = "relative" if relative_margin is not None else "absolute"
    margin = relative_margin if relative_margin is not None else (absolute_margin or 0.0)
    return training.LossSpec(loss, dims_list(matryoshka_dims), adaptive_layers,
                             mini_batch_size, margin_strategy=strategy, margin=margin)


def dims_list(text):
    from vecpipe.formats.errors import UsageError

    if text is None:
        return None
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--matryoshka-dims {text!r}: give sizes like 384,256,128") from None
    return dims


def eval_spec(folder, split, steps, metric, batch_size):
    from vecpipe.core import training
    from vecpipe.core.retrieval_metrics import parse_metric_key
    from vecpipe.formats.beir import beir_files

    key = parse_metric_key(metric)
    if folder is None:
        return None
    beir_files(folder, split)  # the folder and split exist, before any training
    return training.EvalSpec(folder, split, steps, key, batch_size)


def check_device(device: str) -> None:
    from vecpipe.formats.errors import UsageError

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: train takes auto, cpu or cuda (it uses every "
                         "visible GPU; choose them with CUDA_VISIBLE_DEVICES)")


def check_output_apart(paths, output) -> None:
    from vecpipe.formats.errors import UsageError

    target = os.path.realpath(output)
    for path in paths:
        if path != "-" and os.path.realpath(path).startswith(target + os.sep):
            raise UsageError(f"{path} is inside the output folder {output}, which is replaced")


def read_data(paths, input_format):
    """The training rows, fingerprinted by the input's bytes (stdin is first kept in a
    temporary file so that its bytes can be hashed)."""
    import shutil
    import tempfile

    from vecpipe.core.training import read_training_rows
    from vecpipe.formats.readers import STDIN_NAME, RecordStream, check_one_stdin, stdin_binary

    check_one_stdin(paths)
    with tempfile.NamedTemporaryFile(prefix="vecpipe-train-stdin-") as spool:
        if "-" in paths:
            shutil.copyfileobj(stdin_binary(), spool, 1 << 20)
            spool.flush()
        readable = [spool.name if path == "-" else path for path in paths]
        names = [STDIN_NAME if path == "-" else path for path in paths]
        return read_training_rows(RecordStream(readable, input_format), readable, names)


def model_ref(spec):
    from vecpipe.cli.models import model_source
    from vecpipe.core.training import ModelRef

    path, name, sha = model_source(spec)
    return ModelRef(path, name, sha)


def report(recipe: dict, output: str) -> None:
    from vecpipe.cli import console

    if not recipe:  # not the main process of a several-GPU run
        return
    curve = recipe["loss_curve"]
    moved = f", loss {curve[0]['loss']:.4g} -> {curve[-1]['loss']:.4g}" if curve else ""
    resumed = f" (resumed at step {recipe['resumed_from_step']})" \
        if recipe["resumed_from_step"] else ""
    best = ""
    if "best" in recipe:
        metric = recipe["evaluation"]["metric"]
        value = recipe["best"][metric]
        best = f"; best {metric} {value:.4f} at step {recipe['best']['checkpoint_step']}" \
            if value is not None else ""
    console.info(f"trained {recipe['steps']} steps{resumed} on {recipe['data']['examples']} "
                 f"examples ({recipe['loss']['name']}, {recipe['precision']}) in "
                 f"{recipe['train_seconds_this_run']:.1f} s{moved}{best} -> {output}")
