"""The index on disk can be trusted at its seams (issue 14): manifest names never leave the
folder, manifest fields and .npy files are checked, checksums are verified where an index is
opened for writing and by `info --verify`, symlinked outputs leave nothing behind, and a build
interrupted by SIGINT or SIGTERM cleans up with the conventional exit status."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

DIM = 16


def write_arrow(path, n, dim=DIM, start=0, seed=0, meta=None):
    """An Arrow file of `n` unit vectors with ids d<start>..; vecpipe metadata of fake:DIM."""
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table({"id": [f"d{i}" for i in range(start, start + n)],
                      "text": [f"document {i}" for i in range(start, start + n)],
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(vectors.reshape(-1)), dim)})
    meta = {"model": f"fake:{dim}", "dim": str(dim), "normalized": "true"} \
        if meta is None else meta
    table = table.replace_schema_metadata({f"vecpipe.{k}": v for k, v in meta.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def query_file(path, n=3, dim=DIM):
    vectors = np.random.default_rng(99).standard_normal((n, dim)).astype(np.float32)
    path.write_text("".join(json.dumps({"id": f"q{i}", "embedding": v.tolist()}) + "\n"
                            for i, v in enumerate(vectors)))
    return path


def read_manifest(idx):
    return json.loads((idx / "manifest.json").read_text())


def write_manifest(idx, manifest):
    (idx / "manifest.json").write_text(json.dumps(manifest))


def refresh_facts(idx, name):
    """Make the manifest's size and checksum of `name` match the file again."""
    manifest = read_manifest(idx)
    data = (idx / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(idx, manifest)


def one_error_line(result, *needles):
    """The error is one line (and perhaps a `hint:` line), holding each of `needles`."""
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("hint: ")]
    assert len(lines) == 1, result.stderr
    assert "Error:" not in lines[0] and "report it" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


@pytest.fixture
def built(cli, tmp_path):
    """A 60-vector HNSW index with kept full vectors, and a query file."""
    src = write_arrow(tmp_path / "docs.arrow", 60)
    idx = tmp_path / "idx"
    r = cli("index", src, "-o", idx, "--keep-vectors", "--fields", "text")
    assert r.exit_code == 0, r
    return idx, query_file(tmp_path / "q.jsonl")


# ---- manifest file names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../victim.txt", "/etc/hostname", "sub/rows.parquet", "..",
                                  "notes.txt"])
def test_search_refuses_a_manifest_file_name_that_is_not_an_index_file(cli, built, name):
    idx, queries = built
    victim = idx.parent / "victim.txt"
    victim.write_text("secret")
    manifest = read_manifest(idx)
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    write_manifest(idx, manifest)
    r = cli("search", idx, queries)
    assert r.exit_code == 1 and r.stdout == ""
    line = one_error_line(r, "manifest.json", "not an index file")
    assert "bytes" not in line and "missing" not in line  # nothing about the named file


def test_merge_link_never_writes_outside_the_output(cli, tmp_path, built):
    """The reported attack: a crafted index whose manifest lists a name that climbs out of the
    shard folder, next to a payload file where that name leads from the crafted index."""
    idx, _ = built
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    crafted = tmp_path / "e" / "f" / "g" / "h" / "idx"
    shutil.copytree(idx, crafted)
    escape = "../../../../victim.txt"  # from -o o/out's shard folder o/.out.*/shards/00000
    (crafted / escape).write_text("PWNED")
    manifest = read_manifest(crafted)
    manifest["files"][escape] = {"bytes": 5, "sha256": hashlib.sha256(b"PWNED").hexdigest()}
    write_manifest(crafted, manifest)
    (tmp_path / "o").mkdir()
    r = cli("merge", "--index", "--link", crafted, "-o", tmp_path / "o" / "out")
    assert r.exit_code == 1
    one_error_line(r, "not an index file")
    assert victim.read_text() == "keep me"
    assert os.listdir(tmp_path / "o") == []


def test_linked_manifest_shard_paths_must_be_shard_folders(cli, tmp_path, built):
    idx, queries = built
    assert cli("merge", "--index", "--link", idx, "-o", tmp_path / "linked").exit_code == 0
    linked = tmp_path / "linked"
    manifest = read_manifest(linked)
    manifest["shards"][0]["path"] = str(idx)  # an absolute path to a real index elsewhere
    write_manifest(linked, manifest)
    r = cli("search", linked, queries)
    assert r.exit_code == 1
    one_error_line(r, "manifest.json", "shards/00000")


# ---- manifest fields and .npy files -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("count", "60"), ("format_version", "one"),
                                        ("dim", None), ("fields", "id"), ("files", []),
                                        ("metric", 3), ("count", True), ("count", -1)])
def test_bad_manifest_types_are_one_clear_line(cli, built, key, value):
    idx, queries = built
    manifest = read_manifest(idx)
    manifest[key] = value
    write_manifest(idx, manifest)
    r = cli("search", idx, queries)
    assert r.exit_code == 1 and r.stdout == ""
    one_error_line(r, "manifest.json", key)


def test_flat_index_count_is_checked_against_vectors_npy(cli, tmp_path):
    src = write_arrow(tmp_path / "docs.arrow", 60)
    idx = tmp_path / "flat"
    assert cli("index", src, "-o", idx, "--flat").exit_code == 0
    manifest = read_manifest(idx)
    manifest["count"] = 50
    write_manifest(idx, manifest)
    r = cli("search", idx, query_file(tmp_path / "q.jsonl"), "-k", 60)
    assert r.exit_code == 1 and r.stdout == ""
    one_error_line(r, "vectors.npy", "60", "50")


@pytest.mark.parametrize("flat, name", [(True, "vectors.npy"), (False, "full.npy")])
def test_object_dtype_npy_is_refused_without_unpickling(cli, tmp_path, flat, name):
    src = write_arrow(tmp_path / "docs.arrow", 60)
    idx = tmp_path / "idx"
    assert cli("index", src, "-o", idx, "--keep-vectors", *(["--flat"] if flat else [])) \
        .exit_code == 0
    np.save(idx / name, np.array([{"x": 1}] * 60, dtype=object), allow_pickle=True)
    refresh_facts(idx, name)
    r = cli("search", idx, query_file(tmp_path / "q.jsonl"), "--rescore", 2)
    assert r.exit_code == 1 and r.stdout == ""
    one_error_line(r, name, "object")


# ---- checksums --------------------------------------------------------------------------------

def corrupt(path):
    """Flip one byte in the middle of a file (same size: only a checksum notices)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_append_verifies_the_checksums_of_the_index_it_extends(cli, tmp_path, built):
    idx, _ = built
    corrupt(idx / "full.npy")
    before = (idx / "manifest.json").read_bytes()
    more = write_arrow(tmp_path / "more.arrow", 10, start=100, seed=1)
    r = cli("index", more, "-o", idx, "--append")
    assert r.exit_code == 1
    one_error_line(r, "full.npy", "checksum")
    assert (idx / "manifest.json").read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("link", [False, True])
def test_merge_verifies_the_checksums_of_its_inputs(cli, tmp_path, built, link):
    idx, _ = built
    other = tmp_path / "other"
    assert cli("index", write_arrow(tmp_path / "o.arrow", 10, start=100, seed=1), "-o", other,
               "--keep-vectors", "--fields", "text").exit_code == 0
    corrupt(other / "rows.parquet")
    r = cli("merge", "--index", *(["--link"] if link else []), idx, other,
            "-o", tmp_path / "out")
    assert r.exit_code == 1
    one_error_line(r, "rows.parquet", "checksum", str(other))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_info_verify_checks_every_file(cli, tmp_path, built):
    idx, _ = built
    r = cli("info", "--verify", idx)
    assert r.exit_code == 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == \
        [f"vecpipe info: {idx}: OK, 3 files match their checksums"]
    assert cli("merge", "--index", "--link", idx, "-o", tmp_path / "linked").exit_code == 0
    r = cli("info", "--verify", tmp_path / "linked")
    assert r.exit_code == 0 and "OK, 3 files" in r.stderr
    corrupt(idx / "vectors.usearch")
    r = cli("info", "--verify", idx)
    assert r.exit_code == 1 and r.stdout == ""
    one_error_line(r, "vectors.usearch", "checksum", str(idx))
    r = cli("info", "--verify", tmp_path / "linked")  # hard-linked: the shard is damaged too
    assert r.exit_code == 1 and "vectors.usearch" in r.stderr
    stream = write_arrow(tmp_path / "s.arrow", 3)
    r = cli("info", "--verify", stream)
    assert r.exit_code == 2 and "index folder" in r.stderr


# ---- rescoring a compressed stream ------------------------------------------------------------

@pytest.mark.parametrize("how", [["--dim", "8"], ["--pca", "8"]])
def test_keep_vectors_of_a_reduced_stream_is_refused_before_building(cli, tmp_path, how):
    src = write_arrow(tmp_path / "docs.arrow", 60)
    reduced = tmp_path / "reduced.arrow"
    assert cli("compress", src, *how, "-o", reduced).exit_code == 0
    r = cli("index", reduced, "-o", tmp_path / "idx", "--keep-vectors")
    assert r.exit_code == 2
    one_error_line(r, "--keep-vectors", "16", "8")
    assert not (tmp_path / "idx").exists() and leftovers(tmp_path) == []
    assert cli("index", reduced, "-o", tmp_path / "idx").exit_code == 0  # without: fine


def test_rescoring_an_old_index_of_reduced_vectors_is_a_clear_error(cli, tmp_path):
    """Indexes built before the refusal keep reduced vectors as full.npy: search says so."""
    src = write_arrow(tmp_path / "docs.arrow", 60)
    reduced = tmp_path / "reduced.arrow"
    assert cli("compress", src, "--dim", "8", "--dtype", "float16", "-o", reduced).exit_code == 0
    idx = tmp_path / "idx"
    assert cli("index", reduced, "-o", idx).exit_code == 0
    table = pa.ipc.open_file(str(reduced)).read_all()
    np.save(idx / "full.npy", np.asarray(table.column("embedding").combine_chunks().flatten()
                                         .to_numpy(zero_copy_only=False), np.float32)
            .reshape(60, 8))
    manifest = read_manifest(idx)
    manifest["full"] = {"dim": 8, "dtype": "float32"}
    write_manifest(idx, manifest)
    refresh_facts(idx, "full.npy")
    r = cli("search", idx, query_file(tmp_path / "q.jsonl"), "--rescore", 2)
    assert r.exit_code == 1 and r.stdout == ""
    one_error_line(r, "full.npy", "8", "16")


# ---- a missing index --------------------------------------------------------------------------

def test_missing_index_is_reported_as_missing_whatever_the_options(cli, tmp_path):
    queries = query_file(tmp_path / "q.jsonl")
    for options in ([], ["--rescore", "2"], ["--ef", "10"]):
        r = cli("search", tmp_path / "no_such_idx", queries, *options)
        assert r.exit_code == 1, (options, r)
        one_error_line(r, "no such", str(tmp_path / "no_such_idx"))


# ---- symlinked outputs ------------------------------------------------------------------------

def test_index_into_a_symlink_replaces_the_target_folder_and_keeps_the_link(cli, tmp_path):
    target = tmp_path / "store" / "idx-v1"
    target.parent.mkdir()
    link = tmp_path / "idx"
    assert cli("index", write_arrow(tmp_path / "a.arrow", 20), "-o", target).exit_code == 0
    link.symlink_to(target, target_is_directory=True)
    r = cli("index", write_arrow(tmp_path / "b.arrow", 30, seed=2), "-o", link)
    assert r.exit_code == 0, r
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_manifest(target)["count"] == 30
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []
    r = cli("index", write_arrow(tmp_path / "c.arrow", 5, start=500), "-o", link, "--append")
    assert r.exit_code == 0 and read_manifest(target)["count"] == 35
    assert link.is_symlink() and leftovers(tmp_path) == [] and leftovers(target.parent) == []


@pytest.mark.parametrize("link_shards", [False, True])
def test_merge_into_a_symlink_replaces_the_target_folder_and_keeps_the_link(cli, tmp_path,
                                                                           built, link_shards):
    idx, _ = built
    target = tmp_path / "store" / "merged"
    target.parent.mkdir()
    link = tmp_path / "merged"
    args = ["merge", "--index", *(["--link"] if link_shards else []), idx]
    assert cli(*args, "-o", target).exit_code == 0
    link.symlink_to(target, target_is_directory=True)
    r = cli(*args, "-o", link)
    assert r.exit_code == 0, r
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_manifest(target)["count"] == 60
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


# ---- signals during a build -------------------------------------------------------------------

SLOW_ROWS = 60_000
SLOW_DIM = 64


@pytest.fixture
def slow_build(tmp_path):
    """An old 20-vector index, and a started subprocess rebuilding it from enough vectors that
    the HNSW graph takes seconds to build (so the signal lands inside usearch's add)."""
    idx = tmp_path / "idx"
    cmd = [sys.executable, "-m", "vecpipe.cli", "index", "-o", str(idx), "--threads", "1"]
    small = write_arrow(tmp_path / "small.arrow", 20, dim=SLOW_DIM)
    subprocess.run(cmd + [str(small)], check=True, capture_output=True)
    before = (idx / "manifest.json").read_bytes()
    big = write_arrow(tmp_path / "big.arrow", SLOW_ROWS, dim=SLOW_DIM, start=1000, seed=3)
    proc = subprocess.Popen(cmd + [str(big), "--expansion-add", "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not [n for n in os.listdir(tmp_path) if ".building-" in n]:
        assert time.time() < deadline and proc.poll() is None, "the build never started"
        time.sleep(0.02)
    time.sleep(1.5)  # imports are done and the first batches are in usearch's add
    assert proc.poll() is None, "the build finished before the signal: give it more rows"
    yield proc, idx, before
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_the_hnsw_build_cleans_up_with_the_conventional_status(
        tmp_path, slow_build, signum, status, word):
    proc, idx, before = slow_build
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert stderr.decode().strip().splitlines() == [f"vecpipe index: error: {word}"]
    assert (idx / "manifest.json").read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


@pytest.mark.slow
def test_ctrl_c_during_an_exact_search_exits_130(tmp_path):
    """usearch answers a signal inside its exact search with std::bad_alloc (MemoryError):
    it must read as the interruption it is, not as 'out of memory'."""
    idx = tmp_path / "flat"
    cmd = [sys.executable, "-m", "vecpipe.cli"]
    big = write_arrow(tmp_path / "big.arrow", 100_000, dim=SLOW_DIM, seed=4)
    subprocess.run(cmd + ["index", str(big), "-o", str(idx), "--flat"], check=True,
                   capture_output=True)
    queries = query_file(tmp_path / "q.jsonl", n=3000, dim=SLOW_DIM)
    proc = subprocess.Popen(cmd + ["search", str(idx), str(queries), "--threads", "1",
                                   "--query-batch", "3000", "-o", str(tmp_path / "hits.jsonl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(6)  # started, index opened, queries read: inside the scan (~1 min)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.decode().strip().splitlines() == ["vecpipe search: error: interrupted"]
    assert not (tmp_path / "hits.jsonl").exists()


def test_disk_full_while_saving_the_graph_is_one_line(cli, tmp_path, write_jsonl, monkeypatch):
    """usearch reports a full disk as RuntimeError("Failed to serialize into stream")."""
    import collections

    from usearch.index import Index

    src = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "text": f"t {i}"} for i in range(50)])
    assert cli("embed", src, "-m", "fake:8", "-o", tmp_path / "v.arrow").exit_code == 0

    def failing_save(self, *args, **kwargs):
        raise RuntimeError("Failed to serialize into stream")
    monkeypatch.setattr(Index, "save", failing_save)
    full = collections.namedtuple("statvfs", "f_bavail f_frsize")(0, 4096)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    r = cli("index", tmp_path / "v.arrow", "-o", tmp_path / "idx")
    assert r.exit_code == 1, r
    assert r.stderr.splitlines()[0].startswith(
        "vecpipe index: error: disk full (no space left on device) (")
    assert "RuntimeError" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "v.arrow"]
