"""vecpipe convert and vecpipe info through the CLI, including the NFCorpus acceptance check."""
import json

import pyarrow as pa
import pytest

from vecpipe.formats import schema as names

FORMATS = {"jsonl": "jsonl", "arrow": "arrows", "arrow-file": "arrow", "parquet": "parquet"}


def test_convert_select_and_limit(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": str(i), "text": f"t{i}", "x": i}
                                             for i in range(10)])
    r = cli("convert", src, "--fields", "text,id", "--limit", "3", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert r.records() == [{"text": "t0", "id": "0"}, {"text": "t1", "id": "1"},
                           {"text": "t2", "id": "2"}]
    assert "3 records" in r.stderr


def test_convert_unknown_field_fails_before_output(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "1"}])
    out = tmp_path / "out.parquet"
    r = cli("convert", src, "--fields", "nope", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    assert "no field 'nope'" in r.stderr and not out.exists()


def test_convert_bad_input_is_one_line_exit_1(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": \n')
    r = cli("convert", bad, "--output-format", "jsonl")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"vecpipe convert: error: invalid JSON: unexpected end of data ({bad}:2)"]


def test_convert_usage_errors_exit_2(cli, tmp_path):
    r = cli("convert", "--output-format", "xml")
    assert r.exit_code == 2 and "unknown output format" in r.stderr
    r = cli("convert", "--no-such-option")
    assert r.exit_code == 2


def test_convert_keeps_metadata(cli, tmp_path):
    table = pa.table({"id": ["a"]})
    table = table.replace_schema_metadata(names.with_meta(table.schema, {"model": "m"}).metadata)
    src = tmp_path / "a.arrow"
    with pa.OSFile(str(src), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    out = tmp_path / "b.parquet"
    assert cli("convert", src, "-o", out).exit_code == 0
    r = cli("info", out)
    assert json.loads(r.stdout)["metadata"] == {"model": "m"}


def test_info_on_stream_and_index_folder(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "embedding": [0.1, 0.2]}])
    facts = json.loads(cli("info", src).stdout)
    assert facts["format"] == "jsonl" and facts["rows"] == 1
    assert facts["columns"] == {"id": "string", "embedding": "fixed_size_list<item: float>[2]"}
    folder = tmp_path / "idx"  # a real index: info reads manifests as strictly as search does
    vectors = write_jsonl(tmp_path / "v.jsonl", [{"id": str(i), "embedding": [0.1 * i, 1.0]}
                                                 for i in range(5)])
    assert cli("index", vectors, "-o", folder, "--flat").exit_code == 0
    facts = json.loads(cli("info", folder).stdout)
    assert facts["manifest"]["count"] == 5 and facts["format"] == "vecpipe-index"
    table = cli("info", folder, "--output-format", "table").stdout
    assert "flat: true" in table and "hnsw: null" in table  # JSON values, not Python's reprs
    assert "True" not in table and "None" not in table
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("info", empty)
    assert r.exit_code == 1 and "not a vecpipe index" in r.stderr


@pytest.mark.slow
def test_nfcorpus_every_format_and_back(cli, tmp_path, nfcorpus, parse_records):
    """The issue's acceptance: 3,633 records through every output format and back, identical."""
    import orjson

    original = [orjson.loads(line) for line in (nfcorpus / "corpus.jsonl").read_bytes()
                .splitlines()]
    assert len(original) == 3633
    for fmt, ext in FORMATS.items():
        there = tmp_path / f"corpus.{ext}"
        r = cli("convert", nfcorpus / "corpus.jsonl", "-o", there, "--output-format", fmt)
        assert r.exit_code == 0, r
        facts = json.loads(cli("info", there).stdout)
        assert facts["rows"] == 3633 and facts["format"] == fmt
        back = cli("convert", there, "--output-format", "jsonl")
        assert back.exit_code == 0
        assert back.records() == original, fmt


ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"


@pytest.mark.slow
@pytest.mark.parametrize("fields,arrow", [(None, True), ("id,text", False)])
def test_convert_on_a_pipe_is_arrow_only_with_vectors(run_vecpipe, tmp_path, write_jsonl,
                                                       fields, arrow):
    src = write_jsonl(tmp_path / "v.jsonl", [{"id": str(i), "text": f"t{i}",
                                              "embedding": [0.5, float(i)]} for i in range(3)])
    args = ["--fields", fields] if fields else []
    out = run_vecpipe("convert", src, *args, env={"VECPIPE_OUTPUT_FORMAT": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(ARROW_STREAM_MAGIC) == arrow
    if arrow:
        assert pa.ipc.open_stream(out.stdout).read_all().num_rows == 3
    else:
        assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ["0", "1", "2"]


def test_packed_bits_and_scores_decide_the_pipe_format():
    from vecpipe.formats.writers import carries_vectors

    assert carries_vectors(pa.schema([("id", pa.string()), ("embedding", pa.binary(4))]))
    assert carries_vectors(pa.schema([("v", pa.list_(pa.float32(), 8))]))
    assert carries_vectors(pa.schema([("embedding", pa.list_(pa.float32()))]))
    assert not carries_vectors(pa.schema([("query", pa.string()),
                                          ("scores", pa.list_(pa.float64()))]))
    assert not carries_vectors(None)


def test_filter_rename_and_head_are_the_everyday_verbs(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"_id": str(i), "year": 2015 + i, "t": f"x{i}"}
                                             for i in range(10)])
    r = cli("convert", src, "--filter", "year >= 2020 and year != 2022", "--rename", "_id=id",
            "--fields", "id,t", "--head", "3", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert r.records() == [{"id": "5", "t": "x5"}, {"id": "6", "t": "x6"}, {"id": "8", "t": "x8"}]
    same = cli("convert", src, "--where", "year >= 2020 and year != 2022", "--rename", "_id=id",
               "--fields", "id,t", "--limit", "3", "--output-format", "jsonl")
    assert same.stdout == r.stdout
    r = cli("convert", src, "--filter", "lang == 'en'")
    assert r.exit_code == 1 and "the filter uses field 'lang'" in r.stderr and str(src) in r.stderr
    r = cli("convert", src, "--rename", "nope=x")
    assert r.exit_code == 1 and "--rename: no field 'nope'" in r.stderr
    r = cli("convert", src, "--rename", "_id=t")
    assert r.exit_code == 1 and "two fields one name" in r.stderr
    assert cli("convert", src, "--rename", "_id").exit_code == 2


# ---- --sample: reservoir sampling ---------------------------------------------------------

def _reference_sample(count: int, size: int, seed: int) -> list:
    """Algorithm R written out record by record, from the same stream of doubles."""
    import numpy as np

    rng = np.random.default_rng(seed)
    slots = []
    for record in range(count):
        slot = int(rng.random() * (record + 1))
        if record < size:
            slots.append(record)
        elif slot < size:
            slots[slot] = record
    return sorted(slots)


def _sampled(count: int, size: int, seed: int, batch_rows: int) -> list:
    from vecpipe.commands.convert import Reservoir

    reservoir = Reservoir(size, seed)
    ids = pa.array(range(count), pa.int64())
    for start in range(0, count, batch_rows):
        reservoir.offer(pa.record_batch([ids.slice(start, batch_rows)], names=["n"]))
        assert reservoir.held_rows <= 2 * size + batch_rows  # memory: the sample, not the input
    return [n for batch in reservoir.batches() for n in batch.column(0).to_pylist()]


@pytest.mark.parametrize("batch_rows", [1, 7, 64, 1000])
def test_sample_is_algorithm_r_whatever_the_batches(batch_rows):
    for seed in (0, 1, 12345):
        for count, size in ((500, 10), (30, 30), (5, 10), (400, 0), (1000, 250)):
            if batch_rows == 1 and count > 500:
                continue  # one row a batch: slow, and the small cases cover it
            assert _sampled(count, size, seed, batch_rows) == \
                _reference_sample(count, size, seed), (seed, count, size)


def _chi_square(counts, expected) -> float:
    return sum((c - expected) ** 2 / expected for c in counts)


@pytest.mark.slow  # 2000 samples: seconds
def test_sample_is_uniform_over_positions():
    """Over 2000 fixed seeds each of 60 records must be sampled about 2000 * 6 / 60 = 200
    times. Chi-square, 59 degrees of freedom (mean 59, sd 11): the bound 59 + 6 sd is loose
    (fixed seeds: the test cannot flake) yet far below what a bias to the start or end gives."""
    import numpy as np

    count, size, seeds = 60, 6, 2000
    hits = np.zeros(count)
    for seed in range(seeds):
        hits[_sampled(count, size, seed, 7)] += 1
    expected = seeds * size / count
    bound = 59 + 6 * (2 * 59) ** 0.5
    assert _chi_square(hits, expected) < bound
    halves = hits[:30].sum(), hits[30:].sum()
    assert abs(halves[0] - halves[1]) < 0.05 * seeds * size  # no drift to either end
    # the bound does catch biased samplers: the first records only, or late ones favoured
    head_only = np.zeros(count)
    head_only[:size] = seeds
    assert _chi_square(head_only, expected) > 10 * bound
    late = np.zeros(count)
    rng = np.random.default_rng(0)
    for _ in range(seeds):
        slots = list(range(size))
        for record in range(size, count):
            slot = int(rng.random() * (record + 1) / 2)  # enters twice as often as it should
            if slot < size:
                slots[slot] = record
        late[slots] += 1
    assert _chi_square(late, expected) > bound


def test_convert_sample_cli(cli, tmp_path, write_jsonl):
    records = [{"id": str(i), "year": 2000 + i % 30} for i in range(300)]
    src = write_jsonl(tmp_path / "a.jsonl", records)
    arrow = tmp_path / "a.arrow"
    with pa.ipc.new_file(arrow, pa.schema([("id", pa.string()), ("year", pa.int64())])) as f:
        for start in range(0, 300, 37):  # other batches than JSONL's
            f.write_batch(pa.RecordBatch.from_pylist(records[start:start + 37]))
    r = cli("convert", src, "--sample", "12", "--seed", "5", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert [int(rec["id"]) for rec in r.records()] == _reference_sample(300, 12, 5)
    assert "12 records (sampled from 300)" in r.stderr
    same = cli("convert", arrow, "--sample", "12", "--seed", "5", "--output-format", "jsonl")
    assert same.stdout == r.stdout  # a seed gives one sample, whatever the input format
    default = cli("convert", src, "--sample", "12", "--output-format", "jsonl")
    assert [int(rec["id"]) for rec in default.records()] == _reference_sample(300, 12, 0)
    assert default.stdout != r.stdout
    # --where, then --head, then --sample, then --fields
    r = cli("convert", src, "--where", "year >= 2020", "--head", "50", "--sample", "5",
            "--seed", "3", "--fields", "id", "--output-format", "jsonl")
    population = [rec["id"] for rec in records if rec["year"] >= 2020][:50]
    assert [rec["id"] for rec in r.records()] == [population[i]
                                                  for i in _reference_sample(50, 5, 3)]
    assert list(r.records()[0]) == ["id"]
    everything = cli("convert", src, "--sample", "1000", "--output-format", "jsonl")
    assert everything.records() == records  # fewer records than asked: all, in order
    assert cli("convert", src, "--sample", "0", "--output-format", "jsonl").stdout == ""
    assert cli("convert", src, "--sample", "-1").exit_code == 2
    assert "default 0" in " ".join(cli("convert", "--help").stdout.split())
