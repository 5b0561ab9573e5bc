"""Shell integration: completions that work in bash (and zsh/fish where installed), `vecpipe
completion`, `vecpipe man`, `make install-shell` and `vecpipe models`. Completion is tested by
running the shells on the generated scripts, not by reading them."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow  # subprocesses, shells and ptys: seconds each

from vecpipe.cli import docgen

REPO = Path(__file__).resolve().parent.parent
BASH = REPO / "completions" / "vecpipe.bash"
COMPLETED = {"--output-format", "--input-format", "--metric", "--dtype", "--index-dtype",
             "--precision", "--on-duplicate", "--backend", "--device", "--engine", "--shape",
             "--sampling", "--on-short", "--method"}


def bash_complete(words: list[str], cwd) -> list[str]:
    """COMPREPLY of the generated bash completion for `words` (the last one being completed)."""
    array = " ".join(shlex.quote(w) for w in words)
    script = (f"source {shlex.quote(str(BASH))}; COMP_WORDS=({array}); "
              f"COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMPREPLY=(); _vecpipe; "
              'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "--norc", "-c", script], cwd=cwd, capture_output=True,
                          text=True, check=True)
    assert done.stderr == "", done.stderr
    return [line for line in done.stdout.splitlines() if line]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx2").mkdir()
    (tmp_path / "docs.jsonl").write_text("{}\n")
    (tmp_path / "queries.jsonl").write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize("words, expected", [
    (["vecpipe", "embed", "x.jsonl", "--back"], ["--backend"]),  # after a positional
    (["vecpipe", "embed", "--batch-size", "8", "x.jsonl", "--dev"], ["--device"]),  # after a value
    (["vecpipe", "embed", "--backend", ""], ["auto", "torch", "onnx", "onnx-int8", "openvino", "numpy"]),
    (["vecpipe", "embed", "--backend", "=", "on"], ["onnx", "onnx-int8"]),  # --backend=on
    (["vecpipe", "embed", "x.jsonl", "--precision", ""],
     ["auto", "float32", "float16", "bfloat16"]),
    (["vecpipe", "search", "idx", "q.jsonl", "--metric", ""], ["cos", "ip", "l2sq", "hamming"]),
    (["vecpipe", "merge", "a", "--on-duplicate", ""], ["error", "first", "last", "keep"]),
    (["vecpipe", "compress", "--dtype", "b"], ["bfloat16", "binary", "bf16", "b1"]),
    (["vecpipe", "eval", "beir", "d", "--cutoffs", "1", "--output-format", "j"],
     ["jsonl", "json"]),
    (["vecpipe", "eval", ""], ["retrieval", "calibrate", "beir", "sts", "pair-classification",
                               "reranking", "bitext-mining", "summarization", "classification",
                               "clustering", "suite", "embeddings"]),
    (["vecpipe", "completion", ""], ["bash", "zsh", "fish"]),
    (["vecpipe", "man", "ev"], ["eval"]),
    (["vecpipe", "embed", "--prompt", ""], []),  # free text: nothing offered
])
def test_bash_completes(folder, words, expected):
    assert bash_complete(words, folder) == expected


def test_bash_offers_new_commands_and_folders(folder):
    top = bash_complete(["vecpipe", ""], folder)
    assert {"embed", "search", "models", "completion", "man"} <= set(top)
    assert sorted(bash_complete(["vecpipe", "search", ""], folder)) == ["idx", "idx2"]
    assert sorted(bash_complete(["vecpipe", "eval", "beir", ""], folder)) == ["idx", "idx2"]
    # QUERIES after the INDEX, and -o, are files (folders too, to walk into them)
    assert sorted(bash_complete(["vecpipe", "search", "idx", ""], folder)) == [
        "docs.jsonl", "idx", "idx2", "queries.jsonl"]
    assert sorted(bash_complete(["vecpipe", "embed", "-o", "q"], folder)) == ["queries.jsonl"]
    assert bash_complete(["vecpipe", "embed", "d"], folder) == ["docs.jsonl"]


def test_every_option_with_choices_completes_them(folder):
    seen = set()
    for path, cmd in docgen.command_tree()[1:]:
        for param in cmd.params:
            if not docgen._takes_value(param):
                continue
            kind = docgen.value_kind(param)
            name = max(param.opts, key=len)
            if name in COMPLETED:
                assert isinstance(kind, tuple), f"{' '.join(path)} {name}: no choices"
            if isinstance(kind, tuple):
                seen.add(name)
                got = bash_complete([*path, name, ""], folder)
                assert got == list(kind), (path, name)
                assert all(c.replace("-", "").isalnum() for c in got), got
    assert COMPLETED <= seen


def test_choices_come_from_the_help_text():
    assert docgen.help_choices("cos|ip|l2sq|hamming. Default: cos") == (
        "cos", "ip", "l2sq", "hamming")
    assert docgen.help_choices("auto|cpu|cuda|cuda:N|mps (auto prefers CUDA)") == (
        "auto", "cpu", "cuda", "mps")
    assert docgen.help_choices("Fields A,B or `id`") == ()


def _zsh_listing(line: str, fpath) -> str:
    """What zsh lists for `line` + TAB, run in a pty (zsh/zpty)."""
    script = f"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z 'fpath=({fpath} $fpath); autoload -U compinit; compinit -u -D; PROMPT="> "; unsetopt beep'
zpty -w -n z {shlex.quote(line)}$'\\t'
sleep 2
out=""
while zpty -r -t z chunk; do out+=$chunk; done
zpty -d z
print -r -- "$out"
"""
    done = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=fpath)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)  # without the terminal's colours


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_choices_and_options(tmp_path):
    shutil.copy(REPO / "completions" / "_vecpipe", tmp_path / "_vecpipe")
    assert subprocess.run(["zsh", "-n", str(tmp_path / "_vecpipe")]).returncode == 0
    (tmp_path / "idxfolder").mkdir()
    listing = _zsh_listing("vecpipe embed --backend ", tmp_path)
    assert all(word in listing for word in ("onnx-int8", "openvino", "torch")), listing
    listing = _zsh_listing("vecpipe embed x.jsonl --back", tmp_path)
    assert "--backend" in listing, listing
    listing = _zsh_listing("vecpipe search idxf", tmp_path)
    assert "idxfolder/" in listing, listing


def _fish(line: str, cwd) -> list[str]:
    script = f"source {shlex.quote(str(REPO / 'completions' / 'vecpipe.fish'))}; " \
             f"complete -C {shlex.quote(line)}"
    done = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True,
                          text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stderr
    return [row.split("\t")[0] for row in done.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_choices_options_and_folders(folder):
    assert sorted(_fish("vecpipe embed --backend ", folder)) == [
        "auto", "numpy", "onnx", "onnx-int8", "openvino", "torch"]
    assert "--backend" in _fish("vecpipe embed x.jsonl --back", folder)
    assert sorted(_fish("vecpipe eval ", folder)) == [
        "beir", "bitext-mining", "calibrate", "classification", "clustering", "embeddings",
        "pair-classification", "reranking", "retrieval", "sts", "suite", "summarization"]
    assert sorted(_fish("vecpipe search ", folder)) == ["idx/", "idx2/"]
    assert "--output-format" in _fish("vecpipe eval beir --out", folder)


@pytest.mark.parametrize("shell, rel", [("bash", "completions/vecpipe.bash"),
                                        ("zsh", "completions/_vecpipe"),
                                        ("fish", "completions/vecpipe.fish")])
def test_completion_prints_the_script(cli, shell, rel):
    r = cli("completion", shell)
    assert r.exit_code == 0, r
    assert r.stdout == (REPO / rel).read_text()


def test_completion_of_an_unknown_shell_is_a_usage_error(cli):
    r = cli("completion", "tcsh")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("vecpipe completion: error: unknown shell 'tcsh'")


@pytest.mark.parametrize("words, page", [(["embed"], "vecpipe-embed"),
                                         (["eval", "beir"], "vecpipe-eval-beir"),
                                         (["eval-beir"], "vecpipe-eval-beir"),
                                         (["mine-negatives"], "vecpipe-mine-negatives"),
                                         ([], "vecpipe")])
def test_man_prints_the_page_on_a_pipe(cli, words, page):
    r = cli("man", *words)
    assert r.exit_code == 0, r
    assert r.stdout == (REPO / "man" / f"{page}.1").read_text()


def test_man_of_an_unknown_command_is_a_usage_error(cli):
    r = cli("man", "nosuch")
    assert r.exit_code == 2 and r.stdout == ""
    assert "no manual page for 'nosuch'" in r.stderr


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("script") is None,
                    reason="needs man and script(1)")
def test_man_on_a_terminal_shows_the_formatted_page(tmp_path):
    command = shlex.join([sys.executable, "-m", "vecpipe.cli", "man", "search"])
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80", TERM="dumb")
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)
    text = re.sub(".\x08", "", done.stdout.decode(errors="replace"))  # man's overstrike bold
    assert done.returncode == 0, text
    assert "SYNOPSIS" in text and "vecpipe search" in text
    assert ".TH" not in text and ".SH" not in text  # rendered by man, not the roff source


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_shell_puts_pages_and_completions_in_the_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    subprocess.run(["make", "-s", "install-shell", f"VENV={venv}"], cwd=REPO, check=True,
                   capture_output=True)
    share = venv / "share"
    for path, cmd in docgen.command_tree():
        assert (share / "man" / "man1" / f"{'-'.join(path)}.1").is_file()
    assert (share / "bash-completion/completions/vecpipe").read_text() == BASH.read_text()
    assert (share / "zsh/site-functions/_vecpipe").is_file()
    assert (share / "fish/vendor_completions.d/vecpipe.fish").is_file()
    if shutil.which("man"):  # man finds the pages through PATH once the venv is active
        env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
        env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
        found = subprocess.run(["man", "-w", "vecpipe-embed"], env=env, capture_output=True,
                               text=True)
        assert found.stdout.strip() == str(share / "man" / "man1" / "vecpipe-embed.1")


def _model(folder: Path, *, dim=8, max_length=64, prompts=None, st=True, weights=b"w" * 1000):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["BertModel"], "hidden_size": 32, "max_position_embeddings": 512}))
    if st:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": dim}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length":
                                                                      max_length}))
        (folder / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts or {}}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture
def caches(tmp_path):
    """An HF hub cache (snapshot files symlinked to blobs, as the hub writes them), a
    sentence-transformers home, and a model folder."""
    snapshot = _model(tmp_path / "hf/hub/models--org--small/snapshots/abc123", dim=16,
                      max_length=128, prompts={"query": "query: ", "passage": "passage: "})
    blobs = tmp_path / "hf/hub/models--org--small/blobs"
    blobs.mkdir()
    (blobs / "weights").write_bytes((snapshot / "model.safetensors").read_bytes())
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(blobs / "weights")
    _model(tmp_path / "st/old-style-model", dim=24, max_length=32)
    _model(tmp_path / "mine", st=False)
    (tmp_path / "not-a-model").mkdir()
    env = {"HF_HOME": str(tmp_path / "hf"), "SENTENCE_TRANSFORMERS_HOME": str(tmp_path / "st"),
           "XDG_CACHE_HOME": str(tmp_path / "nocache"), "HF_HUB_CACHE": None,
           "HUGGINGFACE_HUB_CACHE": None, "VECPIPE_OUTPUT_FORMAT": None}
    return tmp_path, env


def test_models_lists_bundled_cached_and_given_models(cli, caches):
    root, env = caches
    r = cli("models", root / "mine", env=env)
    assert r.exit_code == 0, r
    found = {m["name"]: m for m in map(orjson.loads, r.stdout.splitlines())}  # JSONL on a pipe
    bundled = found["sentence-transformers/all-MiniLM-L6-v2"]
    assert (bundled["source"], bundled["dim"], bundled["max_length"]) == ("bundled", 384, 256)
    small = found["org/small"]
    assert (small["source"], small["dim"], small["max_length"]) == ("hf-cache", 16, 128)
    assert small["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert small["path"].endswith("snapshots/abc123")
    weights = 1000
    assert weights <= small["bytes"] < 2 * weights  # the blob once, not once per link
    assert (found["old-style-model"]["source"], found["old-style-model"]["dim"]) == (
        "st-cache", 24)
    mine = found["mine"]  # a plain transformers folder: dims from config.json
    assert (mine["source"], mine["dim"], mine["max_length"], mine["prompts"]) == (
        "folder", 32, 512, {})
    assert not mine["sentence_transformers"]


def test_models_reads_configs_not_weights(caches):
    root, env = caches
    weights = root / "mine" / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # opening it to read would block: the listing must not
    full_env = {k: v for k, v in os.environ.items() if k not in env}
    full_env.update({k: v for k, v in env.items() if v is not None})
    done = subprocess.run([sys.executable, "-m", "vecpipe.cli", "models", str(root / "mine"),
                           "--output-format", "json"], capture_output=True, env=full_env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "mine" in {m["name"] for m in json.loads(done.stdout)}


def test_models_rejects_a_folder_that_is_no_model(cli, caches):
    root, env = caches
    r = cli("models", root / "not-a-model", env=env)
    assert r.exit_code == 1 and r.stdout == ""
    assert "not a model folder" in r.stderr
    r = cli("models", "--output-format", "xml", env=env)
    assert r.exit_code == 2


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a pty")
def test_models_prints_a_table_on_a_terminal(caches):
    root, env = caches
    full_env = {k: v for k, v in os.environ.items() if k not in env}
    full_env.update({k: v for k, v in env.items() if v is not None}, COLUMNS="200")
    command = shlex.join([sys.executable, "-m", "vecpipe.cli", "models"])
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          env=full_env, timeout=60, stdin=subprocess.DEVNULL)
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, text
    assert "org/small" in text and "max length" in text and "query, passage" in text
    assert not text.lstrip().startswith("{")
