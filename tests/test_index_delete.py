"""vecpipe index --delete: rows deleted by id in the atomic rebuild (hnsw, flat, kept vectors,
codes), ids from plain lines, stdin or records, unknown ids as a note, delete + append in one
swap, an error mid-way leaving the old index, exact search after deleting equal to a numpy
brute force, --append --on-duplicate last as an upsert, and the README's nightly recipe."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from vecpipe.core.index_delete import compact_graph, kept_rows
from vecpipe.core.index_open import open_index

DIM = 16
META = {"model": "fake:16", "dim": str(DIM), "normalized": "true"}

LAYOUTS = {"hnsw": [], "flat": ["--flat"], "hnsw-kept": ["--keep-vectors"],
           "flat-b1-kept": ["--dtype", "b1", "--flat", "--keep-vectors"],
           "hnsw-i8-kept": ["--dtype", "i8", "--keep-vectors"]}
FLOAT_LAYOUTS = ("hnsw", "flat", "hnsw-kept")


def unit_vectors(n, seed):
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_arrow(path, ids, vectors, titles=None):
    """An Arrow file of id/title/embedding records with vecpipe metadata."""
    titles = [f"title of {i}" for i in ids] if titles is None else titles
    table = pa.table({"id": ids, "title": titles, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)), DIM)})
    table = table.replace_schema_metadata({f"vecpipe.{k}": v for k, v in META.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def folder_digest(folder) -> dict:
    return {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture
def corpus(tmp_path):
    ids = [f"d{i}" for i in range(300)]
    vectors = unit_vectors(300, seed=1)
    return {"ids": ids, "vectors": vectors,
            "path": write_arrow(tmp_path / "docs.arrow", ids, vectors)}


def build(cli, corpus, folder, layout="hnsw"):
    r = cli("index", corpus["path"], "-o", folder, "--fields", "title", *LAYOUTS[layout])
    assert r.exit_code == 0, r.stderr
    return folder


def brute_force(vectors, queries, k):
    """Top-k ids by cosine, numpy only (the reference)."""
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def search_exact(cli, folder, queries, tmp_path, k=10):
    query_file = write_arrow(tmp_path / "queries.arrow", [f"q{i}" for i in range(len(queries))],
                             queries)
    out = tmp_path / "hits.jsonl"
    r = cli("search", folder, query_file, "--exact", "-k", k, "-o", out)
    assert r.exit_code == 0, r.stderr
    hits = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    by_query = {}
    for hit in hits:
        by_query.setdefault(hit["query_id"], []).append(hit)
    return [sorted(by_query[f"q{i}"], key=lambda h: h["rank"]) for i in range(len(queries))]


# --- the core pieces ----------------------------------------------------------------------

def test_kept_rows_counts_deleted_and_unknown_ids():
    keep, deleted, missing = kept_rows(pa.array(["a", "b", "c", "d"]), ["c", "a", "x", "c"])
    assert keep.tolist() == [1, 3] and deleted == 2 and missing == 1
    assert kept_rows(pa.array(["a"]), ["x", "y"]) == (None, 0, 2)


def test_compact_graph_renumbers_the_kept_keys_in_order():
    from usearch.index import Index

    vectors = unit_vectors(500, seed=3)
    graph = Index(ndim=DIM, metric="cos", dtype="f32")
    graph.add(np.arange(500, dtype=np.uint64), vectors)
    keep = np.sort(np.random.default_rng(4).choice(500, 320, replace=False)).astype(np.int64)
    compact_graph(graph, 500, keep)
    assert graph.size == 320
    got = np.vstack(graph.get(np.arange(320, dtype=np.uint64)))
    np.testing.assert_array_equal(got, vectors[keep])
    assert not graph.contains(np.arange(320, 500, dtype=np.uint64)).any()


# --- deleting from every layout -------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_delete_from_each_layout(cli, tmp_path, corpus, layout):
    idx = build(cli, corpus, tmp_path / "idx", layout)
    before = open_index(str(idx))
    old_stored = before.stored_vectors(np.arange(300))
    gone = set(np.random.default_rng(2).choice(corpus["ids"], 90, replace=False).tolist())
    (tmp_path / "gone.txt").write_text("\n".join(sorted(gone)) + "\n")

    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", idx)
    assert r.exit_code == 0, r.stderr
    assert "210 vectors in" in r.stderr and "(90 deleted)" in r.stderr

    after = open_index(str(idx), verify=True)  # checksums of every rewritten file
    kept = [row for row, key in enumerate(corpus["ids"]) if key not in gone]
    assert after.count == 210 and after.layout == before.layout
    assert after.ids().to_pylist() == [corpus["ids"][row] for row in kept]  # order kept
    assert after.rows(["title"])["title"].to_pylist() == [f"title of {corpus['ids'][row]}"
                                                          for row in kept]
    np.testing.assert_array_equal(after.stored_vectors(np.arange(210)), old_stored[kept])
    if before.full_spec is not None:
        np.testing.assert_array_equal(after.full_vectors(), corpus["vectors"][kept])
    assert after.manifest["metadata"] == before.manifest["metadata"]


@pytest.mark.parametrize("layout", FLOAT_LAYOUTS)
def test_exact_search_after_delete_equals_brute_force(cli, tmp_path, corpus, layout):
    idx = build(cli, corpus, tmp_path / "idx", layout)
    gone = [f"d{i}" for i in range(0, 300, 3)] + [f"d{i}" for i in range(250, 300)]
    (tmp_path / "gone.txt").write_text("\n".join(gone))
    assert cli("index", "--delete", tmp_path / "gone.txt", "-o", idx).exit_code == 0

    kept = [row for row, key in enumerate(corpus["ids"]) if key not in set(gone)]
    queries = unit_vectors(20, seed=9)
    order, scores = brute_force(corpus["vectors"][kept], queries, 10)
    hits = search_exact(cli, idx, queries, tmp_path)
    for q, query_hits in enumerate(hits):
        assert [h["id"] for h in query_hits] == [corpus["ids"][kept[j]] for j in order[q]]
        np.testing.assert_allclose([h["score"] for h in query_hits], scores[q], atol=1e-5)


def test_graph_search_after_delete_finds_the_brute_force_neighbours(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    gone = [f"d{i}" for i in range(0, 300, 2)]
    (tmp_path / "gone.txt").write_text("\n".join(gone))
    assert cli("index", "--delete", tmp_path / "gone.txt", "-o", idx).exit_code == 0
    kept = list(range(1, 300, 2))
    opened = open_index(str(idx))
    queries = unit_vectors(50, seed=5)
    hits = opened.searcher(10).search(queries)
    truth, _ = brute_force(corpus["vectors"][kept], queries, 10)
    recall = np.mean([len(set(hits.rows[q]) & set(truth[q])) / 10 for q in range(50)])
    assert recall >= 0.95
    assert all(key not in set(gone) for key in opened.ids().to_pylist())


# --- where the ids come from ----------------------------------------------------------------

def _ids_file(tmp_path, kind, ids):
    if kind == "lines":
        path = tmp_path / "gone.txt"
        path.write_text("".join(f"  {key} \n\n" for key in ids))  # spaces, blank lines
    elif kind == "jsonl":
        path = tmp_path / "gone.jsonl"
        path.write_bytes(b"".join(orjson.dumps({"id": key, "why": "gone"}) + b"\n"
                                  for key in ids))
    elif kind == "beir-jsonl":
        path = tmp_path / "gone.jsonl"
        path.write_bytes(b"".join(orjson.dumps({"_id": key}) + b"\n" for key in ids))
    elif kind == "csv":
        path = tmp_path / "gone.csv"
        pacsv.write_csv(pa.table({"why": ["x"] * len(ids), "id": ids}), str(path))
    elif kind == "parquet":
        path = tmp_path / "gone.parquet"
        pq.write_table(pa.table({"id": ids}), str(path))
    else:
        path = tmp_path / "gone.arrow"
        with pa.OSFile(str(path), "wb") as sink:
            table = pa.table({"id": ids})
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    return path


@pytest.mark.parametrize("kind", ["lines", "jsonl", "beir-jsonl", "csv", "parquet", "arrow"])
def test_ids_from_lines_or_records(cli, tmp_path, corpus, kind):
    idx = build(cli, corpus, tmp_path / "idx", "flat")
    path = _ids_file(tmp_path, kind, ["d7", "d3", "d250"])
    r = cli("index", "--delete", path, "-o", idx)
    assert r.exit_code == 0, r.stderr
    ids = open_index(str(idx)).ids().to_pylist()
    assert len(ids) == 297 and not {"d3", "d7", "d250"} & set(ids)


def test_ids_from_stdin(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    r = cli("index", "--delete", "-", "-o", idx, input="d1\nd2\n")
    assert r.exit_code == 0 and "(2 deleted)" in r.stderr
    assert open_index(str(idx)).count == 298


def test_records_without_ids_are_refused_and_change_nothing(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    digest = folder_digest(idx)
    (tmp_path / "bad.jsonl").write_text('{"name": "d1"}\n')
    r = cli("index", "--delete", tmp_path / "bad.jsonl", "-o", idx)
    assert r.exit_code == 1 and "no 'id' field" in r.stderr and "bad.jsonl" in r.stderr
    assert folder_digest(idx) == digest


# --- unknown ids, every row, refusals -------------------------------------------------------

def test_unknown_ids_are_a_note_and_nothing_to_delete_leaves_the_folder(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    (tmp_path / "gone.txt").write_text("d5\nnope\nnever\nnope\n")
    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", idx)
    assert r.exit_code == 0 and "(1 deleted, 2 ids not in the index)" in r.stderr
    digest = folder_digest(idx)
    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", idx)  # a rerun: all gone already
    assert r.exit_code == 0 and "0 deleted, 3 ids not in the index; unchanged" in r.stderr
    assert folder_digest(idx) == digest
    (tmp_path / "empty.txt").write_text("")
    r = cli("index", "--delete", tmp_path / "empty.txt", "-o", idx)
    assert r.exit_code == 0 and "(0 deleted; unchanged)" in r.stderr


def test_deleting_every_row_is_refused_unless_records_are_added(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    digest = folder_digest(idx)
    (tmp_path / "all.txt").write_text("\n".join(corpus["ids"]))
    r = cli("index", "--delete", tmp_path / "all.txt", "-o", idx)
    assert r.exit_code == 1 and "empty index" in r.stderr and "remove the folder" in r.stderr
    assert folder_digest(idx) == digest

    fresh = write_arrow(tmp_path / "fresh.arrow", ["n1", "n2"], unit_vectors(2, seed=7))
    r = cli("index", fresh, "--append", "--delete", tmp_path / "all.txt", "-o", idx)
    assert r.exit_code == 0, r.stderr
    assert open_index(str(idx)).ids().to_pylist() == ["n1", "n2"]


def test_refusals(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    (tmp_path / "gone.txt").write_text("d1\n")
    gone = tmp_path / "gone.txt"
    cases = [
        (["index", corpus["path"], "--delete", gone, "-o", idx], "needs --append"),
        (["index", "--delete", gone, "--metric", "ip", "-o", idx], "--metric applies to"),
        (["index", "--delete", gone, "--fields", "title", "-o", idx], "--fields applies to"),
        (["index", "--delete", gone, "--shard", "0/2", "-o", tmp_path / "parts"], "--shard"),
        (["index", "--append", "--delete", "-", "-o", idx], "stdin (-) can be read only once"),
        (["index", "--delete", gone, "-o", tmp_path / "none"], "no such index folder"),
    ]
    digest = folder_digest(idx)
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code in (1, 2) and message in r.stderr, (args, r.stderr)
    assert folder_digest(idx) == digest
    assert not (tmp_path / "parts").exists()


def test_linked_index_is_refused(cli, tmp_path, corpus):
    a = write_arrow(tmp_path / "a.arrow", ["a1", "a2"], unit_vectors(2, seed=1))
    b = write_arrow(tmp_path / "b.arrow", ["b1", "b2"], unit_vectors(2, seed=2))
    assert cli("index", a, "-o", tmp_path / "ia").exit_code == 0
    assert cli("index", b, "-o", tmp_path / "ib").exit_code == 0
    linked = tmp_path / "linked"
    r = cli("merge", "--index", "--link", tmp_path / "ia", tmp_path / "ib", "-o", linked)
    assert r.exit_code == 0, r.stderr
    (tmp_path / "gone.txt").write_text("a1\n")
    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", linked)
    assert r.exit_code == 2 and "linked" in r.stderr and "hint:" in r.stderr
    assert open_index(str(linked)).count == 4


def test_dry_run_says_what_would_go_and_writes_nothing(cli, tmp_path, corpus):
    idx = build(cli, corpus, tmp_path / "idx")
    digest = folder_digest(idx)
    (tmp_path / "gone.txt").write_text("d1\nd2\nzz\n")
    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", idx, "--dry-run")
    assert r.exit_code == 0, r.stderr
    plan = orjson.loads(r.stdout)
    assert (plan["action"], plan["deleted"], plan["ids_not_in_index"], plan["rows_after"]) == \
        ("delete", 2, 1, 298)
    assert folder_digest(idx) == digest


# --- delete + append, atomicity, upsert -----------------------------------------------------

@pytest.mark.parametrize("layout", ["hnsw", "flat", "hnsw-kept"])
def test_delete_then_append_in_one_swap(cli, tmp_path, corpus, layout):
    idx = build(cli, corpus, tmp_path / "idx", layout)
    (tmp_path / "gone.txt").write_text("d0\nd10\nd20\n")
    new_vectors = unit_vectors(3, seed=11)
    # d10 is deleted and comes back: not a duplicate (deleting goes first), with its new vector
    new = write_arrow(tmp_path / "new.arrow", ["n1", "d10", "n2"], new_vectors,
                      titles=["N1", "D10 again", "N2"])
    r = cli("index", new, "--append", "--delete", tmp_path / "gone.txt", "-o", idx)
    assert r.exit_code == 0, r.stderr
    assert "(3 added, 3 deleted;" in r.stderr
    opened = open_index(str(idx), verify=True)
    ids = opened.ids().to_pylist()
    assert opened.count == 300 and ids[-3:] == ["n1", "d10", "n2"]
    assert "d0" not in ids and "d20" not in ids and ids.count("d10") == 1
    assert opened.rows(["title"])["title"].to_pylist()[-2] == "D10 again"
    np.testing.assert_allclose(opened.stored_vectors([297, 298, 299]), new_vectors, atol=1e-6)
    kept = [row for row in range(300) if row not in (0, 10, 20)]
    reference = np.vstack([corpus["vectors"][kept], new_vectors])
    queries = unit_vectors(10, seed=12)
    order, _ = brute_force(reference, queries, 5)
    all_ids = [corpus["ids"][row] for row in kept] + ["n1", "d10", "n2"]
    for q, query_hits in enumerate(search_exact(cli, idx, queries, tmp_path, k=5)):
        assert [h["id"] for h in query_hits] == [all_ids[j] for j in order[q]]


@pytest.mark.parametrize("layout", ["hnsw", "flat"])
def test_an_error_mid_way_leaves_the_old_index(cli, tmp_path, corpus, layout):
    idx = build(cli, corpus, tmp_path / "idx", layout)
    digest = folder_digest(idx)
    (tmp_path / "gone.txt").write_text("d1\nd2\n")
    vectors = unit_vectors(40, seed=13)
    vectors[30, 4] = np.nan  # the build fails at record 31, after the rows were deleted
    bad = write_arrow(tmp_path / "bad.arrow", [f"n{i}" for i in range(40)], vectors)
    r = cli("index", bad, "--append", "--delete", tmp_path / "gone.txt", "-o", idx)
    assert r.exit_code == 1 and "NaN" in r.stderr and "bad.arrow:31" in r.stderr
    assert folder_digest(idx) == digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []
    assert open_index(str(idx), verify=True).count == 300


def test_an_interrupted_delete_leaves_the_old_index(cli, tmp_path, corpus, monkeypatch):
    from vecpipe.core import index_build

    idx = build(cli, corpus, tmp_path / "idx")
    digest = folder_digest(idx)

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_build, "write_manifest", fail)  # the last step before the swap
    (tmp_path / "gone.txt").write_text("d1\n")
    r = cli("index", "--delete", tmp_path / "gone.txt", "-o", idx)
    assert r.exit_code == 130
    assert folder_digest(idx) == digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []


@pytest.mark.parametrize("layout", ["hnsw", "flat", "hnsw-kept", "hnsw-i8-kept"])
def test_append_on_duplicate_last_is_an_upsert(cli, tmp_path, corpus, layout):
    idx = build(cli, corpus, tmp_path / "idx", layout)
    changed = unit_vectors(2, seed=21)
    update = write_arrow(tmp_path / "update.arrow", ["d5", "d6"], changed,
                         titles=["five, revised", "six, revised"])
    r = cli("index", update, "--append", "--on-duplicate", "last", "-o", idx)
    assert r.exit_code == 0 and "(0 added, 2 replaced;" in r.stderr
    opened = open_index(str(idx), verify=True)
    assert opened.count == 300 and opened.ids().to_pylist() == corpus["ids"]
    titles = opened.rows(["title"])["title"].to_pylist()
    assert titles[5:7] == ["five, revised", "six, revised"] and titles[4] == "title of d4"
    if opened.full_spec is not None:
        np.testing.assert_array_equal(opened.full_vectors()[5:7], changed)
    if opened.dtype == "f32":
        np.testing.assert_array_equal(opened.stored_vectors([5, 6]), changed)
        np.testing.assert_array_equal(opened.stored_vectors([4]), corpus["vectors"][4:5])
    else:  # codes: the new vectors encoded the way a query is
        np.testing.assert_array_equal(opened.stored_vectors([5, 6]), opened.encode(changed))
    # each new vector finds its own row first, the old vector no longer does
    hits = opened.searcher(1, exact=True).search(changed)
    assert [opened.ids()[int(row)].as_py() for row in hits.rows[:, 0]] == ["d5", "d6"]
    if opened.dtype == "f32":
        old = opened.searcher(1, exact=True).search(corpus["vectors"][5:6])
        assert opened.ids()[int(old.rows[0, 0])].as_py() != "d5" or \
            float(old.scores[0, 0]) < 0.999


# --- the README's nightly recipe ------------------------------------------------------------

# The README text (pasted there by the lead); the test runs it as written with bash.
RECIPE = r"""
set -euo pipefail
export LC_ALL=C                                 # one sort order for sort and comm
jq -cS . old.jsonl | sort > old.sorted          # one canonical line per record
jq -cS . new.jsonl | sort > new.sorted
comm -13 old.sorted new.sorted > changed.jsonl  # new records, and changed ones
jq -r .id old.sorted | sort -u > old.ids
jq -r .id new.sorted | sort -u > new.ids
comm -23 old.ids new.ids > gone.txt             # ids no longer in the corpus
if [ -s changed.jsonl ]; then
  vecpipe embed changed.jsonl --text-field title --text-field text \
      --cache ~/.cache/vecpipe -o changed.arrow
  vecpipe index changed.arrow -o idx --append --on-duplicate last --delete gone.txt
else
  vecpipe index -o idx --delete gone.txt        # no row to delete: idx is left as it is
fi
cp new.jsonl old.jsonl                          # what idx holds now: a rerun does nothing
"""


def _snapshot(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))


def _shell(command, cwd, env):
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_nightly_recipe_adds_replaces_deletes_and_is_idempotent(tmp_path):
    import shutil

    if shutil.which("jq") is None:
        pytest.skip("the recipe needs jq")
    env = dict(os.environ, HOME=str(tmp_path), PATH=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    old = [{"id": f"d{i}", "title": f"Title {i}", "text": f"document {i} on topic {i % 4}",
            "year": 2020 + i % 3} for i in range(30)]
    new = [dict(r) for r in old if r["id"] not in ("d3", "d17")]           # two removed
    new[0]["text"] = "document 0, rewritten entirely"                       # text changed
    new[1]["year"] = 1999                                                   # field changed
    new += [{"id": "n1", "title": "New one", "text": "a brand new document", "year": 2026}]
    _snapshot(tmp_path / "old.jsonl", old)
    _shell("vecpipe embed old.jsonl --text-field title --text-field text -o old.arrow && "
           "vecpipe index old.arrow -o idx --fields title,year", tmp_path, env)
    _snapshot(tmp_path / "new.jsonl", new)

    log = _shell(RECIPE, tmp_path, env)
    assert "1 added, 2 deleted, 2 replaced" in log, log
    assert "3 records -> changed.arrow" in log  # only the new and changed records embedded

    # the reference: the new snapshot indexed from scratch
    _shell("vecpipe embed new.jsonl --text-field title --text-field text -o ref.arrow && "
           "vecpipe index ref.arrow -o ref --fields title,year", tmp_path, env)
    got, ref = open_index(str(tmp_path / "idx"), verify=True), open_index(str(tmp_path / "ref"))
    got_ids, ref_ids = got.ids().to_pylist(), ref.ids().to_pylist()
    assert sorted(got_ids) == sorted(ref_ids) == sorted(r["id"] for r in new)
    got_rows = {r["id"]: r for r in got.rows().to_pylist()}
    assert got_rows == {r["id"]: r for r in ref.rows().to_pylist()}
    assert got_rows["d1"]["year"] == 1999
    got_vectors = got.stored_vectors(np.arange(got.count))
    ref_vectors = ref.stored_vectors(np.arange(ref.count))
    ref_row = {key: row for row, key in enumerate(ref_ids)}
    np.testing.assert_allclose(got_vectors, ref_vectors[[ref_row[key] for key in got_ids]],
                               atol=1e-6)

    digest = folder_digest(tmp_path / "idx")
    log = _shell(RECIPE, tmp_path, env)  # a rerun changes nothing
    assert "0 deleted; unchanged" in log, log
    assert folder_digest(tmp_path / "idx") == digest
