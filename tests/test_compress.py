"""vecpipe compress and the codec in formats/codec.py, against numpy, sentence-transformers and
torch as independent references."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.commands import compress as compress_cmd
from vecpipe.formats import schema as names
from vecpipe.core.codec import Codec, codec_from_meta, first_vectors, hamming_distances
from vecpipe.formats.errors import DataError, UsageError

TARGETS = ("float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary")


def unit_vectors(rows, dim, seed=0):
    """Anisotropic unit vectors (a shared mean direction, unequal variances) like real
    embeddings, so PCA and per-dimension ranges have something to find."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_arrow(path, vectors, meta=None, ids=None):
    ids = ids if ids is not None else [f"d{i}" for i in range(len(vectors))]
    table = pa.table({"id": ids, "embedding": names.numpy_to_vectors(vectors)})
    meta = {"model": "fake:32", "dim": str(vectors.shape[1]), "normalized": "true",
            **(meta or {})}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return path


def read_arrow(path):
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return table, names.read_meta(table.schema)


# ----- the codec ---------------------------------------------------------------------------
@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("steps", [{}, {"dim": 24}, {"pca": 12}, {"dim": 24, "pca": 12}])
def test_codec_json_round_trip_is_exact(to, steps):
    x = unit_vectors(400, 32)
    codec = Codec.fit(x, to, **steps)
    again = Codec.from_json(codec.to_json())
    assert again.to_json() == codec.to_json()
    assert np.array_equal(again.encode(x), codec.encode(x))
    codes = codec.encode(x)
    assert codes.dtype == codec.code_dtype and codes.shape == (400, codec.code_width)
    assert codes.nbytes == 400 * codec.bytes_per_vector
    assert codec_from_meta(codec.metadata()) == codec


@pytest.mark.parametrize("to,tolerance", [("float16", 1e-3), ("bfloat16", 8e-3),
                                          ("int8", None), ("uint8", None)])
def test_decode_reconstructs_within_the_quantisation_step(to, tolerance):
    x = unit_vectors(500, 32)
    codec = Codec.fit(x, to)
    error = np.abs(codec.decode(codec.encode(x)) - x)
    if tolerance is None:  # scalar codes: at most half a step per dimension
        step = (x.max(axis=0) - x.min(axis=0)) / 255
        assert (error <= step / 2 + 1e-6).all()
    else:
        assert (error <= tolerance * np.abs(x) + 1e-7).all()


def test_float16_is_numpys_cast():
    x = unit_vectors(50, 32)
    assert np.array_equal(Codec.fit(x, "float16").encode(x), x.astype(np.float16))


@pytest.mark.slow
def test_bfloat16_bits_match_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([unit_vectors(200, 32), np.array([[1.00390625, -3.0e-39, 7.5e3] * 10
                                                         + [0.0, -0.0]], np.float32)])
    ours = Codec.fit(x, "bfloat16").encode(x)
    reference = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, reference)


@pytest.mark.slow
def test_int8_and_uint8_agree_with_sentence_transformers_within_one_level():
    quantize = pytest.importorskip("sentence_transformers.util.quantization").quantize_embeddings
    x = unit_vectors(500, 32)
    for to in ("int8", "uint8"):
        codec = Codec.fit(x, to)
        ranges = np.stack([codec.low, codec.high])
        theirs = quantize(x, to, ranges=ranges)  # floor; ours rounds to the nearest level
        ours = codec.encode(x)
        assert ours.dtype == theirs.dtype
        diff = ours.astype(int) - theirs.astype(int)
        assert diff.min() >= 0 and diff.max() <= 1


@pytest.mark.slow
def test_binary_packing_matches_numpy_and_sentence_transformers():
    quantize = pytest.importorskip("sentence_transformers.util.quantization").quantize_embeddings
    x = unit_vectors(300, 36)  # not a multiple of 8: the last byte is padded with zeros
    ubinary = Codec.fit(x, "ubinary").encode(x)
    binary = Codec.fit(x, "binary").encode(x)
    assert np.array_equal(ubinary, np.packbits(x > 0, axis=1))
    assert np.array_equal(ubinary, quantize(x, "ubinary"))
    # sentence-transformers' "binary" is the same bytes minus 128, as int8
    assert np.array_equal(binary, (quantize(x, "binary").astype(np.int16) + 128).astype(np.uint8))
    one = np.full((1, 16), -1.0, np.float32)
    one[0, 0] = one[0, 15] = 1.0  # dimension 0 is the most significant bit of byte 0
    assert Codec.fit(one, "binary").encode(one).tolist() == [[0b10000000, 0b00000001]]


def test_int8_clips_instead_of_wrapping():
    calibration = np.array([[-1.0, 0.0], [1.0, 2.0]], np.float32)
    codec = Codec.fit(calibration, "int8", normalize=False)
    far = np.array([[5.0, -7.0], [-5.0, 9.0], [1.0, 2.0], [-1.0, 0.0]], np.float32)
    assert codec.encode(far).tolist() == [[127, -128], [-128, 127], [127, 127], [-128, -128]]
    uint8 = Codec.fit(calibration, "uint8", normalize=False)
    assert uint8.encode(far).tolist() == [[255, 0], [0, 255], [255, 255], [0, 0]]


def test_clip_quantile_fits_ranges_on_quantiles():
    x = unit_vectors(1000, 16)
    codec = Codec.fit(x, "int8", clip_quantile=0.01)
    assert np.allclose(codec.low, np.quantile(x, 0.01, axis=0), atol=1e-6)
    assert np.allclose(codec.high, np.quantile(x, 0.99, axis=0), atol=1e-6)
    codes = codec.encode(x)
    outside = (x > codec.high + 1e-6)
    assert outside.any() and (codes[outside] == 127).all()


@pytest.mark.parametrize("to", ["int8", "uint8", "binary", "float16", "bfloat16"])
def test_transformed_float_queries_score_like_the_decoded_codes(to):
    x, queries = unit_vectors(600, 32), unit_vectors(20, 32, seed=1)
    codec = Codec.fit(x, to, dim=24)
    codes = codec.encode(x)
    reference = codec.project(queries) @ codec.decode(codes).T
    code_space = codec.transform(queries) @ codec.code_matrix(codes).T
    assert np.allclose(code_space + codec.offset(queries)[:, None], reference, atol=1e-4)
    assert np.allclose(codec.score(queries, codes), reference, atol=1e-4)
    # the offset is per query: the ranking in code space is already the decoded ranking
    for row in range(len(queries)):
        assert np.corrcoef(code_space[row], reference[row])[0, 1] > 0.9999


def test_asymmetric_int8_beats_symmetric_on_recall():
    x = unit_vectors(2000, 32)
    codec = Codec.fit(x, "int8")
    result = compress_cmd.recall_retention(codec, x, queries=100)
    assert result["recall"] > result["recall_symmetric"]
    assert result["recall"] > 0.9


def test_pca_matches_numpy_svd():
    x = unit_vectors(800, 32)
    codec = Codec.fit(x, "float32", pca=8)
    _, singular, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)  # uncentred
    alignment = np.abs(np.sum(codec.pca_components * vt[:8].T, axis=0))
    assert np.allclose(alignment, 1.0, atol=1e-4)
    assert codec.pca_explained == pytest.approx((singular[:8] ** 2).sum() / (singular ** 2).sum(),
                                                abs=1e-5)
    projected = x @ vt[:8].T
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    assert np.allclose(np.abs(codec.project(x)), np.abs(projected), atol=1e-4)


def test_truncation_renormalises():
    x = unit_vectors(10, 32)
    reduced = Codec.fit(x, "float32", dim=8).project(x)
    expected = x[:, :8] / np.linalg.norm(x[:, :8], axis=1, keepdims=True)
    assert np.allclose(reduced, expected, atol=1e-6)


def test_hamming_distances_count_differing_bits():
    a, b = unit_vectors(5, 40), unit_vectors(7, 40, seed=3)
    codec = Codec.fit(a, "binary")
    expected = ((a[:, None, :] > 0) != (b[None, :, :] > 0)).sum(axis=2)
    assert np.array_equal(hamming_distances(codec.encode(a), codec.encode(b)), expected)


def test_codec_refuses_bad_options_and_inputs():
    x = unit_vectors(50, 16)
    with pytest.raises(UsageError):
        Codec.fit(x, "int4")
    with pytest.raises(UsageError):
        Codec.fit(x, "int8", dim=17)
    with pytest.raises(UsageError):
        Codec.fit(x, "binary", clip_quantile=0.01)
    with pytest.raises(DataError, match="calibration rows"):
        Codec.fit(x[:7], "int8", pca=8)
    codec = Codec.fit(x, "int8")
    with pytest.raises(DataError, match="16"):
        codec.encode(unit_vectors(3, 12))
    tampered = json.loads(Codec.fit(x, "int8", pca=4).to_json())
    tampered["pca"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="sha256"):
        Codec.from_dict(tampered)
    with pytest.raises(DataError, match="not a int8 code"):
        codec.codes_from_matrix(np.full((1, 16), 300.0, np.float32))


# ----- the command -------------------------------------------------------------------------
@pytest.mark.slow
def test_compress_int8_records_codec_and_codes(cli, tmp_path):
    x = unit_vectors(300, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--dtype", "int8", "-o", out)
    assert r.exit_code == 0, r
    assert r.stdout == "" and "300 vectors" in r.stderr
    table, meta = read_arrow(out)
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(300)]
    assert table.schema.field("embedding").type == pa.list_(pa.int8(), 32)
    assert meta["dtype"] == "int8" and meta["dim"] == "32" and meta["model"] == "fake:32"
    codec = codec_from_meta(meta)
    assert codec == Codec.fit(x, "int8", model="fake:32")
    assert np.array_equal(names.vectors_to_numpy(table.column("embedding")), codec.encode(x))


def test_binary_output_types_arrow_and_jsonl(cli, tmp_path):
    x = unit_vectors(20, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    r = cli("compress", src, "--dtype", "binary", "--output-format", "arrow")
    assert r.exit_code == 0, r
    table = pa.ipc.open_stream(r.stdout_bytes).read_all()
    assert table.schema.field("embedding").type == pa.binary(4)
    assert np.array_equal(names.vectors_to_numpy(table.column("embedding")),
                          np.packbits(x > 0, axis=1))
    r = cli("compress", src, "--dtype", "binary", "--output-format", "jsonl")
    rows = r.records()
    assert rows[0]["embedding"] == np.packbits(x[0] > 0).tolist()
    assert all(0 <= v <= 255 for row in rows for v in row["embedding"])


def test_codec_applied_to_queries_equals_the_corpus_transform(cli, tmp_path, write_jsonl):
    x = unit_vectors(500, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    saved = tmp_path / "codec.json"
    corpus = tmp_path / "c.arrow"
    r = cli("compress", src, "--dim", "24", "--pca", "16", "--dtype", "int8", "--save-codec", saved,
            "-o", corpus)
    assert r.exit_code == 0, r
    table, meta = read_arrow(corpus)
    assert Codec.load(str(saved)) == codec_from_meta(meta)
    corpus_codes = names.vectors_to_numpy(table.column("embedding"))
    # one query, as JSONL (no metadata): the codec file says how to encode it
    query = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "embedding": x[7].tolist()}])
    r = cli("compress", query, "--codec", saved, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    assert r.records()[0]["embedding"] == corpus_codes[7].tolist()
    # JSONL codes read back as float32 numbers and checked back into codes
    codec = Codec.load(str(saved))
    jsonl_codes = np.array([r.records()[0]["embedding"]], np.float32)
    assert np.array_equal(codec.codes_from_matrix(jsonl_codes), corpus_codes[7:8])


def test_stream_larger_than_calibration_buffer(cli, tmp_path):
    x = unit_vectors(3000, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--dtype", "uint8", "--calibration-rows", "500", "-o", out)
    assert r.exit_code == 0, r
    table, meta = read_arrow(out)
    codec = codec_from_meta(meta)
    assert codec.calibration_rows == 500
    assert codec == Codec.fit(x[:500], "uint8", model="fake:32")  # fitted on the first rows only
    assert np.array_equal(names.vectors_to_numpy(table.column("embedding")), codec.encode(x))


class _Batch:
    def __init__(self, rows):
        self.num_rows = rows


class _Item:
    def __init__(self, rows):
        self.batch = _Batch(rows)


def test_calibration_reads_only_what_it_buffers():
    consumed = []

    def endless():
        while True:
            consumed.append(1)
            yield _Item(64)

    rest = endless()
    buffered, sample = first_vectors(rest, 200, lambda item: np.zeros((item.batch.num_rows, 4)))
    assert len(buffered) == 4 and len(consumed) == 4  # 4 x 64 >= 200: nothing read ahead
    assert sample.shape == (200, 4)
    next(rest)
    assert len(consumed) == 5


def test_mismatched_codecs_and_models_refused(cli, tmp_path):
    x = unit_vectors(100, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    saved = tmp_path / "codec.json"
    compressed = tmp_path / "c.arrow"
    assert cli("compress", src, "--dtype", "int8", "--save-codec", saved,
               "-o", compressed).exit_code == 0
    r = cli("compress", compressed, "--dtype", "binary")
    assert r.exit_code == 1 and r.stdout == "" and "already compressed" in r.stderr
    other = write_arrow(tmp_path / "other.arrow", x, meta={"model": "fake:other"})
    out = tmp_path / "o.arrow"
    r = cli("compress", other, "--codec", saved, "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert "'fake:32'" in r.stderr and "'fake:other'" in r.stderr
    assert cli("compress", other, "--codec", saved, "--force", "-o", out).exit_code == 0
    narrow = write_arrow(tmp_path / "narrow.arrow", unit_vectors(5, 16))
    r = cli("compress", narrow, "--codec", saved, "--output-format", "jsonl")
    assert r.exit_code == 1 and "16 dimensions" in r.stderr
    # int8 codes written as JSONL lose the codec: they are refused, not compressed again
    as_jsonl = cli("compress", src, "--codec", saved, "--output-format", "jsonl").stdout
    (tmp_path / "codes.jsonl").write_text(as_jsonl)
    r = cli("compress", tmp_path / "codes.jsonl", "--dtype", "binary")
    assert r.exit_code == 1 and "whole numbers" in r.stderr and "--codec FILE" in r.stderr
    # two compressed inputs with different codecs do not mix in one stream
    second = tmp_path / "c2.arrow"
    assert cli("compress", src, "--dtype", "uint8", "-o", second).exit_code == 0
    r = cli("convert", compressed, second, "--output-format", "jsonl")
    assert r.exit_code == 1 and "codec differs" in r.stderr


def test_usage_errors_exit_2(cli, tmp_path):
    src = write_arrow(tmp_path / "v.arrow", unit_vectors(10, 32))
    saved = tmp_path / "codec.json"
    saved.write_text(Codec.fit(unit_vectors(10, 32), "int8").to_json())
    for args in (["--dtype", "int4"], [], ["--codec", saved, "--dtype", "int8"],
                 ["--dtype", "float32"], ["--dtype", "binary", "--clip-quantile", "0.01"],
                 ["--dtype", "int8", "--dim", "64"]):
        r = cli("compress", src, *args, "--output-format", "jsonl")
        assert r.exit_code == 2 and r.stdout == "", (args, r)


def test_bad_vectors_are_located_and_leave_no_file(cli, tmp_path, write_jsonl):
    x = unit_vectors(5, 4)
    x[3, 1] = np.nan
    src = write_arrow(tmp_path / "v.arrow", x)
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--dtype", "int8", "-o", out)
    assert r.exit_code == 1 and not out.exists()
    assert f"({src}:4)" in r.stderr and "NaN" in r.stderr
    r = cli("compress", write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "text": "x"}]),
            "--dtype", "int8")
    assert r.exit_code == 1 and "no field 'embedding'" in r.stderr


def test_report_text_and_json(cli, tmp_path):
    x = unit_vectors(1500, 32)
    src = write_arrow(tmp_path / "v.arrow", x)
    out = tmp_path / "c.arrow"
    r = cli("compress", src, "--dtype", "int8", "--report", "--save-report", "-", "-o", out)
    assert r.exit_code == 0, r
    facts = json.loads(r.stdout)
    assert facts["bytes_per_vector"] == {"before": 128, "after": 32, "ratio": 4.0}
    assert facts["vectors"] == 1500
    assert facts["quantization"]["mean_cosine"] > 0.999
    assert facts["retrieval"]["recall"] > 0.9
    assert facts["retrieval"]["recall"] >= facts["retrieval"]["recall_symmetric"]
    assert "recall@10" in r.stderr and "bytes/vector   128 -> 32" in r.stderr
    r = cli("compress", src, "--dim", "16", "--save-report", "-", "-o", out)
    facts = json.loads(r.stdout)
    energy = ((x[:, :16] ** 2).sum(axis=1)).mean()
    assert facts["kept_energy"] == pytest.approx(energy, abs=1e-4)


def test_compressed_stream_indexes_and_searches_like_brute_force_over_the_codes(cli, tmp_path,
                                                                                write_jsonl):
    x, queries = unit_vectors(400, 32), unit_vectors(5, 32, seed=9)
    src = write_arrow(tmp_path / "v.arrow", x)
    codes_path, idx = tmp_path / "c.arrow", tmp_path / "idx"
    assert cli("compress", src, "--dtype", "int8", "-o", codes_path).exit_code == 0
    r = cli("index", codes_path, "-o", idx)
    assert r.exit_code == 0, r
    qfile = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "embedding": q.tolist()}
                                               for i, q in enumerate(queries)])
    # candidates from the whole index (5 x 80 = 400), scored as float query vs decoded codes
    r = cli("search", idx, qfile, "--exact", "-k", 5, "--rescore", 80, "--output-format", "jsonl")
    assert r.exit_code == 0, r
    codec = codec_from_meta(read_arrow(codes_path)[1])
    decoded = codec.decode(codec.encode(x))
    cosine = (queries @ decoded.T) / np.linalg.norm(decoded, axis=1)
    expected = np.argsort(-cosine, axis=1)[:, :5]
    got = {}
    for hit in r.records():
        got.setdefault(hit["query_id"], []).append(int(hit["id"][1:]))
    assert [got[f"q{i}"] for i in range(5)] == expected.tolist()


@pytest.mark.slow
def test_real_minilm_vectors_match_sentence_transformers_precision(cli, tmp_path, nfcorpus):
    """The bundled model's own `encode(precision=...)` is the reference for bits and int8."""
    from vecpipe.cli.models import load_model

    model = load_model(None)
    with open(nfcorpus / "corpus.jsonl", encoding="utf-8") as f:
        titles = [json.loads(next(f))["title"] for _ in range(128)]
    vectors = model.encode(titles, batch_size=64)
    src = write_arrow(tmp_path / "v.arrow", vectors, meta={"model": model.name, "dim": "384"})
    out = tmp_path / "bits.arrow"
    assert cli("compress", src, "--dtype", "ubinary", "-o", out).exit_code == 0
    bits = names.vectors_to_numpy(read_arrow(out)[0].column("embedding"))
    reference = model.st.encode(titles, batch_size=64, precision="ubinary",
                                normalize_embeddings=True)
    # two encode paths agree to float rounding: a sign bit may differ only next to zero
    differs = np.unpackbits(bits, axis=1) != np.unpackbits(reference, axis=1)
    assert (np.abs(vectors[differs]) < 1e-5).all()
    r = cli("compress", src, "--dtype", "int8", "--save-report", "-", "-o", out)
    facts = json.loads(r.stdout)
    assert facts["retrieval"]["recall"] >= 0.95 > facts["retrieval"]["recall_symmetric"]
    codes = names.vectors_to_numpy(read_arrow(out)[0].column("embedding")).astype(int)
    reference = model.st.encode(titles, batch_size=64, precision="int8",
                                normalize_embeddings=True).astype(int)
    assert np.abs(codes - reference).max() <= 1  # same ranges; we round where they floor
