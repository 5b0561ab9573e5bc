"""Benchmark `vecpipe embed` against plain sentence-transformers on BEIR NFCorpus (title + text).

1. Throughput, torch backend: `vecpipe embed --text-field title --text-field text` reading the corpus JSONL
   on stdin and writing Arrow to /dev/null (a subprocess, as a user runs it) vs.
   `SentenceTransformer.encode` of the same texts in one in-memory call in this process; same
   model, batch size and device. Runs alternate (ST, vecpipe, ST, vecpipe...) so machine load hits
   both alike; medians and their ratio. The subprocess pays interpreter start-up and model
   loading, which encode's timing does not; that fixed cost is measured on a one-record input and
   reported, with the ratio both with and without it.
2. Exported CPU backends (onnx, onnx-int8, openvino when installed): same pipeline timed against
   the same ST baseline; quality cost as mean/min cosine to the float32 sentence-transformers
   vectors and the NFCorpus nDCG@10 change (test qrels; brute-force cosine top 10, queries embedded
   with the same backend; pytrec_eval ndcg_cut_10). These runs write Arrow to a temporary file
   (read back for the quality numbers) instead of /dev/null.
3. Peak RSS of the torch run (os.wait4's ru_maxrss) for the first 1/10 of the corpus vs. the
   whole corpus (10x the input).
4. `--first-output N` (instead of 1-3): time to the first output record and to the end of a
   `vecpipe embed FILE --output-format jsonl | reader` run over N records (NFCorpus, then its
   documents again with the title moved after the text, new ids: distinct texts, similar
   lengths), growing windows (today's) vs one fixed window of --window records from the start
   (the old pipeline: the same command with core.embedding.FIRST_WINDOW set to the window),
   run alternately; medians. Also the padded tokens each schedule's length-sorted batches
   feed the model (tokenizer only), the cost that larger windows cut.

    .venv/bin/python bench/embed.py [--data ../shared/data/nfcorpus] [--repeats 3]
        [--backends onnx,onnx-int8,openvino] [--backend-repeats 1] [--batch-size 32]
        [--device cpu] [--limit N]
    .venv/bin/python bench/embed.py --first-output 5000 [--repeats 3] [--window 4096]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--repeats", type=int, default=3, help="runs of the torch comparison")
    parser.add_argument("--backend-repeats", type=int, default=1)
    parser.add_argument("--backends", default="onnx,onnx-int8,openvino",
                        help="comma-separated exported backends to compare ('' for none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--first-output", type=int, default=None, metavar="N",
                        help="time the first output of growing vs fixed windows on N records")
    parser.add_argument("--window", type=int, default=4096, help="the largest window")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    if args.first_output:
        with tempfile.TemporaryDirectory(prefix="vecpipe-bench-first-") as tmp:
            first_output(Path(args.data), args, Path(tmp))
        return

    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="vecpipe-bench-embed-") as tmp:
        corpus_path = Path(tmp) / "corpus.jsonl"
        docs = read_jsonl(data / "corpus.jsonl")[:args.limit]
        corpus_path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
        texts = [" ".join(p for p in (d.get("title"), d.get("text")) if p) for d in docs]
        print(f"corpus: {len(texts)} NFCorpus documents (title + text), batch {args.batch_size}, "
              f"device {args.device}\n")
        st = load_st(args.device)
        reference = st.encode(texts[:64], batch_size=args.batch_size)  # warm-up
        reference, st_times, vp_times = throughput(st, texts, corpus_path, args)
        startup = run_embed(first_lines(corpus_path, 1, tmp), args)[0]
        report_throughput(len(texts), st_times, vp_times, startup)
        backends = [b for b in args.backends.split(",") if b]
        if backends:
            compare_backends(backends, st, reference, texts, docs, corpus_path, data, args,
                             st_times, startup, tmp)
        if not args.skip_rss:
            report_rss(corpus_path, len(texts), args, tmp)


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def first_lines(path: Path, count: int, tmp: str) -> Path:
    out = Path(tmp) / f"first{count}.jsonl"
    with open(path, "rb") as src:
        out.write_bytes(b"".join(line for _, line in zip(range(count), src)))
    return out


def load_st(device: str):
    from sentence_transformers import SentenceTransformer

    from vecpipe.cli.models import bundled_model_path

    return SentenceTransformer(bundled_model_path(), device=device)


def embed_cmd(args, extra=()):
    return [sys.executable, "-m", "vecpipe.cli", "embed", "--text-field", "title",
            "--text-field", "text", "--batch-size", str(args.batch_size), "--device", args.device,
            "-q", *extra]


def run_embed(input_path: Path, args, extra=(), output=None):
    """(seconds, peak RSS KiB) of one `vecpipe embed` subprocess reading `input_path` on stdin."""
    out_args = ["-o", str(output)] if output else ["--output-format", "arrow"]
    with open(input_path, "rb") as stdin, open(os.devnull, "wb") as devnull:
        start = time.perf_counter()
        proc = subprocess.Popen(embed_cmd(args, [*extra, *out_args]), stdin=stdin,
                                stdout=devnull)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"vecpipe embed failed with exit {proc.returncode}")
    return seconds, usage.ru_maxrss


def throughput(st, texts, corpus_path, args):
    st_times, vp_times, vectors = [], [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        vectors = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        st_times.append(time.perf_counter() - start)
        vp_times.append(run_embed(corpus_path, args)[0])
        print(f"  run: ST {st_times[-1]:.1f} s, vecpipe {vp_times[-1]:.1f} s", flush=True)
    return np.asarray(vectors, dtype=np.float32), st_times, vp_times


def report_throughput(count, st_times, vp_times, startup):
    st_s, vp_s = statistics.median(st_times), statistics.median(vp_times)
    print("\n| pipeline (torch, CPU) | seconds (median) | docs/s | vs ST encode |")
    print("|---|---|---|---|")
    print(f"| SentenceTransformer.encode, one in-memory call | {st_s:.1f} | {count / st_s:.1f} "
          f"| 1.00x |")
    print(f"| vecpipe embed < corpus.jsonl > /dev/null (Arrow), end to end | {vp_s:.1f} | "
          f"{count / vp_s:.1f} | {st_s / vp_s:.2f}x |")
    net = max(vp_s - startup, 1e-9)
    print(f"| same, less the fixed start-up ({startup:.1f} s: interpreter, imports, model "
          f"load; measured on 1 record) | {net:.1f} | {count / net:.1f} | {st_s / net:.2f}x |")
    print()


def compare_backends(backends, st, reference, texts, docs, corpus_path, data, args, st_times,
                     startup, tmp):
    queries, qrels = test_queries(data, {d["_id"] for d in docs})
    doc_ids = [d["_id"] for d in docs]
    query_texts = list(queries.values())
    base_q = st.encode(query_texts, batch_size=args.batch_size, normalize_embeddings=True)
    base_ndcg = ndcg_at_10(reference, np.asarray(base_q), doc_ids, list(queries), qrels)
    st_s = statistics.median(st_times)
    rows = [f"| sentence-transformers torch float32 | {st_s:.1f} | {len(texts) / st_s:.1f} | "
            f"1.00x | 1.0000 | 1.0000 | {base_ndcg:.4f} | 0 |"]
    from vecpipe.cli.models import load_model

    for backend in backends:
        try:
            load_model(None, device="cpu", backend=backend)  # export once, outside the timing
        except Exception as err:  # noqa: BLE001 - report and go on with the other backends
            print(f"backend {backend}: unavailable ({err})")
            continue
        out = Path(tmp) / f"{backend}.arrow"
        seconds = statistics.median(run_embed(corpus_path, args, ["--backend", backend], out)[0]
                                    for _ in range(args.backend_repeats))
        got = read_vectors(out)
        cosines = (got * reference).sum(axis=1)
        model = load_model(None, device="cpu", backend=backend)
        queries_vec = model.encode(query_texts, batch_size=args.batch_size)
        ndcg = ndcg_at_10(got, queries_vec, doc_ids, list(queries), qrels)
        rows.append(f"| vecpipe embed --backend {backend} | {seconds:.1f} | "
                    f"{len(texts) / seconds:.1f} | {st_s / seconds:.2f}x "
                    f"({st_s / max(seconds - startup, 1e-9):.2f}x less start-up) | "
                    f"{cosines.mean():.4f} | {cosines.min():.4f} | {ndcg:.4f} | "
                    f"{ndcg - base_ndcg:+.4f} |")
        print(f"  {backend}: {seconds:.1f} s", flush=True)
    print(f"\nqueries: {len(queries)} NFCorpus test queries with qrels\n")
    print("| backend | seconds | docs/s | vs ST encode | mean cos to fp32 | min cos | "
          "nDCG@10 | change |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()


def read_vectors(path: Path) -> np.ndarray:
    from vecpipe.formats import schema as names

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    return names.vectors_to_numpy(table.column("embedding")).astype(np.float32)


def test_queries(data: Path, doc_ids: set[str]):
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if doc_id in doc_ids:
            qrels.setdefault(query_id, {})[doc_id] = int(score)
    queries = {q["_id"]: q["text"] for q in read_jsonl(data / "queries.jsonl")
               if q["_id"] in qrels}
    return queries, qrels


def ndcg_at_10(doc_vectors, query_vectors, doc_ids, query_ids, qrels) -> float:
    """Mean nDCG@10 (pytrec_eval) of brute-force cosine top-10 search."""
    import pytrec_eval

    docs = doc_vectors / np.linalg.norm(doc_vectors, axis=1, keepdims=True)
    queries = query_vectors / np.linalg.norm(query_vectors, axis=1, keepdims=True)
    scores = queries @ docs.T
    run = {}
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-scores[row])[:K]
        run[query_id] = {doc_ids[i]: float(scores[row, i]) for i in top}
    evaluator = pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in query_ids},
                                               {"ndcg_cut_10"})
    per_query = evaluator.evaluate(run)
    return float(np.mean([m["ndcg_cut_10"] for m in per_query.values()]))


def long_corpus(data: Path, count: int, out: Path) -> list[str]:
    """`count` records: the corpus, then its documents again (title after the text, ids with a
    suffix) as often as needed; returns the texts embed joins (title + text)."""
    docs = read_jsonl(data / "corpus.jsonl")
    records, copy = [], 0
    while len(records) < count:
        for doc in docs[:count - len(records)]:
            if copy:
                doc = {"_id": f"{doc['_id']}-{copy}", "title": doc.get("text"),
                       "text": doc.get("title")}
            records.append(doc)
        copy += 1
    out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return [" ".join(p for p in (r.get("title"), r.get("text")) if p) for r in records]


def timed_first_output(corpus: Path, args, first_window: int) -> tuple[float, float, int]:
    """(seconds to the first output line, seconds to the end, lines) of one embed run whose
    first window is `first_window` records (core.embedding.FIRST_WINDOW)."""
    code = ("import sys\nimport vecpipe.core.embedding as e\ne.FIRST_WINDOW = int(sys.argv[1])\n"
            "sys.argv = ['vecpipe', *sys.argv[2:]]\nfrom vecpipe.cli import main\nmain()\n")
    command = [sys.executable, "-c", code, str(first_window),
               *embed_cmd(args, [str(corpus), "--window", str(args.window),
                                 "--output-format", "jsonl"])[3:]]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = proc.stdout.readline()
    first_s = time.perf_counter() - start
    lines = 1 if first else 0
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):
        lines += block.count(b"\n")
    total_s = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"vecpipe embed failed with exit {proc.returncode}")
    return first_s, total_s, lines


def padded_tokens(texts: list[str], sizes, batch_size: int) -> tuple[int, int]:
    """(tokens the model is fed, tokens of the texts themselves) when windows of `sizes` are
    each sorted by length and cut into batches padded to their longest text."""
    from vecpipe.cli.models import load_model

    model = load_model(None, device="cpu")
    lengths = [len(ids) for ids in model.st.tokenizer(
        texts, truncation=True, max_length=model.max_length)["input_ids"]]
    fed, start = 0, 0
    while start < len(lengths):
        size = next(sizes)
        window = sorted(lengths[start:start + size], reverse=True)
        fed += sum(window[i] * len(window[i:i + batch_size])
                   for i in range(0, len(window), batch_size))
        start += size
    return fed, sum(lengths)


def first_output(data: Path, args, tmp: Path) -> None:
    from vecpipe.core import embedding

    corpus = tmp / "long.jsonl"
    texts = long_corpus(data, args.first_output, corpus)
    print(f"corpus: {len(texts)} records (NFCorpus title + text, then its documents again "
          f"with the title last), batch {args.batch_size}, device {args.device}, largest "
          f"window {args.window}\n", flush=True)
    arms = {"fixed": args.window, "growing": embedding.FIRST_WINDOW}
    times: dict[str, list] = {arm: [] for arm in arms}
    for run in range(args.repeats):
        for arm, first_window in arms.items():
            first_s, total_s, lines = timed_first_output(corpus, args, first_window)
            if lines != len(texts):
                raise SystemExit(f"{arm}: {lines} output lines for {len(texts)} records")
            times[arm].append((first_s, total_s))
            print(f"  run {run + 1} {arm}: first record {first_s:.1f} s, all {total_s:.1f} s "
                  f"({len(texts) / total_s:.1f} rec/s)", flush=True)
    print("\n| windows | first record, s (median) | all records, s (median) | rec/s | "
          "vs fixed | padded tokens fed |")
    print("|---|---:|---:|---:|---:|---:|")
    fixed_total = statistics.median(t for _, t in times["fixed"]) if args.repeats else None
    for arm, first_window in arms.items():
        sizes = embedding.window_sizes(args.window, args.batch_size) if arm == "growing" \
            else iter(lambda: args.window, None)
        fed, real = padded_tokens(texts, sizes, args.batch_size)
        label = f"fixed {args.window}" if arm == "fixed" else \
            f"growing {first_window} x{embedding.WINDOW_GROWTH} to {args.window}"
        padding = f"{fed} ({fed / real:.3f}x the {real} text tokens)"
        if not args.repeats:  # --repeats 0: the padding only
            print(f"| {label} | | | | | {padding} |")
            continue
        first_s = statistics.median(f for f, _ in times[arm])
        total_s = statistics.median(t for _, t in times[arm])
        print(f"| {label} | {first_s:.1f} ({', '.join(f'{f:.1f}' for f, _ in times[arm])}) | "
              f"{total_s:.1f} ({', '.join(f'{t:.1f}' for _, t in times[arm])}) | "
              f"{len(texts) / total_s:.1f} | {fixed_total / total_s:.3f}x | {padding} |")
    print()


def report_rss(corpus_path: Path, count: int, args, tmp: str) -> None:
    tenth = first_lines(corpus_path, max(1, count // 10), tmp)
    small_s, small = run_embed(tenth, args)
    full_s, full = run_embed(corpus_path, args)
    print("| input | seconds | peak RSS |")
    print("|---|---|---|")
    print(f"| {max(1, count // 10)} documents | {small_s:.1f} | {small / 1024:.0f} MiB |")
    print(f"| {count} documents (10x) | {full_s:.1f} | {full / 1024:.0f} MiB |")
    print()


if __name__ == "__main__":
    main()
