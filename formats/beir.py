"""BEIR dataset folders: corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv, each plain or gzipped.

Read as plain data (paths, id -> text, judgments, Arrow ids); what a command builds from them
(an evaluation, mining pairs) is its own business.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from vecpipe.formats import schema as names
from vecpipe.formats.errors import DataError
from vecpipe.formats.trec import Qrels, read_qrels


@dataclass(frozen=True)
class BeirFiles:
    corpus: str
    queries: str
    qrels: str


def beir_files(folder: str, split: str) -> BeirFiles:
    """The three files of `folder` for `split` (`name` or `name.gz`); a DataError names the
    first one missing (with the folder's splits when it is the qrels)."""
    if not os.path.isdir(folder):
        raise DataError("not a folder; expected a BEIR dataset folder", source=folder)
    wanted = {"corpus": "corpus.jsonl", "queries": "queries.jsonl",
              "qrels": os.path.join("qrels", f"{split}.tsv")}
    found = {}
    for role, name in wanted.items():
        path = next((os.path.join(folder, name + ext) for ext in ("", ".gz")
                     if os.path.isfile(os.path.join(folder, name + ext))), None)
        if path is None:
            known = splits(folder)
            hint = f"splits here: {', '.join(known)}; choose one with --split" \
                if role == "qrels" and known else None
            raise DataError(f"missing {name}", source=folder, hint=hint)
        found[role] = path
    return BeirFiles(**found)


def splits(folder: str) -> list[str]:
    """The splits a folder's qrels/ holds (test, dev, train...)."""
    qrels = os.path.join(folder, "qrels")
    if not os.path.isdir(qrels):
        return []
    return sorted(name.split(".")[0] for name in os.listdir(qrels))


def beir_qrels(path: str) -> Qrels:
    """The judgments of a qrels file (a repeated one replaces the earlier)."""
    judgments = read_qrels(path)
    if judgments.from_run or not judgments.qrels:
        raise DataError("expected BEIR qrels (query-id, corpus-id, score)", source=path)
    return judgments.qrels


def read_queries(path: str) -> dict[str, str]:
    """Query id -> text, in file order (a null text reads as "")."""
    from vecpipe.formats.readers import RecordStream

    texts = {}
    for item in RecordStream([path]):
        batch = item.batch
        id_column = names.find_id_column(batch.schema)
        if id_column is None or names.TEXT not in batch.schema.names:
            raise DataError("queries need fields _id and text", source=path)
        texts.update((str(qid), text or "") for qid, text in zip(
            batch.column(id_column).to_pylist(), batch.column(names.TEXT).to_pylist()))
    return texts


def corpus_batches(path: str, batch_rows: int) -> Iterator[tuple["object", list[str]]]:
    """(ids as a pyarrow string array, document texts) per batch of at most `batch_rows`
    documents; a document's text is MTEB's (title + " " + text).strip()."""
    from vecpipe.formats.readers import RecordStream

    for item in RecordStream([path], batch_rows=batch_rows):
        yield _corpus_ids(item), document_texts(item.batch)


def _corpus_ids(item):
    batch = item.batch
    id_column = names.find_id_column(batch.schema)
    if id_column is None or names.TEXT not in batch.schema.names:
        raise DataError("corpus records need fields _id and text", source=item.source,
                        record=item.first_record)
    return names.batch_ids(batch, id_column, item.first_record, source=item.source,
                           null_message="null document id")


def document_texts(batch) -> list[str]:
    """MTEB's document texts of a corpus batch: (title + " " + text).strip()."""
    texts = batch.column(names.TEXT).to_pylist()
    if "title" not in batch.schema.names:
        return [(text or "").strip() for text in texts]
    titles = batch.column("title").to_pylist()
    return [((title or "") + " " + (text or "")).strip() for title, text in zip(titles, texts)]
