"""Indexes of multi-bit binary and PQ codes (issue 18): recall@10 against exact float search,
nDCG@10 on NFCorpus, queries per second and index bytes, for

- float32 HNSW (the baseline), int8 HNSW, 1-bit b1 HNSW rescored with the kept float vectors;
- K bit planes (Tencent's residual binarisation): plane 1 in the HNSW graph, the first plane's
  k*M hamming candidates rescored with all K planes (M = the rescore multiple), and the exact
  scan of every plane (--exact);
- PQ (a flat index scanned by ADC), alone and as the first stage before rescoring k*M
  candidates with the kept float vectors.

    .venv/bin/python bench/code_index.py --nfcorpus ../shared/data/nfcorpus --docs docs.arrow \\
        --queries queries.arrow [--lines lines.arrow] [--repeat 3]

Indexes are built in-process (IndexBuilder, as `vecpipe index` builds them) in a temporary
folder; each search runs every query in one batch, median of --repeat runs.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

from vecpipe.core.codec import Codec
from vecpipe.core.index_build import IndexBuilder
from vecpipe.core.index_format import to_index_codes
from vecpipe.core.index_open import open_index
from vecpipe.core.index_spec import IndexSpec

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path
from quantization import data_arguments, read, recall, test_queries, top


def build(folder: str, name: str, docs, codec: Codec | None, keep: bool, flat: bool = False):
    import pyarrow as pa

    path = os.path.join(folder, name)
    meta = codec.metadata() if codec is not None else {}
    full = {"dim": docs.shape[1], "dtype": "float32"} if keep else None
    if codec is None:
        spec = IndexSpec(dim=docs.shape[1], metric="ip", metadata=meta, full=full)
        vectors = docs
    else:
        pq, planes = codec.to == "pq", codec.bits
        dtype = "pq" if pq else "b1" if codec.is_bits else "i8"
        spec = IndexSpec(dim=codec.code_width if pq else codec.out_dim,
                         metric="hamming" if dtype == "b1" else "ip" if pq else "cos",
                         dtype=dtype, score_metric="ip", metadata=meta, full=full,
                         flat=flat or pq, planes=planes)
        vectors = to_index_codes(codec, codec.encode(docs))
    ids = [str(i) for i in range(len(docs))]
    started = time.perf_counter()
    with IndexBuilder(path, spec) as builder:
        builder.add(ids, vectors, pa.table({"id": ids}), full=docs if keep else None)
    seconds = time.perf_counter() - started
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f not in ("manifest.json", "rows.parquet", "full.npy"))
    return open_index(path), size, seconds


def searched(index, queries, k: int, repeat: int, **options):
    """(hits, queries per second); a graph is searched at its ef 64 even when the index is
    small enough to be scanned exactly by default (Searcher's EXACT_SCAN_BYTES)."""
    if not index.flat:
        options.setdefault("ef", index.manifest["hnsw"]["expansion_search"])
    times, hits = [], None
    for _ in range(repeat):
        searcher = index.searcher(k, **options)
        started = time.perf_counter()
        hits = searcher.search(queries)
        times.append(time.perf_counter() - started)
    return hits, len(queries) / statistics.median(times)


def configurations():
    """(label, codec fit keywords or None, keep full vectors, flat, search options)."""
    yield "float32 HNSW", None, False, False, {}
    yield "int8 HNSW (codes rescore k*4)", dict(to="int8"), False, False, {}
    yield "binary 1 bit HNSW, float rescore k*10", dict(to="binary"), True, False, \
        dict(rescore=10)
    for bits in (2, 4):
        for multiple in (4, 10, 20):
            yield f"binary {bits} bits HNSW, plane 1 -> {bits} planes k*{multiple}", \
                dict(to="binary", bits=bits), False, False, dict(rescore=multiple)
        yield f"binary {bits} bits flat (exact scan of the planes)", \
            dict(to="binary", bits=bits), False, True, {}
    for m in (48, 96):
        yield f"pq m{m}x8 flat (ADC scan)", dict(to="pq", pq_m=m), False, True, {}
        for multiple in (4, 10):
            yield f"pq m{m}x8 ADC -> float rescore k*{multiple}", dict(to="pq", pq_m=m), True, \
                True, dict(rescore=multiple)


def table(docs, queries, repeat: int, score=None) -> None:
    truth = top(queries @ docs.T, 10)
    header = "| index | index bytes/vector | full.npy | build s | QPS | recall@10 |" + (
        " nDCG@10 |" if score else "")
    print(header + "\n" + "|---" + "|---:" * (header.count("|") - 2) + "|")
    fitted: dict = {}
    with tempfile.TemporaryDirectory(dir=".") as folder:
        for number, (label, fit, keep, flat, options) in enumerate(configurations()):
            key = repr(fit)
            if fit is not None and key not in fitted:
                fitted[key] = Codec.fit(docs[:25600], **fit)
            codec = fitted.get(key)
            index, size, seconds = build(folder, f"i{number}", docs, codec, keep, flat)
            hits, qps = searched(index, queries, 10, repeat, **options)
            row = f"| {label} | {size / len(docs):.0f} | {'kept' if keep else '-'} | " \
                  f"{seconds:.1f} | {qps:,.0f} | " \
                  f"{recall(truth, hits.rows):.4f} |"
            if score:
                row += f" {score(hits):.4f} |"
            print(row, flush=True)


def main() -> None:
    args = data_arguments(__doc__.splitlines()[0], repeat=3)
    print(machine_line())
    doc_ids, docs, ids, queries, qrels = test_queries(args)

    def score(hits):  # nDCG@10 of the top 10 hits (pytrec_eval)
        import pytrec_eval

        run = {q: {doc_ids[r]: float(v) for r, v in zip(rows, values) if r >= 0}
               for q, rows, values in zip(ids, hits.rows, hits.scores)}
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
        return float(np.mean([v["ndcg_cut_10"] for v in evaluator.evaluate(run).values()]))

    print(f"\nNFCorpus: {len(docs)} documents, {len(ids)} test queries")
    table(docs, queries, args.repeat, score)
    if args.lines:
        _, lines = read(args.lines)
        print(f"\nlines: {len(lines) - 1000} documents, 1000 held-out queries")
        table(lines[:-1000], lines[-1000:], args.repeat)


if __name__ == "__main__":
    main()
