"""`search INDEX --hybrid IDX`: a dense and a lexical index searched with the same text queries
and fused, against RRF written here from its definition over the two indexes' own runs, and
against `merge --fuse` of those runs; the refusals."""
import json

import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow  # embeds with the bundled model

TEXTS = ["the cat sat on the mat", "dogs chase cats in the park", "a recipe for lemon cake",
         "the stock market fell today", "how to train a puppy", "cats are independent pets",
         "baking bread at home", "interest rates and inflation", "a cake with cream and jam",
         "central banks raise rates", "the puppy chewed my shoe", "sourdough needs patience",
         "markets rally on earnings", "my cat ignores me", "walking the dog at dawn"]
QUERIES = ["cat on a mat", "bake a cake", "market inflation", "puppy training", "bread"]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    from typer.testing import CliRunner

    from vecpipe.cli.app import app

    folder = tmp_path_factory.mktemp("hybrid")
    corpus, queries = folder / "c.jsonl", folder / "q.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)))
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                               for i, t in enumerate(QUERIES)))
    half = folder / "half.jsonl"
    half.write_text("".join(corpus.read_text().splitlines(keepends=True)[:7]))
    steps = [["embed", corpus, "-o", folder / "c.arrow"],
             ["index", folder / "c.arrow", "-o", folder / "dense", "--fields", "text"],
             ["index", "--lexical", corpus, "-o", folder / "lex", "--fields", "text"],
             ["index", "--lexical", half, "-o", folder / "lex-half"]]
    runner = CliRunner()
    for step in steps:
        result = runner.invoke(app, [str(part) for part in step])
        assert result.exit_code == 0, result.output
    return folder


def own_run(cli, index, queries, depth):
    result = cli("search", index, queries, "-k", depth, "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    run = {}
    for row in result.records():
        run.setdefault(row["query_id"], []).append((row["id"], row["score"]))
    return run


def test_hybrid_is_rrf_of_the_two_indexes_runs(cli, indexes):
    queries = indexes / "q.jsonl"
    result = cli("search", indexes / "dense", queries, "--hybrid", indexes / "lex", "-k", 5,
                 "--hybrid-depth", 10, "--fields", "text", "--output-format", "jsonl")
    assert result.exit_code == 0, result.stderr
    dense = own_run(cli, indexes / "dense", queries, 10)
    lexical = own_run(cli, indexes / "lex", queries, 10)
    for qid in dense:
        expected = {}
        for run in (dense, lexical):
            ranking = sorted(run.get(qid, []), key=lambda hit: (hit[1], hit[0]), reverse=True)
            for rank, (doc, _) in enumerate(ranking, 1):
                expected[doc] = expected.get(doc, 0.0) + 1 / (60 + rank)
        best = sorted(expected.items(), key=lambda item: (item[1], item[0]), reverse=True)[:5]
        hits = [row for row in result.records() if row["query_id"] == qid]
        assert [row["id"] for row in hits] == [doc for doc, _ in best]
        assert [row["score"] for row in hits] == pytest.approx([s for _, s in best], rel=1e-6)
        assert all(row["text"] == TEXTS[int(row["id"][1:])] for row in hits)


def test_hybrid_equals_merge_fuse_of_the_saved_runs(cli, indexes):
    queries, folder = indexes / "q.jsonl", indexes
    for name in ("dense", "lex"):
        result = cli("search", folder / name, queries, "-k", 8, "-o", folder / f"{name}.trec")
        assert result.exit_code == 0, result.stderr
    fused = cli("merge", "--fuse", "wsum", "--fuse-weights", "0.3,0.7", "--fuse-norm",
                "z-score", folder / "dense.trec", folder / "lex.trec", "--fuse-depth", 4)
    out = folder / "hybrid.arrow"
    hybrid = cli("search", folder / "dense", queries, "--hybrid", folder / "lex", "-k", 4,
                 "--hybrid-depth", 8, "--fuse", "wsum", "--fuse-weights", "0.3,0.7",
                 "--fuse-norm", "z-score", "-o", out)
    assert hybrid.exit_code == 0, hybrid.stderr
    table = pa.ipc.open_file(str(out)).read_all()
    got = [(r["query_id"], r["id"]) for r in table.to_pylist()]
    assert got == [(r["query_id"], r["id"]) for r in fused.records()]
    assert table.column("score").to_pylist() == pytest.approx(
        [r["score"] for r in fused.records()], rel=1e-5, abs=1e-6)
    meta = json.loads(table.schema.metadata[b"vecpipe.fusion"])
    assert meta["method"] == "wsum" and meta["weights"] == [0.3, 0.7]
    assert meta["norm"] == "z-score" and meta["list_depth"] == 8


@pytest.mark.parametrize("args,message", [
    (["--fuse", "rrf"], "--fuse needs --hybrid IDX"),
    (["--hybrid-depth", "5"], "--hybrid-depth needs --hybrid IDX"),
    (["--hybrid", "{lex}", "--min-score", "0.1"], "--min-score does not apply to --hybrid"),
    (["--hybrid", "{lex}", "--fuse", "rrf", "--fuse-norm", "rank"], "rrf fuses ranks"),
    (["--hybrid", "{lex}", "--fuse", "wsum", "--fuse-weights", "1"], "1 weights for 2 runs")])
def test_hybrid_refusals(cli, indexes, args, message):
    args = [arg.format(lex=indexes / "lex") for arg in args]
    result = cli("search", indexes / "dense", "--query", "cat", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_hybrid_needs_the_same_ids_and_text_queries(cli, indexes):
    missing = cli("search", indexes / "lex-half", indexes / "q.jsonl", "--hybrid",
                  indexes / "dense", "-k", 10)
    assert missing.exit_code == 1 and "--hybrid indexes must hold the same records" \
        in missing.stderr
    vectors = indexes / "qv.jsonl"
    vectors.write_text(json.dumps({"id": "v", "embedding": [0.1] * 384}) + "\n")
    result = cli("search", indexes / "dense", vectors, "--hybrid", indexes / "lex")
    assert result.exit_code == 2 and "needs text queries" in result.stderr
    stream = cli("search", indexes / "c.arrow", "--query", "cat", "--hybrid", indexes / "lex")
    assert stream.exit_code == 2 and "--hybrid needs an index folder" in stream.stderr
