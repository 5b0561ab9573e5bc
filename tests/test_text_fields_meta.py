"""The text embedded (fields, separator, chunking) travels in `vecpipe.embedded_text`: written by
embed, kept by compress/convert/merge/index (info shows it), compared where document sets join
(index inputs, --append, merge, convert/compress of several inputs; not queries against documents),
refused like a model mismatch (exit 1, one line, --force hint; --force accepts), and files from
before the key are accepted with a note. An unknown --fields exits at the first batch of a pipe."""
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest

from vecpipe.core.space import (TEXT_KEY, SpaceMismatch, check_same_documents, check_same_space,
                                embedded_text, text_summary)
from vecpipe.formats import schema as names

DOCS = [{"id": "a", "title": "Parsing JSON", "text": "use json.loads on the string"},
        {"id": "b", "title": "Sorting lists", "text": "sorted returns a new list"}]
NEW = [{"id": "c", "title": "Reading files", "text": "open the file and read it"}]
TITLE_TEXT = {"fields": ["title", "text"], "separator": " ", "chunking": None}
TEXT_ONLY = {"fields": ["text"], "separator": " ", "chunking": None}


def arrow_meta(path) -> dict:
    with pa.memory_map(str(path)) as source:
        return names.read_meta(pa.ipc.open_file(source).schema)


def read_arrow(path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def embed(cli, tmp_path, name, records, *extra, write_jsonl):
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    out = tmp_path / f"{name}.arrow"
    r = cli("embed", source, "-m", "fake:8", "-q", "-o", out, *extra)
    assert r.exit_code == 0, r
    return out


def info_meta(cli, path) -> dict:
    r = cli("info", path, "--output-format", "json")
    assert r.exit_code == 0, r
    return json.loads(r.stdout)[0]["metadata"]


def without_text_key(source, target):
    """A copy of an embeddings file as vecpipe wrote it before the key existed."""
    table = read_arrow(source)
    table = table.replace_schema_metadata(
        names.with_meta(table.schema, {TEXT_KEY: None}).metadata)
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return target


def assert_refused(r, has, other):
    assert r.exit_code == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr  # the error and its hint
    assert lines[0].endswith(f"error: embedded_text differs: {has}, {other}"), lines[0]
    assert lines[1].startswith("hint: ") and lines[1].endswith("pass --force if you know better")
    assert "Traceback" not in r.stderr


# ---- written by embed ------------------------------------------------------------------------

def test_embed_records_a_single_field(cli, tmp_path, write_jsonl):
    out = embed(cli, tmp_path, "docs", DOCS, write_jsonl=write_jsonl)
    assert json.loads(arrow_meta(out)[TEXT_KEY]) == TEXT_ONLY


def test_embed_records_several_fields_and_the_separator_it_joins_with(cli, tmp_path,
                                                                         write_jsonl):
    out = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                write_jsonl=write_jsonl)
    recorded = json.loads(arrow_meta(out)[TEXT_KEY])
    assert recorded == TITLE_TEXT
    # the recorded separator is the one embed joined with: the same vectors as the joined text
    joined = [{"id": d["id"], "text": recorded["separator"].join([d["title"], d["text"]])}
              for d in DOCS]
    reference = embed(cli, tmp_path, "joined", joined, write_jsonl=write_jsonl)
    np.testing.assert_array_equal(
        np.array(read_arrow(out)["embedding"].to_pylist()),
        np.array(read_arrow(reference)["embedding"].to_pylist()))


def test_embed_records_the_chunking(cli, tmp_path, write_jsonl):
    out = embed(cli, tmp_path, "docs", DOCS, "--chunk-tokens", "3", "--chunk-overlap", "1",
                write_jsonl=write_jsonl)
    assert read_arrow(out).num_rows > len(DOCS)  # really chunked
    assert json.loads(arrow_meta(out)[TEXT_KEY]) == dict(
        TEXT_ONLY, chunking={"tokens": 3, "overlap": 1})


def test_embed_replaces_an_embedded_text_the_input_carried(cli, tmp_path, write_jsonl):
    first = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                  write_jsonl=write_jsonl)
    again = tmp_path / "again.arrow"
    assert cli("embed", first, "-m", "fake:8", "-q", "-o", again).exit_code == 0
    assert json.loads(arrow_meta(again)[TEXT_KEY]) == TEXT_ONLY


# ---- carried through ---------------------------------------------------------------------------

def test_compress_convert_merge_and_index_carry_it_and_info_shows_it(cli, tmp_path,
                                                                      write_jsonl):
    args = ("--text-field", "title", "--text-field", "text")
    docs = embed(cli, tmp_path, "docs", DOCS, *args, write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, *args, write_jsonl=write_jsonl)
    half = tmp_path / "half.arrow"
    parquet = tmp_path / "half.parquet"
    merged = tmp_path / "merged.arrow"
    idx = tmp_path / "idx"
    for command in (("compress", docs, "--dtype", "float16", "-o", half),
                    ("convert", half, "-o", parquet),
                    ("merge", docs, new, "-o", merged),
                    ("index", parquet, "-o", idx)):
        r = cli(*command, "-q")
        assert r.exit_code == 0, (command, r)
    for path in (docs, half, parquet, merged, idx):
        assert info_meta(cli, path)[TEXT_KEY] == TITLE_TEXT, path
    manifest = json.loads((idx / "manifest.json").read_text())
    assert json.loads(manifest["metadata"][TEXT_KEY]) == TITLE_TEXT


# ---- compared where document sets join ---------------------------------------------------------

def test_append_with_the_same_fields_is_accepted(cli, tmp_path, write_jsonl):
    args = ("--text-field", "title", "--text-field", "text")
    docs = embed(cli, tmp_path, "docs", DOCS, *args, write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, *args, write_jsonl=write_jsonl)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "-q").exit_code == 0
    r = cli("index", new, "-o", idx, "--append")
    assert r.exit_code == 0, r
    assert "3 vectors in" in r.stderr and "embedded" not in r.stderr


def test_append_of_other_fields_is_refused_until_forced(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                 write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, write_jsonl=write_jsonl)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "-q").exit_code == 0
    before = (idx / "manifest.json").read_bytes()
    r = cli("index", new, "-o", idx, "--append")
    assert_refused(r, f"{idx} has 'title' + 'text' joined by ' '", f"{new} has 'text'")
    assert (idx / "manifest.json").read_bytes() == before  # the index is untouched
    forced = cli("index", new, "-o", idx, "--append", "--force")
    assert forced.exit_code == 0, forced
    assert json.loads((idx / "manifest.json").read_text())["count"] == 3


def test_append_of_other_chunking_is_refused(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, write_jsonl=write_jsonl)
    chunked = embed(cli, tmp_path, "new", NEW, "--chunk-tokens", "3", write_jsonl=write_jsonl)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "-q").exit_code == 0
    r = cli("index", chunked, "-o", idx, "--append")
    assert_refused(r, f"{idx} has 'text'",
                   f"{chunked} has 'text' in chunks of 3 tokens overlapping 0")


def test_append_quantized_here_still_compares_the_text(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                 write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, write_jsonl=write_jsonl)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "--dtype", "int8", "-q").exit_code == 0
    r = cli("index", new, "-o", idx, "--append")
    assert_refused(r, f"{idx} has 'title' + 'text' joined by ' '", f"{new} has 'text'")


def test_documents_joined_into_one_set_are_compared(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                 write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, write_jsonl=write_jsonl)
    has, other = f"{docs} has 'title' + 'text' joined by ' '", f"{new} has 'text'"
    for command in (("index", docs, new, "-o", tmp_path / "idx"),
                    ("merge", docs, new, "-o", tmp_path / "merged.arrow"),
                    ("convert", docs, new, "-o", tmp_path / "both.arrow"),
                    ("compress", docs, new, "--dtype", "float16", "-o", tmp_path / "c.arrow")):
        assert_refused(cli(*command), has, other)
    assert not any(p.name in ("idx", "merged.arrow", "both.arrow", "c.arrow")
                   for p in tmp_path.iterdir())
    forced = cli("merge", docs, new, "-o", tmp_path / "merged.arrow", "--force")
    assert forced.exit_code == 0, forced
    assert "drops metadata not shared by all inputs: embedded_text" in forced.stderr
    assert TEXT_KEY not in arrow_meta(tmp_path / "merged.arrow")


def test_merge_of_indexes_compares_the_text(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                 write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, write_jsonl=write_jsonl)
    for name, source in (("i1", docs), ("i2", new)):
        assert cli("index", source, "-o", tmp_path / name, "-q").exit_code == 0
    has, other = f"{tmp_path / 'i1'} has 'title' + 'text' joined by ' '", \
        f"{tmp_path / 'i2'} has 'text'"
    assert_refused(cli("merge", "--index", tmp_path / "i1", tmp_path / "i2", "-o",
                       tmp_path / "i3"), has, other)
    assert_refused(cli("merge", "--index", "--link", tmp_path / "i1", tmp_path / "i2", "-o",
                       tmp_path / "i4"), has, other)
    forced = cli("merge", "--index", tmp_path / "i1", tmp_path / "i2", "-o", tmp_path / "i3",
                 "--force", "-q")
    assert forced.exit_code == 0, forced


def test_queries_from_another_field_search_documents(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, "--text-field", "title", "--text-field", "text",
                 write_jsonl=write_jsonl)
    queries = embed(cli, tmp_path, "queries", NEW, "--text-field", "title",
                    write_jsonl=write_jsonl)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "-q").exit_code == 0
    for target in (idx, docs):
        r = cli("search", target, queries, "-k", "2", "--output-format", "jsonl")
        assert r.exit_code == 0, r
        assert [hit["id"] for hit in r.records()] != [] and "embedded" not in r.stderr


# ---- files from before the key -----------------------------------------------------------------

def test_old_files_without_the_key_are_accepted_with_a_note(cli, tmp_path, write_jsonl):
    args = ("--text-field", "title", "--text-field", "text")
    docs = embed(cli, tmp_path, "docs", DOCS, *args, write_jsonl=write_jsonl)
    new = embed(cli, tmp_path, "new", NEW, *args, write_jsonl=write_jsonl)
    old = without_text_key(new, tmp_path / "old.arrow")
    assert TEXT_KEY not in arrow_meta(old) and "model" in arrow_meta(old)
    idx = tmp_path / "idx"
    assert cli("index", docs, "-o", idx, "-q").exit_code == 0
    note = (f"{old} does not record which text fields were embedded (unknown fields): not "
            f"compared with {idx}'s 'title' + 'text' joined by ' '")
    r = cli("index", old, "-o", idx, "--append")
    assert r.exit_code == 0, r
    assert note in r.stderr
    merged = cli("merge", docs, old, "-o", tmp_path / "merged.arrow")
    assert merged.exit_code == 0, merged
    assert f"{old} does not record which text fields were embedded" in merged.stderr
    # an old index gets the new vectors, with the note the other way round
    old_idx = tmp_path / "old-idx"
    assert cli("index", old, "-o", old_idx, "-q").exit_code == 0
    r = cli("index", docs, "-o", old_idx, "--append")
    assert r.exit_code == 0, r
    assert f"{old_idx} does not record which text fields were embedded" in r.stderr
    # two old files: nothing to compare, nothing to say
    both = cli("merge", old, without_text_key(docs, tmp_path / "old2.arrow"), "-o",
               tmp_path / "olds.arrow")
    assert both.exit_code == 0 and "embedded" not in both.stderr, both


# ---- the comparison itself ---------------------------------------------------------------------

def test_the_comparison_reads_the_json_not_its_spelling():
    recorded = embedded_text(["title", "text"])
    respelled = json.dumps({"chunking": None, "separator": " ", "fields": ["title", "text"]},
                           indent=1)
    check_same_space({TEXT_KEY: recorded}, {TEXT_KEY: respelled}, "a", "b", keys=(TEXT_KEY,))
    with pytest.raises(SpaceMismatch, match="embedded_text differs: a has 'title' \\+ 'text'"):
        check_same_documents({TEXT_KEY: recorded}, {TEXT_KEY: embedded_text(["text"])},
                             "a", "b")
    with pytest.raises(SpaceMismatch, match="' / ' vs|joined by ' / '"):
        check_same_documents({TEXT_KEY: recorded},
                             {TEXT_KEY: embedded_text(["title", "text"], separator=" / ")},
                             "a", "b")
    check_same_documents({TEXT_KEY: recorded}, {TEXT_KEY: embedded_text(["text"])}, "a", "b",
                         force=True)
    assert text_summary("not json") == "'not json'"  # a hand-edited value is shown as it is


# ---- an unknown --fields stops a slow pipe at its first batch ------------------------------------

PRODUCER = textwrap.dedent("""
    import sys
    import numpy as np
    import pyarrow as pa
    schema = pa.schema([("id", pa.string()), ("title", pa.string()),
                        ("embedding", pa.list_(pa.float32(), 4))])
    def batch(start):
        vectors = np.random.default_rng(start).standard_normal((10, 4)).astype("float32")
        return pa.record_batch([pa.array([str(i) for i in range(start, start + 10)]),
                                pa.array(["t"] * 10),
                                pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4)],
                               schema=schema)
    out = sys.stdout.buffer
    writer = pa.ipc.new_stream(out, schema)
    writer.write_batch(batch(0))
    out.flush()
    sys.stdin.read()  # a slow embed: the rest comes when the test says so
    try:
        for start in range(10, 1000, 10):
            writer.write_batch(batch(start))
        writer.close()
        out.flush()
    except BrokenPipeError:
        sys.exit(3)
    """)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--fields", "--store"])
def test_an_unknown_field_exits_at_the_first_batch_of_a_slow_pipe(tmp_path, option):
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
    try:
        index = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "index", "-o",
                                  tmp_path / "idx", option, "title,nosuch"],
                                 stdin=producer.stdout, stderr=subprocess.PIPE)
        producer.stdout.close()  # the index holds the pipe's reading end alone
        started = time.monotonic()
        _, stderr = index.communicate(timeout=120)
        assert index.returncode == 1, stderr
        # the producer has written one batch and is still waiting to write the rest
        assert producer.poll() is None, time.monotonic() - started
        error = [line for line in stderr.decode().splitlines() if "error" in line]
        assert error == [("vecpipe index: error: --fields nosuch: no such field (fields: title) "
                          "(<stdin>:1)")], stderr
        assert not (tmp_path / "idx").exists()
        producer.stdin.close()  # the rest now meets the closed pipe: the producer stops
        assert producer.wait(timeout=60) == 3
    finally:
        producer.kill()
        producer.wait()


def test_an_unknown_field_names_the_input_and_record(cli, tmp_path, write_jsonl):
    docs = embed(cli, tmp_path, "docs", DOCS, write_jsonl=write_jsonl)
    r = cli("index", docs, "-o", tmp_path / "idx", "--fields", "nosuch")
    assert r.exit_code == 1, r
    assert r.stderr.strip().splitlines() == [
        f"vecpipe index: error: --fields nosuch: no such field (fields: title, text) ({docs}:1)"]
    assert not (tmp_path / "idx").exists()
