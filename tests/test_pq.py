"""Product quantisation (compress --dtype pq) against faiss's ProductQuantizer / IndexPQ fed the
same centroids, and OPQ against faiss.OPQMatrix's distortion."""
import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.codec import Codec
from vecpipe.core.pq import ProductQuantizer, kmeans
from vecpipe.formats import schema as names
from vecpipe.formats.errors import UsageError

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)  # shared CPUs: threads only add contention at these sizes


def unit_vectors(rows, dim, seed=0, mix=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    if mix:  # correlated dimensions: the case OPQ's rotation is for
        x = x @ rng.standard_normal((dim, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_pq(centroids):
    m, ksub, dsub = centroids.shape
    pq = faiss.ProductQuantizer(m * dsub, m, int(np.log2(ksub)))
    faiss.copy_array_to_vector(centroids.ravel(), pq.centroids)
    return pq


def relative_distortion(x, reconstruction):
    return float(((x - reconstruction) ** 2).sum() / (x ** 2).sum())


@pytest.mark.parametrize("m,bits", [(8, 8), (4, 6), (16, 4)])
def test_codes_and_decode_match_faiss_on_the_same_centroids(m, bits):
    x = unit_vectors(800, 32)
    quantizer = ProductQuantizer.train(x, m, bits)
    reference = faiss_pq(quantizer.centroids)
    codes = quantizer.encode(x)
    expected = faiss.vector_to_array(reference.centroids)  # round trip of what faiss holds
    assert np.array_equal(expected, quantizer.centroids.ravel())
    if bits == 8:
        faiss_codes = reference.compute_codes(x)
        # a tie between two centroids may break either way in float32: allow a handful
        assert (faiss_codes != codes).mean() < 1e-3
        np.testing.assert_allclose(quantizer.decode(faiss_codes), reference.decode(faiss_codes),
                                   atol=1e-6)
    by_hand = np.concatenate([quantizer.centroids[j][codes[:, j]] for j in range(m)], axis=1)
    np.testing.assert_allclose(quantizer.decode(codes), by_hand)


def test_each_code_is_the_nearest_centroid_by_brute_force():
    x = unit_vectors(500, 16)
    quantizer = ProductQuantizer.train(x, 4, 5)
    codes = quantizer.encode(x)
    for j in range(4):
        sub = x[:, 4 * j:4 * j + 4]
        distances = ((sub[:, None, :] - quantizer.centroids[j][None]) ** 2).sum(axis=2)
        chosen = distances[np.arange(500), codes[:, j]]
        np.testing.assert_allclose(chosen, distances.min(axis=1), atol=1e-6)


def test_adc_scores_match_faiss_index_pq_inner_product():
    x, queries = unit_vectors(400, 24), unit_vectors(20, 24, seed=3)
    quantizer = ProductQuantizer.train(x, 6, 6)
    index = faiss.IndexPQ(24, 6, 6, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(quantizer.centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    index.add(x)
    distances, labels = index.search(queries, 10)
    ours = quantizer.scores(queries, quantizer.encode(x))
    np.testing.assert_allclose(np.take_along_axis(ours, labels, 1), distances, atol=1e-5)
    np.testing.assert_allclose(np.sort(ours, axis=1)[:, ::-1][:, :10], distances, atol=1e-5)
    # ADC is the dot product with the reconstruction
    np.testing.assert_allclose(ours, queries @ quantizer.decode(quantizer.encode(x)).T,
                               atol=1e-5)


@pytest.mark.slow
def test_training_distortion_is_close_to_faiss_training():
    x = unit_vectors(3000, 32)
    ours = ProductQuantizer.train(x, 8, 6)
    reference = faiss.ProductQuantizer(32, 8, 6)
    reference.train(x)
    ours_error = relative_distortion(x, ours.decode(ours.encode(x)))
    faiss_error = relative_distortion(x, reference.decode(reference.compute_codes(x)))
    assert ours_error < 1.05 * faiss_error


def test_kmeans_matches_lloyds_fixed_point():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((600, 3)).astype(np.float32)
    centroids = kmeans(points, 8, iterations=50)
    labels = ((points[:, None] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
    for c in range(8):
        np.testing.assert_allclose(centroids[c], points[labels == c].mean(axis=0), atol=1e-4)


def test_opq_rotation_is_orthogonal_and_beats_plain_pq_like_faiss():
    x = unit_vectors(2000, 16, mix=True)
    plain = ProductQuantizer.train(x, 4, 5)
    rotated = ProductQuantizer.train(x, 4, 5, opq=True)
    np.testing.assert_allclose(rotated.rotation @ rotated.rotation.T, np.eye(16), atol=1e-4)
    ours = relative_distortion(x, rotated.decode(rotated.encode(x)))
    assert ours < relative_distortion(x, plain.decode(plain.encode(x)))
    opq = faiss.OPQMatrix(16, 4)
    opq.niter, opq.verbose = 10, False
    opq.pq = faiss.ProductQuantizer(16, 4, 5)  # train the rotation with the same 32 centroids
    opq.train(x)
    xr = opq.apply(x)
    pq = faiss.ProductQuantizer(16, 4, 5)
    pq.train(xr)
    faiss_error = relative_distortion(xr, pq.decode(pq.compute_codes(xr)))
    assert ours < 1.1 * faiss_error


def test_codec_json_round_trip_and_scores():
    x = unit_vectors(1000, 32)
    for opq in (False, True):
        codec = Codec.fit(x, "pq", pq_m=8, pq_bits=6, opq=opq, dim=24)
        again = Codec.from_json(codec.to_json())
        assert again == codec and np.array_equal(again.encode(x), codec.encode(x))
        codes = codec.encode(x)
        assert codes.shape == (1000, 8) and codec.bytes_per_vector == 8
        np.testing.assert_allclose(codec.score(x[:5], codes),
                                   codec.project(x[:5]) @ codec.decode(codes).T, atol=1e-5)


@pytest.mark.parametrize("options", [{"pq_m": 5}, {"pq_m": 8, "pq_bits": 9}, {}])
def test_bad_shapes_are_usage_errors(options):
    with pytest.raises(UsageError):
        Codec.fit(unit_vectors(600, 32), "pq", **options)


@pytest.mark.slow
def test_compress_pq_writes_codes_that_faiss_reproduces(cli, tmp_path):
    x = unit_vectors(600, 32)
    table = pa.table({"id": [f"d{i}" for i in range(600)],
                      "embedding": names.numpy_to_vectors(x)})
    meta = {"model": "fake:32", "dim": "32", "normalized": "true"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(tmp_path / "v.arrow"), "wb") as f, \
            pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    result = cli("compress", str(tmp_path / "v.arrow"), "--dtype", "pq", "--pq-m", "4",
                 "-o", str(tmp_path / "pq.arrow"))
    assert result.exit_code == 0, result.stderr
    out = pa.ipc.open_file(pa.memory_map(str(tmp_path / "pq.arrow"))).read_all()
    codec = Codec.from_json(names.read_meta(out.schema)["codec"])
    codes = np.array(out.column("embedding").to_pylist(), dtype=np.uint8)
    faiss_codes = faiss_pq(codec.pq.centroids).compute_codes(x)
    assert (codes != faiss_codes).mean() < 1e-3
