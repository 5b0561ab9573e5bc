"""Files, names and formats: -o names choose the format (.jsonl .jsonl.gz .csv .tsv .arrow
.arrows .parquet, search's .trec), -o /dev/null and -o -, CSV/TSV out and in (RFC 4180 quoting,
read back by vecpipe and by Python's csv module), CSV refused for vectors, reports as CSV/TSV,
and info --fields."""
import csv
import gzip
import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VECPIPE = str(Path(sys.executable).with_name("vecpipe"))

# values a CSV writer gets wrong easily: delimiters, quotes, line breaks, empty vs null,
# ids that look like numbers, floats that look like integers, nested values
TRICKY = [
    {"id": "007", "text": 'a, "quoted"\nsecond line', "score": 3.0, "n": 1, "ok": True,
     "tags": ["x", "y"], "meta": {"k": 1}, "note": None},
    {"id": "2", "text": "", "score": 0.1, "n": None, "ok": False, "tags": None,
     "meta": None, "note": "tab\there"},
    {"id": "3", "text": "naïve — ünïcode", "score": 1e-08, "n": -5, "ok": None, "tags": [],
     "meta": {"k": None}, "note": "cr\r\nlf"},
]


def _env():
    env = dict(os.environ)
    env.pop("VECPIPE_OUTPUT_FORMAT", None)
    return env


@pytest.fixture
def tricky(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "tricky.jsonl", TRICKY)


@pytest.fixture
def vectors(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "v.jsonl", [
        {"id": f"d{i}", "text": f"text {i}", "embedding": [0.37 * i - 0.11 * j + 0.05
                                                          for j in range(4)]}
        for i in range(5)])


def _jsonl(data: bytes) -> list:
    return [json.loads(line) for line in data.decode().splitlines()]


def _as_text(value):
    """A value as the CSV writer should put it (None: empty)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value)


# ---- names choose the format --------------------------------------------------------------

@pytest.mark.parametrize("name,magic", [
    ("out.jsonl", b'{"id"'), ("out.jsonl.gz", b"\x1f\x8b"), ("out.csv", b"id,text"),
    ("out.tsv", b"id\ttext"), ("out.arrow", b"ARROW1"), ("out.arrows", b"\xff\xff\xff\xff"),
    ("out.parquet", b"PAR1"), ("out.csv.gz", b"\x1f\x8b")])
def test_the_output_name_chooses_the_format_and_reads_back(cli, tmp_path, write_jsonl, name,
                                                           magic):
    records = [{"id": str(i), "text": f"t{i}", "x": i * 0.5} for i in range(3)]
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / name
    r = cli("convert", src, "-o", out)
    assert r.exit_code == 0, r
    assert out.read_bytes().startswith(magic)
    assert sorted(os.listdir(tmp_path)) == sorted(["src.jsonl", name])  # no temporary left
    back = cli("convert", out, "--output-format", "jsonl")
    assert back.exit_code == 0, back
    assert back.records() == records


def test_jsonl_gz_is_gzip_that_gzip_reads_and_is_the_same_every_time(cli, tmp_path, tricky):
    first, second = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert cli("convert", tricky, "-o", first).exit_code == 0
    assert cli("convert", tricky, "-o", second).exit_code == 0
    assert first.read_bytes() == second.read_bytes()  # no name or time in the gzip header
    header = first.read_bytes()[:10]
    assert header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"  # FNAME unset, mtime 0
    assert _jsonl(gzip.decompress(first.read_bytes())) == TRICKY
    if shutil.which("gzip"):
        decoded = subprocess.run(["gzip", "-dc", str(first)], capture_output=True, check=True)
        assert _jsonl(decoded.stdout) == TRICKY


def test_a_failed_gzip_output_leaves_nothing(cli, tmp_path, write_jsonl):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join(json.dumps({"id": str(i)}).encode() + b"\n" for i in range(3000))
                    + b"{not json\n")
    r = cli("convert", src, "-o", tmp_path / "out.jsonl.gz")
    assert r.exit_code == 1 and "bad.jsonl:3001" in r.stderr
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_an_unknown_name_lists_the_known_ones(cli, tmp_path, tricky):
    r = cli("convert", tricky, "-o", tmp_path / "out.xyz")
    assert r.exit_code == 2 and "cannot tell the output format from" in r.stderr
    for ext in (".jsonl", ".csv", ".tsv", ".arrow", ".arrows", ".parquet", "+.gz"):
        assert ext in r.stderr
    assert ".trec" not in r.stderr  # convert writes no TREC runs
    r = cli("convert", tricky, "-o", tmp_path / "out.trec")
    assert r.exit_code == 2 and "does not write trec" in r.stderr
    r = cli("convert", tricky, "-o", tmp_path / "out.parquet.gz")
    assert r.exit_code == 2 and "compresses text formats" in r.stderr
    assert os.listdir(tmp_path) == ["tricky.jsonl"]


def test_output_format_choices_include_csv_and_tsv(cli):
    from vecpipe.formats import writers

    assert {"csv", "tsv"} <= set(writers.OUTPUT_FORMATS) & set(writers.REPORT_FORMATS)
    assert {"csv", "tsv"} <= set(writers.KNOWN_FORMATS)
    help_text = " ".join(cli("convert", "--help").stdout.split())
    assert "jsonl|parquet|csv|tsv" in help_text and "auto|table|jsonl|json|csv|tsv" in help_text


# ---- CSV and TSV out and in ---------------------------------------------------------------

@pytest.mark.parametrize("fmt,delimiter", [("csv", ","), ("tsv", "\t")])
def test_delimited_output_is_rfc4180_as_pythons_csv_reads_it(cli, tmp_path, tricky, fmt,
                                                             delimiter):
    out = tmp_path / f"out.{fmt}"
    assert cli("convert", tricky, "-o", out).exit_code == 0
    with open(out, newline="", encoding="utf-8") as text:
        rows = list(csv.reader(text, delimiter=delimiter))
    assert rows[0] == list(TRICKY[0])
    expected = [[_as_text(record[key]) or "" for key in TRICKY[0]] for record in TRICKY]
    score = list(TRICKY[0]).index("score")
    assert [float(row[score]) for row in rows[1:]] == [r["score"] for r in TRICKY]
    assert rows[1][score] == "3.0"  # a float stays a float when read back
    for row in rows[1:] + expected:
        row[score] = None  # 1e-8 here, 1e-08 in Python's repr: the same float
    assert rows[1:] == expected
    # the same bytes as Python's csv writer gives, but for quoting "" (to tell it from null)
    reference = io.StringIO()
    csv.writer(reference, delimiter=delimiter, lineterminator="\n").writerows(
        [list(TRICKY[0])] + [[_as_text(record[key]) for key in TRICKY[0]] for record in TRICKY])
    written = out.read_bytes().decode()
    empty = re.compile(f'(?:^|(?<={delimiter}))""(?={delimiter}|$)', re.MULTILINE)
    assert empty.sub("", written) == reference.getvalue().replace("1e-08", "1e-8")
    assert empty.findall(written) == ['""']  # TRICKY[1]'s empty text, not its nulls


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_round_trip_through_vecpipe(cli, tmp_path, tricky, fmt):
    out = tmp_path / f"out.{fmt}"
    assert cli("convert", tricky, "-o", out).exit_code == 0
    back = cli("convert", out, "--output-format", "jsonl")  # the name says the format
    assert back.exit_code == 0, back
    expected = [{key: (_as_text(value) if isinstance(value, (list, dict)) else value)
                 for key, value in record.items()} for record in TRICKY]
    assert back.records() == expected  # null stays null, "" stays "", "007" stays text
    assert cli("info", "--fields", out).stdout.split() == list(TRICKY[0])


def test_csv_input_by_name_and_magic_bytes_win(cli, tmp_path):
    plain = tmp_path / "ids.csv"
    plain.write_text("id,year\n007,2020\n8,2021\n")
    r = cli("convert", plain, "--output-format", "jsonl")
    assert r.records() == [{"id": "007", "year": 2020}, {"id": "8", "year": 2021}]
    zipped = tmp_path / "ids.tsv.gz"
    zipped.write_bytes(gzip.compress(b"id\tyear\n007\t2020\n"))
    assert cli("convert", zipped, "--output-format", "jsonl").records() == [
        {"id": "007", "year": 2020}]
    misnamed = tmp_path / "really-parquet.csv"
    pq.write_table(pa.table({"id": ["a"]}), misnamed)
    assert cli("convert", misnamed, "--output-format", "jsonl").records() == [{"id": "a"}]


def test_csv_is_refused_for_vectors_before_any_work(cli, tmp_path, vectors):
    for out in ("v.csv", "v.tsv", "v.csv.gz"):
        r = cli("convert", vectors, "-o", tmp_path / out)
        assert r.exit_code == 2, r
        assert "not vectors" in r.stderr and "--fields" in r.stderr and ".arrow" in r.stderr
    r = cli("convert", vectors, "--output-format", "csv")
    assert r.exit_code == 2 and r.stdout == ""
    # embed checks the name before it loads the model: this model does not exist
    r = cli("embed", vectors, "-m", str(tmp_path / "no-such-model"), "-o", tmp_path / "e.csv")
    assert r.exit_code == 2 and "not vectors" in r.stderr, r
    r = cli("compress", vectors, "--dtype", "f16", "-o", tmp_path / "c.tsv")
    assert r.exit_code == 2 and "not vectors" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["v.jsonl"]
    # dropping the vectors makes it a plain table
    r = cli("convert", vectors, "--fields", "id,text", "-o", tmp_path / "plain.csv")
    assert r.exit_code == 0 and (tmp_path / "plain.csv").read_text().startswith("id,text\nd0,")


def test_an_environment_csv_applies_only_where_csv_can_be_written(cli, vectors, tricky):
    env = {"VECPIPE_OUTPUT_FORMAT": "csv"}
    assert cli("convert", vectors, env=env).stdout_bytes.startswith(b"\xff\xff\xff\xff")
    assert cli("convert", tricky, "--fields", "id,n", env=env).stdout == \
        'id,n\n007,1\n2,\n3,-5\n'


def test_a_field_first_seen_late_widens_a_csv_file(cli, tmp_path, write_jsonl):
    records = [{"id": str(i), "text": "line\nbreak" if i % 3 else 'q"uote'} for i in range(1500)]
    records[1400]["late"] = 7
    src = write_jsonl(tmp_path / "late.jsonl", records)
    for name in ("late.csv", "late.csv.gz"):
        out = tmp_path / name
        r = cli("convert", src, "-o", out)
        assert r.exit_code == 0, r
        back = cli("convert", out, "--output-format", "jsonl").records()
        assert back == [{"late": None, **record} if "late" not in record else record
                        for record in records]
    r = cli("convert", src, "--output-format", "csv")
    assert r.exit_code == 1 and "late.jsonl:1401" in r.stderr and "'late'" in r.stderr


# ---- search, eval and reports -------------------------------------------------------------

@pytest.fixture
def searched(cli, tmp_path, vectors):
    idx = tmp_path / "idx"
    assert cli("index", vectors, "-o", idx, "--fields", "text").exit_code == 0
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "embedding": [float(i + j) for j in
                                                                        range(4)]}) + "\n"
                               for i in range(3)))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\t1\nq2\td2\t2\n")
    return idx, queries, qrels


def test_search_writes_trec_csv_and_tsv_by_name_and_eval_reads_them_all(cli, tmp_path,
                                                                      searched):
    idx, queries, qrels = searched
    reports = []
    for name in ("run.trec", "run.trec.gz", "hits.csv", "hits.tsv", "hits.jsonl.gz"):
        r = cli("search", idx, queries, "-k", "3", "-o", tmp_path / name)
        assert r.exit_code == 0, r
        report = cli("eval", "retrieval", tmp_path / name, "--qrels", qrels,
                     "--output-format", "jsonl", "--cutoffs", "1,3")
        assert report.exit_code == 0, report
        reports.append({k: v for k, v in report.records()[0].items() if k != "run"})
    assert all(report == reports[0] for report in reports)
    assert (tmp_path / "run.trec").read_text().splitlines()[0].split()[1] == "Q0"
    assert gzip.decompress((tmp_path / "run.trec.gz").read_bytes()) == \
        (tmp_path / "run.trec").read_bytes()
    header = (tmp_path / "hits.csv").read_text().splitlines()[0]
    assert header == "query_id,rank,id,score"


@pytest.mark.parametrize("fmt,delimiter", [("csv", ","), ("tsv", "\t")])
def test_reports_as_csv_and_tsv_hold_the_jsonl_values(cli, tmp_path, searched, fmt,
                                                      delimiter):
    idx, queries, qrels = searched
    run = tmp_path / "run.trec"
    assert cli("search", idx, queries, "-k", "3", "-o", run).exit_code == 0
    as_jsonl = cli("eval", "retrieval", run, run, "--qrels", qrels, "--output-format",
                   "jsonl").records()
    table = cli("eval", "retrieval", run, run, "--qrels", qrels, "--output-format", fmt)
    assert table.exit_code == 0, table
    rows = list(csv.DictReader(io.StringIO(table.stdout), delimiter=delimiter))
    assert len(rows) == len(as_jsonl) == 2
    assert list(rows[0]) == list(dict.fromkeys(key for record in as_jsonl for key in record))
    for row, record in zip(rows, as_jsonl):
        for key, cell in row.items():
            value = record.get(key)
            if value is None or isinstance(value, str):
                assert cell == (value or "")
            elif isinstance(value, (dict, list)):
                assert json.loads(cell) == value
            else:
                assert float(cell) == value
    info = cli("info", run, qrels, "--output-format", fmt)
    rows = list(csv.DictReader(io.StringIO(info.stdout), delimiter=delimiter))
    assert [row["kind"] for row in rows] == ["trec-run", "qrels"]
    assert json.loads(rows[0]["hits_per_query"]) == {"min": 3, "median": 3, "max": 3}


def test_a_tsv_of_qrels_is_qrels_and_a_tsv_of_records_is_records(cli, tmp_path, searched):
    idx, queries, qrels = searched
    hits = tmp_path / "hits.tsv"
    assert cli("search", idx, queries, "-k", "2", "-o", hits).exit_code == 0
    facts = cli("info", hits, qrels, "--output-format", "json").records()[0]
    assert [(f["kind"], f["format"]) for f in facts] == [("records", "tsv"),
                                                         ("qrels", "beir-tsv")]


# ---- -o /dev/null and -o - ----------------------------------------------------------------

def _outputs(tmp_path, idx, queries, vectors):
    return {"convert": ["convert", vectors], "embed": ["embed", vectors, "-m", "fake:4"],
            "search": ["search", idx, queries, "-k", "2"],
            "compress": ["compress", vectors, "--dtype", "f16"],
            "merge": ["merge", vectors, vectors, "--on-duplicate", "keep"]}


def test_dev_null_and_dash_work_for_every_stream_command(cli, tmp_path, searched, vectors):
    idx, queries, _qrels = searched
    dev_before = set(os.listdir("/dev"))
    for name, args in _outputs(tmp_path, idx, queries, vectors).items():
        r = cli(*args, "-o", os.devnull)
        assert r.exit_code == 0 and r.stdout == "", (name, r)
        dash = cli(*args, "-o", "-")
        plain = cli(*args)
        assert dash.exit_code == 0 and dash.stdout_bytes == plain.stdout_bytes != b"", name
    assert set(os.listdir("/dev")) == dev_before  # no temporary file beside /dev/null
    assert not (tmp_path / "-").exists()
    r = cli("index", vectors, "-o", "-")
    assert r.exit_code == 2 and "stdout (-)" in r.stderr and not Path("-").exists()


# ---- info --fields ------------------------------------------------------------------------

def test_info_fields_lists_names_and_the_old_spelling_warns(cli, tmp_path, tricky):
    r = cli("info", "--fields", tricky)
    assert r.exit_code == 0 and r.stdout.split() == list(TRICKY[0]) and r.stderr == ""
    old = cli("info", "--field-names", tricky)
    assert old.stdout == r.stdout
    assert "warning: --field-names is deprecated; use --fields" in old.stderr
    table = cli("info", "--fields", tricky, "--output-format", "table")
    lines = [line for line in table.stdout.splitlines() if "text" in line or "tags" in line]
    assert any("string" in line for line in lines) and any("list<" in line for line in lines)
    assert cli("info", "--fields", "--verify", tricky).exit_code == 2


@pytest.mark.slow
def test_info_fields_on_a_terminal_is_a_table_with_types(tmp_path, tricky):
    master, slave = pty.openpty()
    proc = subprocess.run([VECPIPE, "info", "--fields", str(tricky)], stdout=slave,
                          stderr=subprocess.PIPE, env=_env(), timeout=60, check=False)
    os.close(slave)
    shown = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 0, proc.stderr
    assert "field" in shown and "type" in shown and "int64" in shown and "double" in shown


@pytest.mark.slow
def test_reading_csv_never_aborts_the_process(tmp_path):
    """pyarrow's threaded CSV reader aborted about one exit in four here ("terminate called
    without an active exception", exit 134) when its readahead thread outlived the read."""
    hits = tmp_path / "hits.csv"
    hits.write_text("query_id,rank,id,score\n" + "".join(
        f"q{i},{r},d{r},{1 / r}\n" for i in range(50) for r in range(1, 4)))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("".join(f"q{i}\td1\t1\n" for i in range(50)))
    for _ in range(8):
        proc = subprocess.run([VECPIPE, "eval", "retrieval", str(hits), "--qrels", str(qrels),
                               "--output-format", "csv", "-q"], capture_output=True, env=_env(),
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr


def test_a_bad_csv_row_is_named_by_record(cli, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3\n")
    r = cli("convert", bad)
    assert r.exit_code == 1 and "Expected 2 columns, got 1" in r.stderr
    assert r.stderr.splitlines()[0].endswith(f"({bad}:2)")


@pytest.mark.slow
def test_a_csv_producer_that_fails_in_a_pipe_fails_its_reader(tmp_path, write_jsonl):
    """CSV has no end-of-stream marker: a failed producer ends it with the line JSONL gets."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "t": "x"} for i in range(1500)])
    with open(src, "ab") as f:
        f.write(b"not json\n")
    result = subprocess.run(f"{VECPIPE} convert in.jsonl --output-format csv | {VECPIPE} "
                            "convert --input-format csv -o out.jsonl", shell=True, cwd=tmp_path,
                            capture_output=True, env=_env(), timeout=120, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "stream cut short: the producer failed (<stdin>:1025)" in stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
