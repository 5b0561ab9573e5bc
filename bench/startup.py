"""Start-up cost of the CLI: `vecpipe --help` (and light commands) vs a bare interpreter.

    .venv/bin/python bench/startup.py [--runs 20]

Prints median wall time per command over N runs, measured in this one session, with the bare
`python -c pass` start as the baseline.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "vecpipe --help": [sys.executable, "-m", "vecpipe.cli", "--help"],
    "vecpipe --version": [sys.executable, "-m", "vecpipe.cli", "--version"],
    "vecpipe info small.jsonl": [sys.executable, "-m", "vecpipe.cli", "info", "{small}"],
    "vecpipe convert small.jsonl": [sys.executable, "-m", "vecpipe.cli", "convert", "{small}",
                                    "-q"],
}


def median_seconds(argv, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        small = os.path.join(tmp, "small.jsonl")
        with open(small, "w") as f:
            f.write('{"id": "1", "text": "hello"}\n')
        print(f"# {args.runs} runs each, load average {os.getloadavg()[0]:.2f}")
        print("| command | median s |\n|---|---|")
        for label, argv in COMMANDS.items():
            argv = [a.format(small=small) for a in argv]
            print(f"| {label} | {median_seconds(argv, args.runs):.3f} |")


if __name__ == "__main__":
    main()
