"""Searching by hand: a table on a terminal (under a real pty), typed queries answered line by
line (a REPL at a terminal, and a pipe that feeds queries slowly), records on a pipe."""
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, shells and ptys: seconds each

VECPIPE = str(Path(sys.executable).with_name("vecpipe"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG = "long words " * 40


def env():
    e = dict(os.environ)
    for name in ("COLUMNS", "LINES", "VECPIPE_OUTPUT_FORMAT"):
        e.pop(name, None)
    return e


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("terminal")
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "title": f"title {i} {LONG}",
                                        "text": f"text about topic {i}"}) + "\n"
                            for i in range(30)))
    subprocess.run(f"{VECPIPE} embed {docs} -m fake:16 | {VECPIPE} index -o {folder / 'idx'} "
                   "--fields title", shell=True, check=True, capture_output=True, env=env())
    return folder / "idx"


def spawn_on_pty(args, columns=60, stdin_pty=False):
    """vecpipe with stdout and stderr (and stdin) on a pty `columns` wide: (process, master)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([VECPIPE, *map(str, args)], stdout=slave, stderr=slave,
                            stdin=slave if stdin_pty else subprocess.DEVNULL, env=env(),
                            close_fds=True)
    os.close(slave)
    return proc, master


def read_until(master, pattern, seen="", timeout=60):
    """What the pty showed (ANSI codes removed) once `pattern` is in it."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, ANSI.sub("", seen).replace("\r", "")):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} after {timeout}s; got {seen!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the pty
                chunk = b""
            if not chunk:
                raise AssertionError(f"pty closed before {pattern!r}; got {seen!r}")
            seen += chunk.decode("utf-8", "replace")
    return ANSI.sub("", seen).replace("\r", "")


def read_all(master, proc, timeout=60):
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    return ANSI.sub("", out.decode("utf-8", "replace")).replace("\r", "")


@pytest.mark.slow
def test_a_terminal_gets_a_table_cut_to_its_width(idx):
    proc, master = spawn_on_pty(["search", idx, "-k", "3", "--fields", "title",
                                 "--query", "vitamin D and bone loss"], columns=60)
    shown = read_all(master, proc)
    assert proc.returncode == 0, shown
    lines = shown.splitlines()
    assert lines[0] == "vitamin D and bone loss"  # the query text as the heading
    assert re.match(r"rank\s+score\s+id\s+title", lines[1])
    hits = [line for line in lines if re.match(r"\s+\d+\s+-?\d+\.\d{3}\s+d\d+\s+title", line)]
    assert len(hits) == 3  # rank, a 3-decimal score, the id, the stored field
    assert all(len(line) <= 60 and line.rstrip().endswith("…") for line in hits)
    assert "query_id" not in shown and "{" not in shown  # not JSONL


@pytest.mark.slow
def test_a_terminal_is_a_repl_answering_each_line(idx):
    proc, master = spawn_on_pty(["search", idx, "-k", "2", "--fields", "title"], columns=80,
                                stdin_pty=True)
    seen = read_until(master, r"query> ")  # the model is loaded before the first prompt
    os.write(master, b"vitamin d\n")
    first = read_until(master, r"(query> (.|\n)*){2}", seen)  # answered, then the next prompt
    answer = first.split("query> ")[1]
    assert re.search(r"vitamin d\n(.|\n)*\n\s+1\s+\d\.\d{3}\s+d\d+(.|\n)*\n\s+2\s", answer)
    os.write(master, b"\n")  # a blank line is skipped at a terminal
    os.write(master, b"bone loss\n")
    second = read_until(master, r"bone loss\n(.|\n)*\s+2\s+\d\.\d{3}(.|\n)*query> ", first)
    os.write(master, b"\x04")  # Ctrl-D ends it
    rest = read_all(master, proc)
    assert proc.returncode == 0, second + rest
    assert "4 hits for 2 queries" in rest


@pytest.mark.slow
def test_a_slow_pipe_gets_each_answer_before_the_next_query(idx):
    proc = subprocess.Popen([VECPIPE, "search", str(idx), "-k", "2", "--output-format", "jsonl"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), bufsize=0)  # select sees all

    def answer():
        rows = []
        for _ in range(2):
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "no answer within 60 s while the next query was held back"
            rows.append(json.loads(proc.stdout.readline()))
        return rows

    proc.stdin.write(b"vitamin d\n")
    proc.stdin.flush()
    first = answer()  # arrives while stdin is still open, before the second query is sent
    assert [row["query_id"] for row in first] == ["1", "1"]
    assert [row["rank"] for row in first] == [1, 2]
    proc.stdin.write(b"bone loss\n")
    proc.stdin.flush()
    assert [row["query_id"] for row in answer()] == ["2", "2"]
    proc.stdin.close()
    assert proc.stdout.read() == b""
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def run(args, stdin=None):
    return subprocess.run(args if isinstance(args, str) else [VECPIPE, *map(str, args)],
                          input=stdin, capture_output=True, env=env(), timeout=120,
                          shell=isinstance(args, str))


@pytest.mark.slow
def test_a_pipe_gets_records_and_table_only_when_asked(idx):
    piped = run(["search", idx, "-k", "2", "--query", "vitamin d"])
    assert piped.returncode == 0
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [row["rank"] for row in rows] == [1, 2]
    asked = run(["search", idx, "-k", "2", "--fields", "title", "--output-format", "table"],
                stdin=b"vitamin d\n")
    assert asked.returncode == 0, asked.stderr
    text = asked.stdout.decode()
    assert text.startswith("vitamin d\n") and re.search(r"\n\s+1\s+\d\.\d{3}\s+d\d+", text)
    trec = run(["search", idx, "-k", "2", "--query", "x", "--output-format", "trec"])
    assert trec.returncode == 0 and len(trec.stdout.splitlines()) == 2


@pytest.mark.slow
def test_records_on_stdin_are_still_read_as_records(idx, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "a", "text": "vitamin d"}) + "\n"
                       + json.dumps({"id": "b", "text": "bone loss"}) + "\n")
    by_file = run(["search", idx, queries, "-k", "2"])
    jsonl = run(["search", idx, "-k", "2"], stdin=queries.read_bytes())
    arrow = run(f"{VECPIPE} embed {queries} -m fake:16 | {VECPIPE} search {idx} -k 2")
    gz = run(f"gzip -c {queries} | {VECPIPE} search {idx} -k 2")
    for result in (by_file, jsonl, arrow, gz):
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["query_id"] for line in result.stdout.splitlines()] == \
            ["a", "a", "b", "b"]
    assert jsonl.stdout == by_file.stdout == gz.stdout
