"""Embedded backend: SQLite is the source of truth, a numpy matrix in memory answers queries.

Every batch is one SQLite transaction (WAL), so a killed process loses nothing that was committed
and a re-run continues without duplicates (the primary key is the deterministic doc id).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.errors import NotFound
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


class EmbeddedIndex:
    """A VectorIndex in a directory: `index.sqlite` plus an in-memory float32 matrix."""

    backend = "embedded"

    def __init__(self, directory: str | Path, model: str | None = None, dim: int | None = None) -> None:
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
        """(Re)build the in-memory matrix from SQLite, the source of truth."""
        with self._lock:
            rows = self._db.execute("SELECT id, key, vector FROM images ORDER BY rowid").fetchall()
            self._ids = [r[0] for r in rows]
            self._keys = np.array([r[1] for r in rows], dtype=object)
            self._buffer = np.empty((max(len(rows), 1024), self.dim), dtype=np.float32)
            for i, r in enumerate(rows):
                self._buffer[i] = np.frombuffer(r[2], dtype=np.float32)
            self._matrix = self._buffer[: len(rows)]
            self._row = {id_: i for i, id_ in enumerate(self._ids)}
            self._data_version = self._current_version()

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
            self._load_matrix_delta(rows)
        result.written = len(rows)
        return result

    def _load_matrix_delta(self, rows: list[tuple]) -> None:
        with self._lock:
            new_ids: list[str] = []
            new_keys: list[str] = []
            new_vecs: list[np.ndarray] = []
            for r in rows:
                vec = np.frombuffer(r[-1], dtype=np.float32)
                i = self._row.get(r[0])
                if i is not None:
                    self._matrix[i] = vec
                    self._keys[i] = r[1]
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
            self._data_version = self._current_version()

    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        with self._tx():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
            removed = self._db.total_changes - before
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
        with self._lock:
            self._refresh_if_changed()
            matrix, ids, keys = self._matrix, self._ids, self._keys
        if not ids:
            return []
        scores = matrix @ q
        candidates: np.ndarray | None = None
        if prefix:
            candidates = np.flatnonzero([key.startswith(prefix) for key in keys])
            scores = scores[candidates]
        want = offset + k
        if want < scores.shape[0]:
            top = np.argpartition(-scores, want - 1)[:want]
        else:
            top = np.arange(scores.shape[0])
        # Ties broken by id so both backends and repeated runs agree.
        order = sorted(top.tolist(), key=lambda i: (-float(scores[i]), ids[i if candidates is None
                                                                          else candidates[i]]))
        picked = order[offset:want]
        rows = [int(i if candidates is None else candidates[i]) for i in picked]
        hit_scores = [float(scores[i]) for i in picked]
        if min_score is not None:
            kept = [(r, s) for r, s in zip(rows, hit_scores, strict=True) if s >= min_score]
            rows, hit_scores = [r for r, _ in kept], [s for _, s in kept]
        return self._hits(rows, hit_scores, ids)

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
        return IndexInfo(
            backend=self.backend, name=str(self.directory), model=self.model, dim=self.dim, count=n,
            extra={"bytes_per_vector": self.dim * 4, "path": str(self.directory / DB_NAME)},
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
