"""Indexes as the first release (schema version 1) wrote them, frozen here so migration tests keep meaning
something after the code moves on: the embedded index's SQLite layout and the OpenSearch mapping."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.index.base import Document

# clipsearch/index/embedded.py's _SCHEMA at schema version 1, word for word.
EMBEDDED_V1 = """
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


def write_embedded_v1(directory: Path, model: str, dim: int, docs: Sequence[Document], schema_version: int = 1) -> Path:
    """An embedded index folder as version 1 wrote it (WAL, the meta record, one row per document)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "index.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(EMBEDDED_V1)
        db.executemany(
            "INSERT INTO meta (name, value) VALUES (?, ?)",
            [
                ("schema_version", str(schema_version)),
                ("model", model),
                ("dim", str(dim)),
                ("created_at", str(time.time())),
                ("generation", "1"),
            ],
        )
        db.executemany(
            "INSERT INTO images (id, key, bucket, title, content_hash, size, mtime, width, height, indexed_at, "
            "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
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
                    time.time(),
                    np.asarray(d.vector, dtype=np.float32).tobytes(),
                )
                for d in docs
            ],
        )
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path


def opensearch_v1_body(model: str, dim: int, schema_version: int = 1) -> dict[str, Any]:
    """The create-index body version 1 of clipsearch/index/opensearch.py sent (lucene HNSW, cosine)."""
    meta = {
        "schema_version": schema_version,
        "model": model,
        "dim": dim,
        "method": {"engine": "lucene", "space_type": "cosinesimil", "m": 16, "ef_construction": 128},
        "created_at": time.time(),
    }
    return {
        "settings": {"index.knn": True, "number_of_shards": 1, "number_of_replicas": 0},
        "mappings": {
            "_meta": {"clipsearch": meta},
            "dynamic": "strict",
            "properties": {
                "vector": {
                    "type": "knn_vector",
                    "dimension": dim,
                    "method": {
                        "name": "hnsw",
                        "engine": "lucene",
                        "space_type": "cosinesimil",
                        "parameters": {"m": 16, "ef_construction": 128},
                    },
                },
                "key": {"type": "keyword"},
                "bucket": {"type": "keyword"},
                "title": {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 512}}},
                "content_hash": {"type": "keyword"},
                "size": {"type": "long"},
                "mtime": {"type": "double"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "model": {"type": "keyword"},
                "indexed_at": {"type": "date", "format": "epoch_second"},
            },
        },
    }


def opensearch_v1_source(d: Document, model: str) -> dict[str, Any]:
    """A document as version 1 wrote it (no capture time)."""
    return {
        "vector": np.asarray(d.vector, dtype=np.float32).tolist(),
        "key": d.key,
        "bucket": d.bucket,
        "title": d.title,
        "content_hash": d.content_hash,
        "size": d.size,
        "mtime": d.mtime,
        "width": d.width,
        "height": d.height,
        "model": model,
        "indexed_at": time.time(),
    }
