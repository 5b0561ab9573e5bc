"""How many candidates each mine-negatives filter removes on NFCorpus, and what merge
--dedupe-near finds between NFCorpus train and test (run by hand).

    python bench/negative_filters.py NFCORPUS_DIR DOCS.arrow QUERIES.arrow WORK_DIR

DOCS.arrow / QUERIES.arrow: the corpus (title + text) and all queries embedded with the bundled
MiniLM (`vecpipe embed`). Prints Markdown tables.
"""
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

MINE = [("none", []),
        ("--relative-margin 0.05 (per query)", ["--relative-margin", "0.05"]),
        ("--relative-margin 0.05 --margin-per positive",
         ["--relative-margin", "0.05", "--margin-per", "positive"]),
        ("--absolute-margin 0.05 --margin-per positive",
         ["--absolute-margin", "0.05", "--margin-per", "positive"]),
        ("--max-positive-similarity 0.9", ["--max-positive-similarity", "0.9"]),
        ("--max-positive-similarity 0.8", ["--max-positive-similarity", "0.8"])]
RULES = ("known_positive", "judged_relevant", "duplicate_text", "relative_margin",
         "absolute_margin", "max_positive_similarity")


def vecpipe(*args):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vecpipe.cli", *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return done.stderr, time.perf_counter() - start


def mine(nfcorpus, docs, work, split, name, extra):
    stats = work / f"{abs(hash(name))}.json"
    _, seconds = vecpipe("mine-negatives", "--beir", nfcorpus, "--split", split, "--corpus",
                         docs, "--text-field", "title", "--text-field", "text", "-n", "5",
                         "--range-max", "50", "--shape", "labeled-list", "--on-short", "keep",
                         "-o", work / "rows.jsonl", "--save-stats", stats, *extra)
    facts = json.loads(stats.read_text())
    removed = " | ".join(f"{facts['removed'].get(rule, 0):,}" for rule in RULES)
    print(f"| {split} | {name} | {removed} | {facts['queries_short']:,} | "
          f"{facts['queries_without_negatives']:,} | {facts['negatives']:,} | "
          f"{_fmt(facts['mean_negative_score'])} | {seconds:.0f} |")


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def judged(nfcorpus, split):
    with open(nfcorpus / "qrels" / f"{split}.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return {r[0] for r in rows}, {r[1] for r in rows}


def subset(source, ids, path):
    table = pa.ipc.open_file(source).read_all()
    keep = pa.array([i in ids for i in table.column("id").to_pylist()])
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table.filter(keep))
    return path, int(keep.true_count)


def near(work, name, inputs, threshold, against=None):
    extra = ["--against", against] if against else []
    stderr, seconds = vecpipe("merge", *inputs, "--dedupe-near", threshold, *extra, "-o",
                              work / "near.arrow")
    print(f"| {name} | {threshold} | {stderr.strip().split(' -> ')[-1]} | {seconds:.1f} |")


def main(nfcorpus, docs, queries, work):
    nfcorpus, work = Path(nfcorpus), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print("| split | filter | " + " | ".join(RULES) + " | short | none left | negatives | "
          "mean neg score | s |")
    print("|" + "---|" * (len(RULES) + 7))
    for name, extra in MINE:
        mine(nfcorpus, docs, work, "train", name, extra)
    for level in ("1", "2"):  # train qrels are all grade 1: levels only matter on test
        mine(nfcorpus, docs, work, "test", f"--min-relevance {level}",
             ["--min-relevance", level])
    train_q, train_d = judged(nfcorpus, "train")
    test_q, test_d = judged(nfcorpus, "test")
    train_queries, n_train = subset(queries, train_q, work / "train-queries.arrow")
    test_queries, n_test = subset(queries, test_q, work / "test-queries.arrow")
    train_docs, n_train_d = subset(docs, train_d - test_d, work / "train-only-docs.arrow")
    test_docs, n_test_d = subset(docs, test_d, work / "test-docs.arrow")
    print(f"\nqueries: train {n_train}, test {n_test}; docs judged only in train {n_train_d}, "
          f"judged in test {n_test_d}\n")
    print("| inputs | threshold | result | s |\n|---|---|---|---|")
    for threshold in ("0.95", "0.9"):
        near(work, "train queries --against test queries", [train_queries], threshold,
             test_queries)
        near(work, "train-only docs --against test docs", [train_docs], threshold, test_docs)
        near(work, "whole corpus", [docs], threshold)


if __name__ == "__main__":
    main(*sys.argv[1:])
