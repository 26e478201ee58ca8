"""Embedded backend: SQLite is the source of truth, a numpy matrix in memory answers queries.

Every batch is one SQLite transaction (WAL), so a killed process loses nothing that was committed
and a re-run continues without duplicates (the primary key is the deterministic doc id).

`search_mode="approx"` (opt-in) answers from an IVF structure (clipsearch/index/ann.py) that is a
cache over the matrix: rebuilt from SQLite when missing or stale, persisted beside the database.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import ConfigError, NotFound
from clipsearch.index import ann as ann_mod
from clipsearch.index.base import (
    Document,
    Hit,
    IndexInfo,
    UpsertResult,
    check_model,
    check_query,
)

SCHEMA_VERSION = 1
DB_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    bucket TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL DEFAULT '',
    content_hash TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    mtime REAL NOT NULL DEFAULT 0,
    width INTEGER NOT NULL DEFAULT 0,
    height INTEGER NOT NULL DEFAULT 0,
    indexed_at REAL NOT NULL DEFAULT 0,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_key ON images (key);
"""

_COLUMNS = "id, key, bucket, title, content_hash, size, mtime, width, height, indexed_at"
SEARCH_MODES = ("exact", "approx")
# Each write transaction bumps this, so a persisted ANN structure can tell whether it is stale.
_BUMP_GENERATION = ("INSERT INTO meta (name, value) VALUES ('generation', '1') ON CONFLICT(name) "
                    "DO UPDATE SET value = CAST(value AS INTEGER) + 1")


class EmbeddedIndex:
    """A VectorIndex in a directory: `index.sqlite` plus an in-memory float32 matrix."""

    backend = "embedded"

    def __init__(self, directory: str | Path, model: str | None = None, dim: int | None = None,
                 search_mode: str = "exact", ann: dict[str, Any] | None = None) -> None:
        """Open or create the index; search_mode="approx" opts into the ANN structure (`ann`: its options)."""
        if search_mode not in SEARCH_MODES:
            raise ConfigError(f"unknown search mode {search_mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        self.search_mode = search_mode
        self._ann_options = ann_mod.AnnOptions.from_dict(ann)
        self._ann: ann_mod.AnnIndex | None = None
        self._ann_reloads = -1  # the matrix load the ANN structure's row numbers refer to
        self._ann_saved = -1  # generation of the persisted copy
        self._replaced: set[int] = set()  # rows updated in place since the last ANN sync
        self._reloads = 0
        self._key_order: tuple[np.ndarray, np.ndarray] | None = None
        self.directory = Path(directory).expanduser()
        db_path = self.directory / DB_NAME
        if not db_path.exists():
            if model is None or dim is None:
                raise NotFound(f"no index at {self.directory}; run `clipsearch index PATH` first")
            self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._tx():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
            if not meta:
                assert model is not None and dim is not None
                self._db.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("model", model), ("dim", str(dim)),
                     ("created_at", str(time.time()))],
                )
                meta = {"model": model, "dim": str(dim)}
        self.model = meta["model"]
        self.dim = int(meta["dim"])
        check_model(self.model, self.dim, model, dim)
        self._data_version = -1
        self._load_matrix()

    # -- transactions -------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def _load_matrix(self) -> None:
        """(Re)build the in-memory matrix from SQLite, the source of truth, from one read snapshot."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                n = int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
                self._generation = self._read_generation()
                ids: list[str] = []
                keys: list[str] = []
                self._buffer = np.empty((max(n, 1024), self.dim), dtype=np.float32)
                cursor = self._db.execute("SELECT id, key, vector FROM images ORDER BY rowid")
                # In chunks: a million 4 KB blobs fetched at once would double the peak memory.
                while rows := cursor.fetchmany(8192):
                    start = len(ids)
                    ids.extend(r[0] for r in rows)
                    keys.extend(r[1] for r in rows)
                    block = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
                    self._buffer[start:start + len(rows)] = block.reshape(len(rows), self.dim)
                self._data_version = self._current_version()
            finally:
                self._db.execute("COMMIT")
            self._ids = ids
            self._keys = np.array(keys, dtype=object)
            self._matrix = self._buffer[: len(ids)]
            self._row = {id_: i for i, id_ in enumerate(self._ids)}
            self._reloads += 1
            self._replaced.clear()
            self._key_order = None

    def _read_generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _current_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _refresh_if_changed(self) -> None:
        # data_version changes when another connection (another process) commits.
        if self._current_version() != self._data_version:
            self._load_matrix()

    # -- writes -------------------------------------------------------------------------------

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        result = UpsertResult()
        rows = []
        now = time.time()
        for d in docs:
            vec = np.asarray(d.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                result.failed[d.id] = f"vector has dimension {vec.shape[0]}, index has {self.dim}"
                continue
            rows.append((d.id, d.key, d.bucket, d.title, d.content_hash, d.size, d.mtime, d.width,
                         d.height, d.indexed_at or now, vec.tobytes()))
        if rows:
            with self._tx():
                self._db.executemany(
                    f"INSERT OR REPLACE INTO images ({_COLUMNS}, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute(_BUMP_GENERATION)
                generation = self._read_generation()
            self._load_matrix_delta(rows, generation)
        result.written = len(rows)
        return result

    def _load_matrix_delta(self, rows: list[tuple], generation: int) -> None:
        with self._lock:
            self._generation = generation
            new_ids: list[str] = []
            new_keys: list[str] = []
            new_vecs: list[np.ndarray] = []
            for r in rows:
                vec = np.frombuffer(r[-1], dtype=np.float32)
                i = self._row.get(r[0])
                if i is not None:
                    self._matrix[i] = vec
                    self._keys[i] = r[1]
                    self._replaced.add(i)
                else:
                    self._row[r[0]] = len(self._ids) + len(new_ids)
                    new_ids.append(r[0])
                    new_keys.append(r[1])
                    new_vecs.append(vec)
            if new_ids:
                n, extra = len(self._ids), len(new_ids)
                if n + extra > self._buffer.shape[0]:
                    # Grow geometrically so bulk loads stay linear; searches use a view of the filled rows.
                    grown = np.empty((max(2 * self._buffer.shape[0], n + extra), self.dim), np.float32)
                    grown[:n] = self._buffer[:n]
                    self._buffer = grown
                self._buffer[n:n + extra] = np.stack(new_vecs)
                self._ids = self._ids + new_ids
                self._keys = np.concatenate([self._keys, np.array(new_keys, dtype=object)])
                self._matrix = self._buffer[: n + extra]
                self._key_order = None
            self._data_version = self._current_version()

    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        with self._tx():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
            removed = self._db.total_changes - before
            if removed:
                self._db.execute(_BUMP_GENERATION)
        if removed:
            self._load_matrix()
        return removed

    # -- reads --------------------------------------------------------------------------------

    def get(self, id: str) -> Document | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS}, vector FROM images WHERE id = ?", (id,)).fetchone()
        if row is None:
            return None
        return Document(
            key=row[1], bucket=row[2], title=row[3], content_hash=row[4], size=row[5], mtime=row[6],
            width=row[7], height=row[8], indexed_at=row[9],
            vector=np.frombuffer(row[10], dtype=np.float32).copy(),
        )

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        prefix: str | None = None,
    ) -> list[Hit]:
        q = check_query(vector, self.dim, k, offset)
        want = offset + k
        found: tuple[np.ndarray, np.ndarray] | None = None
        with self._lock:
            self._refresh_if_changed()
            matrix, ids = self._matrix, self._ids
            allowed = self._prefix_rows(prefix) if prefix else None
            if self.search_mode == "approx" and self._approx_pays(len(ids), allowed):
                # Under the lock: syncing mutates the structure. None: it cannot beat a scan here.
                found = self._ann_search(q, want, matrix, allowed)
        if not ids:
            return []
        top, scores = found if found is not None else _exact_top(matrix, q, want, allowed)
        # Ties broken by id so both backends and repeated runs agree.
        order = sorted(range(len(top)), key=lambda i: (-float(scores[i]), ids[top[i]]))[offset:want]
        rows = [int(top[i]) for i in order]
        hit_scores = [float(scores[i]) for i in order]
        if min_score is not None:
            kept = [(r, s) for r, s in zip(rows, hit_scores, strict=True) if s >= min_score]
            rows, hit_scores = [r for r, _ in kept], [s for _, s in kept]
        return self._hits(rows, hit_scores, ids)

    def _prefix_rows(self, prefix: str) -> np.ndarray:
        """Rows whose key starts with prefix, ascending: two binary searches in the sorted keys."""
        if self._key_order is None:  # sorted once after each batch of new keys
            order = np.argsort(self._keys, kind="stable")
            self._key_order = (order, self._keys[order])
        order, sorted_keys = self._key_order
        lo = int(np.searchsorted(sorted_keys, np.array([prefix], dtype=object))[0])
        end = _prefix_end(prefix)
        hi = len(order) if end is None else int(np.searchsorted(sorted_keys, np.array([end], dtype=object))[0])
        return np.sort(order[lo:hi])

    # -- approximate mode ---------------------------------------------------------------------

    def _approx_pays(self, n: int, allowed: np.ndarray | None) -> bool:
        """Small collections and narrow filters are answered exactly: a scan of them is already fast."""
        floor = self._ann_options.min_rows
        return n >= floor and (allowed is None or len(allowed) > max(floor, n // 8))

    def _ann_search(self, q: np.ndarray, want: int, matrix: np.ndarray,
                    allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        ann = self._synced_ann(matrix)
        if not ann.useful:
            return None
        mask = None
        if allowed is not None:
            mask = np.zeros(matrix.shape[0], dtype=bool)
            mask[allowed] = True
        return ann.search(q, want, matrix, mask)

    def _synced_ann(self, matrix: np.ndarray) -> ann_mod.AnnIndex:
        """The ANN structure in step with the matrix: loaded, built, re-filled or topped up as needed."""
        ann, n = self._ann, matrix.shape[0]
        if ann is None or n > 4 * ann.trained_count:  # lists trained on far fewer rows: retrain
            ann = self._load_or_build_ann(matrix)
        elif self._ann_reloads != self._reloads:  # rows renumbered (a delete, another process)
            ann.reset(matrix)
        else:
            if self._replaced:
                rows = np.array(sorted(self._replaced), dtype=np.int64)
                ann.replace(rows, matrix[rows])
            if ann.count < n:
                ann.append(matrix[ann.count:n], ann.count)
        self._replaced.clear()
        self._ann, self._ann_reloads = ann, self._reloads
        return ann

    def _ann_header(self) -> ann_mod.AnnHeader:
        return ann_mod.AnnHeader(generation=self._generation, count=len(self._ids), dim=self.dim,
                                 ids_digest=ann_mod.ids_digest(self._ids), options=asdict(self._ann_options))

    def _load_or_build_ann(self, matrix: np.ndarray) -> ann_mod.AnnIndex:
        header = self._ann_header()
        path = self.directory / ann_mod.FILE_NAME
        ann = ann_mod.AnnIndex.load(path, header, self._ann_options) if self._ann_options.persist else None
        if ann is not None:
            self._ann_saved = header.generation
            return ann
        ann = ann_mod.AnnIndex.build(matrix, self._ann_options)
        self._save_ann(ann, header)
        return ann

    def _save_ann(self, ann: ann_mod.AnnIndex, header: ann_mod.AnnHeader) -> None:
        if not self._ann_options.persist:
            return
        try:
            ann.save(self.directory / ann_mod.FILE_NAME, header)
        except OSError:
            return  # a read-only index directory: the structure is a cache, rebuilt on next open
        self._ann_saved = header.generation

    def _hits(self, rows: list[int], scores: list[float], ids: list[str]) -> list[Hit]:
        if not rows:
            return []
        wanted = [ids[r] for r in rows]
        marks = ",".join("?" * len(wanted))
        with self._lock:
            found = {
                r[0]: r
                for r in self._db.execute(
                    f"SELECT id, key, title, bucket, width, height FROM images WHERE id IN ({marks})", wanted
                )
            }
        hits = []
        for id_, score in zip(wanted, scores, strict=True):
            r = found.get(id_)
            if r is not None:
                hits.append(Hit(id=id_, key=r[1], score=max(-1.0, min(1.0, score)), title=r[2],
                                bucket=r[3], width=r[4], height=r[5]))
        return hits

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, size, mtime FROM images WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
        return {r[0]: (int(r[1]), float(r[2])) for r in rows}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def info(self) -> IndexInfo:
        n = self.count()
        extra: dict[str, Any] = {"bytes_per_vector": self.dim * 4, "path": str(self.directory / DB_NAME),
                                 "search_mode": self.search_mode}
        with self._lock:
            if self._ann is not None:
                extra.update(self._ann.info())
        return IndexInfo(backend=self.backend, name=str(self.directory), model=self.model, dim=self.dim,
                         count=n, extra=extra)

    def close(self) -> None:
        with self._lock:
            if self._ann is not None and self._ann_options.persist and self._ann_saved != self._generation:
                self._refresh_if_changed()
                self._save_ann(self._synced_ann(self._matrix), self._ann_header())
            self._db.close()


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with prefix (None: there is none)."""
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


def _exact_top(matrix: np.ndarray, q: np.ndarray, want: int,
               allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The `want` best rows by inner product (in no order) and their scores; `allowed`: rows to consider."""
    if allowed is None:
        scores = matrix @ q
    elif 4 * len(allowed) < matrix.shape[0]:
        # A narrow filter: score only its rows, gathered in blocks so no big copy is made.
        scores = np.empty(len(allowed), dtype=np.float32)
        for start in range(0, len(allowed), 16384):
            block = allowed[start:start + 16384]
            scores[start:start + len(block)] = matrix[block] @ q
    else:
        scores = (matrix @ q)[allowed]
    n = len(scores)
    top = np.argpartition(scores, n - want)[n - want:] if want < n else np.arange(n)
    return (top if allowed is None else allowed[top]), scores[top]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the index lock; ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
