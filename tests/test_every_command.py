"""Behaviour every command shares, tested once per leaf command over one table (csvkit's
mixins): -q, atomic -o, --output-format, empty input, a bad input line, `| head -1` and the
one-line usage error. Inputs are fake:8 vectors built once per module."""
import functools
import shlex
import subprocess
import sys
from dataclasses import dataclass

import orjson
import pytest

from vecpipe.cli.docgen import command_tree

DOCS = 3000  # enough output for every record stream to outgrow a pipe's buffer
QUERIES = 300
PAIRS = 1500


@dataclass(frozen=True)
class Command:
    path: str  # the command after `vecpipe`, e.g. "eval retrieval"
    args: tuple[str, ...]  # a minimal valid run; {name}: a file of `inputs`; "--new|-old": the
    # first of these spellings the command declares (the old ones warn that they are deprecated)
    input: str  # the input replaced by an empty or a bad file
    empty: str | None  # None: an empty input is no records and exit 0; else the error's words
    usage: tuple[str, ...]  # a bad option value: the usage error
    output: str | None = None  # what -o writes: "file", "dir", or None (no -o)


COMMANDS = [
    Command("embed", ("{docs}", "-m", "fake:8"), "docs", None, ("--batch-size", "0"), "file"),
    Command("index", ("{vectors}", "-o", "{out}"), "vectors",
            "empty input: no records to index", ("--threads", "-1"), "dir"),
    Command("search", ("{index}", "{queries}", "-k", "10"), "queries", None, ("-k", "0"), "file"),
    Command("compress", ("{vectors}", "--dtype|--to", "int8"), "vectors", None, ("--dim", "0"),
            "file"),
    Command("eval retrieval", ("{run}", "--qrels", "{qrels}"), "run", "the run is empty",
            ("--qrels-depth", "0")),
    Command("eval calibrate", ("{run}", "--qrels", "{qrels}", "--space", "{index}"), "run",
            "the run is empty", ("--fit-depth", "0"), "file"),
    Command("eval beir", ("{beir}", "-m", "fake:8", "--cutoffs|-k", "1,10"), "beir",
            "the corpus is empty", ("--batch-size", "0")),
    Command("eval sts", ("{sts}", "-m", "fake:8"), "sts", "no pairs", ("--batch-size", "0")),
    Command("eval pair-classification", ("{pairclass}", "-m", "fake:8"), "pairclass", "no pairs",
            ("--batch-size", "0")),
    Command("eval reranking", ("{rerank}", "-m", "fake:8"), "rerank", "no queries",
            ("--batch-size", "0")),
    Command("eval bitext-mining", ("{sts}", "-m", "fake:8"), "sts", "no pairs",
            ("--batch-size", "0")),
    Command("eval summarization", ("{summ}", "-m", "fake:8"), "summ", "no records",
            ("--batch-size", "0")),
    Command("eval classification", ("{labelled}", "--split-field", "split", "-m", "fake:8",
                                    "--experiments", "2"), "labelled", "no records",
            ("--experiments", "0")),
    Command("eval clustering", ("{labelled}", "-m", "fake:8", "--experiments", "2",
                                "--bootstrap-size", "50"), "labelled", "no records",
            ("--bootstrap-size", "0")),
    Command("eval embeddings", ("{vectors}",), "vectors", "no vectors", ("--sample", "1")),
    Command("eval suite", ("{suite}",), "suite", "no tasks", ("--output-format", "xml")),
    Command("mine-negatives", ("{pairs}", "-m", "fake:8", "-n", "1"), "pairs",
            "no pairs: the input is empty", ("--batch-size", "0"), "file"),
    Command("train", ("{pairs}", "-o", "{out}", "--max-steps", "1", "--batch-size", "2",
                      "--device", "cpu"), "pairs", "no training rows: the input is empty",
            ("--max-steps", "0"), "dir"),
    Command("merge", ("{vectors}", "{vectors}"), "vectors", None, ("--input-format", "xml"),
            "file"),
    Command("info", ("{vectors}",), "vectors", None, ("--input-format", "xml")),
    Command("convert", ("{docs}",), "docs", None, ("--limit", "-1"), "file"),
]
BY_PATH = {command.path: command for command in COMMANDS}
# Commands that read no records (shell integration): no input to empty or break, so only the
# usage error and `| head -1` apply to them.
NO_RECORDS = [
    Command("models", ("--output-format", "jsonl"), "", None, ("--output-format", "xml")),
    Command("completion", ("bash",), "", None, ("tcsh",)),
    Command("man", ("embed",), "", None, ("nosuch",)),
]
STDOUT = [c for c in COMMANDS if c.path not in ("index", "train")]  # they write only a folder
WITH_O = [c for c in COMMANDS if c.output]


def ids(command: Command) -> str:
    return command.path


@functools.cache
def options_of(path: str) -> frozenset[str]:
    """The option names the command declares now (the vocabulary is moving)."""
    cmd = dict((" ".join(p[1:]), c) for p, c in command_tree())[path]
    return frozenset(name for param in cmd.params for name in getattr(param, "opts", []))


def test_the_table_covers_every_leaf_command():
    leaves = [" ".join(p[1:]) for p, cmd in command_tree() if not hasattr(cmd, "list_commands")]
    assert sorted(leaves) == sorted([*BY_PATH, *(c.path for c in NO_RECORDS)])


def _jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def _beir(folder, corpus: bytes):
    folder.mkdir()
    (folder / "corpus.jsonl").write_bytes(corpus)
    _jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": f"topic {i}"} for i in range(5)])
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{name: path} of one valid input per kind, an empty file, and a file whose second record
    is broken for each kind (bad_<name>; for beir a folder whose corpus is)."""
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("inputs")
    docs = [{"id": f"d{i}", "text": f"document {i} about topic {i % 50}"} for i in range(DOCS)]
    files = {
        "docs": _jsonl(folder / "docs.jsonl", docs),
        "queries": _jsonl(folder / "queries.jsonl",
                          [{"id": f"q{i}", "text": f"topic {i}"} for i in range(QUERIES)]),
        "pairs": _jsonl(folder / "pairs.jsonl", [{"query": f"topic {i}", "positive": d["text"]}
                                                 for i, d in enumerate(docs[:PAIRS])]),
        "sts": _jsonl(folder / "sts.jsonl", [{"sentence1": f"a {i}", "sentence2": f"b {i % 7}",
                                              "score": i % 5} for i in range(40)]),
        "pairclass": _jsonl(folder / "pairclass.jsonl", [
            {"sentence1": f"a {i}", "sentence2": f"b {i % 7}", "labels": i % 2}
            for i in range(40)]),
        "rerank": _jsonl(folder / "rerank.jsonl", [
            {"query": f"topic {i}", "positive": [f"document {i}"],
             "negative": [f"document {i + 1}", f"document {i + 2}"]} for i in range(20)]),
        "summ": _jsonl(folder / "summ.jsonl", [
            {"machine_summaries": [f"summary {i} {j}" for j in range(3)],
             "human_summaries": [f"reference {i}"], "relevance": [1, 2, 3]}
            for i in range(10)]),
        "labelled": _jsonl(folder / "labelled.jsonl", [
            {"text": f"document {i} about topic {i % 3}", "label": i % 3, "labels": i % 3,
             "split": "train" if i % 4 else "test"} for i in range(60)]),
        "beir": _beir(folder / "beir", (folder / "docs.jsonl").read_bytes()),
        "empty": folder / "empty.jsonl",
    }
    files["empty"].write_bytes(b"")
    files["suite"] = folder / "suite.toml"
    files["suite"].write_text(f'models = ["fake:8"]\n[[tasks]]\nname = "pairs"\n'
                              f'command = "sts"\nargs = ["{files["sts"]}"]\n')
    runner = CliRunner()
    for args in (["embed", files["docs"], "-m", "fake:8", "-o", folder / "vectors.arrow"],
                 ["embed", files["docs"], "-m", "fake:8", "-o", folder / "vectors.jsonl"],
                 ["index", folder / "vectors.arrow", "-o", folder / "index"],
                 ["search", folder / "index", files["queries"], "-k", "3", "-o",
                  folder / "run.jsonl"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    files.update(vectors=folder / "vectors.arrow", index=folder / "index", run=folder / "run.jsonl")
    hits = [orjson.loads(line) for line in files["run"].read_bytes().splitlines()]
    files["qrels"] = folder / "qrels.tsv"
    files["qrels"].write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{h['query_id']}\t{h['id']}\t1\n" for h in hits if h["rank"] == 1))
    first_lines = {name: files[name].read_bytes().splitlines(keepends=True)[0]
                   for name in ("docs", "queries", "pairs", "sts", "run", "pairclass",
                                "rerank", "summ", "labelled", "suite")}
    first_lines["vectors"] = (folder / "vectors.jsonl").read_bytes().splitlines(True)[0]
    for name, line in first_lines.items():
        files[f"bad_{name}"] = folder / f"bad_{name}.jsonl"
        files[f"bad_{name}"].write_bytes(line + b"{oops\n")
    files["bad_beir"] = _beir(folder / "bad_beir", first_lines["docs"] + b"{oops\n")
    files["empty_beir"] = _beir(folder / "empty_beir", b"")
    return files


def argv(command: Command, files: dict, out=None, **replace) -> list[str]:
    given = {k: str(v) for k, v in {**files, "out": out or "unused", **replace}.items()}
    declared = options_of(command.path)
    spelled = [next(name for name in a.split("|") if name in declared) if "|" in a else a
               for a in command.args]
    return [*command.path.split(), *(a.format(**given) for a in spelled)]


def error_lines(stderr: str, path: str) -> list[str]:
    """The error lines of stderr (hint lines left out): one is expected."""
    lines = stderr.splitlines()
    assert all(line.startswith(f"vecpipe {path}: error: ") or line.startswith("hint: ")
               for line in lines), stderr
    return [line for line in lines if not line.startswith("hint: ")]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=ids)
def test_quiet_silences_the_summary(cli, inputs, tmp_path, command):
    loud = cli(*argv(command, inputs, tmp_path / "loud"))
    assert loud.exit_code == 0, loud
    quiet = cli(*argv(command, inputs, tmp_path / "quiet"), "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet


def _snapshot(path) -> dict:
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file()}
    return {"": path.read_bytes()}


@pytest.mark.parametrize("command", WITH_O, ids=ids)
def test_failed_run_leaves_the_output_as_it_was(cli, inputs, tmp_path, command):
    out = tmp_path / ("index" if command.output == "dir" else "out.jsonl")
    if command.output == "dir":
        assert cli(*argv(command, inputs, out)).exit_code == 0
    else:
        out.write_bytes(b'{"previous": "output"}\n')
    before = _snapshot(out)
    bad = {command.input: inputs[f"bad_{command.input}"]}
    args = argv(command, inputs, out, **bad)
    r = cli(*args) if "-o" in args else cli(*args, "-o", out)
    assert r.exit_code == 1, r
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


@pytest.mark.slow
@pytest.mark.parametrize("command", STDOUT, ids=ids)
def test_output_format_jsonl_is_json_lines(cli, inputs, command):
    choice = (["--output-format", "jsonl"] if "--output-format" in options_of(command.path)
              else ["--json"])
    r = cli(*argv(command, inputs), *choice)
    assert r.exit_code == 0, r
    lines = r.stdout_bytes.splitlines()
    assert lines and all(isinstance(orjson.loads(line), dict) for line in lines)


@pytest.mark.parametrize("command", COMMANDS, ids=ids)
def test_empty_input_file(cli, inputs, tmp_path, command, parse_records):
    empty = inputs["empty_beir" if command.input == "beir" else "empty"]
    r = cli(*argv(command, inputs, tmp_path / "out", **{command.input: empty}))
    if command.empty is None:
        assert r.exit_code == 0, r
        if command.path == "info":
            assert orjson.loads(r.stdout)["rows"] == 0
        else:
            assert parse_records(r.stdout_bytes) == []
    else:
        assert r.exit_code == 1 and r.stdout == "", r
        [line] = error_lines(r.stderr, command.path)
        assert command.empty in line, line


@pytest.mark.parametrize("command", COMMANDS, ids=ids)
def test_bad_input_line_is_located(cli, inputs, tmp_path, command):
    bad = inputs[f"bad_{command.input}"]
    where = bad / "corpus.jsonl" if command.input == "beir" else bad
    r = cli(*argv(command, inputs, tmp_path / "out", **{command.input: bad}))
    assert r.exit_code == 1 and r.stdout == "", r
    [line] = error_lines(r.stderr, command.path)
    assert line.endswith(f"({where}:2)"), line


@pytest.mark.slow
@pytest.mark.parametrize("command", STDOUT + NO_RECORDS, ids=ids)
def test_head_closing_the_pipe_is_a_clean_exit(inputs, command):
    vecpipe = shlex.join([sys.executable, "-m", "vecpipe.cli", *argv(command, inputs), "-q"])
    # -q: anything left on stderr is the closed pipe's noise. No pipefail: the shell reports
    # head's status, so ask for vecpipe's own.
    shell = subprocess.run(["bash", "-c", f'{vecpipe} | head -1 >/dev/null; '
                                          'echo "${PIPESTATUS[0]}"'], capture_output=True)
    assert shell.stdout.split() == [b"0"] and shell.stderr == b"", shell


@pytest.mark.parametrize("command", COMMANDS + NO_RECORDS, ids=ids)
def test_usage_error_is_one_line_exit_2(cli, inputs, command):
    r = cli(*argv(command, inputs, "unused"), *command.usage)
    assert r.exit_code == 2 and r.stdout == "", r
    [line] = r.stderr.splitlines()
    assert line.startswith(f"vecpipe {command.path}: error: "), line
