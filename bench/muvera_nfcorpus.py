"""MUVERA on NFCorpus: recall@10 of FDE retrieval (and of FDE candidates rescored by exact
Chamfer) against exact Chamfer search over the token vectors, for several repetitions R and
SimHash sizes K, with the bytes each keeps and queries per second.

Token vectors are the bundled MiniLM's (core.multivector.token_vectors: its last hidden states,
L2-normalized, special tokens kept; title + text truncated at its 256-token window), made once
and cached in --work. FDE search here is exact (a numpy matrix product over every document's
FDE, as a flat index scans), so the recall measures the encoding, not an ANN graph. Test-split
queries; the corpus is the first --docs documents (the 2-core CPU shared with another benchmark
cannot embed and brute-force all 3,633 in reasonable time; --docs 0 takes them all).

    .venv/bin/python bench/muvera_nfcorpus.py [--data ../shared/data/nfcorpus] [--docs 1000]
        [--work /tmp/vp/muvera-work] [--depths 100,300] [--grid R:K:P:D,...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

# (R, K, P, D): repetitions, SimHash bits, AMS inner projection (None: all 384), final count
# sketch (None: none). R=1 K=0 P=None is the mean of the document's token vectors against the
# sum of the query's: one 384-d vector, the single-vector baseline a pooled index gives.
GRID = [(1, 0, None, None)] + [(r, k, 32, None) for k in (3, 4, 5) for r in (5, 10, 20)] \
    + [(40, 4, 32, None), (20, 4, 32, 2048), (20, 4, 16, None), (20, 3, 64, None)]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_queries(data: str) -> list[dict]:
    wanted = set()
    with open(os.path.join(data, "qrels", "test.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            wanted.add(line.split("\t")[0])
    return [q for q in read_jsonl(os.path.join(data, "queries.jsonl")) if q["_id"] in wanted]


def token_sets(model, texts, path):
    """Token vectors of `texts` (cached at `path`: flat float32 + offsets)."""
    from vecpipe.core.fde import pack_sets
    from vecpipe.core.multivector import token_vectors

    if os.path.exists(path):
        cached = np.load(path)
        return cached["tokens"], cached["offsets"]
    started = time.perf_counter()
    tokens, offsets = pack_sets(token_vectors(model, texts, batch_size=32))
    seconds = time.perf_counter() - started
    print(f"  token vectors of {len(texts)} texts: {len(tokens):,} tokens in {seconds:.0f} s",
          file=sys.stderr)
    np.savez(path, tokens=tokens, offsets=offsets)
    return tokens, offsets


def exact_chamfer_top(q_tokens, q_offsets, d_tokens, d_offsets, k):
    from vecpipe.core.fde import chamfer_scores

    top = []
    for i in range(len(q_offsets) - 1):
        scores = chamfer_scores(q_tokens[q_offsets[i]:q_offsets[i + 1]], d_tokens, d_offsets)
        top.append(np.argsort(-scores, kind="stable")[:k])
    return np.array(top)


def recall(found, truth, k=10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                       "shared", "data", "nfcorpus"))
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/vp/muvera-work")
    parser.add_argument("--depths", default="100,300",
                        help="FDE candidates rescored by exact Chamfer (comma-separated)")
    parser.add_argument("--grid", help="R:K:P:D,... instead of GRID (- for no P or D)")
    parser.add_argument("--cli", metavar="R:K:P:M", help="Instead of the grid: the same cell "
                        "through the CLI (compress --fde, index, search --rescore M) on an "
                        "HNSW index, timed, with the index folder's bytes")
    args = parser.parse_args()
    grid = GRID if not args.grid else [
        tuple(None if part == "-" else int(part) for part in cell.split(":"))
        for cell in args.grid.split(",")]
    print(machine_line())
    os.makedirs(args.work, exist_ok=True)
    import torch

    torch.set_num_threads(2)
    from vecpipe.cli.models import load_model
    from vecpipe.core.fde import Fde, FdeConfig, chamfer_scores, pack_sets

    corpus = read_jsonl(os.path.join(args.data, "corpus.jsonl"))
    if args.docs:
        corpus = corpus[:args.docs]
    queries = test_queries(args.data)
    model = load_model(None, "cpu")
    d_tokens, d_offsets = token_sets(
        model, [(d.get("title", "") + " " + d["text"]).strip() for d in corpus],
        os.path.join(args.work, f"docs-{len(corpus)}.npz"))
    q_tokens, q_offsets = token_sets(model, [q["text"] for q in queries],
                                     os.path.join(args.work, f"queries-{len(queries)}.npz"))
    dim = d_tokens.shape[1]
    print(f"{len(corpus):,} documents ({len(d_tokens):,} tokens, "
          f"{len(d_tokens) / len(corpus):.0f} a document), {len(queries)} test queries "
          f"({len(q_tokens) / len(queries):.1f} tokens a query), dim {dim}")

    started = time.perf_counter()
    truth = exact_chamfer_top(q_tokens, q_offsets, d_tokens, d_offsets, 10)
    exact_s = time.perf_counter() - started
    token_bytes = d_tokens.nbytes + d_offsets.nbytes
    print(f"exact Chamfer (brute force over every token, float32): "
          f"{len(queries) / exact_s:.1f} QPS, {token_bytes / 2**20:.0f} MiB of token vectors")
    if args.cli:
        return cli_run(args.cli, args.work, corpus, queries, d_tokens, d_offsets, q_tokens,
                       q_offsets, truth)
    depths = [int(d) for d in args.depths.split(",")]
    header = ("| R | K | P | D | FDE dims | FDE MiB | encode docs/s | recall@10 FDE | QPS FDE | "
              + " | ".join(f"recall@10 top-{d} + Chamfer | QPS top-{d}" for d in depths) + " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for reps, simhash, proj_dim, final_dim in grid:
        config = FdeConfig(token_dim=dim, reps=reps, simhash=simhash, proj_dim=proj_dim,
                           final_dim=final_dim)
        fde = Fde(config)
        started = time.perf_counter()
        docs = fde.encode(d_tokens, d_offsets, "document")
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        q = fde.encode(q_tokens, q_offsets, "query")
        scores = q @ docs.T
        found = np.argsort(-scores, axis=1, kind="stable")[:, :max(depths)]
        fde_s = time.perf_counter() - started
        row = dict(reps=reps, simhash=simhash, proj_dim=proj_dim, final_dim=final_dim,
                   dims=config.out_dim, fde_mib=docs.nbytes / 2**20,
                   encode_docs_s=len(corpus) / encode_s, recall_fde=recall(found, truth),
                   qps_fde=len(queries) / fde_s)
        for depth in depths:
            started = time.perf_counter()
            rescored = []
            for i, candidates in enumerate(found[:, :depth]):
                query = q_tokens[q_offsets[i]:q_offsets[i + 1]]
                tokens, offsets = pack_sets([d_tokens[d_offsets[c]:d_offsets[c + 1]]
                                             for c in candidates])
                exact = chamfer_scores(query, tokens, offsets)
                rescored.append(candidates[np.argsort(-exact, kind="stable")[:10]])
            rescore_s = time.perf_counter() - started
            row[f"recall_top{depth}"] = recall(rescored, truth)
            row[f"qps_top{depth}"] = len(queries) / (fde_s + rescore_s)
        rows.append(row)
        print(f"| {reps} | {simhash} | {proj_dim or dim} | {final_dim or '-'} | "
              f"{row['dims']:,} | {row['fde_mib']:.1f} | {row['encode_docs_s']:.0f} | "
              f"{row['recall_fde']:.3f} | {row['qps_fde']:.0f} | "
              + " | ".join(f"{row[f'recall_top{d}']:.3f} | {row[f'qps_top{d}']:.0f}"
                           for d in depths) + " |", flush=True)
    name = "results.json" if not args.grid else "results-grid.json"
    with open(os.path.join(args.work, name), "w") as f:
        json.dump({"machine": machine_line(), "docs": len(corpus), "queries": len(queries),
                   "exact_qps": len(queries) / exact_s, "token_mib": token_bytes / 2**20,
                   "rows": rows}, f, indent=1)


def write_tokens(path, ids, tokens, offsets, model_name):
    """An Arrow file of id + token_vectors, as embed --multi-vector writes them."""
    import pyarrow as pa

    from vecpipe.core.multivector import token_arrays
    from vecpipe.formats import schema as names

    sets = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
    vectors, counts = token_arrays(sets, tokens.shape[1])
    table = pa.table({"id": ids, "token_vectors": vectors, "token_count": counts})
    table = table.replace_schema_metadata(names.with_meta(table.schema, {
        "model": model_name, "multi_vector": json.dumps({"dim": tokens.shape[1]})}).metadata)
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def cli_run(cell, work, corpus, queries, d_tokens, d_offsets, q_tokens, q_offsets, truth):
    import subprocess

    reps, simhash, proj_dim, multiple = (int(x) for x in cell.split(":"))
    vecpipe = os.path.join(os.path.dirname(sys.executable), "vecpipe")
    model = "sentence-transformers/all-MiniLM-L6-v2"
    docs_path, queries_path = os.path.join(work, "tokens.arrow"), os.path.join(work, "q.arrow")
    write_tokens(docs_path, [d["_id"] for d in corpus], d_tokens, d_offsets, model)
    write_tokens(queries_path, [q["_id"] for q in queries], q_tokens, q_offsets, model)
    fde_path, idx = os.path.join(work, "fde.arrow"), os.path.join(work, "idx-fde")
    hits = os.path.join(work, "hits.jsonl")
    steps = [("compress", [vecpipe, "compress", docs_path, "--fde", "--fde-reps", str(reps),
                           "--fde-simhash", str(simhash), "--fde-proj-dim", str(proj_dim),
                           "-o", fde_path, "-q"]),
             ("index", [vecpipe, "index", fde_path, "-o", idx, "-q"]),
             ("search", [vecpipe, "search", idx, queries_path, "-k", "10", "--rescore",
                         str(multiple), "-o", hits, "-q"])]
    import shutil

    shutil.rmtree(idx, ignore_errors=True)
    for name, argv in steps:
        started = time.perf_counter()
        subprocess.run(argv, check=True)
        print(f"{' '.join(['vecpipe'] + argv[1:])}: {time.perf_counter() - started:.1f} s")
    found = {}
    for hit in read_jsonl(hits):
        found.setdefault(hit["query_id"], []).append(hit["id"])
    ids = [d["_id"] for d in corpus]
    rows = [[ids.index(i) for i in found.get(q["_id"], [])] for q in queries]
    sizes = {name: os.path.getsize(os.path.join(idx, name)) for name in os.listdir(idx)}
    print(f"recall@10 of exact Chamfer's top 10: {recall(rows, truth):.3f}; index folder "
          f"{sum(sizes.values()) / 2**20:.1f} MiB: " + ", ".join(
              f"{name} {size / 2**20:.1f}" for name, size in sorted(sizes.items())))


if __name__ == "__main__":
    main()
