"""A content-addressed store of embedding vectors, so reruns only embed what is new.

A vector is stored under (space, hash of the text). The space is a hash of everything else that
decides the vector (model and weights hash, prompt, dim, normalization, backend, window...): change
any of them and nothing old matches. One SQLite file per cache folder (WAL mode), safe for several
processes at once, e.g. shards of one job sharing a cache.

    space = cache_space({"model": ..., "model_sha": ..., "prompt": "", "dim": 384, ...})
    with EmbeddingCache(folder, space, dim) as cache:
        vectors, hits = cache.lookup(texts)      # float32 (n x dim); hits: bool mask
        cache.store(new_texts, new_vectors)
        vectors = cache.encode(texts, embed)     # look up, embed(misses), store: in one call
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Mapping, Sequence

from vecpipe.formats.errors import DataError, UsageError

FILE_NAME = "vectors.sqlite"
_CHUNK = 500  # keys per SELECT (below SQLite's bound-parameter limit everywhere)


class CacheFileError(DataError):
    """The cache's SQLite file cannot be used (the caller may say how to point elsewhere)."""


def cache_space(settings: Mapping[str, object]) -> str:
    """A stable id (hex) for the settings that decide a vector, whatever their order."""
    text = json.dumps({k: str(v) for k, v in settings.items()}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """Vectors of one space in the cache folder `folder` (created when missing)."""

    def __init__(self, folder: str, space: str, dim: int,
                 description: Mapping[str, object] | None = None):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"cache {folder!r} is not a folder")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, FILE_NAME)
        self.space = space
        self.dim = dim
        self.hits = 0
        self.stored = 0
        self._lock = threading.Lock()  # one connection, used by a reader and an encoder thread
        try:
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (space TEXT NOT NULL, "
                             "key BLOB NOT NULL, vector BLOB NOT NULL, "
                             "PRIMARY KEY (space, key)) WITHOUT ROWID")
            self._db.execute("CREATE TABLE IF NOT EXISTS spaces (space TEXT PRIMARY KEY, "
                             "settings TEXT NOT NULL)")
            if description is not None:
                self._db.execute("INSERT OR IGNORE INTO spaces VALUES (?, ?)",
                                 (space, json.dumps(dict(description), sort_keys=True,
                                                    default=str)))
        except sqlite3.DatabaseError as err:
            raise CacheFileError(f"cannot use the embedding cache: {err}",
                                 source=self.path) from None

    def lookup(self, texts: Sequence[str]):
        """(vectors, hits): float32 rows for every text (zeros where missed) and the hit mask."""
        import numpy as np

        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        hits = np.zeros(len(texts), dtype=bool)
        rows_of: dict[bytes, list[int]] = {}
        for row, text in enumerate(texts):
            rows_of.setdefault(text_key(text), []).append(row)
        keys = list(rows_of)
        width = self.dim * 4
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            query = (f"SELECT key, vector FROM vectors WHERE space = ? AND key IN "
                     f"({','.join('?' * len(chunk))})")
            with self._lock:
                found = self._db.execute(query, (self.space, *chunk)).fetchall()
            for key, blob in found:
                if len(blob) != width:
                    continue  # written with another dim: a miss, overwritten on store
                rows = rows_of[key]
                vectors[rows] = np.frombuffer(blob, dtype=np.float32)
                hits[rows] = True
        self.hits += int(hits.sum())
        return vectors, hits

    def misses(self, texts: Sequence[str]):
        """(vectors, missing): the hits filled in (zeros elsewhere) and the rows to embed."""
        import numpy as np

        vectors, hits = self.lookup(texts)
        return vectors, np.flatnonzero(~hits)

    def encode(self, texts: Sequence[str], embed):
        """Vectors for `texts`: the cached ones, `embed(missed texts)` for the rest (stored)."""
        vectors, missing = self.misses(texts)
        if len(missing):
            fresh = embed([texts[i] for i in missing])
            self.store([texts[i] for i in missing], fresh)
            vectors[missing] = fresh
        return vectors

    def store(self, texts: Sequence[str], vectors) -> None:
        """Remember `vectors[i]` for `texts[i]` (float32 rows of this cache's dim)."""
        import numpy as np

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(texts) != len(vectors) or (len(vectors) and vectors.shape[1] != self.dim):
            raise ValueError("texts and vectors do not match the cache's shape")
        rows = [(self.space, text_key(text), vector.tobytes())
                for text, vector in zip(texts, vectors)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.stored += len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
