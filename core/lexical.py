"""The lexical index kind (layout `lexical`): BM25 over the records' text, a bm25s index (its
formulas and files) searched here over its memory-mapped score matrix.

    idx/manifest.json            "layout": "lexical"; count, stored fields, files (sizes and
                                 sha256) and `lexical`: the text fields, tokenizer (lowercase,
                                 token pattern, stopwords, stemmer), BM25 method, k1, b, delta,
                                 and the vocabulary, token and posting counts
    idx/data.csc.index.npy       bm25s's score matrix, CSC by term: float32 scores,
    idx/indices.csc.index.npy      int32 row numbers, int64 column pointers (vocabulary + 1)
    idx/indptr.csc.index.npy
    idx/vocab.index.json         term -> column (bm25s's file: "" is its empty token)
    idx/params.index.json        bm25s's parameters: `bm25s.BM25.load(idx, mmap=True)` opens
                                 the folder as a bm25s index too
    idx/nonoccurrence_array.index.npy   BM25L and BM25+ only: each term's score at tf 0
    idx/tokens.npy               every row's term ids in order (int32), and where each row's
    idx/token_offsets.npy          start (int64, count + 1): --append and deletes re-score the
                                 corpus from them, without the original records
    idx/rows.parquet             row number -> `id` and the stored fields, as dense indexes

Tokens are made exactly as `bm25s.tokenize` makes them (lowercase, the token regex, stopwords
dropped, then the Snowball stemmer of PyStemmer), and the matrix is bm25s's to the last bit
(its idf and tf functions, applied to all (row, term) pairs at once rather than in its Python
loop over documents: 4-5x faster), so scores equal bm25s's to the last bit: a query's score
is the float32 sum, in query-token order (a repeated token counts again), of its terms'
columns. A hit is a row that shares a term with the query; rows that match nothing are
never hits (bm25s fills a short top k with them at score 0).

Statistics (idf, average length) belong to the whole corpus, so every change (`LexicalBuilder`
with a base: append, replace, delete) re-scores the whole corpus from the kept tokens, in a
temporary folder swapped into place as every index is.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

from vecpipe.core.index_format import (
    FORMAT, FORMAT_VERSION, ID, LEXICAL_FILES, LEXICAL_NONOCCURRENCE, ROWS,
    CommitOnExit, check_files, check_target, clean_leftovers, file_facts, read_rows,
    real_folder, stored_columns, swap_into_place, temporary_sibling, write_manifest)
from vecpipe.formats.errors import DataError, ParameterError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from vecpipe.core.vectors import Hits

LAYOUT = "lexical"
DATA, INDICES, INDPTR = "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"
VOCAB, PARAMS = "vocab.index.json", "params.index.json"
NONOCCURRENCE = LEXICAL_NONOCCURRENCE
TOKENS, TOKEN_OFFSETS = "tokens.npy", "token_offsets.npy"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"     # bm25s's (and scikit-learn's) default
METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
NONOCCURRENCE_METHODS = ("bm25l", "bm25+")
# stopword lists bm25s ships, by the short name recorded (its long names are accepted too)
STOPWORDS = {"en": "english", "en_plus": "english_plus", "de": "german", "nl": "dutch",
             "fr": "french", "es": "spanish", "pt": "portuguese", "it": "italian",
             "ru": "russian", "sv": "swedish", "no": "norwegian", "zh": "chinese",
             "tr": "turkish", "ko": "korean", "da": "danish"}
# ISO 639-1 codes for PyStemmer's Snowball algorithms (recorded by the algorithm's name)
STEMMER_CODES = {"ar": "arabic", "hy": "armenian", "eu": "basque", "ca": "catalan",
                 "cs": "czech", "da": "danish", "nl": "dutch", "en": "english",
                 "eo": "esperanto", "et": "estonian", "fi": "finnish", "fr": "french",
                 "de": "german", "el": "greek", "hi": "hindi", "hu": "hungarian",
                 "id": "indonesian", "ga": "irish", "it": "italian", "lt": "lithuanian",
                 "ne": "nepali", "no": "norwegian", "fa": "persian", "pl": "polish",
                 "pt": "portuguese", "ro": "romanian", "ru": "russian", "sr": "serbian",
                 "st": "sesotho", "es": "spanish", "sv": "swedish", "ta": "tamil",
                 "tr": "turkish", "yi": "yiddish"}
_STOP = -1                           # a word's id in the token cache when it is a stopword


# ---- settings -------------------------------------------------------------------------------

@dataclass
class LexicalSettings:
    """How text becomes terms and terms become scores; recorded in the manifest's `lexical`.
    Defaults: BEIR-style BM25 as bm25s's README runs it."""

    text_fields: list = field(default_factory=lambda: ["text"])
    lower: bool = True
    token_pattern: str = TOKEN_PATTERN
    stopwords: str | None = "en"
    stemmer: str | None = "english"
    method: str = "lucene"
    k1: float = 1.5
    b: float = 0.75
    delta: float = 0.5               # BM25L and BM25+ only

    @classmethod
    def chosen(cls, text_fields=None, stopwords="en", stemmer="english", method="lucene",
               k1=1.5, b=0.75) -> "LexicalSettings":
        """Settings from user choices: names normalised (`none` -> None), values checked."""
        settings = cls(text_fields=list(text_fields or ["text"]),
                       stopwords=stopword_name(stopwords), stemmer=stemmer_name(stemmer),
                       method=method, k1=k1, b=b)
        settings.check()
        return settings

    def check(self) -> None:
        if self.method not in METHODS:
            raise ParameterError(f"unknown BM25 method {self.method!r}; use "
                                 f"{'|'.join(METHODS)}", "method")
        if not (isinstance(self.k1, (int, float)) and self.k1 >= 0):
            raise ParameterError(f"k1 must be a non-negative number, not {self.k1}", "k1")
        if not (isinstance(self.b, (int, float)) and 0 <= self.b <= 1):
            raise ParameterError(f"b must be between 0 and 1, not {self.b}", "b")

    def manifest(self) -> dict:
        return {"engine": "bm25s", **asdict(self), "idf_method": self.method}

    @classmethod
    def from_manifest(cls, block: dict, path: str) -> "LexicalSettings":
        try:
            settings = cls(**{key: block[key] for key in cls.__dataclass_fields__})
            settings.check()
            stopword_list(settings.stopwords)
            if settings.stemmer is not None:
                stemmer_name(settings.stemmer)
        except (KeyError, TypeError, ParameterError) as err:
            raise DataError(f"manifest.json: invalid 'lexical' settings ({err})",
                            source=path) from None
        if not (isinstance(settings.text_fields, list) and settings.text_fields and
                all(isinstance(name, str) for name in settings.text_fields)):
            raise DataError("manifest.json: 'lexical' text_fields must be a list of field "
                            "names", source=path)
        return settings


def stopword_name(name: str | None) -> str | None:
    """The short name of one of bm25s's stopword lists; None for `none`."""
    if name is None or name.lower() == "none":
        return None
    name = name.lower()
    long_names = {long: short for short, long in STOPWORDS.items()}
    if name in STOPWORDS or name in long_names:
        return long_names.get(name, name)
    raise ParameterError(f"no stopword list {name!r}; use none or one of "
                         f"{', '.join(STOPWORDS)}", "stopwords")


def stemmer_name(name: str | None) -> str | None:
    """The PyStemmer (Snowball) algorithm for a language name or ISO code; None for `none`."""
    import Stemmer

    if name is None or name.lower() == "none":
        return None
    name = STEMMER_CODES.get(name.lower(), name.lower())
    if name not in Stemmer.algorithms():
        raise ParameterError(f"no Snowball stemmer {name!r}; use none, a language code (en, "
                             f"de, fr...) or one of {', '.join(Stemmer.algorithms())}",
                             "stemmer")
    return name


def stopword_list(name: str | None) -> list:
    """bm25s's list, read from its stopwords module alone: importing the bm25s package
    (numba, scipy) would cost searching a lexical index half a second of start-up."""
    if name is None:
        return []
    if not isinstance(name, str):
        raise ParameterError(f"stopwords names a list, not {name!r}", "stopwords")
    name = stopword_name(name)  # a short name, or ParameterError
    if name is None:
        return []
    try:
        constant = {"en": "EN", "en_plus": "EN_PLUS"}.get(name, STOPWORDS[name].upper())
        return list(getattr(_bm25s_stopwords(), f"STOPWORDS_{constant}"))
    except (ImportError, OSError, AttributeError, KeyError):  # another layout: ask bm25s
        from bm25s.tokenization import _infer_stopwords

        return list(_infer_stopwords(name))


def _bm25s_stopwords():
    import importlib.util
    import sys

    module = sys.modules.get("bm25s.stopwords") or sys.modules.get("_vecpipe_bm25s_stopwords")
    if module is None:
        package = importlib.util.find_spec("bm25s")
        spec = importlib.util.spec_from_file_location(
            "_vecpipe_bm25s_stopwords",
            os.path.join(package.submodule_search_locations[0], "stopwords.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_vecpipe_bm25s_stopwords"] = module
    return module


# ---- tokens ---------------------------------------------------------------------------------

class Tokenizer:
    """Texts -> term ids as `bm25s.tokenize` makes the terms; the vocabulary grows with
    `documents()` and is only read by `queries()`. Each new word of a batch is stemmed once
    (PyStemmer's stemWords over the batch's new words), then cached."""

    def __init__(self, settings: LexicalSettings, terms: dict | None = None):
        import re

        self.settings = settings
        self.terms: dict = terms if terms is not None else {}   # term -> id
        self._find = re.compile(settings.token_pattern).findall
        self._stopwords = frozenset(stopword_list(settings.stopwords))
        self._stem = None
        if settings.stemmer is not None:
            import Stemmer

            self._stem = Stemmer.Stemmer(settings.stemmer).stemWords
        self._doc_words: dict = {}      # word -> term id (_STOP for stopwords)
        self._query_words: dict = {}    # word -> term id (_STOP: stopword or unknown term)

    def _learn(self, words: list, cache: dict, grow: bool) -> None:
        """Put the batch's new `words` (sorted: term ids do not depend on hashing) in `cache`;
        with `grow`, their new terms join the vocabulary."""
        new = sorted(set().union(*words).difference(cache))
        if not new:
            return
        kept = [word for word in new if word not in self._stopwords]
        cache.update(dict.fromkeys(new, _STOP))
        terms = self.terms
        for word, term in zip(kept, self._stem(kept) if self._stem is not None else kept):
            number = terms.get(term)
            if number is None:
                if not grow:
                    continue
                number = terms[term] = len(terms)
            cache[word] = number

    def _ids(self, texts: Sequence[str], cache: dict, grow: bool) -> list:
        find = self._find
        words = [find(text.lower()) for text in texts] if self.settings.lower else \
            [find(text) for text in texts]
        self._learn(words, cache, grow)
        return [[number for word in row if (number := cache[word]) >= 0] for row in words]

    def documents(self, texts: Sequence[str]) -> list:
        """Each text's term ids in order, new terms added to the vocabulary."""
        return self._ids(texts, self._doc_words, grow=True)

    def queries(self, texts: Sequence[str]) -> list:
        """Each text's term ids in order; stopwords and terms the index lacks left out."""
        return self._ids(texts, self._query_words, grow=False)


# ---- building -------------------------------------------------------------------------------

class LexicalBuilder(CommitOnExit):
    """Build a lexical index (`settings`), or a re-scored copy of `base` with rows added,
    replaced or deleted, atomically (a temporary sibling folder renamed into place).

    `add(ids, texts, stored)` takes string ids, one text per id and the stored fields (a
    pyarrow Table/RecordBatch with `id` and the stored fields); duplicate ids follow
    `on_duplicate` as for dense indexes (error, first: keep the row there, last: the row keeps
    its number and takes the new text and fields). `delete`: ids whose rows of `base` are left
    out before anything is added, as `IndexBuilder` does (`deleted`, `not_found` count them).
    The block's end commits.
    """

    def __init__(self, path: str, settings: LexicalSettings | None = None,
                 base: "LexicalIndex | None" = None, on_duplicate: str = "error",
                 fields: Sequence[str] = (), delete: Sequence[str] | None = None):
        from vecpipe.core.index_build import duplicate_policy

        self.path = real_folder(path)
        self.settings = settings if base is None else base.settings
        self.settings.check()
        self.fields = list(base.fields) if base else [ID, *[f for f in fields if f != ID]]
        self.on_duplicate = duplicate_policy(on_duplicate)
        self.skipped = self.replaced = self.deleted = self.not_found = 0
        self.tokenizer = Tokenizer(self.settings, dict(base.terms()) if base else None)
        self._tokens: list = []          # row -> its term ids
        self._row_of: dict = {}          # id -> row
        self._tables: list = []          # stored-field tables in arrival order
        self._arrived = 0
        self._position: list = []        # row -> position in the arrivals
        if base is None:
            check_target(self.path)
        elif delete is None:
            self._take_base(base, None)
        else:
            from vecpipe.core.index_delete import kept_rows

            keep, self.deleted, self.not_found = kept_rows(base.ids(), delete)
            self._take_base(base, keep)
        clean_leftovers(self.path)
        self.tmp = temporary_sibling(self.path, "building")

    @property
    def count(self) -> int:
        return len(self._position)

    def _take_base(self, base: "LexicalIndex", keep) -> None:
        """The base's rows (those of `keep`, in order, when some are deleted)."""
        import pyarrow as pa

        table, tokens = base.rows(), base.token_lists()
        if keep is not None:
            table = table.take(pa.array(keep))
            tokens = [tokens[row] for row in keep.tolist()]
        self._tables.append(table)
        self._arrived = table.num_rows
        self._position = list(range(table.num_rows))
        self._row_of = {key: row for row, key in enumerate(table.column(ID).to_pylist())}
        self._tokens = tokens

    def add(self, ids: Sequence[str], texts: Sequence[str], stored, source: str | None = None,
            first_record: int = 1) -> None:
        """Add one batch; `first_record` (1-based) locates errors in `source`."""
        tokens = self.tokenizer.documents(texts)
        if self._row_of.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
            return self._add_new(ids, tokens, stored)
        rows, positions = [], []
        for pos, key in enumerate(ids):
            row = self._row_of.get(key)
            if row is None:
                row = self._row_of[key] = len(self._tokens)
                self._tokens.append(tokens[pos])
                self._position.append(0)
            elif self.on_duplicate == "error":
                raise DataError(f"duplicate id {key!r}", source=source,
                                record=first_record + pos,
                                hint="keep the first copy or the last instead of failing")
            elif self.on_duplicate == "first":
                self.skipped += 1
                continue
            else:
                self.replaced += 1
                self._tokens[row] = tokens[pos]
            rows.append(row)
            positions.append(pos)
        self._add_stored(self._stored_table(stored), rows, positions)

    def _add_new(self, ids: Sequence[str], tokens: list, stored) -> None:
        """A batch whose ids are all new (the common case): no Python loop over its records."""
        start, count = len(self._tokens), len(ids)
        self._row_of.update(zip(ids, range(start, start + count)))
        self._tokens.extend(tokens)
        self._position.extend(range(count))  # _add_stored sets them
        self._add_stored(self._stored_table(stored), range(start, start + count), range(count))

    def _stored_table(self, stored) -> "pa.Table":
        import pyarrow as pa

        table = pa.Table.from_batches([stored]) if isinstance(stored, pa.RecordBatch) \
            else stored
        return table.select(self.fields)

    def _add_stored(self, table, rows, positions) -> None:
        import pyarrow as pa

        from vecpipe.formats.schema import align_batch

        if self._tables:
            first = self._tables[0].schema
            table = pa.Table.from_batches([align_batch(b, first) for b in table.to_batches()],
                                          first)
        self._tables.append(table)
        if isinstance(rows, range):  # new rows at the end, in arrival order
            self._position[rows.start:rows.stop] = range(self._arrived + positions.start,
                                                         self._arrived + positions.stop)
        else:
            for row, pos in zip(rows, positions):
                self._position[row] = self._arrived + pos
        self._arrived += table.num_rows

    def commit(self) -> dict:
        """Score the corpus, write everything into the temporary folder, swap it into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from vecpipe.formats.writers import write_error

        count = self.count
        if count == 0:
            raise DataError("no records to index")
        flat, offsets, terms = _compacted(self._tokens, self.tokenizer.terms)
        self._tokens = []  # the arrays replace the lists: peak memory
        if not terms:
            raise DataError("the records hold no terms to index (every word is a stopword "
                            "or shorter than two characters)")
        try:
            scores = _bm25_matrix(self.settings, flat, offsets, len(terms))
            stats = _save(self.tmp, self.settings, scores, flat, offsets, terms)
            rows = pa.concat_tables(self._tables).take(pa.array(self._position, pa.int64()))
            pq.write_table(rows, os.path.join(self.tmp, ROWS), compression="zstd")
        except OSError as err:
            raise write_error(err, self.path) from None
        names = [*LEXICAL_FILES] + ([NONOCCURRENCE] if scores["nonoccurrence"] is not None
                                    else [])
        manifest = lexical_manifest(count, self.fields, self.settings, stats,
                                    file_facts(self.tmp, names))
        write_manifest(self.tmp, manifest)
        swap_into_place(self.tmp, self.path)
        return manifest

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


class MissingTextField(DataError):
    """A text field the records do not have (the caller may say how to name it)."""


def record_batches(stream, text_fields: Sequence[str], fields: Sequence[str]):
    """dicts of `LexicalBuilder.add` arguments, one per non-empty batch of a RecordStream:
    ids (`id`/`_id`, else the record number), the text fields joined as `embed` joins them,
    and the stored `fields` (null where a batch lacks one). A record without text fails at
    its record."""
    import pyarrow as pa

    from vecpipe.core.embedding import batch_texts
    from vecpipe.formats import schema as names

    next_record = 1  # across inputs: record-number ids stay unique
    for item in stream:
        batch = item.batch
        if not batch.num_rows:
            continue
        missing = [name for name in text_fields if name not in batch.schema.names]
        if missing:
            raise MissingTextField(f"no field {missing[0]!r} to index in the records; fields "
                                   f"are {', '.join(batch.schema.names) or 'none'}",
                                   source=item.source, record=item.first_record)
        texts, problems = batch_texts(batch, list(text_fields))
        bad = next((row for row, problem in enumerate(problems) if problem), None)
        if bad is not None:
            raise DataError(problems[bad], source=item.source, record=item.first_record + bad)
        id_column = names.find_id_column(batch.schema)
        ids = names.batch_ids(batch, id_column, item.first_record if id_column else next_record,
                              source=item.source).to_pylist()
        next_record += batch.num_rows
        stored = pa.table([pa.array(ids, pa.string())] +
                          [batch.column(name) if name in batch.schema.names
                           else pa.nulls(batch.num_rows) for name in fields[1:]],
                          names=list(fields))
        yield dict(ids=ids, texts=texts, stored=stored, source=item.source,
                   first_record=item.first_record)


def _compacted(tokens: list, terms: dict):
    """(flat int32 term ids, int64 row offsets, term -> id) with the terms no row uses any
    more (replaced or deleted rows) dropped and the ids renumbered densely."""
    import itertools

    import numpy as np

    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int32,
                       count=int(offsets[-1]))
    used = np.bincount(flat, minlength=len(terms)) > 0
    if used.all():
        return flat, offsets, terms
    renumber = np.cumsum(used, dtype=np.int64) - 1
    flat = renumber[flat].astype(np.int32)
    kept = {term: int(renumber[number]) for term, number in terms.items() if used[number]}
    return flat, offsets, kept


def _bm25_matrix(settings: LexicalSettings, flat, offsets, vocabulary: int) -> dict:
    """bm25s's score matrix of the corpus, to the last bit: its own idf and tf functions
    (bm25s.scoring), applied to every (row, term) pair at once instead of in its Python loop
    over the documents (Counter per document). The arithmetic is the same element by element:
    float32 term counts and idf, the length term in float64, the product rounded to float32
    once (NumPy 2's promotion, under which bm25s's per-document arrays are float64 too); and
    the same CSC layout (by term, then row)."""
    import numpy as np
    from bm25s.scoring import (_build_idf_array, _build_nonoccurrence_array,
                               _select_idf_scorer, _select_tfc_scorer)

    count = len(offsets) - 1
    lengths = np.diff(offsets)
    avg_doc_len = lengths.mean()  # as bm25s takes it: the mean of an int64 array
    rows = np.repeat(np.arange(count, dtype=np.int64), lengths)
    pairs, tf = np.unique(flat.astype(np.int64) * count + rows, return_counts=True)
    del rows
    columns, rows = np.divmod(pairs, count)
    del pairs
    frequencies = dict(enumerate(np.bincount(columns, minlength=vocabulary).tolist()))
    idf_of, tfc_of = _select_idf_scorer(settings.method), _select_tfc_scorer(settings.method)
    nonoccurrence = None
    if settings.method in NONOCCURRENCE_METHODS:
        nonoccurrence = _build_nonoccurrence_array(
            frequencies, count, idf_of, tfc_of, l_d=avg_doc_len, l_avg=avg_doc_len,
            k1=settings.k1, b=settings.b, delta=settings.delta, dtype="float32")
    idf = _build_idf_array(frequencies, count, idf_of, dtype="float32")
    scores = idf[columns] * tfc_of(tf_array=tf.astype(np.float32), l_d=lengths[rows],
                                   l_avg=avg_doc_len, k1=settings.k1, b=settings.b,
                                   delta=settings.delta)
    if nonoccurrence is not None:
        scores -= nonoccurrence[columns]
    indptr = np.zeros(vocabulary + 1, dtype=np.int64)
    np.cumsum(np.fromiter(frequencies.values(), np.int64, vocabulary), out=indptr[1:])
    return {"data": scores.astype(np.float32), "indices": rows.astype(np.int32),
            "indptr": indptr, "num_docs": count, "nonoccurrence": nonoccurrence,
            "avg_doc_len": float(offsets[-1] / count)}


def _save(folder: str, settings: LexicalSettings, scores: dict, flat, offsets,
          terms: dict) -> dict:
    """The matrix, vocabulary and parameters as bm25s saves them, and the tokens; returns the
    corpus statistics for the manifest."""
    import json

    import bm25s
    import numpy as np
    import orjson

    np.save(os.path.join(folder, DATA), scores["data"].astype(np.float32, copy=False))
    np.save(os.path.join(folder, INDICES), scores["indices"].astype(np.int32, copy=False))
    np.save(os.path.join(folder, INDPTR), scores["indptr"].astype(np.int64, copy=False))
    if scores["nonoccurrence"] is not None:
        np.save(os.path.join(folder, NONOCCURRENCE), scores["nonoccurrence"])
    np.save(os.path.join(folder, TOKENS), flat)
    np.save(os.path.join(folder, TOKEN_OFFSETS), offsets)
    vocab = dict(terms)
    vocab.setdefault("", len(terms))  # bm25s's empty token, past the matrix's columns
    with open(os.path.join(folder, VOCAB), "wb") as f:
        f.write(orjson.dumps(vocab))
    params = dict(k1=settings.k1, b=settings.b, delta=settings.delta, method=settings.method,
                  idf_method=settings.method, dtype="float32", int_dtype="int32",
                  num_docs=int(scores["num_docs"]), version=bm25s.__version__,
                  backend="numpy")
    with open(os.path.join(folder, PARAMS), "w") as f:
        json.dump(params, f, indent=4)
    return {"vocabulary": len(terms), "tokens": int(offsets[-1]),
            "postings": int(len(scores["data"])), "avg_doc_len": scores["avg_doc_len"],
            "bm25s_version": bm25s.__version__}


def lexical_manifest(count: int, fields: list, settings: LexicalSettings, stats: dict,
                     files: dict) -> dict:
    import datetime

    from vecpipe.formats import __version__

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": LAYOUT,
        "vecpipe_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": count, "fields": fields, "metadata": {}, "query_prompt": None,
        "lexical": {**settings.manifest(), **stats}, "files": files}


# ---- reading and searching ------------------------------------------------------------------

def open_lexical(path: str, manifest: dict, verify: bool = False) -> "LexicalIndex":
    """A lexical index folder: `manifest` read and checked by index_format (its file names
    too); file sizes (checksums with `verify`) and array headers checked here."""
    checked = check_files(path, manifest, verify)
    index = LexicalIndex(path, manifest)
    index.check_arrays()
    index.files_checked = checked
    return index


class LexicalIndex:
    """A lexical index folder opened for reading; the matrix is memory-mapped on first use.
    An IndexReader for what every index has (rows, ids, fields); it has no vectors."""

    layout = LAYOUT
    flat = False
    dim = metric = dtype = score_metric = full_spec = codec = None
    query_prompt = None
    query_dim = 0
    files_checked = 0

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.count: int = manifest["count"]
        self.fields: list = manifest["fields"]
        self.metadata: dict = manifest.get("metadata") or {}
        self.settings = LexicalSettings.from_manifest(manifest["lexical"], path)
        self.stats = manifest["lexical"]
        self._rows = self._matrix = self._terms = self._tokenizer = None

    def check_arrays(self) -> None:
        """The .npy files hold what the manifest says (lengths, dtypes), from their headers."""
        from vecpipe.core.index_format import _npy_header

        vocabulary, tokens, postings = (self.stats.get(key) for key in
                                        ("vocabulary", "tokens", "postings"))
        if not all(isinstance(v, int) and v >= 0 for v in (vocabulary, tokens, postings)):
            raise DataError("manifest.json: 'lexical' needs vocabulary, tokens and postings "
                            "counts", source=self.path)
        expected = {DATA: ("float32", postings), INDICES: ("int32", postings),
                    INDPTR: ("int64", vocabulary + 1), TOKENS: ("int32", tokens),
                    TOKEN_OFFSETS: ("int64", self.count + 1)}
        if self.settings.method in NONOCCURRENCE_METHODS:
            expected[NONOCCURRENCE] = ("float32", vocabulary)
        for name, (dtype, length) in expected.items():
            shape, found = _npy_header(self.path, name)
            if str(found) != dtype or shape != (length,):
                raise DataError(f"{name} holds {shape} {found}, the manifest implies "
                                f"({length},) {dtype}: the index is damaged", source=self.path)

    def _array(self, name: str):
        import numpy as np

        return np.load(os.path.join(self.path, name), mmap_mode="r", allow_pickle=False)

    def matrix(self) -> dict:
        """The memory-mapped score matrix: data, indices, indptr (and the BM25L/BM25+ tf-0
        scores under `nonoccurrence`)."""
        if self._matrix is None:
            self._matrix = {"data": self._array(DATA), "indices": self._array(INDICES),
                            "indptr": self._array(INDPTR), "nonoccurrence": None}
            if self.settings.method in NONOCCURRENCE_METHODS:
                self._matrix["nonoccurrence"] = self._array(NONOCCURRENCE)
        return self._matrix

    def terms(self) -> dict:
        """term -> column (bm25s's empty token left out)."""
        if self._terms is None:
            import orjson

            try:
                with open(os.path.join(self.path, VOCAB), "rb") as f:
                    vocab = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError) as err:
                raise DataError(f"{VOCAB} is not readable ({err})", source=self.path) from None
            vocab.pop("", None)
            if not isinstance(vocab, dict) or len(vocab) != self.stats["vocabulary"] or not \
                    all(isinstance(v, int) and 0 <= v < len(vocab) for v in vocab.values()):
                raise DataError(f"{VOCAB} does not map the manifest's "
                                f"{self.stats['vocabulary']} terms to columns: the index is "
                                "damaged", source=self.path)
            self._terms = vocab
        return self._terms

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.settings, self.terms())
        return self._tokenizer

    def token_lists(self) -> list:
        """Every row's term ids (Python lists), for a re-scoring rebuild."""
        flat, offsets = self._array(TOKENS), self._array(TOKEN_OFFSETS)
        if len(offsets) and (offsets[0] != 0 or offsets[-1] != len(flat)):
            raise DataError(f"{TOKEN_OFFSETS} does not cover {TOKENS}: the index is damaged",
                            source=self.path)
        ids, ends = flat.tolist(), offsets.tolist()
        return [ids[start:end] for start, end in zip(ends[:-1], ends[1:])]

    def rows(self, columns: Sequence[str] | None = None) -> "pa.Table":
        if self._rows is None:
            self._rows = read_rows(self.path, self.count, self.fields)
        return stored_columns(self._rows, columns, self.path)

    def ids(self) -> "pa.ChunkedArray":
        return self.rows().column(ID)

    def visible_mask(self) -> None:
        return None

    def storage_options(self) -> dict:
        return {}

    def _no_vectors(self, *args, **kwargs):
        raise UsageError("a lexical (BM25) index holds no vectors; it is searched with text",
                         source=self.path)

    stored_vectors = full_vectors = encode = query_vectors = flat_vectors = _no_vectors

    def searcher(self, k: int, min_score: float | None = None, mask=None,
                 **vector_options) -> "LexicalSearcher":
        if any(value not in (None, False, 0) for value in vector_options.values()):
            raise ParameterError("a lexical index is searched with text: "
                                 f"{next(n for n, v in vector_options.items() if v)} applies "
                                 "to vector indexes", next(n for n, v in vector_options.items()
                                                          if v))
        return LexicalSearcher(self, k, min_score=min_score, mask=mask)


class LexicalSearcher:
    """BM25 top k of text queries over one lexical index: exact, any filter (`mask`: bool
    per row, True = allowed) applied before the top k is chosen, so a filter that keeps m
    matching rows returns min(k, m) hits. Ties go to the lower row."""

    def __init__(self, index: LexicalIndex, k: int, min_score: float | None = None,
                 mask=None):
        import numpy as np

        if k < 1:
            raise ParameterError("k (hits per query) must be at least 1", "k")
        self.index, self.k, self.min_score = index, k, min_score
        self.blocked = None
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            self.blocked = None if mask.all() else ~mask

    def search(self, texts: Sequence[str]) -> "Hits":
        """Hits for each text (rows x k, -1 and -inf past a query's last hit)."""
        return self.search_ids(self.index.tokenizer().queries(texts))

    def search_ids(self, queries: list) -> "Hits":
        import numpy as np

        from vecpipe.core.vectors import Hits

        found = [self._top(ids) for ids in queries]
        width = max((len(rows) for rows, _ in found), default=0)
        rows = np.full((len(found), width), -1, dtype=np.int64)
        scores = np.full((len(found), width), -np.inf, dtype=np.float32)
        for number, (hit_rows, hit_scores) in enumerate(found):
            rows[number, :len(hit_rows)] = hit_rows
            scores[number, :len(hit_rows)] = hit_scores
        return Hits(rows, scores).thresholded(self.min_score)

    def scores(self, ids: list):
        """(float32 score of every row, bool: the row shares a term with the query), summed as
        bm25s sums them: term by term in query order, in float32."""
        import numpy as np

        matrix = self.index.matrix()
        data, indices, indptr = matrix["data"], matrix["indices"], matrix["indptr"]
        total = np.zeros(self.index.count, dtype=np.float32)
        for term in ids:
            start, end = indptr[term], indptr[term + 1]
            total[indices[start:end]] += data[start:end]  # a column holds each row once
        matched = total > 0  # a positive-idf term is shared: every method's column is > 0
        if matrix["nonoccurrence"] is not None and ids:
            total += matrix["nonoccurrence"][np.asarray(ids)].sum()
        return total, matched

    def _top(self, ids: list):
        import numpy as np

        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        total, matched = self.scores(ids)
        if self.blocked is not None:
            matched &= ~self.blocked
        rows = np.flatnonzero(matched)
        values = total[rows]
        if len(rows) > self.k:
            kth = np.partition(values, len(values) - self.k)[len(values) - self.k]
            keep = values > kth
            keep[np.flatnonzero(values == kth)[:self.k - int(keep.sum())]] = True
            rows, values = rows[keep], values[keep]
        order = np.lexsort((rows, -values))
        return rows[order], values[order]
