"""vecpipe embed: vectors equal sentence-transformers', options, errors, cache, shards, chunks,
bounded memory and clean interruption."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.cli import models
from vecpipe.core.cpu import has_vnni
from vecpipe.core.embedder import fake_vectors
from vecpipe.formats import schema as names

WORDS = ("protein diet cancer risk study vitamin heart patients trial effect cholesterol fiber "
         "blood dose women men children coffee sugar exercise sleep gut microbiome brain "
         "inflammation omega").split()


def synthetic_texts(count, seed=0, longest=400):
    """Texts from a few words up to `longest` words: several exceed MiniLM's 256 tokens."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest)))
            for _ in range(count)]


def records_of(texts, prefix="d"):
    return [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(texts)]


def vectors(records):
    return np.array([r["embedding"] for r in records], dtype=np.float32)


def read_arrow(path):
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


# -- real model: equality with SentenceTransformer.encode -------------------------------------

@pytest.mark.slow
def test_vectors_equal_sentence_transformers_with_and_without_windowing(cli, tmp_path,
                                                                        write_jsonl,
                                                                        bundled_model):
    texts = synthetic_texts(24, longest=330)
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    expected = bundled_model.encode(texts, batch_size=32, normalize_embeddings=True)
    for extra in ([], ["--window", "7", "--batch-size", "3"]):
        out = tmp_path / "out.arrow"
        r = cli("embed", src, "-o", out, "--device", "cpu", *extra)
        assert r.exit_code == 0, r
        table = read_arrow(out)
        assert table.column("id").to_pylist() == [f"d{i}" for i in range(24)]
        got = names.vectors_to_numpy(table.column("embedding"))
        np.testing.assert_allclose(got, expected, atol=1e-5)
    meta = names.read_meta(table.schema)
    assert meta["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["dim"] == "384" and meta["normalized"] == "true" and len(meta["model_sha"]) == 16
    tokens = bundled_model.tokenizer(texts, truncation=False)["input_ids"]
    too_long = sum(len(ids) > 256 for ids in tokens)
    assert too_long > 0
    assert f"{too_long} of 24 embedded texts were longer than the model's 256-token" in r.stderr


@pytest.mark.slow
def test_prompt_and_matryoshka_dim_match_sentence_transformers(cli, tmp_path, write_jsonl,
                                                               bundled_model):
    texts = synthetic_texts(12, seed=1, longest=60)
    src = write_jsonl(tmp_path / "q.jsonl", records_of(texts))
    r = cli("embed", src, "--prompt", "query: ", "--dim", "64", "--device", "cpu",
            "--output-format", "arrow", "--window", "5")
    assert r.exit_code == 0, r
    expected = bundled_model.encode(texts, prompt="query: ", truncate_dim=64,
                                normalize_embeddings=True)
    got = vectors(r.records())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    table = pa.ipc.open_stream(r.stdout_bytes).read_all()
    meta = names.read_meta(table.schema)
    assert meta["prompt"] == "query: " and meta["dim"] == "64"
    # Without normalizing, truncated MiniLM vectors are not unit length, and say so.
    r = cli("embed", src, "--dim", "64", "--no-normalize", "--device", "cpu", "-o",
            tmp_path / "raw.arrow")
    table = read_arrow(tmp_path / "raw.arrow")
    raw = names.vectors_to_numpy(table.column("embedding"))
    np.testing.assert_allclose(raw, bundled_model.encode(texts, truncate_dim=64,
                                                     normalize_embeddings=False), atol=1e-5)
    assert names.read_meta(table.schema)["normalized"] == "false"


@pytest.mark.slow
def test_onnx_backends_match_torch(cli, tmp_path, write_jsonl, bundled_model):
    pytest.importorskip("onnxruntime")
    texts = synthetic_texts(16, seed=2, longest=300)
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    expected = bundled_model.encode(texts, normalize_embeddings=True)
    r = cli("embed", src, "--backend", "onnx", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    np.testing.assert_allclose(vectors(r.records()), expected, atol=1e-5)
    r = cli("embed", src, "--backend", "onnx-int8", "-o", tmp_path / "q.arrow")
    assert r.exit_code == 0, r
    table = read_arrow(tmp_path / "q.arrow")
    quantized = names.vectors_to_numpy(table.column("embedding"))
    cosines = (quantized * expected).sum(axis=1)
    assert cosines.min() > 0.97, cosines
    meta = names.read_meta(table.schema)
    assert meta["backend"] == "onnx-int8" and meta["precision"] == "int8-reduced-range"


def int8_weights(path):
    """The int8 weight tensors of a quantized ONNX file (the initializers of type int8)."""
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]


@pytest.mark.slow
def test_onnx_int8_uses_the_whole_range_on_a_vnni_cpu(cli, tmp_path, write_jsonl,
                                                       bundled_model, bundled_model_path,
                                                       monkeypatch):
    """Without VNNI the weights keep 7 bits (AVX2's u8*s8 pair sums saturate at 16 bits); with
    it they use all 8, and land closer to float32: on a CPU that has VNNI (elsewhere the
    whole range saturates, which is why it is only chosen on one)."""
    pytest.importorskip("onnxruntime")
    texts = synthetic_texts(32, seed=5, longest=300)
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    expected = bundled_model.encode(texts, normalize_embeddings=True)
    (tmp_path / "vnni").write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    cosines = {}
    for cpu, precision in ((os.devnull, "int8-reduced-range"), (tmp_path / "vnni", "int8")):
        monkeypatch.setenv("VECPIPE_CPUINFO", str(cpu))
        monkeypatch.setattr(models, "_cache", {})  # the model is loaded again, on this "CPU"
        out = tmp_path / f"{precision}.arrow"
        r = cli("embed", src, "--backend", "onnx-int8", "-m", bundled_model_path, "-o", out)
        assert r.exit_code == 0, r.stderr
        table = read_arrow(out)
        assert names.read_meta(table.schema)["precision"] == precision
        cosines[precision] = (names.vectors_to_numpy(table.column("embedding"))
                              * expected).sum(axis=1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vecpipe", "onnx")
    files = {path.name: path for folder in (Path(bundled_model_path, "onnx"), cache)
             for path in folder.rglob("*-int8*.onnx")}  # beside the weights where writable
    reduced = next(path for name, path in files.items() if name.endswith("-int8.onnx"))
    full = next(path for name, path in files.items() if name.endswith("-int8-full.onnx"))
    assert max(int(np.abs(w).max()) for w in int8_weights(reduced)) <= 64
    assert max(int(np.abs(w).max()) for w in int8_weights(full)) == 127
    if has_vnni("/proc/cpuinfo"):
        assert cosines["int8"].min() > 0.97
        assert cosines["int8"].mean() > cosines["int8-reduced-range"].mean()
    else:
        assert cosines["int8-reduced-range"].mean() > cosines["int8"].mean()


@pytest.fixture
def openvino_hints(monkeypatch):
    """The config every OpenVINO compile_model call was given."""
    ov = pytest.importorskip("openvino")
    given = []
    real = ov.Core.compile_model

    def compile_model(self, model, device=None, config=None, *args):
        given.append(dict(config or {}))
        return real(self, model, device, config or {}, *args)
    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    return given


@pytest.mark.slow
def test_openvino_backend_matches_torch(cli, tmp_path, write_jsonl, bundled_model,
                                        openvino_hints):
    texts = synthetic_texts(6, seed=4, longest=80)
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    r = cli("embed", src, "--backend", "openvino", "--device", "cpu", "-o", tmp_path / "v.arrow")
    assert r.exit_code == 0, r
    table = pa.ipc.open_file(str(tmp_path / "v.arrow")).read_all()
    np.testing.assert_allclose(vectors(table.to_pylist()), bundled_model.encode(texts),
                               atol=1e-5)
    # OpenVINO's CPU default is bfloat16 on AMX/AVX512-BF16 CPUs: the hint must be explicit
    assert openvino_hints and all(c.get("INFERENCE_PRECISION_HINT") == "f32"
                                  for c in openvino_hints)
    assert "precision" not in names.read_meta(table.schema)


@pytest.mark.slow
def test_openvino_bfloat16_only_when_asked_and_recorded(cli, tmp_path, write_jsonl,
                                                        openvino_hints):
    import openvino as ov

    src = write_jsonl(tmp_path / "in.jsonl", records_of(["bone density", "vitamin d"]))
    r = cli("embed", src, "--backend", "openvino", "--precision", "bfloat16", "--device", "cpu",
            "-o", tmp_path / "v.arrow")
    assert r.exit_code == 0, r
    meta = names.read_meta(pa.ipc.open_file(str(tmp_path / "v.arrow")).schema)
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert openvino_hints[-1]["INFERENCE_PRECISION_HINT"] == "bf16"
        assert meta["precision"] == "bfloat16"
    else:  # the CPU cannot: said on stderr, run and recorded as float32
        assert "no bfloat16 support" in r.stderr
        assert openvino_hints[-1]["INFERENCE_PRECISION_HINT"] == "f32"
        assert "precision" not in meta


def test_missing_backend_package_is_a_clear_error(cli, tmp_path, write_jsonl, monkeypatch,
                                                  bundled_model_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else
                        real_find_spec(name, *a))
    src = write_jsonl(tmp_path / "in.jsonl", records_of(["x"]))
    r = cli("embed", src, "--backend", "onnx-int8", "-m", bundled_model_path)
    assert r.exit_code == 1 and r.stdout == ""
    assert "--backend onnx-int8 needs the onnxruntime package" in r.stderr
    assert "hint: pip install onnxruntime" in r.stderr


@pytest.mark.slow
def test_chunks_recover_text_with_model_tokenizer(cli, tmp_path, write_jsonl, bundled_model):
    texts = ["Short one.", "Vitamin D, (25-OH) and café-au-lait spots! " * 40]
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    r = cli("embed", src, "--chunk-tokens", "50", "--chunk-overlap", "10",
            "--output-format", "jsonl", "--device", "cpu")
    assert r.exit_code == 0, r
    rows = r.records()
    assert [row["chunk"] for row in rows if row["parent_id"] == "d0"] == [0]
    long_rows = [row for row in rows if row["parent_id"] == "d1"]
    assert len(long_rows) > 5
    for row in rows:
        parent = texts[int(row["parent_id"][1:])]
        assert parent[row["char_start"]:row["char_end"]] == row["text"]
        assert row["id"] == f"{row['parent_id']}#{row['chunk']}"
        tokens = bundled_model.tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        assert len(tokens) <= 52
    assert long_rows[0]["char_start"] == 0
    assert long_rows[-1]["char_end"] == len(texts[1].rstrip())
    # consecutive chunks overlap (10 shared tokens) and cover the text
    for before, after in zip(long_rows, long_rows[1:]):
        assert after["char_start"] < before["char_end"]
    np.testing.assert_allclose(vectors(rows), bundled_model.encode([row["text"] for row in rows]),
                               atol=1e-5)
    r = cli("embed", src, "--chunk-tokens", "300")
    assert r.exit_code == 2 and "does not fit" in r.stderr


@pytest.mark.slow
def test_several_cpu_devices_use_a_worker_pool(cli, tmp_path, write_jsonl, bundled_model,
                                               monkeypatch):
    from sentence_transformers import SentenceTransformer

    started = []
    start = SentenceTransformer.start_multi_process_pool

    def start_and_look(self, *args, **kwargs):
        pool = start(self, *args, **kwargs)
        started.append([process.is_alive() for process in pool["processes"]])
        return pool
    monkeypatch.setattr(SentenceTransformer, "start_multi_process_pool", start_and_look)
    texts = synthetic_texts(10, seed=3, longest=30)
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    r = cli("embed", src, "--device", "cpu,cpu", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    np.testing.assert_allclose(vectors(r.records()), bundled_model.encode(texts), atol=1e-5)
    assert started == [[True, True]]  # one pool: a running worker process per device


# -- fast: fake model ------------------------------------------------------------------------

def test_record_numbers_as_ids_are_said_once(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}"} for i in range(3000)])
    r = cli("embed", src, "-m", "fake:8", "--output-format", "jsonl", "--window", "256")
    assert [row["id"] for row in r.records()][:3] == ["1", "2", "3"]
    assert r.stderr.count("the ids are the record numbers") == 1


def test_fields_join_ids_and_passthrough(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"_id": "x1", "title": "Title", "text": "body one", "n": 1},
        {"_id": "x2", "title": "", "text": "body two", "n": 2},
        {"_id": "x3", "title": None, "text": "body three", "n": 3}])
    r = cli("embed", src, "-m", "fake:8", "--text-field", "title", "--text-field", "text",
            "--output-format", "jsonl")
    assert r.exit_code == 0, r
    rows = r.records()
    assert [row["id"] for row in rows] == ["x1", "x2", "x3"]
    assert [row["n"] for row in rows] == [1, 2, 3] and "_id" not in rows[0]  # one id column
    expected = fake_vectors(["Title body one", "body two", "body three"], 8)
    np.testing.assert_allclose(vectors(rows), expected, atol=1e-6)
    r = cli("embed", src, "-m", "fake:8", "--drop-text", "--id-field", "n",
            "--output-format", "jsonl")
    rows = r.records()
    assert "text" not in rows[0] and [row["id"] for row in rows] == ["1", "2", "3"]


def test_text_lines_get_record_numbers_as_ids(cli):
    r = cli("embed", "--input-format", "text", "-m", "fake:4", "--output-format", "jsonl",
            input="first line\nsecond line\n")
    assert r.exit_code == 0, r
    assert [(row["id"], row["text"]) for row in r.records()] == [("1", "first line"),
                                                                   ("2", "second line")]


def test_metadata_and_arrow_schema(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", records_of(["a b", "c d"]))
    out = tmp_path / "a.parquet"
    r = cli("embed", src, "-m", "fake:16", "--prompt", "p: ", "-o", out)
    assert r.exit_code == 0, r
    facts = json.loads(cli("info", out).stdout)
    assert facts["metadata"]["model"] == "fake:16" and facts["metadata"]["prompt"] == "p: "
    assert facts["columns"]["embedding"] == "fixed_size_list<element: float>[16]" or \
        "[16]" in facts["columns"]["embedding"]


BAD = [({"id": "1", "text": None}, "no text in field 'text' (missing, null or not a string)"),
       ({"id": "1"}, "no text in field 'text' (missing, null or not a string)"),
       ({"id": "1", "text": ""}, "empty text in field 'text'"),
       ({"id": "1", "text": "   "}, "empty text in field 'text'")]


@pytest.mark.parametrize("bad,message", BAD)
def test_invalid_record_is_an_error_naming_it(cli, tmp_path, write_jsonl, bad, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "0", "text": "fine"}, bad])
    out = tmp_path / "out.arrow"
    r = cli("embed", src, "-m", "fake:4", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    assert f"error: {message} ({src}:2)" in r.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["in.jsonl"]


def test_non_string_text_and_skip_invalid_counts(cli, tmp_path, write_jsonl):
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"id": "1", "text": 5}])
    r = cli("embed", numbers, "-m", "fake:4")
    assert r.exit_code == 1 and "holds int64, not text" in r.stderr and f"{numbers}:1" in r.stderr
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "0", "text": "ok"}, {"id": "1", "text": ""}, {"id": "2"},
        {"id": "3", "text": "fine too"}, {"id": None, "text": "no id"}])
    r = cli("embed", src, "-m", "fake:4", "--skip-invalid", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert [row["id"] for row in r.records()] == ["0", "3"]
    assert f"3 invalid records skipped (first: {src}:2: empty text" in r.stderr


def test_cache_embeds_only_new_or_changed_texts(cli, tmp_path, write_jsonl):
    cache = tmp_path / "cache"
    first = write_jsonl(tmp_path / "v1.jsonl", records_of([f"text {i}" for i in range(20)]))
    r = cli("embed", first, "-m", "fake:8", "--cache", cache, "-o", tmp_path / "v1.arrow")
    assert "20 embedded, 0 from cache" in r.stderr
    grown = records_of([f"text {i}" for i in range(25)])
    grown[3]["text"] = "edited"
    second = write_jsonl(tmp_path / "v2.jsonl", grown)
    r = cli("embed", second, "-m", "fake:8", "--cache", cache, "--output-format", "jsonl")
    assert r.exit_code == 0 and "6 embedded, 19 from cache" in r.stderr
    plain = cli("embed", second, "-m", "fake:8", "--output-format", "jsonl")
    assert r.records() == plain.records()
    # another prompt, dim or model is another cache space: nothing matches
    r = cli("embed", second, "-m", "fake:8", "--cache", cache, "--prompt", "q: ",
            "-o", tmp_path / "p.arrow")
    assert "25 embedded, 0 from cache" in r.stderr


def test_shards_partition_the_input(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "in.jsonl", records_of([f"t {i}" for i in range(60)]))
    whole = {row["id"]: row for row in cli("embed", src, "-m", "fake:4",
                                          "--output-format", "jsonl").records()}
    seen = []
    for index in range(3):
        rows = cli("embed", src, "-m", "fake:4", "--shard", f"{index}/3",
                   "--output-format", "jsonl").records()
        assert 0 < len(rows) < 60
        assert all(row == whole[row["id"]] for row in rows)
        seen += [row["id"] for row in rows]
    assert sorted(seen) == sorted(whole) and len(seen) == len(set(seen))


def test_usage_errors_exit_2(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "in.jsonl", records_of(["x"]))
    for args, message in [
            (["--chunk-tokens", "5", "--chunk-overlap", "5"], "must be smaller"),
            (["--chunk-overlap", "2"], "needs --chunk-tokens"),
            (["--dim", "9"], "exceeds the model's 8 dimensions"),
            (["--prompt", "a", "--prompt-name", "query"], "not both"),
            (["--backend", "tensorrt"], "unknown backend"),
            (["--device", "cuda:0,auto"], "auto cannot be one of several"),
            (["-o", tmp_path / "out.xyz"], "cannot tell the output format")]:
        r = cli("embed", src, "-m", "fake:8", *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)


def test_empty_input_writes_an_empty_stream(cli, tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    out = tmp_path / "e.arrow"
    r = cli("embed", empty, "-m", "fake:4", "-o", out)
    assert r.exit_code == 0, r
    table = read_arrow(out)
    assert table.num_rows == 0 and table.schema.names == ["id", "embedding"]


def test_chunks_with_fake_tokens_and_windows_keep_order(cli, tmp_path, write_jsonl):
    texts = [" ".join(f"w{i}_{j}" for j in range(i % 7 + 1)) for i in range(30)]
    src = write_jsonl(tmp_path / "in.jsonl", records_of(texts))
    r = cli("embed", src, "-m", "fake:4", "--chunk-tokens", "3", "--chunk-overlap", "1",
            "--window", "4", "--output-format", "jsonl")
    rows = r.records()
    assert [row["id"] for row in rows][:4] == ["d0#0", "d1#0", "d2#0", "d3#0"]
    assert rows[4]["id"] == "d3#1" and rows[4]["text"] == "w3_2 w3_3"
    for row in rows:
        assert texts[int(row["parent_id"][1:])][row["char_start"]:row["char_end"]] == row["text"]
    assert "30 records" in r.stderr


# -- subprocesses: bounded memory, interruption ------------------------------------------------

def _generator_cmd(count):
    """A process writing `count` JSONL records of ~400 characters."""
    code = ("import sys\npad = ' words to embed' * 25\n"
            f"for i in range({count}):\n"
            "    sys.stdout.write('{\"id\": \"%d\", \"text\": \"record %d%s\"}\\n' % (i, i, pad))\n")
    return [sys.executable, "-c", code]


def _peak_rss_kib(count, tmp_path):
    """Peak RSS of `embed` over a generated stream of `count` records (window of 500)."""
    script = ("import resource, subprocess, sys\n"
              "gen = subprocess.Popen(sys.argv[1:4], stdout=subprocess.PIPE)\n"
              "emb = subprocess.run([sys.executable, '-m', 'vecpipe.cli', 'embed', '-m', "
              "'fake:32', '--window', '500', '-o', sys.argv[4], '-q'], stdin=gen.stdout)\n"
              "gen.wait()\n"
              "assert emb.returncode == 0\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = tmp_path / f"out{count}.arrow"
    done = subprocess.run([sys.executable, "-c", script, *_generator_cmd(count), str(out)],
                          capture_output=True, text=True, check=True)
    assert read_arrow(out).num_rows == count
    return int(done.stdout.strip())


@pytest.mark.slow
def test_memory_stays_bounded_as_input_grows(tmp_path):
    small = _peak_rss_kib(2_000, tmp_path)
    large = _peak_rss_kib(20_000, tmp_path)   # 40 windows
    # Measured: buffering all 20k records (--window 100000) adds ~25 MiB; streaming adds ~0.
    assert large < small + 12 * 1024, (small, large)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_run_leaves_no_partial_output(tmp_path, sig):
    out = tmp_path / "out.arrow"
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "embed", "-m", "fake:8",
                             "--window", "10", "-o", str(out)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    for i in range(200):  # several windows written; then the input stalls, as a slow producer
        proc.stdin.write(orjson.dumps({"id": str(i), "text": f"text {i}"}) + b"\n")
    proc.stdin.flush()
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.arrow") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.stdin.close()
    code = proc.wait(timeout=30)
    stderr = proc.stderr.read()
    assert not out.exists()
    if sig != signal.SIGKILL:  # SIGKILL cannot be caught: only a hidden temporary may remain
        want_code, said = (130, b"interrupted") if sig == signal.SIGINT else (143, b"terminated")
        assert code == want_code and said in stderr and b"Traceback" not in stderr
        assert list(tmp_path.iterdir()) == []
