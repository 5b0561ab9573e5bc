"""Chunks back to documents on NFCorpus: whole documents (title + text, truncated at the
bundled MiniLM's 256 tokens) against 128-token chunks (32 overlapping) searched with
--group-by parent_id, and a deep chunk run scored with eval retrieval --aggregate.

Everything goes through the vecpipe CLI; embeddings, indexes and runs are cached in --work
(delete a file to redo that step). Exact search throughout (flat indexes), test split.

    .venv/bin/python bench/chunks_nfcorpus.py [--data ../shared/data/nfcorpus]
        [--work /tmp/vp/group-work]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")
TEXT = ["--text-field", "title", "--text-field", "text"]


def vecpipe(*args: str) -> str:
    print("+ vecpipe " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([VECPIPE, *args], stdout=subprocess.PIPE, check=True, text=True)
    return done.stdout


def cached(path: str, *args: str) -> None:
    """Run `vecpipe args -o path.tmp` unless `path` exists, then move it in place."""
    if os.path.exists(path):
        return
    started = time.perf_counter()
    temporary = path + ".part" + os.path.splitext(path)[1]
    vecpipe(*args, "-o", temporary)
    os.replace(temporary, path)
    print(f"  {os.path.basename(path)}: {time.perf_counter() - started:.1f} s", file=sys.stderr)


def test_queries(data: str, out: str) -> None:
    if os.path.exists(out):
        return
    with open(os.path.join(data, "qrels", "test.tsv")) as f:
        judged = {line.split("\t")[0] for line in f if not line.startswith("query-id")}
    with open(os.path.join(data, "queries.jsonl")) as f, open(out, "w") as sink:
        sink.writelines(line for line in f if json.loads(line)["_id"] in judged)


def scores(run: str, qrels: str, *extra: str) -> dict:
    record = json.loads(vecpipe("eval", "retrieval", run, "--qrels", qrels, "--cutoffs",
                                "10,100", "--metrics", "ndcg,recall", "--output-format",
                                "json", *extra))[0]
    return {"ndcg@10": record["ndcg_at_10"], "recall@100": record["recall_at_100"]}


def chunk_counts(path: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    with pa.memory_map(path) as source:
        parents = pa.ipc.open_file(source).read_all().column("parent_id")
    counts = pc.value_counts(parents).field("counts").to_numpy()
    print(f"{len(parents):,} chunks of {len(counts):,} documents; {(counts > 1).mean():.1%} "
          f"of documents have more than one chunk, {counts.mean():.2f} chunks on average, "
          f"at most {counts.max()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data",
                                                       "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vp/group-work")
    args = parser.parse_args()
    print(machine_line())
    os.makedirs(args.work, exist_ok=True)

    def work(name: str) -> str:
        return os.path.join(args.work, name)

    corpus, qrels = os.path.join(args.data, "corpus.jsonl"), os.path.join(args.data, "qrels",
                                                                          "test.tsv")
    test_queries(args.data, work("queries-test.jsonl"))
    cached(work("queries.arrow"), "embed", work("queries-test.jsonl"), "--device", "cpu")
    cached(work("chunks.arrow"), "embed", corpus, *TEXT, "--chunk-tokens", "128",
           "--chunk-overlap", "32", "--device", "cpu")
    cached(work("docs.arrow"), "embed", corpus, *TEXT, "--device", "cpu")
    for name, fields in (("docs", []), ("chunks", ["--fields", "parent_id"])):
        if not os.path.exists(work(f"idx-{name}")):
            vecpipe("index", work(f"{name}.arrow"), "--flat", *fields, "-q", "-o",
                    work(f"idx-{name}"))
    chunk_counts(work("chunks.arrow"))
    queries = work("queries.arrow")
    rows = []
    cached(work("docs.trec"), "search", work("idx-docs"), queries, "-k", "100",
           "--output-format", "trec")
    rows.append(("whole documents (256-token window)", scores(work("docs.trec"), qrels)))
    for size, how in ((1, "max"), (3, "sum"), (3, "mean")):
        run = work(f"grouped-{size}-{how}.trec")
        cached(run, "search", work("idx-chunks"), queries, "-k", "100", "--group-by",
               "parent_id", "--group-size", str(size), "--group-score", how,
               "--output-format", "trec")
        rows.append((f"chunks, --group-by parent_id --group-size {size} --group-score {how}",
                     scores(run, qrels)))
    cached(work("chunks-1000.jsonl"), "search", work("idx-chunks"), queries, "-k", "1000",
           "--fields", "parent_id", "--output-format", "jsonl")
    for how in ("max", "sum", "mean"):
        rows.append((f"chunks -k 1000, eval --aggregate parent_id={how}",
                     scores(work("chunks-1000.jsonl"), qrels, "--aggregate",
                            f"parent_id={how}")))
    print("| run | nDCG@10 | Recall@100 |\n|---|---:|---:|")
    for name, values in rows:
        print(f"| {name} | {values['ndcg@10']:.4f} | {values['recall@100']:.4f} |")


if __name__ == "__main__":
    main()
