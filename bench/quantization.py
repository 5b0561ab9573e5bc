"""Codecs at equal bytes per vector (compress --dtype binary --bits K, --dtype pq, int8): recall@10
against exact float search and, on NFCorpus, nDCG@10 (pytrec_eval); then the speed of vecpipe's
numpy PQ scoring (look-up tables, and decode + matmul) against faiss's IndexPQ.

    .venv/bin/python bench/quantization.py --nfcorpus ../shared/data/nfcorpus \\
        --docs docs.arrow --queries queries.arrow --lines lines.arrow [--repeat 5]

docs/queries: NFCorpus corpus and queries embedded by `vecpipe embed`; lines: 101,000 embedded
text lines (bench/package_text.py), the last 1,000 held out as queries. Codecs are fitted on
every document vector (compress's default calibration is the first 10,000 rows).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time

import numpy as np
import pyarrow as pa

from vecpipe.core.codec import Codec

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

# bytes per 384-d vector -> the codecs of that size (Codec.fit keywords)
BUDGETS = {
    48: [dict(to="binary"), dict(to="int8", dim=48), dict(to="pq", pq_m=48)],
    96: [dict(to="binary", bits=2), dict(to="int8", dim=96), dict(to="int8", pca=96),
         dict(to="pq", pq_m=96)],
    192: [dict(to="binary", bits=4), dict(to="int8", dim=192), dict(to="pq", pq_m=192)],
    384: [dict(to="int8"), dict(to="binary", bits=8)],
}


def read(path: str):
    table = pa.ipc.open_file(path).read_all()
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    return [str(i) for i in table["id"].to_pylist()], vectors


def top(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(t, f)) for t, f in zip(truth, found)])) / truth.shape[1]


def ndcg10(query_ids, doc_ids, scores, qrels) -> float:
    import pytrec_eval

    best = top(scores, 100)
    run = {q: {doc_ids[j]: float(scores[i, j]) for j in best[i]} for i, q in enumerate(query_ids)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    return float(np.mean([v["ndcg_cut_10"] for v in evaluator.evaluate(run).values()]))


def test_qrels(folder: str) -> dict:
    qrels: dict = {}
    with open(f"{folder}/qrels/test.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def codec_rows(docs, queries, extra=None):
    """Per codec: (bytes, description, recall@10, extra(scores))."""
    truth = top(queries @ docs.T, 10)
    yield 1536, "float32", 1.0, extra(queries @ docs.T) if extra else None
    for size, options in BUDGETS.items():
        for fit in options:
            codec = Codec.fit(docs, **fit)
            codes = codec.encode(docs)
            scores = codec.project(queries) @ codec.decode(codes).T if fit["to"] == "pq" \
                else codec.score(queries, codes)  # pq: the ADC numbers, by one matmul
            yield (codec.bytes_per_vector, codec.describe(), recall(truth, top(scores, 10)),
                   extra(scores) if extra else None)


def test_queries(args):
    """(doc ids, doc vectors, test query ids, their vectors, test qrels) of --docs, --queries
    and the NFCorpus test split."""
    doc_ids, docs = read(args.docs)
    qrels = test_qrels(args.nfcorpus)
    query_ids, all_queries = read(args.queries)
    keep = [i for i, q in enumerate(query_ids) if q in qrels]
    return doc_ids, docs, [query_ids[i] for i in keep], all_queries[keep], qrels


def accuracy(args) -> None:
    doc_ids, docs, ids, queries, qrels = test_queries(args)
    print(f"\nNFCorpus: {len(docs)} documents, {len(ids)} test queries")
    print("| bytes | codec | recall@10 | nDCG@10 |\n|---:|---|---:|---:|")
    for size, name, found, score in codec_rows(docs, queries,
                                               lambda s: ndcg10(ids, doc_ids, s, qrels)):
        print(f"| {size} | {name} | {found:.4f} | {score:.4f} |")
    if args.lines:
        _, lines = read(args.lines)
        docs, queries = lines[:-1000], lines[-1000:]
        print(f"\nlines: {len(docs)} documents, {len(queries)} held-out queries")
        print("| bytes | codec | recall@10 |\n|---:|---|---:|")
        for size, name, found, _ in codec_rows(docs, queries):
            print(f"| {size} | {name} | {found:.4f} |")


def median_seconds(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def table_adc(pq, queries, codes) -> np.ndarray:
    """The textbook ADC: per-query look-up tables (queries x m x 2^bits), m look-ups a code."""
    sub = pq.rotate(queries).reshape(len(queries), pq.m, -1)
    tables = np.einsum("qjd,jkd->qjk", sub, pq.centroids, optimize=True)
    out = np.zeros((len(queries), len(codes)), dtype=np.float32)
    for j in range(pq.m):
        out += tables[:, j, :][:, codes[:, j]]
    return out


def speed(args) -> None:
    import faiss

    _, lines = read(args.lines)
    docs, queries = lines[:-1000], lines[-1000:]
    print(f"\nPQ scoring speed, {len(docs)} codes x {len(queries)} queries, median of "
          f"{args.repeat} (alternating), top 10 included")
    print("| m | look-up-table ADC s | vecpipe (decode blocks + matmul) s | faiss IndexPQ s |"
          "\n|---:|---:|---:|---:|")
    for m in (48, 96):
        codec = Codec.fit(docs[:25600], to="pq", pq_m=m)
        codes = codec.encode(docs)
        index = faiss.IndexPQ(docs.shape[1], m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(docs[:25600])
        index.add(docs)
        runs = {"adc": [], "decode": [], "faiss": []}
        for _ in range(args.repeat):
            runs["adc"].append(median_seconds(lambda: top(table_adc(codec.pq, queries, codes),
                                                          10), 1))
            runs["decode"].append(median_seconds(lambda: top(codec.score(queries, codes), 10),
                                                 1))
            runs["faiss"].append(median_seconds(lambda: index.search(queries, 10), 1))
        med = {key: statistics.median(value) for key, value in runs.items()}
        print(f"| {m} | {med['adc']:.2f} | {med['decode']:.2f} | {med['faiss']:.2f} |")


def data_arguments(description: str, repeat: int):
    """The arguments of the benchmarks over NFCorpus vectors and the 100k embedded lines."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--nfcorpus", required=True)
    parser.add_argument("--docs", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--lines")
    parser.add_argument("--repeat", type=int, default=repeat)
    return parser.parse_args()


def main() -> None:
    args = data_arguments(__doc__.splitlines()[0], repeat=5)
    print(machine_line())
    accuracy(args)
    if args.lines:
        speed(args)


if __name__ == "__main__":
    main()
