"""embed DIR --glob PATTERN: one record per matching file (formats/files.py)."""
import os
import time

import pytest
from vecpipe.formats import files as files_module
from vecpipe.formats.errors import DataError, UsageError
from vecpipe.formats.files import FileTree


def tree(root, contents: dict):
    """Write {relative path: str or bytes} under root."""
    for name, content in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def ids_of(root, *patterns):
    return [name for name, _ in FileTree(str(root), patterns).files()]


def embed(cli, *args):
    result = cli("embed", *args, "-m", "fake:8", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    return result


def test_each_file_is_a_record_with_its_relative_path_contents_size_and_mtime(cli, tmp_path):
    notes = tree(tmp_path / "notes", {"b.md": "# B\nbeta", "a.md": "# A\nalpha ünïcode",
                                      "deep/er/c.md": "gamma", "skip.txt": "not markdown"})
    os.utime(notes / "a.md", (0, 1_700_000_000))
    records = embed(cli, notes, "--glob", "**/*.md").records()
    assert [r["id"] for r in records] == ["a.md", "b.md", "deep/er/c.md"]
    first = records[0]
    assert first["text"] == "# A\nalpha ünïcode"
    assert first["bytes"] == len("# A\nalpha ünïcode".encode())
    assert first["path"] == os.path.join(str(notes), "a.md")
    assert first["mtime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000))
    assert len(first["embedding"]) == 8


def test_patterns_match_as_in_the_shell(tmp_path):
    tree(tmp_path, {"top.md": "x", "a/one.md": "x", "a/b/two.md": "x", "a/b/note.txt": "x",
                    "docs/x1.md": "x", "docs/x22.md": "x"})
    assert ids_of(tmp_path, "*.md") == ["top.md"]
    assert ids_of(tmp_path, "**/*.md") == ["a/b/two.md", "a/one.md", "docs/x1.md",
                                           "docs/x22.md", "top.md"]
    assert ids_of(tmp_path, "a/**") == ["a/b/note.txt", "a/b/two.md", "a/one.md"]
    assert ids_of(tmp_path, "docs/x?.md") == ["docs/x1.md"]
    assert ids_of(tmp_path, "**/*.txt", "*.md") == ["a/b/note.txt", "top.md"]
    assert ids_of(tmp_path, "./a/*.md") == ["a/one.md"]


@pytest.mark.parametrize("pattern", ["../*.md", "/etc/*", "a//b", "a/./b", ""])
def test_a_pattern_that_could_leave_the_folder_is_a_usage_error(cli, tmp_path, pattern):
    tree(tmp_path, {"a.md": "x"})
    with pytest.raises(UsageError):
        FileTree(str(tmp_path), [pattern])
    result = cli("embed", tmp_path, "--glob", pattern, "-m", "fake:8")
    assert result.exit_code == 2 and "bad glob pattern" in result.stderr


def test_files_that_are_not_text_are_skipped_and_counted_by_reason(cli, tmp_path):
    notes = tree(tmp_path / "n", {"good.md": "fine", "latin1.md": "caf\xe9".encode("latin-1"),
                                  "png.md": b"\x89PNG\r\n\x1a\n\x00\x00", "empty.md": "",
                                  "blank.md": "  \n\t", "bom.md": b"\xef\xbb\xbfwith bom"})
    result = embed(cli, notes, "--glob", "*.md")
    assert [r["id"] for r in result.records()] == ["bom.md", "good.md"]
    assert result.records()[0]["text"] == "with bom"
    assert "4 files skipped: 2 empty (blank.md, empty.md), 1 binary (png.md), " \
           "1 not UTF-8 (latin1.md)" in result.stderr
    assert "2 records -> stdout" in result.stderr


def test_skipped_names_are_cut_after_a_few(tmp_path):
    folder = tree(tmp_path, {f"e{i}.md": "" for i in range(5)})
    found = FileTree(str(folder), ["*.md"])
    assert list(next(found.read(10))[1]) == []
    assert found.skipped.summary() == "5 empty (e0.md, e1.md, e2.md, ...)"


def test_an_unreadable_file_is_skipped(cli, tmp_path, monkeypatch):
    notes = tree(tmp_path / "n", {"ok.md": "fine", "secret.md": "hidden"})
    real_open = os.open

    def refusing(path, *args, **kwargs):  # as chmod 0 would, for root too
        if str(path).endswith("secret.md"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files_module.os, "open", refusing)
    result = embed(cli, notes, "--glob", "*.md")
    assert [r["id"] for r in result.records()] == ["ok.md"]
    assert "1 unreadable (secret.md)" in result.stderr


def test_links_out_of_the_folder_are_not_followed(cli, tmp_path):
    outside = tree(tmp_path / "outside", {"secret.md": "outside text", "d/more.md": "more"})
    notes = tree(tmp_path / "notes", {"a.md": "inside", "sub/b.md": "below"})
    (notes / "out.md").symlink_to(outside / "secret.md")
    (notes / "outdir").symlink_to(outside / "d")
    (notes / "alias.md").symlink_to("a.md")      # inside: followed
    (notes / "sub" / "loop").symlink_to("..")    # back up: not walked twice
    result = embed(cli, notes, "--glob", "**/*.md")
    records = result.records()
    assert [r["id"] for r in records] == ["a.md", "alias.md", "sub/b.md"]
    assert not any("outside" in r["text"] or r["text"] == "more" for r in records)
    assert "2 link out of the folder (out.md, outdir/)" in result.stderr


def test_a_link_to_the_folder_itself_from_outside_is_the_folder(tmp_path):
    notes = tree(tmp_path / "notes", {"a.md": "x"})
    (tmp_path / "alias").symlink_to(notes)
    assert ids_of(tmp_path / "alias", "*.md") == ["a.md"]


def test_hidden_folders_are_not_walked_unless_a_pattern_names_them(tmp_path, monkeypatch):
    tree(tmp_path, {"a.md": "x", ".git/objects/x.md": "x", ".hidden.md": "x",
                    "sub/.cache/y.md": "x", ".github/docs/z.md": "x"})
    walked = []
    real_scandir = os.scandir
    monkeypatch.setattr(files_module.os, "scandir",
                        lambda path: walked.append(os.path.relpath(path, tmp_path)) or
                        real_scandir(path))
    assert ids_of(tmp_path, "**/*.md") == ["a.md"]
    assert sorted(walked) == [".", "sub"]
    assert ids_of(tmp_path, ".github/**/*.md") == [".github/docs/z.md"]
    assert ids_of(tmp_path, ".*.md") == [".hidden.md"]
    assert ids_of(tmp_path, "**/.cache/*.md") == ["sub/.cache/y.md"]


def test_files_are_read_lazily_in_bounded_batches(tmp_path, monkeypatch):
    folder = tree(tmp_path, {f"f{i}.md": f"text {i}" for i in range(5)})
    schema, batches = next(FileTree(str(folder), ["*.md"]).read(2))
    first = next(batches)
    assert first.num_rows == 2 and schema.names == ["id", "text", "path", "bytes", "mtime"]
    (folder / "f4.md").write_text("changed after the first batch")
    rest = [row for batch in batches for row in batch.to_pylist()]
    assert [batch_rows for batch_rows in (len(rest),)] == [3]
    assert rest[-1]["text"] == "changed after the first batch"
    monkeypatch.setattr(files_module, "BATCH_BYTES", 10)  # a batch also ends at a byte bound
    sizes = [b.num_rows for b in next(FileTree(str(folder), ["*.md"]).read(100))[1]]
    assert sizes == [2, 2, 1]


def test_the_output_is_the_same_whatever_order_the_files_were_made_in(cli, tmp_path):
    names = [f"n{i:02d}/{j}.md" for i in range(6) for j in "zyx"]
    one = tree(tmp_path / "one", {name: f"text of {name}" for name in names})
    two = tree(tmp_path / "two", {name: f"text of {name}" for name in reversed(names)})
    for folder in (one, two):  # same times, so that the mtime field agrees
        for name in names:
            os.utime(folder / name, (1_600_000_000, 1_600_000_000))
    first = embed(cli, one, "--glob", "**/*.md").records()
    second = embed(cli, two, "--glob", "**/*.md").records()
    assert [r["id"] for r in first] == sorted(names)
    strip = [{k: v for k, v in r.items() if k != "path"} for r in first]
    assert strip == [{k: v for k, v in r.items() if k != "path"} for r in second]


def test_long_files_are_chunked_with_their_file_as_parent(cli, tmp_path):
    words = " ".join(f"w{i}" for i in range(23))
    notes = tree(tmp_path / "n", {"long.md": words, "short.md": "tiny note"})
    records = embed(cli, notes, "--glob", "*.md", "--chunk-tokens", "10").records()
    assert [(r["id"], r["parent_id"], r["chunk"]) for r in records] == [
        ("long.md#0", "long.md", 0), ("long.md#1", "long.md", 1), ("long.md#2", "long.md", 2),
        ("short.md#0", "short.md", 0)]
    assert [r["text"] for r in records[:3]] == [
        " ".join(f"w{i}" for i in range(10)), " ".join(f"w{i}" for i in range(10, 20)),
        " ".join(f"w{i}" for i in range(20, 23))]
    assert words[records[1]["char_start"]:records[1]["char_end"]] == records[1]["text"]


def test_the_cache_serves_a_second_run(cli, tmp_path):
    notes = tree(tmp_path / "n", {"a.md": "alpha", "b.md": "beta"})
    cache = tmp_path / "cache"
    first = embed(cli, notes, "--glob", "*.md", "--cache", cache)
    second = embed(cli, notes, "--glob", "*.md", "--cache", cache)
    assert "2 embedded, 0 from cache" in first.stderr
    assert "0 embedded, 2 from cache" in second.stderr
    assert [r["embedding"] for r in first.records()] == [r["embedding"] for r in second.records()]


def test_a_markdown_folder_is_searchable(cli, tmp_path):
    notes = tree(tmp_path / "notes", {"cats.md": "cats purr", "dogs/bark.md": "dogs bark",
                                      "fish.md": "fish swim"})
    assert cli("embed", notes, "--glob", "**/*.md", "-m", "fake:16",
               "-o", tmp_path / "notes.arrow").exit_code == 0
    assert cli("index", tmp_path / "notes.arrow", "-o", tmp_path / "idx",
               "--fields", "path").exit_code == 0
    hits = cli("search", tmp_path / "idx", "--query", "dogs bark", "-k", "1",
               "--fields", "path", "--output-format", "jsonl").records()
    assert [(h["id"], h["path"]) for h in hits] == [("dogs/bark.md",
                                                      str(notes / "dogs" / "bark.md"))]


def test_shards_of_a_folder_make_resumable_parts(cli, tmp_path):
    notes = tree(tmp_path / "n", {f"{i}.md": f"note {i}" for i in range(8)})
    parts = tmp_path / "parts"
    for shard in ("0/2", "1/2"):
        result = cli("embed", notes, "--glob", "*.md", "-m", "fake:8", "--shard", shard,
                     "-o", f"{parts}/")
        assert result.exit_code == 0, result.stderr
    again = cli("embed", notes, "--glob", "*.md", "-m", "fake:8", "--shard", "0/2",
                "-o", f"{parts}/")
    assert "already complete" in again.stderr
    merged = cli("merge", parts, "--output-format", "jsonl").records()
    assert sorted(r["id"] for r in merged) == sorted(f"{i}.md" for i in range(8))


def test_folder_errors(cli, tmp_path):
    tree(tmp_path / "n", {"a.md": "x"})
    no_match = cli("embed", tmp_path / "n", "--glob", "*.txt", "-m", "fake:8")
    assert no_match.exit_code == 1 and "no file matches '*.txt'" in no_match.stderr
    missing = cli("embed", tmp_path / "nope", "--glob", "*.md", "-m", "fake:8")
    assert missing.exit_code == 1 and "no such folder" in missing.stderr
    a_file = cli("embed", tmp_path / "n" / "a.md", "--glob", "*.md", "-m", "fake:8")
    assert a_file.exit_code == 1 and "not a folder" in a_file.stderr
    stdin = cli("embed", "--glob", "*.md", "-m", "fake:8")
    assert stdin.exit_code == 2 and "name them instead of stdin" in stdin.stderr
    fmt = cli("embed", tmp_path / "n", "--glob", "*.md", "--input-format", "text")
    assert fmt.exit_code == 2
    no_glob = cli("embed", tmp_path / "n", "-m", "fake:8")
    assert no_glob.exit_code == 2 and "is a folder" in no_glob.stderr
    assert "--glob '**/*.md'" in no_glob.stderr
    with pytest.raises(DataError, match="no file matches"):
        next(FileTree(str(tmp_path / "n"), ["*.txt"]).read(10))
