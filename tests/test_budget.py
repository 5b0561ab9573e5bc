"""compress --budget BYTES --report: the codecs that fit, recall@10 of held-out rows against
numpy exact search, and the Pareto marks."""
import json

import numpy as np
import pyarrow as pa

from vecpipe.core.codec import Codec
from vecpipe.core.codec_budget import candidates, mark_pareto, split_held_out, sweep
from vecpipe.formats import schema as names


def unit_vectors(rows, dim, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.linspace(2.0, 0.2, dim) + rng.standard_normal(dim)
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_recall(truth_scores, scores, k=10):
    truth = np.argsort(-truth_scores, axis=1)[:, :k]
    found = np.argsort(-scores, axis=1)[:, :k]
    return np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)])


def test_candidates_fit_the_budget():
    found = candidates(64, 16)
    for fit in found:
        assert Codec.fit(unit_vectors(300, 64), **fit).bytes_per_vector <= 16
    assert {"to": "binary", "bits": 2} in found and {"to": "pq", "pq_m": 16} in found
    assert {"to": "binary", "bits": 3} not in found and {"to": "int8", "dim": None} not in found


def test_pareto_marks_rows_no_smaller_row_beats():
    rows = mark_pareto([{"bytes": 8, "r": 0.5}, {"bytes": 4, "r": 0.6}, {"bytes": 8, "r": 0.7},
                        {"bytes": 16, "r": 0.7}, {"bytes": 2, "r": 0.1}], "r")
    assert [(row["bytes"], row["r"], row["pareto"]) for row in rows] == [
        (2, 0.1, True), (4, 0.6, True), (8, 0.7, True), (8, 0.5, False), (16, 0.7, False)]


def test_held_out_rows_are_left_out_of_the_fit():
    sample = unit_vectors(100, 8)
    corpus, queries = split_held_out(sample)
    assert len(queries) == 10 and len(corpus) == 90
    assert not (corpus[:, None, :] == queries[None]).all(axis=2).any()


def test_sweep_recall_matches_numpy():
    corpus, queries = unit_vectors(600, 32), unit_vectors(40, 32, seed=5)
    rows = sweep(corpus, queries, 8)
    assert rows and all(row["bytes"] <= 8 for row in rows)
    for row in rows:
        codec = Codec.fit(corpus, **row["fit"])
        expected = numpy_recall(queries @ corpus.T, codec.score(queries, codec.encode(corpus)))
        assert abs(row["recall@10"] - expected) < 0.01, row


def write_arrow(path, vectors):
    table = pa.table({"id": [f"d{i}" for i in range(len(vectors))],
                      "embedding": names.numpy_to_vectors(vectors)})
    meta = {"model": "fake:32", "dim": str(vectors.shape[1]), "normalized": "true"}
    table = table.replace_schema_metadata(names.with_meta(table.schema, meta).metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_budget_report_prints_jsonl_on_a_pipe(cli, tmp_path):
    source = write_arrow(tmp_path / "v.arrow", unit_vectors(700, 32))
    result = cli("compress", source, "--budget", "4", "--report")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(row["options"] for row in rows) == [
        "--dtype binary", "--dtype pq --pq-m 1", "--dtype pq --pq-m 2", "--dtype pq --pq-m 4"]
    assert [row["bytes"] for row in rows] == sorted(row["bytes"] for row in rows)
    assert rows[0]["pareto"] and rows[0]["queries"] == 70 and rows[0]["corpus"] == 630
    assert all(0 <= row["recall@10"] <= 1 for row in rows)


def test_budget_report_table(cli, tmp_path):
    source = write_arrow(tmp_path / "v.arrow", unit_vectors(700, 32))
    result = cli("compress", source, "--budget", "4", "--report", "--output-format", "table")
    assert result.exit_code == 0 and "Pareto" in result.stdout and "--pq-m 2" in result.stdout


def test_budget_needs_report_and_no_codec_options(cli, tmp_path):
    source = write_arrow(tmp_path / "v.arrow", unit_vectors(50, 32))
    assert cli("compress", source, "--budget", "8").exit_code == 2
    assert cli("compress", source, "--budget", "8", "--report", "--dtype", "int8").exit_code == 2
