"""Benchmark the lexical (BM25) index kind, core/lexical.py, against bm25s run directly.

1. NFCorpus (3,633 documents, title + " " + text; the 323 test queries): index throughput and
   query throughput, medians over --runs alternating runs (vecpipe, bm25s, vecpipe, ...) in one
   process. Both sides are library calls on the same Python lists of texts, so the figures
   compare the indexing and searching, not JSONL parsing or start-up (the CLI's own wall time
   is printed apart, for reference; so is nDCG@10 of both, scored by `vecpipe eval`):
   - vecpipe build: `LexicalBuilder.add` in the CLI's batches (8,192 records) + the commit,
     which writes the folder (score matrix, vocabulary, tokens, rows.parquet, sha256 of
     every file, manifest);
   - bm25s build: `bm25s.tokenize` (same stopwords and PyStemmer stemmer) +
     `BM25(k1, b, method).index` + `save` (matrix, vocabulary, parameters);
   - vecpipe query: `LexicalSearcher.search` on the opened (memory-mapped) index, top 10;
   - bm25s query: `bm25s.tokenize` of the queries + `retrieve(k=10)` on the loaded index.
2. `--scale N`: N short lines from bench/package_text.py, indexed by the CLI under
   /usr/bin/time -v (wall time, peak RSS), the folder's size on disk, and single-query latency
   on the memory-mapped index (200 held-out lines, first 8 words each; the first query, which
   loads the vocabulary, reported apart); bm25s direct on the same lines for reference.

    .venv/bin/python bench/lexical.py [--data ../shared/data/nfcorpus] [--runs 7]
    .venv/bin/python bench/lexical.py --skip-nfcorpus --scale 1000000 \
        [--work /tmp/vecpipe-bench-lexical]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
VECPIPE = REPO / ".venv" / "bin" / "vecpipe"
BATCH = 8192  # commands/index.py READ_BATCH_ROWS
K, K1, B, METHOD = 10, 1.5, 0.75, "lucene"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vecpipe-bench-lexical")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--scale", type=int, default=0, help="lines for the scale run (0: none)")
    parser.add_argument("--skip-nfcorpus", action="store_true")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_nfcorpus:
        nfcorpus(Path(args.data), work, args.runs)
    if args.scale:
        scale(args.scale, work)


# ---- NFCorpus: vecpipe vs bm25s -------------------------------------------------------------

def load_nfcorpus(data: Path):
    docs = [json.loads(line) for line in open(data / "corpus.jsonl", encoding="utf-8")]
    judged = {line.split("\t")[0] for line in open(data / "qrels" / "test.tsv")}
    queries = [json.loads(line) for line in open(data / "queries.jsonl", encoding="utf-8")]
    texts = [(d.get("title") or "") + " " + d["text"] for d in docs]
    return [d["_id"] for d in docs], texts, [q["text"] for q in queries if q["_id"] in judged]


def vecpipe_build(folder: Path, ids, texts) -> None:
    import pyarrow as pa

    from vecpipe.core.lexical import LexicalBuilder, LexicalSettings

    settings = LexicalSettings.chosen(["title", "text"], k1=K1, b=B, method=METHOD)
    shutil.rmtree(folder, ignore_errors=True)
    with LexicalBuilder(str(folder), settings, fields=["id"]) as builder:
        for start in range(0, len(ids), BATCH):
            part = ids[start:start + BATCH]
            builder.add(part, texts[start:start + BATCH], pa.table({"id": part}))


def bm25s_build(folder: Path, texts) -> None:
    import bm25s
    import Stemmer

    shutil.rmtree(folder, ignore_errors=True)
    model = bm25s.BM25(k1=K1, b=B, method=METHOD)
    model.index(bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"),
                               show_progress=False), show_progress=False)
    model.save(str(folder))


def vecpipe_query(folder: Path, queries):
    from vecpipe.core.index_open import open_index

    searcher = open_index(str(folder)).searcher(K)
    return lambda: searcher.search(queries)


def bm25s_query(folder: Path, queries):
    import bm25s
    import Stemmer

    model, stemmer = bm25s.BM25.load(str(folder)), Stemmer.Stemmer("english")
    return lambda: model.retrieve(bm25s.tokenize(queries, stopwords="en", stemmer=stemmer,
                                                 show_progress=False),
                                  k=K, show_progress=False)


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: int, pair: dict) -> dict:
    """Median seconds of each side, run A, B, A, B... after one untimed warm-up of each."""
    for fn in pair.values():
        fn()
    times = {name: [] for name in pair}
    for _ in range(runs):
        for name, fn in pair.items():
            times[name].append(timed(fn))
    return {name: (statistics.median(values), values) for name, values in times.items()}


def nfcorpus(data: Path, work: Path, runs: int) -> None:
    ids, texts, queries = load_nfcorpus(data)
    print(f"NFCorpus: {len(texts):,} documents, {len(queries)} test queries, "
          f"{runs} alternating runs", flush=True)
    ours, theirs = work / "nf-vecpipe", work / "nf-bm25s"
    build = alternate(runs, {"vecpipe": lambda: vecpipe_build(ours, ids, texts),
                             "bm25s": lambda: bm25s_build(theirs, texts)})
    report("index", build, len(texts), "docs/s")
    query = alternate(runs, {"vecpipe": vecpipe_query(ours, queries),
                             "bm25s": bm25s_query(theirs, queries)})
    report(f"query (top {K}, all {len(queries)} queries per run)", query, len(queries),
           "queries/s")
    cli_wall(data, work)
    ndcg(data, work, ids, texts)


def report(what: str, medians: dict, count: int, unit: str) -> None:
    ours, theirs = medians["vecpipe"][0], medians["bm25s"][0]
    for name, (median, values) in medians.items():
        print(f"  {what:<44} {name:<8} median {median:.3f} s ({count / median:,.0f} {unit}); "
              f"runs {', '.join(f'{v:.3f}' for v in values)}")
    print(f"  {what:<44} vecpipe/bm25s time ratio {ours / theirs:.3f}", flush=True)


def cli_wall(data: Path, work: Path) -> None:
    """`vecpipe index --lexical` end to end (start-up, imports, JSONL parsing included)."""
    corpus = work / "nfcorpus.jsonl"
    if not corpus.exists():
        with open(corpus, "w", encoding="utf-8") as out:
            for line in open(data / "corpus.jsonl", encoding="utf-8"):
                doc = json.loads(line)
                out.write(json.dumps({"id": doc["_id"], "title": doc.get("title"),
                                      "text": doc["text"]}) + "\n")
    command = [str(VECPIPE), "index", str(corpus), "--lexical", "--text-field", "title",
               "--text-field", "text", "-o", str(work / "nf-cli"), "-q"]
    walls = [timed(lambda: subprocess.run(command, check=True)) for _ in range(3)]
    print(f"  CLI `{' '.join(command[1:])}`: median {statistics.median(walls):.2f} s wall "
          f"(runs {', '.join(f'{w:.2f}' for w in walls)})", flush=True)


def ndcg(data: Path, work: Path, ids, texts) -> None:
    """nDCG@10 on the test queries: vecpipe through the CLI (index, search --output-format
    trec, eval retrieval); bm25s's own top 100 written as TREC (its zero-score padding of a
    short top k left out, as vecpipe never returns rows that match nothing), scored by the
    same eval."""
    import bm25s
    import Stemmer

    judged = {line.split("\t")[0] for line in open(data / "qrels" / "test.tsv")}
    queries = [json.loads(line) for line in open(data / "queries.jsonl", encoding="utf-8")]
    queries = [q for q in queries if q["_id"] in judged]
    asked = work / "queries-test.jsonl"
    asked.write_text("".join(json.dumps({"id": q["_id"], "text": q["text"]}) + "\n"
                             for q in queries))
    vecpipe = [str(VECPIPE)]
    commands = [[*vecpipe, "index", str(work / "nfcorpus.jsonl"), "--lexical", "--text-field",
                 "title", "--text-field", "text", "-o", str(work / "idx-bm25"), "-q"],
                [*vecpipe, "search", str(work / "idx-bm25"), str(asked), "-k", "100",
                 "--output-format", "trec", "-o", str(work / "vecpipe.trec"), "-q"]]
    for command in commands:
        subprocess.run(command, check=True)
    stemmer = Stemmer.Stemmer("english")
    model = bm25s.BM25(k1=K1, b=B, method=METHOD)
    model.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    found, scores = model.retrieve(bm25s.tokenize([q["text"] for q in queries], stopwords="en",
                                                  stemmer=stemmer, show_progress=False),
                                   k=100, show_progress=False)
    with open(work / "bm25s.trec", "w") as run:
        for query, rows, values in zip(queries, found, scores):
            for rank, (row, score) in enumerate(zip(rows, values), start=1):
                if score > 0:
                    run.write(f"{query['_id']} Q0 {ids[row]} {rank} {score:.9g} bm25s\n")
    for command in commands:
        print(f"  `{' '.join(command[1:])}`")
    for name in ("vecpipe", "bm25s"):
        for extra in ([], ["--all-queries"]):
            command = [str(VECPIPE), "eval", "retrieval", str(work / f"{name}.trec"), "--qrels",
                       str(data / "qrels" / "test.tsv"), "--output-format", "jsonl", *extra]
            report = json.loads(subprocess.run(command, check=True, capture_output=True,
                                               text=True).stdout)
            print(f"  nDCG@10 {name:<8} {report['ndcg_at_10']:.4f} over {report['queries']} "
                  f"queries (`{' '.join(command[1:])}`)", flush=True)


# ---- scale: N short lines -------------------------------------------------------------------

HELD_OUT = 200


def scale(count: int, work: Path) -> None:
    lines, queries = scale_corpus(count, work)
    folder = work / f"idx-lines-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    command = ["/usr/bin/time", "-v", str(VECPIPE), "index", str(lines), "--lexical", "-o",
               str(folder), "-q"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"index failed: {done.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", done.stderr).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"scale: {count:,} lines, `{' '.join(command[2:])}`")
    print(f"  build wall {wall}, peak RSS {rss / 1024:,.0f} MiB ({rss / 1024 ** 2:.2f} GiB), "
          f"on disk {size / 1e6:,.1f} MB", flush=True)
    latency(folder, queries)
    scale_bm25s(lines, work / f"bm25s-lines-{count}")
    walls = [timed(lambda: subprocess.run(
        [str(VECPIPE), "search", str(folder), "--query", queries[0], "-k", str(K),
         "--output-format", "jsonl"], check=True, capture_output=True)) for _ in range(3)]
    print(f"  CLI `vecpipe search IDX --query ... -k {K}` (a fresh process): median "
          f"{statistics.median(walls):.2f} s wall", flush=True)


BM25S_BUILD = """
import sys, bm25s, orjson, Stemmer
texts = [orjson.loads(line)["text"] for line in open(sys.argv[1], "rb")]
model = bm25s.BM25(k1={k1}, b={b}, method="{method}")
model.index(bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"),
                           show_progress=False), show_progress=False)
model.save(sys.argv[2])
"""


def scale_bm25s(lines: Path, folder: Path) -> None:
    """bm25s direct on the same lines, for reference: JSONL read with orjson, tokenize,
    index, save, in a fresh process under /usr/bin/time -v."""
    shutil.rmtree(folder, ignore_errors=True)
    script = BM25S_BUILD.format(k1=K1, b=B, method=METHOD)
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script, str(lines),
                           str(folder)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bm25s failed: {done.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", done.stderr).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"  bm25s direct (orjson + tokenize + index + save, a fresh process): build wall "
          f"{wall}, peak RSS {rss / 1024:,.0f} MiB, on disk {size / 1e6:,.1f} MB", flush=True)


def scale_corpus(count: int, work: Path):
    """The first `count` lines of package_text.py's output, and HELD_OUT more as queries."""
    lines = work / f"lines-{count}.jsonl"
    held = work / f"held-out-{count}.jsonl"
    if not (lines.exists() and held.exists()):
        made = subprocess.run([sys.executable, str(REPO / "bench" / "package_text.py")],
                              capture_output=True, check=True).stdout.splitlines()
        if len(made) < count + HELD_OUT:
            sys.exit(f"package_text.py made {len(made):,} lines, fewer than {count + HELD_OUT:,}")
        lines.write_bytes(b"\n".join(made[:count]) + b"\n")
        held.write_bytes(b"\n".join(made[count:count + HELD_OUT]) + b"\n")
    queries = [" ".join(json.loads(line)["text"].split()[:8]) for line in open(held)]
    return lines, queries


def latency(folder: Path, queries) -> None:
    from vecpipe.core.index_open import open_index

    start = time.perf_counter()
    searcher = open_index(str(folder)).searcher(K)
    searcher.search(queries[:1])
    first = time.perf_counter() - start
    seconds = []
    for query in queries:
        start = time.perf_counter()
        searcher.search([query])
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    print(f"  open + first query {first * 1e3:.0f} ms; then {len(queries)} single queries: "
          f"median {statistics.median(seconds) * 1e3:.1f} ms, "
          f"p95 {seconds[int(0.95 * len(seconds))] * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
