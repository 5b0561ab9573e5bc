"""search on a compressed embeddings file whose codes are PQ or several bit planes: each hit's
score is the float query's dot product with the reconstruction, computed here from the codec's
own arrays in numpy (the residual planes' scale-weighted sign sum; PQ's centroids looked up)."""
import json

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.codec import Codec
from vecpipe.formats import schema as names


def reconstruction(codec, codes):
    """The decoded vectors, written out from the codec's fitted arrays."""
    if codec.to == "pq":
        centroids = codec.pq.centroids
        parts = [centroids[j][codes[:, j].astype(int)] for j in range(centroids.shape[0])]
        rotated = np.concatenate(parts, axis=1)
        return rotated if codec.pq.rotation is None else rotated @ codec.pq.rotation.T
    width = (codec.out_dim + 7) // 8
    planes = [np.unpackbits(codes[:, k * width:(k + 1) * width], axis=1, count=codec.out_dim)
              for k in range(codec.scales.shape[0])]
    return sum(scale * (2.0 * plane - 1) for scale, plane in zip(codec.scales, planes))


def stream_codes(cli, tmp_path, options):
    embedded = tmp_path / "docs.arrow"
    docs = "".join(json.dumps({"id": f"d{i}", "text": f"doc {i} on topic {i % 13} and {i % 7}"})
                   + "\n" for i in range(400))
    (tmp_path / "docs.jsonl").write_text(docs)
    assert cli("embed", tmp_path / "docs.jsonl", "-m", "fake:32", "-o", embedded).exit_code == 0
    out = tmp_path / "codes.arrow"
    result = cli("compress", embedded, *options, "--save-codec", tmp_path / "codec.json",
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    return out, Codec.from_json((tmp_path / "codec.json").read_text())


@pytest.mark.parametrize("options", [["--dtype", "binary", "--bits", "3"],
                                     ["--dtype", "pq", "--pq-m", "8", "--pq-bits", "4"],
                                     ["--dtype", "pq", "--pq-m", "4", "--pq-bits", "4", "--opq"]])
def test_flat_search_scores_the_reconstruction(cli, tmp_path, options):
    from vecpipe.core.embedder import fake_vectors

    path, codec = stream_codes(cli, tmp_path, options)
    query = "doc 5 on topic 5 and 5"
    result = cli("search", path, "--query", query, "-m", "fake:32", "-k", "5",
                 "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    table = pa.ipc.open_file(str(path)).read_all()
    codes = np.asarray(names.vectors_to_numpy(table.column("embedding")))
    expected = reconstruction(codec, codes) @ fake_vectors([query], 32)[0]
    best = np.argsort(-expected, kind="stable")[:5]
    hits = result.records()
    assert [hit["id"] for hit in hits] == [f"d{i}" for i in best]
    np.testing.assert_allclose([hit["score"] for hit in hits], expected[best], atol=1e-5)
