"""merge --dedupe-near / --against: near-duplicate removal and contamination checks, checked
against a plain greedy loop over numpy vectors."""
import numpy as np
import pyarrow as pa
import pytest

from vecpipe.cli.models import load_model
from vecpipe.formats import schema as names

DIM = 16


def arrow_file(path, ids, vectors, model="fake:16"):
    """An Arrow file of vectors with the metadata `vecpipe embed` writes for `model`."""
    table = pa.table({"id": ids, "embedding": names.numpy_to_vectors(
        np.asarray(vectors, dtype=np.float32))})
    table = table.replace_schema_metadata(
        names.with_meta(table.schema, load_model(model).metadata()).metadata)
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    return path


def planted(count, rng, copies=0.3, noise=0.05):
    """Unit vectors, a share of them small perturbations of an earlier one."""
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    for row in range(1, count):
        if rng.random() < copies:
            vectors[row] = vectors[rng.integers(row)] + noise * rng.standard_normal(DIM)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def greedy(vectors, threshold, against=None):
    """Plain loop: drop a row within `threshold` of a reference or an earlier kept row."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    kept, contaminated = [], 0
    for row, v in enumerate(unit):
        if against is not None and np.max(against @ v) >= threshold:
            contaminated += 1
            continue
        if all(unit[k] @ v < threshold for k in kept):
            kept.append(row)
    return kept, contaminated


def test_dedupe_near_equals_a_greedy_loop_across_files_and_chunks(cli, tmp_path):
    rng = np.random.default_rng(0)
    vectors = planted(2600, rng)  # over two CHUNKs of 1024, and split over two files
    ids = [f"r{i}" for i in range(len(vectors))]
    a = arrow_file(tmp_path / "a.arrow", ids[:1500], vectors[:1500])
    b = arrow_file(tmp_path / "b.arrow", ids[1500:], vectors[1500:])
    r = cli("merge", a, b, "--dedupe-near", "0.95", "-o", tmp_path / "out.arrow")
    assert r.exit_code == 0, r
    kept, _ = greedy(vectors, 0.95)
    table = pa.ipc.open_file(tmp_path / "out.arrow").read_all()
    assert table.column("id").to_pylist() == [ids[k] for k in kept]
    assert len(kept) < len(vectors) * 0.85  # the case is meaningful
    assert f"{len(vectors) - len(kept)} near-duplicates (cosine >= 0.95) dropped" in r.stderr
    assert names.read_meta(table.schema)["model"] == "fake:16"


def test_against_drops_and_counts_contaminated_records(cli, tmp_path):
    rng = np.random.default_rng(1)
    train = planted(600, rng, copies=0.1)
    held_out = planted(50, rng, copies=0.0)
    train[::7] = held_out[rng.integers(50, size=len(train[::7]))] \
        + 0.02 * rng.standard_normal((len(train[::7]), DIM))
    ids = [f"t{i}" for i in range(len(train))]
    source = arrow_file(tmp_path / "train.arrow", ids, train)
    evaluation = arrow_file(tmp_path / "test.arrow", [f"e{i}" for i in range(50)], held_out)
    r = cli("merge", source, "--dedupe-near", "0.9", "--against", evaluation,
            "--output-format", "jsonl")
    assert r.exit_code == 0, r
    unit = held_out / np.linalg.norm(held_out, axis=1, keepdims=True)
    kept, contaminated = greedy(train, 0.9, unit)
    assert [row["id"] for row in r.records()] == [ids[k] for k in kept]
    assert contaminated >= len(train[::7]) * 0.9
    duplicates = len(train) - len(kept) - contaminated
    assert (f"{duplicates} near-duplicates (cosine >= 0.9) dropped, {contaminated} within 0.9 "
            f"of {evaluation} dropped") in r.stderr


def test_against_vectors_of_another_space_are_refused(cli, tmp_path):
    rng = np.random.default_rng(2)
    source = arrow_file(tmp_path / "a.arrow", ["a", "b"], planted(2, rng))
    other = arrow_file(tmp_path / "o.arrow", ["x"], rng.standard_normal((1, 8)), "fake:8")
    r = cli("merge", source, "--dedupe-near", "0.9", "--against", other, "-o",
            tmp_path / "out.arrow")
    assert r.exit_code == 1 and "differs" in r.stderr and not (tmp_path / "out.arrow").exists()
    forced = cli("merge", source, "--dedupe-near", "0.9", "--against", other, "--force",
                 "-o", tmp_path / "out.arrow")
    assert forced.exit_code == 1 and "dimensions" in forced.stderr


@pytest.mark.parametrize("args,code,message", [
    (["--against", "x.arrow"], 2, "needs --dedupe-near"),
    (["--dedupe-near", "1.5"], 2, "between -1 and 1"),
    (["--dedupe-near", "0.9", "--index"], 2, "applies to record streams"),
])
def test_usage_errors(cli, tmp_path, args, code, message):
    source = arrow_file(tmp_path / "a.arrow", ["a"], np.ones((1, DIM)))
    r = cli("merge", source, *args, "-o", tmp_path / "out")
    assert r.exit_code == code and message in r.stderr and r.stdout == ""


def test_records_without_vectors_are_refused(cli, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "x"}])
    r = cli("merge", path, "--dedupe-near", "0.9", "--output-format", "jsonl")
    assert r.exit_code == 1 and "no `embedding` field" in r.stderr and r.stdout == ""


def test_core_greedy_keeps_the_first_of_a_chain():
    from vecpipe.core.near_dupes import NearDuplicates

    a = np.array([1.0, 0.0], np.float32)
    b = np.array([np.cos(0.3), np.sin(0.3)], np.float32)
    c = np.array([np.cos(0.6), np.sin(0.6)], np.float32)
    finder = NearDuplicates(np.cos(0.45))   # a~b, b~c, a !~ c: b goes, c stays
    assert finder.keep(np.stack([a, b, c])).tolist() == [True, False, True]
    assert finder.keep(np.stack([b, -a])).tolist() == [False, True]
    assert finder.duplicates == 2
