"""Benchmark `vecpipe index` + search: build time, index bytes, QPS and recall@10 per dtype,
against faiss HNSW and numpy exact search in the same run.

    # the numbers in BENCHMARKS.md: 1M real MiniLM vectors (embedding them: ~50 min on 2 cores)
    python bench/package_text.py | head -1001000 > lines.jsonl
    vecpipe embed lines.jsonl --backend onnx-int8 --batch-size 64 -o lines.arrow
    python bench/search.py --vectors lines.arrow --vector-sizes 100000,1000000 --sizes '' \
        --no-real --out bench/out/search-1m-real.json
    python bench/search.py --sizes 100000   # no embedding needed: synthetic vectors

Data:
- `--vectors FILE.arrow`: any embeddings file (e.g. `vecpipe embed` of real texts); its last
  --queries rows are held out as the queries, the rest are the documents (`--vector-sizes`: the
  first N of them, for each N). BENCHMARKS.md used 1M lines of English comments and docstrings
  from the installed Python packages (`bench/package_text.py`), embedded with the bundled MiniLM.
- real (unless --no-real): all-MiniLM-L6-v2 embeddings of NFCorpus titles + the docstrings of
  Python's stdlib (documents) and NFCorpus queries (queries), embedded once and cached in
  bench/out/. Used as is, and to fit the synthetic generators.
- synthetic (`--sizes`), two generators fitted to the real document embeddings, for a quick run
  without embedding hundreds of thousands of texts:
  `anchored` (default): the real documents plus normalize(real doc + s * g), g ~ N(0, covariance
  of the real documents), s set so that a point's cosine to its anchor is the real documents'
  median nearest-neighbour cosine. Real topical structure and spectrum; queried with the REAL
  query embeddings. At 1M its local intrinsic dimension is far above real text's and HNSW
  recall collapses (BENCHMARKS.md): use real vectors for 1M numbers.
  `gaussian`: normalized N(mean, covariance) of the real documents, queries drawn the same way.
  The real spectrum but no cluster structure: every point is nearly equidistant from the rest,
  a pessimistic case (iid Gaussian vectors, without even the spectrum, are worse still).

Every index is built with `vecpipe index` (a subprocess, default HNSW settings M=16,
expansion_add=128, expansion_search=64; "flat" variants: `--flat`, no graph, exact search;
"faiss graph" variants: `--library faiss`, the same folder with faiss's HNSW) from an Arrow
file. Its peak RSS counts the pages of that memory-mapped file, which the kernel can
drop at will; piping an Arrow stream into `vecpipe index -` instead measures about the usearch
index plus 140 MB of interpreter and ~60 MB per 100k rows (the ids, buffers). Searches run
in-process through `index_search.Searcher` on 1,000 query vectors (embedding time excluded),
median of 3 runs.
faiss: IndexHNSWFlat(M=16, efConstruction=128, efSearch=64, inner product) on the same vectors.
Exact: numpy float32 matmul + top-k in blocks. recall@10 is against the exact float top 10.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
NFCORPUS = REPO.parent / "shared" / "data" / "nfcorpus"
CACHE = REPO / "bench" / "out" / "real_minilm.npz"
K = 10
VARIANTS = [  # (name, index options, search options)
    ("f32", ["--dtype", "f32"], {}),
    ("f32 ef128", ["--dtype", "f32"], {"ef": 128}),
    ("f32 ef256", ["--dtype", "f32"], {"ef": 256}),
    ("f16", ["--dtype", "f16"], {}),
    ("faiss graph f32", ["--dtype", "f32", "--library", "faiss"], {}),
    ("faiss graph f32 ef128", ["--dtype", "f32", "--library", "faiss"], {"ef": 128}),
    ("faiss graph f32 ef256", ["--dtype", "f32", "--library", "faiss"], {"ef": 256}),
    ("faiss graph f16", ["--dtype", "f16", "--library", "faiss"], {}),
    ("i8 (default: k*4 rescored)", ["--dtype", "i8"], {}),
    ("i8 rescore1", ["--dtype", "i8"], {"rescore": 1}),
    ("b1 hnsw", ["--dtype", "b1", "--keep-vectors"], {}),
    ("b1 hnsw+rescore4", ["--dtype", "b1", "--keep-vectors"], {"rescore": 4}),
    ("b1 hnsw+rescore10", ["--dtype", "b1", "--keep-vectors"], {"rescore": 10}),
    ("b1 hnsw+rescore20", ["--dtype", "b1", "--keep-vectors"], {"rescore": 20}),
    ("b1 flat", ["--dtype", "b1", "--flat", "--keep-vectors"], {}),
    ("b1 flat+rescore10", ["--dtype", "b1", "--flat", "--keep-vectors"], {"rescore": 10}),
    ("b1 flat+rescore50", ["--dtype", "b1", "--flat", "--keep-vectors"], {"rescore": 50}),
    ("b1 flat+rescore100", ["--dtype", "b1", "--flat", "--keep-vectors"], {"rescore": 100}),
]
# Runs a command and prints its peak RSS: measured from a small launcher, because a child forked
# from this (large) process inherits this process's RSS into its own ru_maxrss.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(code)")


# ---- data ---------------------------------------------------------------------------------------

def real_embeddings():
    """(docs, queries) real MiniLM vectors, cached."""
    if CACHE.is_file():
        data = np.load(CACHE)
        return data["docs"], data["queries"]
    sys.path.insert(0, str(REPO / "bench"))
    import demo_corpus

    from vecpipe.cli.models import load_model

    titles = [orjson.loads(line)["title"] for line in open(NFCORPUS / "corpus.jsonl", "rb")]
    stdlib = [r["text"] for r in demo_corpus.records(max_chars=500)]
    queries = [orjson.loads(line)["text"] for line in open(NFCORPUS / "queries.jsonl", "rb")]
    model = load_model(None)
    started = time.time()
    docs = model.encode(titles + stdlib, batch_size=32)
    query_vectors = model.encode(queries, batch_size=32)
    print(f"embedded {len(docs) + len(queries):,} texts in {time.time() - started:.0f} s",
          file=sys.stderr)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, docs=docs, queries=query_vectors)
    return docs, query_vectors


class SpectrumMatched:
    """Normalized Gaussian vectors with the mean and covariance of real embeddings."""

    def __init__(self, real, seed=0):
        self.mean = real.mean(axis=0)
        cov = np.cov(real, rowvar=False)
        values, vectors = np.linalg.eigh(cov)
        self.transform = (vectors * np.sqrt(np.clip(values, 0, None))).T.astype(np.float32)
        self.trace = float(np.trace(cov))
        self.rng = np.random.default_rng(seed)

    def noise(self, n):
        z = self.rng.standard_normal((n, len(self.mean)), dtype=np.float32)
        return z @ self.transform

    def sample(self, n, block=100_000):
        out = np.empty((n, len(self.mean)), dtype=np.float32)
        for start in range(0, n, block):
            x = self.mean + self.noise(min(block, n - start))
            out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


class Anchored(SpectrumMatched):
    """The real documents, then normalize(random real doc + s * spectrum-shaped noise)."""

    def __init__(self, real, seed=0):
        super().__init__(real, seed)
        self.real = real
        similarity = real @ real.T
        np.fill_diagonal(similarity, -1)
        self.neighbour_cos = float(np.median(similarity.max(axis=1)))
        # |anchor| = 1 and the noise is nearly orthogonal to it: cos = 1 / sqrt(1 + s^2 trace)
        self.scale = float(np.sqrt((1 / self.neighbour_cos ** 2 - 1) / self.trace))

    def sample(self, n, block=100_000):
        out = np.empty((n, self.real.shape[1]), dtype=np.float32)
        out[:min(n, len(self.real))] = self.real[:n]
        for start in range(len(self.real), n, block):
            count = min(block, n - start)
            anchors = self.real[self.rng.integers(0, len(self.real), count)]
            x = anchors + self.scale * self.noise(count)
            out[start:start + count] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def file_embeddings(path, queries: int):
    """(docs, held-out queries) from an Arrow file's `embedding` column: the last rows query."""
    with pa.memory_map(str(path)) as source:
        column = pa.ipc.open_file(source).read_all().column("embedding").combine_chunks()
    vectors = column.values.to_numpy().reshape(len(column), -1).astype(np.float32)
    return vectors[:-queries], vectors[-queries:]


def participation_ratio(x) -> float:
    """(sum of eigenvalues)^2 / sum of squares: the effective number of dimensions."""
    values = np.clip(np.linalg.eigvalsh(np.cov(x[:20000], rowvar=False)), 0, None)
    return float(values.sum() ** 2 / (values ** 2).sum())


def write_arrow(path, vectors):
    ids = pa.array([f"d{i}" for i in range(len(vectors))])
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), 384))],
                       metadata={b"vecpipe.model": b"sentence-transformers/all-MiniLM-L6-v2",
                                 b"vecpipe.dim": b"384", b"vecpipe.normalized": b"true"})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(vectors), 65536):
            block = vectors[start:start + 65536]
            writer.write_batch(pa.record_batch(
                [ids.slice(start, len(block)),
                 pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), 384)],
                schema=schema))


# ---- measurements -------------------------------------------------------------------------------

def median_time(run, repeats=3):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def exact_search(docs, queries, k=K, block=100_000):
    from vecpipe.core.vectors import TopK

    top = TopK(len(queries), k)
    for start in range(0, len(docs), block):
        top.update(queries @ docs[start:start + block].T, start)
    return top.rows


def recall_at_k(found, truth) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def build_vecpipe(arrow, folder, options):
    """`vecpipe index` in a subprocess: (seconds, peak RSS bytes)."""
    cmd = [sys.executable, "-m", "vecpipe.cli", "index", str(arrow), "-o", str(folder), "-q",
           *options]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"index failed: {' '.join(cmd)}: {done.stderr}")
    return seconds, int(done.stderr.split()[-1]) * 1024


def measure_vecpipe(arrow, folder, queries, truth, built: dict, dtypes, skip=()):
    from vecpipe.core.index_format import FULL, graph_file
    from vecpipe.core.index_open import open_index

    rows = []
    for name, options, search_options in VARIANTS:
        if options[1] not in dtypes or any(name.startswith(prefix) for prefix in skip):
            continue
        key = tuple(options)
        if key not in built:
            target = folder / f"idx-{len(built)}"
            built[key] = (target, *build_vecpipe(arrow, target, options))
        target, build_s, rss = built[key]
        index = open_index(str(target))
        if not index.flat:  # the graph, even where the index is small enough to scan exactly
            search_options = {"ef": index.manifest["hnsw"]["expansion_search"], **search_options}
        searcher = index.searcher(K, **search_options)
        searcher.search(queries[:10])  # page the index in
        seconds, hits = median_time(lambda: searcher.search(queries))
        files = index.manifest["files"]
        rows.append({"engine": "vecpipe", "variant": name, "build_s": round(build_s, 1),
                     "build_peak_rss_mb": round(rss / 2**20),
                     "index_bytes": files[graph_file(index.manifest)]["bytes"],
                     "full_vectors_bytes": files.get(FULL, {}).get("bytes", 0),
                     "qps": round(len(queries) / seconds),
                     "recall@10": round(recall_at_k(hits.rows, truth), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def measure_faiss(docs, queries, truth):
    import faiss

    index = faiss.IndexHNSWFlat(docs.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    started = time.perf_counter()
    index.add(docs)
    build_s = time.perf_counter() - started
    size = int(faiss.serialize_index(index).nbytes)
    rows = []
    for ef in (64, 128, 256):
        index.hnsw.efSearch = ef
        index.search(queries[:10], K)
        seconds, (_, found) = median_time(lambda: index.search(queries, K))
        rows.append({"engine": "faiss", "variant": f"HNSWFlat f32 ef{ef}",
                     "build_s": round(build_s, 1), "index_bytes": size,
                     "qps": round(len(queries) / seconds),
                     "recall@10": round(recall_at_k(found, truth), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def run_size(name, docs, queries, workdir, dtypes=("f32", "f16", "i8", "b1"), faiss=True,
             skip=()):
    print(f"== {name}: {len(docs):,} docs, {len(queries):,} queries", file=sys.stderr)
    seconds, truth = median_time(lambda: exact_search(docs, queries), repeats=1)
    rows = [{"engine": "numpy", "variant": "exact f32", "index_bytes": docs.nbytes,
             "qps": round(len(queries) / seconds), "recall@10": 1.0}]
    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        arrow = folder / "docs.arrow"
        write_arrow(arrow, docs)
        rows += measure_vecpipe(arrow, folder, queries, truth, {}, dtypes, skip)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if faiss:
        rows += measure_faiss(docs, queries, truth)
    return {"set": name, "docs": len(docs), "queries": len(queries), "rows": rows}


def markdown(result) -> str:
    exact_qps = next(r["qps"] for r in result["rows"] if r["engine"] == "numpy")
    f32_bytes = next((r["index_bytes"] for r in result["rows"] if r.get("variant") == "f32"),
                     result["docs"] * (384 * 4 + 150))  # vectors + ~150 B of graph each
    lines = [f"{result['set']}: {result['docs']:,} docs, {result['queries']:,} queries",
             "", "| engine | variant | build s | index MB | vs f32 | full.npy MB | QPS | "
                 "x exact | recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['engine']} | {r['variant']} | {r.get('build_s', '-')} | "
            f"{r['index_bytes'] / 2**20:.1f} | {f32_bytes / r['index_bytes']:.1f}x | "
            f"{r.get('full_vectors_bytes', 0) / 2**20:.0f} | {r['qps']:,} | "
            f"{r['qps'] / exact_qps:.1f} | {r['recall@10']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="synthetic sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--no-real", action="store_true", help="skip the real-embedding set")
    parser.add_argument("--vectors", help="also an embeddings Arrow file (last --queries rows "
                                          "held out as queries)")
    parser.add_argument("--vector-sizes", default="", help="with --vectors: index only the first "
                        "N documents, for each N (comma-separated; default: all of them)")
    parser.add_argument("--synthetic", choices=("anchored", "gaussian"), default="anchored")
    parser.add_argument("--dtypes", default="f32,f16,i8,b1", help="index dtypes to build")
    parser.add_argument("--skip", default="", help="variants to leave out: comma-separated "
                                                   "name prefixes, e.g. 'b1 hnsw,f32 ef'")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="for index folders")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)

    dtypes = args.dtypes.split(",")
    skip = tuple(prefix for prefix in args.skip.split(",") if prefix)
    real_docs, real_queries = real_embeddings()
    generator = (Anchored if args.synthetic == "anchored" else SpectrumMatched)(real_docs)
    iid = np.random.default_rng(1).standard_normal((20000, 384)).astype(np.float32)
    spectra = {"real": participation_ratio(real_docs),
               args.synthetic: participation_ratio(generator.sample(20000)),
               "iid gaussian": participation_ratio(iid)}
    print("effective dimensions (participation ratio): "
          + ", ".join(f"{k} {v:.0f}" for k, v in spectra.items()), file=sys.stderr)
    if args.synthetic == "anchored":
        print(f"anchored: noise scale {generator.scale:.3f} for a median nearest-neighbour "
              f"cosine of {generator.neighbour_cos:.3f}", file=sys.stderr)
    results = []
    if not args.no_real:
        results.append(run_size("real MiniLM (NFCorpus titles + stdlib docstrings)", real_docs,
                                real_queries[:args.queries], args.workdir, dtypes,
                                not args.no_faiss, skip))
    if args.vectors:
        docs, queries = file_embeddings(args.vectors, args.queries)
        spectra["file"] = participation_ratio(docs)
        for size in [int(s) for s in args.vector_sizes.split(",") if s] or [len(docs)]:
            results.append(run_size(f"{Path(args.vectors).name}: first {size:,} (real vectors, "
                                    "held-out queries)", docs[:size], queries, args.workdir,
                                    dtypes, not args.no_faiss, skip))
        del docs
    for size in [int(s) for s in args.sizes.split(",") if s]:
        docs = generator.sample(size)
        if args.synthetic == "anchored":
            queries = real_queries[:args.queries]
            name = f"anchored synthetic {size:,} (real docs + perturbed copies; real queries)"
        else:
            queries = generator.sample(args.queries)
            name = f"gaussian synthetic {size:,} (real mean and covariance)"
        results.append(run_size(name, docs, queries, args.workdir, dtypes, not args.no_faiss,
                                skip))
        del docs
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
               "load_avg": os.getloadavg(), "machine": platform.machine(),
               "cpu": machine_line()}
    for result in results:
        print(markdown(result) + "\n")
    print(f"effective dimensions: {spectra}; machine: {machine}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "spectra": spectra,
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
