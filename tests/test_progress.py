"""Progress bars: on stderr only for a terminal or with --progress, with a moving count, a rate
and, for a plain input file, the total; -q silences them; in a pipe, only the summary line."""
import re

import pytest

pytestmark = pytest.mark.slow  # subprocesses, shells and ptys: seconds each

N = 300


@pytest.fixture
def corpus(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "corpus.jsonl",
                       [{"id": f"d{i}", "text": f"document number {i}"} for i in range(N)])


def _states(stderr: str, unit: str) -> list[str]:
    """The bar's states as drawn (tqdm redraws a line after a carriage return)."""
    return [s for s in re.split(r"[\r\n]", stderr) if unit + "/s" in s or f"0{unit} " in s]


def _counts(states: list[str]) -> list[int]:
    found = []
    for state in states:
        match = re.search(r"(\d+)(?:/\d+)?(?:\w+)? \[", state) or re.search(r" (\d+)/\d+ ", state)
        if match:
            found.append(int(match.group(1)))
    return found


def test_embed_progress_moves_to_the_total_with_a_rate(cli, corpus, tmp_path):
    out = tmp_path / "v.arrow"
    result = cli("embed", corpus, "-m", "fake:8", "--window", "50", "-o", out, "--progress")
    assert result.exit_code == 0, result
    states = _states(result.stderr, "rec")
    assert states, result.stderr
    counts = _counts(states)
    assert counts[0] == 0 and counts[-1] == N and len(set(counts)) >= 2, states
    assert f"{N}/{N}" in states[-1]            # the total (from the file's lines)
    assert re.search(r"\d[\d.]*rec/s", states[-1])  # a rate
    assert "embed" in states[-1]


def test_index_progress_moves_to_the_total_with_a_rate(cli, corpus, tmp_path):
    vectors = tmp_path / "v.parquet"
    assert cli("embed", corpus, "-m", "fake:8", "-o", vectors, "-q").exit_code == 0
    result = cli("index", vectors, "-o", tmp_path / "idx", "--progress")
    assert result.exit_code == 0, result
    states = _states(result.stderr, "vec")
    counts = _counts(states)
    assert counts and counts[0] == 0 and counts[-1] == N, states
    assert f"{N}/{N}" in states[-1]            # the total from the Parquet footer
    assert re.search(r"\d[\d.]*vec/s", states[-1])


def test_no_bar_in_a_pipe_without_progress(cli, corpus, tmp_path):
    result = cli("embed", corpus, "-m", "fake:8", "--window", "50", "-o", tmp_path / "v.arrow")
    assert result.exit_code == 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "\r" not in result.stderr and "rec/s" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("vecpipe embed: "), result.stderr
    result = cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx")
    assert result.exit_code == 0, result
    assert "vec/s" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_quiet_silences_the_forced_bar(cli, corpus, tmp_path):
    result = cli("embed", corpus, "-m", "fake:8", "-o", tmp_path / "v.arrow", "--progress", "-q")
    assert result.exit_code == 0, result
    assert result.stderr == ""
    result = cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx", "--progress", "-q")
    assert result.exit_code == 0 and result.stderr == "", result


def test_the_bar_on_stdin_has_no_total_but_moves(cli, corpus, tmp_path):
    result = cli("embed", "-", "-m", "fake:8", "--window", "50", "-o", tmp_path / "v.arrow",
                 "--progress", input=corpus.read_bytes())
    assert result.exit_code == 0, result
    states = _states(result.stderr, "rec")
    counts = _counts(states)
    assert counts[0] == 0 and counts[-1] == N, states
    assert f"/{N}" not in result.stderr   # no size known for a pipe: no made-up total
