"""Model soup sweep: the bundled all-MiniLM-L6-v2 merged with a copy briefly fine-tuned on
NFCorpus train pairs, scored on the NFCorpus test split at several weights.

Steps, each through the real CLI where one exists:
  1. `vecpipe mine-negatives --beir DATA --split train -n 1` -> (anchor, positive, negative)
     triplets mined with the bundled model.
  2. Fine-tune a copy of the bundled model for --steps steps with sentence-transformers'
     MultipleNegativesRankingLoss (in-batch + the mined hard negative; each batch holds distinct
     queries), AdamW, linear warm-up/decay, on the CPU; saved with SentenceTransformer.save.
  3. For each weight w of the fine-tuned model: `vecpipe merge --models default TUNED
     --weights 1-w,w [--method M] -o SOUP` and `vecpipe eval beir DATA -m SOUP --split test`.
     w = 0 is the base model and w = 1 the fine-tuned one (merge reproduces them exactly).

    .venv/bin/python bench/model_soup.py [--data ../shared/data/nfcorpus] [--work DIR]
        [--steps 40] [--batch-size 16] [--max-length 64] [--lr 5e-5]
        [--weights 0,0.25,0.5,0.75,1]
        [--method linear]

Prints a Markdown table (nDCG@10, recall@100 per weight) and the time of every step; the raw
numbers go to WORK/results.json. Mining and fine-tuning are skipped when their outputs exist.

--self-positioning: Self Positioning (Li et al. 2024) in its grid form instead of the sweep.
A second copy is fine-tuned the same way with --seed + 1 (another data order); a probe BEIR
folder is cut from the dev split (--probe-queries random dev queries with at most 20 judged
documents each, their judged documents and --probe-distractors other documents);
`vecpipe merge --models TUNED TUNED-B --base default --search-weights --probe PROBE --weight-grid G`
picks the task-vector weights, and the test split scores the base, both fine-tunes, their
plain average and the chosen soup (--ties-dare: also TIES and DARE at the chosen weights;
WORK/self-positioning.json);
--sgd-steps N adds the paper's SGD from 0.5,0.5 (`--weight-grid 0.5 --sgd-steps N`). Done steps are
skipped on a rerun (test scores cached in WORK/test-scores.json).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
VECPIPE = [sys.executable, "-m", "vecpipe.cli"]


def main() -> None:
    args = parse_args()
    print(machine_line(), flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    triplets = work / "triplets.jsonl"
    if not triplets.exists():
        timings["mine"] = timed(lambda: vecpipe(
            "mine-negatives", "--beir", args.data, "--split", "train", "-n", "1",
            "--shape", "triplet", "-o", triplets))
    tuned = work / "tuned"
    if not (tuned / "config.json").exists():
        timings["fine-tune"] = timed(lambda: fine_tune(triplets, tuned, args))
    if args.self_positioning:
        self_positioning(args, work, triplets, tuned, timings)
        return
    rows = []
    for weight in args.weights:
        soup = work / f"soup-{weight:g}"
        merge_s = timed(lambda: vecpipe(
            "merge", "--models", "default", tuned, "--weights", f"{1 - weight:g},{weight:g}",
            "--method", args.method, "-o", soup, "-q"))
        started = time.perf_counter()
        report = json.loads(vecpipe("eval", "beir", args.data, "-m", soup, "--split", "test",
                                    "--metrics", "ndcg,recall", "--cutoffs", "10,100",
                                    "--output-format", "jsonl", "-q").splitlines()[-1])
        rows.append({"weight": weight, "ndcg@10": report["ndcg_at_10"],
                     "recall@100": report["recall_at_100"], "merge_s": merge_s,
                     "eval_s": time.perf_counter() - started})
        print(f"w={weight:g}: nDCG@10 {report['ndcg_at_10']:.4f}, recall@100 "
              f"{report['recall_at_100']:.4f} ({rows[-1]['eval_s']:.0f} s)", file=sys.stderr,
              flush=True)
        results = {"args": vars(args), "timings_s": timings,
                   "rows": sorted(rows, key=lambda row: row["weight"]),
                   "load": os.getloadavg(), "cpus": os.cpu_count()}
        (work / "results.json").write_text(json.dumps(results, indent=2))  # kept per weight
    print_table(results)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"))
    parser.add_argument("--work", default="/tmp/vecpipe-bench-soup")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64,
                        help="token window while training (the saved model keeps its own)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=lambda s: [float(w) for w in s.split(",")],
                        default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--method", default="linear", choices=["linear", "slerp"])
    parser.add_argument("--self-positioning", action="store_true")
    parser.add_argument("--grid", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--probe-queries", type=int, default=40)
    parser.add_argument("--probe-distractors", type=int, default=150)
    parser.add_argument("--ties-dare", action="store_true",
                        help="with --self-positioning: also TIES and DARE at the chosen weights")
    parser.add_argument("--sgd-steps", type=int, default=0,
                        help="with --self-positioning: also SGD from 0.5,0.5 for N steps")
    return parser.parse_args()


def self_positioning(args, work: Path, triplets: Path, tuned: Path, timings: dict) -> None:
    tuned_b = work / "tuned-b"
    if not (tuned_b / "config.json").exists():
        other = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
        timings["fine-tune-b"] = timed(lambda: fine_tune(triplets, tuned_b, other))
    probe = work / "probe"
    if not (probe / "corpus.jsonl").exists():
        make_probe(Path(args.data), probe, args.probe_queries, args.probe_distractors,
                   args.seed)
    soup = work / "soup-searched"
    recipe = searched_soup(soup, [tuned, tuned_b], probe, args.grid, [], timings, "search")
    chosen = ",".join(f"{w:g}" for w in recipe["weights"])
    models = {"base (bundled)": "default", "tuned (seed 0)": tuned,
              "tuned-b (seed 1)": tuned_b, "searched soup": soup}
    variants = [("average 0.5,0.5", ["--weights", "0.5,0.5"])]
    if args.ties_dare:
        variants += [(f"ties {chosen}", ["--weights", chosen, "--method", "ties"]),
                     (f"dare {chosen}", ["--weights", chosen, "--method", "dare"])]
    for name, extra in variants:
        folder = work / ("soup-" + name.split()[0])
        if not (folder / "vecpipe-merge.json").exists():
            vecpipe("merge", "--models", tuned, tuned_b, "--base", "default", *extra, "-o",
                    folder, "-q")
        models[name] = folder
    sgd = None
    if args.sgd_steps:
        sgd = searched_soup(work / "soup-sgd", [tuned, tuned_b], probe, "0.5",
                            ["--sgd-steps", str(args.sgd_steps)], timings, "sgd search")
        models[f"sgd {args.sgd_steps} steps from 0.5,0.5"] = work / "soup-sgd"
    cached = work / "test-scores.json"
    scores = json.loads(cached.read_text()) if cached.exists() else {}
    for name, model in models.items():
        if name not in scores:
            scores[name] = test_scores(args, name, model)
            cached.write_text(json.dumps(scores, indent=2))
    results = {"args": vars(args), "timings_s": timings, "search": recipe["search"],
               "weights": recipe["weights"], "sgd": sgd and sgd["search"].get("sgd"),
               "rows": [scores[name] for name in models], "load": os.getloadavg(),
               "cpus": os.cpu_count()}
    (work / "self-positioning.json").write_text(json.dumps(results, indent=2))
    print_search(results)


def searched_soup(soup: Path, tuned, probe: Path, grid: str, extra, timings, step) -> dict:
    """`merge --search-weights` into `soup` (skipped when done); its recipe."""
    if not (soup / "vecpipe-merge.json").exists():
        started = time.perf_counter()
        out = subprocess.run([*VECPIPE, "merge", "--models", *map(str, tuned), "--base",
                              "default", "--search-weights", "--probe", str(probe), "--weight-grid",
                              grid, *extra, "-o", str(soup)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"vecpipe merge failed:\n{out.stderr}")
        timings[step] = round(time.perf_counter() - started, 1)
        print(out.stderr, file=sys.stderr, flush=True)
    return json.loads((soup / "vecpipe-merge.json").read_text())


def make_probe(data: Path, target: Path, count: int, distractors: int, seed: int) -> None:
    """A small BEIR folder: `count` random dev queries (<= 20 judged documents each), their
    judged documents, `distractors` random other documents; judged as dev."""
    judged: dict[str, dict[str, str]] = {}
    for line in (data / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        judged.setdefault(qid, {})[doc] = score
    rng = random.Random(seed)
    chosen = rng.sample(sorted(q for q, docs in judged.items() if len(docs) <= 20), count)
    wanted = {doc for qid in chosen for doc in judged[qid]}
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    others = [row["_id"] for row in corpus if row["_id"] not in wanted]
    wanted |= set(rng.sample(others, distractors))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with open(target / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in corpus if row["_id"] in wanted)
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines()]
    with open(target / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in queries if row["_id"] in set(chosen))
    (target / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{qid}\t{doc}\t{score}\n" for qid in chosen for doc, score in judged[qid].items()))


def test_scores(args, name: str, model) -> dict:
    started = time.perf_counter()
    report = json.loads(vecpipe("eval", "beir", args.data, "-m", model, "--split", "test",
                                "--metrics", "ndcg,recall", "--cutoffs", "10,100",
                                "--output-format", "jsonl", "-q").splitlines()[-1])
    row = {"model": name, "ndcg@10": report["ndcg_at_10"],
           "recall@100": report["recall_at_100"], "eval_s": round(time.perf_counter() - started)}
    print(f"{name}: nDCG@10 {row['ndcg@10']:.4f} ({row['eval_s']} s)", file=sys.stderr,
          flush=True)
    return row


def print_search(results: dict) -> None:
    search = results["search"]
    print(f"probe {search['probe']} ({search['split']}), {search['metric']}:\n")
    print("| weights (tuned, tuned-b) | probe nDCG@10 |\n|---|---|")
    for row in search["table"]:
        print(f"| {','.join(f'{w:g}' for w in row['weights'])} | {row[search['metric']]:.4f} |")
    print("\n| model (NFCorpus test) | nDCG@10 | recall@100 |\n|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['model']} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} |")
    if results.get("sgd"):
        sgd = results["sgd"]
        print(f"\nSGD from {sgd['start']}: weights {[round(w, 4) for w in sgd['weights']]}, "
              f"probe {search['metric']} {sgd[search['metric']]:.4f}, loss "
              f"{sgd['losses'][0]:.4f} -> {sgd['losses'][-1]:.4f}")
    print(f"\ntimings (s): {results['timings_s']}; load average {results['load'][0]:.1f} on "
          f"{results['cpus']} CPUs")


def vecpipe(*args) -> str:
    out = subprocess.run([*VECPIPE, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"vecpipe {args[0]} failed:\n{out.stderr}")
    return out.stdout


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return round(time.perf_counter() - started, 1)


def training_batches(triplets: Path, steps: int, batch_size: int, seed: int):
    """`steps` batches of (anchor, positive, negative) with distinct anchors in each batch, so
    in-batch negatives are never another copy of the anchor's own positives."""
    by_query: dict[str, list[tuple[str, str, str]]] = {}
    with open(triplets, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            anchor = row["anchor"] if "anchor" in row else row["query"]
            by_query.setdefault(anchor, []).append((anchor, row["positive"], row["negative"]))
    rng = random.Random(seed)
    queries = sorted(by_query)
    batches = []
    while len(batches) < steps:
        rng.shuffle(queries)
        for start in range(0, len(queries) - batch_size + 1, batch_size):
            batches.append([rng.choice(by_query[q]) for q in queries[start:start + batch_size]])
            if len(batches) == steps:
                break
    return batches


def fine_tune(triplets: Path, target: Path, args) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from vecpipe.cli.models import bundled_model_path

    torch.manual_seed(args.seed)
    model = SentenceTransformer(bundled_model_path(), device="cpu")
    saved_length = model.max_seq_length
    model.max_seq_length = args.max_length
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup,
                                    max(0.0, (args.steps - step) / (args.steps - warmup))))
    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(training_batches(triplets, args.steps, args.batch_size,
                                                  args.seed)):
        features = [model.preprocess([row[column] for row in batch]) for column in range(3)]
        loss = loss_fn(features, None)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    model.max_seq_length = saved_length
    model.save(str(target))


def print_table(results: dict) -> None:
    args, timings = results["args"], results["timings_s"]
    print(f"| weight of fine-tuned ({args['method']}) | nDCG@10 | recall@100 |")
    print("|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['weight']:g} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} |")
    evals = [row["eval_s"] for row in results["rows"]]
    merges = [row["merge_s"] for row in results["rows"]]
    print(f"\nsteps {args['steps']} x batch {args['batch_size']} (max length "
          f"{args['max_length']}, lr {args['lr']}); timings (s): "
          + ", ".join(f"{k} {v}" for k, v in timings.items())
          + f", merge median {sorted(merges)[len(merges) // 2]:.1f}, eval beir median "
          f"{sorted(evals)[len(evals) // 2]:.1f}; load average {results['load'][0]:.1f} on "
          f"{results['cpus']} CPUs")


if __name__ == "__main__":
    main()
