"""Contract over every registered command: help with an example, man page, exit codes, stdio
discipline; and the app-level promises (light start-up, --version, python -m)."""
import subprocess
import sys
from pathlib import Path

import pytest

from vecpipe.cli.docgen import command_tree

REPO = Path(__file__).resolve().parent.parent
PATHS = [path for path, _ in command_tree()]
LEAVES = [path for path, cmd in command_tree() if not hasattr(cmd, "list_commands")]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p))
def test_help_has_an_example_and_a_man_page(cli, path):
    r = cli(*path[1:], "--help")
    assert r.exit_code == 0, r
    assert "Usage:" in r.stdout and r.stderr == ""
    if path in LEAVES:
        assert "Example" in r.stdout, f"{' '.join(path)} --help shows no example"
    assert (REPO / "man" / f"{'-'.join(path)}.1").is_file()


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: " ".join(p))
def test_unknown_option_is_usage_error(cli, path):
    r = cli(*path[1:], "--definitely-not-an-option")
    assert r.exit_code == 2
    assert r.stdout == ""
    # click's own usage errors take the one-line form of every other error
    assert r.stderr.splitlines() == [
        f"{' '.join(path)}: error: No such option: --definitely-not-an-option "
        f"(see '{' '.join(path)} --help')"], r.stderr


@pytest.mark.slow
def test_bad_option_value_is_one_usage_line(run_vecpipe):
    r = run_vecpipe("search", "idx", "-k", "0")
    assert r.returncode == 2 and r.stdout == b""
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vecpipe search: error: Invalid value for '-k'")
    assert lines[0].endswith("(see 'vecpipe search --help')")
    r = run_vecpipe("no-such-command")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [
        "vecpipe: error: No such command 'no-such-command'. (see 'vecpipe --help')"]
    r = run_vecpipe()  # bare: the help, as before
    assert b"Usage: vecpipe" in r.stdout + r.stderr and b"Commands:" in r.stdout + r.stderr


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: " ".join(p))
def test_summary_line_in_root_help(cli, path):
    if len(path) == 2:
        assert path[1] in cli("--help").stdout


def test_root_help_lists_commands_in_registry_order(cli):
    from vecpipe.cli.app import COMMANDS

    out = cli("--help").stdout
    positions = [out.index(f"  {name} ") for name, _ in COMMANDS]
    assert positions == sorted(positions)


def test_version(cli):
    from vecpipe.cli import __version__

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"vecpipe {__version__}"


def _modules_after(args):
    code = ("import sys; from vecpipe.cli.app import app\n"
            "try:\n    app(%r, prog_name='vecpipe')\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'sentence_transformers', 'transformers', 'usearch'))), file=sys.stderr)"
            % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         input=b'{"id": "1"}\n')
    lines = out.stderr.decode().strip().splitlines()
    return lines[-1] if lines and not lines[-1].startswith("vecpipe") else ""


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["info", "-"], ["convert", "-"]])
def test_light_commands_import_no_torch(args):
    assert _modules_after(args) == ""


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "vecpipe.cli", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("vecpipe ")


@pytest.mark.slow
def test_debug_env_shows_traceback(run_vecpipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    quiet = run_vecpipe("convert", bad)
    assert quiet.returncode == 1 and b"Traceback" not in quiet.stderr
    assert quiet.stderr.decode().count("\n") == 1
    loud = run_vecpipe("convert", bad, env={"VECPIPE_DEBUG": "1"})
    assert loud.returncode == 1 and b"Traceback" in loud.stderr


