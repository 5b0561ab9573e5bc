"""Every example in README.md runs as written: its indented code blocks, its ```sh blocks (one
command at a time, under the block's `set` options) and the targets of its ```make blocks (make -f
on the block, in a fresh folder). They run in README order in one working folder (what one example
makes feeds the next) on a small NFCorpus slice with the bundled model, under the file names the
README uses. Each must exit as documented (0, or the code its comment states) and produce the
documented shape: hits with query_id/rank/id/score, Arrow files with the stated columns, index
folders, the eval metrics, and for a `$ command` the shown output's layout (numbers differ on the
slice, so lines are compared with the numbers blanked).

An example added to the README later runs here automatically and fails unless it works or is in
SKIPPED below, with its reason; a SKIPPED pattern that matches no example fails too."""
import ast
import csv
import datetime
import gzip
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner
from vecpipe.cli.app import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent

# pattern (re.search on the command) -> (why it does not run here, whether the skip applies now).
# Keep it short: every entry must still match a README command (test_skip_list_has_no_stale_entry).
SKIPPED = {
    # the repository's own targets: they install into .venv, write demo/ in the checkout and run
    # the whole suite (this file included); CI and the lead run them
    r"^make (demo|test|test-fast)\b": ("runs the repo's own make targets", True),
    # GNU parallel is an optional tool; the sharded embed it runs is the make -j8 block's too
    r"^parallel\b": ("GNU parallel is not installed", shutil.which("parallel") is None),
    # no cross-encoder ships offline; tests/test_rerank.py runs --rerank with a local one
    r"--rerank cross-encoder/": ("downloads a cross-encoder from the hub", True),
    # the full NFCorpus test split takes minutes: the same command runs on the slice (the
    # ../shared/data/nfcorpus path here is the slice) and its numbers are checked against
    # tests/test_eval.py's (test_readme_beir_numbers_match_the_nfcorpus_test)
}
# pattern -> the environments it runs under, once each: commands the README runs inside a
# launcher get the variables the launcher sets (every entry must match a README command too)
LAUNCHED = {
    # a Slurm array of two tasks (`sbatch --array=0-1`), as the README's embed.sbatch runs them
    r"--shard auto": [{"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
                      for task in range(2)],
}
# a trailing comment stating the exit code ("# exits 1") unless it is conditional ("when ...")
DOCUMENTED_EXIT = re.compile(r"#.*\bexits? (\d+)\b(?!.*\b(when|if|unless)\b)")
DOCS, TEST_QUERIES, TRAIN_QUERIES = 150, 20, 10
HALF = DOCS // 2
HIT_COLUMNS = {"query_id", "rank", "id", "score"}
METRICS = ("ndcg", "map", "mrr", "recall", "precision")  # the README's "P" is precision_at_K
NOTES = 24  # Markdown files in the notes/ folder
TEXT_CHARS = 400  # NFCorpus abstracts cut to about 90 tokens


@dataclass
class Example:
    command: str  # one shell command as the README shows it (continuations joined)
    section: str
    kind: str  # "indented", "sh" or "make"
    shell_options: str = ""  # the `set ...` lines of its ```sh block
    shown_output: list[str] = field(default_factory=list)  # the lines after a `$ command`
    makefile: str = ""  # for kind "make": the whole block
    target: str = ""

    def skip_reason(self) -> str | None:
        for pattern, (reason, applies) in SKIPPED.items():
            if applies and re.search(pattern, self.command):
                return reason
        return None

    def expected_exit(self) -> int:
        found = DOCUMENTED_EXIT.search(self.command)
        return int(found.group(1)) if found else 0


# ---------------------------------------------------------------- extraction

def logical_lines(lines: list[str]) -> list[str]:
    """Shell lines with `\\` continuations joined; blank and comment-only lines dropped."""
    joined, current = [], ""
    for line in lines:
        current += line.strip() if current else line.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            joined.append(current.strip())
        current = ""
    return joined


def make_targets(block: str) -> list[str]:
    """The explicit targets of a Makefile block, in order (pattern rules and variables left out)."""
    return [m.group(1) for m in re.finditer(r"^([\w./-]+):(?!=)", block, re.MULTILINE)]


def readme_examples(text: str) -> list[Example]:
    examples, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            examples += fenced_examples(fence.group(1), lines[i + 1:end], section)
            i = end + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            examples += indented_examples([x[4:] for x in lines[i:end]], section)
            i = end
            continue
        i += 1
    return examples


def indented_examples(lines: list[str], section: str) -> list[Example]:
    """Commands, paragraph by paragraph; a `$ command` owns the lines after it, up to the next
    `$` or blank line, as its shown output."""
    examples, paragraph = [], []
    for line in [*lines, ""]:
        if line.strip():
            paragraph.append(line)
            continue
        first = next((n for n, x in enumerate(paragraph) if x.startswith("$ ")), len(paragraph))
        examples += [Example(c, section, "indented") for c in logical_lines(paragraph[:first])]
        for line_shown in paragraph[first:]:
            if line_shown.startswith("$ "):
                examples.append(Example(line_shown[2:].strip(), section, "indented"))
            else:
                examples[-1].shown_output.append(line_shown.rstrip())
        paragraph = []
    return examples


def fenced_examples(language: str, lines: list[str], section: str) -> list[Example]:
    if language == "make":
        block = "\n".join(lines) + "\n"
        return [Example(f"make -j8 {target}", section, "make", makefile=block, target=target)
                for target in make_targets(block)]
    if language in ("sh", "bash", "shell", "console"):
        commands = logical_lines(lines)
        options = "; ".join(c for c in commands if re.match(r"set -\w", c))
        return [Example(c, section, "sh", shell_options=options)
                for c in commands if not re.match(r"set -\w", c)]
    return []


EXAMPLES = readme_examples(README.read_text())


# ---------------------------------------------------------------- the checks that need no data

def test_the_extraction_finds_every_code_line():
    """Every non-comment line of every code block is part of an example (or its shown output),
    so an example cannot hide from this test by its layout."""
    text = README.read_text()
    code_lines = [line[4:].strip() for line in re.findall(r"(?m)^    \S.*$", text)]
    for language, body in re.findall(r"(?ms)^```(\w*)\n(.*?)^```", text):
        code_lines += [line.strip() for line in body.splitlines()
                       if language in ("sh", "make") and line.strip()]
    covered = " ".join([e.command for e in EXAMPLES]
                       + [line for e in EXAMPLES for line in e.shown_output]
                       + [e.makefile for e in EXAMPLES] + [e.shell_options for e in EXAMPLES])
    covered = re.sub(r"\s+", " ", covered)
    for line in code_lines:
        line = line.rstrip("\\").strip()
        if line.startswith(("#", "$ ")):
            continue
        assert re.sub(r"\s+", " ", line) in covered, line
    assert sum(e.kind == "make" for e in EXAMPLES) >= 2 and any(e.shown_output for e in EXAMPLES)
    assert any(e.kind == "sh" for e in EXAMPLES)


def test_a_new_example_of_any_kind_is_picked_up():
    lines = [
        "## Tour", "prose", "", "    vecpipe new --thing x \\", "        --more   # exits 1", "",
        "    $ vecpipe shown", "    line  1.0", "", "```sh", "set -eu", "# a comment",
        "vecpipe a | vecpipe b", "```", "```make", "out.arrow: in.jsonl",
        "\tvecpipe embed $< -o $@", "parts/%.arrow: x", "\tfalse", "```", "```python",
        "not shell", "```"]
    examples = readme_examples("\n".join(lines))
    assert [(e.kind, e.command) for e in examples] == [
        ("indented", "vecpipe new --thing x --more   # exits 1"), ("indented", "vecpipe shown"),
        ("sh", "vecpipe a | vecpipe b"), ("make", "make -j8 out.arrow")]
    assert examples[0].expected_exit() == 1 and examples[0].section == "Tour"
    assert examples[1].shown_output == ["line  1.0"] and examples[2].shell_options == "set -eu"
    assert Example("vecpipe x  # then exit 1 when it drifted", "", "sh").expected_exit() == 0


def test_skip_list_has_no_stale_entry():
    for table, pattern in [("SKIPPED", p) for p in SKIPPED] + [("LAUNCHED", p) for p in LAUNCHED]:
        assert any(re.search(pattern, e.command) for e in EXAMPLES), \
            f"{table} entry {pattern!r} matches no README example: remove it"


def test_readme_beir_numbers_match_the_nfcorpus_test():
    """The full-NFCorpus table (too slow to rerun here) shows the numbers that
    test_beir_nfcorpus_reproduces_mteb asserts: the published MTEB scores, and MRR@10 within the
    0.0005 the README states."""
    source = (REPO / "tests" / "test_eval.py").read_text()
    test = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)
                and node.name == "test_beir_nfcorpus_reproduces_mteb")
    published = next(ast.literal_eval(node.value) for node in ast.walk(test)
                     if isinstance(node, ast.Assign) and node.targets[0].id == "published")
    beir = next(e for e in EXAMPLES if e.command.startswith("vecpipe eval beir") and e.shown_output)
    table = table_of(beir.shown_output)
    assert float(re.search(r"(\d+) queries", beir.shown_output[0]).group(1)) == 323
    assert table["nDCG"]["@10"] == published["ndcg_at_10"]
    assert table["MAP"]["@10"] == published["map_at_10"]
    assert table["Recall"]["@100"] == published["recall_at_100"]
    # "0.0005 below MTEB's", to the README's four decimals
    assert round(published["mrr_at_10"] - table["MRR"]["@10"], 4) == 0.0005
    prose = README.read_text()
    for key, label in (("ndcg_at_10", "nDCG@10"), ("map_at_10", "MAP@10"),
                       ("recall_at_100", "Recall@100"), ("mrr_at_10", "MRR@10")):
        assert f"{label} {published[key]:.5f}" in prose, label


def table_of(lines: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {"@k": value}} from the metric table lines of `eval beir`'s output."""
    header = next(line.split() for line in lines if line.split()[:1] == ["metric"])
    return {row.split()[0]: dict(zip(header[1:], map(float, row.split()[1:])))
            for line in lines if (row := line) and row.split()[0] in
            ("nDCG", "MAP", "MRR", "Recall", "P")}


# ---------------------------------------------------------------- the fixtures

def nfcorpus_slice(nfcorpus: Path):
    """DOCS documents holding every relevant document of 20 test and 10 train queries with few
    relevant documents each, and those queries: (docs, test queries, train queries, qrels by
    split)."""
    qrels = {split: defaultdict(dict) for split in ("test", "train")}
    for split in qrels:
        for row in (nfcorpus / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
            query_id, doc_id, score = row.split("\t")
            if int(score) > 0:
                qrels[split][query_id][doc_id] = int(score)
    chosen = {split: [q for q in sorted(qrels[split]) if 1 <= len(qrels[split][q]) <= 6][:n]
              for split, n in (("test", TEST_QUERIES), ("train", TRAIN_QUERIES))}
    wanted = {d for split in chosen for q in chosen[split] for d in qrels[split][q]}
    corpus = [orjson.loads(line) for line in (nfcorpus / "corpus.jsonl").read_bytes().splitlines()]
    corpus = [shortened(d) for d in corpus]
    docs = [d for d in corpus if d["_id"] in wanted]
    docs += [d for d in corpus if d["_id"] not in wanted][:DOCS - len(docs)]
    spare = [d for d in corpus if d["_id"] not in {x["_id"] for x in docs}]
    queries = {q["_id"]: q for q in map(orjson.loads,
                                        (nfcorpus / "queries.jsonl").read_bytes().splitlines())}
    return (docs, spare, [queries[q] for q in chosen["test"]],
            [queries[q] for q in chosen["train"]],
            {split: {q: qrels[split][q] for q in chosen[split]} for split in chosen})


def readme_doc_ids() -> list[str]:
    """Record ids the examples name (`--like doc42`): filler documents take them."""
    return sorted({m for e in EXAMPLES for m in re.findall(r"\bdoc\d+\b", e.command)})


def markdown_notes(folder: Path, docs: list[dict]) -> None:
    """A notes folder for `embed DIR --glob '**/*.md'`: Markdown files in subfolders, plus what
    the walk must pass over (a hidden folder, a file that is not text, another extension)."""
    for n, doc in enumerate(docs[:NOTES]):
        path = folder / f"topic-{n % 3}" / f"{doc['_id']}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {doc.get('title') or doc['_id']}\n\n{doc['text']}\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.md").write_text("ref: refs/heads/main\n")
    (folder / "scan.md").write_bytes(b"\xff\xfe\x00binary")
    (folder / "todo.txt").write_text("not markdown\n")


def shortened(doc: dict) -> dict:
    """The document with its text cut to TEXT_CHARS at a word: the model's time is the test's."""
    cut = doc["text"] if len(doc["text"]) <= TEXT_CHARS else \
        doc["text"][:TEXT_CHARS].rsplit(" ", 1)[0]
    return dict(doc, text=cut)


def with_fields(doc: dict, number: int) -> dict:
    """A document with the `lang` and `year` fields the README's filters use."""
    return {"_id": doc["_id"], "title": doc.get("title", ""), "text": doc["text"], "lang": "en",
            "year": 2012 + number % 14}


def jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def beir_qrels(path: Path, qrels: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, docs in qrels.items() for d, s in docs.items()))
    return path


def bm25_run(docs: list[dict], queries: list[dict], depth=100) -> str:
    """A plain BM25 (k1=0.9, b=0.4) TREC run: the lexical baseline the README compares with."""
    tokens = [re.findall(r"\w+", f"{d['title']} {d['text']}".lower()) for d in docs]
    frequency = Counter(term for words in tokens for term in set(words))
    average = sum(map(len, tokens)) / len(tokens)
    lines = []
    for query in queries:
        terms = set(re.findall(r"\w+", query["text"].lower()))
        scores = []
        for doc, words in zip(docs, tokens):
            counts = Counter(words)
            score = sum(math.log(1 + (len(docs) - frequency[t] + 0.5) / (frequency[t] + 0.5))
                        * counts[t] * 1.9 / (counts[t] + 0.9 * (0.6 + 0.4 * len(words) / average))
                        for t in terms if counts[t])
            scores.append((score, doc["_id"]))
        ranked = sorted(scores, key=lambda s: (-s[0], s[1]))[:depth]
        lines += [f"{query['_id']} Q0 {d} {r} {s:.6f} bm25\n" for r, (s, d) in enumerate(ranked, 1)]
    return "".join(lines)


def vecpipe_in_process(*args):
    """Fixture files made by vecpipe itself, in this process (the model loads once)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == 0, (args, result.stderr_bytes)
    return result


def arrow_rows(source: Path, target: Path, start: int, stop: int) -> Path:
    """Rows [start, stop) of an Arrow file, metadata kept."""
    table = pa.ipc.open_file(str(source)).read_all().slice(start, stop - start)
    with pa.ipc.new_file(str(target), table.schema) as writer:
        writer.write_table(table)
    return target


def make_fixtures(root: Path, nfcorpus: Path, model: str) -> Path:
    """The working folder with every input file the README names; returns it."""
    work, slice_folder = root / "work", root / "shared" / "data" / "nfcorpus"
    work.mkdir()
    (root / "home").mkdir()
    docs, spare, test_queries, train_queries, qrels = nfcorpus_slice(nfcorpus)
    records = [with_fields(d, n) for n, d in enumerate(docs)]
    for record, named in zip(reversed(records), readme_doc_ids()):  # fillers, never relevant
        record["_id"] = named
    random.Random(0).shuffle(spare)  # the day's and the reference documents: one distribution
    # the BEIR folder, also where the README's `../shared/data/nfcorpus` points from work/
    jsonl(slice_folder / "corpus.jsonl", docs)
    jsonl(slice_folder / "queries.jsonl", test_queries + train_queries)
    beir_qrels(slice_folder / "qrels" / "test.tsv", qrels["test"])
    beir_qrels(slice_folder / "qrels" / "train.tsv", qrels["train"])
    (work / "nfcorpus").symlink_to(slice_folder)
    for name in ("docs.jsonl", "corpus.jsonl"):
        jsonl(work / name, records)
    (work / "corpus.jsonl.gz").write_bytes(gzip.compress((work / "corpus.jsonl").read_bytes()))
    jsonl(work / "queries.jsonl", test_queries)
    jsonl(work / "golden-queries.jsonl", test_queries[:10])
    for name in ("qrels.tsv", "qrels/test.tsv"):
        beir_qrels(work / name, qrels["test"])
    beir_qrels(work / "golden.tsv", {q["_id"]: qrels["test"][q["_id"]] for q in test_queries[:10]})
    (work / "qrels.txt").write_text("".join(f"{q} 0 {d} {s}\n" for q, ds in qrels["test"].items()
                                            for d, s in ds.items()))
    jsonl(work / "pairs.jsonl", [{"query_id": q["_id"], "query": q["text"], "positive_id": d}
                                 for q in train_queries for d in qrels["train"][q["_id"]]])
    # the cron example's "new/$(date +%F).jsonl": today's, and tomorrow's for a run that passes
    # midnight (local dates, as the shell's date; 5 documents again: --on-duplicate last
    # replaces them)
    today = datetime.date.today()
    for day in (today, today + datetime.timedelta(days=1)):
        jsonl(work / "new" / f"{day.isoformat()}.jsonl",
              [with_fields(d, n) for n, d in enumerate(spare[:40])] + records[:5])
    # labelled sets for eval classification and clustering: the documents relevant to a test
    # query, labelled by it (their topic); every other one to train and to test
    topic = {}
    for query_id, judged in qrels["test"].items():
        for doc_id in judged:
            topic.setdefault(doc_id, query_id)
    labelled = [{"text": d["text"], "label": topic[d["_id"]]} for d in docs if d["_id"] in topic]
    jsonl(work / "train.jsonl", labelled[0::2])
    jsonl(work / "test.jsonl", labelled[1::2])
    jsonl(work / "arxiv-s2s.jsonl", [{"sentences": r["text"], "labels": r["label"]}
                                     for r in labelled])
    (work / "bm25.trec").write_text(bm25_run(docs, test_queries))
    # two snapshots of the corpus for the keep-in-step recipe: 5 removed, 3 changed, 10 new
    changed = [dict(r, text=r["text"] + " (revised)") for r in records[5:8]]
    jsonl(work / "snapshots" / "yesterday.jsonl", records)
    jsonl(work / "snapshots" / "today.jsonl", changed + records[8:]
          + [with_fields(d, n) for n, d in enumerate(spare[80:90])])
    for doc in docs[:40]:  # the Markdown folder of "Search your own Markdown folder"
        folder = work / "notes" / ("nutrition" if len(doc["text"]) % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{doc['_id']}.md").write_text(f"# {doc['title']}\n\n{doc['text']}\n")

    def embed(source, target, *extra):
        vecpipe_in_process("embed", source, "--text-field", "title", "--text-field", "text",
                           "-q", "--cache", root / "fixture-cache", "-o", target, *extra)
    embed(work / "docs.jsonl", work / "vectors.arrow")
    vecpipe_in_process("search", work / "vectors.arrow", work / "queries.jsonl", "-k", "100",
                       "--output-format", "trec", "-q", "-o", work / "dense.trec")
    arrow_rows(work / "vectors.arrow", work / "last_week.arrow", 0, HALF)
    arrow_rows(work / "vectors.arrow", work / "today.arrow", HALF, DOCS)
    embed(jsonl(root / "reference.jsonl", [with_fields(d, n) for n, d in enumerate(spare[40:80])]),
          work / "reference.arrow")
    for year, (start, stop) in (("2024", (0, HALF)), ("2025", (HALF, DOCS))):
        part = arrow_rows(work / "vectors.arrow", root / f"{year}.arrow", start, stop)
        vecpipe_in_process("index", part, "-o", work / f"idx-{year}", "--fields", "title", "-q")
    for shard in range(8):  # what the README's sharded embeds write
        embed(work / "corpus.jsonl", f"{work / 'parts'}/", "--shard", f"{shard}/8")
    (work / "tuned").symlink_to(model)  # a fine-tuned copy of the model, for the soup
    (work / "suite.toml").write_text(readme_block("toml"))  # the README's eval suite file
    for name in ("docs", "corpus"):
        vecpipe_in_process("convert", work / f"{name}.jsonl", "-q", "-o", work / f"{name}.parquet")
    markdown_notes(work / "notes", spare[80:])
    return work


# ---------------------------------------------------------------- running and checking

def shell_env(root: Path) -> dict:
    env = dict(os.environ, HOME=str(root / "home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for name in ("COLUMNS", "LINES", "VECPIPE_OUTPUT_FORMAT", "VECPIPE_DEBUG", "MAKEFLAGS"):
        env.pop(name, None)
    return env


def run_shell(command: str, cwd: Path, env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, check=False,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def run_on_terminal(command: str, cwd: Path, env: dict, columns=100) -> tuple[int, str]:
    """A `$ command` as a reader at a terminal runs it: stdout and stderr on a pty."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL, close_fds=True)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # EIO: the child closed the pty
            chunk = b""
        if not chunk:
            break
        seen += chunk
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))
    return proc.wait(timeout=60), text.replace("\r", "")


def shape(line: str) -> list[str]:
    """A line's layout: box drawing removed, numbers blanked, words kept."""
    line = re.sub(r"[\u2500-\u257f|]", " ", line)
    return [re.sub(r"\d+(\.\d+)?", "N", word) for word in line.split()]


def check_shown_output(example: Example, shown: str) -> None:
    """Every documented line appears, in order, with the same layout (numbers aside)."""
    actual = [shape(line) for line in shown.splitlines() if shape(line)]
    position = 0
    for documented in example.shown_output:
        wanted = shape(documented)
        found = next((n for n in range(position, len(actual)) if actual[n] == wanted), None)
        assert found is not None, f"no line shaped like {documented!r} in:\n{shown}"
        position = found + 1


def stages(command: str) -> list[list[str]]:
    """The argv of each stage of a pipeline (redirections kept as tokens)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    argvs, current = [], []
    for token in lexer:
        if token in ("|", "&&", ";"):
            argvs.append(current)
            current = []
        else:
            current.append(token)
    return argvs + [current]


def option(argv: list[str], *names: str) -> str | None:
    for n, token in enumerate(argv[:-1]):
        if token in names:
            return argv[n + 1]
    return None


def read_records(path: Path) -> list[dict]:
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as lines:
            return list(csv.DictReader(lines, delimiter="," if path.suffix == ".csv" else "\t"))
    data = path.read_bytes()
    if data.startswith(b"ARROW1"):
        return pa.ipc.open_file(pa.BufferReader(data)).read_all().to_pylist()
    if data.startswith(b"PAR1"):
        return pq.read_table(path).to_pylist()
    if data.startswith(b"\xff\xff\xff\xff"):
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def arrow_columns(path: Path) -> tuple[list[str], dict]:
    assert path.read_bytes()[:6] == b"ARROW1", f"{path} is not an Arrow file"
    schema = pa.ipc.open_file(str(path)).schema
    return schema.names, {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def check_vectors_file(path: Path) -> None:
    names, metadata = arrow_columns(path)
    assert {"id", "embedding"} <= set(names), (path, names)
    assert metadata.get("vecpipe.model"), (path, metadata)


def check_index_folder(folder: Path, argv: list[str]) -> None:
    manifests = [folder / "manifest.json"] if (folder / "manifest.json").is_file() else \
        sorted(folder.glob("*/manifest.json"))  # --shard: one index per part
    assert manifests, f"{folder} holds no index"
    for manifest in manifests:
        index = manifest.parent
        kept = json.loads(manifest.read_text())
        if kept.get("layout") == "linked":  # merge --link: the shards, served as one
            assert kept["shards"] and all((index / s["path"] / "manifest.json").is_file()
                                          for s in kept["shards"]), index
            continue
        assert (index / "rows.parquet").is_file(), index
        if kept.get("layout") == "lexical":  # index --lexical: bm25s's score matrix
            assert (index / "data.csc.index.npy").is_file(), index
            continue
        flat = "--flat" in argv
        assert (index / ("vectors.npy" if flat else "vectors.usearch")).is_file(), index
        if "--keep-vectors" in argv:
            assert (index / "full.npy").is_file(), index
        fields = option(argv, "--fields")
        if fields:
            assert set(fields.split(",")) <= set(pq.read_schema(index / "rows.parquet").names)


def check_hits(records: list[dict], argv: list[str]) -> None:
    assert records and all(HIT_COLUMNS <= set(r) for r in records), records[:2]
    for name in (option(argv, "--fields") or "").split(","):
        assert not name or all(name in r for r in records), name
    k = int(option(argv, "-k", "--top-k") or 10)
    assert max(Counter(r["query_id"] for r in records).values()) <= k


def check_trec_run(path: Path) -> None:
    rows = [line.split() for line in path.read_text().splitlines()]
    assert rows and all(len(r) == 6 and r[1] == "Q0" for r in rows), rows[:2]


def check_metrics(records: list[dict], argv: list[str]) -> None:
    cutoffs = (option(argv, "--cutoffs") or "10").split(",")
    assert records, "no metrics"
    for record in records:
        for metric in METRICS:
            for k in cutoffs:
                assert f"{metric}_at_{k}" in record, (metric, k, sorted(record))


def check_output(argv: list[str], path: Path) -> None:
    """What `vecpipe ... -o PATH` wrote, by command."""
    assert path.exists(), f"{path} was not written"
    command = argv[1]
    if command == "index" or (command == "merge" and "--index" in argv):
        check_index_folder(path, argv)
    elif command == "train":
        assert (path / "vecpipe-train.json").is_file(), f"{path} has no training recipe"
    elif command == "merge" and "--models" in argv:
        assert (path / "config.json").is_file(), f"{path} is not a model folder"
    elif command == "embed" and path.is_dir():
        parts = sorted(path.glob("part-*-of-*.arrow"))
        assert parts, f"no parts in {path}"
        for part in parts:
            check_vectors_file(part)
    elif path.suffix == ".trec":
        check_trec_run(path)
    elif command == "merge" and "--fuse" in argv:  # a fused run: every document of the runs
        records = read_records(path)
        assert records and all(HIT_COLUMNS <= set(r) for r in records), records[:2]
    elif command == "search":
        check_hits(read_records(path), argv)
    elif command in ("embed", "compress", "merge") and path.suffix == ".arrow":
        check_vectors_file(path)
        if "--multi-vector" in argv or "--fde" in argv:  # token vectors made or passed on
            assert "token_vectors" in arrow_columns(path)[0], path
    elif command == "convert":
        check_converted(read_records(path), argv)
    elif command == "mine-negatives":
        rows = read_records(path)
        assert rows and all("positive" in r and any(k.startswith("negative") for k in r)
                            for r in rows), rows[:1]
    for side in ("--save-stats", "--save-codec", "--save-report", "--save-fit"):
        if option(argv, side):
            json.loads((path.parent / option(argv, side)).read_text())


def check_converted(records: list[dict], argv: list[str]) -> None:
    assert records
    if option(argv, "--fields"):
        assert all(set(r) == set(option(argv, "--fields").split(",")) for r in records)
    for rename in filter(None, [option(argv, "--rename")]):
        old, new = rename.split("=")
        assert all(new in r and old not in r for r in records)
    for limit in filter(None, [option(argv, "--limit", "--head"), option(argv, "--sample")]):
        assert len(records) <= int(limit)


def check_stdout(argv: list[str], stdout: bytes, cwd: Path) -> None:
    """What the last stage of a pipeline printed (off a terminal: records or JSON lines)."""
    if argv[:1] != ["vecpipe"] or not stdout.strip():
        return
    if argv[1] == "info" and "--fields" in argv:  # the field names, one a line
        names = pq.read_schema(cwd / argv[-1]).names if argv[-1].endswith(".parquet") else None
        assert names is None or stdout.decode().split() == names, (stdout, names)
        return
    records = read_records_bytes(stdout)
    if "--dry-run" in argv:  # the plan, one JSON object
        assert len(records) == 1 and "inputs" in records[0], records
        return
    command = " ".join(argv[1:3]) if argv[1] == "eval" else argv[1]
    if command == "search":
        check_hits(records, argv)
    elif command in ("eval retrieval", "eval beir"):
        check_metrics(records, argv)
    elif command.startswith("eval ") and command.split()[1] in EVAL_TASKS:
        assert len(records) == 1 and "main_score" in records[0], records
        assert all(key in records[0] for key in EVAL_TASKS[command.split()[1]]), records
    elif command == "eval suite":
        assert records and all({"model", "borda_rank", "scores", "p_values"} <= set(r)
                               for r in records), records
    elif command == "eval embeddings":
        described = [r for r in records if "input" in r]
        assert described and all({"rows", "dim"} <= set(r) for r in described), records
        compared = [r for r in records if "compare" in r]
        assert len(compared) == (len(described) == 2) and all("differ" in r for r in compared)
    elif command == "info":
        assert records and all({"format", "rows"} <= set(r) for r in records), records
    elif command == "convert":
        check_converted(records, argv)
    elif command in ("embed", "compress", "merge"):
        assert stdout.startswith(b"\xff\xff\xff\xff"), "vectors on a pipe stay Arrow IPC"


# eval's MTEB task commands -> metrics their one report record must hold
EVAL_TASKS = {"pair-classification": ("max_ap", "cosine_f1"), "reranking": ("map_at_1000",),
              "bitext-mining": ("f1",), "summarization": ("cosine_spearman",),
              "classification": ("accuracy", "f1"), "clustering": ("v_measure",)}


def readme_block(language: str) -> str:
    """The README's one ```LANGUAGE block (a file the examples read, shown where they run)."""
    [block] = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)
    return block


def read_records_bytes(data: bytes) -> list[dict]:
    if data.startswith(b"\xff\xff\xff\xff"):
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()
    if data.lstrip().startswith(b"["):  # --output-format json: one array
        return orjson.loads(data)
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def check_example(example: Example, result: subprocess.CompletedProcess, cwd: Path) -> None:
    argvs = stages(example.command)
    for argv in argvs:
        path = option(argv, "-o", "--output")
        if argv[:1] == ["vecpipe"] and path:
            check_output(argv, cwd / path)
    last = argvs[-1]
    if ">" in last:
        redirected = cwd / last[last.index(">") + 1]
        assert redirected.stat().st_size > 0, f"{redirected} is empty"
        check_stdout(last[:last.index(">")], redirected.read_bytes(), cwd)
    else:
        check_stdout(last, result.stdout, cwd)


def run_plain(example: Example, work: Path, env: dict) -> subprocess.CompletedProcess:
    """One command under its block's `set` options, once per launcher environment; a --dry-run
    must leave the folder as it was."""
    prefix = f"{example.shell_options}; " if example.shell_options else ""
    before = folder_state(work)
    environments = next((envs for pattern, envs in LAUNCHED.items()
                         if re.search(pattern, example.command)), [{}])
    for extra in environments:
        result = run_shell(prefix + example.command, work, dict(env, **extra))
        if result.returncode != example.expected_exit():
            break
    if "--dry-run" in example.command and result.returncode == 0:
        assert folder_state(work) == before, "--dry-run wrote something"
    return result


def folder_state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def run_make_example(example: Example, work: Path, fixtures: set[str], env: dict):
    """A ```make block's target in a fresh folder holding the inputs (not the targets): make
    builds it and everything it needs, and a second make finds it up to date."""
    folder = work.parent / f"make-{abs(hash(example.makefile)) % 10**8}"
    if not folder.exists():
        folder.mkdir()
        (folder / "Makefile").write_text(example.makefile)
        produced = {re.split(r"[/$%]", t)[0] for t in re.findall(r"(?m)^([^\s#:=][^:=]*):(?!=)",
                                                                  example.makefile)}
        for name in fixtures - produced:
            source = work / name
            (folder / name).symlink_to(source.resolve() if source.is_symlink() else source)
    result = run_shell(f"make -j8 -f Makefile {shlex.quote(example.target)}", folder, env)
    if result.returncode == 0:
        target = folder / example.target
        if target.suffix == ".arrow":
            check_vectors_file(target)
        elif target.suffix == ".trec":
            check_trec_run(target)
        elif target.is_dir() and (target / "modules.json").is_file():  # train, merge --models
            assert (target / "config.json").is_file(), f"{target} is not a model folder"
        elif target.is_dir():
            check_index_folder(target, [])
        up_to_date = run_shell(f"make -q -f Makefile {shlex.quote(example.target)}", folder, env)
        if target.exists():
            assert up_to_date.returncode == 0, f"make {example.target}: not up to date after a run"
    return result


@pytest.mark.slow
def test_every_readme_example_runs(tmp_path, nfcorpus, bundled_model_path):
    started = time.monotonic()
    work = make_fixtures(tmp_path, nfcorpus, bundled_model_path)
    print(f"fixtures: {time.monotonic() - started:.0f}s")
    fixtures = {p.name for p in work.iterdir()}
    env = shell_env(tmp_path)
    failures, ran, skipped = [], [], []
    for example in EXAMPLES:
        reason = example.skip_reason()
        if reason:
            skipped.append(f"{example.command}  ({reason})")
            continue
        began = time.monotonic()
        try:
            if example.kind == "make":
                result = run_make_example(example, work, fixtures, env)
            elif example.shown_output:
                code, shown = run_on_terminal(example.command, work, env)
                result = subprocess.CompletedProcess(example.command, code, b"", shown.encode())
                if code == example.expected_exit():
                    check_shown_output(example, shown)
            else:
                result = run_plain(example, work, env)
            assert result.returncode == example.expected_exit(), (
                f"exit {result.returncode}, documented {example.expected_exit()}: "
                + result.stderr.decode("utf-8", "replace")[-1500:])
            if example.kind != "make" and not example.shown_output and result.returncode == 0:
                check_example(example, result, work)
            ran.append(f"{time.monotonic() - began:5.1f}s  {example.command}")
        except (AssertionError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as error:
            failures.append(f"[{example.section}] {example.command}\n    {error}")
    print(f"\n{len(ran)} README examples ran in {time.monotonic() - started:.0f}s:",
          *ran, f"{len(skipped)} skipped:", *skipped, sep="\n  ")
    assert not failures, f"{len(failures)} README examples fail:\n" + "\n".join(failures)
