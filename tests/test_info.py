"""`vecpipe info`: the same top-level facts for every kind of input (a record stream, a Parquet
file, an index, a TREC run, a qrels file), and --field-names as `xsv headers`."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from vecpipe.formats import schema as names

COMMON = ["path", "kind", "format", "rows", "bytes", "columns", "metadata"]


def _vectors(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "v.jsonl", [{"id": f"d{i}", "title": f"t{i}",
                                              "embedding": [0.1 * i, 1.0]} for i in range(5)])


def test_stream_from_stdin(cli, tmp_path, write_jsonl):
    data = _vectors(tmp_path, write_jsonl).read_bytes()
    r = cli("info", input=data)
    assert r.exit_code == 0, r
    facts = json.loads(r.stdout)
    assert list(facts) == COMMON
    assert facts == {"path": "<stdin>", "kind": "records", "format": "jsonl", "rows": 5,
                     "bytes": None, "columns": {"id": "string", "title": "string",
                                                "embedding": "fixed_size_list<item: float>[2]"},
                     "metadata": {}}


def test_parquet_file(cli, tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "year": [2001, 2002, 2003]})
    table = table.replace_schema_metadata(names.with_meta(table.schema, {"model": "m"}).metadata)
    path = tmp_path / "a.parquet"
    pq.write_table(table, path)
    facts = json.loads(cli("info", path).stdout)
    assert list(facts) == COMMON
    assert facts == {"path": str(path), "kind": "records", "format": "parquet", "rows": 3,
                     "bytes": path.stat().st_size, "columns": {"id": "string", "year": "int64"},
                     "metadata": {"model": "m"}}


def test_index_has_the_common_fields_and_a_summarised_codec(cli, tmp_path, write_jsonl):
    vectors = _vectors(tmp_path, write_jsonl)
    assert cli("compress", vectors, "--to", "int8", "-o", tmp_path / "c.arrow").exit_code == 0
    idx = tmp_path / "idx"
    assert cli("index", tmp_path / "c.arrow", "-o", idx, "--store", "title").exit_code == 0
    facts = json.loads(cli("info", idx).stdout)
    assert list(facts) == COMMON + ["layout", "files", "manifest"]
    manifest = json.loads((idx / "manifest.json").read_text())
    files = {p.name: p.stat().st_size for p in idx.iterdir()}
    assert facts["kind"] == "index" and facts["format"] == "vecpipe-index"
    assert facts["rows"] == 5 and facts["layout"] == "hnsw"
    assert facts["files"] == dict(sorted(files.items())) and facts["bytes"] == sum(files.values())
    assert facts["columns"] == {"id": "string", "title": "string"}
    codec = facts["metadata"].pop("codec")
    assert set(codec) == {"transform", "to", "sha256"} and codec["to"] == "int8"
    assert codec["transform"] == "2 -> int8 (2 B/vector)"
    stream_codec = json.loads(cli("info", tmp_path / "c.arrow").stdout)["metadata"]["codec"]
    assert codec == stream_codec  # one summary for a stream's codec and an index's
    assert facts["metadata"] == {k: v for k, v in manifest["metadata"].items() if k != "codec"}
    assert facts["manifest"] == {k: v for k, v in manifest.items()
                                 if k not in ("metadata", "files")}
    table = cli("info", idx, "--output-format", "table").stdout
    assert "flat: false" in table and "query_prompt: null" in table  # JSON, not Python's
    assert "False" not in table and "None" not in table


def test_linked_index_counts_its_shards_files(cli, tmp_path, write_jsonl):
    vectors = _vectors(tmp_path, write_jsonl)
    assert cli("index", vectors, "-o", tmp_path / "a", "--flat", "--store", "title").exit_code == 0
    r = cli("merge", "--index", "--link", tmp_path / "a", tmp_path / "a", "--on-duplicate",
            "last", "-o", tmp_path / "linked")
    assert r.exit_code == 0, r
    facts = json.loads(cli("info", tmp_path / "linked").stdout)
    assert facts["layout"] == "linked" and facts["rows"] == 5
    assert facts["columns"] == {"id": "string", "title": "string"}
    assert "shards/00000/rows.parquet" in facts["files"]
    assert facts["bytes"] == sum(p.stat().st_size for p in (tmp_path / "linked").rglob("*")
                                 if p.is_file())


RUN = ("q1 Q0 d1 1 0.9 tag\nq1 Q0 d2 2 0.8 tag\nq1 Q0 d3 3 0.7 tag\n"
       "q2 Q0 d1 1 0.5 tag\nq2 Q0 d4 2 0.4 tag\nq3 Q0 d9 1 0.1 tag\n")


def test_trec_run(cli, tmp_path):
    path = tmp_path / "run.trec"
    path.write_text(RUN)
    facts = json.loads(cli("info", path).stdout)
    assert facts == {"path": str(path), "kind": "trec-run", "format": "trec", "rows": 6,
                     "bytes": len(RUN), "columns": {"query_id": "string", "iter": "string",
                                                    "docno": "string", "rank": "int64",
                                                    "sim": "double", "run_id": "string"},
                     "metadata": {}, "queries": 3, "hits": 6,
                     "hits_per_query": {"min": 1, "median": 2, "max": 3}, "depth": 3}
    gz = tmp_path / "run.trec.gz"
    gz.write_bytes(gzip.compress(RUN.encode()))
    facts = json.loads(cli("info", gz).stdout)
    assert facts["format"] == "trec+gzip" and facts["hits"] == 6


def test_trec_run_errors_name_the_line(cli, tmp_path):
    path = tmp_path / "run.trec"
    path.write_text(RUN + "q4 Q0 d1 1 high tag\n")
    r = cli("info", path)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines()[0].endswith(f"score 'high' is not a finite number ({path}:7)")


def test_trec_qrels(cli, tmp_path):
    path = tmp_path / "qrels.txt"
    text = "q1 0 d1 2\nq1 0 d2 0\nq1 0 d3 1\nq2 0 d1 0\nq2 0 d1 0\nq3 0 d5 1\n"
    path.write_text(text)
    facts = json.loads(cli("info", path).stdout)
    assert facts == {"path": str(path), "kind": "qrels", "format": "trec", "rows": 6,
                     "bytes": len(text), "columns": {"query_id": "string", "iter": "string",
                                                     "docno": "string", "rel": "int64"},
                     "metadata": {}, "queries": 3, "judgments": 5, "duplicates": 1,
                     "relevant_per_query": {"min": 0, "median": 1, "max": 2},
                     "grades": {"0": 2, "1": 2, "2": 1}}


def test_beir_qrels_tsv(cli, tmp_path):
    path = tmp_path / "test.tsv"
    text = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td3\t2\nq3\td1\t1\n"
    path.write_text(text)
    facts = json.loads(cli("info", path).stdout)
    assert facts == {"path": str(path), "kind": "qrels", "format": "beir-tsv", "rows": 4,
                     "bytes": len(text), "columns": {"query-id": "string",
                                                     "corpus-id": "string", "score": "int64"},
                     "metadata": {}, "queries": 3, "judgments": 4, "duplicates": 0,
                     "relevant_per_query": {"min": 1, "median": 1, "max": 2},
                     "grades": {"1": 3, "2": 1}}
    r = cli("info", path, "--output-format", "table")
    assert r.exit_code == 0 and "beir-tsv" in r.stdout and "relevant_per_query" in r.stdout


def test_text_that_is_no_trec_file_is_still_refused(cli, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not records\n")
    r = cli("info", path)
    assert r.exit_code == 1 and "unrecognized input format" in r.stderr


def test_field_names(cli, tmp_path, write_jsonl):
    vectors = _vectors(tmp_path, write_jsonl)
    r = cli("info", "--field-names", vectors)
    assert r.exit_code == 0 and r.stdout == "id\ntitle\nembedding\n"
    assert cli("info", "--field-names", input=vectors.read_bytes()).stdout == \
        "id\ntitle\nembedding\n"
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"b": [1], "a": ["x"]}), parquet)
    assert cli("info", "--field-names", parquet).stdout == "b\na\n"
    assert cli("index", vectors, "-o", tmp_path / "idx", "--store", "title").exit_code == 0
    assert cli("info", "--field-names", tmp_path / "idx").stdout == "id\ntitle\n"
    run = tmp_path / "run.trec"
    run.write_text(RUN)
    r = cli("info", "--field-names", run, parquet, "--output-format", "json")
    assert r.stdout == "query_id\niter\ndocno\nrank\nsim\nrun_id\nb\na\n"
    r = cli("info", "--field-names", "--verify", tmp_path / "idx")
    assert r.exit_code == 2 and "do not combine" in r.stderr
