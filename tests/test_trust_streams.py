"""Issue 14, record streams: a producer that dies never looks like a complete input, JSONL fields
widen instead of failing, failed commits leave nothing, and stream failures are one clear line."""
import errno
import gzip
import io
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from vecpipe.formats import writers
from vecpipe.formats.errors import DataError
from vecpipe.formats.readers import RecordStream, read_table
from vecpipe.formats.writers import AtomicFile, RecordWriter

UNTERMINATED = "stream ended without an end-of-stream marker: the producer failed"
END_MARKER = b"\xff\xff\xff\xff\x00\x00\x00\x00"
VECPIPE = [sys.executable, "-m", "vecpipe.cli"]


def records(stop, start=0, **extra):
    return [{"id": str(i), "text": f"document number {i}", **extra} for i in range(start, stop)]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in bash without pipefail: the status is the last command's."""
    env = dict(os.environ, VP=" ".join(VECPIPE))
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, env=env,
                          timeout=300)


@pytest.fixture
def good_index(tmp_path, write_jsonl, run_vecpipe):
    """A 3,000-vector index built from fake:8 vectors, and a snapshot of its bytes."""
    write_jsonl(tmp_path / "good.jsonl", records(3000))
    run_vecpipe("embed", tmp_path / "good.jsonl", "-m", "fake:8", "-o", tmp_path / "good.arrow",
                check=True)
    run_vecpipe("index", tmp_path / "good.arrow", "-o", tmp_path / "idx", check=True)
    return tmp_path / "idx", snapshot(tmp_path / "idx")


# -- 1. an Arrow IPC stream must end with its end-of-stream marker ---------------------------

@pytest.mark.slow
def test_failing_embed_in_a_pipe_leaves_the_index_byte_identical(tmp_path, write_jsonl,
                                                                 good_index):
    idx, before = good_index
    path = write_jsonl(tmp_path / "bad.jsonl", records(1499))
    with open(path, "ab") as f:
        f.write(b'{"id": "1500", "text": \n' + b"".join(
            orjson.dumps(r) + b"\n" for r in records(3000, 1501)))
    result = shell("$VP embed bad.jsonl -m fake:8 --window 256 | $VP index -o idx", tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "vecpipe embed: error: invalid JSON" in stderr and "bad.jsonl:1500" in stderr
    assert f"vecpipe index: error: {UNTERMINATED} (<stdin>:" in stderr
    assert snapshot(idx) == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_producer_is_not_a_complete_input(tmp_path, write_jsonl, signum):
    """convert | convert -o out.jsonl, the producer killed mid-stream: the old out.jsonl stays
    as it was. SIGTERM: the producer cleans up (ends at a batch); SIGKILL: it dies where its
    buffer was cut (mid-message)."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id":"old"}\n')
    producer = subprocess.Popen(VECPIPE + ["convert", "-", "--output-format", "arrow"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    consumer = subprocess.Popen(VECPIPE + ["convert", "-o", str(out)], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    forwarded = threading.Event()

    def forward():  # a real pipe in between, so the test sees when bytes have gone downstream
        while chunk := producer.stdout.read1(1 << 16):
            consumer.stdin.write(chunk)
            forwarded.set()
        consumer.stdin.close()

    thread = threading.Thread(target=forward)
    thread.start()
    lines = b"".join(orjson.dumps(r) + b"\n" for r in records(40_000))
    producer.stdin.write(lines)  # stdin stays open: the producer waits for more, mid-stream
    producer.stdin.flush()
    assert forwarded.wait(60), "the producer wrote nothing"
    producer.send_signal(signum)
    producer.wait(60)
    producer.stdin.close()
    thread.join(60)
    consumer.wait(60)
    stderr = consumer.stderr.read().decode()
    assert consumer.returncode == 1, stderr
    assert f"vecpipe convert: error: {UNTERMINATED} (<stdin>:" in stderr
    assert out.read_bytes() == b'{"id":"old"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("piped, cut_short", [
    ("arrow", f"{UNTERMINATED} (<stdin>:1025)"),
    ("jsonl", "stream cut short: the producer failed (<stdin>:1025)")])
def test_failing_convert_in_a_pipe_keeps_no_partial_output(tmp_path, write_jsonl, piped,
                                                           cut_short):
    """JSONL has no end-of-stream marker: a failed producer ends it with a line no JSON reader
    accepts, so the consumer (or jq) fails too."""
    path = write_jsonl(tmp_path / "in.jsonl", records(1500))
    with open(path, "ab") as f:
        f.write(b"not json\n")
    (tmp_path / "out.jsonl").write_bytes(b'{"id":"old"}\n')
    result = shell(f"$VP convert in.jsonl --output-format {piped} | $VP convert -o out.jsonl",
                   tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"vecpipe convert: error: {cut_short}" in stderr
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"id":"old"}\n'


@pytest.mark.slow
@pytest.mark.parametrize("consumer", ["convert -o out.jsonl", "compress --dim 4 -o out.jsonl",
                                      "merge -o out.jsonl", "index -o out.jsonl"])
def test_a_producer_that_fails_before_its_first_byte_loses_nothing(tmp_path, consumer):
    """The upstream dies before writing anything: zero bytes on a pipe are no input, not an
    empty one, so the consumer fails and the old output stays."""
    (tmp_path / "bad.jsonl").write_bytes(b"garbage\n")
    (tmp_path / "out.jsonl").write_bytes(b'{"id":"old"}\n')
    result = shell(f"$VP embed bad.jsonl -m fake:8 | $VP {consumer}", tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "error: empty input: nothing arrived on the pipe (<stdin>)" in stderr
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"id":"old"}\n'


@pytest.mark.slow
def test_an_empty_file_is_still_an_empty_input(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    for command in ("$VP convert empty.jsonl", "$VP convert < empty.jsonl",
                    "$VP convert < /dev/null"):
        result = shell(command + " --output-format jsonl", tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b""


def test_a_failed_writer_on_stdout_omits_the_marker_and_a_good_one_writes_it(cli, tmp_path,
                                                                             write_jsonl):
    good = write_jsonl(tmp_path / "good.jsonl", records(10))
    done = cli("convert", good, "--output-format", "arrow")
    assert done.exit_code == 0 and done.stdout_bytes.endswith(END_MARKER)
    bad = write_jsonl(tmp_path / "bad.jsonl", records(1030))
    with open(bad, "ab") as f:
        f.write(b"[1]\n")
    failed = cli("convert", bad, "--output-format", "arrow")  # stdout: the runner's buffer
    assert failed.exit_code == 1 and "bad.jsonl:1031" in failed.stderr
    assert failed.stdout_bytes.startswith(b"\xff\xff\xff\xff")
    assert not failed.stdout_bytes.endswith(END_MARKER)
    cut = tmp_path / "cut.arrows"
    cut.write_bytes(failed.stdout_bytes)
    with pytest.raises(DataError, match=UNTERMINATED) as err:
        list(RecordStream([str(cut)]))
    assert err.value.record == 1025 and err.value.source == str(cut)


def test_every_arrow_stream_reader_requires_the_marker(tmp_path):
    path = tmp_path / "cut.arrows"
    with RecordWriter(str(path), "arrow") as out:
        for start in range(0, 30, 10):
            out.write(pa.record_batch([pa.array([str(i) for i in range(start, start + 10)])],
                                      names=["id"]))
    data = path.read_bytes()
    assert data.endswith(END_MARKER)
    path.write_bytes(data[:-len(END_MARKER)])  # every batch whole, only the marker missing
    with pytest.raises(DataError, match=UNTERMINATED) as err:
        read_table([str(path)])
    assert err.value.record == 31
    path.write_bytes(gzip.compress(data[:-len(END_MARKER)]))
    with pytest.raises(DataError, match=UNTERMINATED):
        read_table([str(path)])
    path.write_bytes(data)
    assert read_table([str(path)]).num_rows == 30


# -- 2. JSONL fields widen -------------------------------------------------------------------

def late_fields(path, write_jsonl):
    """Null `title` until record 1,101, where it becomes a string and `year` first appears."""
    rows = records(3000, title=None)
    for row in rows[1100:]:
        row["title"], row["year"] = "T" + row["id"], 2000
    return write_jsonl(path, rows)


def test_jsonl_null_field_widens_and_late_fields_join(tmp_path, write_jsonl):
    table = read_table([str(late_fields(tmp_path / "late.jsonl", write_jsonl))])
    assert table.schema.field("title").type == pa.string()
    assert table.schema.field("year").type == pa.int64()
    assert table.column("title").to_pylist()[1099:1101] == [None, "T1100"]
    assert table.column("year").null_count == 1100


def test_jsonl_real_type_conflict_cites_its_line(tmp_path, write_jsonl):
    rows = records(1024, n=1) + records(1149, 1024, n=None) + records(1200, 1149, n="one")
    # the second batch (from line 1025) holds strings from line 1150 on
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match="'n' changed type from int64 to string") as err:
        read_table([str(path)])
    assert err.value.record == 1150
    rows = records(1200, n=1)
    rows[1149]["n"] = None
    rows = rows[:1100] + [{"id": "late", "n": None, "tag": 1}] * 50 + \
        [{"id": "late", "tag": "x"}] + rows[1100:]
    path = write_jsonl(tmp_path / "y.jsonl", rows)
    with pytest.raises(DataError, match="different types") as err:
        read_table([str(path)])
    assert err.value.record == 1151


def test_jsonl_byte_order_mark_is_skipped(tmp_path, cli):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(orjson.dumps(r) + b"\n" for r in records(3)))
    assert read_table([str(path)]).column("id").to_pylist() == ["0", "1", "2"]
    result = cli("convert", path, "--output-format", "jsonl")
    assert result.exit_code == 0 and result.records()[0] == {"id": "0", "text": "document "
                                                                         "number 0"}


def test_embed_skip_invalid_skips_a_numeric_text(cli, tmp_path, write_jsonl):
    rows = records(20)
    rows[7]["text"] = 42
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    result = cli("embed", path, "-m", "fake:8", "--skip-invalid", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in result.records()] == [str(i) for i in range(20) if i != 7]
    assert "1 invalid records skipped (first: " in result.stderr and "mixed.jsonl:8" in \
        result.stderr
    assert "not a string" in result.stderr
    strict = cli("embed", path, "-m", "fake:8", "--output-format", "jsonl")
    assert strict.exit_code == 1 and "mixed.jsonl:8" in strict.stderr


@pytest.mark.parametrize("suffix", [".arrow", ".parquet", ".arrows", ".jsonl"])
def test_convert_to_a_file_widens_what_it_already_wrote(cli, tmp_path, write_jsonl, suffix):
    source = late_fields(tmp_path / "late.jsonl", write_jsonl)
    out = tmp_path / f"out{suffix}"
    result = cli("convert", source, "-o", out)
    assert result.exit_code == 0, result.stderr
    table = read_table([str(out)])
    assert table.num_rows == 3000 and table.column("title").to_pylist()[1100] == "T1100"
    if suffix != ".jsonl":
        assert table.schema.field("title").type == pa.string()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["late.jsonl", out.name])


@pytest.mark.slow
def test_widening_on_an_arrow_stdout_fails_at_the_record(tmp_path, write_jsonl):
    """convert/embed to an Arrow pipe cannot change the schema they began with: one line at the
    exact record, and the reader downstream fails too (no marker)."""
    late_fields(tmp_path / "late.jsonl", write_jsonl)
    result = shell("$VP convert late.jsonl --output-format arrow | $VP convert -o out.jsonl",
                   tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "vecpipe convert: error: field 'title' first holds " \
        "string here" in stderr and "(late.jsonl:1101)" in stderr
    assert UNTERMINATED in stderr and not (tmp_path / "out.jsonl").exists()
    result = shell("$VP embed late.jsonl -m fake:8 | $VP index -o idx", tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "vecpipe embed: error: field 'title' first holds " \
        "string here" in stderr and "(late.jsonl:1101)" in stderr
    assert "hint: convert the input first" in stderr and not (tmp_path / "idx").exists()
    result = shell("$VP convert late.jsonl -o late.arrow && $VP embed late.arrow -m fake:8 "
                   "| $VP index -o idx --store title", tmp_path)
    assert result.returncode == 0, result.stderr.decode()


# -- 3. no leftovers -------------------------------------------------------------------------

@pytest.mark.parametrize("fails", ["replace", "flush"])
def test_a_failed_commit_leaves_no_temporary_file(tmp_path, monkeypatch, fails):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    if fails == "replace":
        def replace(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(writers.os, "replace", replace)
    with pytest.raises(DataError) as err:
        with RecordWriter(str(target)) as out:
            out.write(pa.record_batch([pa.array(["new"])], names=["id"]))
            if fails == "flush":
                out._sink.close = _raise_enospc  # the final flush happens in close()
                out._sink.flush = _raise_enospc
    assert err.value.source == str(target)
    assert os.listdir(tmp_path) == ["out.jsonl"] and target.read_bytes() == b"old\n"
    target.unlink()
    atomic = AtomicFile(str(target))
    atomic.file.write(b"x")
    atomic.file.close = _raise_enospc
    with pytest.raises(DataError, match="disk full"):
        atomic.commit()
    assert os.listdir(tmp_path) == []


def _raise_enospc(*_args):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- 4. one clear line -----------------------------------------------------------------------

def test_disk_full_while_writing_is_one_line(cli, tmp_path, write_jsonl, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", records(5000))
    real_fdopen = os.fdopen

    class Full(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode="r", buffering=-1):
        if "w" in mode:
            return Full(io.FileIO(fd, "wb"), buffer_size=max(buffering, 1))
        return real_fdopen(fd, mode, buffering)

    monkeypatch.setattr(writers.os, "fdopen", fdopen)
    for out in ("out.jsonl", "out.arrow", "out.parquet"):
        result = cli("convert", source, "-o", tmp_path / out)
        assert result.exit_code == 1
        assert result.stderr.splitlines()[0] == \
            f"vecpipe convert: error: disk full (no space left on device) ({tmp_path / out})"
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_text_outputs_fail_cleanly_too(tmp_path, monkeypatch):
    target = tmp_path / "run.trec"
    with pytest.raises(DataError, match="disk full") as err:
        with writers.text_output(str(target)) as out:
            out.write("q1 Q0 d1 1 1.0 x\n")
            out._sink.flush = _raise_enospc  # the final flush fails
    assert err.value.source == str(target) and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_disk_full_on_stdout_is_one_line(tmp_path, write_jsonl):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    write_jsonl(tmp_path / "in.jsonl", records(3))
    result = shell("$VP convert in.jsonl > /dev/full", tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "vecpipe convert: error: disk full (no space left on device) (<stdout>)",
        "hint: free some space, or write elsewhere with -o"]


@pytest.mark.slow
def test_closed_stdout_is_one_line(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    result = shell("$VP convert in.jsonl >&-", tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[0] == \
        "vecpipe convert: error: stdout is closed (<stdout>)"


def test_output_that_is_a_directory_or_not_writable(cli, tmp_path, write_jsonl, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", records(3))
    (tmp_path / "d.jsonl").mkdir()
    result = cli("convert", source, "-o", tmp_path / "d.jsonl")
    assert result.exit_code == 1 and result.stderr.splitlines()[0] == \
        f"vecpipe convert: error: is a directory, expected a file name ({tmp_path / 'd.jsonl'})"

    def read_only(*_args, **_kwargs):  # root ignores a chmod 555 folder: fail like EROFS
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writers.tempfile, "mkstemp", read_only)
    result = cli("convert", source, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1 and result.stderr.splitlines()[0] == \
        f"vecpipe convert: error: read-only file system ({tmp_path / 'out.jsonl'})"


def test_truncated_gzip_names_the_file(cli, tmp_path):
    data = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records(20000)))
    for name, size in (("short.jsonl.gz", 30), ("half.jsonl.gz", len(data) // 2)):
        path = tmp_path / name
        path.write_bytes(data[:size])
        result = cli("convert", path, "-o", tmp_path / "out.jsonl")
        assert result.exit_code == 1
        line = result.stderr.splitlines()[0]
        assert line.startswith("vecpipe convert: error: truncated compressed input: ")
        if size == 30:  # cut inside the first block: found while sniffing
            assert line.endswith(f"({path})")
        else:  # the line after the last one that arrived whole
            cited = int(line.rsplit(":", 1)[1].rstrip(")"))
            assert line.endswith(f"({path}:{cited})") and 1 < cited < 20000
    assert not (tmp_path / "out.jsonl").exists()


def test_unrecognized_format_names_the_file_among_several(cli, tmp_path, write_jsonl):
    good = write_jsonl(tmp_path / "good.jsonl", records(3))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"hello, not records\n")
    result = cli("convert", good, odd, "--output-format", "jsonl")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == ("vecpipe convert: error: unrecognized input format "
                                             f"(starts with b'hello, not recor') ({odd})")


def test_info_reports_the_widened_fields(cli, tmp_path, write_jsonl):
    facts = orjson.loads(cli("info", late_fields(tmp_path / "late.jsonl", write_jsonl)).stdout)
    assert facts["rows"] == 3000
    assert facts["columns"] == {"id": "string", "text": "string", "title": "string",
                                "year": "int64"}


def test_compress_widens_a_file_output_and_refuses_an_arrow_stdout(cli, tmp_path, write_jsonl):
    rows = [{"id": str(i), "embedding": [1.0, 0.5 * (i % 7), 0.25, 1.0], "title": None}
            for i in range(1500)]
    for row in rows[1100:]:
        row["title"] = "late"
    source = write_jsonl(tmp_path / "vectors.jsonl", rows)
    done = cli("compress", source, "--dim", "2", "-o", tmp_path / "c.arrow")
    assert done.exit_code == 0, done.stderr
    table = read_table([str(tmp_path / "c.arrow")])
    assert table.schema.field("title").type == pa.string()
    assert table.column("title").to_pylist()[1099:1101] == [None, "late"]
    refused = cli("compress", source, "--dim", "2", "--output-format", "arrow")
    assert refused.exit_code == 1
    assert refused.stderr.splitlines()[0].startswith("vecpipe compress: error: field 'title' "
                                                     "first holds string here")
    assert refused.stderr.splitlines()[0].endswith(f"({source}:1101)")


# ---- -o onto what is not a regular file ------------------------------------------------------

def _records_file(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "text": f"t{i}"} for i in range(5)])


def test_output_to_a_symlink_writes_through_and_keeps_the_link(cli, tmp_path, write_jsonl):
    src = _records_file(tmp_path, write_jsonl)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.jsonl"
    target.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    r = cli("convert", src, "-o", link)
    assert r.exit_code == 0, r
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(target.read_text().splitlines()) == 5
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["out.jsonl"]


def test_output_to_a_fifo_writes_into_it(cli, tmp_path, write_jsonl):
    import threading

    src = _records_file(tmp_path, write_jsonl)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = cli("convert", src, "-o", fifo, "--output-format", "jsonl")
    reader.join(timeout=30)
    assert r.exit_code == 0, r
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO, not a file renamed onto it
    assert len(got[0].splitlines()) == 5


def test_output_to_a_device_never_replaces_it(cli, tmp_path, write_jsonl):
    """`-o /dev/null` run as root renamed a file onto /dev/null; a private null device here."""
    src = _records_file(tmp_path, write_jsonl)
    null = tmp_path / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    r = cli("convert", src, "-o", null, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "null"]


@pytest.mark.slow
def test_index_names_stdin_as_such_in_its_errors(run_vecpipe, tmp_path):
    r = run_vecpipe("index", "-o", tmp_path / "idx", input=b"")
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[0] == \
        "vecpipe index: error: empty input: nothing arrived on the pipe (<stdin>)"
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with open(tmp_path / "empty.jsonl", "rb") as empty:
        r = run_vecpipe("index", "-o", tmp_path / "idx", stdin=empty)
    assert r.stderr.decode().splitlines()[0] == \
        "vecpipe index: error: empty input: no records to index (<stdin>)"
