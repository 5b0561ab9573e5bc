"""TREC runs and qrels: reading runs (search output records or TREC run files), reading
judgments (BEIR qrels TSV, TREC qrels, qrels records, or a run), and writing TREC run lines.

A run is ordered by score descending, then doc id descending (trec_eval's order); a rank
column is ignored when scores exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from vecpipe.formats.errors import DataError
from vecpipe.formats.readers import (
    input_format_of,
    named_format,
    open_input,
    read_opened,
    shown_name,
)

Qrels = dict  # query id -> {doc id: int judgment}
Run = dict    # query id -> {doc id: float score}

RUN_TAG = "vecpipe"
_READ_ROWS = 65536


def ranking(docs: Mapping[str, float]) -> list[str]:
    """Doc ids best first in trec_eval's order: score descending, then doc id descending."""
    by_id = sorted(docs, reverse=True)
    return sorted(by_id, key=docs.__getitem__, reverse=True)  # stable: ties keep id order


def run_to_qrels(run: Run, depth: int) -> Qrels:
    """A reference run (e.g. exact search) as qrels: its top `depth` documents are relevant."""
    return {qid: dict.fromkeys(ranking(docs)[:depth], 1) for qid, docs in run.items()}


def trec_lines(hits: Iterable[tuple[str, str, int, float]], tag: str = RUN_TAG) -> str:
    """(query id, doc id, rank, score) as TREC run lines `qid Q0 docid rank score tag`. Scores
    keep 9 significant digits (float32 round-trips): rounding would create ties that trec_eval
    breaks by doc id, changing the metrics of the saved run."""
    return "".join(f"{qid} Q0 {doc} {rank} {score:.9g} {tag}\n"
                   for qid, doc, rank, score in hits)


def write_trec_run(run_top: Iterable[tuple[str, Sequence[str], Sequence[float]]], sink,
                   tag: str = RUN_TAG) -> None:
    """Write (query id, doc ids best first, scores) as TREC run lines to a text sink."""
    for qid, docs, scores in run_top:
        sink.write(trec_lines(((qid, doc, rank, score) for rank, (doc, score)
                               in enumerate(zip(docs, scores), 1)), tag))


def _record_format(head: bytes, path: str, qrels: bool) -> str | None:
    """The record format of a run or qrels input, None for a text file (TREC run or qrels).
    A `.csv`/`.tsv` name means records (search -o hits.csv), except a `.tsv` of qrels whose
    header has no `query_id`: BEIR's qrels TSV, read as text."""
    try:
        fmt = input_format_of(head, path)
    except DataError:  # not a record format
        return None
    if qrels and fmt == "tsv" and named_format(path) == "tsv":
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        return fmt if "query_id" in [f.strip() for f in first.split("\t")] else None
    return fmt


def _open(path: str, qrels: bool = False):
    """(stream, head bytes, compressed?, record format or None) for a path or `-`."""
    stream, head, compression = open_input(path)
    return stream, head, compression is not None, _record_format(head, path, qrels)


def _record_batches(stream, fmt: str, path: str, compressed: bool) -> Iterator:
    """(batch, first record number) from an already opened record stream (stdin included)."""
    name = shown_name(path)
    seekable_path = None if (compressed or path == "-") else path
    for _schema, batches in read_opened(stream, fmt, name, seekable_path, _READ_ROWS):
        record = 1
        for batch in batches:
            yield batch, record
            record += batch.num_rows


def _text_lines(stream, name: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) for the non-blank lines of a text stream."""
    for lineno, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(f"invalid UTF-8 ({err.reason})", source=name, record=lineno) \
                from None
        if line:
            yield lineno, line


def _score(text: str, name: str, lineno: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"score {text!r} is not a finite number", source=name, record=lineno)
    return value


def _judgment(text, name: str, lineno: int) -> int:
    try:
        if isinstance(text, float) and text.is_integer():
            return int(text)
        if isinstance(text, (int, str)) and not isinstance(text, bool):
            return int(text)
    except ValueError:
        pass
    raise DataError(f"relevance {text!r} is not an integer", source=name, record=lineno)


def _add_hit(run: Run, qid: str, doc: str, score: float, name: str, lineno: int) -> None:
    docs = run.setdefault(qid, {})
    if doc in docs:
        raise DataError(f"document {doc!r} appears twice for query {qid!r}", source=name,
                        record=lineno, hint="a run ranks each document once per query")
    docs[doc] = score


AGGREGATES = ("max", "sum", "mean")


def read_run(path: str, aggregate: tuple[str, str] | None = None) -> Run:
    """A run from `search` output (any record format, CSV/TSV by name: query_id, id, score
    and/or rank) or a TREC run file (`qid Q0 docid rank score tag`), sniffed from the first
    bytes. `aggregate` (field, max|sum|mean): a run of chunks collapsed to one by that field's
    value (e.g. parent_id), scored by the max, sum or mean of its hits' scores."""
    stream, _head, compressed, records = _open(path)
    name = shown_name(path)
    try:
        if records:
            return _run_from_records(_record_batches(stream, records, path, compressed), name,
                                     aggregate)
        if aggregate:
            raise DataError(f"a TREC run file carries no {aggregate[0]} field to aggregate by",
                            source=name, hint="give search output records (JSONL, Arrow, "
                                              "Parquet) that hold it")
        return _run_from_trec(_text_lines(stream, name), name)
    finally:
        stream.close()


def _run_from_trec(lines, name: str) -> Run:
    run: Run = {}
    for lineno, line in lines:
        fields = line.split()
        if len(fields) != 6:
            raise DataError(f"expected 6 fields (qid Q0 docid rank score tag), got "
                            f"{len(fields)}", source=name, record=lineno)
        _add_hit(run, fields[0], fields[2], _score(fields[4], name, lineno), name, lineno)
    return run


def _column(batch, names: Sequence[str]):
    return next((n for n in names if n in batch.schema.names), None)


def _run_from_records(batches, name: str, aggregate=None) -> Run:
    run: Run = {}
    grouped: dict = {}  # aggregate: query id -> {value: [scores]}
    for batch, first in batches:
        qcol, dcol = _column(batch, ("query_id",)), _column(batch, ("id", "_id", "doc_id"))
        if aggregate:
            dcol = _column(batch, (aggregate[0],))
            if dcol is None:
                raise DataError(f"no {aggregate[0]} field to aggregate by (fields: "
                                f"{', '.join(batch.schema.names)})", source=name)
        scol = _column(batch, ("score",)) or _column(batch, ("rank",))
        if qcol is None or dcol is None or scol is None:
            raise DataError(f"a run needs fields query_id, id and score (or rank); fields are "
                            f"{', '.join(batch.schema.names)}", source=name)
        sign = 1.0 if scol == "score" else -1.0  # rank 1 is best: use -rank as the score
        rows = zip(batch.column(qcol).to_pylist(), batch.column(dcol).to_pylist(),
                   batch.column(scol).to_pylist())
        for offset, (qid, doc, score) in enumerate(rows):
            record = first + offset
            if qid is None or doc is None or score is None:
                raise DataError(f"null {qcol if qid is None else dcol if doc is None else scol}",
                                source=name, record=record)
            if isinstance(score, str) or not math.isfinite(score):
                raise DataError(f"{scol} {score!r} is not a finite number", source=name,
                                record=record)
            if aggregate:
                docs = grouped.setdefault(str(qid), {})
                docs.setdefault(str(doc), []).append(sign * float(score))
            else:
                _add_hit(run, str(qid), str(doc), sign * float(score), name, record)
    return _aggregated(grouped, aggregate[1]) if aggregate else run


def _aggregated(grouped: dict, how: str) -> Run:
    """query id -> {value: scores} as a run, each value scored by max, sum or mean."""
    reduce = {"max": max, "sum": math.fsum,
              "mean": lambda scores: math.fsum(scores) / len(scores)}[how]
    return {qid: {doc: float(reduce(scores)) for doc, scores in docs.items()}
            for qid, docs in grouped.items()}


@dataclass
class Judgments:
    """What a qrels file held: qrels, or a reference run turned into qrels (`from_run`)."""

    qrels: Qrels
    from_run: bool = False
    duplicates: int = 0


def read_qrels(path: str, depth: int = 10) -> Judgments:
    """BEIR qrels TSV (header `query-id corpus-id score`), TREC qrels (`qid iter docid rel`),
    qrels records (query_id, id, relevance) — or a run, whose top `depth` become relevant.
    A repeated judgment replaces the earlier one (BEIR and pytrec_eval)."""
    stream, _head, compressed, records = _open(path, qrels=True)
    name = shown_name(path)
    try:
        if records:
            batches = _record_batches(stream, records, path, compressed)
            first = next(batches, None)
            if first is None:
                return Judgments({})
            batches = _chain(first, batches)
            if _column(first[0], ("relevance", "label", "corpus-id")) is None:
                return Judgments(run_to_qrels(_run_from_records(batches, name), depth), True)
            return _judgments(_record_judgments(batches, name))
        lines = _text_lines(stream, name)
        first_line = next(lines, None)
        if first_line is None:
            return Judgments({})
        lines = _chain(first_line, lines)
        if len(first_line[1].split()) == 6:
            return Judgments(run_to_qrels(_run_from_trec(lines, name), depth), True)
        return _judgments(_text_judgments(lines, name))
    finally:
        stream.close()


def judgment_rows(path: str) -> Iterator[tuple[int, str, str, int]]:
    """(record number, query id, doc id, judgment) of a qrels file in file order, repeats
    included: BEIR qrels TSV, TREC qrels or qrels records, plain or compressed."""
    stream, _head, compressed, records = _open(path, qrels=True)
    name = shown_name(path)
    try:
        if records:
            yield from _record_judgments(_record_batches(stream, records, path, compressed), name)
        else:
            yield from _text_judgments(_text_lines(stream, name), name)
    finally:
        stream.close()


def _chain(first, rest):
    yield first
    yield from rest


def _judgments(rows) -> Judgments:
    qrels: Qrels = {}
    duplicates = 0
    for _record, qid, doc, rel in rows:
        docs = qrels.setdefault(qid, {})
        duplicates += doc in docs
        docs[doc] = rel
    return Judgments(qrels, duplicates=duplicates)


def _text_judgments(lines, name: str):
    tsv = None
    for lineno, line in lines:
        if tsv is None:  # the first line decides: tab-separated triples are BEIR's format
            fields = line.split("\t")
            tsv = len(fields) == 3
            if tsv and not _is_int(fields[2]):
                continue  # the header
        fields = [f.strip() for f in line.split("\t")] if tsv else line.split()
        if tsv and len(fields) != 3:
            raise DataError(f"expected 3 tab-separated fields (query-id corpus-id score), got "
                            f"{len(fields)}", source=name, record=lineno)
        if not tsv and len(fields) != 4:
            raise DataError(f"expected 4 fields (qid iter docid rel), got {len(fields)}",
                            source=name, record=lineno)
        qid, doc, rel = (fields[0], fields[1], fields[2]) if tsv else \
            (fields[0], fields[2], fields[3])
        yield lineno, qid, doc, _judgment(rel, name, lineno)


def _record_judgments(batches, name: str):
    for batch, first in batches:
        qcol = _column(batch, ("query_id", "query-id"))
        dcol = _column(batch, ("id", "_id", "corpus-id", "doc_id"))
        rcol = _column(batch, ("relevance", "label", "score"))
        if qcol is None or dcol is None or rcol is None:
            raise DataError(f"qrels need fields query_id, id and relevance; fields are "
                            f"{', '.join(batch.schema.names)}", source=name)
        rows = zip(batch.column(qcol).to_pylist(), batch.column(dcol).to_pylist(),
                   batch.column(rcol).to_pylist())
        for offset, (qid, doc, rel) in enumerate(rows):
            if qid is None or doc is None:
                raise DataError("null query or document id", source=name, record=first + offset)
            yield first + offset, str(qid), str(doc), _judgment(rel, name, first + offset)


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
