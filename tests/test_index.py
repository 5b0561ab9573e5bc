"""vecpipe index: the index folder, defaults that follow the input, bad input, duplicates, append,
model checks and atomic builds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.cli.models import load_model
from vecpipe.core.codec import Codec
from vecpipe.core.index_build import IndexBuilder
from vecpipe.core.index_open import open_index

DIM = 32


def fake_docs(n, dim=DIM, model="fake:32", start=0, prefix="d"):
    texts = [f"document {i} about subject {i % 7}" for i in range(start, start + n)]
    return {"id": [f"{prefix}{i}" for i in range(start, start + n)], "text": texts,
            "group": [i % 7 for i in range(start, start + n)],
            "vectors": load_model(model).encode(texts)[:, :dim]}


def write_vectors(path, docs, meta=None, vectors=None, column=None):
    """An Arrow file of id/text/group/embedding records with vecpipe metadata."""
    vectors = docs["vectors"] if vectors is None else vectors
    embedding = column if column is not None else pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(vectors).reshape(-1)), vectors.shape[1])
    table = pa.table({"id": docs["id"], "text": docs["text"], "group": docs["group"],
                      "embedding": embedding})
    meta = {"model": "fake:32", "dim": str(vectors.shape[1]), "normalized": "true"} \
        if meta is None else meta
    table = table.replace_schema_metadata({f"vecpipe.{k}": v for k, v in meta.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".building-" in name or ".old-" in name]


@pytest.fixture
def docs():
    return fake_docs(300)


def test_unit_vectors_score_cosine_through_the_inner_product(cli, tmp_path):
    """Unit vectors make an ip graph (a cheaper kernel) that scores cosine: the same hits and
    scores as a cos graph of the same vectors, for queries of any length, and vectors appended
    later of any length are scaled on their way in."""
    rng = np.random.default_rng(0)
    unit = rng.standard_normal((2000, DIM)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    docs = {"id": [f"d{i}" for i in range(2000)], "text": [""] * 2000, "group": [0] * 2000}
    meta = {"model": "fake:32", "dim": str(DIM)}
    for name, normalized in (("ip", "true"), ("cos", "false")):
        write_vectors(tmp_path / f"{name}.arrow", docs, {**meta, "normalized": normalized},
                      unit)
        assert cli("index", tmp_path / f"{name}.arrow", "-o", tmp_path / name).exit_code == 0
        assert manifest(tmp_path / name)["metric"] == name
        assert manifest(tmp_path / name)["score_metric"] == "cos"
    longer = np.vstack([unit[:200] * 3.0, rng.standard_normal((50, DIM)).astype(np.float32)])
    longer_docs = {"id": [f"n{i}" for i in range(250)], "text": [""] * 250, "group": [0] * 250}
    appended = write_vectors(tmp_path / "more.arrow", longer_docs, {**meta, "normalized": "true"},
                             longer)
    for name in ("ip", "cos"):
        assert cli("index", appended, "-o", tmp_path / name, "--append").exit_code == 0
    queries = rng.standard_normal((40, DIM)).astype(np.float32) * 5.0
    everything = np.vstack([unit, longer])
    truth = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        everything / np.linalg.norm(everything, axis=1, keepdims=True)).T
    for name in ("ip", "cos"):
        for exact in (True, False):
            hits = open_index(str(tmp_path / name)).searcher(10, exact=exact).search(queries)
            found = np.take_along_axis(truth, hits.rows, axis=1)
            np.testing.assert_allclose(hits.scores, found, atol=2e-6)
            if exact:
                np.testing.assert_allclose(hits.scores, -np.sort(-truth, axis=1)[:, :10],
                                           atol=2e-6)


def test_builds_the_documented_folder(cli, tmp_path, docs):
    src = write_vectors(tmp_path / "docs.arrow", docs)
    r = cli("index", src, "-o", tmp_path / "idx", "--fields", "text", "--fields", "group")
    assert r.exit_code == 0, r
    assert r.stdout == "" and "300 vectors" in r.stderr
    idx = tmp_path / "idx"
    assert sorted(os.listdir(idx)) == ["manifest.json", "rows.parquet", "vectors.usearch"]
    m = manifest(idx)
    assert (m["format"], m["count"], m["dim"], m["metric"], m["score_metric"], m["dtype"]) == \
        ("vecpipe-index", 300, DIM, "ip", "cos", "f32")  # unit vectors: cos as ip
    assert m["metadata"]["model"] == "fake:32" and m["fields"] == ["id", "text", "group"]
    assert set(m["files"]) == {"vectors.usearch", "rows.parquet"}
    opened = open_index(str(idx), verify=True)
    assert opened.ids().to_pylist() == docs["id"]
    assert opened.rows(["group"]).column("group").to_pylist() == docs["group"]
    stored = opened.stored_vectors(np.arange(300))
    np.testing.assert_allclose(stored, docs["vectors"], atol=1e-6)
    assert leftovers(tmp_path) == []


def test_defaults_follow_the_input(cli, tmp_path, docs):
    half = write_vectors(tmp_path / "half.arrow", docs, vectors=docs["vectors"].astype(np.float16))
    assert cli("index", half, "-o", tmp_path / "h").exit_code == 0
    assert manifest(tmp_path / "h")["dtype"] == "f16"

    bits_codec = Codec.fit(docs["vectors"], to="binary")
    codes = bits_codec.encode(docs["vectors"])
    bits = write_vectors(tmp_path / "bits.arrow", docs, vectors=codes,
                         column=bits_codec.to_arrow(codes),
                         meta={"model": "fake:32", **bits_codec.metadata()})
    assert cli("index", bits, "-o", tmp_path / "b").exit_code == 0
    m = manifest(tmp_path / "b")
    assert (m["dtype"], m["metric"], m["dim"]) == ("b1", "hamming", DIM)

    int8 = Codec.fit(docs["vectors"], to="int8")
    codes = int8.encode(docs["vectors"])
    ints = write_vectors(tmp_path / "i8.arrow", docs, vectors=codes,
                         meta={"model": "fake:32", **int8.metadata()})
    assert cli("index", ints, "-o", tmp_path / "i").exit_code == 0
    assert manifest(tmp_path / "i")["dtype"] == "i8"
    np.testing.assert_array_equal(open_index(str(tmp_path / "i")).stored_vectors(range(300)),
                                  codes)
    r = cli("index", ints, "-o", tmp_path / "x", "--dtype", "f32")
    assert r.exit_code == 2 and "int8 codes" in r.stderr


def test_quantizes_float_input_with_the_compress_codec(cli, tmp_path, docs):
    src = write_vectors(tmp_path / "docs.arrow", docs)
    assert cli("index", src, "-o", tmp_path / "b", "--dtype", "b1", "--keep-vectors").exit_code == 0
    m = manifest(tmp_path / "b")
    assert (m["dtype"], m["metric"], m["score_metric"]) == ("b1", "hamming", "cos")
    codec = Codec.from_json(m["metadata"]["codec"])
    opened = open_index(str(tmp_path / "b"))
    np.testing.assert_array_equal(opened.stored_vectors(range(300)),
                                  np.packbits(docs["vectors"] > 0, axis=1))
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "full.npy"), docs["vectors"])
    assert codec.to == "binary"

    assert cli("index", src, "-o", tmp_path / "i", "--dtype", "i8").exit_code == 0
    codec = Codec.from_json(manifest(tmp_path / "i")["metadata"]["codec"])
    np.testing.assert_array_equal(open_index(str(tmp_path / "i")).stored_vectors(range(300)),
                                  codec.encode(docs["vectors"]))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 1e39 -> float32 inf, on purpose
@pytest.mark.parametrize("case", ["nan", "inf", "dim-change", "empty", "no-embedding"])
def test_bad_input_is_refused_before_anything_is_written(cli, tmp_path, write_jsonl, case):
    good = {"id": "a", "embedding": [0.1, 0.2, 0.3, 0.4]}
    records = {"nan": [good, {"id": "b", "embedding": [0.1, float("nan"), 0.3, 0.4]}],
               "inf": [good, good | {"id": "c"}, {"id": "b", "embedding": [1e39, 0, 0, 0]}],
               "dim-change": [good, {"id": "b", "embedding": [0.1, 0.2]}],
               "empty": [],
               "no-embedding": [{"id": "a", "text": "x"}]}[case]
    src = tmp_path / "in.jsonl"
    if case == "nan":  # JSON has no NaN: an Arrow file carries it
        docs = fake_docs(3)
        docs["vectors"][1, 5] = np.nan
        src = write_vectors(tmp_path / "in.arrow", docs)
    else:
        write_jsonl(src, records)
    r = cli("index", src, "-o", tmp_path / "idx")
    assert r.exit_code == 1, r
    assert r.stdout == "" and r.stderr.count("error:") == 1
    expected = {"nan": "in.arrow:2", "inf": "in.jsonl:3", "dim-change": "in.jsonl:2",
                "empty": "empty input", "no-embedding": "no 'embedding'"}[case]
    assert expected in r.stderr, r.stderr
    assert not (tmp_path / "idx").exists() and leftovers(tmp_path) == []


def test_dimension_change_between_files(cli, tmp_path, docs):
    a = write_vectors(tmp_path / "a.arrow", docs)
    other = fake_docs(10, dim=16, start=1000)
    b = write_vectors(tmp_path / "b.arrow", other, meta={"model": "fake:32"})
    r = cli("index", a, b, "-o", tmp_path / "idx")
    assert r.exit_code == 1 and "dimension" in r.stderr and "b.arrow" in r.stderr
    assert not (tmp_path / "idx").exists()


def test_duplicates_error_skip_replace(cli, tmp_path, write_jsonl):
    records = [{"id": "a", "embedding": [1.0, 0, 0, 0], "v": 1},
               {"id": "b", "embedding": [0, 1.0, 0, 0], "v": 2},
               {"id": "a", "embedding": [0, 0, 1.0, 0], "v": 3}]
    src = write_jsonl(tmp_path / "dup.jsonl", records)
    r = cli("index", src, "-o", tmp_path / "e")
    assert r.exit_code == 1 and "duplicate id 'a'" in r.stderr and "dup.jsonl:3" in r.stderr
    assert not (tmp_path / "e").exists()

    assert cli("index", src, "-o", tmp_path / "s", "--on-duplicate", "first", "--fields", "v",
               "--keep-vectors").exit_code == 0
    skip = open_index(str(tmp_path / "s"))
    assert skip.ids().to_pylist() == ["a", "b"] and skip.rows(["v"])["v"].to_pylist() == [1, 2]
    np.testing.assert_array_equal(skip.full_vectors()[0], [1, 0, 0, 0])

    assert cli("index", src, "-o", tmp_path / "r", "--on-duplicate", "last", "--fields", "v",
               "--keep-vectors").exit_code == 0
    rep = open_index(str(tmp_path / "r"))
    assert rep.ids().to_pylist() == ["a", "b"] and rep.rows(["v"])["v"].to_pylist() == [3, 2]
    np.testing.assert_array_equal(rep.full_vectors()[0], [0, 0, 1, 0])
    np.testing.assert_allclose(rep.stored_vectors([0])[0], [0, 0, 1, 0])


def test_append_adds_checks_and_handles_duplicates(cli, tmp_path):
    first, second = fake_docs(200), fake_docs(100, start=150)  # ids d150..d199 overlap
    a = write_vectors(tmp_path / "a.arrow", first)
    b = write_vectors(tmp_path / "b.arrow", second)
    idx = tmp_path / "idx"
    assert cli("index", a, "-o", idx, "--fields", "group", "--keep-vectors").exit_code == 0
    r = cli("index", b, "-o", idx, "--append")
    assert r.exit_code == 1 and "duplicate id 'd150'" in r.stderr
    assert manifest(idx)["count"] == 200  # the failed append changed nothing

    assert cli("index", b, "-o", idx, "--append", "--on-duplicate", "last").exit_code == 0
    opened = open_index(str(idx), verify=True)
    assert opened.count == 250 and opened.ids().to_pylist() == [f"d{i}" for i in range(250)]
    assert opened.fields == ["id", "group"]
    np.testing.assert_array_equal(opened.full_vectors()[200:],
                                  second["vectors"][50:])
    hits = opened.searcher(1, exact=True).search(second["vectors"][60:61])
    assert opened.ids().to_pylist()[hits.rows[0, 0]] == "d210"

    other_model = write_vectors(tmp_path / "o.arrow", fake_docs(5, start=900),
                                meta={"model": "fake:99", "dim": "32"})
    r = cli("index", other_model, "-o", idx, "--append")
    assert r.exit_code == 1 and "fake:32" in r.stderr and "fake:99" in r.stderr
    assert cli("index", other_model, "-o", idx, "--append", "--force").exit_code == 0
    assert manifest(idx)["count"] == 255


def test_append_quantizes_with_the_index_codec(cli, tmp_path):
    first, second = fake_docs(200), fake_docs(50, start=200)
    idx = tmp_path / "idx"
    assert cli("index", write_vectors(tmp_path / "a.arrow", first), "-o", idx, "--dtype",
               "i8").exit_code == 0
    codec_before = manifest(idx)["metadata"]["codec"]
    assert cli("index", write_vectors(tmp_path / "b.arrow", second), "-o", idx,
               "--append").exit_code == 0
    m = manifest(idx)
    assert m["count"] == 250 and m["metadata"]["codec"] == codec_before
    codec = Codec.from_json(codec_before)
    np.testing.assert_array_equal(open_index(str(idx)).stored_vectors(range(200, 250)),
                                  codec.encode(second["vectors"]))


def test_jsonl_input_takes_the_model_from_the_flag(cli, tmp_path, write_jsonl, docs):
    records = [{"id": i, "embedding": v.tolist()} for i, v in zip(docs["id"], docs["vectors"])]
    src = write_jsonl(tmp_path / "e.jsonl", records)
    assert cli("index", src, "-o", tmp_path / "idx", "-m", "fake:32").exit_code == 0
    assert manifest(tmp_path / "idx")["metadata"]["model"] == "fake:32"
    arrow = write_vectors(tmp_path / "docs.arrow", docs)
    r = cli("index", arrow, "-o", tmp_path / "x", "-m", "fake:8")
    assert r.exit_code == 1 and "fake:8" in r.stderr


def test_ids_fall_back_to_record_numbers_and_integers_become_strings(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "e.jsonl", [{"embedding": [1.0, 0]}, {"embedding": [0, 1.0]}])
    assert cli("index", src, "-o", tmp_path / "a").exit_code == 0
    assert open_index(str(tmp_path / "a")).ids().to_pylist() == ["1", "2"]
    src = write_jsonl(tmp_path / "n.jsonl", [{"id": 7, "embedding": [1.0, 0]}])
    assert cli("index", src, "-o", tmp_path / "b").exit_code == 0
    assert open_index(str(tmp_path / "b")).ids().to_pylist() == ["7"]


def test_store_options(cli, tmp_path, docs):
    src = write_vectors(tmp_path / "docs.arrow", docs)
    assert cli("index", src, "-o", tmp_path / "all", "--all-fields").exit_code == 0
    assert manifest(tmp_path / "all")["fields"] == ["id", "text", "group"]
    r = cli("index", src, "-o", tmp_path / "x", "--fields", "nope")
    assert r.exit_code == 1 and "nope" in r.stderr and not (tmp_path / "x").exists()


def test_refuses_to_replace_a_folder_that_is_not_an_index(cli, tmp_path, docs):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    r = cli("index", write_vectors(tmp_path / "d.arrow", docs), "-o", tmp_path / "precious")
    assert r.exit_code == 2 and (tmp_path / "precious" / "thesis.tex").exists()


def test_rebuild_replaces_an_index_and_interruption_keeps_the_old_one(cli, tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    old = write_vectors(tmp_path / "old.arrow", fake_docs(100))
    assert cli("index", old, "-o", idx).exit_code == 0
    before = (idx / "manifest.json").read_bytes()

    calls = []
    real_add = IndexBuilder.add

    def add_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(IndexBuilder, "add", add_then_interrupt)
    monkeypatch.setattr("vecpipe.commands.index.READ_BATCH_ROWS", 50)
    new = write_vectors(tmp_path / "new.arrow", fake_docs(300, start=500))
    r = cli("index", new, "-o", idx)
    assert r.exit_code == 130 and len(calls) == 2
    assert (idx / "manifest.json").read_bytes() == before
    assert open_index(str(idx), verify=True).count == 100
    assert leftovers(tmp_path) == []

    monkeypatch.undo()
    assert cli("index", new, "-o", idx).exit_code == 0
    assert open_index(str(idx), verify=True).count == 300 and leftovers(tmp_path) == []


@pytest.mark.slow
def test_killed_build_leaves_the_old_index(tmp_path, write_jsonl):
    """SIGKILL while the build waits for more input: the old index stays; the next build
    removes the dead build's temporary folder."""
    idx = tmp_path / "idx"
    rows = [{"id": f"d{i}", "embedding": [float(i), 1.0, 2.0, 3.0]} for i in range(12000)]
    write_jsonl(tmp_path / "old.jsonl", rows[:10])
    cmd = [sys.executable, "-m", "vecpipe.cli", "index", "-o", str(idx)]
    subprocess.run(cmd + [str(tmp_path / "old.jsonl")], check=True, capture_output=True)
    before = (idx / "manifest.json").read_bytes()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    proc.stdin.write(body[:len(body) * 5 // 6])  # more than one read batch, not all
    proc.stdin.flush()
    deadline = time.time() + 30
    while not leftovers(tmp_path) and time.time() < deadline:
        time.sleep(0.05)
    assert leftovers(tmp_path), "the build never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (idx / "manifest.json").read_bytes() == before
    assert open_index(str(idx), verify=True).count == 10
    write_jsonl(tmp_path / "new.jsonl", rows[:20])
    subprocess.run(cmd + [str(tmp_path / "new.jsonl")], check=True, capture_output=True)
    assert open_index(str(idx)).count == 20 and leftovers(tmp_path) == []
