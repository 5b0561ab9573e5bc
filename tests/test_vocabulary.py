"""One option vocabulary: every option of every command comes from cli/options.py or is listed
below as that command's own; one option name has one help everywhere; every old spelling is a
hidden alias that still works and says it is deprecated."""
import inspect
from collections import defaultdict

import pytest

from vecpipe.cli import options
from vecpipe.cli.docgen import command_tree

LEAVES = {" ".join(path[1:]): cmd for path, cmd in command_tree()
          if not hasattr(cmd, "list_commands")}

# Options that belong to one command alone (the concept exists nowhere else).
COMMAND_SPECIFIC = {
    "embed": {"--no-normalize",
              "--engine", "--address", "--parts", "--skip-invalid", "--drop-text", "--window",
              "--glob", "--multi-vector", "--batch-tokens"},
    "index": {"--connectivity", "--expansion-add", "--expansion-search", "--flat", "--library",
              "--keep-vectors", "--append", "--delete", "--lexical", "--stemmer", "--stopwords",
              "--k1", "--b", "--bm25-method"},
    "search": {"--rescore", "--query-batch", "--query", "--like", "--unlike", "--rerank",
               "--max-hits", "--mmr", "--mmr-depth", "--group-by", "--group-size", "--group-score",
               "--rerank-depth", "--rerank-field", "--rerank-max-length", "--keep-first-score",
               "--hybrid", "--hybrid-depth", "--calibrator", "--min-prob"},
    "compress": {"--pca", "--pca-center", "--calibration-rows", "--clip-quantile",
                 "--save-codec", "--report", "--report-queries", "--save-report", "--bits",
                 "--pq-m", "--pq-bits", "--opq", "--budget", "--fde", "--fde-reps",
                 "--fde-simhash", "--fde-proj-dim", "--fde-dim", "--fde-seed", "--fde-side"},
    "eval retrieval": {"--qrels-depth", "--all-queries", "--permutations"},
    "eval calibrate": {"--fit-depth", "--space"},
    "eval beir": {"--save-run", "--grid"},
    "eval sts": set(),
    "eval pair-classification": set(),
    "eval reranking": {"--triple"},
    "eval bitext-mining": set(),
    "eval summarization": {"--summaries"},
    "eval classification": {"--train", "--split-field", "--samples-per-label"},
    "eval clustering": {"--bootstrap-size", "--max-documents", "--kmeans-batch", "--max-depth",
                        "--legacy"},
    "eval suite": set(),
    "eval embeddings": {"--duplicate-threshold", "--alpha", "--fail-on-drift", "--depth"},
    "mine-negatives": {"--corpus", "--beir", "--num-negatives", "--range-min", "--range-max",
                       "--max-score", "--sampling", "--cross-encoder", "--shape",
                       "--with-scores", "--on-short",
                       "--save-stats", "--min-relevance", "--prompt-field", "--margin-per",
                       "--max-positive-similarity", "--guide-query-prompt",
                       "--guide-doc-prompt", "--all-scores"},
    "train": {"--loss", "--matryoshka-dims", "--adaptive-layers", "--mini-batch-size",
              "--epochs", "--max-steps", "--learning-rate", "--warmup-ratio", "--eval-beir",
              "--eval-steps", "--eval-metric", "--save-steps", "--resume"},
    "merge": {"--sort-by", "--expect-shards", "--index", "--link", "--models", "--weights",
              "--method", "--fuse-depth", "--fit-qrels", "--fit-metric", "--fit-step",
              "--save-fit",
              "--base", "--density", "--search-weights", "--probe", "--probe-metric", "--weight-grid",
              "--sgd-steps", "--dedupe-near", "--against"},
    "info": {"--verify"},
    "convert": {"--limit", "--rename"},
    "models": set(), "completion": set(), "man": set(),
}


def _options(cmd, hidden=False):
    return [p for p in cmd.params if p.param_type_name == "option" and p.hidden == hidden]


def _long_name(param) -> str:
    return max(param.opts, key=len)


def _shared_names() -> set:
    return {name for names, _ in options.SHARED for name in names}


def test_the_allowlist_names_every_command():
    assert set(COMMAND_SPECIFIC) == set(LEAVES)


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_option_is_shared_or_command_specific(path):
    own = set()
    for param in _options(LEAVES[path]):
        if (tuple(param.opts), param.help) in options.SHARED:
            continue
        name = _long_name(param)
        assert name in COMMAND_SPECIFIC[path], (
            f"{path} declares {name} itself: take it from cli/options.py, or list it in "
            "COMMAND_SPECIFIC if no other command has the concept")
        own.add(name)
    assert own == COMMAND_SPECIFIC[path], f"stale allowlist entries: {COMMAND_SPECIFIC[path] - own}"
    assert not own & _shared_names(), f"{path} redeclares a shared option: {own & _shared_names()}"


def test_command_specific_options_belong_to_one_command():
    owners = defaultdict(list)
    for path, names in COMMAND_SPECIFIC.items():
        for name in names:
            owners[name].append(path)
    shared = {name: paths for name, paths in owners.items() if len(paths) > 1}
    assert not shared, f"declared by several commands, so it belongs in cli/options.py: {shared}"


def test_one_help_per_option_name():
    helps = defaultdict(set)
    for cmd in LEAVES.values():
        for param in _options(cmd):
            for name in param.opts + param.secondary_opts:
                helps[name].add(param.help)
    assert {name: h for name, h in helps.items() if len(h) > 1} == {}


ALIAS_SAMPLES = {"--dtype": "float16", "--to": "i8", "--fields": "a,b,s", "--dedupe": "none",
                 "-k": "1,10", "--select": "id,text", "--store": ["a,b", "c"],
                 "--layout": "n-tuple"}
ALIAS_RESULTS = {
    ("embed", "--dtype"): {"precision": "float16"},
    ("compress", "--to"): {"to": "int8"},
    ("eval sts", "--fields"): {"pair": "a,b", "score": "s"},
    ("merge", "--dedupe"): {"on_duplicate": "keep"},
    ("convert", "--select"): {"fields": ["id", "text"]},
    ("index", "--store"): {"fields": ["a", "b", "c"]},
    ("eval beir", "--exact"): {},
}
HIDDEN = [(path, param) for path, cmd in sorted(LEAVES.items()) for param in _options(cmd, True)]


def _sample(param):
    if param.is_flag:
        return True
    value = ALIAS_SAMPLES.get(param.opts[0], "x")
    return ([value] if isinstance(value, str) else value) if param.multiple else value


@pytest.mark.parametrize("path,param", HIDDEN, ids=[f"{p} {q.opts[0]}" for p, q in HIDDEN])
def test_every_hidden_alias_resolves_and_warns(path, param, capsys):
    command = inspect.unwrap(LEAVES[path].callback)
    mark = options.aliases_of(command)[param.name]
    signature = inspect.signature(command)
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
    record.__wrapped__ = command
    kwargs = {name: p.default for name, p in signature.parameters.items()}
    kwargs[param.name] = _sample(param)
    options.with_aliases(record)(**kwargs)
    expected = ALIAS_RESULTS.get((path, mark.old))
    if expected is None:
        expected = {mark.target: kwargs[param.name]}
    if param.opts[0] == "--json":
        expected = {"output_format": "jsonl"}
    for target, value in expected.items():
        assert target in signature.parameters and seen[target] == value
    assert seen[param.name] == signature.parameters[param.name].default
    assert capsys.readouterr().err == (
        f"vecpipe: warning: {mark.old} is deprecated; use {mark.new}\n")


def test_every_renamed_option_is_covered():
    olds = {(path, param.opts[0]) for path, param in HIDDEN}
    assert ("eval beir", "--exact") in olds and ("search", "--field") in olds
    assert len(olds) >= 20


def test_both_spellings_at_once_are_a_usage_error(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "a"}])
    r = cli("convert", src, "--fields", "id", "--select", "text")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        "vecpipe convert: error: give --fields or --select, not both "
        "(see 'vecpipe convert --help')"]


def test_quiet_silences_deprecation_warnings(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "a"}])
    assert cli("convert", src, "--select", "id", "-q", "--output-format", "jsonl").stderr == ""


@pytest.fixture
def vectors(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "v.jsonl", [
        {"id": str(i), "lang": "en" if i % 2 else "fr", "text": f"t{i}",
         "embedding": [float((i * 7 + j) % 5) - 2.0 + 0.1 * j for j in range(8)]}
        for i in range(12)])


def _warned(r, command, old, new):
    return f"vecpipe {command}: warning: {old} is deprecated; use {new}" in r.stderr.splitlines()


def test_convert_select_still_works(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "a", "x": 2}])
    old = cli("convert", src, "--select", "id,x", "--output-format", "jsonl")
    new = cli("convert", src, "--fields", "id", "--fields", "x", "--output-format", "jsonl")
    assert old.exit_code == new.exit_code == 0 and old.records() == new.records() == [
        {"id": "1", "x": 2}]
    assert _warned(old, "convert", "--select", "--fields") and "warning" not in new.stderr


def test_index_store_and_old_duplicate_values_still_work(cli, tmp_path, vectors):
    idx = tmp_path / "idx"
    r = cli("index", vectors, "-o", idx, "--store", "lang", "--dtype", "i8")
    assert r.exit_code == 0, r
    assert _warned(r, "index", "--store", "--fields")
    r = cli("index", vectors, "-o", idx, "--append", "--on-duplicate", "skip")
    assert r.exit_code == 0, r
    assert _warned(r, "index", "--on-duplicate skip", "--on-duplicate first")
    r = cli("index", vectors, "-o", idx, "--append", "--on-duplicate", "first")
    assert r.exit_code == 0 and "warning" not in r.stderr
    r = cli("index", vectors, "-o", tmp_path / "b", "--store-all", "--dtype", "int8")
    assert r.exit_code == 0 and _warned(r, "index", "--store-all", "--all-fields")
    hits = cli("search", tmp_path / "b", vectors, "-k", "1", "--fields", "lang",
               "--output-format", "jsonl").records()
    assert len(hits) == 12 and set(hits[0]) == {"query_id", "rank", "id", "score", "lang"}


def test_storage_dtype_takes_both_vocabularies(cli, tmp_path, vectors):
    for name in ("f16", "float16"):
        r = cli("index", vectors, "-o", tmp_path / name, "--dtype", name)
        assert r.exit_code == 0 and "(12 added; f16," in r.stderr, r
    r = cli("index", vectors, "-o", tmp_path / "u8", "--dtype", "uint8")
    assert r.exit_code == 2 and "an index stores" in r.stderr
    r = cli("compress", vectors, "--dtype", "b1", "--output-format", "jsonl")
    assert r.exit_code == 0, r
    old = cli("compress", vectors, "--to", "binary", "--output-format", "jsonl")
    assert old.stdout == r.stdout and _warned(old, "compress", "--to", "--dtype")
    r = cli("compress", vectors, "--dtype", "int4")
    assert r.exit_code == 2 and "Invalid value for '--dtype'" in r.stderr


def test_compress_report_json_still_works(cli, tmp_path, vectors):
    for flag in ("--save-report", "--report-json"):
        report = tmp_path / f"{flag}.json"
        r = cli("compress", vectors, "--dtype", "int8", flag, report, "-o", tmp_path / "c.arrow")
        assert r.exit_code == 0 and report.is_file(), r
    assert _warned(r, "compress", "--report-json", "--save-report")


def test_merge_dedupe_still_works(cli, tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "v": "a"}, {"id": "2", "v": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "1", "v": "b"}])
    new = cli("merge", a, b, "--on-duplicate", "last", "--output-format", "jsonl")
    old = cli("merge", a, b, "--dedupe", "last", "--output-format", "jsonl")
    assert new.records() == old.records() and {r["v"] for r in new.records()} == {"a", "b"}
    assert len(new.records()) == 2 and _warned(old, "merge", "--dedupe", "--on-duplicate")
    keep = cli("merge", a, b, "--output-format", "jsonl")
    assert len(keep.records()) == 3
    none = cli("merge", a, b, "--dedupe", "none", "--output-format", "jsonl")
    assert none.records() == keep.records()


def test_search_field_still_works(cli, tmp_path, vectors, write_jsonl):
    idx = tmp_path / "idx"
    assert cli("index", vectors, "-o", idx, "-m", "fake:8").exit_code == 0
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "question": "hello"}])
    new = cli("search", idx, queries, "--text-field", "question", "--output-format", "jsonl")
    old = cli("search", idx, queries, "--field", "question", "--output-format", "jsonl")
    assert new.exit_code == 0 and new.records() == old.records() and len(new.records()) == 10
    assert _warned(old, "search", "--field", "--text-field")


def test_eval_old_spellings_still_work(cli, tmp_path, write_jsonl, vectors):
    run = write_jsonl(tmp_path / "run.jsonl", [{"query_id": "q", "id": "1", "score": 0.9},
                                               {"query_id": "q", "id": "2", "score": 0.5}])
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq\t2\t1\n")
    new = cli("eval", "retrieval", run, "--qrels", qrels, "--cutoffs", "1,2", "--metrics",
              "ndcg", "--output-format", "jsonl")
    old = cli("eval", "retrieval", run, "--qrels", qrels, "-k", "1,2", "--metrics", "ndcg",
              "--json")
    assert new.exit_code == 0 and new.records() == old.records()
    assert _warned(old, "eval retrieval", "-k", "--cutoffs")
    assert _warned(old, "eval retrieval", "--json", "--output-format jsonl")
    one = cli("eval", "retrieval", run, "--qrels", qrels, "--output-format", "json")
    assert one.stdout.startswith("[{") and len(one.stdout.splitlines()) == 1
    new = cli("eval", "embeddings", vectors, "--vector-field", "embedding", "--sample", "10")
    old = cli("eval", "embeddings", vectors, "--field", "embedding", "--sample", "10")
    assert new.exit_code == 0 and new.stdout == old.stdout
    assert _warned(old, "eval embeddings", "--field", "--vector-field")


def test_eval_sts_fields_still_works(cli, tmp_path, write_jsonl):
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"a": [1.0, float(i)], "b": [1.0, float(i * i % 5)], "gold": float(i)} for i in range(6)])
    new = cli("eval", "sts", pairs, "--pair", "a,b", "--score", "gold")
    old = cli("eval", "sts", pairs, "--fields", "a,b,gold")
    assert new.exit_code == 0 and new.stdout == old.stdout
    assert _warned(old, "eval sts", "--fields", "--pair A,B --score S")


def test_info_json_still_works(cli, vectors):
    new, old = cli("info", vectors, "--output-format", "jsonl"), cli("info", vectors, "--json")
    assert new.exit_code == 0 and new.stdout == old.stdout
    assert _warned(old, "info", "--json", "--output-format jsonl")
    assert cli("info", vectors, "--output-format", "xml").exit_code == 2


def test_streams_without_vectors_are_jsonl_on_a_pipe(cli, tmp_path, vectors):
    idx = tmp_path / "idx"
    assert cli("index", vectors, "-o", idx).exit_code == 0
    hits = cli("search", idx, vectors, "-k", "2")
    assert hits.exit_code == 0 and hits.stdout.startswith('{"query_id"')
    assert cli("convert", vectors).stdout_bytes.startswith(b"\xff\xff\xff\xff")


def test_output_format_environment_variable(cli, tmp_path, vectors):
    r = cli("convert", vectors, env={"VECPIPE_OUTPUT_FORMAT": "jsonl"})
    assert r.exit_code == 0 and r.stdout.startswith('{"id"')
    assert cli("convert", vectors, "-o", tmp_path / "x.arrow",
               env={"VECPIPE_OUTPUT_FORMAT": "jsonl"}).exit_code == 0
    assert (tmp_path / "x.arrow").read_bytes().startswith(b"ARROW1")
    r = cli("info", vectors, env={"VECPIPE_OUTPUT_FORMAT": "json"})
    assert r.exit_code == 0 and r.stdout.startswith("[{")
    r = cli("convert", vectors, env={"VECPIPE_OUTPUT_FORMAT": "yaml"})
    assert r.exit_code == 2 and "VECPIPE_OUTPUT_FORMAT" in r.stderr


def test_embed_field_and_dtype_still_work(cli, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "1", "title": "a", "text": "b c"}])
    new = cli("embed", src, "-m", "fake:8", "--text-field", "title", "--text-field", "text",
              "--precision", "float32", "--output-format", "jsonl")
    old = cli("embed", src, "-m", "fake:8", "--field", "title", "--field", "text",
              "--dtype", "float32", "--output-format", "jsonl")
    assert new.exit_code == 0 and new.records() == old.records()
    assert _warned(old, "embed", "--field", "--text-field")
    assert _warned(old, "embed", "--dtype", "--precision")


def test_mine_negatives_old_spellings_still_work(cli, tmp_path, write_jsonl):
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"query": f"q{i}", "positive": f"doc {i}"} for i in range(4)])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "body": f"doc {i} words"}
                                                for i in range(20)])
    common = [pairs, "--corpus", corpus, "-m", "fake:8", "-n", "2", "--output-format", "jsonl"]
    new = cli("mine-negatives", *common, "--text-field", "body", "--shape", "n-tuple",
              "--doc-prompt", "d: ", "--save-stats", tmp_path / "new.json")
    old = cli("mine-negatives", *common, "--field", "body", "--layout", "n-tuple",
              "--corpus-prompt", "d: ", "--stats", tmp_path / "old.json")
    assert new.exit_code == 0, new
    assert new.records() == old.records() and "negative_2" in new.records()[0]
    assert (tmp_path / "new.json").read_text() == (tmp_path / "old.json").read_text()
    for spelled, spelling in (("--field", "--text-field"), ("--layout", "--shape"),
                              ("--corpus-prompt", "--doc-prompt"), ("--stats", "--save-stats")):
        assert _warned(old, "mine-negatives", spelled, spelling)
    hits = cli("mine-negatives", *common[:-2], "--text-field", "body")
    assert hits.stdout.startswith('{"')  # rows without vectors: JSONL on a pipe


def test_the_default_format_on_stdout(monkeypatch):
    from vecpipe.formats.writers import resolve_output_format, resolve_report_format

    monkeypatch.delenv("VECPIPE_OUTPUT_FORMAT", raising=False)
    assert resolve_output_format(None, stdout_isatty=False) == "arrow"
    assert resolve_output_format(None, stdout_isatty=False, vectors=False) == "jsonl"
    assert resolve_output_format(None, stdout_isatty=True, vectors=True) == "jsonl"
    assert resolve_report_format(stdout_isatty=True) == "table"
    assert resolve_report_format(stdout_isatty=False) == "jsonl"
    monkeypatch.setenv("VECPIPE_OUTPUT_FORMAT", "parquet")
    assert resolve_output_format(None, stdout_isatty=False, vectors=False) == "parquet"
    assert resolve_output_format("x.jsonl") == "jsonl"  # -o's extension is not a default
    assert resolve_report_format(stdout_isatty=True) == "table"  # not a report format: ignored
    monkeypatch.setenv("VECPIPE_OUTPUT_FORMAT", "table")
    assert resolve_report_format(stdout_isatty=False) == "table"
    assert resolve_output_format(None, stdout_isatty=False) == "arrow"


@pytest.mark.slow
def test_a_bad_old_value_is_one_usage_line(run_vecpipe, tmp_path, write_jsonl):
    """An alias's value is converted before the command's boundary: still one line, exit 2."""
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"a": [1.0, 0.0], "b": [0.0, 1.0], "s": 1}])
    for args in (["eval", "sts", pairs, "--fields", "a,b"],
                 ["embed", pairs, "-m", "fake:4", "--dtype", "bogus"],
                 ["embed", pairs, "-m", "fake:4", "--precision", "bogus"]):
        r = run_vecpipe(*args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert b"Traceback" not in r.stderr


def test_mistyped_options_are_not_offered_the_deprecated_spellings(run_vecpipe):
    r = run_vecpipe("index", "--stor", "x")
    assert r.returncode == 2 and b"--store" not in r.stderr and b"No such option" in r.stderr


def test_keep_means_the_same_for_every_index(cli, tmp_path, vectors):
    """An index holds one row per id: keep is refused by index and merge --index alike, and
    merge --index's default fails on a repeated id."""
    cli("index", vectors, "-o", tmp_path / "a")
    cli("index", vectors, "-o", tmp_path / "b")
    kept = cli("merge", "--index", tmp_path / "a", tmp_path / "b", "--on-duplicate", "keep",
               "-o", tmp_path / "m")
    appended = cli("index", vectors, "-o", tmp_path / "a", "--append", "--on-duplicate", "keep")
    assert kept.exit_code == appended.exit_code == 2
    assert all("an index holds one row per id" in r.stderr for r in (kept, appended))
    default = cli("merge", "--index", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "m")
    assert default.exit_code == 1 and "duplicate id" in default.stderr


def test_resume_notes_name_the_new_options(cli, tmp_path, vectors):
    first = cli("index", vectors, "--shard", "0/2", "-o", f"{tmp_path}/parts/", "--fields", "text")
    again = cli("index", vectors, "--shard", "0/2", "-o", f"{tmp_path}/parts/", "--fields", "lang")
    assert first.exit_code == again.exit_code == 0, again.stderr
    assert "--fields changed" in again.stderr and "--store" not in again.stderr
