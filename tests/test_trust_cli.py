"""The error boundary's promises for failures no command raises itself: SIGTERM cleans up like
Ctrl-C, OS errors and other library exceptions become `<cause> (<file>)` lines, a crafted filter
is a usage error, and a model with its own code points at --trust-remote-code."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import typer

from vecpipe.cli.errors import boundary


def _run_bounded(capsys, exc):
    def command(quiet=False):
        raise exc
    with pytest.raises(typer.Exit) as exit_info:
        boundary("convert")(command)()
    return exit_info.value.exit_code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("exc, line", [
    (OSError(errno.ENOSPC, "No space left on device", "out.arrow"),
     "vecpipe convert: error: disk full (no space left on device) (out.arrow)"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out.jsonl"),
     "vecpipe convert: error: permission denied (/ro/out.jsonl)"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "idx"),
     "vecpipe convert: error: is a directory, expected a file name (idx)"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "vecpipe convert: error: disk full (no space left on device) (<stdout>)"),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"),
     "vecpipe convert: error: the input ended early: a truncated or corrupt compressed file?"),
    (RecursionError("maximum recursion depth exceeded"),
     "vecpipe convert: error: the input is nested too deeply to process"),
])
def test_library_errors_are_one_line_with_the_file(capsys, exc, line):
    code, lines = _run_bounded(capsys, exc)
    assert code == 1
    assert lines[0] == line
    assert not any("report it" in text or "Error:" in text for text in lines)


def test_disk_full_hints_what_to_do(capsys):
    _, lines = _run_bounded(capsys, OSError(errno.ENOSPC, "No space left on device", "o"))
    assert lines[1].startswith("hint: free some space")


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c_and_exits_143(tmp_path):
    """A producer that never ends: SIGTERM must leave neither the output nor its temporary."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old"}\n')
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "convert", "-", "-o", str(out)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"".join(b'{"id": "%d", "text": "x"}\n' % i for i in range(5000)))
    proc.stdin.flush()
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if p.name != "out.jsonl"] and time.time() < deadline:
        time.sleep(0.05)  # until the temporary output exists: the command is mid-stream
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.decode().splitlines() == ["vecpipe convert: error: terminated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    assert out.read_text() == '{"id": "old"}\n'


def test_a_filter_nested_3000_deep_is_a_usage_error(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": f"d{i}", "text": f"t {i}", "n": i}
                                             for i in range(20)])
    vectors = cli("embed", src, "-m", "fake:8", "-o", tmp_path / "v.arrow")
    assert vectors.exit_code == 0, vectors
    r = cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx", "--fields", "n")
    assert r.exit_code == 0, r
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "text": "t 3"}])
    deep = "(" * 3000 + "n > 1" + ")" * 3000
    r = cli("search", tmp_path / "idx", queries, "-m", "fake:8", "--filter", deep)
    assert r.exit_code == 2, r
    assert len(r.stderr.splitlines()) == 1 and "nested deeper than 100 levels" in r.stderr
    r = cli("search", tmp_path / "idx", queries, "-m", "fake:8", "--filter", "not " * 3000 + "n")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory, bundled_model_path):
    """The bundled model's folder, with a config that names its own Python classes."""
    import json

    folder = tmp_path_factory.mktemp("models") / "custom"
    shutil.copytree(bundled_model_path, folder, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="x-custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModel": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass XConfig(PretrainedConfig):\n"
        "    model_type = 'x-custom'\n")
    (folder / "modeling_x.py").write_text("from transformers import BertModel as XModel\n")
    return folder


@pytest.mark.slow
def test_model_with_custom_code_points_at_trust_remote_code(cli, tmp_path, write_jsonl,
                                                            custom_code_model):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}])
    r = cli("embed", src, "-m", custom_code_model, "--output-format", "jsonl")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"vecpipe embed: error: model '{custom_code_model}' comes with its own Python code, "
        "which vecpipe does not run unless asked",
        "hint: read that code, then pass --trust-remote-code"]


@pytest.mark.slow
def test_custom_code_hint_names_no_option_the_command_lacks(cli, tmp_path, write_jsonl,
                                                            custom_code_model):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}])
    assert cli("embed", src, "-o", tmp_path / "v.arrow").exit_code == 0
    assert cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx").exit_code == 0
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "text": "x"}])
    r = cli("search", tmp_path / "idx", queries, "-m", custom_code_model, "--force")
    assert r.exit_code == 1, r
    assert "comes with its own Python code" in r.stderr
    assert "hint: this command cannot run such a model" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_ctrl_c_while_the_app_starts_is_quiet_and_130(delay):
    """Before the app can catch anything it imports every command (about a second)."""
    script = os.path.join(os.path.dirname(sys.executable), "vecpipe")
    proc = subprocess.Popen([script, "convert", "-", "--output-format", "jsonl"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and stderr.strip().endswith(b"interrupted"), stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [["info"], ["eval", "embeddings"], ["info", "--output-format", "jsonl"]])
def test_reports_to_a_closed_stdout_are_one_line(tmp_path, command):
    records = tmp_path / "v.jsonl"
    records.write_text("".join(f'{{"id": "{i}", "embedding": [{i}.0, 1.0]}}\n' for i in range(5)))
    script = os.path.join(os.path.dirname(sys.executable), "vecpipe")
    shell = " ".join([script, *command, str(records), ">&-"])
    done = subprocess.run(["bash", "-c", shell], capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode().splitlines()[0] == \
        f"vecpipe {' '.join(command[:2] if command[0] == 'eval' else command[:1])}: error: " \
        "stdout is closed (<stdout>)"
