"""The VectorIndex interface shared by the embedded and OpenSearch backends.

Scores leave every backend as cosine similarity in [-1, 1].
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clipsearch.errors import BadRequest, ClipsearchError, ConfigError, ModelMismatch

__all__ = [
    "Document",
    "Hit",
    "IndexInfo",
    "UpsertResult",
    "VectorIndex",
    "IndexError_",
    "doc_id",
    "check_model",
    "check_query",
    "DateRange",
    "SchemaTooNew",
    "check_schema",
    "Redatable",
    "Rehashable",
    "HashScannable",
    "wall_clock",
    "key_words",
    "query_words",
    "document_from",
]


class IndexError_(ClipsearchError):  # noqa: N801 - avoid shadowing the builtin IndexError
    """The index backend failed in a way that is not the caller's fault."""

    code = "index_error"


class SchemaTooNew(ConfigError):
    """The index was written by a newer clipsearch (a higher schema version); it is never touched (exit 2)."""

    code = "schema_too_new"


def check_schema(found: int, supported: int, where: str) -> None:
    """Refuse an index whose schema is newer than this code writes; an older one is migrated by a write."""
    if found > supported:
        raise SchemaTooNew(
            f"{where} has schema version {found}, newer than this clipsearch supports "
            f"({supported}); upgrade clipsearch to use it"
        )


def wall_clock(when: float | datetime.datetime) -> str:
    """A time as this machine's local wall-clock "YYYY-MM-DDTHH:MM:SS" (a file's mtime, an S3 LastModified).

    An aware datetime (boto3 gives LastModified in UTC) is converted to the local zone first; a Lambda's
    local zone is UTC unless TZ says otherwise.
    """
    if isinstance(when, datetime.datetime):
        local = when.astimezone() if when.tzinfo is not None else when
    else:
        local = datetime.datetime.fromtimestamp(when)
    return local.replace(tzinfo=None).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DateRange:
    """A taken_at filter on wall-clock times "YYYY-MM-DDTHH:MM:SS": after inclusive, before exclusive.

    Wall-clock: compared as written, never shifted by a time zone (CONTRACT §7).
    """

    after: str | None = None
    before: str | None = None

    def __bool__(self) -> bool:
        return self.after is not None or self.before is not None


def doc_id(bucket: str, key: str) -> str:
    """Deterministic document id: reprocessing the same object never duplicates it.

    surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes (valid keys are unchanged).
    """
    return hashlib.sha1(f"{bucket}\x00{key}".encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Document:
    """One indexed image: where it lives, what it looks like, and its unit vector."""

    key: str
    vector: np.ndarray
    bucket: str = ""
    title: str = ""
    content_hash: str = ""
    size: int = 0
    mtime: float = 0.0
    width: int = 0
    height: int = 0
    indexed_at: float = 0.0
    # Capture time as wall-clock "YYYY-MM-DDTHH:MM:SS" (EXIF DateTimeOriginal, else the file's mtime in local
    # time or the object's LastModified); None: not known (an index written before schema 2).
    taken_at: str | None = None
    taken_offset: str = ""  # EXIF OffsetTimeOriginal ("+02:00") when given: shown, never used to filter
    # content_hash is the sha256 of the file's bytes (hex): equal hashes are exact duplicates. phash is the
    # perceptual hash of the decoded picture (clipsearch/perceptual.py, 16 hex digits); None: not computed
    # (an index written before schema 3), filled in by the next `clipsearch index` without re-encoding.
    phash: str | None = None

    @property
    def id(self) -> str:
        return doc_id(self.bucket, self.key)


@dataclass(frozen=True)
class Hit:
    """A search result; score is a cosine similarity."""

    id: str
    key: str
    score: float
    title: str = ""
    bucket: str = ""
    width: int = 0
    height: int = 0
    taken_at: str | None = None
    taken_offset: str = ""
    rank_score: float | None = None  # the fused (RRF) score of a hybrid search; None otherwise


@dataclass(frozen=True)
class IndexInfo:
    backend: str
    name: str
    model: str
    dim: int
    count: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "index": self.name,
            "model": self.model,
            "dim": self.dim,
            "count": self.count,
            **self.extra,
        }


@dataclass
class UpsertResult:
    """Per-item outcome of a bulk write: failed maps doc id to a reason."""

    written: int = 0
    failed: dict[str, str] = field(default_factory=dict)


class VectorIndex(Protocol):
    """What every backend offers. `model` and `dim` are fixed when the index is created."""

    model: str
    dim: int

    def upsert(self, docs: Sequence[Document]) -> UpsertResult: ...

    def delete(self, ids: Sequence[str]) -> int: ...

    def get(self, id: str) -> Document | None: ...

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]: ...

    def lexical(
        self,
        text: str,
        vector: np.ndarray,
        k: int = 10,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        """The k best documents for the words of text over their title and key, best first (the lexical
        side of a hybrid search); each hit's score is its cosine to vector, as search() gives it."""
        ...

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        """key -> (size, mtime) for documents whose key starts with prefix (for incremental indexing)."""
        ...

    def count(self) -> int: ...

    def info(self) -> IndexInfo: ...

    def close(self) -> None: ...

    def scan(self, batch: int = 500) -> Iterator[list[Document]]:
        """Every document with its vector, in batches of at most `batch`, holding one batch in memory.

        Each document is read once (a stable order); a document written during the scan may be missed.
        """
        ...


@runtime_checkable
class Redatable(Protocol):
    """A backend that can list documents without a capture time and fill it in without re-encoding."""

    def undated(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose taken_at is not known (written before schema 2)."""
        ...

    def set_taken(self, taken: dict[str, tuple[str, str]]) -> int:
        """key -> (taken_at, taken_offset) for documents of this index (bucket ""); returns how many."""
        ...


@runtime_checkable
class Rehashable(Protocol):
    """A backend that can list documents without a perceptual hash and fill both hashes in without re-encoding."""

    def unhashed(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose phash is not known (written before schema 3)."""
        ...

    def set_hashes(self, hashes: dict[str, tuple[str, str]]) -> int:
        """key -> (sha256, phash) for documents of this index (bucket ""); returns how many."""
        ...


@runtime_checkable
class HashScannable(Protocol):
    """A backend that answers the duplicate scan's questions from its own storage (clipsearch/duplicates.py)."""

    def exact_groups(self) -> list[tuple[str, int]]:
        """(content_hash, count) of every content hash that 2 or more documents share, in any order."""
        ...

    def members(self, content_hashes: Sequence[str], cap: int) -> dict[str, list[str]]:
        """content_hash -> the ids of up to cap documents with it, in key order."""
        ...

    def perceptual_hashes(self) -> list[tuple[str, str, str]]:
        """(id, content_hash, phash) of every document that has a phash."""
        ...

    def documents(self, ids: Sequence[str]) -> dict[str, Document]:
        """id -> Document (vector included) of those ids that exist."""
        ...


def check_model(recorded_model: str, recorded_dim: int, model: str | None, dim: int | None) -> None:
    """Refuse to use an index with another model than the one that built it."""
    if model is not None and model != recorded_model:
        raise ModelMismatch(
            f"index was built with model {recorded_model!r} (dim {recorded_dim}), not {model!r}; "
            f"use --model {recorded_model} or another --index"
        )
    if dim is not None and dim != recorded_dim:
        raise ModelMismatch(f"index has dimension {recorded_dim}, the model gives {dim}")


MAX_QUERY_WORDS = 32


def key_words(key: str) -> str:
    """A key's words for the lexical search, split as query_words splits a query (and as SQLite FTS5's
    unicode61 tokenizer splits a key): `trips/beach_day.png` -> "trips beach day png"."""
    return " ".join(re.findall(r"[^\W_]+", key))


def query_words(text: str) -> list[str]:
    """The distinct words of a lexical query, lower-cased, in order (at most MAX_QUERY_WORDS): letters and
    digits as both backends' standard tokenizers split them, so punctuation never reaches a query parser."""
    return list(dict.fromkeys(w.lower() for w in re.findall(r"[^\W_]+", text)))[:MAX_QUERY_WORDS]


def check_query(vector: np.ndarray, dim: int, k: int, offset: int) -> np.ndarray:
    """Validate search arguments shared by every backend; returns the query as float32 1-D."""
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    if q.shape[0] != dim:
        raise BadRequest(f"query vector has dimension {q.shape[0]}, the index has {dim}")
    if k < 1:
        raise BadRequest("k must be at least 1")
    if offset < 0:
        raise BadRequest("from must be 0 or more")
    return q


def document_from(values: Mapping[str, Any], vector: np.ndarray) -> Document:
    """A Document from a stored record (an SQLite row, an OpenSearch _source) by Document's own fields.

    Generic, so a field added to Document travels through scan() once a backend stores it: names that are
    not fields (id, model) are dropped, a missing or null value takes the field's default, and a value is
    cast to its default's type (JSON gives 3 for a stored 3.0).
    """
    out: dict[str, Any] = {}
    for f in fields(Document):
        if f.name == "vector" or f.name not in values:
            continue
        value, default = values[f.name], f.default
        if default is MISSING or default is None:
            out[f.name] = value
        elif value is None:
            out[f.name] = default
        else:
            out[f.name] = type(default)(value)
    return Document(vector=np.asarray(vector, dtype=np.float32).reshape(-1), **out)
