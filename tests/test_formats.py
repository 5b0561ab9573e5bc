"""Record streams: every format pair round-trips, metadata travels, bad input fails cleanly."""
import gzip
import os
import subprocess
import sys

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpipe.core.space import check_same_space
from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.readers import RecordStream, read_table, sniff
from vecpipe.formats.writers import RecordWriter, resolve_output_format

RECORDS = [
    {"id": "a", "text": "plain ascii", "n": 1, "embedding": [0.5, -0.25, 1.0]},
    {"id": "b", "text": "ünïcødé — 中文 🚀", "n": 2, "embedding": [0.0, 1.5, -2.0]},
    {"id": "c", "text": "x" * 200_000, "n": None, "embedding": [1e-8, 3.25, 7.0]},
]
META = {"model": "fake:3", "dim": "3", "normalized": "false"}
OUT_FORMATS = {"jsonl": ".jsonl", "arrow": ".arrows", "arrow-file": ".arrow",
               "parquet": ".parquet"}


def table_with_meta():
    table = pa.Table.from_pylist(RECORDS)
    vectors = names.numpy_to_vectors(np.array([r["embedding"] for r in RECORDS], np.float32))
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", vectors)
    return table.replace_schema_metadata(names.with_meta(table.schema, META).metadata)


def write(path, table, fmt):
    with RecordWriter(str(path), fmt) as out:
        out.write_table(table)


def read_all(path):
    stream = RecordStream([str(path)])
    batches = [item.batch for item in stream]
    return pa.Table.from_batches(batches, stream.schema) if stream.schema else None, stream


def plain(rows):
    return [{k: (list(np.float32(v)) if k == "embedding" else v) for k, v in r.items()}
            for r in rows]


@pytest.mark.parametrize("src", OUT_FORMATS)
@pytest.mark.parametrize("dst", OUT_FORMATS)
def test_every_format_pair_round_trips(tmp_path, src, dst):
    first = tmp_path / f"first{OUT_FORMATS[src]}"
    write(first, table_with_meta(), src)
    table, _ = read_all(first)
    second = tmp_path / f"second{OUT_FORMATS[dst]}"
    write(second, table, dst)
    back, stream = read_all(second)
    assert back.to_pylist() == plain(RECORDS)
    assert back.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    if src != "jsonl" and dst != "jsonl":
        assert names.read_meta(back.schema) == META


def test_format_is_sniffed_not_taken_from_extension(tmp_path):
    misnamed = tmp_path / "really_parquet.jsonl"
    pq.write_table(pa.table({"id": ["x"]}), misnamed)
    table, stream = read_all(misnamed)
    assert table.to_pylist() == [{"id": "x"}]
    assert stream.formats[str(misnamed)] == "parquet"


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_inputs_are_unwrapped(tmp_path, compress):
    data = b"".join(orjson.dumps({"id": str(i), "text": "t"}) + b"\n" for i in range(3000))
    path = tmp_path / "in.jsonl.z"
    if compress == "gzip":
        path.write_bytes(gzip.compress(data))
    else:
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    table, stream = read_all(path)
    assert table.num_rows == 3000 and table.column("id")[2999].as_py() == "2999"
    assert stream.formats[str(path)] == f"jsonl+{compress}"


def test_batches_are_bounded(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"i": i}) + b"\n" for i in range(2500)))
    stream = RecordStream([str(path)], batch_rows=1000)
    sizes = [(item.batch.num_rows, item.first_record) for item in stream]
    assert sizes == [(1000, 1), (1000, 1001), (500, 2001)]


def test_several_inputs_are_one_stream_with_record_numbers(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b'{"id":"1"}\n{"id":"2"}\n')
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["3"]}), b)
    items = list(RecordStream([str(a), str(b)]))
    assert [(i.source, i.first_record, i.batch.num_rows) for i in items] == [
        (str(a), 1, 2), (str(b), 1, 1)]


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    table, stream = read_all(empty)
    assert table is None and stream.schema is None
    zero_rows = tmp_path / "zero.arrows"
    write(zero_rows, pa.table({"id": pa.array([], pa.string())}), "arrow")
    table, _ = read_all(zero_rows)
    assert table.num_rows == 0 and table.schema.names == ["id"]


def test_zero_row_batches_between_rows(tmp_path):
    schema = pa.schema([("id", pa.string())])
    path = tmp_path / "z.arrows"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_batch(pa.record_batch([pa.array([], pa.string())], schema=schema))
        w.write_batch(pa.record_batch([pa.array(["a"])], schema=schema))
        w.write_batch(pa.record_batch([pa.array([], pa.string())], schema=schema))
    table, _ = read_all(path)
    assert table.to_pylist() == [{"id": "a"}]


def test_jsonl_schema_is_stable_across_batches(tmp_path):
    rows = [{"id": str(i), "year": i} for i in range(5)] + [{"id": "5"}, {"id": "6", "year": None}]
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    stream = RecordStream([str(path)], batch_rows=2)
    table = pa.Table.from_batches([i.batch for i in stream], stream.schema)
    assert table.column("year").to_pylist() == [0, 1, 2, 3, 4, None, None]


def test_jsonl_lossy_type_change_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"year": 1}\n{"year": 2}\n{"year": 7.5}\n')
    with pytest.raises(DataError, match="'year' changed type from int64 to double") as err:
        list(RecordStream([str(path)], batch_rows=2))
    assert err.value.record == 3


@pytest.mark.parametrize("content,message,record", [
    (b'{"id": 1}\n{"id": 2\n', "invalid JSON", 2),
    (b'{"id": 1}\n[1, 2]\n', "expected a JSON object", 2),
    (b'{"id": "a"}\n{"id": {"x": 1}}\n', "different types", 2),
    (b'{"embedding": [1, 2]}\n{"embedding": [1, 2, 3]}\n', "different lengths", 2),
    (b'{"embedding": ["a", "b"]}\n', "embedding", 1),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message, record):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_table([str(path)])
    assert message in str(err.value)
    assert err.value.source == str(path) and err.value.record == record


def test_truncated_arrow_stream_is_an_error(tmp_path):
    path = tmp_path / "t.arrows"
    write(path, pa.table({"id": [str(i) for i in range(100)]}), "arrow")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 + 10])
    with pytest.raises(DataError, match="stream ended without an end-of-stream marker"):
        read_table([str(path)])
    damaged = b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x01" * 16  # a bad message, then the end
    path.write_bytes(data[:-8] + damaged + data[-8:])
    with pytest.raises(DataError, match="truncated or corrupt Arrow"):
        read_table([str(path)])


def test_garbage_is_refused_with_hint(tmp_path):
    path = tmp_path / "g.bin"
    path.write_bytes(os.urandom(64).replace(b"{", b"x").replace(b"\xff", b"x").replace(
        b"\x00", b"x").replace(b"\x1f", b"x").replace(b"\x28", b"x") + b"\x00")
    with pytest.raises(DataError) as err:
        read_table([str(path)])
    assert "unrecognized input format" in err.value.message and "--input-format" in err.value.hint


def test_csv_tsv_and_text_inputs(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("id,score\nq1,0.5\nq2,1.5\n")
    assert read_table([str(csv)], "csv").to_pylist() == [{"id": "q1", "score": 0.5},
                                                        {"id": "q2", "score": 1.5}]
    tsv = tmp_path / "a.tsv"
    tsv.write_text("id\ttext\n1\thello, world\n")
    # ids stay text ("007" is no number)
    assert read_table([str(tsv)], "tsv").to_pylist() == [{"id": "1", "text": "hello, world"}]
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nthird, ünï\r\n")
    assert read_table([str(txt)], "text").column("text").to_pylist() == [
        "first line", "", "third, ünï"]


def test_metadata_mismatch_between_inputs_is_refused(tmp_path):
    def file_with(model, name):
        table = pa.table({"id": ["x"]})
        table = table.replace_schema_metadata(names.with_meta(table.schema, {"model": model})
                                              .metadata)
        path = tmp_path / name
        write(path, table, "arrow-file")
        return str(path)
    a, b = file_with("m1", "a.arrow"), file_with("m2", "b.arrow")
    with pytest.raises(DataError, match="model differs.*'m1'.*'m2'"):
        read_table([a, b], check=check_same_space)
    assert read_table([a, b]).num_rows == 2


def test_only_one_stdin():
    with pytest.raises(UsageError):
        RecordStream(["-", "-"])


def test_auto_output_format_rules():
    assert resolve_output_format("x.parquet") == "parquet"
    assert resolve_output_format("x.jsonl") == "jsonl"
    assert resolve_output_format("x.arrow") == "arrow-file"
    assert resolve_output_format(None, stdout_isatty=False) == "arrow"
    assert resolve_output_format(None, stdout_isatty=True) == "jsonl"
    with pytest.raises(UsageError, match="terminal"):
        resolve_output_format(None, "parquet", stdout_isatty=True)
    with pytest.raises(UsageError):
        resolve_output_format("x.unknown")


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as out:
            out.write(pa.record_batch([pa.array(["a"])], names=["id"]))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_output_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text('{"id":"old"}\n')
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as out:
            out.write(pa.record_batch([pa.array(["new"])], names=["id"]))
            raise RuntimeError("boom")
    assert target.read_text() == '{"id":"old"}\n'


def test_packed_bits_and_int_codes(tmp_path):
    bits = np.array([[0, 255, 7], [128, 1, 2]], np.uint8)
    table = pa.table({"id": ["a", "b"], "embedding": names.numpy_to_packed_bits(bits)})
    write(tmp_path / "b.arrow", table, "arrow-file")
    back, _ = read_all(tmp_path / "b.arrow")
    assert np.array_equal(names.vectors_to_numpy(back.column("embedding")), bits)
    write(tmp_path / "b.jsonl", table, "jsonl")
    assert orjson.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])["embedding"] == \
        [0, 255, 7]
    codes = names.numpy_to_vectors(np.array([[-128, 127]], np.int8))
    assert codes.type == pa.list_(pa.int8(), 2)


@pytest.mark.slow
def test_sniffing_through_a_real_pipe(tmp_path):
    """Arrow stream and Parquet through an OS pipe: no seeking, short reads are fine."""
    for fmt, ext in (("arrow", ".arrows"), ("parquet", ".parquet"), ("arrow-file", ".arrow")):
        path = tmp_path / f"p{ext}"
        write(path, table_with_meta(), fmt)
        code = ("import sys; from vecpipe.formats.readers import read_table; "
                "t = read_table(['-']); print(t.num_rows, t.schema.metadata[b'vecpipe.model'])")
        cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
        out = subprocess.run([sys.executable, "-c", code], stdin=cat.stdout,
                             capture_output=True, check=True)
        cat.wait()
        assert out.stdout.decode().split() == ["3", "b'fake:3'"]


def test_sniff_table():
    assert sniff(b"ARROW1\x00\x00") == "arrow-file"
    assert sniff(b"\xff\xff\xff\xff\x10") == "arrow"
    assert sniff(b"PAR1") == "parquet"
    assert sniff(b"\xef\xbb\xbf  {") == "jsonl"
    assert sniff(b"") is None
