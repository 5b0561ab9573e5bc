"""Long documents on NFCorpus (LongEmbed's question): the bundled MiniLM truncating at its 256
tokens (and at 512, its position table's length), against the same model over chunks: plain
chunks, situated chunks (each embedded inside the tokens around it) and late chunking (one
pass per document, each chunk pooled from its own tokens), documents scored by their best
chunk. Each row is one `vecpipe eval beir` run (exact search, test split); the table gives
nDCG@10, recall@100, the chunks and the seconds spent embedding the corpus.

    .venv/bin/python bench/long_documents.py [--data ../shared/data/nfcorpus] [--only NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"
VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")
RUNS = {
    "truncated at 256 tokens": [],
    "truncated at 512 tokens (--max-length 512)": ["--max-length", "512"],
    "chunks of 64": ["--chunk-tokens", "64"],
    "chunks of 128, overlap 32": ["--chunk-tokens", "128", "--chunk-overlap", "32"],
    "situated chunks of 64 in 160 tokens": ["--chunk-tokens", "64", "--context-tokens", "160"],
    "late chunks of 64": ["--chunk-tokens", "64", "--late-chunking"],
    "late chunks of 128, overlap 32": ["--chunk-tokens", "128", "--chunk-overlap", "32",
                                       "--late-chunking"],
}


def evaluate(data: Path, options: list[str]) -> dict:
    command = [VECPIPE, "eval", "beir", str(data), *options, "--output-format", "json"]
    print("+ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--only", action="append", help="run only the rows named so")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print("| run | chunks | embed s | nDCG@10 | recall@100 |")
    print("|---|---:|---:|---:|---:|")
    for name, options in RUNS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        record = evaluate(args.data, options)
        seconds = record["embed_seconds"]
        print(f"| {name} | {record.get('chunks', record['corpus']):,} | {seconds:.0f} | "
              f"{record['ndcg_at_10']:.4f} | {record['recall_at_100']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
