"""Long documents: situated chunks and late chunking in `embed`, chunked corpora in `eval beir`
(documents scored by their chunks). Checked against computations made here by hand: contexts
counted on the fake model's whitespace tokens, late chunks pooled with transformers directly,
documents' scores as numpy maxima over their chunks."""
import re
from pathlib import Path

import numpy as np
import pytest

from vecpipe.core.chunking import aggregate, context_window, token_windows
from vecpipe.core.embedder import fake_vectors
from vecpipe.core.space import check_same_documents, SpaceMismatch

TINYBEIR = str(Path(__file__).parent / "data" / "eval" / "tinybeir")
WORDS = " ".join(f"t{i}" for i in range(20))  # 20 fake tokens


def _vectors(records):
    return np.array([r["embedding"] for r in records], dtype=np.float32)


def _info(cli, path) -> dict:
    import json

    shown = json.loads(cli("info", path, "--output-format", "json").stdout)
    return shown[0] if isinstance(shown, list) else shown


def test_token_windows_and_contexts_by_hand():
    assert token_windows(12, 5, 1) == [(0, 5), (4, 9), (8, 12)]
    assert token_windows(0, 5, 0) == [(0, 0)]
    assert context_window(5, 10, 20, 9) == (3, 12)     # 2 before, 2 after
    assert context_window(0, 5, 20, 9) == (0, 9)       # at the start: all after
    assert context_window(15, 20, 20, 9) == (11, 20)   # at the end: all before
    assert context_window(0, 3, 4, 9) == (0, 4)        # the whole short document


def test_situated_chunks_embed_the_template_and_write_the_chunk(cli, write_jsonl, tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": WORDS}])
    r = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "5", "--context-tokens", "9",
            "--context-template", "ctx: {context}\\nchunk: {chunk}")
    assert r.exit_code == 0, r
    rows = r.records()
    tokens = WORDS.split()
    contexts = [tokens[0:9], tokens[3:12], tokens[8:17], tokens[11:20]]
    for row, number, context in zip(rows, range(4), contexts):
        chunk = " ".join(tokens[5 * number:5 * number + 5])
        assert row["text"] == chunk
        assert WORDS[row["char_start"]:row["char_end"]] == chunk
        shown = f"ctx: {' '.join(context)}\nchunk: {chunk}"
        np.testing.assert_allclose(row["embedding"], fake_vectors([shown], 8)[0], rtol=1e-6)


def test_late_chunks_depend_on_their_document_and_plain_chunks_do_not(cli, write_jsonl,
                                                                      tmp_path):
    first = "alpha beta gamma delta one two three four"
    second = "alpha beta gamma delta five six seven eight"
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": first},
                                              {"id": "b", "text": second}])
    late = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "4", "--late-chunking")
    plain = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "4")
    assert late.exit_code == 0 and plain.exit_code == 0, (late, plain)
    late_rows, plain_rows = late.records(), plain.records()
    assert [r["text"] for r in late_rows] == [r["text"] for r in plain_rows]
    assert late_rows[0]["text"] == late_rows[2]["text"] == "alpha beta gamma delta"
    np.testing.assert_allclose(plain_rows[0]["embedding"], plain_rows[2]["embedding"])
    assert not np.allclose(late_rows[0]["embedding"], late_rows[2]["embedding"])
    assert np.allclose(np.linalg.norm(_vectors(late_rows), axis=1), 1, atol=1e-6)


def test_the_chunking_method_is_recorded_and_sets_of_two_methods_do_not_mix(cli, write_jsonl,
                                                                            tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": WORDS}])
    made = {}
    for name, extra in (("plain", []), ("late", ["--late-chunking"]),
                        ("situated", ["--context-tokens", "9"])):
        out = tmp_path / f"{name}.arrow"
        r = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "5", *extra, "-o", out)
        assert r.exit_code == 0, r
        made[name] = out
    info = _info(cli, made["late"])
    assert info["metadata"]["embedded_text"]["chunking"] == {"tokens": 5, "overlap": 0,
                                                             "late": True}
    situated = _info(cli, made["situated"])
    assert situated["metadata"]["embedded_text"]["chunking"]["context_tokens"] == 9
    r = cli("index", made["plain"], made["late"], "-o", tmp_path / "idx")
    assert r.exit_code == 1 and "embedded_text differs" in r.stderr, r
    assert "late-chunked" in r.stderr
    assert not (tmp_path / "idx").exists()


def test_a_plain_chunked_file_still_compares_equal_to_one_made_before(cli, write_jsonl,
                                                                      tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": WORDS}])
    r = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "5", "--chunk-overlap", "1",
            "-o", tmp_path / "p.arrow")
    assert r.exit_code == 0, r
    meta = _info(cli, tmp_path / "p.arrow")["metadata"]
    before = ('{"fields": ["text"], "separator": " ", "chunking": {"tokens": 5, '
              '"overlap": 1}}')
    import json

    check_same_documents({"embedded_text": json.dumps(meta["embedded_text"])},
                         {"embedded_text": before}, "new", "old")
    with pytest.raises(SpaceMismatch):
        late = before.replace('"overlap": 1', '"overlap": 1, "late": true')
        check_same_documents({"embedded_text": json.dumps(meta["embedded_text"])},
                             {"embedded_text": late}, "new", "old")


@pytest.mark.parametrize("args,message", [
    (["--context-tokens", "9"], "--context-tokens needs --chunk-tokens"),
    (["--late-chunking"], "--late-chunking needs --chunk-tokens"),
    (["--chunk-tokens", "5", "--context-template", "{context}"],
     "--context-template needs --context-tokens"),
    (["--chunk-tokens", "5", "--context-tokens", "5"], "--context-tokens 5 must exceed"),
    (["--chunk-tokens", "5", "--context-tokens", "9", "--late-chunking"],
     "--context-tokens: late chunking"),
    (["--chunk-tokens", "5", "--context-tokens", "9", "--context-template", "{chunk}"],
     "has no {context}"),
    (["--chunk-tokens", "5", "--context-tokens", "9", "--context-template", "{context} {doc}"],
     "unknown placeholder {doc}"),
])
def test_chunking_options_that_cannot_work_are_usage_errors(cli, write_jsonl, tmp_path, args,
                                                            message):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": WORDS}])
    r = cli("embed", docs, "-m", "fake:8", *args, "-o", tmp_path / "out.arrow")
    assert r.exit_code == 2 and message in r.stderr, r
    assert not (tmp_path / "out.arrow").exists()


@pytest.mark.parametrize("how", ["max", "sum", "mean"])
def test_aggregate_equals_a_loop_over_documents(how):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 7)).astype(np.float32)
    parents = np.array([0, 0, 1, 2, 2, 2, 3])
    want = np.array([[getattr(np, how)(row[parents == d]) for d in range(4)] for row in scores])
    np.testing.assert_allclose(aggregate(scores, parents, how), want, rtol=1e-6)


def _fake_chunks(text: str, size: int) -> list[str]:
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    return [text[spans[i][0]:spans[min(i + size, len(spans)) - 1][1]]
            for i in range(0, len(spans), size)]


def test_eval_beir_scores_each_document_by_its_best_chunk(cli, tmp_path):
    import json

    run_file = tmp_path / "run.trec"
    r = cli("eval", "beir", TINYBEIR, "-m", "fake:16", "--chunk-tokens", "2", "--save-run",
            run_file, "--output-format", "json")
    assert r.exit_code == 0, r
    [record] = json.loads(r.stdout)
    assert record["chunking"] == {"tokens": 2, "overlap": 0} and record["aggregate"] == "max"
    docs = [json.loads(line) for line in open(f"{TINYBEIR}/corpus.jsonl")]
    texts = [((d.get("title") or "") + " " + (d.get("text") or "")).strip() for d in docs]
    assert record["chunks"] == sum(len(_fake_chunks(t, 2)) for t in texts)
    queries = {q["_id"]: q["text"] for q in map(json.loads, open(f"{TINYBEIR}/queries.jsonl"))}
    run: dict = {}
    for line in run_file.read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    assert run
    for qid, hits in run.items():
        query = fake_vectors([queries[qid]], 16)[0]
        for doc, text in zip(docs, texts):
            if doc["_id"] in hits:
                best = max(fake_vectors(_fake_chunks(text, 2), 16) @ query)
                assert hits[doc["_id"]] == pytest.approx(float(best), abs=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--aggregate", "max"], "--aggregate needs --chunk-tokens"),
    (["--chunk-tokens", "4", "--aggregate", "median"], "bad --aggregate"),
    (["--chunk-tokens", "4", "--index-dtype", "f32"], "leave out --index-dtype"),
])
def test_eval_beir_chunk_usage_errors(cli, args, message):
    r = cli("eval", "beir", TINYBEIR, "-m", "fake:16", *args)
    assert r.exit_code == 2 and message in r.stderr, r


# -- the real model ------------------------------------------------------------------------------

LONG_TEXT = ("Dietary fiber feeds the bacteria of the gut, which turn it into short-chain fatty "
             "acids; these acids lower inflammation, strengthen the lining of the colon and may "
             "reduce the risk of colorectal cancer, according to several cohort studies and a "
             "few small randomized trials that measured markers in the blood of adults eating "
             "whole grains, legumes, fruit and vegetables every day for a number of weeks.")


def _hf(bundled_model_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    return (AutoTokenizer.from_pretrained(bundled_model_path),
            AutoModel.from_pretrained(bundled_model_path).eval())


def _unit(vector):
    return vector / np.linalg.norm(vector)


@pytest.mark.slow
def test_late_chunks_equal_pooling_a_transformers_pass_by_hand(cli, write_jsonl, tmp_path,
                                                               bundled_model_path):
    import torch

    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": LONG_TEXT}])
    r = cli("embed", docs, "--chunk-tokens", "16", "--late-chunking")
    assert r.exit_code == 0, r
    rows = r.records()
    tokenizer, model = _hf(bundled_model_path)
    encoded = tokenizer(LONG_TEXT, return_tensors="pt", return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        outputs = model(**encoded).last_hidden_state[0].numpy()
    tokens = outputs[1:-1]  # [CLS] and [SEP] are not a chunk's
    assert len(rows) == -(-len(tokens) // 16) > 2
    for number, row in enumerate(rows):
        span = slice(16 * number, 16 * number + 16)
        want = _unit(tokens[span].mean(axis=0))
        assert float(np.dot(row["embedding"], want)) > 0.99999
        first, last = offsets[1:-1][span][0], offsets[1:-1][span][-1]
        assert (row["char_start"], row["char_end"]) == (first[0], last[1])


@pytest.mark.slow
def test_late_chunks_of_a_document_longer_than_the_window_take_each_token_from_its_most_central_window(
        cli, write_jsonl, tmp_path, bundled_model_path):
    import torch

    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": LONG_TEXT}])
    r = cli("embed", docs, "--chunk-tokens", "16", "--late-chunking", "--max-length", "32")
    assert r.exit_code == 0, r
    rows = r.records()
    tokenizer, model = _hf(bundled_model_path)
    ids = tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    window, count = 30, len(ids)  # 32 less [CLS] and [SEP]; windows overlap by a quarter
    starts = list(range(0, count - window, window - window // 4)) + [count - window]
    tokens = np.zeros((count, 384), dtype=np.float32)
    best = np.full(count, np.inf)
    for start in starts:
        piece = [tokenizer.cls_token_id, *ids[start:start + window], tokenizer.sep_token_id]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([piece])).last_hidden_state[0, 1:-1].numpy()
        for i in range(window):
            distance = abs(i - (window - 1) / 2)
            if distance < best[start + i]:
                best[start + i], tokens[start + i] = distance, out[i]
    for number, row in enumerate(rows):
        want = _unit(tokens[16 * number:16 * number + 16].mean(axis=0))
        assert float(np.dot(row["embedding"], want)) > 0.99999


@pytest.mark.slow
def test_situated_chunks_equal_encoding_the_template_by_hand(cli, write_jsonl, tmp_path,
                                                             bundled_model):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": LONG_TEXT}])
    r = cli("embed", docs, "--chunk-tokens", "16", "--context-tokens", "40")
    assert r.exit_code == 0, r
    second = r.records()[1]
    spans = bundled_model.tokenizer(LONG_TEXT, add_special_tokens=False,
                                    return_offsets_mapping=True)["offset_mapping"]
    context = LONG_TEXT[spans[4][0]:spans[43][1]]  # tokens 16..31, 12 either side
    chunk = LONG_TEXT[spans[16][0]:spans[31][1]]
    assert second["text"] == chunk
    want = bundled_model.encode([f"{context}\n\n{chunk}"], normalize_embeddings=True)[0]
    assert float(np.dot(second["embedding"], want)) > 0.99999


@pytest.mark.slow
def test_a_context_larger_than_the_window_is_refused_before_any_work(cli, write_jsonl,
                                                                     tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": LONG_TEXT}])
    r = cli("embed", docs, "--chunk-tokens", "100", "--context-tokens", "200",
            "-o", tmp_path / "out.arrow")
    assert r.exit_code == 2, r
    assert "--context-tokens 200 with chunks of 100 tokens need" in r.stderr
    assert not (tmp_path / "out.arrow").exists()


@pytest.mark.slow
def test_max_length_may_reach_a_bert_models_position_table_with_a_notice(cli, write_jsonl,
                                                                        tmp_path, bundled_model):
    text = " ".join([LONG_TEXT] * 5)  # ~400 tokens
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": text}])
    r = cli("embed", docs, "--max-length", "512")
    assert r.exit_code == 0, r
    assert "past the 256 tokens the model was trained at (its position table has 512)" in r.stderr
    trained = bundled_model.max_seq_length
    try:
        bundled_model.max_seq_length = 512
        want = bundled_model.encode([text], normalize_embeddings=True)[0]
    finally:
        bundled_model.max_seq_length = trained
    assert float(np.dot(r.records()[0]["embedding"], want)) > 0.99999
    r = cli("embed", docs, "--max-length", "513")
    assert r.exit_code == 2 and "exceeds the model's window of 512" in r.stderr, r


@pytest.mark.parametrize("args", [["--late-chunking"], ["--context-tokens", "9"]])
def test_multi_vector_keeps_plain_chunks_only(cli, write_jsonl, tmp_path, args):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": WORDS}])
    r = cli("embed", docs, "-m", "fake:8", "--chunk-tokens", "5", *args, "--multi-vector")
    assert r.exit_code == 2 and "--multi-vector keeps each chunk's own token vectors" in r.stderr
