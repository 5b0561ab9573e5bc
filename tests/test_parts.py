"""Part files and their sidecars: the resume half of the shard contract."""
from vecpipe.formats.parts import completed_rows, list_parts, mark_complete, part_path
from vecpipe.formats.shards import Shard, parse_shard, shard_of


def test_part_is_complete_only_with_a_matching_sidecar(tmp_path):
    path, fmt = part_path(str(tmp_path), Shard(2, 8), "parquet")
    assert path.endswith("part-00002-of-00008.parquet") and fmt == "parquet"
    assert completed_rows(path) is None
    with open(path, "wb") as f:
        f.write(b"data")
    assert completed_rows(path) is None  # written but never marked: unfinished
    mark_complete(path, 7)
    assert completed_rows(path) == 7
    with open(path, "ab") as f:
        f.write(b"!")
    assert completed_rows(path) is None  # altered after completion


def test_list_parts_ignores_sidecars_and_temporaries(tmp_path):
    for index in (1, 0):
        path, _ = part_path(str(tmp_path), Shard(index, 2))
        open(path, "wb").close()
        mark_complete(path, 0)
    (tmp_path / ".part-00001-of-00002.arrow.abc.tmp").write_bytes(b"")
    assert [s for s, _ in list_parts(str(tmp_path))] == [Shard(0, 2), Shard(1, 2)]


def test_shards_partition_keys_exactly():
    keys = [f"doc-{i}" for i in range(5000)]
    owners = [[shard_of(k, 7) == i for i in range(7)] for k in keys]
    assert all(sum(row) == 1 for row in owners)
    counts = [sum(row[i] for row in owners) for i in range(7)]
    assert min(counts) > 600  # roughly even: 5000/7 = 714


def test_shard_auto_reads_launcher_variables():
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1",
                                "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8)
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert parse_shard("auto", {"JOB_COMPLETION_INDEX": "0", "VECPIPE_SHARD_COUNT": "3"}) == \
        Shard(0, 3)
