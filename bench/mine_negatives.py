"""Benchmark `vecpipe mine-negatives` against sentence-transformers' `mine_hard_negatives`.

1. NFCorpus train (2,590 query ids, 2,576 distinct query texts, 110,575 pairs) x 3,633 docs
   (title + text), bundled all-MiniLM-L6-v2, exact search, -n 5, --range-max 50, top
   sampling, triplets with scores; with --relative-margin 0.05 (NV-Retriever's TopK-PercPos),
   and without (every pair gets 5 negatives: ~550k rows, GBs of text). Both tools get the same corpus vectors,
   computed once (vecpipe: an embeddings Arrow file; sentence-transformers: its own
   `cache_folder` file, named by its hash rule) and both embed the queries themselves, so the
   comparison is the mining, not the corpus embedding. Each run is a fresh process: wall time
   and peak RSS (wait4). The rows are compared (texts equal, scores to 1e-5).
2. `--scale N` (default 1,000,000): a synthetic N-passage corpus (the NFCorpus documents plus
   perturbed copies of their vectors, renormalised, with synthetic texts) indexed with
   `vecpipe index --fields text` and mined through the index (HNSW). The peer gets the same
   vectors through its cache: its default exact path (a queries x corpus score matrix) runs
   under an address-space cap (--peer-memory-gb), its faiss path (exact IndexFlatIP) without.

    .venv/bin/python bench/mine_negatives.py [--data ../shared/data/nfcorpus]
        [--work /tmp/vecpipe-bench-mine] [--scale 1000000 | --scale 0] [--repeat 1]
        [--peer-memory-gb 8] [--skip-nfcorpus] [--scale-exact]

The first run embeds NFCorpus (minutes on a small CPU) and caches it in --work.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
# (peer options, vecpipe options): NV-Retriever's TopK-PercPos (95%), and plain top 5
CONFIGS = [
    ({"num_negatives": 5, "range_max": 50, "relative_margin": 0.05},
     ["-n", "5", "--range-max", "50", "--relative-margin", "0.05"]),
    ({"num_negatives": 5, "range_max": 50}, ["-n", "5", "--range-max", "50"]),
]
COMMON = ["--on-short", "keep", "--shape", "triplet", "--with-scores"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vecpipe-bench-mine")
    parser.add_argument("--scale", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--peer-memory-gb", type=float, default=8.0)
    parser.add_argument("--skip-nfcorpus", action="store_true")
    parser.add_argument("--scale-exact", action="store_true",
                        help="also mine the synthetic corpus with --exact (slow: usearch "
                             "brute force)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    nf = prepare_nfcorpus(Path(args.data), work)
    if not args.skip_nfcorpus:
        compare_nfcorpus(nf, work, args.repeat)
    if args.scale:
        compare_scale(nf, work, args.scale, args.peer_memory_gb, args.scale_exact)


def machine() -> str:
    load = os.getloadavg()
    return (f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}, "
            f"python {sys.version.split()[0]}")


# ---- data ----------------------------------------------------------------------------------

def prepare_nfcorpus(root: Path, work: Path) -> dict:
    """pairs.jsonl, corpus.arrow (embedded once) and the texts, in work/."""
    docs = [json.loads(line) for line in open(root / "corpus.jsonl", encoding="utf-8")]
    texts = [" ".join(p for p in (d.get("title", ""), d["text"]) if p) for d in docs]
    ids = [d["_id"] for d in docs]
    text_of = dict(zip(ids, texts))
    queries = {}
    for line in open(root / "queries.jsonl", encoding="utf-8"):
        record = json.loads(line)
        queries[record["_id"]] = record["text"]
    pairs = []
    with open(root / "qrels" / "train.tsv", encoding="utf-8", newline="") as f:
        for row in list(csv.reader(f, delimiter="\t"))[1:]:
            if float(row[2]) > 0:
                pairs.append({"query": queries[row[0]], "positive": text_of[row[1]],
                              "positive_id": row[1]})
    pairs_path = work / "pairs.jsonl"
    if not pairs_path.is_file():
        pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    vectors_path = work / "nfcorpus-vectors.npy"
    if not vectors_path.is_file():
        from vecpipe.cli.models import load_model

        start = time.perf_counter()
        vectors = load_model(None).encode(texts, batch_size=32)
        print(f"embedded {len(texts)} NFCorpus docs in {time.perf_counter() - start:.0f} s "
              "(once, cached)", flush=True)
        np.save(vectors_path, vectors)
    vectors = np.load(vectors_path)
    corpus_path = work / "corpus.arrow"
    if not corpus_path.is_file():
        write_embeddings(corpus_path, ids, texts, vectors)
    return {"pairs": pairs, "pairs_path": pairs_path, "ids": ids, "texts": texts,
            "vectors": vectors, "corpus_path": corpus_path}


def write_embeddings(path: Path, ids, texts, vectors, chunk: int = 100_000) -> None:
    from vecpipe.cli.models import load_model
    from vecpipe.formats import schema as names

    schema = names.with_meta(pa.schema([("id", pa.string()), ("text", pa.string()),
                                        ("embedding", pa.list_(pa.float32(), vectors.shape[1]))]),
                             load_model(None).metadata())
    with pa.ipc.new_file(str(path), schema) as writer:
        for start in range(0, len(ids), chunk):
            end = start + chunk
            writer.write_batch(pa.record_batch(
                [pa.array(ids[start:end], pa.string()), pa.array(texts[start:end], pa.string()),
                 names.numpy_to_vectors(np.ascontiguousarray(vectors[start:end]))],
                schema=schema))


def st_cache_file(folder: Path, corpus_texts, positives) -> Path:
    """Where mine_hard_negatives looks for cached corpus vectors (its hash rule, 6.2) and the
    corpus order it embeds: the corpus plus the positives, de-duplicated by text."""
    from vecpipe.cli.models import load_model

    order = list(dict.fromkeys(list(corpus_texts) + list(positives)))
    model_name = load_model(None).st.model_card_data.base_model or ""
    digest = hashlib.sha256(repr((model_name, None, None, order)).encode(),
                            usedforsecurity=False).hexdigest()
    return folder / f"corpus_embeddings_{digest}.npy", order


# ---- measuring -----------------------------------------------------------------------------

def measured(command, memory_cap_gb: float | None = None) -> dict:
    """Run a command; its wall time, exit status and peak RSS (this child only)."""
    def cap():
        limit = int(memory_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=cap if memory_cap_gb else None)
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "stderr": stderr.strip().splitlines()[-3:]}


def vecpipe(*args) -> list:
    return [sys.executable, "-m", "vecpipe.cli", "mine-negatives", *map(str, args)]


def peer(config: dict, work: Path, name: str) -> list:
    """The peer's command line; its cached query vectors are removed first, so that it
    embeds the queries as vecpipe does."""
    for cached in Path(config["cache"]).glob("query_embeddings_*.npy"):
        cached.unlink()
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return [sys.executable, __file__, "--peer", str(path)]


def run_peer(config_path: str) -> None:
    """In a child process: sentence-transformers' mine_hard_negatives on the config's data."""
    config = json.loads(Path(config_path).read_text())
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from vecpipe.cli.models import load_model

    pairs = [json.loads(line) for line in open(config["pairs"], encoding="utf-8")]
    corpus = json.loads(Path(config["corpus_texts"]).read_text())
    dataset = Dataset.from_dict({"query": [p["query"] for p in pairs],
                                 "positive": [p["positive"] for p in pairs]})
    start = time.perf_counter()
    mined = mine_hard_negatives(dataset, load_model(None).st, corpus=corpus,
                                cache_folder=config["cache"], verbose=False, batch_size=32,
                                output_scores=True, use_faiss=config.get("faiss", False),
                                **config["options"])
    print(f"peer mined in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if config.get("output"):
        with pa.ipc.new_file(config["output"], mined.data.table.schema) as writer:
            writer.write_table(mined.data.table)


def report(label: str, runs: list) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    summary = {"label": label, "runs": len(runs), "failed": len(runs) - len(ok)}
    if ok:
        summary["wall_s"] = statistics.median(r["wall_s"] for r in ok)
        summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    print(f"{label:58s} " + (f"{summary['wall_s']:8.1f} s {summary['peak_rss_mb']:8.0f} MB"
                             if ok else f"FAILED rc={runs[-1]['rc']}: {runs[-1]['stderr']}"),
          flush=True)
    return summary


# ---- 1. NFCorpus ---------------------------------------------------------------------------

def compare_nfcorpus(nf: dict, work: Path, repeat: int) -> None:
    cache = work / "st-cache-nfcorpus"
    cache.mkdir(exist_ok=True)
    cache_file, order = st_cache_file(cache, nf["texts"], [p["positive"] for p in nf["pairs"]])
    row_of = {t: i for i, t in reversed(list(enumerate(nf["texts"])))}
    np.save(cache_file, nf["vectors"][[row_of[t] for t in order]])
    corpus_texts = work / "nfcorpus-texts.json"
    corpus_texts.write_text(json.dumps(nf["texts"]))
    for options, cli_options in CONFIGS:
        print(f"\nNFCorpus train: {len(nf['pairs']):,} pairs x {len(nf['texts']):,} docs; "
              f"{' '.join(cli_options + COMMON)}", flush=True)
        ours_out, peer_out = work / "ours.arrow", work / "peer.arrow"
        ours, theirs = [], []
        for _ in range(repeat):
            ours.append(measured(vecpipe(nf["pairs_path"], "--corpus", nf["corpus_path"],
                                         *cli_options, *COMMON, "-o", ours_out, "-q")))
            theirs.append(measured(peer({"pairs": str(nf["pairs_path"]),
                                         "corpus_texts": str(corpus_texts), "cache": str(cache),
                                         "output": str(peer_out), "options": options},
                                        work, "peer-nfcorpus")))
        a = report("vecpipe mine-negatives (exact, embeddings Arrow corpus)", ours)
        b = report("sentence-transformers mine_hard_negatives (cached corpus)", theirs)
        print(f"  (peer's own timing: {theirs[-1]['stderr'][-1:]})")
        if len(list(cache.glob("corpus_embeddings_*.npy"))) != 1:
            print("WARNING: the peer re-embedded the corpus (cache name rule changed?)")
        if "wall_s" in a and "wall_s" in b:
            print(f"wall: vecpipe {b['wall_s'] / a['wall_s']:.2f}x the peer's speed; peak RSS "
                  f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x the peer's")
            compare_rows(ours_out, peer_out)


def compare_rows(ours_path: Path, peer_path: Path) -> None:
    """Texts equal and the largest score difference, memory-mapped (the files are GBs)."""
    ours = pa.ipc.open_file(pa.memory_map(str(ours_path))).read_all()
    theirs = pa.ipc.open_file(pa.memory_map(str(peer_path))).read_all()
    same_texts = len(ours) == len(theirs) and all(
        ours.column(c).cast(pa.string()).equals(theirs.column(c).cast(pa.string()))
        for c in ("query", "positive", "negative"))
    gap = float("nan")
    if same_texts:
        mine = ours.column("scores").combine_chunks().flatten().to_numpy()
        peer = theirs.column("scores").combine_chunks().flatten().to_numpy()
        gap = float(np.max(np.abs(mine - peer)))
    print(f"rows: vecpipe {len(ours):,}, peer {len(theirs):,}; texts identical: {same_texts}; "
          f"max score difference {gap:.2e}", flush=True)


# ---- 2. scale ------------------------------------------------------------------------------

def compare_scale(nf: dict, work: Path, size: int, cap_gb: float, exact: bool) -> None:
    index = work / f"idx-{size}"
    texts_path = work / f"synthetic-{size}-texts.json"
    vectors_path = work / f"synthetic-{size}.npy"
    if not index.is_dir():
        ids, texts = synthetic(nf, size, vectors_path)
        texts_path.write_text(json.dumps(texts))
        arrow = work / f"synthetic-{size}.arrow"
        write_embeddings(arrow, ids, texts, np.load(vectors_path, mmap_mode="r"))
        built = measured([sys.executable, "-m", "vecpipe.cli", "index", str(arrow), "-o",
                          str(index), "--fields", "text", "-q"])
        report(f"vecpipe index ({size:,} x 384 f32, --fields text)", [built])
        arrow.unlink()
    cache = work / f"st-cache-{size}"
    cache.mkdir(exist_ok=True)
    texts = json.loads(texts_path.read_text())
    cache_file, order = st_cache_file(cache, texts, [p["positive"] for p in nf["pairs"]])
    if not cache_file.exists():  # its corpus order: first occurrences of each text
        first = {}
        for row, text in enumerate(texts):
            first.setdefault(text, row)
        rows = np.array([first[t] for t in order])
        vectors = np.load(vectors_path, mmap_mode="r")
        cached = np.lib.format.open_memmap(cache_file, mode="w+", dtype=np.float32,
                                           shape=(len(rows), vectors.shape[1]))
        for start in range(0, len(rows), 100_000):
            cached[start:start + 100_000] = vectors[rows[start:start + 100_000]]
        cached.flush()
        del cached
    for number, (options, cli_options) in enumerate(CONFIGS):
        print(f"\nsynthetic {size:,}-passage corpus, NFCorpus train pairs, "
              f"{' '.join(cli_options + COMMON)}", flush=True)
        ours_out = work / f"ours-scale-{number}.arrow"
        ours = measured(vecpipe(nf["pairs_path"], "--corpus", index, *cli_options, *COMMON,
                                "-o", ours_out, "-q"))
        report("vecpipe mine-negatives (HNSW index folder)", [ours])
        outputs = [ours_out]
        if exact:
            outputs.append(work / f"ours-scale-{number}-exact.arrow")
            report("vecpipe mine-negatives --exact (brute force in the index)", [measured(
                vecpipe(nf["pairs_path"], "--corpus", index, "--exact", *cli_options, *COMMON,
                        "-o", outputs[-1], "-q"))])
        config = {"pairs": str(nf["pairs_path"]), "corpus_texts": str(texts_path),
                  "cache": str(cache), "options": options}
        if number == 0:
            capped = measured(peer(config, work, "peer-scale"), memory_cap_gb=cap_gb)
            report(f"sentence-transformers default (exact torch), {cap_gb:g} GB address cap",
                   [capped])
        peer_out = work / f"peer-scale-{number}.arrow"
        flat = measured(peer({**config, "faiss": True, "output": str(peer_out)}, work,
                             "peer-scale-faiss"))
        report("sentence-transformers use_faiss=True (exact IndexFlatIP)", [flat])
        if flat["rc"] == 0:
            for path in outputs:
                overlap(path, peer_out)


def overlap(ours_path: Path, peer_path: Path) -> None:
    """How many of the peer's (query, negative) pairs we found too."""
    def pairs(path):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        return set(zip(table.column("query").to_pylist(), table.column("negative").to_pylist()))

    ours, theirs = pairs(ours_path), pairs(peer_path)
    print(f"{ours_path.name}: {len(ours):,} (query, negative) pairs, peer {len(theirs):,}, "
          f"shared {len(ours & theirs):,} ({len(ours & theirs) / max(len(theirs), 1):.1%} of "
          "the peer's)", flush=True)


def synthetic(nf: dict, size: int, vectors_path: Path):
    """The NFCorpus docs first (so the pairs' positives exist), then perturbed copies."""
    base = nf["vectors"]
    rng = np.random.default_rng(0)
    vectors = np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float32,
                                        shape=(size, base.shape[1]))
    vectors[:len(base)] = base
    ids, texts = list(nf["ids"]), list(nf["texts"])
    step = 100_000
    for start in range(len(base), size, step):
        end = min(start + step, size)
        source = rng.integers(0, len(base), end - start)
        block = base[source] + rng.standard_normal((end - start, base.shape[1]),
                                                   dtype=np.float32) * 0.04
        vectors[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
        ids += [f"syn-{i}" for i in range(start, end)]
        texts += [f"synthetic passage {i}, a variant of {nf['ids'][s]}"
                  for i, s in zip(range(start, end), source)]
    vectors.flush()
    return ids, texts


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer":
        run_peer(sys.argv[2])
    else:
        main()
