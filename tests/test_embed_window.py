"""embed's growing windows: a small first window (the first output leaves within seconds), then
windows growing to --window; the output is the same as one big window's, the first batch
reaches a pipe reader before the input ends, and `embed | head -1` stops early, quietly."""
import itertools
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import orjson
import pyarrow as pa
import pytest

from vecpipe.core import embedding


def test_window_sizes_start_small_grow_and_stop_at_the_largest():
    def first(largest, batch_size, n=6):
        return list(itertools.islice(embedding.window_sizes(largest, batch_size), n))

    assert first(4096, 32) == [64, 256, 1024, 4096, 4096, 4096]
    assert first(4096, 128) == [128, 512, 2048, 4096, 4096, 4096]  # at least one model batch
    assert first(500, 32) == [64, 256, 500, 500, 500, 500]
    assert first(10, 32) == [10] * 6                               # --window below a batch
    assert first(100, 300) == [100] * 6


def _parts(rows_per_part, count):
    """Parts of consecutive records t0, t1, ... as the reader cuts them."""
    parts, start = [], 0
    while start < count:
        n = min(rows_per_part, count - start)
        ids = [f"d{i}" for i in range(start, start + n)]
        batch = pa.record_batch({"id": ids, "text": [f"t{i}" for i in range(start, start + n)]})
        parts.append(embedding.Part(batch, ids, [f"t{i}" for i in range(start, start + n)]))
        start += n
    return parts


def _windows(parts, largest=4096, batch_size=32):
    plan = embedding.Plan(window=largest, batch_size=batch_size, dim=8)
    encoder = embedding.Encoder(None, plan, embedding.Stats())
    return list(encoder._windows(iter(parts)))


def test_windows_have_the_grown_sizes_and_keep_every_record_in_order():
    windows = _windows(_parts(1024, 10_000))
    assert [len(w.slots) for w in windows] == [64, 256, 1024, 4096, 4096, 464]
    ids = [i for w in windows for p in w.parts for i in p.ids]
    assert ids == [f"d{i}" for i in range(10_000)]
    assert [w.records for w in windows] == [len(w.slots) for w in windows]
    for window in windows:  # each part's rows are its batch's rows
        for part in window.parts:
            assert part.batch.column("id").to_pylist() == part.ids


def test_parts_smaller_than_a_window_fill_it_exactly():
    windows = _windows(_parts(10, 400), largest=100, batch_size=4)
    assert [len(w.slots) for w in windows] == [64, 100, 100, 100, 36]


def test_a_chunked_record_split_between_windows_counts_once():
    ids = ["a#0", "a#1", "a#2", "b#0", "b#1"]
    chunks = (["a", "a", "a", "b", "b"], [0, 1, 2, 0, 1], [0, 5, 9, 0, 4], [5, 9, 12, 4, 8])
    batch = pa.record_batch({"text": [f"c{i}" for i in range(5)]})
    part = embedding.Part(batch, ids, [f"c{i}" for i in range(5)], chunks, records=2)
    head, rest = part.split(2)
    assert (head.ids, rest.ids) == (ids[:2], ids[2:])
    assert (head.records, rest.records) == (1, 1)  # "a" where its first chunk is; "b" after
    assert rest.chunks[1] == [2, 0, 1] and rest.batch.num_rows == 3
    head, rest = part.split(4)
    assert (head.records, rest.records) == (2, 0)


def _records(count, repeat_every=0):
    texts = [f"document {i} " + "word " * (i % 37) for i in range(count)]
    if repeat_every:  # repeated texts, in one window and across windows
        texts = [texts[i % repeat_every] for i in range(count)]
    return [{"id": f"d{i}", "text": t, "n": i} for i, t in enumerate(texts)]


def _table(arrow_stream: bytes):
    return pa.ipc.open_stream(pa.BufferReader(arrow_stream)).read_all()


@pytest.mark.parametrize("extra", [[], ["--chunk-tokens", "3", "--chunk-overlap", "1"],
                                   ["--batch-size", "7"]])
def test_output_equals_one_big_window(cli, tmp_path, write_jsonl, monkeypatch, extra):
    source = write_jsonl(tmp_path / "in.jsonl", _records(3000, repeat_every=700))
    args = ["embed", source, "-m", "fake:16", "--output-format", "arrow", *extra]
    grown = cli(*args)
    assert grown.exit_code == 0, grown
    monkeypatch.setattr(embedding, "FIRST_WINDOW", 100_000)
    one = cli(*args, "--window", "100000")
    assert one.exit_code == 0, one
    grown_table, one_table = _table(grown.stdout_bytes), _table(one.stdout_bytes)
    assert grown_table.equals(one_table, check_metadata=True)  # batch edges differ, not rows
    assert "3,000 records" in grown.stderr and "3,000 records" in one.stderr
    rows = grown.records()
    assert [r["n"] for r in rows if r.get("chunk", 0) == 0] == list(range(3000))


def test_cache_sees_the_same_texts_in_grown_windows(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", _records(2000, repeat_every=500))
    cache = tmp_path / "cache"
    first = cli("embed", source, "-m", "fake:8", "--cache", cache, "--output-format", "jsonl")
    again = cli("embed", source, "-m", "fake:8", "--cache", cache, "--output-format", "jsonl")
    assert first.exit_code == again.exit_code == 0, (first, again)
    assert first.stdout == again.stdout
    # windows of 64, 256, 1024 and 656 records hold 64 + 256 + 500 + 500 distinct texts
    assert "0 embedded, 1,320 from cache, 680 repeated texts reused" in again.stderr
    embedded, cached = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) embedded, ([\d,]+) from cache", first.stderr).groups())
    # a window's look-up may run before the last window's vectors are stored
    assert embedded + cached == 1320 and embedded >= 500, first.stderr
    assert [r["id"] for r in first.records()] == [f"d{i}" for i in range(2000)]


@pytest.mark.slow
def test_real_model_vectors_equal_one_big_window_and_sentence_transformers(
        cli, tmp_path, write_jsonl, bundled_model, monkeypatch, nfcorpus_path):
    if nfcorpus_path is not None:
        docs = [orjson.loads(line) for line in
                (nfcorpus_path / "corpus.jsonl").read_bytes().splitlines()[:150]]
        records = [{"id": d["_id"], "text": d["text"][:600]} for d in docs]
    else:
        records = _records(150)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    grown = cli("embed", source, "--window", "128", "--output-format", "arrow")  # 64 + 86
    monkeypatch.setattr(embedding, "FIRST_WINDOW", 100_000)
    one = cli("embed", source, "--window", "4096", "--output-format", "arrow")
    assert grown.exit_code == one.exit_code == 0, (grown, one)
    grown_rows, one_rows = grown.records(), one.records()
    assert [r["id"] for r in grown_rows] == [r["id"] for r in one_rows] == \
        [r["id"] for r in records]
    grown_vectors = np.array([r["embedding"] for r in grown_rows])
    np.testing.assert_allclose(grown_vectors, np.array([r["embedding"] for r in one_rows]),
                               atol=1e-5)
    reference = bundled_model.encode([r["text"] for r in records], normalize_embeddings=True)
    np.testing.assert_allclose(grown_vectors, reference, atol=1e-5)


# -- subprocesses: a slow producer, a reader that leaves early ----------------------------------

def _line(i):
    return orjson.dumps({"id": f"d{i}", "text": f"record {i} " + "padding " * 20}) + b"\n"


@pytest.mark.slow
def test_the_first_batch_reaches_a_pipe_reader_before_the_input_ends(tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "vecpipe.cli", "embed", str(fifo), "-m",
                             "fake:8", "--output-format", "jsonl", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finished = threading.Event()

    def produce():  # the reader's first 1,024-record batch at once, then a record at a time
        with open(fifo, "wb") as sink:
            sink.write(b"".join(_line(i) for i in range(1024)))
            sink.flush()
            for i in range(1024, 1324):
                sink.write(_line(i))
                sink.flush()
                time.sleep(0.03)
        finished.set()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    first = proc.stdout.readline()
    seen_before_the_end = not finished.is_set()
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    producer.join()
    assert orjson.loads(first)["id"] == "d0"
    assert seen_before_the_end  # with one 4,096-record window it came after the last record
    assert [orjson.loads(x)["id"] for x in rest.splitlines()] == \
        [f"d{i}" for i in range(1, 1324)]


SLOW_FAKE = textwrap.dedent("""\
    import sys, time
    from vecpipe.core.embedder import Embedder
    embed, log_path = Embedder.embed_features, sys.argv[1]
    def slow(self, features, *args, **kwargs):
        with open(log_path, "a") as log:
            log.write("batch\\n")
        time.sleep(0.1)
        return embed(self, features, *args, **kwargs)
    Embedder.embed_features = slow
    sys.argv = ["vecpipe", *sys.argv[2:]]
    from vecpipe.cli import main
    main()
""")


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["jsonl", "arrow"])
def test_embed_into_head_stops_at_once_and_quietly(tmp_path, output_format):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(_line(i) for i in range(20_000)))  # 625 model batches
    script, log = tmp_path / "slow_fake.py", tmp_path / "batches.log"
    script.write_text(SLOW_FAKE)
    command = (f"{sys.executable} {script} {log} embed {source} -m fake:8 "
               f"--output-format {output_format} | head -c 300 > {tmp_path / 'head.out'}; "
               "echo ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0" and done.stderr == "", done
    assert len((tmp_path / "head.out").read_bytes()) == 300
    batches = len(log.read_text().splitlines())
    # The first window (64 records, 2 batches) is written and flushed; the run stops at the
    # next batch after head leaves (3 here), not at the next write after the second window
    # (10 batches), nor after a first 4,096-record window (128 batches).
    assert 2 <= batches <= 6, batches


# -- eval beir's corpus bar --------------------------------------------------------------------

def _recorded_bars(monkeypatch):
    from vecpipe.cli import console

    made = []

    class Bar:
        def __init__(self, **options):
            self.options, self.n, self.moves = options, 0, []

        def update(self, n=1):
            self.n += n
            self.moves.append(self.n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(console, "progress", lambda **options: made.append(Bar(**options))
                        or made[-1])
    return made


def test_eval_beir_bar_moves_every_few_model_batches_with_a_total(cli, monkeypatch, tmp_path):
    from vecpipe.commands import eval as ev

    TINY = os.path.join(os.path.dirname(__file__), "data", "eval", "tinybeir")
    monkeypatch.setattr(ev, "_CORPUS_BLOCK", 6)  # blocks of 6 and 5 of the 11 documents
    bars = _recorded_bars(monkeypatch)
    args = ("eval", "beir", TINY, "-m", "fake:16", "--batch-size", "1")
    r = cli(*args)
    assert r.exit_code == 0, r
    [bar] = [b for b in bars if b.options.get("unit") == "doc"]
    assert bar.moves == [4, 6, 10, 11]  # 4 model batches of 1 at a time, each block's end
    assert bar.options["count"]() == 11  # the total, from the corpus file
    scores = [{k: v for k, v in row.items() if k not in ("seconds", "embed_seconds")} for row in r.records()]
    assert [{k: v for k, v in row.items() if k not in ("seconds", "embed_seconds")}
            for row in cli(*args, "--cache", tmp_path).records()] == scores
    bars.clear()
    again = cli(*args, "--cache", tmp_path)  # all from the cache: the bar moves per block
    assert again.exit_code == 0 and "(16 texts from the cache)" in again.stderr, again
    [bar] = [b for b in bars if b.options.get("unit") == "doc"]
    assert bar.moves == [6, 11]


# -- token-budget batches (--batch-tokens) ----------------------------------------------------

def test_token_batches_fill_the_budget_with_padded_rows():
    lengths = [100, 50, 50, 10, 10, 10, 10, 3]
    batches = list(embedding.token_batches(lengths, 200))
    assert [list(b) for b in batches] == [[0, 1], [2, 3, 4, 5], [6, 7]]
    assert list(itertools.chain(*batches)) == list(range(len(lengths)))
    for batch in batches:  # padded to its first (longest) row
        assert len(batch) * lengths[batch[0]] <= 200
    assert [list(b) for b in embedding.token_batches([300, 20], 200)] == [[0], [1]]  # too long
    assert list(embedding.token_batches([], 200)) == []


def test_batch_tokens_refuses_what_batches_by_count(cli, tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "in.jsonl", _records(5))
    for extra, needle in ((["--late-chunking", "--chunk-tokens", "8"], "--late-chunking"),
                          (["--multi-vector"], "--multi-vector"),
                          (["--device", "cpu,cpu"], "several --device")):
        r = cli("embed", source, "--batch-tokens", "512", *extra, "-o", tmp_path / "o.arrow")
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
    r = cli("embed", source, "-m", "fake:8", "--batch-tokens", "512", "--dry-run")
    assert r.exit_code == 0 and "512" in r.stderr + r.stdout


@pytest.mark.slow
def test_batch_tokens_gives_the_same_vectors_in_batches_of_the_budget(
        cli, tmp_path, write_jsonl, bundled_model, monkeypatch):
    """Texts of very different lengths: each model call holds at most the budget's padded
    tokens (many short texts, few long ones), and the vectors are sentence-transformers'."""
    from vecpipe.core.bert_encoder import BertEncoder
    from vecpipe.core.embedder import Embedder

    records = [{"id": f"d{i}", "text": f"item {i} " + "word " * (150 + i if i % 6 == 0 else i % 5)}
               for i in range(120)]  # one long text in six
    source = write_jsonl(tmp_path / "in.jsonl", records)
    shapes = []

    def recording(embed_features):
        def recorded(self, features, *args, **kwargs):
            shapes.append(tuple(features["input_ids"].shape))
            return embed_features(self, features, *args, **kwargs)
        return recorded

    for runtime in (Embedder, BertEncoder):  # sentence-transformers', TorchBert's
        monkeypatch.setattr(runtime, "embed_features", recording(runtime.embed_features))
    r = cli("embed", source, "--batch-tokens", "1024", "--output-format", "arrow")
    assert r.exit_code == 0, r.stderr
    assert sum(rows for rows, _ in shapes) == 120
    assert all(rows * tokens <= 1024 or rows == 1 for rows, tokens in shapes)
    assert max(rows for rows, _ in shapes) > 32 > min(rows for rows, _ in shapes)
    vectors = np.array([row["embedding"] for row in r.records()])
    reference = bundled_model.encode([row["text"] for row in records], normalize_embeddings=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
