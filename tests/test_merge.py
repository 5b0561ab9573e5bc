"""vecpipe merge: streams (schemas, metadata, dedupe, sorting, shard sets) and model soups."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpipe.core import model_soup
from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError


def write_arrow(path, records, meta=None):
    table = pa.Table.from_pylist(records)
    if "embedding" in table.schema.names:  # as embed writes them: fixed_size_list<float32>
        vectors = names.numpy_to_vectors(np.array(table["embedding"].to_pylist(), np.float32))
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                 vectors)
    if meta:
        table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


def read_any(path):
    data = open(path, "rb").read()
    if data.startswith(b"PAR1"):
        return pq.read_table(path)
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def records_of(r):
    assert r.exit_code == 0, r
    return r.records()


# ---- streams ---------------------------------------------------------------------------------

def test_mixed_formats_concatenate_with_unified_schema(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"_id": "1", "text": "one"},
                                           {"_id": "2", "text": "two", "n": 2}])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["3"], "n": [3.5], "tag": ["x"]}), b)
    c = write_arrow(tmp_path / "c.arrow", [{"id": "4", "text": "four"}])
    out = tmp_path / "out.arrow"
    r = cli("merge", a, b, c, "-o", out)
    assert r.exit_code == 0, r
    table = read_any(out)
    assert table.schema.names == ["id", "text", "n", "tag"]
    assert table.schema.field("n").type == pa.float64()  # int in a.jsonl, double in b.parquet
    assert table.to_pylist() == [
        {"id": "1", "text": "one", "n": None, "tag": None},
        {"id": "2", "text": "two", "n": 2.0, "tag": None},
        {"id": "3", "text": None, "n": 3.5, "tag": "x"},
        {"id": "4", "text": "four", "n": None, "tag": None}]
    assert "3 inputs -> 4 records" in r.stderr


def test_conflicting_types_name_field_and_files(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "score": 0.5}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2", "score": "high"}])
    out = tmp_path / "out.jsonl"
    r = cli("merge", a, b, "-o", out)
    assert r.exit_code == 1 and r.stdout == "" and not out.exists()
    assert f"field 'score' is double in {a} but string in {b}" in r.stderr


def test_integer_and_string_ids_unify_as_strings(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": 7}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "x"}])
    assert records_of(cli("merge", a, b, "--output-format", "jsonl")) == [{"id": "7"},
                                                                          {"id": "x"}]


META = {"model": "m1", "dim": "2", "normalized": "true", "version": "0.1"}


def vector_records(ids, dim=2):
    return [{"id": i, "embedding": [float(k), 1.0][:dim] + [0.0] * (dim - 2)}
            for k, i in enumerate(ids)]


def test_common_metadata_is_kept(cli, tmp_path):
    a = write_arrow(tmp_path / "a.arrow", vector_records(["1"]), META)
    b = write_arrow(tmp_path / "b.arrow", vector_records(["2"]), dict(META, version="0.2",
                                                                      prompt="q: "))
    out = tmp_path / "out.parquet"
    r = cli("merge", a, b, "-o", out)
    assert r.exit_code == 0, r
    meta = names.read_meta(read_any(out).schema)
    assert meta == {"model": "m1", "dim": "2", "normalized": "true"}
    assert "drops metadata not shared by all inputs: prompt" in r.stderr


@pytest.mark.parametrize("key,other", [("model", "m2"), ("normalized", "false"),
                                       ("codec", '{"method": "int8"}')])
def test_metadata_conflicts_refused_unless_force(cli, tmp_path, key, other):
    a = write_arrow(tmp_path / "a.arrow", vector_records(["1"]), META)
    b = write_arrow(tmp_path / "b.arrow", vector_records(["2"]), dict(META, **{key: other}))
    out = tmp_path / "out.arrow"
    r = cli("merge", a, b, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert f"{key} differs: {a} has {META.get(key, 'none')!r}, {b} has {other!r}" in r.stderr
    r = cli("merge", a, b, "-o", out, "--force")
    assert r.exit_code == 0, r
    meta = names.read_meta(read_any(out).schema)
    assert key not in meta and meta["dim"] == "2"
    assert read_any(out).num_rows == 2


def test_metadata_compared_with_first_input_that_has_it(cli, tmp_path, write_jsonl):
    plain = write_jsonl(tmp_path / "plain.jsonl", vector_records(["0"]))
    a = write_arrow(tmp_path / "a.arrow", vector_records(["1"]), META)
    b = write_arrow(tmp_path / "b.arrow", vector_records(["2"]), dict(META, model="m2"))
    r = cli("merge", plain, a, b, "--output-format", "jsonl")
    assert r.exit_code == 1 and f"model differs: {a} has 'm1', {b} has 'm2'" in r.stderr


def test_dimension_mismatch_is_a_type_conflict(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", vector_records(["1"], dim=2))
    b = write_jsonl(tmp_path / "b.jsonl", vector_records(["2"], dim=3))
    r = cli("merge", a, b, "--output-format", "jsonl")
    assert r.exit_code == 1 and "field 'embedding' is fixed_size_list" in r.stderr


@pytest.fixture
def overlapping(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "v": "a1"}, {"id": "2", "v": "a2"},
                                           {"id": "1", "v": "a1-again"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "3", "v": "b3"}, {"id": "2", "v": "b2"}])
    return a, b


@pytest.mark.parametrize("mode,expected", [
    ("none", ["a1", "a2", "a1-again", "b3", "b2"]),
    ("first", ["a1", "a2", "b3"]),
    ("last", ["a1-again", "b3", "b2"]),
])
def test_dedupe_modes(cli, overlapping, mode, expected):
    r = cli("merge", *overlapping, "--on-duplicate", mode, "--output-format", "jsonl")
    assert [rec["v"] for rec in records_of(r)] == expected


def test_dedupe_last_reads_stdin_once_through_a_spool(cli, overlapping):
    a, b = overlapping
    r = cli("merge", a, "-", "--on-duplicate", "last", "--output-format", "jsonl",
            input=b.read_bytes())
    assert [rec["v"] for rec in records_of(r)] == ["a1-again", "b3", "b2"]


def test_dedupe_error_fails_before_writing(cli, overlapping, tmp_path):
    out = tmp_path / "out.jsonl"
    a, b = overlapping
    r = cli("merge", *overlapping, "--on-duplicate", "error", "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert f"duplicate id '1', first seen at {a}:1 ({a}:3)" in r.stderr
    r = cli("merge", b, "-", "--on-duplicate", "error", "--output-format", "jsonl",
            input=b'{"id": "9"}\n{"id": "3"}\n')
    assert r.exit_code == 1 and r.stdout == ""
    assert f"duplicate id '3', first seen at {b}:1 (<stdin>:2)" in r.stderr
    r = cli("merge", b, "--on-duplicate", "error", "--output-format", "jsonl")
    assert len(records_of(r)) == 2


def test_dedupe_needs_ids(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1"}, {"id": None}])
    r = cli("merge", a, "--on-duplicate", "first", "--output-format", "jsonl")
    assert r.exit_code == 1 and f"record has no id to find duplicates by ({a}:2)" in r.stderr
    assert "--on-duplicate keep" in r.stderr and "--dedupe" not in r.stderr
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    r = cli("merge", b, "--on-duplicate", "last", "--output-format", "jsonl")
    assert r.exit_code == 1 and "no id field" in r.stderr


def test_sort_by_is_global(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "c"}, {"id": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "b"}, {"id": "a", "x": 1}])
    r = cli("merge", a, b, "--sort-by", "id", "--on-duplicate", "last", "--output-format", "jsonl")
    assert records_of(r) == [{"id": "a", "x": 1}, {"id": "b", "x": None},
                             {"id": "c", "x": None}]
    r = cli("merge", a, "--sort-by", "nope")
    assert r.exit_code == 1 and "no field 'nope' to sort by" in r.stderr


def test_batches_stream_across_many_inputs(cli, tmp_path, write_jsonl):
    """Several thousand records from several files come out complete and in order."""
    paths = [write_jsonl(tmp_path / f"p{k}.jsonl",
                         [{"id": f"{k}-{i}", "n": i} for i in range(1500)]) for k in range(3)]
    r = cli("merge", *paths, "--output-format", "arrow")
    ids = [rec["id"] for rec in records_of(r)]
    assert ids == [f"{k}-{i}" for k in range(3) for i in range(1500)]


def part(folder, index, count, ext="jsonl"):
    return folder / f"part-{index:05d}-of-{count:05d}.{ext}"


def test_missing_or_repeated_shard_detected(cli, tmp_path, write_jsonl):
    parts = [write_jsonl(part(tmp_path, i, 4), [{"id": str(i)}]) for i in (0, 1, 3)]
    r = cli("merge", *parts, "--output-format", "jsonl")
    assert r.exit_code == 1 and r.stdout == ""
    assert "1 of 4 shards missing (shard 2)" in r.stderr
    assert str(part(tmp_path, 2, 4)) in r.stderr
    r = cli("merge", *parts, parts[1], "--output-format", "jsonl")
    assert r.exit_code == 1 and "shard 1 of 4 given twice" in r.stderr
    write_jsonl(part(tmp_path, 2, 4), [])  # an empty shard is a finished shard
    all_parts = sorted(tmp_path.glob("part-*"))
    assert len(records_of(cli("merge", *all_parts, "--output-format", "jsonl"))) == 3
    r = cli("merge", *all_parts, "--expect-shards", "8")
    assert r.exit_code == 1 and "expected 8 shards but the files say 4" in r.stderr


def test_expect_shards_without_part_names(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2"}])
    r = cli("merge", a, b, "--expect-shards", "3")
    assert r.exit_code == 1 and "expected 3 shards, got 2 inputs" in r.stderr
    assert cli("merge", a, b, "--expect-shards", "2", "--output-format", "jsonl").exit_code == 0
    r = cli("merge", a, a, "--expect-shards", "2")
    assert r.exit_code == 1 and "given twice" in r.stderr


def test_two_fanouts_checked_separately(cli, tmp_path, write_jsonl):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    parts = [write_jsonl(part(tmp_path / d, i, 2), [{"id": d + str(i)}])
             for d in ("x", "y") for i in range(2)]
    assert len(records_of(cli("merge", *parts, "--output-format", "jsonl"))) == 4
    r = cli("merge", *parts[:3], "--output-format", "jsonl")
    assert r.exit_code == 1 and str(part(tmp_path / "y", 1, 2)) in r.stderr


@pytest.mark.slow
def test_stdin_pipeline_subprocess(run_vecpipe, overlapping):
    a, b = overlapping
    out = run_vecpipe("merge", a, "-", "--on-duplicate", "first", "--output-format", "jsonl",
                      input=b.read_bytes())
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["v"] for line in out.stdout.splitlines()] == ["a1", "a2", "b3"]


def test_usage_errors(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1"}])
    assert cli("merge", a, "--on-duplicate", "maybe").exit_code == 2
    assert cli("merge", a, "--weights", "1").exit_code == 2
    assert cli("merge", "-", "-").exit_code == 2
    assert cli("merge", "--models", "default", "--sort-by", "id", "-o", tmp_path).exit_code == 2


def embed_registered():
    from vecpipe.cli.app import COMMANDS

    return any(name == "embed" for name, _ in COMMANDS)


@pytest.mark.slow
@pytest.mark.skipif(not embed_registered(), reason="vecpipe embed is not registered yet")
@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_merged_embed_shards_equal_unsharded(cli, tmp_path, write_jsonl, fmt):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i}"}
                                                 for i in range(200)])
    whole = tmp_path / f"whole.{fmt}"
    assert cli("embed", docs, "-m", "fake:16", "-o", whole).exit_code == 0
    count = 3
    parts = [part(tmp_path, i, count, fmt) for i in range(count)]
    for i, path in enumerate(parts):
        r = cli("embed", docs, "-m", "fake:16", "--shard", f"{i}/{count}", "-o", path)
        assert r.exit_code == 0, r
    r = cli("merge", *parts, "--expect-shards", count, "--output-format", "arrow")
    expected = cli("convert", whole, "--output-format", "arrow").records()
    merged = records_of(r)
    key = lambda rec: rec["id"]  # noqa: E731
    assert len(merged) == 200 and sorted(merged, key=key) == sorted(expected, key=key)
    r = cli("merge", *parts, "--sort-by", "id", "--output-format", "arrow")
    assert records_of(r) == sorted(expected, key=key)
    r = cli("merge", *parts[:2], "--output-format", "arrow")
    assert r.exit_code == 1 and "1 of 3 shards missing" in r.stderr


@pytest.mark.skipif(not embed_registered(), reason="vecpipe embed is not registered yet")
def test_part_folder_of_embed_shards(cli, tmp_path, write_jsonl):
    """`embed --shard I/N -o DIR/` writes part files (and dot-file sidecars); merge DIR reads
    the parts in shard order and notices a missing one."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i}"}
                                                 for i in range(50)])
    folder = tmp_path / "parts"
    for i in (0, 2, 1):
        r = cli("embed", docs, "-m", "fake:8", "--shard", f"{i}/3", "-o", f"{folder}/")
        assert r.exit_code == 0, r
    r = cli("merge", folder, "--expect-shards", "3", "--sort-by", "id", "--output-format",
            "jsonl")
    whole = cli("embed", docs, "-m", "fake:8", "--output-format", "jsonl")
    assert records_of(r) == sorted(records_of(whole), key=lambda rec: rec["id"])
    (folder / "part-00001-of-00003.arrow").unlink()
    r = cli("merge", folder, "--output-format", "jsonl")
    assert r.exit_code == 1 and "part-00001-of-00003.arrow" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("merge", empty)
    assert r.exit_code == 1 and "no part-0000I-of-0000N files" in r.stderr


# ---- model soups -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, bundled_model):
    """A copy of the bundled model with every float weight nudged: a stand-in fine-tune."""
    import copy

    import torch

    st = copy.deepcopy(bundled_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in st.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    folder = tmp_path_factory.mktemp("models") / "perturbed"
    st.save(str(folder))
    return folder


SENTENCES = ["a merged model", "weight averaging of fine-tuned models", "nfcorpus"]


def load(path):
    from vecpipe.cli.models import load_model

    return load_model(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("method", ["linear", "slerp"])
@pytest.mark.slow
def test_soup_with_weights_one_zero_reproduces_model_a(cli, tmp_path, bundled_model, perturbed,
                                                       method):
    out = tmp_path / "soup"
    r = cli("merge", "--models", "default", perturbed, "--weights", "1,0", "--method", method,
            "-o", out)
    assert r.exit_code == 0, r
    soup = load(out)
    # like with like: both through sentence-transformers' own encode
    assert np.array_equal(soup.st.encode(SENTENCES), bundled_model.encode(SENTENCES))
    for key, value in bundled_model.state_dict().items():
        assert soup.st.state_dict()[key].equal(value), key
    recipe = json.loads((out / "vecpipe-merge.json").read_text())
    assert recipe["method"] == method and recipe["weights"] == [1.0, 0.0]
    assert [type(m).__name__ for m in soup.st] == [type(m).__name__ for m in bundled_model]
    r = cli("merge", "--models", "default", perturbed, "--weights", "0,1", "-o", out)
    assert r.exit_code == 0, r  # an earlier merge result is replaced
    from sentence_transformers import SentenceTransformer  # load_model would use its cache

    # like with like: both through sentence-transformers' own encode (load_model's path
    # normalizes once more, which moves the last bit)
    replaced = SentenceTransformer(str(out), device="cpu")
    original = SentenceTransformer(str(perturbed), device="cpu")
    assert np.array_equal(replaced.encode(SENTENCES), original.encode(SENTENCES))


@pytest.mark.slow
def test_linear_soup_is_the_weighted_average(cli, tmp_path, bundled_model, perturbed):
    out = tmp_path / "soup"
    r = cli("merge", "--models", "default", perturbed, "--weights", "0.25,0.75", "-o", out)
    assert r.exit_code == 0, r
    a, b, soup = (bundled_model.state_dict(), load(perturbed).st.state_dict(),
                  load(out).st.state_dict())
    for key in a:
        if a[key].is_floating_point():
            expected = 0.25 * a[key].double() + 0.75 * b[key].double()
            assert np.allclose(soup[key].double().numpy(), expected.numpy(), atol=1e-7), key


def test_slerp_follows_the_arc():
    """Against the closed form for orthonormal vectors: cos(t*pi/2) a + sin(t*pi/2) b."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((64, 2)))
    a, b = 3 * q[:, 0].reshape(8, 8), 3 * q[:, 1].reshape(8, 8)
    for t in (0.0, 0.3, 0.5, 1.0):
        expected = np.cos(t * np.pi / 2) * a + np.sin(t * np.pi / 2) * b
        assert np.allclose(model_soup.slerp_merge(a, b, t), expected, atol=1e-12)
    near = a + 1e-6 * b  # near-parallel: the linear fallback
    assert np.allclose(model_soup.slerp_merge(a, near, 0.5), 0.5 * a + 0.5 * near)
    zero = np.zeros_like(a)
    assert np.allclose(model_soup.slerp_merge(a, zero, 0.25), 0.75 * a)


@pytest.mark.slow
def test_incompatible_models_refused(cli, tmp_path, bundled_model):
    import copy

    st = copy.deepcopy(bundled_model)
    st[0].auto_model.encoder.layer = st[0].auto_model.encoder.layer[:5]
    st[0].auto_model.config.num_hidden_layers = 5
    shallow = tmp_path / "shallow"
    st.save(str(shallow))
    out = tmp_path / "soup"
    r = cli("merge", "--models", "default", shallow, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert "differ in transformer config" in r.stderr and "num_hidden_layers" in r.stderr

    st = copy.deepcopy(bundled_model)
    st[1].pooling_mode = "cls"
    cls = tmp_path / "cls"
    st.save(str(cls))
    r = cli("merge", "--models", "default", cls, "-o", out)
    assert r.exit_code == 1 and "differ in module settings" in r.stderr

    shapes = [("a", {"w": (2, 2), "b": (2,)}), ("b", {"w": (2, 3), "b": (2,)})]
    with pytest.raises(DataError, match=r"'w' is \(2, 2\) in a but \(2, 3\) in b"):
        model_soup.compare_state_shapes(shapes)
    with pytest.raises(DataError, match="'b' only in a"):
        model_soup.compare_state_shapes([shapes[0], ("b", {"w": (2, 2)})])


@pytest.mark.slow
def test_model_usage_errors(cli, tmp_path, perturbed):
    out = tmp_path / "soup"
    assert cli("merge", "--models", "default", perturbed).exit_code == 2  # no -o
    assert cli("merge", "--models", "default", "-o", out).exit_code == 2
    r = cli("merge", "--models", "default", perturbed, "--weights", "1,2,3", "-o", out)
    assert r.exit_code == 2 and "3 values for 2 models" in r.stderr
    r = cli("merge", "--models", "default", perturbed, perturbed, "--method", "slerp", "-o", out)
    assert r.exit_code == 2 and "exactly two" in r.stderr
    r = cli("merge", "--models", "default", "fake:8", "-o", out)
    assert r.exit_code == 2 and "fake model" in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    r = cli("merge", "--models", "default", perturbed, "-o", busy)
    assert r.exit_code == 2 and (busy / "notes.txt").exists()


# ---- indexes ---------------------------------------------------------------------------------

VEC_META = {"model": "m", "dim": "16", "normalized": "false"}


def write_vectors(path, ids, vectors, meta=VEC_META, **extra):
    columns = {"id": pa.array(ids, pa.string()),
               "embedding": names.numpy_to_vectors(np.asarray(vectors, np.float32)),
               **{name: pa.array(values) for name, values in extra.items()}}
    table = pa.table(columns)
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.fixture
def two_indexes(cli, tmp_path):
    """Index a (300 vectors) and b (200 + copies of ids a1, a2), with a field naming the source,
    and their vectors for brute force."""
    rng = np.random.default_rng(7)
    va, vb = rng.standard_normal((300, 16)), rng.standard_normal((202, 16))
    ids_a = [f"a{i}" for i in range(300)]
    ids_b = [f"b{i}" for i in range(200)] + ["a1", "a2"]
    write_vectors(tmp_path / "a.arrow", ids_a, va, src=["a"] * 300)
    write_vectors(tmp_path / "b.arrow", ids_b, vb, src=["b"] * 202, year=list(range(202)))
    for name in ("a", "b"):
        r = cli("index", tmp_path / f"{name}.arrow", "-o", tmp_path / f"idx-{name}",
                "--all-fields", "--keep-vectors")
        assert r.exit_code == 0, r
    queries = rng.standard_normal((20, 16))
    write_vectors(tmp_path / "q.arrow", [f"q{i}" for i in range(20)], queries)
    return dict(a=(tmp_path / "idx-a", ids_a, va), b=(tmp_path / "idx-b", ids_b, vb),
                queries=tmp_path / "q.arrow", query_vectors=queries)


def brute_force(queries, ids, vectors, k):
    """{query number: [(id, cosine)...]} best first."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = q @ x.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {n: [(ids[j], scores[n, j]) for j in row] for n, row in enumerate(top)}


def search_hits(cli, index, queries, *options):
    r = cli("search", index, queries, "--output-format", "jsonl", "--all-fields", *options)
    assert r.exit_code == 0, r
    hits = {}
    for rec in r.records():
        hits.setdefault(int(rec["query_id"][1:]), []).append(rec)
    return hits


def union(two, dedupe):
    """The ids and vectors a merged index should hold, and which source each came from."""
    (_, ids_a, va), (_, ids_b, vb) = two["a"], two["b"]
    keep_b = [i for i, key in enumerate(ids_b) if key not in ("a1", "a2") or dedupe != "first"]
    keep_a = [i for i, key in enumerate(ids_a) if key not in ("a1", "a2") or dedupe != "last"]
    ids = [ids_a[i] for i in keep_a] + [ids_b[i] for i in keep_b]
    vectors = np.vstack([va[keep_a], vb[keep_b]])
    sources = ["a"] * len(keep_a) + ["b"] * len(keep_b)
    return ids, vectors, dict(zip(ids, sources))


@pytest.mark.slow
@pytest.mark.parametrize("link", [False, True], ids=["rebuild", "link"])
@pytest.mark.parametrize("dedupe", ["first", "last"])
def test_merged_index_search_equals_brute_force(cli, tmp_path, two_indexes, link, dedupe):
    out = tmp_path / "merged"
    args = ["--index", *(["--link"] if link else []), two_indexes["a"][0], two_indexes["b"][0]]
    r = cli("merge", *args, "-o", out)
    assert r.exit_code == 1 and "duplicate id 'a1'" in r.stderr and not out.exists()
    r = cli("merge", *args, "--on-duplicate", dedupe, "-o", out)
    assert r.exit_code == 0, r
    ids, vectors, source_of = union(two_indexes, dedupe)
    assert len(ids) == 500
    expected = brute_force(two_indexes["query_vectors"], ids, vectors, 10)
    exact = search_hits(cli, out, two_indexes["queries"], "-k", "10", "--exact")
    ann = search_hits(cli, out, two_indexes["queries"], "-k", "10")
    found = 0
    for n, best in expected.items():
        assert [h["id"] for h in exact[n]] == [key for key, _ in best]
        assert np.allclose([h["score"] for h in exact[n]], [s for _, s in best], atol=1e-5)
        assert all(h["src"] == source_of[h["id"]] for h in exact[n])  # the winning copy
        assert len({h["id"] for h in ann[n]}) == len(ann[n]) == 10
        found += len({h["id"] for h in ann[n]} & {key for key, _ in best})
    assert found / (10 * len(expected)) >= 0.95
    filtered = search_hits(cli, out, two_indexes["queries"], "-k", "5", "--exact",
                           "--filter", 'src == "b"')
    in_b = [i for i, key in enumerate(ids) if source_of[key] == "b"]
    expected_b = brute_force(two_indexes["query_vectors"], [ids[i] for i in in_b],
                             vectors[in_b], 5)
    assert all([h["id"] for h in filtered[n]] == [key for key, _ in best]
               for n, best in expected_b.items())


def test_linked_index_is_a_snapshot_of_hard_linked_shards(cli, tmp_path, two_indexes):
    out = tmp_path / "linked"
    r = cli("merge", "--index", "--link", two_indexes["a"][0], two_indexes["b"][0],
            "--on-duplicate", "last", "-o", out)
    assert r.exit_code == 0, r
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "linked" and manifest["count"] == 500
    assert manifest["rows"] == 502 and manifest["fields"] == ["id", "src", "year"]
    shard = out / manifest["shards"][0]["path"]
    assert (shard / "vectors.usearch").stat().st_ino == \
        (two_indexes["a"][0] / "vectors.usearch").stat().st_ino
    assert sorted(np.load(out / manifest["shards"][0]["hidden"]).tolist()) == [1, 2]
    r = cli("index", tmp_path / "a.arrow", "-o", out, "--append", "--on-duplicate", "first")
    assert r.exit_code == 2 and "cannot append to a linked" in r.stderr
    r = cli("merge", "--index", out, "-o", tmp_path / "flat")  # a linked index rebuilds
    assert r.exit_code == 0, r
    flat = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    assert flat["count"] == 500 and flat["layout"] == "hnsw"
    r = cli("merge", "--index", "--link", out, two_indexes["a"][0], "-o", tmp_path / "x")
    assert r.exit_code == 1 and "linking a linked index" in r.stderr


def test_index_merge_refuses_mismatches(cli, tmp_path, two_indexes):
    rng = np.random.default_rng(3)
    write_vectors(tmp_path / "c.arrow", ["c1", "c2"], rng.standard_normal((2, 16)),
                  meta=dict(VEC_META, model="other"))
    assert cli("index", tmp_path / "c.arrow", "-o", tmp_path / "idx-c").exit_code == 0
    for link in ([], ["--link"]):
        out = tmp_path / f"merged{len(link)}"
        r = cli("merge", "--index", *link, two_indexes["a"][0], tmp_path / "idx-c", "-o", out)
        assert r.exit_code == 1 and not out.exists()
        assert f"model differs: {two_indexes['a'][0]} has 'm', {tmp_path / 'idx-c'} has " \
               f"'other'" in r.stderr
        r = cli("merge", "--index", *link, two_indexes["a"][0], tmp_path / "idx-c", "-o", out,
                "--force")
        assert r.exit_code == 0, r
        assert "model" not in json.loads((out / "manifest.json").read_text())["metadata"]
    assert cli("index", tmp_path / "c.arrow", "-o", tmp_path / "idx-h", "--dtype", "f16",
               "--force").exit_code == 0
    r = cli("merge", "--index", two_indexes["a"][0], tmp_path / "idx-h", "-o", out, "--force")
    assert r.exit_code == 1 and "dtype differs" in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = cli("merge", "--index", two_indexes["a"][0], "-o", busy)
    assert r.exit_code == 2 and (busy / "keep.txt").exists()


def test_quantized_indexes_with_different_codecs(cli, tmp_path, two_indexes):
    """i8 indexes fit their own codecs: a rebuild re-encodes the kept full vectors with the
    first codec; linking them needs --force."""
    from vecpipe.core.index_format import to_index_codes
    from vecpipe.core.index_open import open_index

    for name in ("a", "b"):
        r = cli("index", tmp_path / f"{name}.arrow", "-o", tmp_path / f"i8-{name}", "--dtype",
                "i8", "--keep-vectors", "--all-fields")
        assert r.exit_code == 0, r
    inputs = [tmp_path / "i8-a", tmp_path / "i8-b"]
    r = cli("merge", "--index", "--link", *inputs, "--on-duplicate", "first", "-o", tmp_path / "l")
    assert r.exit_code == 1 and "codec differs" in r.stderr
    r = cli("merge", "--index", *inputs, "--on-duplicate", "first", "-o", tmp_path / "m")
    assert r.exit_code == 0 and "re-encoded" in r.stderr, r
    merged, first = open_index(str(tmp_path / "m")), open_index(str(inputs[0]))
    assert merged.codec == first.codec and merged.count == 500
    rows = np.arange(merged.count)
    full = np.asarray(merged.full_vectors()[rows], np.float32)
    assert np.array_equal(merged.stored_vectors(rows),
                          to_index_codes(first.codec, first.codec.encode(full)))
    ids, vectors, _ = union(two_indexes, "first")
    assert np.array_equal(full, vectors.astype(np.float32))
    assert merged.ids().to_pylist() == ids


@pytest.mark.slow
@pytest.mark.parametrize("with_vectors", [True, False])
def test_merge_on_a_pipe_is_arrow_only_with_vectors(run_vecpipe, tmp_path, write_jsonl,
                                                     with_vectors):
    extra = (lambda i: {"embedding": [1.0, float(i)]}) if with_vectors else (lambda i: {})
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", **extra(1)}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2", **extra(2)}])
    out = run_vecpipe("merge", a, b, env={"VECPIPE_OUTPUT_FORMAT": ""})
    assert out.returncode == 0, out.stderr
    if with_vectors:
        assert pa.ipc.open_stream(out.stdout).read_all().column("id").to_pylist() == ["1", "2"]
    else:
        assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ["1", "2"]


def test_merge_index_refuses_a_lexical_index_in_one_line(cli, tmp_path, write_jsonl):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "hello world"},
                                                {"id": "b", "text": "goodbye world"}])
    assert cli("index", "--lexical", corpus, "-o", tmp_path / "bm").exit_code == 0
    for extra in ([], ["--link"]):
        result = cli("merge", "--index", *extra, tmp_path / "bm", tmp_path / "bm", "-o",
                     tmp_path / "out")
        assert result.exit_code == 2, result.stderr
        assert "is a lexical (BM25) index: --index merges vector indexes" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
