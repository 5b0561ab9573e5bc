"""Options shared by several commands, defined once.

Use as parameter annotations: `def run(inputs: options.Inputs = None, output: options.Output =
None, ...)`. Parameter names matter: the error boundary reads `quiet`.
"""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer

Inputs = Annotated[Optional[List[str]], typer.Argument(
    help="Input files, or - for stdin (the default). Read in order as one stream; format "
         "sniffed from the first bytes (JSONL, Arrow, Parquet; gzip/zstd unwrapped).",
    show_default=False, metavar="INPUT")]
Output = Annotated[Optional[str], typer.Option(
    "-o", "--output", help="Write here (atomically) instead of stdout.", metavar="PATH")]
OutputFormat = Annotated[str, typer.Option(
    "--output-format",
    help="auto|arrow|arrow-file|jsonl|parquet. auto: from -o's extension, else Arrow IPC "
         "stream on a pipe and JSONL on a terminal.")]
InputFormat = Annotated[str, typer.Option(
    "--input-format", help="auto|jsonl|arrow|arrow-file|parquet|csv|tsv|text (text: one "
                           "record per line, field `text`).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]
Force = Annotated[bool, typer.Option(
    "--force", help="Mix vectors whose model/dim/codec metadata differ.")]
Model = Annotated[Optional[str], typer.Option(
    "-m", "--model", help="Model: bundled all-MiniLM-L6-v2 by default; a local directory, a "
                          "hub name, or fake:DIM (hash vectors for tests).", metavar="MODEL")]
Device = Annotated[str, typer.Option(
    "--device", help="auto|cpu|cuda|cuda:N|mps (auto prefers CUDA).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per model call.")]
Shard = Annotated[Optional[str], typer.Option(
    "--shard", help="Process only shard I of N (I/N, 0-based), or auto from Slurm/torchrun/"
                    "Kubernetes variables.", metavar="I/N")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow a hub model to run its own code (off by default).")]
