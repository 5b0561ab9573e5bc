"""Benchmark `vecpipe compress` on BEIR NFCorpus with the bundled all-MiniLM-L6-v2.

For each codec: bytes per vector and nDCG@10 on the test queries (pytrec_eval ndcg_cut_10),
with the corpus compressed by the real CLI (`vecpipe compress ... -o codes.arrow`) and the codec
read back from the output's metadata. Queries stay float32 and are scored against the codes
through `codec.score` (asymmetric) unless the row says "symmetric" (queries encoded too).
"binary + rescore xM" takes the top 10*M documents by Hamming distance and re-ranks them with the
float32 document vectors, as `search --rescore` does with an index's full.npy.

Embedding NFCorpus (3,633 docs + 323 test queries) takes minutes on a small CPU, so the vectors
are cached in --cache and reused.

    .venv/bin/python bench/compress.py [--data ../shared/data/nfcorpus]
        [--cache /tmp/vecpipe-bench-nfcorpus-minilm.npz] [--throughput-rows 200000]

`--configs pca` compares uncentred and centred PCA (`--pca-center`) instead: nDCG@10 and
recall@10 (against the qrels) and their retention, top-10 overlap with float32 search, and the
query latency of `compress --report` with the test queries as --report-queries (exact search, one
query at a time, codes vs float32). `--docs`/`--queries` take vectors already embedded (Arrow
files with `id` and `embedding`) instead of the cache; queries not in the test qrels are dropped:

    .venv/bin/python bench/compress.py --configs pca --throughput-rows 0 \
        --docs docs.arrow --queries queries.arrow
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from vecpipe.formats import schema as names
from vecpipe.core.codec import codec_from_meta, hamming_distances

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
K = 10

# (label, compress arguments, scoring)
CONFIGS = [
    ("float32", None, "float"),
    ("float16", ["--dtype", "float16"], "asymmetric"),
    ("bfloat16", ["--dtype", "bfloat16"], "asymmetric"),
    ("int8", ["--dtype", "int8"], "asymmetric"),
    ("int8 (symmetric: int8 queries)", ["--dtype", "int8"], "symmetric"),
    ("uint8", ["--dtype", "uint8"], "asymmetric"),
    ("binary (hamming)", ["--dtype", "binary"], "symmetric"),
    ("binary (float queries)", ["--dtype", "binary"], "asymmetric"),
    ("binary + rescore x4", ["--dtype", "binary"], "rescore:4"),
    ("binary + rescore x10", ["--dtype", "binary"], "rescore:10"),
    ("dim 256", ["--dim", "256"], "asymmetric"),
    ("dim 128", ["--dim", "128"], "asymmetric"),
    ("pca 256", ["--pca", "256"], "asymmetric"),
    ("pca 128", ["--pca", "128"], "asymmetric"),
    ("int8 + dim 256", ["--dim", "256", "--dtype", "int8"], "asymmetric"),
    ("int8 + pca 128", ["--pca", "128", "--dtype", "int8"], "asymmetric"),
    ("binary + dim 256 + rescore x10", ["--dim", "256", "--dtype", "binary"], "rescore:10"),
]
PCA_CONFIGS = [
    ("float32", None, "float"),
    ("pca 128", ["--pca", "128"], "asymmetric"),
    ("pca 128 --pca-center", ["--pca", "128", "--pca-center"], "asymmetric"),
    ("pca 64", ["--pca", "64"], "asymmetric"),
    ("pca 64 --pca-center", ["--pca", "64", "--pca-center"], "asymmetric"),
    ("int8 + pca 128", ["--pca", "128", "--dtype", "int8"], "asymmetric"),
    ("int8 + pca 128 --pca-center", ["--pca", "128", "--pca-center", "--dtype", "int8"],
     "asymmetric"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--cache", default="/tmp/vecpipe-bench-nfcorpus-minilm.npz")
    parser.add_argument("--throughput-rows", type=int, default=200_000,
                        help="rows of the synthetic stream timed through compress (0: skip)")
    parser.add_argument("--configs", choices=("all", "pca"), default="all")
    parser.add_argument("--docs", help="embedded corpus (Arrow: id, embedding) instead of --cache")
    parser.add_argument("--queries", help="embedded queries (Arrow: id, embedding), with --docs")
    args = parser.parse_args()
    print(machine_line(), flush=True)

    qrels = read_qrels(Path(args.data) / "qrels" / "test.tsv")
    data = load_arrow(args.docs, args.queries, qrels) if args.docs else \
        load_or_embed(Path(args.data), Path(args.cache))
    with tempfile.TemporaryDirectory(prefix="vecpipe-bench-") as tmp:
        corpus_path = write_vectors(Path(tmp) / "corpus.arrow", data["docs"], data["doc_ids"])
        if args.configs == "pca":
            queries_path = write_vectors(Path(tmp) / "queries.arrow", data["queries"],
                                         data["query_ids"])
            rows = [evaluate(label, cli_args, scoring, corpus_path, data, qrels, Path(tmp),
                             queries_path) for label, cli_args, scoring in PCA_CONFIGS]
            print_pca_table(rows)
        else:
            rows = [evaluate(label, cli_args, scoring, corpus_path, data, qrels, Path(tmp))
                    for label, cli_args, scoring in CONFIGS]
            print_table(rows)
        if args.throughput_rows:
            print_throughput(throughput(Path(tmp), args.throughput_rows))


# ----- data ----------------------------------------------------------------------------------
def load_or_embed(root: Path, cache: Path) -> dict:
    if cache.is_file():
        with np.load(cache) as saved:
            return {key: saved[key] for key in saved.files}
    from vecpipe.cli.models import load_model

    docs = [json.loads(line) for line in open(root / "corpus.jsonl", encoding="utf-8")]
    queries = {}
    for line in open(root / "queries.jsonl", encoding="utf-8"):
        record = json.loads(line)
        queries[record["_id"]] = record["text"]
    query_ids = list(read_qrels(root / "qrels" / "test.tsv"))
    model = load_model(None)
    start = time.perf_counter()
    doc_texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    data = {"doc_ids": np.array([d["_id"] for d in docs]),
            "docs": model.encode(doc_texts, batch_size=32),
            "query_ids": np.array(query_ids),
            "queries": model.encode([queries[q] for q in query_ids], batch_size=32)}
    print(f"embedded {len(docs)} docs + {len(query_ids)} queries in "
          f"{time.perf_counter() - start:.0f} s; cached in {cache}", file=sys.stderr)
    np.savez(cache, **data)
    return data


def load_arrow(docs: str, queries: str, qrels) -> dict:
    """The cache's arrays from embedded Arrow files; only the queries the qrels judge."""
    def read(path):
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        return (np.array(table.column("id").to_pylist()),
                names.vectors_to_numpy(table.column("embedding")).astype(np.float32))

    doc_ids, doc_vectors = read(docs)
    query_ids, query_vectors = read(queries)
    keep = np.isin(query_ids, list(qrels))
    return {"doc_ids": doc_ids, "docs": doc_vectors, "query_ids": query_ids[keep],
            "queries": query_vectors[keep]}


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            query_id, doc_id, grade = line.rstrip("\n").split("\t")
            qrels.setdefault(query_id, {})[doc_id] = int(grade)
    return qrels


def write_vectors(path: Path, vectors: np.ndarray, ids) -> Path:
    table = pa.table({"id": [str(i) for i in ids], "embedding": names.numpy_to_vectors(vectors)})
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "dim": str(vectors.shape[1]),
            "normalized": "true", "dtype": "float32"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


def vecpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vecpipe.cli", *args], check=True,
                          capture_output=True)


# ----- evaluation ----------------------------------------------------------------------------
def evaluate(label, cli_args, scoring, corpus_path, data, qrels, tmp: Path,
             report_queries: Path | None = None) -> dict:
    """One codec's row; with `report_queries`, also recall@10 against the qrels and the
    query latency of compress's report (held-out queries)."""
    queries, docs = data["queries"], data["docs"]
    report = tmp / "report.json"
    extra = [] if report_queries is None else \
        ["--report-queries", str(report_queries), "--save-report", str(report)]
    if cli_args is None:
        scores, size = queries @ docs.T, docs.shape[1] * 4
        if report_queries is not None:  # a codec that changes nothing: float32 against itself
            vecpipe("compress", str(corpus_path), "--dtype", "float16", "-o",
                    str(tmp / "codes.arrow"), "-q", *extra)
    else:
        out = tmp / "codes.arrow"
        vecpipe("compress", str(corpus_path), *cli_args, "-o", str(out), "-q", *extra)
        table = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
        codec = codec_from_meta(names.read_meta(table.schema))
        codes = codec.codes_from_matrix(names.vectors_to_numpy(table.column("embedding")))
        scores, size = score(codec, codes, scoring, queries, docs), codec.bytes_per_vector
    run = to_run(scores, data["query_ids"], data["doc_ids"])
    if scoring.startswith("rescore"):  # the float32 vectors stay on disk for re-ranking
        size = f"{size} (+{docs.shape[1] * 4} on disk)"
    row = {"label": label, "bytes": size, "ndcg": ndcg_at_10(run, qrels),
           "overlap": top_k_overlap(scores, queries @ docs.T)}
    if report_queries is not None:
        row["recall"] = recall_at_10(run, qrels)
        latency = json.loads(report.read_text())["query_latency"]
        row["float32_ms"] = latency["float32_ms"]
        row["codes_ms"] = None if cli_args is None else latency["codes_ms"]
    return row


def score(codec, codes, scoring, queries, docs):
    if scoring == "asymmetric":
        return codec.score(queries, codes)
    query_codes = codec.encode(queries)
    if scoring == "symmetric":
        if codec.is_bits:
            return -hamming_distances(query_codes, codes).astype(np.float32)
        return codec.code_matrix(query_codes) @ codec.code_matrix(codes).T
    multiplier = int(scoring.split(":")[1])
    distances = hamming_distances(query_codes, codes)
    candidates = np.argsort(distances, axis=1, kind="stable")[:, :K * multiplier]
    scores = np.full(distances.shape, -np.inf, dtype=np.float32)
    for row, picked in enumerate(candidates):
        scores[row, picked] = docs[picked] @ queries[row]
    return scores


def to_run(scores, query_ids, doc_ids, depth: int = 100) -> dict:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return {str(q): {str(doc_ids[j]): float(scores[i, j]) for j in top[i]
                     if np.isfinite(scores[i, j])} for i, q in enumerate(query_ids)}


def ndcg_at_10(run, qrels) -> float:
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    per_query = evaluator.evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))


def recall_at_10(run, qrels) -> float:
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recall.10"})
    return float(np.mean([m["recall_10"] for m in evaluator.evaluate(run).values()]))


def top_k_overlap(scores, exact) -> float:
    found = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :K]
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)]))


def print_table(rows) -> None:
    base = rows[0]
    print("| codec | bytes/vector in RAM | nDCG@10 | vs float32 | recall@10 vs float32 |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['bytes']} | {row['ndcg']:.4f} | "
              f"{100 * row['ndcg'] / base['ndcg']:.1f}% | {row['overlap']:.3f} |")


def print_pca_table(rows) -> None:
    base = rows[0]
    print("| codec | bytes/vector | nDCG@10 | retention | recall@10 | retention | "
          "top-10 overlap with float32 | ms/query codes | ms/query float32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        codes = "-" if row["codes_ms"] is None else f"{row['codes_ms']:.3f}"
        print(f"| {row['label']} | {row['bytes']} | {row['ndcg']:.4f} | "
              f"{100 * row['ndcg'] / base['ndcg']:.1f}% | {row['recall']:.4f} | "
              f"{100 * row['recall'] / base['recall']:.1f}% | {row['overlap']:.3f} | "
              f"{codes} | {row['float32_ms']:.3f} |")


# ----- throughput ----------------------------------------------------------------------------
def throughput(tmp: Path, rows: int) -> list[tuple[str, float]]:
    """Median rows/s of a synthetic Arrow file through convert (baseline) and compress."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    source = write_vectors(tmp / "big.arrow", vectors, np.arange(rows))
    del vectors
    results = []
    for label, args in [("convert (copy, baseline)", ["convert"]),
                        ("compress --dtype float16", ["compress", "--dtype", "float16"]),
                        ("compress --dtype int8", ["compress", "--dtype", "int8"]),
                        ("compress --dtype binary", ["compress", "--dtype", "binary"]),
                        ("compress --pca 128 --dtype int8", ["compress", "--pca", "128", "--dtype",
                                                           "int8"])]:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            vecpipe(*args, str(source), "-o", str(tmp / "out.arrow"), "-q")
            times.append(time.perf_counter() - start)
            os.unlink(tmp / "out.arrow")
        results.append((label, rows / float(np.median(times))))
    return results


def print_throughput(results) -> None:
    base = results[0][1]
    print("\n| command (Arrow file -> Arrow file, 384-d) | rows/s (median of 3) | vs convert |")
    print("|---|---:|---:|")
    for label, rate in results:
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
