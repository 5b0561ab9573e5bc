"""The shard contract (part files, resume, --shard auto) of embed, index and mine-negatives,
and embed's Ray engine.

Ray tests share one local cluster (`ray.init(num_cpus=2)`, usage stats off) and skip when ray is
not installed. Every test runs under a watchdog (faulthandler): a hang dumps every thread's stack
and ends the run instead of eating CI's budget; a signal would not interrupt a blocked ray.get.
"""
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from vecpipe.formats.parts import completed_rows
from vecpipe.formats.shards import shard_of

REPO_DATA = Path(__file__).resolve().parent / "data"
TEST_TIMEOUT = 180  # seconds per test, generous for a loaded 2-core machine
RAY_START_TIMEOUT = 240


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def corpus(n=60, start=0, invalid=()):
    """Records with ids and texts of varied length; `invalid` ids get an empty text."""
    return [{"id": f"doc-{i}", "text": "" if i in invalid else f"passage {i} " + "word " * (i % 7)}
            for i in range(start, start + n)]


def long_corpus(n=12000):
    """Enough text that a half-written part has flushed bytes (the writer buffers 1 MiB)."""
    return [{"id": f"doc-{i}", "text": f"passage {i} " + "word " * 80} for i in range(n)]


def wait_until_halfway(proc, folder):
    """Until the part's temporary holds bytes: the job is past its start and not done."""
    deadline = time.monotonic() + 120
    while not (folder.is_dir() and any(p.name.endswith(".tmp") and p.stat().st_size > 0
                                       for p in folder.iterdir())):
        assert proc.poll() is None, "finished before it could be killed; make the input bigger"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def read_arrow(path):
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def assert_same_table(got, want):
    assert got.schema.metadata == want.schema.metadata
    assert got.equals(want)


# -- the shard contract, no engine -----------------------------------------------------------

def test_shard_parts_partition_the_input_in_order(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", corpus())
    assert cli("embed", source, "-m", "fake:16", "-o", tmp_path / "plain.arrow").exit_code == 0
    plain = read_arrow(tmp_path / "plain.arrow")
    plain_ids = plain.column("id").to_pylist()
    seen = []
    for index in range(3):
        result = cli("embed", source, "-m", "fake:16", "--shard", f"{index}/3",
                     "-o", f"{tmp_path / 'parts'}/")
        assert result.exit_code == 0, result.stderr
        assert result.stdout == ""
        path = tmp_path / "parts" / f"part-{index:05d}-of-00003.arrow"
        part = read_arrow(path)
        ids = part.column("id").to_pylist()
        assert completed_rows(str(path)) == len(ids)
        assert all(shard_of(i, 3) == index for i in ids)
        assert ids == [i for i in plain_ids if i in set(ids)]  # input order within a part
        assert part.schema.metadata == plain.schema.metadata
        rows = {i: v for i, v in zip(ids, part.column("embedding").to_pylist())}
        want = dict(zip(plain_ids, plain.column("embedding").to_pylist()))
        assert all(rows[i] == want[i] for i in ids)
        seen += ids
    assert sorted(seen) == sorted(plain_ids)


def test_rerun_skips_a_complete_part_and_redoes_an_altered_one(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", corpus())
    args = ("embed", source, "-m", "fake:16", "--shard", "1/2", "-o", f"{tmp_path}/out/")
    assert cli(*args).exit_code == 0
    part = tmp_path / "out" / "part-00001-of-00002.arrow"
    first = part.stat()
    again = cli(*args)
    assert again.exit_code == 0 and "already complete: skipped" in again.stderr
    assert part.stat().st_mtime_ns == first.st_mtime_ns and part.stat().st_ino == first.st_ino
    original = part.read_bytes()
    part.write_bytes(original[:-8] + b"\0" * 8)  # damaged after completion: sidecar no longer fits
    redo = cli(*args)
    assert redo.exit_code == 0 and "skipped" not in redo.stderr
    assert part.read_bytes() == original


@pytest.mark.slow
def test_a_part_killed_halfway_leaves_no_part_and_a_rerun_completes_it(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", long_corpus())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vecpipe.cli", "embed", str(source), "-m", "fake:8",
           "--window", "64", "--shard", "0/2", "-o", f"{out}/"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until_halfway(proc, out)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all, as when a node dies
    proc.wait(timeout=30)
    part = out / "part-00000-of-00002.arrow"
    assert not part.exists() and completed_rows(str(part)) is None
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # what the dead run left
    rerun = subprocess.run(cmd, capture_output=True, timeout=TEST_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr
    assert b"left by a run that did not finish" in rerun.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".lock"))]
    ids = read_arrow(part).column("id").to_pylist()
    assert ids == [f"doc-{i}" for i in range(12000) if shard_of(f"doc-{i}", 2) == 0]
    assert completed_rows(str(part)) == len(ids)


@pytest.mark.slow
def test_sigterm_halfway_removes_the_temporary_too(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", long_corpus())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "embed", str(source), "-m",
                             "fake:8", "--window", "64", "--shard", "1/2", "-o", f"{out}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until_halfway(proc, out)
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("env, part", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, "part-00002-of-00003"),
    ({"RANK": "1", "WORLD_SIZE": "4"}, "part-00001-of-00004"),
    ({"JOB_COMPLETION_INDEX": "0", "VECPIPE_SHARD_COUNT": "2"}, "part-00000-of-00002"),
])
def test_shard_auto_reads_the_launcher(cli, tmp_path, write_jsonl, env, part):
    source = write_jsonl(tmp_path / "in.jsonl", corpus())
    result = cli("embed", source, "-m", "fake:8", "--shard", "auto", "--output-format",
                 "parquet", "-o", f"{tmp_path}/out/", env=env)
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == \
        [f"{part}.parquet"]


def test_part_folder_needs_a_shard_and_auto_needs_a_launcher(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", corpus(5))
    folder = cli("embed", source, "-m", "fake:8", "-o", f"{tmp_path}/out/")
    assert folder.exit_code == 2 and "--shard" in folder.stderr
    clean = {k: None for k in ("SLURM_ARRAY_TASK_ID", "RANK", "JOB_COMPLETION_INDEX")}
    auto = cli("embed", source, "-m", "fake:8", "--shard", "auto", "-o", f"{tmp_path}/o/",
               env=clean)
    assert auto.exit_code == 2 and "launcher" in auto.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ray_engine_without_ray_says_how_to_install(cli, tmp_path, write_jsonl, monkeypatch):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", corpus(5))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli("embed", tmp_path / "in", "-m", "fake:8", "--engine", "ray", "-o",
                 tmp_path / "out.arrow")
    assert result.exit_code == 1
    assert "pip install 'vecpipe[ray]'" in result.stderr
    assert not (tmp_path / "out.arrow").exists()


def test_ray_engine_usage_errors(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", corpus(5))
    for args, words in [(("--engine", "ray"), "-o FILE"),
                        (("--engine", "ray", "--shard", "0/2", "-o", tmp_path / "x/"), "--parts"),
                        (("--parts", "2", "-o", tmp_path / "y.arrow"), "--engine ray"),
                        (("--engine", "spark", "-o", tmp_path / "y.arrow"), "local or ray")]:
        result = cli("embed", source, "-m", "fake:8", *args)
        assert result.exit_code == 2 and words in result.stderr, (args, result.stderr)


@pytest.mark.slow
def test_ray_engine_fails_fast_on_an_address_nobody_answers(cli, tmp_path, write_jsonl):
    pytest.importorskip("ray")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", corpus(5))
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = cli("embed", tmp_path / "in", "-m", "fake:8", "--engine", "ray", "--address",
                 f"127.0.0.1:{port}", "-o", tmp_path / "out.arrow")
    assert result.exit_code == 1 and "no Ray cluster answers" in result.stderr


# -- the Ray engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster for this module, usage stats off."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    faulthandler.dump_traceback_later(RAY_START_TIMEOUT, exit=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    faulthandler.cancel_dump_traceback_later()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def input_folder(tmp_path, write_jsonl):
    """Two input files in a folder (one record without text), and the same as a file list."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", corpus(40, invalid={7}))
    write_jsonl(folder / "b.jsonl", corpus(30, start=40))
    (folder / ".hidden").write_text("not an input")
    return folder, [folder / "a.jsonl", folder / "b.jsonl"]


@pytest.mark.slow
def test_ray_file_output_equals_the_plain_run(cli, ray_cluster, tmp_path, write_jsonl):
    folder, files = input_folder(tmp_path, write_jsonl)
    common = ("-m", "fake:16", "--skip-invalid")
    plain = cli("embed", *files, *common, "-o", tmp_path / "plain.arrow")
    assert plain.exit_code == 0, plain.stderr
    result = cli("embed", "--engine", "ray", "--parts", "3", folder, *common,
                 "-o", tmp_path / "ray.arrow")
    assert result.exit_code == 0, result.stderr
    assert "3 of 3 parts to embed" in result.stderr and "69 vectors" in result.stderr
    assert_same_table(read_arrow(tmp_path / "ray.arrow"), read_arrow(tmp_path / "plain.arrow"))
    assert sorted(os.listdir(tmp_path)) == ["in", "plain.arrow", "ray.arrow"]  # parts removed


@pytest.mark.slow
def test_ray_parts_equal_plain_shards_and_resume(cli, ray_cluster, tmp_path, write_jsonl):
    folder, files = input_folder(tmp_path, write_jsonl)
    common = ("-m", "fake:16", "--skip-invalid", "--output-format", "parquet")
    for index in range(3):
        assert cli("embed", *files, *common, "--shard", f"{index}/3",
                   "-o", f"{tmp_path}/plain/").exit_code == 0
    out = tmp_path / "ray"
    assert cli("embed", "--engine", "ray", "--parts", "3", folder, *common,
               "-o", out).exit_code == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    for name in names:  # the same shard code: the same bytes
        assert (out / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    (out / names[1]).unlink()
    rerun = cli("embed", "--engine", "ray", folder, *common, "-o", out)  # count from the folder
    assert rerun.exit_code == 0, rerun.stderr
    assert "1 of 3 parts to embed" in rerun.stderr
    assert (out / names[1]).read_bytes() == (tmp_path / "plain" / names[1]).read_bytes()
    done = cli("embed", "--engine", "ray", folder, *common, "-o", out)
    assert done.exit_code == 0 and "complete: nothing to embed" in done.stderr


@pytest.mark.slow
def test_ray_chunked_output_equals_the_plain_run(cli, ray_cluster, tmp_path, write_jsonl):
    folder = tmp_path / "in"
    folder.mkdir()
    texts = ["one two three four five six seven eight nine ten eleven twelve", "short",
             "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi"]
    write_jsonl(folder / "docs.jsonl", [{"_id": f"d{i % 5}", "text": t} for i, t in
                                        enumerate(texts * 4)])  # repeated ids and texts
    common = ("-m", "fake:16", "--chunk-tokens", "4", "--chunk-overlap", "1")
    plain = cli("embed", folder / "docs.jsonl", *common, "-o", tmp_path / "plain.arrow")
    assert plain.exit_code == 0, plain.stderr
    result = cli("embed", "--engine", "ray", "--parts", "2", folder, *common,
                 "-o", tmp_path / "ray.arrow")
    assert result.exit_code == 0, result.stderr
    assert_same_table(read_arrow(tmp_path / "ray.arrow"), read_arrow(tmp_path / "plain.arrow"))


@pytest.mark.slow
def test_ray_attaches_to_a_running_cluster_from_another_process(ray_cluster, tmp_path,
                                                                 write_jsonl, run_vecpipe):
    folder, files = input_folder(tmp_path, write_jsonl)
    result = subprocess.run(
        [sys.executable, "-m", "vecpipe.cli", "embed", "--engine", "ray", str(folder), "-m",
         "fake:8", "--skip-invalid", "-o", str(tmp_path / "ray.jsonl")],
        capture_output=True, timeout=TEST_TIMEOUT - 30,
        env=dict(os.environ, RAY_ADDRESS=ray_cluster))
    assert result.returncode == 0, result.stderr
    assert ray_cluster.encode() in result.stderr
    plain = run_vecpipe("embed", *files, "-m", "fake:8", "--skip-invalid", "-o",
                        tmp_path / "plain.jsonl")
    assert plain.returncode == 0
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


@pytest.mark.slow
def test_ray_reports_a_worker_error_with_its_location(cli, ray_cluster, tmp_path, write_jsonl):
    folder, _ = input_folder(tmp_path, write_jsonl)
    result = cli("embed", "--engine", "ray", "--parts", "2", folder, "-m", "fake:8",
                 "-o", tmp_path / "out.arrow")  # doc-7 has no text and no --skip-invalid
    assert result.exit_code == 1
    assert "empty text" in result.stderr and "a.jsonl:8" in result.stderr
    assert "--skip-invalid" in result.stderr  # the hint survived the trip
    assert not (tmp_path / "out.arrow").exists()


# -- index --shard ----------------------------------------------------------------------------

def test_index_shards_linked_search_like_one_index(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", corpus(80))
    vectors = tmp_path / "vectors.arrow"
    assert cli("embed", source, "-m", "fake:16", "-o", vectors).exit_code == 0
    for index in range(3):
        result = cli("index", vectors, "--shard", f"{index}/3", "-o", tmp_path / "idx")
        assert result.exit_code == 0, result.stderr
    again = cli("index", vectors, "--shard", "1/3", "-o", tmp_path / "idx")
    assert again.exit_code == 0 and "already complete: skipped" in again.stderr
    parts = sorted(p for p in (tmp_path / "idx").iterdir() if not p.name.startswith("."))
    assert [p.name for p in parts] == [f"part-0000{i}-of-00003.idx" for i in range(3)]
    linked = cli("merge", "--index", "--link", *parts, "-o", tmp_path / "linked")
    assert linked.exit_code == 0, linked.stderr
    assert cli("index", vectors, "-o", tmp_path / "whole").exit_code == 0
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "text": f"passage {i} word"}
                                                 for i in range(0, 80, 9)])
    hits = [cli("search", tmp_path / name, queries, "-m", "fake:16", "-k", "5", "--exact",
                "--output-format", "jsonl").records() for name in ("linked", "whole")]
    assert [(h["query_id"], h["id"]) for h in hits[0]] == \
        [(h["query_id"], h["id"]) for h in hits[1]]
    assert [h["score"] for h in hits[0]] == pytest.approx([h["score"] for h in hits[1]])


def test_index_shard_errors_name_the_input_record(cli, tmp_path, write_jsonl):
    records = [{"id": f"v{i}", "embedding": [1.0, float(i)]} for i in range(10)]
    records[7]["id"] = records[2]["id"]  # the same id hashes to the same shard
    source = write_jsonl(tmp_path / "v.jsonl", records)
    shard = shard_of("v2", 2)
    result = cli("index", source, "--shard", f"{shard}/2", "-o", tmp_path / "idx")
    assert result.exit_code == 1
    assert "duplicate id 'v2'" in result.stderr and "v.jsonl:8" in result.stderr
    empty = cli("index", write_jsonl(tmp_path / "one.jsonl", records[:1]), "--shard",
                f"{1 - shard_of('v0', 2)}/2", "-o", tmp_path / "idx2")
    assert empty.exit_code == 1 and "fewer shards" in empty.stderr


# -- mine-negatives --shard -------------------------------------------------------------------

def test_mine_negatives_shards_together_equal_the_unsharded_run(cli, tmp_path, parse_records):
    data = REPO_DATA / "mine"
    common = (data / "pairs.jsonl", "--corpus", data / "corpus.jsonl", "-m", "fake:32", "-n",
              "2", "--range-max", "3", "--on-short", "keep")
    plain = cli("mine-negatives", *common, "--output-format", "jsonl")
    assert plain.exit_code == 0, plain.stderr
    rows = []
    for index in range(3):
        result = cli("mine-negatives", *common, "--shard", f"{index}/3",
                     "-o", f"{tmp_path}/mined/")
        assert result.exit_code == 0, result.stderr
        path = tmp_path / "mined" / f"part-0000{index}-of-00003.arrow"
        rows += read_arrow(path).to_pylist()
        assert completed_rows(str(path)) == read_arrow(path).num_rows
    again = cli("mine-negatives", *common, "--shard", "2/3", "-o", f"{tmp_path}/mined/")
    assert again.exit_code == 0 and "already complete: skipped" in again.stderr
    assert sorted(rows, key=repr) == sorted(plain.records(), key=repr)
