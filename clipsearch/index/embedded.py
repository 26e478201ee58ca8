"""Embedded backend: SQLite is the source of truth, a numpy matrix in memory answers queries.

Every batch is one SQLite transaction (WAL), so a killed process loses nothing that was committed
and a re-run continues without duplicates (the primary key is the deterministic doc id).

`search_mode="approx"` (opt-in) answers from an IVF structure (clipsearch/index/ann.py) that is a
cache over the matrix: rebuilt from SQLite when missing or stale, persisted beside the database.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from clipsearch.errors import (
    BadRequest,
    ClipsearchError,
    ConfigError,
    IndexCorrupt,
    IndexReadOnly,
    IndexUnavailable,
    NotFound,
)
from clipsearch.index import ann as ann_mod
from clipsearch.index.base import (
    DateRange,
    Document,
    Hit,
    IndexInfo,
    UpsertResult,
    check_model,
    check_query,
    check_schema,
    doc_id,
    document_from,
    query_words,
)

# 1: the first release. 2: images.taken_at (wall-clock "YYYY-MM-DDTHH:MM:SS", NULL: not read yet) and
# images.taken_offset. 3: images_fts, the word index of titles and keys for hybrid search (_migrate_fts);
# images.phash (the perceptual hash, NULL: not computed yet) and an index on content_hash (the sha256), for
# the duplicate scan (_migrate_hashes). An older file is migrated when it is opened for writing (`index`,
# `forget`, `check --repair`), never by a read-only open (`search`, `stats`, `serve`); a newer one is refused.
SCHEMA_VERSION = 3
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
    vector BLOB NOT NULL,
    taken_at TEXT,
    taken_offset TEXT NOT NULL DEFAULT '',
    phash TEXT
);
CREATE INDEX IF NOT EXISTS images_key ON images (key);
CREATE INDEX IF NOT EXISTS images_content_hash ON images (content_hash);
"""

_COLUMNS = "id, key, bucket, title, content_hash, size, mtime, width, height, indexed_at"
_DATE_COLUMNS = "taken_at, taken_offset"  # schema 2


def _migrate_hashes(db: sqlite3.Connection) -> None:
    """Schema 3, the duplicates' part: images.phash and an index on content_hash. Idempotent."""
    if "phash" not in {row[1] for row in db.execute("PRAGMA table_info(images)")}:
        db.execute("ALTER TABLE images ADD COLUMN phash TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS images_content_hash ON images (content_hash)")


# The word index (schema 3): an FTS5 table whose rowid is the images row's, kept in step by triggers, so
# every writer (upsert's INSERT OR REPLACE, delete, a repair's copy) updates it in the same transaction.
# INSERT OR REPLACE fires no DELETE trigger unless recursive_triggers is on
# (https://www.sqlite.org/lang_conflict.html), so a BEFORE INSERT trigger drops the replaced row's entry.
# The entry also carries the id, and searches join on it: a VACUUM may renumber rowids, and then a stale
# entry could only repeat a document, never name another one.
_FTS_STATEMENTS = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(id UNINDEXED, title, key, "
    "tokenize = 'unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS images_fts_replace BEFORE INSERT ON images BEGIN "
    "DELETE FROM images_fts WHERE rowid = (SELECT rowid FROM images WHERE id = new.id); END",
    "CREATE TRIGGER IF NOT EXISTS images_fts_insert AFTER INSERT ON images BEGIN "
    "INSERT INTO images_fts (rowid, id, title, key) VALUES (new.rowid, new.id, new.title, new.key); END",
    "CREATE TRIGGER IF NOT EXISTS images_fts_delete AFTER DELETE ON images BEGIN "
    "DELETE FROM images_fts WHERE rowid = old.rowid; END",
    "CREATE TRIGGER IF NOT EXISTS images_fts_update AFTER UPDATE OF title, key ON images BEGIN "
    "DELETE FROM images_fts WHERE rowid = old.rowid; "
    "INSERT INTO images_fts (rowid, id, title, key) VALUES (new.rowid, new.id, new.title, new.key); END",
    # The back-fill: the whole table again, so the step is idempotent (a re-run rebuilds the same entries).
    "DELETE FROM images_fts",
    "INSERT INTO images_fts (rowid, id, title, key) SELECT rowid, id, title, key FROM images",
]
LEXICAL_SCHEMA = 3  # the first schema with images_fts
_MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    # version -> the statements (or step functions) that bring a file of that version to the next one
    1: [
        "ALTER TABLE images ADD COLUMN taken_at TEXT",
        "ALTER TABLE images ADD COLUMN taken_offset TEXT NOT NULL DEFAULT ''",
    ],
    2: [_migrate_hashes, *_FTS_STATEMENTS],
}
SEARCH_MODES = ("exact", "approx")
# Each write transaction bumps this, so a persisted ANN structure can tell whether it is stale.
_BUMP_GENERATION = (
    "INSERT INTO meta (name, value) VALUES ('generation', '1') ON CONFLICT(name) "
    "DO UPDATE SET value = CAST(value AS INTEGER) + 1"
)
BUSY_TIMEOUT_S = 10  # how long a writer waits for another writer's lock before giving up


# Keys are paths as the OS spells them: a name that is not valid UTF-8 (a Latin-1 `café.png`) is a str
# with lone surrogates (os.fsdecode), which sqlite3 cannot bind as TEXT. A key is bound as its raw bytes
# and stored with CAST(? AS TEXT), and every connection reads TEXT back through surrogateescape, so the
# key names the same file again; a valid UTF-8 key is stored exactly as before.
def key_param(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def text_from_db(data: bytes) -> str:
    """The connections' text_factory: invalid UTF-8 in a stored key comes back surrogate-escaped."""
    return data.decode("utf-8", "surrogateescape")


# SQLite's primary result codes (https://www.sqlite.org/rescode.html); extended codes keep them in the low byte.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26

_F = TypeVar("_F", bound=Callable[..., Any])


def repair_command(directory: Path) -> str:
    return f"clipsearch check --repair --index {shlex.quote(str(directory))}"


def storage_error(e: sqlite3.Error, path: Path) -> ClipsearchError:
    """One clear line, and the typed error that gives its exit code, for an sqlite3 error on `path`."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(e) or type(e).__name__
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return IndexCorrupt(f"the index {path} is damaged ({detail}); run `{repair_command(path.parent)}`")
    if primary == _SQLITE_FULL or (primary == _SQLITE_IOERR and _disk_full(path.parent)):
        return IndexUnavailable(
            f"the disk holding the index {path} is full; free some space and re-run (what was committed is kept)"
        )
    if primary == _SQLITE_IOERR:
        return IndexUnavailable(f"I/O error on the index {path} ({detail}); check the disk, then re-run")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return IndexUnavailable(
            f"the index {path} is locked by another process (waited {BUSY_TIMEOUT_S} s); re-run when it has finished"
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM):
        return IndexReadOnly(
            f"the index {path} is read-only ({detail}); it can be searched, but indexing "
            "needs a writable --index folder"
        )
    if primary == _SQLITE_CANTOPEN:
        return ConfigError(f"cannot open the index {path} ({detail}); check that its folder exists and can be read")
    return IndexUnavailable(f"the index {path} failed ({detail})")


def _disk_full(directory: Path) -> bool:
    """Whether the disk is (about) full: SQLite reports a -shm it cannot grow as an I/O error."""
    try:
        return shutil.disk_usage(directory).free < 1024 * 1024
    except OSError:
        return False


def _sqlite_errors(method: _F) -> _F:
    """Turn any sqlite3 error raised by an EmbeddedIndex method into a typed error with one line."""

    @functools.wraps(method)
    def wrapper(self: EmbeddedIndex, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise storage_error(e, self.path) from None

    return cast(_F, wrapper)


def _writable(directory: Path) -> bool:
    """Whether SQLite can create and write files here (False on a read-only mount, even for root)."""
    names = [DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"]
    return os.access(directory, os.W_OK) and all(
        os.access(directory / n, os.W_OK) for n in names if (directory / n).exists()
    )


def _wal_has_content(db_path: Path) -> bool:
    try:
        return os.path.getsize(str(db_path) + "-wal") > 0
    except OSError:
        return False


def _read_only_mount(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _connect_read_only(db_path: Path) -> sqlite3.Connection:
    return _open_read_only(db_path)[0]


def _open_read_only(db_path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection that never writes, and whether it is `immutable=1` (blind to later commits).

    `mode=ro` comes first: it sees other processes' commits. In WAL mode it needs the -shm file, which it
    creates when missing (refused by a read-only mount, a full disk or a folder the reader cannot write);
    where the -wal and -shm exist and can be read it needs no write at all ("WAL mode read-only" in
    https://www.sqlite.org/wal.html). `immutable=1` reads without them, and is used only on a read-only
    mount (nothing can change the file there) or where `mode=ro` fails; it is safe only when no -wal holds
    commits not yet in the database file (https://www.sqlite.org/uri.html), and it never notices another
    writer's commits: EmbeddedIndex reopens such a connection when the file's size, mtime or inode change.
    """
    uri = "file:" + urllib.parse.quote(os.fsencode(db_path.absolute()))
    immutable = _read_only_mount(db_path.parent) and not _wal_has_content(db_path)
    for flag in ["immutable=1"] if immutable else ["mode=ro", "immutable=1"]:
        db = sqlite3.connect(
            f"{uri}?{flag}", uri=True, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
        )
        db.text_factory = text_from_db
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the WAL and -shm now
            return db, flag == "immutable=1"
        except sqlite3.OperationalError as e:
            db.close()
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            retry = code in (_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_READONLY)
            if flag == "immutable=1" or not retry:
                raise
            if _wal_has_content(db_path):
                raise IndexReadOnly(
                    f"the index {db_path} has commits in its -wal file that SQLite can only "
                    "read where it may write: open it once from a writable folder"
                ) from None
    raise AssertionError("unreachable")


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a writer changes the database file itself: (size, mtime_ns, inode)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _read_meta(db: sqlite3.Connection) -> dict[str, str] | None:
    """The meta record, or None when the file holds no index schema yet (empty or half-created)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "images"} <= tables:
        return None
    return {str(k): str(v) for k, v in db.execute("SELECT name, value FROM meta")}


def _schema_version(meta: dict[str, str]) -> int:
    try:
        return int(meta.get("schema_version", "1"))
    except ValueError:
        return SCHEMA_VERSION + 1  # not a number this code wrote: treat it as from a newer release


def _migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION inside the caller's write transaction; returns the old version.

    ADD COLUMN only edits the table definition (https://www.sqlite.org/lang_altertable.html), so this is
    instant whatever the index's size; the new columns read as NULL until `index` fills them.
    """
    meta = _read_meta(db) or {}
    found = _schema_version(meta)
    version = found
    while version < SCHEMA_VERSION:
        for step in _MIGRATIONS[version]:
            if isinstance(step, str):
                db.execute(step)
            else:
                step(db)
        version += 1
    if found < SCHEMA_VERSION:
        db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)", (str(version),))
    return found


def _migrate_fts(db: sqlite3.Connection) -> None:
    """Create the word index of titles and keys and its triggers, and fill it from the images table.

    Idempotent, inside the caller's write transaction. The back-fill reads every title and key once
    (no vectors): 1.2 s for 100,000 rows measured on the 2-core development machine (AMD EPYC, shared).
    """
    for stmt in _FTS_STATEMENTS:
        db.execute(stmt)


class EmbeddedIndex:
    """A VectorIndex in a directory: `index.sqlite` plus an in-memory float32 matrix."""

    backend = "embedded"

    def __init__(
        self,
        directory: str | Path,
        model: str | None = None,
        dim: int | None = None,
        search_mode: str = "exact",
        ann: dict[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        """Open or create the index; search_mode="approx" opts into the ANN structure (`ann`: its options).

        read_only: open for searching only; nothing is created, migrated or written, so a read-only mount,
        a shared copy or a full disk can still be searched.
        """
        if search_mode not in SEARCH_MODES:
            raise ConfigError(f"unknown search mode {search_mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        self.search_mode = search_mode
        self.read_only = read_only
        self._ann_options = ann_mod.AnnOptions.from_dict(ann)
        self._ann: ann_mod.AnnIndex | None = None
        self._ann_reloads = -1  # the matrix load the ANN structure's row numbers refer to
        self._ann_saved = -1  # generation of the persisted copy
        self._replaced: set[int] = set()  # rows updated in place since the last ANN sync
        self._reloads = 0
        self._key_order: tuple[np.ndarray, np.ndarray] | None = None
        self._unreadable: dict[str, str] = {}  # id -> key of rows whose stored vector is unusable
        self.directory = Path(directory).expanduser()
        self.path = self.directory / DB_NAME
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"the index {self.directory} is a file; --index takes a folder")
        if not self.path.exists():
            if read_only or model is None or dim is None:
                raise NotFound(f"no index at {self.directory}; run `clipsearch index PATH` first")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise IndexReadOnly(f"cannot create the index folder {self.directory}: {e.strerror or e}") from None
        elif not read_only and not _writable(self.directory):
            raise IndexReadOnly(
                f"the index {self.directory} is on a read-only folder or mount; it can be "
                "searched, but indexing needs a writable --index folder"
            )
        self._lock = threading.RLock()
        self._db, meta, self._identity, self._stamp = self._open(model, dim)
        self.model = meta["model"]
        self.dim = int(meta["dim"])
        try:
            check_model(self.model, self.dim, model, dim)
            self._data_version = -1
            self._load_matrix()
        except BaseException as e:
            self._db.close()
            if isinstance(e, sqlite3.Error):
                raise storage_error(e, self.path) from None
            raise

    def _open(
        self, model: str | None, dim: int | None
    ) -> tuple[sqlite3.Connection, dict[str, str], tuple[int, int], tuple[int, int, int] | None]:
        """Connect and read (or, writable and given a model, create) the meta record; the file's identity;
        and, for an `immutable=1` connection, the file's stamp (see _follow_replacement)."""
        db: sqlite3.Connection | None = None
        stamp: tuple[int, int, int] | None = None
        try:
            if self.read_only:
                before = _stamp(self.path)  # taken first: a commit after it shows as a change
                db, immutable = _open_read_only(self.path)
                stamp = before if immutable else None
            else:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.text_factory = text_from_db
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino)
            meta = _read_meta(db)
            if meta is not None and {"model", "dim"} <= meta.keys():
                check_schema(_schema_version(meta), SCHEMA_VERSION, f"the index {self.directory}")
                if not self.read_only and _schema_version(meta) < SCHEMA_VERSION:
                    with _Transaction(db, self._lock):
                        _migrate(db)  # re-reads the version under the write lock: another writer may be first
                    meta = _read_meta(db) or meta
                return db, meta, identity, stamp
            # An empty or half-created file (a crash while creating it) is treated as a new index.
            if self.read_only or model is None or dim is None:
                raise NotFound(
                    f"the index at {self.directory} is empty (a run stopped while creating it); "
                    "run `clipsearch index PATH` to build it"
                )
            with _Transaction(db, self._lock):
                # Another process may have created the index since the read above: use its record.
                found = _read_meta(db)
                if found is not None and {"model", "dim"} <= found.keys():
                    check_schema(_schema_version(found), SCHEMA_VERSION, f"the index {self.directory}")
                    return db, found, identity, stamp
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "images" in tables and db.execute("SELECT COUNT(*) FROM images").fetchone()[0]:
                    raise IndexCorrupt(
                        f"the index {self.path} has pictures but no model record; run "
                        f"`{repair_command(self.directory)}`"
                    )
                db.execute("DROP TABLE IF EXISTS images")  # whatever a crash left of the schema
                db.execute("DROP TABLE IF EXISTS images_fts")
                db.execute("DROP TABLE IF EXISTS meta")
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                _migrate_fts(db)
                db.executemany(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("model", model),
                        ("dim", str(dim)),
                        ("created_at", str(time.time())),
                    ],
                )
            return db, {"model": model, "dim": str(dim), "schema_version": str(SCHEMA_VERSION)}, identity, stamp
        except BaseException as e:
            if db is not None:
                db.close()
            if isinstance(e, sqlite3.Error):
                raise storage_error(e, self.path) from None
            if isinstance(e, OSError):
                raise IndexUnavailable(f"cannot read the index {self.path}: {e.strerror or e}") from None
            raise

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
                schema = _schema_version(_read_meta(self._db) or {})
                ids: list[str] = []
                keys: list[str] = []
                taken: list[str | None] = []
                self._buffer = np.empty((max(n, 1024), self.dim), dtype=np.float32)
                dated = ", taken_at" if schema >= 2 else ""
                cursor = self._db.execute(f"SELECT id, key, vector{dated} FROM images ORDER BY rowid")
                # In chunks: a million 4 KB blobs fetched at once would double the peak memory.
                unreadable: dict[str, str] = {}
                while rows := cursor.fetchmany(8192):
                    rows = _usable_rows(rows, self.dim, unreadable)
                    start = len(ids)
                    ids.extend(r[0] for r in rows)
                    keys.extend(r[1] for r in rows)
                    if dated:
                        taken.extend(r[3] for r in rows)
                    block = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
                    self._buffer[start : start + len(rows)] = block.reshape(len(rows), self.dim)
                self._data_version = self._current_version()
            finally:
                self._db.execute("COMMIT")
            self._ids = ids
            self._unreadable = unreadable
            self._keys = np.array(keys, dtype=object)
            self._schema = schema
            # Capture times as numbers for the date filter's mask; NaT (never in range): not known yet.
            self._taken = np.array(taken if dated else [None] * len(ids), dtype="datetime64[s]")
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
        if self._follow_replacement() or self._current_version() != self._data_version:
            self._load_matrix()

    def _follow_replacement(self) -> bool:
        """Reopen when the index file was replaced (deleted and re-created, moved aside by a repair).

        A long-lived reader (`serve`) would otherwise keep answering from the old file, which its open
        connection keeps alive. The new file must hold an index of the same model and dimension. An
        `immutable=1` connection is also reopened when the file's size, mtime or inode change: it would
        otherwise never see another process's commits (PRAGMA data_version stays the same).
        """
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # deleted and not re-created (yet): keep answering from what is open
        if (st.st_dev, st.st_ino) == self._identity and (
            self._stamp is None or self._stamp == (st.st_size, st.st_mtime_ns, st.st_ino)
        ):
            return False
        try:
            db, meta, identity, stamp = self._open(None, None)
        except NotFound:
            return False  # still being created: keep the old one until it has its model record
        if (meta["model"], int(meta["dim"])) != (self.model, self.dim):
            db.close()
            raise IndexUnavailable(
                f"the index {self.directory} was replaced by one built with model "
                f"{meta['model']!r} (dim {meta['dim']}); this server encodes with "
                f"{self.model!r}: restart it"
            )
        old, self._db, self._identity, self._stamp = self._db, db, identity, stamp
        old.close()
        return True

    # -- writes -------------------------------------------------------------------------------

    @_sqlite_errors
    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        result = UpsertResult()
        rows = []
        now = time.time()
        for d in docs:
            vec = np.asarray(d.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                result.failed[d.id] = f"vector has dimension {vec.shape[0]}, index has {self.dim}"
                continue
            if not np.isfinite(vec).all():
                result.failed[d.id] = "vector has non-finite values (NaN or infinity); not stored"
                continue
            rows.append(
                (
                    d.id,
                    d.key,
                    d.bucket,
                    d.title,
                    d.content_hash,
                    d.size,
                    d.mtime,
                    d.width,
                    d.height,
                    d.indexed_at or now,
                    d.taken_at,
                    d.taken_offset,
                    d.phash,
                    vec.tobytes(),
                )
            )
        if rows:
            self._check_writable_schema()
            with self._tx():
                self._db.executemany(
                    f"INSERT OR REPLACE INTO images ({_COLUMNS}, {_DATE_COLUMNS}, phash, vector) "
                    "VALUES (?, CAST(? AS TEXT), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(r[0], key_param(r[1]), *r[2:]) for r in rows],
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
            new_taken: list[str | None] = []
            new_vecs: list[np.ndarray] = []
            for r in rows:
                vec = np.frombuffer(r[-1], dtype=np.float32)
                self._unreadable.pop(r[0], None)
                i = self._row.get(r[0])
                if i is not None:
                    self._matrix[i] = vec
                    self._keys[i] = r[1]
                    self._taken[i] = np.datetime64(r[10], "s") if r[10] else np.datetime64("NaT")
                    self._replaced.add(i)
                else:
                    self._row[r[0]] = len(self._ids) + len(new_ids)
                    new_ids.append(r[0])
                    new_keys.append(r[1])
                    new_taken.append(r[10])
                    new_vecs.append(vec)
            if new_ids:
                n, extra = len(self._ids), len(new_ids)
                if n + extra > self._buffer.shape[0]:
                    # Grow geometrically so bulk loads stay linear; searches use a view of the filled rows.
                    grown = np.empty((max(2 * self._buffer.shape[0], n + extra), self.dim), np.float32)
                    grown[:n] = self._buffer[:n]
                    self._buffer = grown
                self._buffer[n : n + extra] = np.stack(new_vecs)
                self._ids = self._ids + new_ids
                self._keys = np.concatenate([self._keys, np.array(new_keys, dtype=object)])
                self._taken = np.concatenate([self._taken, np.array(new_taken, dtype="datetime64[s]")])
                self._matrix = self._buffer[: n + extra]
                self._key_order = None
            self._data_version = self._current_version()

    @_sqlite_errors
    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        with self._tx():
            # rowcount, not total_changes: the word index's trigger changes are not deleted pictures.
            removed = self._db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids]).rowcount
            if removed:
                self._db.execute(_BUMP_GENERATION)
        if removed:
            self._load_matrix()
        return removed

    # -- reads --------------------------------------------------------------------------------

    @_sqlite_errors
    def get(self, id: str) -> Document | None:
        with self._lock:
            dates = _DATE_COLUMNS if self._schema >= 2 else "NULL, ''"
            hashed = "phash" if self._schema >= 3 else "NULL"
            row = self._db.execute(
                f"SELECT {_COLUMNS}, vector, {dates}, {hashed} FROM images WHERE id = ?", (id,)
            ).fetchone()
        if row is None:
            return None
        return _document(row)

    @_sqlite_errors
    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        """The k best after offset by cosine; prefix and taken (a capture-time range) filter before the scan."""
        q = check_query(vector, self.dim, k, offset)
        want = offset + k
        found: tuple[np.ndarray, np.ndarray] | None = None
        with self._lock:
            self._refresh_if_changed()
            matrix, ids = self._matrix, self._ids
            allowed = self._prefix_rows(prefix) if prefix else None
            if taken:
                dated = self._taken_rows(taken)
                allowed = dated if allowed is None else np.intersect1d(allowed, dated, assume_unique=True)
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

    @_sqlite_errors
    def lexical(
        self,
        text: str,
        vector: np.ndarray,
        k: int = 10,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        """The k best documents for any word of text in their title or key, by FTS5's BM25 (a title word
        counts twice a key word), ties by key; each hit's score is its cosine to vector."""
        q = check_query(vector, self.dim, k, 0)
        words = query_words(text)
        if not words:
            return []
        with self._lock:
            self._refresh_if_changed()
            if self._schema < LEXICAL_SCHEMA:
                raise BadRequest(
                    f"the index {self.directory} has no word index for hybrid search yet (it was written by an "
                    "older clipsearch): run `clipsearch index` on its folders once, or search without hybrid"
                )
            where = ["images_fts MATCH ?"]
            params: list[Any] = [" OR ".join(f'"{w}"' for w in words)]
            if prefix:
                where.append("substr(CAST(i.key AS BLOB), 1, ?) = ?")
                params += [len(key_param(prefix)), key_param(prefix)]
            if taken and taken.after is not None:
                where.append("i.taken_at >= ?")
                params.append(taken.after)
            if taken and taken.before is not None:
                where.append("i.taken_at < ?")
                params.append(taken.before)
            rows = self._db.execute(
                f"SELECT i.id, i.key, i.title, i.bucket, i.width, i.height, {_DATE_COLUMNS} "
                f"FROM images_fts JOIN images AS i ON i.id = images_fts.id WHERE {' AND '.join(where)} "
                "ORDER BY bm25(images_fts, 0.0, 2.0, 1.0), i.key, i.bucket LIMIT ?",
                [*params, k],
            ).fetchall()
            hits: dict[str, Hit] = {}
            for r in rows:
                row = self._row.get(r[0])
                if row is None or r[0] in hits:  # an unusable vector (see check), or a repeated entry
                    continue
                cos = max(-1.0, min(1.0, float(self._matrix[row] @ q)))
                hits[r[0]] = Hit(r[0], r[1], cos, r[2], r[3], r[4], r[5], r[6], r[7])
        return list(hits.values())

    def _taken_rows(self, taken: DateRange) -> np.ndarray:
        """Rows whose capture time is on or after taken.after and before taken.before, ascending."""
        if self._schema < 2:
            raise BadRequest(
                f"the index {self.directory} has no capture dates yet (it was written by an older "
                "clipsearch): run `clipsearch index` on its folders once to add them"
            )
        mask = ~np.isnat(self._taken)
        if taken.after is not None:
            mask &= self._taken >= np.datetime64(taken.after, "s")
        if taken.before is not None:
            mask &= self._taken < np.datetime64(taken.before, "s")
        return np.flatnonzero(mask)

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

    def _ann_search(
        self, q: np.ndarray, want: int, matrix: np.ndarray, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
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
                ann.append(matrix[ann.count : n], ann.count)
        self._replaced.clear()
        self._ann, self._ann_reloads = ann, self._reloads
        return ann

    def _ann_header(self) -> ann_mod.AnnHeader:
        return ann_mod.AnnHeader(
            generation=self._generation,
            count=len(self._ids),
            dim=self.dim,
            ids_digest=ann_mod.ids_digest(self._ids),
            options=asdict(self._ann_options),
        )

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
            dates = _DATE_COLUMNS if self._schema >= 2 else "NULL, ''"
            found = {
                r[0]: r
                for r in self._db.execute(
                    f"SELECT id, key, title, bucket, width, height, {dates} FROM images WHERE id IN ({marks})",
                    wanted,
                )
            }
        hits = []
        for id_, score in zip(wanted, scores, strict=True):
            r = found.get(id_)
            if r is not None:
                hits.append(
                    Hit(
                        id=id_,
                        key=r[1],
                        score=max(-1.0, min(1.0, score)),
                        title=r[2],
                        bucket=r[3],
                        width=r[4],
                        height=r[5],
                        taken_at=r[6],
                        taken_offset=r[7],
                    )
                )
        return hits

    @_sqlite_errors
    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, size, mtime FROM images WHERE substr(CAST(key AS BLOB), 1, ?) = ?",
                (len(key_param(prefix)), key_param(prefix)),
            ).fetchall()
        # Rows whose stored vector is unusable are left out, so the next `index` re-embeds their files.
        bad = set(self._unreadable.values())
        return {r[0]: (int(r[1]), float(r[2])) for r in rows if r[0] not in bad}

    @_sqlite_errors
    def unusable_keys(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose stored vector is unusable (left out of fingerprints()): `forget`
        and the re-index sweep of files that are gone must still be able to delete them."""
        with self._lock:
            if self._follow_replacement():
                self._load_matrix()
            return {k for k in self._unreadable.values() if k.startswith(prefix)}

    @_sqlite_errors
    def undated(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose capture time was never read (rows written before schema 2)."""
        return self._keys_lacking("taken_at", 2, prefix)

    def _keys_lacking(self, column: str, schema: int, prefix: str) -> set[str]:
        """Keys starting with prefix whose column (added in that schema version) is NULL."""
        if self._schema < schema:
            return set()  # read-only and not migrated: nothing can be filled in anyway
        with self._lock:
            rows = self._db.execute(
                f"SELECT key FROM images WHERE {column} IS NULL AND substr(CAST(key AS BLOB), 1, ?) = ?",
                (len(key_param(prefix)), key_param(prefix)),
            ).fetchall()
        return {r[0] for r in rows}

    def _update(self, statement: str, updates: list[tuple[Any, ...]]) -> int:
        """Run an UPDATE for each parameter tuple in one transaction; returns how many rows changed."""
        self._check_writable_schema()
        with self._tx():
            before = self._db.total_changes
            self._db.executemany(statement, updates)
            return self._db.total_changes - before

    @_sqlite_errors
    def set_taken(self, taken: dict[str, tuple[str, str]]) -> int:
        """Fill in capture times (key -> (taken_at, taken_offset)) without touching the vectors."""
        if not taken:
            return 0
        updates = [(at, offset, doc_id("", key)) for key, (at, offset) in taken.items()]
        changed = self._update("UPDATE images SET taken_at = ?, taken_offset = ? WHERE id = ?", updates)
        with self._lock:
            for at, _, id_ in updates:
                i = self._row.get(id_)
                if i is not None:
                    self._taken[i] = np.datetime64(at, "s")
            self._data_version = self._current_version()
        return changed

    def _check_writable_schema(self) -> None:
        if self._schema < SCHEMA_VERSION:  # opened read-only (never migrated), yet asked to write
            raise IndexReadOnly(
                f"the index {self.directory} was opened read-only and has an older schema; "
                "open it for writing (`clipsearch index`) to migrate it"
            )

    # -- hashes (the duplicate scan, clipsearch/duplicates.py) ------------------------------------

    @_sqlite_errors
    def unhashed(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose perceptual hash was never computed (rows written before schema 3)."""
        return self._keys_lacking("phash", 3, prefix)

    @_sqlite_errors
    def set_hashes(self, hashes: dict[str, tuple[str, str]]) -> int:
        """Fill in key -> (sha256, phash) without touching the vectors."""
        if not hashes:
            return 0
        updates = [(sha, phash, doc_id("", key)) for key, (sha, phash) in hashes.items()]
        changed = self._update("UPDATE images SET content_hash = ?, phash = ? WHERE id = ?", updates)
        with self._lock:
            self._data_version = self._current_version()
        return changed

    def _require_hashes(self) -> None:
        if self._schema < 3:
            raise BadRequest(
                f"the index {self.directory} has no perceptual hashes yet (it was written by an older "
                "clipsearch): run `clipsearch index` on its folders once to add them"
            )

    @_sqlite_errors
    def exact_groups(self) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT content_hash, COUNT(*) FROM images WHERE content_hash != '' "
                "GROUP BY content_hash HAVING COUNT(*) > 1"
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    @_sqlite_errors
    def members(self, content_hashes: Sequence[str], cap: int) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {h: [] for h in content_hashes}
        wanted = list(found)
        for start in range(0, len(wanted), 500):  # under SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            with self._lock:
                rows = self._db.execute(
                    f"SELECT content_hash, id FROM images WHERE content_hash IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY key, bucket",
                    chunk,
                ).fetchall()
            for content_hash, id_ in rows:
                if len(found[content_hash]) < cap:
                    found[content_hash].append(id_)
        return found

    @_sqlite_errors
    def perceptual_hashes(self) -> list[tuple[str, str, str]]:
        self._require_hashes()
        with self._lock:
            rows = self._db.execute("SELECT id, content_hash, phash FROM images WHERE phash IS NOT NULL").fetchall()
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    @_sqlite_errors
    def documents(self, ids: Sequence[str]) -> dict[str, Document]:
        """Rows whose vector is unusable (see _usable_rows) are left out."""
        hashed = "phash" if self._schema >= 3 else "NULL"
        dates = _DATE_COLUMNS if self._schema >= 2 else "NULL, ''"
        wanted = list(dict.fromkeys(ids))
        out: dict[str, Document] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS}, vector, {dates}, {hashed} FROM images "
                    f"WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            for row in rows:
                if isinstance(row[10], bytes) and len(row[10]) == 4 * self.dim:
                    doc = _document(row)
                    if np.isfinite(doc.vector).all():
                        out[str(row[0])] = doc
        return out

    @_sqlite_errors
    def count(self) -> int:
        with self._lock:
            if self._follow_replacement():
                self._load_matrix()
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    @_sqlite_errors
    def info(self) -> IndexInfo:
        n = self.count()
        extra: dict[str, Any] = {
            "bytes_per_vector": self.dim * 4,
            "path": str(self.directory / DB_NAME),
            "search_mode": self.search_mode,
            "schema_version": self._schema,
        }
        with self._lock:
            if self._ann is not None:
                extra.update(self._ann.info())
            if self._unreadable:
                extra["unreadable_rows"] = len(self._unreadable)
        return IndexInfo(
            backend=self.backend, name=str(self.directory), model=self.model, dim=self.dim, count=n, extra=extra
        )

    @_sqlite_errors
    def close(self) -> None:
        with self._lock:
            if self._ann is not None and self._ann_options.persist and self._ann_saved != self._generation:
                self._refresh_if_changed()
                self._save_ann(self._synced_ann(self._matrix), self._ann_header())
            self._db.close()

    def scan(self, batch: int = 500) -> Iterator[list[Document]]:
        """Every row with a usable vector, in rowid order, one batch per query (keyset paging on rowid).

        Each query runs alone under the lock, so no read transaction or cursor stays open between batches
        and the caller may write meanwhile. Columns map to Document fields by name (document_from), so a
        column added for a new field travels without a change here. Rows whose vector is unusable (wrong
        size, NaN) are left out, as they are from searches; `clipsearch check` reports them.
        """
        last = 0
        while True:
            rows, names = self._scan_page(last, batch)
            if not rows:
                return
            last = int(rows[-1][0])
            docs = []
            for row in rows:
                values = dict(zip(names, row, strict=True))
                vector = values["vector"]
                if isinstance(vector, bytes) and len(vector) == 4 * self.dim:
                    array = np.frombuffer(vector, dtype=np.float32)
                    if np.isfinite(array).all():
                        docs.append(document_from(values, array.copy()))
            if docs:
                yield docs

    @_sqlite_errors
    def _scan_page(self, after: int, batch: int) -> tuple[list[tuple], list[str]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT rowid AS _rowid, * FROM images WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, batch)
            )
            return cursor.fetchall(), [d[0] for d in cursor.description]


def _document(row: Sequence[Any]) -> Document:
    """A Document from a row of {_COLUMNS}, vector, {_DATE_COLUMNS}, phash."""
    return Document(
        key=row[1],
        bucket=row[2],
        title=row[3],
        content_hash=row[4],
        size=row[5],
        mtime=row[6],
        width=row[7],
        height=row[8],
        indexed_at=row[9],
        vector=np.frombuffer(row[10], dtype=np.float32).copy(),
        taken_at=row[11],
        taken_offset=row[12] or "",
        phash=row[13],
    )


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with prefix (None: there is none)."""
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


def _exact_top(
    matrix: np.ndarray, q: np.ndarray, want: int, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The `want` best rows by inner product (in no order) and their scores; `allowed`: rows to consider."""
    if allowed is None:
        scores = matrix @ q
    elif 4 * len(allowed) < matrix.shape[0]:
        # A narrow filter: score only its rows, gathered in blocks so no big copy is made.
        scores = np.empty(len(allowed), dtype=np.float32)
        for start in range(0, len(allowed), 16384):
            block = allowed[start : start + 16384]
            scores[start : start + len(block)] = matrix[block] @ q
    else:
        scores = (matrix @ q)[allowed]
    n = len(scores)
    top = np.argpartition(scores, n - want)[n - want :] if want < n else np.arange(n)
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
            if exc_type:
                self._db.execute("ROLLBACK")
                return
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:  # a failed COMMIT (disk full) leaves it open
                    self._db.execute("ROLLBACK")
                raise
        finally:
            self._lock.release()


def _usable_rows(rows: list[tuple], dim: int, unreadable: dict[str, str]) -> list[tuple]:
    """Rows (id, key, vector bytes) whose vector has the index's size and only finite values.

    The others are recorded in `unreadable` (id -> key) and left out of the matrix: a NaN would
    otherwise rank first in every query. `clipsearch check` reports them; `index` re-embeds them.
    """
    size = dim * 4
    sized = [r for r in rows if isinstance(r[2], bytes) and len(r[2]) == size]
    if len(sized) < len(rows):
        unreadable.update((r[0], r[1]) for r in rows if not (isinstance(r[2], bytes) and len(r[2]) == size))
    if not sized:
        return sized
    block = np.frombuffer(b"".join(r[2] for r in sized), dtype=np.float32).reshape(-1, dim)
    bad = {int(i) for i in np.flatnonzero(~np.isfinite(block).all(axis=1))}
    if not bad:
        return sized
    unreadable.update((sized[i][0], sized[i][1]) for i in sorted(bad))
    return [r for i, r in enumerate(sized) if i not in bad]


# -- clipsearch check -------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What `clipsearch check` found and, with --repair, what it did; `healthy`: nothing remains to fix."""

    path: str
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: int | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems


def check_index(directory: str | Path, repair: bool = False) -> CheckReport:
    """Run the integrity checks on an embedded index; with repair, fix what can be fixed.

    Checks: SQLite's integrity_check, the schema and model record, every vector's size and
    finiteness, and (a note only) entries whose local files are gone. Repairs: a damaged file is moved
    aside and the rows that can still be read are copied into a fresh one; rows with unusable vectors
    are dropped, so the next `clipsearch index` of their folders re-embeds them; an empty or
    half-created file is removed (the next `index` creates the index anew).
    """
    directory = Path(directory).expanduser()
    path = directory / DB_NAME
    report = CheckReport(path=str(path))
    if not path.exists():
        raise NotFound(f"no index at {directory}; nothing to check")
    if repair and not _writable(directory):
        raise IndexReadOnly(
            f"the index {directory} is on a read-only folder or mount; copy it somewhere writable to repair it"
        )
    damage = _damage(path)
    if damage is not None:
        report.problems.append(f"the file is damaged: {damage}")
        if repair:
            _repair_damaged(directory, report)
        return report
    try:
        db = _connect_read_only(path)
    except sqlite3.Error as e:
        raise storage_error(e, path) from None
    try:
        meta = _read_meta(db)
        if meta is None or not {"model", "dim"} <= meta.keys():
            rows = 0 if meta is None else int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
            report.problems.append(
                "the file holds no index (empty or half-created: a run stopped while creating it)"
                if not rows
                else f"{rows} rows but no model record"
            )
            db.close()
            if repair and not rows:
                _remove_index_files(path)
                report.repaired.append("removed it; the next `clipsearch index` creates the index anew")
                report.problems.clear()
            return report
        schema = _schema_version(meta)
        check_schema(schema, SCHEMA_VERSION, f"the index {directory}")
        unreadable, gone, report.rows = _scan_rows(db, int(meta["dim"]))
    except sqlite3.Error as e:
        raise storage_error(e, path) from None
    finally:
        db.close()
    if schema < SCHEMA_VERSION:
        if repair:
            _migrate_file(path)
            report.repaired.append(
                f"migrated the schema from version {schema} to {SCHEMA_VERSION}; the next "
                "`clipsearch index` of its folders fills in what it lacks (capture dates, perceptual hashes)"
            )
        else:
            report.notes.append(
                f"schema version {schema} (this clipsearch writes {SCHEMA_VERSION}): it lacks capture dates, "
                "perceptual hashes or the word index for hybrid search; the next `clipsearch index` or "
                "`check --repair` migrates it"
            )
    if unreadable:
        report.problems.append(
            f"{len(unreadable)} rows have an unusable vector (wrong size, NaN or "
            f"infinity), e.g. {sorted(unreadable.values())[0]}"
        )
        if repair:
            _drop_rows(directory, list(unreadable))
            report.rows -= len(unreadable)
            report.problems.pop()
            report.repaired.append(
                f"dropped {len(unreadable)} rows with an unusable vector; the next "
                "`clipsearch index` of their folders re-embeds them"
            )
    if gone:
        report.notes.append(
            f"{gone} entries name local files that are gone (a moved folder, an unmounted "
            "share?); `clipsearch index` of their folder removes them"
        )
    return report


def _damage(path: Path) -> str | None:
    """SQLite's own verdict on the file: None when integrity_check says ok."""
    try:
        db = _connect_read_only(path)
        try:
            lines = [str(r[0]) for r in db.execute("PRAGMA integrity_check(20)")]
        finally:
            db.close()
    except sqlite3.Error as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return str(e)
        raise storage_error(e, path) from None
    return None if lines == ["ok"] else "; ".join(lines[:3])


def _scan_rows(db: sqlite3.Connection, dim: int) -> tuple[dict[str, str], int, int]:
    """Rows with unusable vectors (id -> key), how many local files are gone, and the row count."""
    unreadable: dict[str, str] = {}
    gone = total = 0
    cursor = db.execute("SELECT id, key, vector, bucket FROM images ORDER BY rowid")
    while rows := cursor.fetchmany(8192):
        total += len(rows)
        _usable_rows(rows, dim, unreadable)
        gone += sum(1 for r in rows if not r[3] and os.path.isabs(r[1]) and not os.path.lexists(r[1]))
    return unreadable, gone, total


def _migrate_file(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        with _Transaction(db, threading.RLock()):
            _migrate(db)
    except sqlite3.Error as e:
        raise storage_error(e, path) from None
    finally:
        db.close()


def _drop_rows(directory: Path, ids: list[str]) -> None:
    db = sqlite3.connect(directory / DB_NAME, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        with _Transaction(db, threading.RLock()):
            db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
            db.execute(_BUMP_GENERATION)
    except sqlite3.Error as e:
        raise storage_error(e, directory / DB_NAME) from None
    finally:
        db.close()


def _remove_index_files(path: Path) -> None:
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        (path.parent / name).unlink(missing_ok=True)


def _repair_damaged(directory: Path, report: CheckReport) -> None:
    """Copy every readable row of a damaged file into a fresh index; keep the damaged file beside it."""
    path = directory / DB_NAME
    src = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    src.text_factory = text_from_db
    try:
        try:
            meta = {str(k): str(v) for k, v in src.execute("SELECT name, value FROM meta")}
        except sqlite3.Error:
            meta = {}
        if not {"model", "dim"} <= meta.keys():
            src.close()
            aside = _move_aside(path)
            report.problems.append(
                f"its model record cannot be read, so nothing can be copied: moved it to "
                f"{aside}; run `clipsearch index` on your folders to build the index again"
            )
            return
        work = directory / ".repair"
        if work.exists():
            _remove_index_files(work / DB_NAME)
        fresh = EmbeddedIndex(work, model=meta["model"], dim=int(meta["dim"]))
        version = _schema_version(meta)
        try:
            saved = 0
            keys: list[str] = []
            for batch in _readable_rows(src, dated=version >= 2, hashed=version >= 3):
                docs = [_document(r) for r in batch if isinstance(r[10], bytes) and len(r[10]) == 4 * fresh.dim]
                saved += fresh.upsert(docs).written
                keys.extend(d.key for d in docs if not d.bucket and os.path.isabs(d.key))
        finally:
            fresh.close()
    finally:
        src.close()
    _settle(work / DB_NAME, saved)
    aside = _move_aside(path)
    (work / DB_NAME).replace(path)
    _remove_index_files(work / DB_NAME)
    work.rmdir()
    report.problems.clear()
    report.rows = saved
    again = ""
    if keys:
        again = f" `clipsearch index {shlex.quote(os.path.commonpath(keys))} --index {shlex.quote(str(directory))}`"
    report.repaired.append(
        f"copied the {saved} readable rows into a fresh index and moved the damaged file "
        f"to {aside}; re-run{again or ' `clipsearch index` on your folders'} to re-embed "
        "the pictures whose rows were lost"
    )


def _settle(path: Path, expected: int) -> None:
    """Make the rebuilt file hold every row by itself (its -wal is deleted after the move), or fail.

    Closing the last connection checkpoints the WAL, but not when that fails (a full disk): so
    checkpoint it here, leave WAL mode, and count the rows in the file alone (`immutable=1` ignores any
    -wal, https://www.sqlite.org/uri.html) before it replaces the damaged one.
    """
    failed = ""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            mode = db.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        finally:
            db.close()
        check = sqlite3.connect("file:" + urllib.parse.quote(os.fsencode(path.absolute())) + "?immutable=1", uri=True)
        try:
            kept = int(check.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            check.close()
        if busy or mode != "delete" or kept != expected:
            failed = f"{kept} of {expected} rows reached the file"
    except sqlite3.Error as e:
        failed = str(e) or type(e).__name__
    if failed:
        _remove_index_files(path)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        raise IndexUnavailable(
            f"the repair could not finish writing the new index ({failed}); the damaged "
            f"file {path.parent.parent / DB_NAME} is left as it was: free some disk "
            "space and re-run check --repair"
        )


def _move_aside(path: Path) -> Path:
    """Rename a damaged index file out of the way (kept for forensics); its -wal and -shm go."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return aside


def _readable_rows(
    db: sqlite3.Connection, batch: int = 256, dated: bool = True, hashed: bool = True
) -> Iterator[list[tuple]]:
    """Rows of a damaged images table, in batches, stepping over the rowids whose pages cannot be read.

    Past a damaged range the probe steps ahead doubling, then searches back (bisects) between the last
    rowid it could not seek to and the first probe that worked, so no readable row after it is skipped.
    """
    dates = _DATE_COLUMNS if dated else "NULL, ''"
    phash = "phash" if hashed else "NULL"
    query = f"SELECT rowid, {_COLUMNS}, vector, {dates}, {phash} FROM images WHERE rowid >= ? ORDER BY rowid LIMIT ?"

    def readable(start: int) -> bool:
        try:
            db.execute(query, (start, 1)).fetchall()
            return True
        except sqlite3.DatabaseError:
            return False

    start, limit = 1, batch  # start: the lowest rowid not read yet
    while True:
        try:
            rows = db.execute(query, (start, limit)).fetchall()
        except sqlite3.DatabaseError:
            if limit > 1:
                limit = 1  # read one row at a time up to the damaged page
                continue
            bad, step = start, 1  # no row from `bad` on can be sought
            while not readable(bad + step):
                if step >= 1 << 62:
                    return
                step *= 2
            good = bad + step
            while good - bad > 1:
                mid = (bad + good) // 2
                bad, good = (bad, mid) if readable(mid) else (mid, good)
            start, limit = good, batch
            continue
        if not rows:
            return
        limit = batch
        start = int(rows[-1][0]) + 1
        yield [r[1:] for r in rows]
