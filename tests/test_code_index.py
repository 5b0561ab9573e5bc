"""Indexes of codes the graph cannot search alone: several bit planes (Tencent's residual
binarisation: plane 1 in the graph, the rest in planes.npy) and PQ codes (a flat index scanned
by ADC, optionally the first stage before rescoring with kept full vectors). Every expected
ranking and score is computed here in numpy from the codec's own arrays
(test_code_search.reconstruction), never from vecpipe's search."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.codec import Codec
from vecpipe.formats import schema as names
from tests.test_code_search import reconstruction

DIM, QUERY = 32, "doc 5 on topic 5 and 5"
PLANES = ["--dtype", "binary", "--bits", "3"]
PQ = ["--dtype", "pq", "--pq-m", "8", "--pq-bits", "4"]


def embedded(cli, tmp_path, count=600, name="docs"):
    docs = "".join(json.dumps({"id": f"{name}{i}", "text": f"doc {i} on topic {i % 13} and "
                               f"{i % 7} and {i % 5}", "group": i % 2}) + "\n"
                   for i in range(count))
    (tmp_path / f"{name}.jsonl").write_text(docs)
    out = tmp_path / f"{name}.arrow"
    assert cli("embed", tmp_path / f"{name}.jsonl", "-m", f"fake:{DIM}", "-o", out).exit_code == 0
    return out


def compressed(cli, tmp_path, source, options, codec_file="codec.json", out="codes.arrow"):
    codec_path = tmp_path / codec_file
    given = ["--codec", codec_path] if codec_path.exists() else [*options, "--save-codec",
                                                                  codec_path]
    result = cli("compress", source, *given, "-o", tmp_path / out)
    assert result.exit_code == 0, result.stderr
    return tmp_path / out, Codec.from_json(codec_path.read_text())


def column(path, name="embedding"):
    table = pa.ipc.open_file(str(path)).read_all()
    return table.column("id").to_pylist(), np.asarray(names.vectors_to_numpy(table.column(name)))


def query_vector():
    from vecpipe.core.embedder import fake_vectors

    return fake_vectors([QUERY], DIM)[0]


def search(cli, index, *options, k=5):
    result = cli("search", index, "--query", QUERY, "-m", f"fake:{DIM}", "-k", str(k),
                 "--output-format", "jsonl", *options)
    assert result.exit_code == 0, result.stderr
    return [hit["id"] for hit in result.records()], [hit["score"] for hit in result.records()]


def best(ids, scores, k=5):
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


@pytest.mark.parametrize("layout", [[], ["--flat"]])
def test_bit_planes_index_keeps_the_first_plane_in_the_graph(cli, tmp_path, layout):
    codes_path, codec = compressed(cli, tmp_path, embedded(cli, tmp_path), PLANES)
    index = tmp_path / "idx"
    result = cli("index", codes_path, *layout, "-o", index)
    assert result.exit_code == 0, result.stderr
    assert "b1 3 planes" in result.stderr
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["planes"], manifest["dim"], manifest["dtype"]) == (3, DIM, "b1")
    ids, codes = column(codes_path)
    planes = np.load(index / "planes.npy")
    np.testing.assert_array_equal(planes, codes[:, DIM // 8:])  # planes 2 and 3
    if layout:
        np.testing.assert_array_equal(np.load(index / "vectors.npy"), codes[:, :DIM // 8])
    expected = reconstruction(codec, codes) @ query_vector()
    want_ids, want_scores = best(ids, expected)
    for exact in (["--exact"], []) if not layout else ([],):
        found, scores = search(cli, index, *exact)
        if exact or layout:  # an exact scan scores every plane of every row
            assert found == want_ids
        np.testing.assert_allclose(scores, expected[[ids.index(i) for i in found]], atol=1e-5)
    assert cli("info", "--verify", index).exit_code == 0


def test_bit_planes_rescore_the_first_planes_candidates(cli, tmp_path):
    """The default (graph) search rescores the first plane's k*10 hamming neighbours with
    every plane: the hits are the best of those candidates by the planes' score."""
    codes_path, codec = compressed(cli, tmp_path, embedded(cli, tmp_path, 2000), PLANES)
    ids, codes = column(codes_path)
    query_plane = codec.encode(query_vector()[None, :])[:, :DIM // 8]
    hamming = np.unpackbits(codes[:, :DIM // 8] ^ query_plane, axis=1).sum(axis=1)
    # a graph built and searched wide enough to find the exact hamming neighbours
    assert cli("index", codes_path, "--connectivity", "64", "--expansion-add", "400",
               "-o", tmp_path / "graph").exit_code == 0
    found, scores = search(cli, tmp_path / "graph", "--ef", "400")
    candidates = np.argsort(hamming, kind="stable")[:50]
    expected = reconstruction(codec, codes) @ query_vector()
    ties = hamming <= hamming[candidates[-1]]  # candidates tied with the 50th may be taken
    assert all(ties[ids.index(i)] for i in found)
    np.testing.assert_allclose(scores, expected[[ids.index(i) for i in found]], atol=1e-5)
    surely_in = hamming < hamming[candidates[-1]]  # no tie decides these
    assert scores[0] >= expected[surely_in].max() - 1e-6


def test_bit_planes_survive_append_delete_and_merge(cli, tmp_path):
    docs = embedded(cli, tmp_path, 300)
    more = embedded(cli, tmp_path, 200, name="more")
    first, codec = compressed(cli, tmp_path, docs, PLANES)
    second, _ = compressed(cli, tmp_path, more, PLANES, out="more-codes.arrow")
    index = tmp_path / "idx"
    assert cli("index", first, "-o", index).exit_code == 0
    assert cli("index", second, "--append", "-o", index).exit_code == 0
    gone = tmp_path / "gone.txt"
    gone.write_text("".join(f"docs{i}\n" for i in range(0, 300, 3)))
    assert cli("index", "--delete", gone, "-o", index).exit_code == 0
    assert cli("index", second, "-o", tmp_path / "idx-more").exit_code == 0
    merged = tmp_path / "merged"
    result = cli("merge", "--index", index, tmp_path / "idx-more", "--on-duplicate", "first",
                 "-o", merged)
    assert result.exit_code == 0, result.stderr
    ids_a, codes_a = column(first)
    ids_b, codes_b = column(second)
    kept = [i for i in range(300) if i % 3]
    ids = [ids_a[i] for i in kept] + ids_b
    codes = np.concatenate([codes_a[kept], codes_b])
    expected = reconstruction(codec, codes) @ query_vector()
    for folder in (index, merged):
        found, scores = search(cli, folder, "--exact", k=8)
        assert (found, pytest.approx(scores, abs=1e-5)) == (best(ids, expected, 8)[0],
                                                            list(best(ids, expected, 8)[1]))
        assert cli("info", "--verify", folder).exit_code == 0


def test_damaged_planes_are_caught(cli, tmp_path):
    codes_path, _ = compressed(cli, tmp_path, embedded(cli, tmp_path, 100), PLANES)
    index = tmp_path / "idx"
    assert cli("index", codes_path, "-o", index).exit_code == 0
    planes = np.load(index / "planes.npy")
    planes[0, 0] ^= 1
    np.save(index / "planes.npy", planes)
    result = cli("info", "--verify", index)
    assert result.exit_code == 1
    assert "planes.npy does not match its checksum" in result.stderr
    np.save(index / "planes.npy", planes[:-1])
    result = cli("search", index, "--query", QUERY, "-m", f"fake:{DIM}")
    assert result.exit_code == 1 and "planes.npy" in result.stderr


def test_pq_index_is_a_flat_adc_scan(cli, tmp_path):
    codes_path, codec = compressed(cli, tmp_path, embedded(cli, tmp_path), PQ)
    index = tmp_path / "idx"
    result = cli("index", codes_path, "--fields", "group", "-o", index)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["layout"], manifest["dtype"], manifest["dim"]) == ("flat", "pq", 8)
    ids, codes = column(codes_path)
    expected = reconstruction(codec, codes) @ query_vector()
    want_ids, want_scores = best(ids, expected)
    found, scores = search(cli, index)
    assert found == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    odd = np.array([int(i[4:]) % 2 == 1 for i in ids])  # a filter scans the allowed rows only
    found, scores = search(cli, index, "--filter", "group == 1")
    assert found == best([i for i, o in zip(ids, odd) if o], expected[odd])[0]
    refused = cli("index", codes_path, "--connectivity", "8", "-o", tmp_path / "graph")
    assert refused.exit_code == 2 and "pq codes are scanned" in refused.stderr
    refused = cli("search", index, "--query", QUERY, "-m", f"fake:{DIM}", "--rescore", "4")
    assert refused.exit_code == 2 and "--codec FILE --keep-vectors" in refused.stderr


def test_pq_first_stage_then_full_vectors(cli, tmp_path):
    """index --codec FILE --keep-vectors: ADC picks k*4 candidates, the kept float vectors
    rescore them."""
    docs = embedded(cli, tmp_path, 1000)
    _, codec = compressed(cli, tmp_path, docs, PQ)
    index = tmp_path / "idx"
    result = cli("index", docs, "--codec", tmp_path / "codec.json", "--keep-vectors",
                 "-o", index)
    assert result.exit_code == 0, result.stderr
    ids, vectors = column(docs)
    np.testing.assert_array_equal(np.load(index / "vectors.npy"), codec.encode(vectors))
    query = query_vector()
    adc = reconstruction(codec, codec.encode(vectors)) @ query
    stage = np.argsort(-adc, kind="stable")[:20]
    full = vectors[stage] @ query
    found, scores = search(cli, index, "--rescore", "4")
    assert found == [ids[i] for i in stage[np.argsort(-full, kind="stable")[:5]]]
    np.testing.assert_allclose(scores, np.sort(full)[::-1][:5], atol=1e-5)
    assert cli("info", "--verify", index).exit_code == 0
    refused = cli("index", tmp_path / "codes.arrow", "--codec", tmp_path / "codec.json",
                  "-o", tmp_path / "twice")
    assert refused.exit_code == 2 and "already compressed" in refused.stderr


def test_a_saved_pca_int8_codec_indexes_float_input_keeping_it(cli, tmp_path):
    """--codec works for any codec: PCA to 16 dims + int8, the 32-dim floats kept, so
    --rescore ranks by the float vectors (cos)."""
    docs = embedded(cli, tmp_path, 300)
    _, codec = compressed(cli, tmp_path, docs, ["--pca", "16", "--dtype", "int8"])
    index = tmp_path / "idx"
    result = cli("index", docs, "--codec", tmp_path / "codec.json", "--keep-vectors",
                 "--dry-run", "-o", index)
    assert result.exit_code == 0 and not index.exists()
    assert cli("index", docs, "--codec", tmp_path / "codec.json", "--keep-vectors",
               "-o", index).exit_code == 0
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["dtype"], manifest["dim"], manifest["full"]["dim"]) == ("i8", 16, DIM)
    ids, vectors = column(docs)
    found, scores = search(cli, index, "--rescore", "300", "--exact")
    cosine = vectors @ query_vector() / np.linalg.norm(vectors, axis=1) \
        / np.linalg.norm(query_vector())
    want_ids, want_scores = best(ids, cosine)
    assert found == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    wrong = cli("index", docs, "--codec", tmp_path / "codec.json", "--dtype", "b1",
                "-o", tmp_path / "other")
    assert wrong.exit_code == 2 and "drop --dtype" in wrong.stderr
