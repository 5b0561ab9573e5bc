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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--cache", default="/tmp/vecpipe-bench-nfcorpus-minilm.npz")
    parser.add_argument("--throughput-rows", type=int, default=200_000,
                        help="rows of the synthetic stream timed through compress (0: skip)")
    args = parser.parse_args()
    print(machine_line(), flush=True)

    data = load_or_embed(Path(args.data), Path(args.cache))
    qrels = read_qrels(Path(args.data) / "qrels" / "test.tsv")
    with tempfile.TemporaryDirectory(prefix="vecpipe-bench-") as tmp:
        corpus_path = write_vectors(Path(tmp) / "corpus.arrow", data["docs"], data["doc_ids"])
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
def evaluate(label, cli_args, scoring, corpus_path, data, qrels, tmp: Path) -> dict:
    queries, docs = data["queries"], data["docs"]
    if cli_args is None:
        scores, size = queries @ docs.T, docs.shape[1] * 4
    else:
        out = tmp / "codes.arrow"
        vecpipe("compress", str(corpus_path), *cli_args, "-o", str(out), "-q")
        table = pa.ipc.open_file(pa.memory_map(str(out))).read_all()
        codec = codec_from_meta(names.read_meta(table.schema))
        codes = codec.codes_from_matrix(names.vectors_to_numpy(table.column("embedding")))
        scores, size = score(codec, codes, scoring, queries, docs), codec.bytes_per_vector
    run = to_run(scores, data["query_ids"], data["doc_ids"])
    if scoring.startswith("rescore"):  # the float32 vectors stay on disk for re-ranking
        size = f"{size} (+{docs.shape[1] * 4} on disk)"
    return {"label": label, "bytes": size, "ndcg": ndcg_at_10(run, qrels),
            "overlap": top_k_overlap(scores, queries @ docs.T)}


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
