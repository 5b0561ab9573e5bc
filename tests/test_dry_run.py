"""Checks before the slow part: embed fails on its first records before the model loads, and
`--dry-run` prints the plan after those checks, writing nothing."""
import json
import os
import subprocess
import sys

import pytest
from vecpipe.cli import models

DOCS = [{"id": "d1", "title": "first title", "body": "first body"},
        {"id": "d2", "title": "second title", "body": "second body"}]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)
    return calls


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args,message", [
    ((), "no field 'text' to embed in the first records; fields are id, title, body"),
    (("--text-field", "title", "--text-field", "titel"), "no field 'titel' to embed"),
    (("--text-field", "title", "--skip-invalid", "--text-field", "titel"),
     "no field 'titel' to embed"),
    (("--text-field", "title", "--id-field", "doc_id"), "no field 'doc_id'; fields are id"),
])
def test_a_bad_field_fails_before_the_model_loads(cli, tmp_path, write_jsonl, no_model_load,
                                                  args, message):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    result = cli("embed", src, *args, "-o", tmp_path / "out.arrow")
    assert result.exit_code == 1, result
    assert message in result.stderr and not no_model_load
    assert listing(tmp_path) == ["docs.jsonl"]


def test_the_first_invalid_record_fails_before_the_model_loads(cli, tmp_path, write_jsonl,
                                                               no_model_load):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": 7}])
    result = cli("embed", src)
    assert result.exit_code == 1 and "holds int64, not text" in result.stderr
    assert f"({src}:1)" in result.stderr and not no_model_load
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "1", "text": "ok"}, {"id": "2"}])
    result = cli("embed", empty)
    assert result.exit_code == 1 and f"({empty}:2)" in result.stderr
    assert "--skip-invalid" in result.stderr and not no_model_load


def test_stdin_is_checked_and_then_embedded_whole(cli, write_jsonl, tmp_path):
    """The check peeks at the first batch: the run still reads every record of stdin."""
    records = [{"id": str(i), "text": f"text {i}"} for i in range(3000)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    result = cli("embed", "-m", "fake:4", "--output-format", "jsonl", input=data)
    assert result.exit_code == 0
    assert [r["id"] for r in result.records()] == [str(i) for i in range(3000)]


@pytest.mark.slow
def test_a_failing_check_never_imports_torch(tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    probe = ("import sys\nfrom vecpipe.cli import main\nsys.argv = ['vecpipe', 'embed', "
             f"{str(src)!r}]\ntry:\n    main()\nexcept SystemExit as end:\n"
             "    print(end.code, 'torch' in sys.modules, 'sentence_transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["1", "False", "False"], done.stderr
    assert "no field 'text' to embed" in done.stderr


def plan_of(cli, *args, env=None):
    result = cli("embed", *args, "--dry-run", env=env)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_dry_run_prints_the_plan_and_writes_nothing(cli, tmp_path, write_jsonl, no_model_load):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    before = listing(tmp_path)
    plan = plan_of(cli, src, "--text-field", "title", "--text-field", "body", "--chunk-tokens",
                   "100", "--dim", "128", "--prompt", "passage: ", "--cache", tmp_path / "c",
                   "-o", tmp_path / "out.parquet")
    assert listing(tmp_path) == before and not no_model_load
    assert plan["inputs"] == [{"input": str(src), "format": "jsonl", "records": None}]
    assert plan["text_fields"] == ["title", "body"] and plan["id_field"] == "id"
    assert (plan["model"], plan["model_source"]) == ("sentence-transformers/all-MiniLM-L6-v2",
                                                     "bundled")
    assert (plan["dim"], plan["max_length"], plan["prompt"]) == (128, 256, "passage: ")
    assert (plan["output"], plan["output_format"]) == (str(tmp_path / "out.parquet"), "parquet")
    assert plan["chunk_tokens"] == 100 and plan["cache"] == str(tmp_path / "c")
    assert plan["window"] == 4096 and plan["batch_size"] == 32


def test_dry_run_counts_records_where_a_footer_says(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": str(i), "text": "t"} for i in range(7)])
    assert cli("convert", src, "-o", tmp_path / "docs.parquet").exit_code == 0
    plan = plan_of(cli, tmp_path / "docs.parquet", src, "-m", "fake:8")
    assert [(i["format"], i["records"]) for i in plan["inputs"]] == [("parquet", 7),
                                                                     ("jsonl", None)]
    assert plan["records"] is None
    assert plan_of(cli, tmp_path / "docs.parquet", "-m", "fake:8")["records"] == 7
    assert plan["output"] == "stdout" and plan["output_format"] == "arrow"
    assert plan["id_field"] == "id" and plan["dim"] == 8 and plan["max_length"] is None


def test_dry_run_of_a_folder_lists_its_files(cli, tmp_path):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "a.md").write_text("alpha")
    (notes / "sub" / "b.md").write_text("beta")
    plan = plan_of(cli, notes, "--glob", "**/*.md", "-m", "fake:8", "-o", tmp_path / "n.arrow")
    assert plan["inputs"] == [{"input": str(notes), "format": "files", "records": None,
                               "files": 2}]
    assert not (tmp_path / "n.arrow").exists()


@pytest.mark.parametrize("args,code,message", [
    (("--dim", "1000"), 2, "--dim 1000 exceeds the model's 384 dimensions"),
    (("--max-length", "1000"), 2, "--max-length 1000 exceeds the model's window of 512"),
    (("--chunk-tokens", "300"), 2, "--chunk-tokens 300 does not fit the model's 256-token"),
    (("--prompt-name", "query"), 2, "has no prompt named 'query'"),
    (("-m", "nobody/no-such-model"), 1, "not in the local model caches"),
    (("-o", "no/such/folder/out.arrow"), 1, "no such folder for the output"),
    (("-o", "out.unknown"), 2, "cannot tell the output format"),
    (("--text-field", "titel"), 1, "no field 'titel' to embed"),
])
def test_dry_run_fails_as_the_run_would(cli, tmp_path, write_jsonl, no_model_load, args, code,
                                        message):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": "t", "title": "x"}])
    os.chdir(tmp_path)
    result = cli("embed", src, *args, "--dry-run")
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) <= 2  # the error line and maybe a hint
    assert listing(tmp_path) == ["docs.jsonl"] and not no_model_load


def test_dry_run_checks_every_input(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": "t"}])
    result = cli("embed", src, tmp_path / "missing.jsonl", "-m", "fake:8", "--dry-run")
    assert result.exit_code == 1 and "missing.jsonl" in result.stderr
    assert "no such file" in result.stderr


def test_dry_run_finds_models_in_folders_and_the_hub_cache(cli, tmp_path, write_jsonl,
                                                          no_model_load):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": "t"}])
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    (snapshot / "1_Pooling").mkdir(parents=True)
    (snapshot / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (snapshot / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 48}')
    (snapshot / "sentence_bert_config.json").write_text('{"max_seq_length": 77}')
    (snapshot / "config_sentence_transformers.json").write_text(
        '{"prompts": {"query": "q: ", "document": ""}}')
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    plan = plan_of(cli, src, "-m", "org/tiny", "--prompt-name", "query", env=env)
    assert (plan["model"], plan["model_source"], plan["dim"], plan["max_length"],
            plan["prompt"]) == ("org/tiny", "hf-cache", 48, 77, "q: ")
    folder = plan_of(cli, src, "-m", snapshot)
    assert (folder["model"], folder["model_source"], folder["dim"]) == (str(snapshot), "folder",
                                                                        48)
    not_a_model = cli("embed", src, "-m", tmp_path, "--dry-run")
    assert not_a_model.exit_code == 1 and "not a model folder" in not_a_model.stderr


def test_dry_run_refuses_the_ray_engine(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": "t"}])
    result = cli("embed", "--engine", "ray", src, "-o", tmp_path / "o.arrow", "--dry-run")
    assert result.exit_code == 2 and "leave out --engine ray" in result.stderr


def on_a_pty(args, columns=100) -> tuple[int, str]:
    """(exit code, what a terminal `columns` wide showed, ANSI codes removed)."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "VECPIPE_OUTPUT_FORMAT")}
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", *map(str, args)],
                            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        shown += chunk
    code = proc.wait(timeout=60)
    os.close(master)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))


@pytest.mark.slow
def test_dry_run_on_a_terminal_is_a_table(tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    code, shown = on_a_pty(["embed", src, "--text-field", "title", "--dry-run"])
    assert code == 0, shown
    assert "embed --dry-run" in shown and "text fields" in shown and "title" in shown
    assert "sentence-transformers/all-MiniLM-L6-v2" in shown and "384" in shown
    assert "{" not in shown  # not JSON
    assert os.listdir(tmp_path) == ["docs.jsonl"]


def embedded(cli, tmp_path, write_jsonl, name="docs.arrow"):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert cli("embed", src, "--text-field", "title", "-m", "fake:8",
               "-o", tmp_path / name).exit_code == 0
    return tmp_path / name


def test_index_dry_run_checks_the_first_batch_and_builds_nothing(cli, tmp_path, write_jsonl):
    vectors = embedded(cli, tmp_path, write_jsonl)
    before = listing(tmp_path)
    result = cli("index", vectors, "-o", tmp_path / "idx", "--fields", "title", "--dtype",
                 "i8", "--dry-run")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["action"], plan["stored_fields"], plan["dim"], plan["dtype"],
            plan["layout"], plan["model"]) == ("create", ["id", "title"], 8, "i8", "hnsw",
                                               "fake:8")
    assert listing(tmp_path) == before
    typo = cli("index", vectors, "-o", tmp_path / "idx", "--fields", "titel", "--dry-run")
    assert typo.exit_code == 1 and "--fields titel: no such field" in typo.stderr
    parts = cli("index", vectors, "-o", f"{tmp_path}/parts/", "--shard", "1/2", "--dry-run")
    assert parts.exit_code == 0 and json.loads(parts.stdout)["shard"] == "1/2"
    assert listing(tmp_path) == before


def test_index_dry_run_of_an_append_names_the_rows_there(cli, tmp_path, write_jsonl):
    vectors = embedded(cli, tmp_path, write_jsonl)
    assert cli("index", vectors, "-o", tmp_path / "idx", "--fields", "title").exit_code == 0
    before = listing(tmp_path)
    result = cli("index", vectors, "-o", tmp_path / "idx", "--append", "--dry-run")
    plan = json.loads(result.stdout)
    assert (plan["action"], plan["rows_now"], plan["stored_fields"]) == ("append", 2,
                                                                        ["id", "title"])
    assert listing(tmp_path) == before


def test_index_dry_run_checks_the_first_vectors(cli, tmp_path, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "embedding": [0.5, float("nan")]}])
    result = cli("index", bad, "-o", tmp_path / "idx", "--dry-run")
    assert result.exit_code == 1 and f"{bad}:1" in result.stderr
    assert not (tmp_path / "idx").exists()
