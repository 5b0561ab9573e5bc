"""The README's mine -> train -> soup -> eval Makefile on NFCorpus, timed: hard negatives mined on
the train split, a short fine-tune of the bundled model (the dev split picks the checkpoint), the
base + fine-tuned soup, and nDCG@10 on the test split for base, fine-tuned and soup.

    .venv/bin/python bench/train_nfcorpus.py --work /tmp/train-nf --steps 100
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_line  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"
VECPIPE = [sys.executable, "-m", "vecpipe.cli"]


def timed(args: list, stdout=None) -> float:
    """Run one vecpipe command; its wall seconds."""
    print("$ vecpipe " + " ".join(map(str, args)), flush=True)
    started = time.perf_counter()
    subprocess.run([*VECPIPE, *map(str, args)], check=True, stdout=stdout)
    return time.perf_counter() - started


def evaluate(data: Path, model: str, report: Path) -> tuple[dict, float]:
    with open(report, "w") as out:
        seconds = timed(["eval", "beir", data, "-m", model, "--output-format", "json"], out)
    [record] = json.loads(report.read_text())
    return record, seconds


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--negatives", type=int, default=1, help="mine-negatives -n")
    parser.add_argument("--range-min", type=int, default=0)
    parser.add_argument("--relative-margin", type=float, default=0.05)
    parser.add_argument("--loss", default="mnrl")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--extra", default="", help="more train options, as one string")
    return parser.parse_args()


def main() -> None:
    print(machine_line(), flush=True)
    a = parse()
    a.work.mkdir(parents=True, exist_ok=True)
    triplets, model, soup = a.work / "triplets.parquet", a.work / "model", a.work / "soup"
    rows = []
    if not triplets.exists():
        seconds = timed(["mine-negatives", "--beir", a.data, "--split", "train",
                         "--relative-margin", a.relative_margin, "--range-min", a.range_min,
                         "-n", a.negatives, "--save-stats", a.work / "mine-stats.json",
                         "-q", "-o", triplets])
        rows.append(("mine-negatives (train split)", "", seconds, None))
    seconds = timed(["train", triplets, "-o", model, "--loss", a.loss, "--max-steps", a.steps,
                     "--batch-size", a.batch_size, "--max-length", a.max_length,
                     "--learning-rate", a.learning_rate, "--eval-beir", a.data, "--split",
                     "dev", "--eval-steps", a.eval_steps, "--precision", a.precision,
                     *a.extra.split()])
    recipe = json.loads((model / "vecpipe-train.json").read_text())
    rows.append((f"train ({a.loss}, dev split picks the checkpoint)", recipe["steps"], seconds,
                 None))
    seconds = timed(["merge", "--models", "default", model, "--weights", "0.5,0.5", "-q",
                     "-o", soup])
    rows.append(("merge --models default model --weights 0.5,0.5", "", seconds, None))
    for name, spec in (("base (bundled all-MiniLM-L6-v2)", "default"), ("fine-tuned", model),
                       ("soup of base and fine-tuned", soup)):
        record, seconds = evaluate(a.data, str(spec), a.work / f"{Path(str(spec)).name}.json")
        rows.append((f"eval beir test: {name}", "", seconds, record))
    print(f"\ndev curve: {json.dumps(recipe.get('eval_curve'))}")
    print(f"best: {json.dumps(recipe.get('best'))}; loss {recipe['loss_curve'][0]['loss']:.3f}"
          f" -> {recipe['loss_curve'][-1]['loss']:.3f}\n")
    print("| step | steps | wall s | nDCG@10 (test) | recall@100 |")
    print("|---|---:|---:|---:|---:|")
    for name, steps, seconds, record in rows:
        ndcg = f"{record['ndcg_at_10']:.4f}" if record else ""
        recall = f"{record['recall_at_100']:.4f}" if record else ""
        print(f"| {name} | {steps} | {seconds:.0f} | {ndcg} | {recall} |")


if __name__ == "__main__":
    main()
