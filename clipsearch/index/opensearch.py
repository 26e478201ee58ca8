"""OpenSearch backend: a k-NN index (HNSW, cosine) on a local node or Amazon OpenSearch Service.

The index records the model spec and dimension in its mapping's `_meta`, like the embedded
index does in SQLite, and refuses another model. Scores leave as cosine: cos = 2 * score - 1.

The name a user gives is an alias over the physical index `NAME-<model slug>-<n>` (created together), so
`clipsearch reindex` can build the next one beside it and move the alias in one atomic call; an index
created as a plain index by an older clipsearch keeps working under its own name until its first reindex.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import orjson
from opensearchpy import JSONSerializer, OpenSearch, RequestsHttpConnection
from opensearchpy import exceptions as os_errors
from opensearchpy import helpers as os_helpers

from clipsearch.errors import BadRequest, ConfigError, IndexMoved, NotFound, Unavailable
from clipsearch.index.base import (
    DateRange,
    Document,
    Hit,
    IndexError_,
    IndexInfo,
    UpsertResult,
    check_model,
    check_query,
    check_schema,
    doc_id,
    document_from,
    key_words,
    query_words,
)
from clipsearch.index.generations import generation_number, model_slug

__all__ = ["OpenSearchIndex", "ENGINES", "AUTH_MODES", "MAX_K"]

# 1: the first release. 2: taken_at (a `date` holding the wall-clock capture time with no zone, so
# OpenSearch's UTC handling shifts nothing) and taken_offset (keyword). 3: key_words, the key's words for
# hybrid search, and phash (keyword, the perceptual hash) beside content_hash (the sha256), for the duplicate
# scan. An older index gets the new fields (put_mapping) and the new version in `_meta` on its first write;
# a search never changes it.
SCHEMA_VERSION = 3
# yyyy-MM-dd'T'HH:mm:ss (OpenSearch docs, "Date field type": built-in formats).
TAKEN_FORMAT = "strict_date_hour_minute_second"
_DATE_FIELDS: dict[str, Any] = {
    "taken_at": {"type": "date", "format": TAKEN_FORMAT},
    "taken_offset": {"type": "keyword"},
}
# key_words: the key's words as clipsearch splits them (index.base.key_words: letters and digits, so
# `beach_day.png` is "beach day png", as SQLite FTS5's unicode61 tokenizer splits it in the embedded index),
# for the lexical side of hybrid search. Split here rather than by an analyzer: a custom analyzer cannot be
# added to an existing index without closing it, and the standard one keeps `lighthouse.jpg` whole.
_KEY_WORDS: dict[str, Any] = {"key_words": {"type": "text"}}
# multi_match over both, a title word counting twice a key word (as the embedded index's BM25 weights).
LEXICAL_FIELDS = ["title^2", "key_words"]
_HASH_FIELDS: dict[str, Any] = {"phash": {"type": "keyword"}}
_MIGRATIONS: dict[int, dict[str, Any]] = {  # version -> the fields that bring an index to the next one
    1: _DATE_FIELDS,
    2: {**_KEY_WORDS, **_HASH_FIELDS},
}
BACKFILL_PAGE = 1000  # documents given their key_words per partial-update bulk when an index is migrated
ENGINES = ("lucene", "faiss")
AUTH_MODES = ("none", "basic", "sigv4")
VECTOR_FIELD = "vector"
# The k-NN plugin caps k at 10000, and index.max_result_window caps from + size at the same.
MAX_K = 10_000
# The most duplicate groups by content hash one scan lists (a terms aggregation's size).
MAX_GROUPS = 10_000
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# What --bulk-load changes besides the index settings (bulk_load()): measured in docs/benchmarks.md,
# "OpenSearch bulk loading". A 2,000-document bulk of 512-d vectors outlasted a 30 s timeout on a busy
# node, and a timed-out bulk is sent again while the node still works on the first: so 1,000 and 120 s.
BULK_LOAD: dict[str, int] = {"max_bulk_docs": 1000, "max_bulk_bytes": 16_000_000, "bulk_clients": 2, "timeout_s": 120}
_SOURCE_FIELDS = ["key", "bucket", "title", "width", "height", "taken_at", "taken_offset"]

T = TypeVar("T")
# One bulk action as the bulk helpers take it (expand_action's output): the action line, then the source
# line (None for a delete).
_Action = tuple[dict[str, Any], dict[str, Any] | None]


def _cos_to_score(cos: float) -> float:
    return (cos + 1.0) / 2.0


def _score_to_cos(score: float) -> float:
    return max(-1.0, min(1.0, 2.0 * score - 1.0))


class OpenSearchIndex:
    """A VectorIndex in one OpenSearch index, created on first use when model and dim are given."""

    backend = "opensearch"

    def __init__(
        self,
        name: str = "clipsearch",
        model: str | None = None,
        dim: int | None = None,
        *,
        url: str | None = None,
        auth: str | None = None,
        username: str | None = None,
        password: str | None = None,
        region: str | None = None,
        service: str | None = None,
        engine: str = "lucene",
        m: int = 16,
        ef_construction: int = 128,
        ef_search: int = 100,
        shards: int = 1,
        replicas: int = 0,
        refresh_interval: str = "10s",
        max_retries: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 30.0,
        max_bulk_docs: int = 500,
        max_bulk_bytes: int = 8_000_000,
        bulk_clients: int = 1,
        client: OpenSearch | None = None,
        deadline: Callable[[], float] | None = None,
        alias: str | None = None,
    ) -> None:
        """deadline(): the seconds the caller has left (a Lambda's budget). With it, no attempt starts (opening
        included) unless timeout_s still fits, no backoff sleeps past it, and a bulk write's passes share one
        budget of max_retries + 1 attempts; without it (the CLI), each call retries on its own.
        bulk_clients: how many bulk requests of one upsert run at once (the CLI's --bulk-load); needs no deadline.

        alias: `name` is the physical index a reindex builds for that alias; it is created without the alias,
        which switch_alias() moves to it once it is complete."""
        if engine not in ENGINES:
            raise ConfigError(f"unknown k-NN engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if bulk_clients < 1 or (bulk_clients > 1 and deadline is not None):
            raise ConfigError("bulk_clients must be 1 or more, and 1 under a deadline")
        self.name = name
        self.engine = engine
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self._deadline = deadline
        self.max_bulk_docs, self.max_bulk_bytes, self.bulk_clients = max_bulk_docs, max_bulk_bytes, bulk_clients
        self.refresh_interval = refresh_interval
        self._dirty = False
        self._alias = alias
        self._expect: str | None = None  # pinned(): the physical index every hit must come from
        if client is not None:
            self.url, self.service = "(client)", service or "es"
            self.client = client
        else:
            self.url, self.client, self.service = _make_client(
                url, auth, username, password, region, service, timeout_s
            )
        meta = self._load_meta()
        if meta is None:
            if model is None or dim is None:
                raise NotFound(
                    f"no OpenSearch index {name!r} at {self.url}; run `clipsearch index PATH "
                    "--backend opensearch` first"
                )
            meta = self._create(model, dim, shards, replicas, refresh_interval)
        self.model = str(meta["model"])
        self.dim = int(meta["dim"])
        self._meta = meta
        self.schema = int(meta.get("schema_version", 1))
        check_schema(self.schema, SCHEMA_VERSION, f"OpenSearch index {name!r}")
        check_model(self.model, self.dim, model, dim)
        # An existing index keeps the HNSW parameters it was built with.
        method = meta.get("method", {})
        self.engine = str(method.get("engine", self.engine))
        self.m = int(method.get("m", self.m))
        self.ef_construction = int(method.get("ef_construction", self.ef_construction))

    # -- plumbing -----------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        expect: tuple[type[Exception], ...] = (),
        attempts: _Attempts | None = None,
        **kwargs: Any,
    ) -> T:
        """Run one client call, retrying 429/5xx/connection errors with jittered exponential backoff.

        Errors in `expect` reach the caller as they are; others become clipsearch's typed errors.
        attempts: a budget shared with other calls (a bulk write's passes); default max_retries + 1 of its own.
        With a deadline, an attempt starts only while timeout_s fits, and a backoff only while it and the
        next attempt fit: else Unavailable at once.
        """
        attempts = attempts or _Attempts(self.max_retries + 1)
        while True:
            if attempts.left == 0:  # a bulk write's later chunk, after the shared budget went on retries
                raise Unavailable(f"OpenSearch at {self.url} unavailable for {what}: out of attempts")
            if not self._fits(0.0):
                raise Unavailable(f"too little time left for OpenSearch {what}; retry later")
            attempt = attempts.take()
            try:
                return fn(*args, **kwargs)
            except expect:
                raise
            except (os_errors.AuthenticationException, os_errors.AuthorizationException) as e:
                raise ConfigError(
                    f"OpenSearch at {self.url} refused {what} ({e.status_code}); check "
                    "CLIPSEARCH_OPENSEARCH_AUTH and the credentials"
                ) from e
            except os_errors.NotFoundError as e:
                raise NotFound(f"OpenSearch index {self.name!r} not found at {self.url}") from e
            except os_errors.TransportError as e:
                retryable = isinstance(e, os_errors.ConnectionError) or e.status_code in RETRY_STATUS
                if not retryable:
                    raise IndexError_(f"OpenSearch failed {what}: {_reason(e)}") from e
                if attempts.left == 0:
                    raise Unavailable(f"OpenSearch at {self.url} unavailable for {what}: {_reason(e)}") from e
                pause = self._pause(attempt)
                if not self._fits(pause):
                    raise Unavailable(
                        f"OpenSearch at {self.url} unavailable for {what}: {_reason(e)} (no time left to retry)"
                    ) from e
            time.sleep(pause)

    def _pause(self, attempt: int) -> float:
        return min(20.0, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _fits(self, pause_s: float) -> bool:
        """Whether a pause of pause_s and then one attempt's worst case (timeout_s) fit in the deadline."""
        return self._deadline is None or self._deadline() >= pause_s + self.timeout_s

    def _require_schema(self, version: int, what: str) -> None:
        """BadRequest unless the index has reached that schema version (what: the fields it added)."""
        if self.schema < version:  # migrated since this process opened it (a warm search Lambda)?
            meta = self._load_meta() or {}
            if int(meta.get("schema_version", 1)) > self.schema:
                self._meta, self.schema = meta, int(meta["schema_version"])
        if self.schema < version:
            raise BadRequest(
                f"OpenSearch index {self.name!r} has no {what} yet (it was written by an "
                "older clipsearch): run `clipsearch index` once to add them"
            )

    def _load_meta(self) -> dict[str, Any] | None:
        try:
            mapping = self._call(
                "reading the mapping",
                self.client.indices.get_mapping,
                index=self.name,
                expect=(os_errors.NotFoundError,),
            )
        except os_errors.NotFoundError:
            return None
        body: dict[str, Any] = {}
        for entry in mapping.values():  # one entry, keyed by the concrete index name (maybe via an alias)
            body = entry.get("mappings", {})
        meta = body.get("_meta", {}).get("clipsearch")
        if not meta:
            raise ConfigError(
                f"OpenSearch index {self.name!r} exists but was not created by clipsearch; use another --index"
            )
        return dict(meta)

    def _create(self, model: str, dim: int, shards: int, replicas: int, refresh_interval: str) -> dict:
        meta = {
            "schema_version": SCHEMA_VERSION,
            "model": model,
            "dim": dim,
            "method": {
                "engine": self.engine,
                "space_type": "cosinesimil",
                "m": self.m,
                "ef_construction": self.ef_construction,
            },
            "created_at": time.time(),
            "alias": self._alias or self.name,  # the name this physical index serves (drop, reindex)
        }
        if self._alias not in (None, self.name):
            # Built by a reindex for the alias and not yet live: a reindex cut short resumes it (finish()).
            meta["building"] = True
        settings: dict[str, Any] = {"index.knn": True}
        if self.service != "aoss":  # Serverless manages shards, replicas and refresh itself.
            settings.update(
                {"number_of_shards": shards, "number_of_replicas": replicas, "refresh_interval": refresh_interval}
            )
        target = self.name
        body: dict[str, Any] = {
            "settings": settings,
            "mappings": {
                "_meta": {"clipsearch": meta},
                "dynamic": "strict",
                "properties": {
                    VECTOR_FIELD: {
                        "type": "knn_vector",
                        "dimension": dim,
                        "method": {
                            "name": "hnsw",
                            "engine": self.engine,
                            "space_type": "cosinesimil",
                            "parameters": {"m": self.m, "ef_construction": self.ef_construction},
                        },
                    },
                    "key": {"type": "keyword"},
                    **_KEY_WORDS,
                    "bucket": {"type": "keyword"},
                    "title": {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 512}}},
                    "content_hash": {"type": "keyword"},
                    "size": {"type": "long"},
                    "mtime": {"type": "double"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "model": {"type": "keyword"},
                    "indexed_at": {"type": "date", "format": "epoch_second"},
                    **_DATE_FIELDS,
                    **_HASH_FIELDS,
                },
            },
        }
        if self._alias is None and self.service != "aoss":  # Serverless has no aliases: a plain index there
            # The physical index and its alias in one call, so no reader ever finds the name missing.
            target = f"{self.name}-{model_slug(model)}-1"
            body["aliases"] = {self.name: {}}
        try:
            self._call(
                "creating the index",
                self.client.indices.create,
                index=target,
                body=body,
                expect=(os_errors.RequestError,),
            )
        except os_errors.RequestError as e:
            # Another process (a concurrent Lambda) created it first: use theirs, checked below.
            if "resource_already_exists_exception" not in str(e.error):
                raise IndexError_(f"cannot create OpenSearch index {self.name!r}: {_reason(e)}") from e
            existing = self._load_meta()
            if existing is None:
                raise IndexError_(f"OpenSearch index {self.name!r} vanished while being created") from e
            return existing
        return meta

    # -- writes -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring an older index to SCHEMA_VERSION before its first write: add the fields, fill what the new
        version computes from stored values, and only then record the version.

        Adding fields to an existing mapping is allowed, and a put_mapping without `_meta` leaves it as it is
        (OpenSearch docs, "Create or update mappings"; checked on the local node). Recording the version last
        means a back-fill cut short (Ctrl-C, a Lambda's timeout, an error) runs again on the next write.
        `_meta` is replaced as a whole, so it is sent complete.
        """
        if self.schema >= SCHEMA_VERSION:
            return
        fields: dict[str, Any] = {}
        for version in range(self.schema, SCHEMA_VERSION):
            fields.update(_MIGRATIONS[version])
        self._call(
            "migrating the mapping", self.client.indices.put_mapping, index=self.name, body={"properties": fields}
        )
        # This object writes the new fields from now on; the back-fill's own writes must not migrate again.
        found, self.schema = self.schema, SCHEMA_VERSION
        try:
            if found < 3:
                self._backfill_key_words()
        except BaseException:
            self.schema = found
            raise
        self._put_meta("recording the schema version", {**self._meta, "schema_version": SCHEMA_VERSION})

    def _put_meta(self, what: str, meta: dict[str, Any]) -> None:
        """Replace the index's clipsearch `_meta` with meta, which must be complete: put_mapping replaces
        `_meta` as a whole (OpenSearch docs, "Create or update mappings")."""
        self._call(what, self.client.indices.put_mapping, index=self.name, body={"_meta": {"clipsearch": meta}})
        self._meta = meta

    def _backfill_key_words(self) -> None:
        """Give documents written before schema 3 their key_words, by partial updates (vectors are kept), so
        hybrid search finds them by their file names at once, as the embedded index's migration does."""
        lacking = {"bool": {"must_not": [{"exists": {"field": "key_words"}}]}}
        pages = self._scan(lacking, [], "listing documents without key_words", page=BACKFILL_PAGE, doc_values=True)
        wanted: dict[str, dict[str, Any]] = {}
        for found in pages:
            wanted[found["_id"]] = {"key_words": key_words(found["key"])}
            if len(wanted) >= BACKFILL_PAGE:
                self._update(wanted, "word-index updates")
                wanted = {}
        self._update(wanted, "word-index updates")

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        """Bulk-index docs under their deterministic ids; per-item failures land in `failed`."""
        self._migrate()
        result = UpsertResult()
        now = time.time()
        actions: dict[str, _Action] = {}
        for d in docs:
            vec = np.asarray(d.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                result.failed[d.id] = f"vector has dimension {vec.shape[0]}, index has {self.dim}"
                continue
            source = {
                # The array itself: _Serializer writes each float32 as its shortest text.
                VECTOR_FIELD: np.ascontiguousarray(vec),
                "key": d.key,
                "bucket": d.bucket,
                "title": d.title,
                "content_hash": d.content_hash,
                "key_words": key_words(d.key),
                "size": d.size,
                "mtime": d.mtime,
                "width": d.width,
                "height": d.height,
                "model": self.model,
                "indexed_at": d.indexed_at or now,
                "taken_at": d.taken_at,
                "taken_offset": d.taken_offset,
                "phash": d.phash,
            }
            actions[d.id] = ({"index": {"_index": self.name, "_id": d.id}}, source)
        ok, failed = self._bulk(actions)
        result.written += ok
        result.failed.update(failed)
        return result

    def delete(self, ids: Sequence[str]) -> int:
        """Delete by id; returns how many existed."""
        actions: dict[str, _Action] = {
            i: ({"delete": {"_index": self.name, "_id": i}}, None) for i in dict.fromkeys(ids)
        }
        if not actions:
            return 0
        removed, failed = self._bulk(actions, count_result="deleted")
        if failed:
            raise IndexError_(f"{len(failed)} deletes failed, e.g. {next(iter(failed.values()))}")
        return removed

    def _bulk(self, actions: dict[str, _Action], count_result: str | None = None) -> tuple[int, dict[str, str]]:
        """Send id -> action through the bulk helpers; items rejected with 429/5xx are retried in later passes."""
        done = 0
        failed: dict[str, str] = {}
        pending = dict(actions)
        # With a deadline (a Lambda), every request of every pass draws on one budget of attempts.
        shared = _Attempts(self.max_retries + 1) if self._deadline is not None else None
        for attempt in range(self.max_retries + 1):
            retry: dict[str, _Action] = {}
            for _, item in self._send(pending.values(), shared):
                ((op, res),) = item.items()
                id_, status = res.get("_id", ""), int(res.get("status", 0))
                if 200 <= status < 300:
                    if count_result is None or res.get("result") == count_result:
                        done += 1
                elif op == "delete" and status == 404:
                    pass  # already gone: deleting is idempotent
                elif status in RETRY_STATUS:
                    retry[id_] = pending[id_]
                    failed[id_] = _item_reason(res)
                else:
                    failed[id_] = _item_reason(res)
            self._dirty = True
            if not retry:
                break
            if shared is not None:
                pause = self._pause(shared.used - 1)
                if shared.left == 0 or not self._fits(pause):
                    break  # out of attempts or time: the items stay in `failed`
            elif attempt == self.max_retries:
                break
            else:
                pause = self._pause(attempt)
            for id_ in retry:
                failed.pop(id_, None)
            pending = retry
            time.sleep(pause)
        return done, failed

    def _send(self, actions: Iterable[_Action], shared: _Attempts | None) -> Iterator[tuple[bool, dict[str, Any]]]:
        """One pass: the bulk helpers chunk by count and bytes and yield every item's outcome.

        Their own retry stays off (max_retries=0): it sleeps without regard to a deadline and retries only
        429 items, so whole requests retry in _call and rejected items in _bulk's passes.
        """
        client = _BulkClient(self, shared)
        options: dict[str, Any] = {
            "chunk_size": self.max_bulk_docs,
            "max_chunk_bytes": self.max_bulk_bytes,
            "expand_action_callback": _as_is,
            "raise_on_error": False,  # per-item failures come back as items, not one BulkIndexError
        }
        if self.bulk_clients > 1:
            return os_helpers.parallel_bulk(
                client, actions, thread_count=self.bulk_clients, queue_size=self.bulk_clients, **options
            )
        return os_helpers.streaming_bulk(client, actions, max_retries=0, **options)

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Tune the index for a large initial load, and put its settings back afterwards, however it ends.

        While loading: no periodic refresh (fewer, larger segments, so fewer merges rebuilding HNSW graphs) and
        no replicas (each document indexed once, not once per copy); the documented bulk-loading advice of
        OpenSearch ("Tuning for indexing speed") and Amazon OpenSearch Service ("Optimizing indexing
        performance"). The old values return in a finally, so an exception or Ctrl-C restores them too, and a
        refresh makes everything loaded searchable. Only a killed process leaves them: a refresh_interval
        found at -1 (a killed load) is restored to this object's refresh_interval. Serverless manages these
        settings itself: there, nothing changes.
        """
        if self.service == "aoss":
            yield
            return
        current = self._call("reading the settings", self.client.indices.get_settings, index=self.name)
        settings = next(iter(current.values()))["settings"]["index"]
        refresh = settings.get("refresh_interval")
        if refresh in (None, "-1"):
            refresh = self.refresh_interval
        replicas = int(settings.get("number_of_replicas", 0))
        loading: dict[str, Any] = {"refresh_interval": "-1"}
        if replicas > 0:
            loading["number_of_replicas"] = 0
        self._put_settings("starting a bulk load", loading)
        try:
            yield
        finally:
            restore: dict[str, Any] = {"refresh_interval": refresh}
            if replicas > 0:
                restore["number_of_replicas"] = replicas
            self._put_settings("restoring the settings after a bulk load", restore)
            self.refresh()

    def _put_settings(self, what: str, settings: dict[str, Any]) -> None:
        self._call(what, self.client.indices.put_settings, index=self.name, body={"index": settings})

    def refresh(self) -> None:
        """Make every write so far visible to search, in this process and others."""
        if self.service != "aoss":  # Serverless has no refresh API; it refreshes on its own.
            self._call("a refresh", self.client.indices.refresh, index=self.name)
        self._dirty = False

    # -- reads --------------------------------------------------------------------------------

    def _see_own_writes(self) -> None:
        # The embedded index shows a write to the next read at once; refreshing lazily, only when
        # this object wrote something, gives the same within a process without slowing bulk ingest.
        if self._dirty:
            self.refresh()

    def get(self, id: str) -> Document | None:
        try:
            resp = self._call("a get", self.client.get, index=self.name, id=id, expect=(os_errors.NotFoundError,))
        except os_errors.NotFoundError:
            return None
        self._check_physical([resp])
        return _document(resp["_source"])

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        """Approximate k-NN (HNSW) with the prefix and capture-time filters applied inside the graph search.

        Inside the k-NN query (efficient filtering, OpenSearch docs "k-NN search with filters"), so k hits
        still come back however few documents pass the filter.
        """
        q = check_query(vector, self.dim, k, offset)
        want = offset + k
        if want > MAX_K:
            raise BadRequest(f"from + k must be at most {MAX_K} on the OpenSearch backend")
        knn: dict[str, Any] = {"vector": q.tolist(), "k": want}
        # Lucene widens its candidate list to ef_search and then keeps k; a larger list buys recall.
        knn["method_parameters"] = {"ef_search": max(self.ef_search, want)}
        filters = self._filters(prefix, taken)
        if len(filters) == 1:
            knn["filter"] = filters[0]
        elif filters:
            knn["filter"] = {"bool": {"filter": filters}}
        body: dict[str, Any] = {
            "size": k,
            "from": offset,
            "_source": _SOURCE_FIELDS,
            "query": {"knn": {VECTOR_FIELD: knn}},
        }
        if min_score is not None:
            body["min_score"] = _cos_to_score(min_score)
        self._see_own_writes()
        resp = self._call("a search", self.client.search, index=self.name, body=body)
        self._check_physical(resp["hits"]["hits"])
        return [_hit(h, _score_to_cos(float(h["_score"]))) for h in resp["hits"]["hits"]]

    def lexical(
        self,
        text: str,
        vector: np.ndarray,
        k: int = 10,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        """The k best documents for any word of text in their title or key (multi_match, BM25), ties by key;
        each hit's score is its cosine to vector, computed here from the stored vector."""
        q = check_query(vector, self.dim, k, 0)
        words = query_words(text)
        if not words:
            return []
        if k > MAX_K:
            raise BadRequest(f"k must be at most {MAX_K} on the OpenSearch backend")
        query: dict[str, Any] = {"multi_match": {"query": " ".join(words), "fields": LEXICAL_FIELDS}}
        filters = self._filters(prefix, taken)
        body: dict[str, Any] = {
            "size": k,
            "_source": [*_SOURCE_FIELDS, VECTOR_FIELD],
            "query": {"bool": {"must": [query], "filter": filters}} if filters else query,
            "sort": [{"_score": "desc"}, {"key": "asc"}, {"bucket": "asc"}],
        }
        self._see_own_writes()
        resp = self._call("a word search", self.client.search, index=self.name, body=body)
        self._check_physical(resp["hits"]["hits"])
        q_norm = float(np.linalg.norm(q)) or 1.0
        hits = []
        for h in resp["hits"]["hits"]:
            v = np.asarray(h["_source"][VECTOR_FIELD], dtype=np.float32)
            # cosinesimil, as the k-NN side scores it: the stored vector need not be exactly unit.
            cos = float(v @ q) / ((float(np.linalg.norm(v)) or 1.0) * q_norm)
            hits.append(_hit(h, max(-1.0, min(1.0, cos))))
        return hits

    def _filters(self, prefix: str | None, taken: DateRange | None) -> list[dict[str, Any]]:
        """The prefix and capture-time filter clauses shared by the k-NN and the word search."""
        filters: list[dict[str, Any]] = []
        if prefix:
            filters.append({"prefix": {"key": prefix}})
        if taken:
            self._require_schema(2, "capture dates")
            bounds = {op: value for op, value in (("gte", taken.after), ("lt", taken.before)) if value}
            filters.append({"range": {"taken_at": {**bounds, "format": TAKEN_FORMAT}}})
        return filters

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        # search_after on (key, bucket) rather than scroll: it also works on Serverless.
        query: dict[str, Any] = {"prefix": {"key": prefix}} if prefix else {"match_all": {}}
        out: dict[str, tuple[int, float]] = {}
        after: list[Any] | None = None
        self._see_own_writes()
        while True:
            body: dict[str, Any] = {
                "size": 1000,
                "query": query,
                "_source": ["key", "size", "mtime"],
                "sort": [{"key": "asc"}, {"bucket": "asc"}],
                "track_total_hits": False,
            }
            if after is not None:
                body["search_after"] = after
            hits = self._call("listing keys", self.client.search, index=self.name, body=body)["hits"]["hits"]
            for h in hits:
                s = h["_source"]
                out[s["key"]] = (int(s.get("size", 0)), float(s.get("mtime", 0)))
            if len(hits) < 1000:
                return out
            after = hits[-1]["sort"]

    def undated(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose documents have no taken_at (written before schema 2)."""
        return self._keys_lacking("taken_at", prefix)

    def _keys_lacking(self, field: str, prefix: str) -> set[str]:
        """Keys starting with prefix whose documents lack the field (added by a later schema version).

        Also on an index older than that schema: `exists` on a field the mapping lacks matches nothing, so every
        document is listed, and filling them in (set_taken, set_hashes) migrates the index first. An index of
        unchanged files then still gains its dates and hashes on the next `clipsearch index`.
        """
        query: dict[str, Any] = {"bool": {"must_not": [{"exists": {"field": field}}]}}
        if prefix:
            query["bool"]["filter"] = [{"prefix": {"key": prefix}}]
        return {s["key"] for s in self._scan(query, ["key"], f"listing keys without {field}", doc_values=True)}

    def _scan(
        self, query: dict[str, Any], fields: list[str], what: str, page: int = 1000, doc_values: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Those fields of every document the query matches, paged by search_after on (key, bucket).

        doc_values: read keyword fields from their doc values and no stored field at all, not even _id (stored
        fields are compressed together with _source, so reading any decompresses each document's source, vector
        included: 34 s for 10,000 documents, measured); the id is then doc_id(bucket, key), as it was written.
        """
        after: list[Any] | None = None
        self._see_own_writes()
        while True:
            body: dict[str, Any] = {
                "size": page,
                "query": query,
                "_source": False if doc_values else fields,
                "sort": [{"key": "asc"}, {"bucket": "asc"}],
                "track_total_hits": False,
            }
            if doc_values:
                body["docvalue_fields"] = ["key", "bucket", *fields]
                body["stored_fields"] = "_none_"
            if after is not None:
                body["search_after"] = after
            hits = self._call(what, self.client.search, index=self.name, body=body)["hits"]["hits"]
            for h in hits:
                if doc_values:
                    values = {k: v[0] for k, v in h.get("fields", {}).items() if v}
                    yield {"_id": doc_id(values.get("bucket", ""), values["key"]), **values}
                else:
                    yield {"_id": h["_id"], **h.get("_source", {})}
            if len(hits) < page:
                return
            after = hits[-1]["sort"]

    def set_taken(self, taken: dict[str, tuple[str, str]]) -> int:
        """Fill in capture times (key -> (taken_at, taken_offset)) by partial updates; vectors are kept."""
        wanted = {doc_id("", key): {"taken_at": at, "taken_offset": offset} for key, (at, offset) in taken.items()}
        return self._update(wanted, "capture-date updates")

    def _update(self, wanted: dict[str, dict[str, Any]], what: str) -> int:
        """Partial updates (id -> fields) of documents that exist; vectors are kept."""
        self._migrate()
        if not wanted:
            return 0
        # A partial update re-parses the whole stored source, and a stored float such as indexed_at
        # 1796012688.3 comes back from that as "1.7960126883E9", which the epoch_second date format
        # refuses (measured on the local node). So indexed_at goes back with the update, as a decimal string.
        got = self._call(
            "reading documents",
            self.client.mget,
            index=self.name,
            body={"ids": list(wanted)},
            params={"_source_includes": "indexed_at"},
        )
        actions: dict[str, _Action] = {}
        for entry in got.get("docs", []):
            if not entry.get("found"):
                continue  # deleted meanwhile: nothing to date
            doc = dict(wanted[entry["_id"]])
            if entry.get("_source", {}).get("indexed_at") is not None:
                doc["indexed_at"] = repr(float(entry["_source"]["indexed_at"]))
            # retry_on_conflict: another writer (a warm ingest Lambda migrating too) may update it meanwhile.
            action = {"update": {"_index": self.name, "_id": entry["_id"], "retry_on_conflict": 3}}
            actions[entry["_id"]] = (action, {"doc": doc})
        done, failed = self._bulk(actions)
        if failed:
            raise IndexError_(f"{len(failed)} {what} failed, e.g. {next(iter(failed.values()))}")
        return done

    # -- hashes (the duplicate scan, clipsearch/duplicates.py) ------------------------------------

    def unhashed(self, prefix: str = "") -> set[str]:
        """Keys starting with prefix whose documents have no phash (written before schema 3)."""
        return self._keys_lacking("phash", prefix)

    def set_hashes(self, hashes: dict[str, tuple[str, str]]) -> int:
        """Fill in key -> (sha256, phash) by partial updates; vectors are kept."""
        wanted = {doc_id("", key): {"content_hash": sha, "phash": phash} for key, (sha, phash) in hashes.items()}
        return self._update(wanted, "hash updates")

    def exact_groups(self) -> list[tuple[str, int]]:
        """A terms aggregation on content_hash keeping the values 2 or more documents share, the largest
        MAX_GROUPS of them (search.max_buckets is 65,535 by default: OpenSearch docs, "Bucket aggregations")."""
        body = {
            "size": 0,
            "query": {"match_all": {}},
            "aggs": {
                "groups": {
                    "terms": {
                        "field": "content_hash",
                        "min_doc_count": 2,
                        "size": MAX_GROUPS,
                        "shard_size": MAX_GROUPS,
                        "exclude": [""],
                    }
                }
            },
        }
        self._see_own_writes()
        resp = self._call("grouping by content hash", self.client.search, index=self.name, body=body)
        return [(b["key"], int(b["doc_count"])) for b in resp["aggregations"]["groups"]["buckets"]]

    def members(self, content_hashes: Sequence[str], cap: int) -> dict[str, list[str]]:
        """One terms aggregation over the given hashes, each bucket's first `cap` ids (top_hits, by key)."""
        found: dict[str, list[str]] = {h: [] for h in content_hashes}
        if not found:
            return found
        # top_hits returns at most index.max_inner_result_window (100) hits per bucket.
        size = min(cap, 100)
        body = {
            "size": 0,
            "query": {"terms": {"content_hash": list(found)}},
            "aggs": {
                "groups": {
                    "terms": {"field": "content_hash", "size": len(found)},
                    "aggs": {
                        "first": {
                            "top_hits": {"size": size, "_source": False, "sort": [{"key": "asc"}, {"bucket": "asc"}]}
                        }
                    },
                }
            },
        }
        self._see_own_writes()
        resp = self._call("listing duplicate groups", self.client.search, index=self.name, body=body)
        for bucket in resp["aggregations"]["groups"]["buckets"]:
            found[bucket["key"]] = [h["_id"] for h in bucket["first"]["hits"]["hits"]]
        return found

    def perceptual_hashes(self) -> list[tuple[str, str, str]]:
        self._require_schema(3, "perceptual hashes")
        query = {"exists": {"field": "phash"}}
        found = self._scan(query, ["content_hash", "phash"], "listing perceptual hashes", page=5000, doc_values=True)
        return [(s["_id"], s.get("content_hash") or "", s["phash"]) for s in found]

    def documents(self, ids: Sequence[str]) -> dict[str, Document]:
        wanted = list(dict.fromkeys(ids))
        out: dict[str, Document] = {}
        self._see_own_writes()
        for start in range(0, len(wanted), 500):
            got = self._call(
                "reading documents", self.client.mget, index=self.name, body={"ids": wanted[start : start + 500]}
            )
            out.update((e["_id"], _document(e["_source"])) for e in got.get("docs", []) if e.get("found"))
        return out

    def count(self) -> int:
        self._see_own_writes()
        return int(self._call("a count", self.client.count, index=self.name)["count"])

    def info(self) -> IndexInfo:
        return IndexInfo(
            backend=self.backend,
            name=self.name,
            model=self.model,
            dim=self.dim,
            count=self.count(),
            extra={
                "schema_version": self.schema,
                "url": self.url,
                "engine": self.engine,
                "space_type": "cosinesimil",
                "m": self.m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            },
        )

    def drop(self) -> None:
        """Delete the whole OpenSearch index: every physical index of this name, old ones included (tests)."""
        self.delete_physical(set(self.targets()) | (set(self.generations()) if self._alias is None else set()))

    def delete_physical(self, names: Iterable[str]) -> None:
        """Delete these physical indexes (an old one after a reindex); one already gone is no error."""
        for name in sorted(names):
            try:
                self._call(
                    "deleting the index", self.client.indices.delete, index=name, expect=(os_errors.NotFoundError,)
                )
            except os_errors.NotFoundError:
                pass

    # -- physical indexes (clipsearch reindex) ------------------------------------------------

    @property
    def built_for(self) -> str:
        """The name this physical index serves (recorded at creation; an older index: its own name)."""
        return str(self._meta.get("alias", self.name))

    def targets(self) -> list[str]:
        """The physical indexes this name reads: [name] for a plain index, the alias's index otherwise."""
        try:
            got = self._call(
                "resolving the alias", self.client.indices.get_alias, index=self.name, expect=(os_errors.NotFoundError,)
            )
        except os_errors.NotFoundError:
            return []
        return sorted(got)

    def pinned(self) -> OpenSearchIndex:
        """This index opened by its physical name, sharing the client: it keeps reading its own model's vectors
        after a reindex moves the alias, so a server swaps to the new index only with the new model."""
        targets = self.targets()
        if len(targets) != 1 or targets == [self.name]:
            # A plain index: its first reindex turns its name into an alias, so hits are checked instead.
            self._expect = self.name
            return self
        pinned = copy.copy(self)
        pinned.name, pinned._alias, pinned._expect = targets[0], self.name, targets[0]
        meta = pinned._load_meta()  # the alias may have moved since this object read its model
        if meta is None or (meta["model"], int(meta["dim"])) != (self.model, self.dim):
            raise Unavailable(f"OpenSearch index {self.name!r} moved to another model while opening; retry")
        return pinned

    def _check_physical(self, found: list[dict[str, Any]]) -> None:
        """A pinned plain index whose name a reindex turned into an alias reads another model's vectors now."""
        if self._expect is not None and any(h.get("_index", self._expect) != self._expect for h in found):
            raise IndexMoved(f"OpenSearch index {self.name!r} now leads to an index of another model")

    def _generation_metas(self) -> dict[str, dict[str, Any]]:
        """physical name -> its clipsearch `_meta`, for every physical index built for this name."""
        got = self._call(
            "listing physical indexes",
            self.client.indices.get_mapping,
            index=f"{self.name}-*",
            params={"allow_no_indices": "true", "ignore_unavailable": "true"},
        )
        metas = {name: entry.get("mappings", {}).get("_meta", {}).get("clipsearch", {}) for name, entry in got.items()}
        return {name: meta for name, meta in metas.items() if meta.get("alias") == self.name}

    def generations(self) -> list[str]:
        """Every physical index built for this name (`NAME-<slug>-<n>`, its `_meta` says so), in use or not."""
        return sorted(self._generation_metas())

    def _numbered(self, model: str, metas: dict[str, dict[str, Any]]) -> dict[int, str]:
        slug = model_slug(model)
        found = ((generation_number(name, self.name, slug), name) for name in metas)
        return {n: name for n, name in found if n is not None}

    def next_physical(self, model: str) -> str:
        """The name of the next physical index for model: `NAME-<slug>-<n>` with n one above any in use."""
        return f"{self.name}-{model_slug(model)}-{max(self._numbered(model, self._generation_metas()), default=0) + 1}"

    def unfinished(self, model: str) -> str | None:
        """The newest physical index a reindex began for model and never switched to (its `_meta` says
        building), which a new reindex resumes; None when there is none."""
        metas = self._generation_metas()
        building = [
            n
            for n, name in self._numbered(model, metas).items()
            if metas[name].get("building") and metas[name].get("model") == model
        ]
        return f"{self.name}-{model_slug(model)}-{max(building)}" if building else None

    def finish(self) -> None:
        """Record that this physical index is complete, before an alias first leads to it: a reindex never
        resumes it from then on, as it may come to hold documents of pictures deleted since."""
        found = self._load_meta() or self._meta  # as it is now, not as this object opened it
        if found.get("building"):
            self._put_meta("recording the index complete", {k: v for k, v in found.items() if k != "building"})

    def switch_alias(self, physical: str) -> list[str]:
        """Point this name at physical in one atomic `_aliases` call; returns the physical indexes it left.

        An alias cannot share a plain index's name, so a plain index is removed in that same call
        (remove_index, OpenSearch docs "Alias API"): it cannot be kept. A reader sees the old index or the
        new one, never neither.
        """
        old = self.targets()
        if self.name in old:
            actions: list[dict[str, Any]] = [{"remove_index": {"index": self.name}}]
        else:
            actions = [{"remove": {"index": name, "alias": self.name}} for name in old]
        actions.append({"add": {"index": physical, "alias": self.name}})
        self._call("switching the alias", self.client.indices.update_aliases, body={"actions": actions})
        return [name for name in old if name != self.name]

    def close(self) -> None:
        # A CLI run that wrote something should be searchable by the next command at once.
        try:
            self._see_own_writes()
        except NotFound:
            pass
        self.client.close()

    def scan(self, batch: int = 500) -> Iterator[list[Document]]:
        """Every document with its vector, sorted by (key, bucket), one search_after page per batch.

        search_after on the unique (key, bucket) pair, as fingerprints() does, rather than a scroll or a
        point in time: it holds no context on the node between pages and also works on Serverless. The
        vector comes from _source: the mapping clipsearch creates keeps it there (no `_source.excludes`);
        an index that leaves it out is refused, since the vector cannot be rebuilt without re-encoding.
        """
        after: list[Any] | None = None
        self._see_own_writes()
        while True:
            body: dict[str, Any] = {
                "size": min(batch, MAX_K),
                "query": {"match_all": {}},
                "sort": [{"key": "asc"}, {"bucket": "asc"}],
                "track_total_hits": False,
            }
            if after is not None:
                body["search_after"] = after
            hits = self._call("reading documents", self.client.search, index=self.name, body=body)["hits"]["hits"]
            docs = []
            for h in hits:
                source = h.get("_source", {})  # absent where the mapping disables _source
                if VECTOR_FIELD not in source:
                    raise IndexError_(
                        f"OpenSearch index {self.name!r} keeps no {VECTOR_FIELD!r} in _source (document {h['_id']}); "
                        "its vectors cannot be read back, so it cannot be copied without re-encoding"
                    )
                docs.append(document_from(source, np.asarray(source[VECTOR_FIELD], dtype=np.float32)))
            if docs:
                yield docs
            if len(hits) < min(batch, MAX_K):
                return
            after = hits[-1]["sort"]


def _hit(h: dict[str, Any], cos: float) -> Hit:
    s = h.get("_source", {})
    return Hit(
        id=h["_id"],
        key=s.get("key", ""),
        score=cos,
        title=s.get("title", ""),
        bucket=s.get("bucket", ""),
        width=int(s.get("width", 0)),
        height=int(s.get("height", 0)),
        taken_at=s.get("taken_at"),
        taken_offset=s.get("taken_offset") or "",
    )


def _document(s: dict[str, Any]) -> Document:
    """A Document from a stored _source."""
    return Document(
        key=s["key"],
        bucket=s.get("bucket", ""),
        title=s.get("title", ""),
        content_hash=s.get("content_hash", ""),
        size=int(s.get("size", 0)),
        mtime=float(s.get("mtime", 0)),
        width=int(s.get("width", 0)),
        height=int(s.get("height", 0)),
        indexed_at=float(s.get("indexed_at", 0)),
        vector=np.asarray(s[VECTOR_FIELD], dtype=np.float32),
        taken_at=s.get("taken_at"),
        taken_offset=s.get("taken_offset") or "",
        phash=s.get("phash"),
    )


class _Serializer(JSONSerializer):
    """Request bodies through orjson: a float32 vector goes out as float32's shortest round-trip text.

    json writes a vector's floats as float64 text (17 significant digits); orjson writes the same float32
    values in at most 9 digits, about 45% fewer bytes for the node to read (exactly the same values: 9
    digits identify any float32), and ~70x faster: 9 us instead of 0.67 ms for 512 floats. Responses are
    read by orjson too. Anything orjson cannot write goes to the client's own conversions (default()).
    """

    def dumps(self, data: Any) -> Any:
        if isinstance(data, str | bytes):  # already a body, as the client's own serializer leaves it
            return data
        try:
            return orjson.dumps(data, default=self.default, option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8")
        except orjson.JSONEncodeError as e:
            raise os_errors.SerializationError(data, e) from None

    def loads(self, s: str) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            return super().loads(s)  # the client's error for a body that is not JSON


class _BulkClient:
    """What the bulk helpers call: the client's serializer, and bulk requests through OpenSearchIndex._call."""

    def __init__(self, index: OpenSearchIndex, attempts: _Attempts | None) -> None:
        self._index, self._attempts = index, attempts
        self.transport = index.client.transport

    def bulk(self, body: str) -> Any:
        return self._index._call("a bulk write", self._index.client.bulk, body=body, attempts=self._attempts)


def _as_is(action: _Action) -> _Action:
    return action


class _Attempts:
    """A budget of attempts, one call's or shared by the passes of a bulk write."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0

    @property
    def left(self) -> int:
        return self.total - self.used

    def take(self) -> int:
        """Count one attempt (there is always a first); returns its number from 0, for the backoff."""
        self.used += 1
        return self.used - 1


def _reason(e: os_errors.TransportError) -> str:
    info = e.info
    if isinstance(info, dict) and isinstance(info.get("error"), dict):
        err = info["error"]
        return f"{err.get('type', 'error')}: {err.get('reason', '')}"
    return f"{e.status_code} {e.error}"


def _item_reason(res: dict[str, Any]) -> str:
    err = res.get("error")
    if isinstance(err, dict):
        return f"{res.get('status')} {err.get('type', 'error')}: {err.get('reason', '')}"
    return f"{res.get('status')} {err or res.get('result', 'failed')}"


def _make_client(
    url: str | None,
    auth: str | None,
    username: str | None,
    password: str | None,
    region: str | None,
    service: str | None,
    timeout_s: float,
) -> tuple[str, OpenSearch, str]:
    """Build the client for none/basic/sigv4 auth; returns (url without credentials, client, service)."""
    url = url or os.environ.get("CLIPSEARCH_OPENSEARCH_URL")
    if not url:
        raise ConfigError("no OpenSearch URL: pass --opensearch-url or set CLIPSEARCH_OPENSEARCH_URL")
    auth = (auth or os.environ.get("CLIPSEARCH_OPENSEARCH_AUTH") or "none").lower()
    if auth not in AUTH_MODES:
        raise ConfigError(f"unknown OpenSearch auth {auth!r}; choose one of {', '.join(AUTH_MODES)}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad OpenSearch URL {url!r}: expected http(s)://host[:port]")
    host = parts.hostname
    clean = urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))
    service = service or ("aoss" if host.endswith(".aoss.amazonaws.com") else "es")
    http_auth: Any = None
    if auth == "basic":
        env = os.environ
        username = username or unquote(parts.username or "") or env.get("CLIPSEARCH_OPENSEARCH_USER")
        password = password or unquote(parts.password or "") or env.get("CLIPSEARCH_OPENSEARCH_PASSWORD")
        if not username or not password:
            raise ConfigError(
                "basic auth needs a user and password: put them in the URL or set "
                "CLIPSEARCH_OPENSEARCH_USER and CLIPSEARCH_OPENSEARCH_PASSWORD"
            )
        http_auth = (username, password)
    elif auth == "sigv4":
        http_auth = _sigv4_auth(host, region, service)
    client = OpenSearch(
        hosts=[clean],
        http_auth=http_auth,
        connection_class=RequestsHttpConnection,
        use_ssl=parts.scheme == "https",
        verify_certs=parts.scheme == "https",
        timeout=timeout_s,
        # Retries (with backoff, which the transport's own retry lacks) happen in OpenSearchIndex._call.
        max_retries=0,
        # gzip pays off over a network; on loopback it only costs CPU.
        http_compress=parts.scheme == "https",
        serializer=_Serializer(),
    )
    return clean, client, service


def _sigv4_auth(host: str, region: str | None, service: str) -> Any:
    import boto3
    from requests_aws4auth import AWS4Auth

    session = boto3.Session()
    region = region or session.region_name or _region_from_host(host)
    if not region:
        raise ConfigError("SigV4 needs an AWS region: set AWS_REGION")
    credentials = session.get_credentials()
    if credentials is None:
        raise ConfigError("SigV4 needs AWS credentials, and none were found")
    # Refreshable credentials keep a long-lived Lambda container signing with fresh keys.
    return AWS4Auth(refreshable_credentials=credentials, region=region, service=service)


def _region_from_host(host: str) -> str | None:
    match = re.search(r"\.([a-z]{2}(?:-[a-z]+)+-\d)\.(?:es|aoss)\.amazonaws\.com$", host)
    return match.group(1) if match else None
