"""Start-up cost of the CLI: `vecpipe --help` (and light commands, and a one-record embed) vs a
bare interpreter, and with --index a text query, `vecpipe search IDX --query TEXT -k 10`, end to
end and by stage: the default (`--backend auto`: the numpy runtime, core/bert_encoder.py) and
`--backend torch` side by side, alternating run by run.

    .venv/bin/python bench/startup.py [--runs 20]
    .venv/bin/python bench/startup.py --index IDX --runs 7 [--base DIR] [--only-search]
                                      [--no-stages]

Prints median wall time per command over N runs, measured in this one session, with the bare
`python -c pass` start as the baseline; with CPU seconds (user+sys of the child) beside, since
the shared machine's load inflates wall time. `--base DIR`: also run every command with
PYTHONPATH=DIR, a folder holding `vecpipe/{cli,commands,core,formats}` of the code before a
change (e.g. links into a `git worktree` of HEAD), alternating run by run with the current code.
`--index` adds the stage breakdown of each backend (in-process, current code, sequential:
nothing overlapped): imports, index open, model load, first encode, search, output, medians over
the runs.

An index to try: `vecpipe embed corpus.jsonl --text-field title --text-field text -o c.arrow`
then `vecpipe index c.arrow -o IDX --fields title` (NFCorpus: 3,633 records).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from machine import machine_line  # bench/machine.py: run as a script, bench/ is on sys.path

QUERY = "vitamin D and bone loss"
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "vecpipe --help": [sys.executable, "-m", "vecpipe.cli", "--help"],
    "vecpipe --version": [sys.executable, "-m", "vecpipe.cli", "--version"],
    "vecpipe info small.jsonl": [sys.executable, "-m", "vecpipe.cli", "info", "{small}"],
    "vecpipe convert small.jsonl": [sys.executable, "-m", "vecpipe.cli", "convert", "{small}",
                                    "-q"],
    "vecpipe embed small.jsonl -o out.arrow (one record, the bundled model)": [
        sys.executable, "-m", "vecpipe.cli", "embed", "{small}", "-o", "{out}", "-q"],
}
SEARCH_ARGV = [sys.executable, "-m", "vecpipe.cli", "search", "{index}", "--query", QUERY,
               "-k", "10", "-q"]
SEARCH = {f'vecpipe search IDX --query "{QUERY}" -k 10 (default: numpy runtime)':
          SEARCH_ARGV,
          "the same with --backend torch": SEARCH_ARGV + ["--backend", "torch"]}


def timed_run(argv, env=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_seconds(argv, runs):
    return statistics.median(timed_run(argv)[0] for _ in range(runs))


def compare(argv, runs, base):
    """Medians {variant: (wall, cpu)} over `runs` runs, the variants alternating run by run."""
    variants = {"now": None}
    if base:
        variants["before"] = dict(os.environ, PYTHONPATH=base)
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, env in variants.items():
            times[name].append(timed_run(argv, env))
    return {name: (statistics.median(w for w, _ in got), statistics.median(c for _, c in got))
            for name, got in times.items()}


# ---- the stages of one text query, in one process ------------------------------------------

def alternated(argvs: dict, runs: int) -> dict:
    """Medians {label: (wall, cpu)} of {label: (argv, env)}, the commands taking turns run by
    run (so they share the load)."""
    times = {label: [] for label in argvs}
    for _ in range(runs):
        for label, (argv, env) in argvs.items():
            times[label].append(timed_run(argv, env))
    return {label: (statistics.median(w for w, _ in got), statistics.median(c for _, c in got))
            for label, got in times.items()}


def stages(index: str, backend: str = "torch") -> dict:
    """Seconds (wall, CPU) per stage of `search INDEX --query`, sequential, as the command does
    them, importing the heavy packages one by one first so each shows on its own line."""
    if backend == "numpy":
        return numpy_stages(index)
    out = {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(name):
        wall, cpu = time.perf_counter(), time.process_time()
        out[name] = (wall - clock[0], cpu - clock[1])
        clock[:] = [wall, cpu]

    import vecpipe.cli.app  # noqa: F401 - what every command pays
    from vecpipe.commands import search
    lap("vecpipe imports (cli, typer, commands)")
    searcher = search.IndexSearch(index, 10, False, None, None, None, None, None, False, 0)
    lap("index open (pyarrow, usearch, rows)")
    from vecpipe.cli import models
    models._quiet_libraries(offline=True)
    import torch  # noqa: F401
    lap("import torch")
    import transformers
    from transformers import PreTrainedModel  # noqa: F401 - modeling_utils, as ST needs it
    lap("import transformers (+ modeling_utils)")
    import sentence_transformers  # noqa: F401
    lap("import sentence_transformers (rest)")
    path = models.bundled_model_path()
    transformers.AutoTokenizer.from_pretrained(path)
    lap("tokenizer load (AutoTokenizer alone)")
    models.weights_sha(path)
    lap("weights sha256 (90 MB)")
    reader = search.QueryReader(None, searcher, batch_size=1024, given=[QUERY], model=None,
                                prompt=None, prompt_name=None, text_fields=["text"],
                                device="auto", force=False, input_format="auto",
                                backend="torch")
    lap("model load (SentenceTransformer(): config, tokenizer, weights)")
    batch = next(iter(reader))
    lap("first encode")
    hits = searcher.searcher.search(batch[1], encoded=batch[2])
    lap("search (HNSW, k=10)")
    search.write_hits(iter([(batch[0], hits, searcher.rows)]), searcher.schema, os.devnull,
                      "jsonl")
    lap("output (JSONL)")
    return out


def numpy_stages(index: str) -> dict:
    """The stages of the default (numpy runtime) path."""
    out = {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(name):
        wall, cpu = time.perf_counter(), time.process_time()
        out[name] = (wall - clock[0], cpu - clock[1])
        clock[:] = [wall, cpu]

    import vecpipe.cli.app  # noqa: F401 - what every command pays
    from vecpipe.commands import search
    lap("vecpipe imports (cli, typer, commands)")
    searcher = search.IndexSearch(index, 10, False, None, None, None, None, None, False, 0)
    lap("index open (pyarrow, usearch, rows)")
    from vecpipe.cli import models
    import safetensors.numpy  # noqa: F401
    import tokenizers  # noqa: F401
    lap("import tokenizers, safetensors")
    models.weights_sha(models.bundled_model_path())
    lap("weights sha256 (90 MB)")
    reader = search.QueryReader(None, searcher, batch_size=1024, given=[QUERY], model=None,
                                prompt=None, prompt_name=None, text_fields=["text"],
                                device="auto", force=False, input_format="auto",
                                backend="auto")
    assert reader.model.backend == "numpy", reader.model.backend
    lap("model load (numpy runtime: configs, tokenizer.json, safetensors weights)")
    batch = next(iter(reader))
    lap("first encode")
    hits = searcher.searcher.search(batch[1], encoded=batch[2])
    lap("search (HNSW, k=10)")
    search.write_hits(iter([(batch[0], hits, searcher.rows)]), searcher.schema, os.devnull,
                      "jsonl")
    lap("output (JSONL)")
    return out


def breakdown(index: str, runs: int, backend: str) -> None:
    laps = []
    for _ in range(runs):
        child = subprocess.run([sys.executable, __file__, "--stages", index,
                                "--stages-backend", backend], check=True,
                               capture_output=True, text=True)
        laps.append(json.loads(child.stdout.splitlines()[-1]))
    print(f"\n# stages in one process, {backend} backend (current code, sequential), "
          f"median of {runs}")
    print("| stage | wall s | CPU s |\n|---|---|---|")
    total = [0.0, 0.0]
    for name in laps[0]:
        wall = statistics.median(lap[name][0] for lap in laps)
        cpu = statistics.median(lap[name][1] for lap in laps)
        total = [total[0] + wall, total[1] + cpu]
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    print(f"| sum of medians (interpreter start not included) | {total[0]:.3f} | "
          f"{total[1]:.3f} |")


def search_rows(index: str, runs: int, base: str | None) -> None:
    """The search --query rows: the default, --backend torch and, with `base`, the code before
    (it has no --backend: torch), all taking turns."""
    argvs = {label: ([a.format(index=index) for a in argv], None)
             for label, argv in SEARCH.items()}
    if base:
        argvs["the default, code before (PYTHONPATH=BASE)"] = (
            argvs[next(iter(SEARCH))][0], dict(os.environ, PYTHONPATH=base))
    blank = " | - | -" if base else ""
    for label, (wall, cpu) in alternated(argvs, runs).items():
        print(f"| {label} | {wall:.3f} | {cpu:.3f}{blank} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--index", help="an index folder: adds the search --query case")
    parser.add_argument("--base", help="PYTHONPATH of the code to compare against")
    parser.add_argument("--only-search", action="store_true")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage breakdown")
    parser.add_argument("--stages", help=argparse.SUPPRESS)  # the breakdown's child
    parser.add_argument("--stages-backend", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(stages(args.stages, args.stages_backend)))
        return
    print(machine_line(), flush=True)
    commands = {} if args.only_search else dict(COMMANDS)
    with tempfile.TemporaryDirectory() as tmp:
        small = os.path.join(tmp, "small.jsonl")
        with open(small, "w") as f:
            f.write('{"id": "1", "text": "hello"}\n')
        print(f"# {args.runs} runs each, load average {os.getloadavg()[0]:.2f}")
        if args.base:
            print("| command | median s now | CPU s now | median s before | CPU s before |"
                  "\n|---|---|---|---|---|")
        else:
            print("| command | median s | CPU s |\n|---|---|---|")
        for label, argv in commands.items():
            argv = [a.format(small=small, index=args.index, out=os.path.join(tmp, "out.arrow"))
                    for a in argv]
            medians = compare(argv, args.runs, args.base)
            cells = " | ".join(f"{wall:.3f} | {cpu:.3f}" for wall, cpu in medians.values())
            print(f"| {label} | {cells} |", flush=True)
        if args.index:
            search_rows(args.index, args.runs, args.base)
    if args.index and not args.no_stages:
        for backend in ("numpy", "torch"):
            breakdown(args.index, args.runs, backend)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
