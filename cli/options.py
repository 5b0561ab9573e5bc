"""The option vocabulary: every option that two commands share, defined once (one name, one
meaning, one parser, one help), and the deprecated spellings that stand for them.

Use as parameter annotations: `def run(inputs: options.Inputs = None, output: options.Output =
None, ...)`. Parameter names matter: the error boundary reads `quiet`. A deprecated spelling is
a hidden parameter of its own (`options.alias(...)`); `with_aliases` (applied by cli.app to every
command) warns when one is used and hands its value to the parameter it stands for.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from dataclasses import dataclass
from typing import Annotated, Callable, List, Optional

import typer

# (option names, help) of every option declared here; tests/test_vocabulary.py checks against it
SHARED: set[tuple[tuple[str, ...], str]] = set()
_DEPRECATED_VALUES = "vecpipe.deprecated"


def shared(*names: str, help: str, **settings) -> typer.models.OptionInfo:
    """A typer.Option that belongs to the vocabulary (registered in SHARED)."""
    SHARED.add((names, help))
    return typer.Option(*names, help=help, **settings)


@dataclass(frozen=True)
class Deprecated:
    """Marks a hidden parameter as the old spelling `old` of `new` (the parameter `target`).
    `convert` turns the old value into {parameter: value}; None means {target: value}."""
    old: str
    new: str
    target: str | None
    convert: Callable | None = None

    def values(self, value) -> dict:
        if self.convert is not None:
            return self.convert(value)
        return {} if self.target is None else {self.target: value}


def alias(kind, old: str, new: str, target: str | None, convert: Callable | None = None,
          **settings):
    """The annotation of a hidden parameter spelled `old`, deprecated for `new`."""
    return Annotated[kind, typer.Option(old, hidden=True, show_default=False, **settings),
                     Deprecated(old, new, target, convert)]


def deprecation(command: str, old: str, new: str) -> str:
    return f"{command}: warning: {old} is deprecated; use {new}"


def aliases_of(func) -> dict[str, Deprecated]:
    """The deprecated spellings among `func`'s parameters, by parameter name."""
    hints = typing.get_type_hints(inspect.unwrap(func), include_extras=True)
    found = {}
    for name, hint in hints.items():
        marks = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Deprecated)]
        if marks:
            found[name] = marks[0]
    return found


def _is_given(value) -> bool:
    return value not in (None, False) and value != [] and value != ()


def with_aliases(func):
    """Wrap a command: each deprecated spelling used warns once on stderr (unless -q) and its
    value goes to the parameter it stands for; giving both spellings is a usage error."""
    aliases = aliases_of(func)
    defaults = {name: p.default for name, p in inspect.signature(func).parameters.items()}

    @functools.wraps(func)
    def run(*args, **kwargs):
        from typer._click.exceptions import UsageError
        from typer._click.globals import get_current_context

        from vecpipe.formats.errors import VecpipeError

        ctx = get_current_context(silent=True)
        command = ctx.command_path if ctx is not None else "vecpipe"
        notes = list(ctx.meta.get(_DEPRECATED_VALUES, [])) if ctx is not None else []
        for name, mark in aliases.items():
            value = kwargs.get(name)
            if not _is_given(value):
                continue
            kwargs[name] = defaults[name]
            notes.append((mark.old, mark.new))
            try:
                converted = mark.values(value)
            except VecpipeError as err:  # outside the boundary: a usage error, one line
                raise UsageError(str(err), ctx) from None
            for target, new_value in converted.items():
                if kwargs.get(target) != defaults[target]:
                    raise UsageError(f"give {mark.new} or {mark.old}, not both", ctx)
                kwargs[target] = new_value
        if not kwargs.get("quiet"):
            for old, new in notes:
                print(deprecation(command, old, new), file=sys.stderr, flush=True)
        return func(*args, **kwargs)

    return run


def _note_deprecated_value(ctx, old: str, new: str) -> None:
    ctx.meta.setdefault(_DEPRECATED_VALUES, []).append((old, new))


def field_list(values):
    """`A,B` and/or repeated: the field names in order (None when not given)."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        raise typer.BadParameter("needs at least one field name")
    return names


def comma_list(value: str | None):
    return None if value is None else field_list([value])


STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary",
                  "pq")
SHORT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i8": "int8",
                "b1": "binary"}
INDEX_DTYPES = {long: short for short, long in SHORT_DTYPES.items()}


def storage_dtype(value: str | None):
    """One storage vocabulary: float32|float16|bfloat16|int8|uint8|binary|ubinary, with
    f32/f16/bf16/i8/b1 as aliases; the long name comes back."""
    if value is None:
        return None
    name = SHORT_DTYPES.get(value.lower(), value.lower())
    if name not in STORAGE_DTYPES:
        raise typer.BadParameter(f"{value!r}: choose from {', '.join(STORAGE_DTYPES)} (or "
                                 f"{', '.join(SHORT_DTYPES)})")
    return name


def index_dtype(value: str | None, option: str = "--dtype"):
    """The index engine's name (f32...b1) for a storage dtype; uint8/ubinary have none."""
    from vecpipe.formats.errors import UsageError

    if value is None:
        return None
    if value not in INDEX_DTYPES:
        raise UsageError(f"an index stores {'|'.join(INDEX_DTYPES)}, not {value} ({option})")
    return INDEX_DTYPES[value]


def chunking(tokens, overlap, context_tokens, template, late):
    """The core Chunking the chunk options ask for (None without --chunk-tokens), checked
    together (embed, eval beir)."""
    from vecpipe.core.chunking import DEFAULT_TEMPLATE, Chunking
    from vecpipe.formats.errors import ParameterError, UsageError

    if tokens is None:
        for flag, value in (("--chunk-overlap", overlap), ("--context-tokens", context_tokens),
                            ("--context-template", template), ("--late-chunking", late)):
            if value:
                raise UsageError(f"{flag} needs --chunk-tokens")
        return None
    if template is not None and context_tokens is None:
        raise UsageError("--context-template needs --context-tokens")
    try:
        return Chunking(tokens, overlap, context_tokens, template or DEFAULT_TEMPLATE, late)
    except ParameterError as err:
        raise as_option_error(err) from None


def as_option_error(err):
    """A core ParameterError (its message starts with its parameter's name) worded with the
    option that set the parameter: `chunk_tokens 9 ...` -> `--chunk-tokens 9 ...`."""
    from vecpipe.formats.errors import UsageError

    option = "--" + err.parameter.replace("_", "-")
    return UsageError(option + err.message.removeprefix(err.parameter), hint=err.hint)


def unescaped(template: str | None) -> str | None:
    r"""A template as typed in a shell: \n and \t stand for a newline and a tab."""
    if template is None:
        return None
    return template.replace("\\n", "\n").replace("\\t", "\t")


ON_DUPLICATE = ("error", "first", "last", "keep")
_OLD_DUPLICATE_VALUES = {"skip": "first", "replace": "last", "none": "keep"}


def on_duplicate(ctx: typer.Context, value: str | None) -> str | None:
    if value is None:
        return None
    if value in _OLD_DUPLICATE_VALUES:
        new = _OLD_DUPLICATE_VALUES[value]
        _note_deprecated_value(ctx, f"--on-duplicate {value}", f"--on-duplicate {new}")
        return new
    if value not in ON_DUPLICATE:
        raise typer.BadParameter(f"{value!r}: choose from {'|'.join(ON_DUPLICATE)}")
    return value


def index_duplicates(value: str) -> str:
    """The index builder's name (error|skip|replace) for an --on-duplicate value."""
    from vecpipe.formats.errors import UsageError

    if value == "keep":
        raise UsageError("an index holds one row per id; --on-duplicate keep applies to record "
                         "streams (merge)")
    return {"first": "skip", "last": "replace"}.get(value, value)


def old_dedupe(value: str) -> str:
    """`merge --dedupe none|first|last|error` in the --on-duplicate vocabulary."""
    if value not in ("none", "first", "last", "error"):
        raise typer.BadParameter(f"{value!r}: choose from none|first|last|error")
    return "keep" if value == "none" else value


Inputs = Annotated[Optional[List[str]], typer.Argument(
    help="Input files, or - for stdin (the default). Read in order as one stream; format "
         "sniffed from the first bytes (JSONL, Arrow, Parquet; gzip/zstd unwrapped).",
    show_default=False, metavar="INPUT")]
OUTPUT_HELP = ("Write here (atomically) instead of stdout; index: the folder to write (through "
               "a symlink, the link's target is replaced) or to extend with --append.")
Output = Annotated[Optional[str], shared("-o", "--output", help=OUTPUT_HELP, metavar="PATH")]


def folder_output(value: str | None):
    """-o of a command that writes a folder: `-` (stdout) cannot be one."""
    if value == "-":
        raise typer.BadParameter("writes a folder, which stdout (-) cannot hold; name a folder")
    return value


OutputFolder = Annotated[str, shared("-o", "--output", help=OUTPUT_HELP, metavar="DIR",
                                     callback=folder_output)]
OutputFormat = Annotated[str, shared(
    "--output-format",
    help="Records: auto|arrow|arrow-file|jsonl|parquet|csv|tsv (csv/tsv: streams without "
         "vectors; search: also trec and table); reports (eval, info, models): "
         "auto|table|jsonl|json|csv|tsv. auto: from -o's name (.jsonl .csv .tsv .arrow "
         ".arrows .parquet, search .trec; text formats also .gz), else "
         "$VECPIPE_OUTPUT_FORMAT, else on a pipe Arrow IPC for streams that carry vectors and "
         "JSONL for the rest; a terminal gets JSONL or a table.")]
InputFormat = Annotated[str, shared(
    "--input-format", help="auto|jsonl|arrow|arrow-file|parquet|csv|tsv|text (text: one "
                           "record per line, field `text`).")]
Quiet = Annotated[bool, shared("-q", "--quiet", help="Print nothing on stderr but errors.")]
Force = Annotated[bool, shared(
    "--force", help="Mix vectors whose model/dim/codec metadata differ.")]
Model = Annotated[Optional[str], shared(
    "-m", "--model", help="Model: bundled all-MiniLM-L6-v2 by default (search and index: the "
                          "one the vectors record); a local directory, a hub name, or fake:DIM "
                          "(hash vectors for tests).", metavar="MODEL", show_default=False)]
Device = Annotated[str, shared(
    "--device", help="auto|cpu|cuda|cuda:N|mps (auto prefers CUDA); embed also takes several, "
                     "comma-separated (cuda:0,cuda:1): one worker process per device.")]
Backend = Annotated[str, shared(
    "--backend", help="Model runtime: torch, numpy (plain BERT-family folders, no torch: quick "
                      "to start) or auto (numpy when it runs the model exactly, else torch); "
                      "embed also onnx|onnx-int8|openvino (exported once, kept beside the "
                      "weights). Defaults: embed torch, search auto.", show_default=False)]
BatchSize = Annotated[int, shared("--batch-size", min=1, help="Texts per model call.")]
Shard = Annotated[Optional[str], shared(
    "--shard", help="Process only shard I of N (I/N, 0-based), or auto from Slurm/torchrun/"
                    "Kubernetes variables; with -o DIR/ the part is DIR/part-0000I-of-0000N.",
    metavar="I/N")]
TrustRemoteCode = Annotated[bool, shared(
    "--trust-remote-code", help="Allow a hub model to run its own code (off by default).")]
Cache = Annotated[Optional[str], shared(
    "--cache", help="Content-addressed embedding cache folder (shared by embed and eval beir): "
                    "reruns embed only new or changed texts.", metavar="DIR")]

TopK = Annotated[int, shared("-k", "--top-k", min=1, help="Hits per query.")]
Cutoffs = Annotated[Optional[str], shared(
    "--cutoffs", help="Cutoffs k of the metrics, comma-separated (beir keeps the top max(k) "
                      "hits). [default: 1,3,5,10,100,1000; beir: MTEB's 1,3,5,10,20,100,1000]",
    metavar="K,K", show_default=False)]
Metrics = Annotated[Optional[str], shared(
    "--metrics", help="Comma-separated subset of ndcg,map,mrr,recall,precision (at each cutoff) "
                      "and set_precision,set_recall,set_f1 (the whole returned set; `set`: "
                      "all three). [default: the five with cutoffs]",
    metavar="M,M", show_default=False)]
Qrels = Annotated[str, shared(
    "--qrels", help="Judgments: BEIR qrels TSV, TREC qrels or qrels records; for eval "
                    "retrieval also a run (e.g. exact search) whose top --qrels-depth hits count "
                    "as relevant.", metavar="QRELS")]
PerQuery = Annotated[bool, shared(
    "--per-query", help="One record per run and query instead of the summary: JSON lines, or "
                        "json, csv or tsv as --output-format says.")]
FailUnder = Annotated[Optional[List[str]], shared(
    "--fail-under", help="Exit 1 when a metric's mean is below VALUE (e.g. ndcg@10=0.3); "
                         "repeatable. The report is printed first.", metavar="METRIC=VALUE")]
Seed = Annotated[int, shared("--seed", help="Seed of the command's random sampling or test.")]
# eval's labelled-data tasks (sts, pair-classification, bitext-mining, summarization,
# classification, clustering): the fields they read and MTEB's repetition count
Pair = Annotated[str, shared(
    "--pair", help="The two sides: text fields are embedded with -m; vector fields (e.g. "
                   "embedding1,embedding2) are used as they are.", metavar="A,B")]
Score = Annotated[str, shared(
    "--score", help="The field holding the gold score (summarization: a list, one per machine "
                    "summary).", metavar="FIELD")]
Label = Annotated[str, shared(
    "--label", help="The field holding each record's gold label (pair-classification: 0 or 1; "
                    "clustering: a list is a hierarchy, one level per item).", metavar="FIELD")]
Experiments = Annotated[int, shared(
    "--experiments", min=1, help="Repetitions averaged (MTEB's n_experiments; clustering: its "
                                 "n_clusters bootstrap samples).")]
# eval's MTEB result files (--save-mteb): where, and the task's identity in them
SaveMteb = Annotated[Optional[str], shared(
    "--save-mteb", help="Also write MTEB's TaskResult JSON under DIR, in MTEB's results layout "
                        "(DIR/MODEL/REVISION/TASK.json beside model_meta.json): mteb's "
                        "ResultCache and the leaderboard tools load it.", metavar="DIR")]
MtebTask = Annotated[Optional[str], shared(
    "--mteb-task", help="The task name in the MTEB file (e.g. NFCorpus; default: the input's "
                        "file or folder name).", metavar="NAME")]
MtebRevision = Annotated[Optional[str], shared(
    "--mteb-revision", help="The dataset revision in the MTEB file (default: sha256: and the "
                            "first 16 hex digits of the inputs' bytes).", metavar="REV")]
MtebLanguages = Annotated[Optional[str], shared(
    "--mteb-languages", help="The task's languages in the MTEB file, comma-separated ISO "
                             "639-3 codes with script (e.g. eng-Latn; default: und, "
                             "undetermined).",
    metavar="LANGS")]
SAMPLE_HELP = ("A uniform random sample of N records, seeded by --seed (convert: in one pass, "
               "in input order; eval embeddings: the rows of the pairwise statistics and the "
               "comparison).")


def sample_option(**settings) -> typer.models.OptionInfo:
    """--sample N with a command's own bounds (one help for every command)."""
    return shared("--sample", help=SAMPLE_HELP, metavar="N", **settings)


Split = Annotated[str, shared("--split", help="Which BEIR qrels/SPLIT.tsv to use.")]

TextField = Annotated[Optional[List[str]], shared(
    "--text-field", help="Field holding the text to embed (default: text). Repeat to join "
                         "several with a space, in order; empty parts are skipped.",
    metavar="FIELD", show_default=False)]
VectorField = Annotated[str, shared("--vector-field", help="Field holding the vectors.",
                                    metavar="FIELD")]
IdField = Annotated[Optional[str], shared(
    "--id-field", help="Field holding record ids (default: id, else _id, else the record "
                       "number).", metavar="FIELD")]
FIELDS_HELP = ("Fields to keep or show, in order: A,B or repeated (index: stored for output "
               "and --filter; `id` is always kept; info takes no list: it lists the fields).")
Fields = Annotated[Optional[List[str]], shared(
    "--fields", help=FIELDS_HELP, metavar="A,B", callback=field_list, show_default=False)]
# info --fields: the same concept (the fields shown) with nothing to choose: a flag
FieldsFlag = Annotated[bool, shared("--fields", help=FIELDS_HELP)]
AllFields = Annotated[bool, shared("--all-fields", help="Every field but the vectors.")]
DryRun = Annotated[bool, shared(
    "--dry-run", help="Check the inputs' first records, the fields, the model (not loaded) and "
                      "the output, print the plan (a table on a terminal, JSON otherwise) and "
                      "write nothing; exit 1 when the run would fail.")]

PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def precision(value: str | None):
    if value is not None and value not in PRECISIONS:
        raise typer.BadParameter(f"{value!r}: choose from {'|'.join(PRECISIONS)}")
    return value


Precision = Annotated[str, shared(
    "--precision", callback=precision, help="auto|float32|float16|bfloat16 model precision (auto: float16 on CUDA "
                        "(train: mixed bfloat16 where the GPU has it, float32 on a CPU), "
                        "embed: bfloat16 with torch on a CPU with AMX or AVX512-BF16, else "
                        "float32; openvino takes float32 or bfloat16); output vectors "
                        "are float32, and a precision other than float32 is recorded in the "
                        "metadata.")]
StorageDtype = Annotated[Optional[str], shared(
    "--dtype", help="Storage type: float32|float16|bfloat16|int8|binary (or f32|f16|bf16|i8|b1); "
                    "compress also uint8|ubinary|pq. int8/uint8 use per-dimension ranges from "
                    "calibration rows; binary keeps sign bits packed 8 per byte. index: "
                    "default follows the input.", metavar="TYPE", callback=storage_dtype,
    show_default=False)]
CodecFile = Annotated[Optional[str], shared(
    "--codec", help="Apply exactly this saved codec (compress --save-codec) instead of fitting "
                    "one, so queries, more shards and indexes get the same codes.",
    metavar="FILE", show_default=False)]
IndexDtype = Annotated[Optional[str], shared(
    "--index-dtype", help="Search a temporary HNSW index of this storage type instead: "
                          "float32|float16|bfloat16|int8|binary (or f32|f16|bf16|i8|b1).",
    metavar="TYPE", callback=storage_dtype, show_default=False)]
OnDuplicate = Annotated[str, shared(
    "--on-duplicate", help="error|first|last|keep: an id seen before (indexed, or earlier in "
                           "the input) fails, keeps the first copy, keeps the last, or keeps "
                           "every copy (record streams only).", callback=on_duplicate)]

Prompt = Annotated[Optional[str], shared(
    "--prompt", help="Text put before every input text, e.g. 'query: ' (in metadata).",
    metavar="TEXT", show_default=False)]
PromptName = Annotated[Optional[str], shared(
    "--prompt-name", help="One of the model's own prompts, by name, e.g. query.",
    metavar="NAME", show_default=False)]
QueryPrompt = Annotated[Optional[str], shared(
    "--query-prompt", help="Text put before every query (e.g. 'query: '); index records it "
                           "for search.", metavar="TEXT", show_default=False)]
QueryPromptName = Annotated[Optional[str], shared(
    "--query-prompt-name", help="One of the model's own prompts, by name, for queries.",
    metavar="NAME", show_default=False)]
DocPrompt = Annotated[Optional[str], shared(
    "--doc-prompt", help="Text put before every document (e.g. 'passage: ').", metavar="TEXT",
    show_default=False)]
DocPromptName = Annotated[Optional[str], shared(
    "--doc-prompt-name", help="One of the model's own prompts, by name, for documents.",
    metavar="NAME", show_default=False)]

Dim = Annotated[Optional[int], shared(
    "--dim", min=1, metavar="N", help="Keep the first N dimensions and re-normalise (Matryoshka "
                                      "truncation; costly for models not trained for it).")]
Layers = Annotated[Optional[int], shared(
    "--layers", min=1, metavar="L", help="Run only the first L transformer layers and pool "
                                         "their output (2D Matryoshka; in metadata, so queries "
                                         "are embedded alike; torch and numpy backends).")]
POOLING_MODES = ("cls", "mean", "max", "lasttoken", "weightedmean")
Pooling = Annotated[Optional[str], shared(
    "--pooling", metavar="MODE", help="cls|mean|max|lasttoken|weightedmean instead of the "
                                      "model's own pooling (in metadata, so queries are "
                                      "embedded alike).", show_default=False)]
MaxLength = Annotated[Optional[int], shared(
    "--max-length", min=1, help="Token window, at most the model's (longer inputs are "
                                "truncated; embed counts them).", metavar="N")]
ChunkTokens = Annotated[Optional[int], shared(
    "--chunk-tokens", min=1, help="Split texts into windows of N tokens, each embedded on its "
                                  "own (embed: one row per chunk, with parent_id, chunk, "
                                  "char_start, char_end).", metavar="N")]
ChunkOverlap = Annotated[int, shared(
    "--chunk-overlap", min=0, help="Tokens shared by consecutive chunks.", metavar="N")]
ContextTokens = Annotated[Optional[int], shared(
    "--context-tokens", min=1, help="Situated chunks: embed each chunk inside the M tokens of "
                                    "its document around it (the chunk in the middle), through "
                                    "--context-template; the chunk keeps its own text and "
                                    "offsets.", metavar="M")]
ContextTemplate = Annotated[Optional[str], shared(
    "--context-template", help="How a situated chunk is put to the model: {context} and "
                               "{chunk} are replaced (default '{context}\\n\\n{chunk}').",
    metavar="TEXT", show_default=False)]
LateChunking = Annotated[bool, shared(
    "--late-chunking", help="One pass over each whole document (overlapping windows of the "
                            "model's length beyond it), each chunk's vector mean-pooled from "
                            "its own tokens' outputs. Needs a mean-pooling model.")]
Aggregate = Annotated[Optional[str], shared(
    "--aggregate", help="Score chunks against document qrels: a document scores the max, sum "
                        "or mean of its chunks' scores. eval retrieval: FIELD=HOW, a run's "
                        "hits collapsed by FIELD (e.g. parent_id; runs as records, not TREC "
                        "files); eval beir: HOW, over the --chunk-tokens chunks (default "
                        "max).", metavar="[FIELD=]HOW", show_default=False)]
# GISTEmbed's rule, shared by mining (the candidates kept) and training (the in-batch
# candidates a gist loss contrasts): a candidate counts only if it scores below the positive
AbsoluteMargin = Annotated[Optional[float], shared(
    "--absolute-margin", help="Keep a candidate only if score <= positive - A (train: the "
                              "guide's scores of the in-batch candidates, gist losses; "
                              "default 0).", metavar="A")]
RelativeMargin = Annotated[Optional[float], shared(
    "--relative-margin", help="Keep a candidate only if score <= positive - |positive| * R "
                              "(0.05: NV-Retriever's 95%; train: the guide's scores, gist "
                              "losses).", metavar="R")]
Guide = Annotated[Optional[str], shared(
    "--guide", help="GISTEmbed's guide model: mine-negatives drops a candidate it scores at "
                    "least as similar to the query as the (weakest) positive; train's gist "
                    "losses leave out the in-batch candidates it rates above the positive.",
    metavar="MODEL")]
Metric = Annotated[Optional[str], shared(
    "--metric", help="cos|ip|l2sq|hamming. Default: cos for float vectors, hamming for packed "
                     "bits (search: for an embeddings-stream INDEX only).", show_default=False)]
Exact = Annotated[bool, shared("--exact", help="Brute-force search instead of the HNSW graph.")]
Ef = Annotated[Optional[int], shared(
    "--ef", min=1, help="HNSW expansion while searching (default: the index's); deep searches "
                        "need ef well above the number of hits. Indexes of at most 10 MB of "
                        "vectors are scanned exactly unless an ef is given.", metavar="N",
    show_default=False)]
MinScore = Annotated[Optional[float], shared(
    "--min-score", help="Drop hits (candidates) scoring below S.", metavar="S",
    show_default=False)]
Threads = Annotated[int, shared("--threads", min=0, help="usearch threads (0 = all cores).")]
FilterExpr = Annotated[Optional[str], shared(
    "--filter", "--where", help="Keep records (search: hits) whose fields match, e.g. "
                                "'lang == \"en\" and year >= 2020' (==, !=, <, <=, >, >=, "
                                "in [...], not in, is [not] null, and, or, not, parentheses; "
                                "on list fields: contains X, any in [...], all in [...]).",
    metavar="EXPR", show_default=False)]

FUSE_HELP = ("Fuse the ranked lists, as ranx defines it: rrf (sum of 1/(--rrf-k + rank)), "
             "combsum (sum of normalised scores), combmnz (that sum times the lists holding the "
             "document) or wsum (weighted sum, --fuse-weights).")
Fuse = Annotated[Optional[str], shared("--fuse", help=FUSE_HELP, metavar="METHOD",
                                       show_default=False)]
FuseNorm = Annotated[Optional[str], shared(
    "--fuse-norm", help="Per query and list, before combsum/combmnz/wsum: "
                        "none|min-max|z-score|rank|max|sum (ranx's; default min-max).",
    metavar="NORM", show_default=False)]
RrfK = Annotated[Optional[float], shared(
    "--rrf-k", min=0, help="RRF's k: a document at rank r adds 1/(k + r) (default 60).",
    metavar="K", show_default=False)]
FuseWeights = Annotated[Optional[str], shared(
    "--fuse-weights", help="wsum: one weight per list, in order (e.g. 0.3,0.7), or a fit file "
                           "saved by `merge --fuse wsum --fit-qrels Q --save-fit FILE` "
                           "(default: equal weights).", metavar="W,W|FILE",
    show_default=False)]
FUSION_OPTION_OF = {"method": "--fuse", "norm": "--fuse-norm", "rrf_k": "--rrf-k",
                    "weights": "--fuse-weights", "runs": "--fuse", "step": "--fit-step",
                    "qrels": "--fit-qrels"}


def fusion_flagged(err):
    """A core fusion ParameterError worded with the option that set the parameter."""
    from vecpipe.formats.errors import UsageError

    option = FUSION_OPTION_OF.get(err.parameter, "--fuse")
    return UsageError(f"{option}: {err.message}", hint=err.hint)


def fusion(method: str, norm: str | None, rrf_k: float | None, weights: str | None,
           lists: int):
    """The core Fusion the fusion options ask for, checked for `lists` ranked lists; a fit
    file's normalisation is taken unless --fuse-norm says otherwise (then it must agree)."""
    from vecpipe.core.fusion import DEFAULT_RRF_K, Fusion, read_fit
    from vecpipe.formats.errors import ParameterError, UsageError

    parsed = None
    try:
        if weights is not None and os.path.isfile(weights):
            fitted = read_fit(weights)
            if norm is not None and norm != fitted["norm"]:
                raise UsageError(f"--fuse-norm {norm}: the weights in {weights} were fitted "
                                 f"under {fitted['norm']}")
            norm, parsed = fitted["norm"], tuple(fitted["weights"])
        elif weights is not None:
            parsed = _weights(weights)
        return Fusion(method, norm, DEFAULT_RRF_K if rrf_k is None else rrf_k,
                      parsed).checked(lists)
    except ParameterError as err:
        raise fusion_flagged(err) from None


def _weights(text: str) -> tuple[float, ...]:
    from vecpipe.formats.errors import UsageError

    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--fuse-weights {text!r}: give numbers like 0.3,0.7, or a fit file "
                         "that exists") from None
    if any(value < 0 or value != value for value in values) or not any(values):
        raise UsageError(f"--fuse-weights {text!r}: weights are >= 0, not all 0")
    return values


def _as_jsonl(value: bool) -> dict:
    return {"output_format": "jsonl"}


JsonFlag = alias(bool, "--json", "--output-format jsonl", None, _as_jsonl)
FieldForText = alias(Optional[List[str]], "--field", "--text-field", "text_fields")
CutoffsK = alias(Optional[str], "-k", "--cutoffs", "k")
Progress = Annotated[bool, shared(
    "--progress", help="Show progress bars on stderr even when it is not a terminal (-q "
                       "still silences them).")]


def show_progress(progress: bool) -> None:
    """--progress: bars on stderr even when it is not a terminal (-q still wins)."""
    from vecpipe.core import notices

    notices.force_progress(progress)
