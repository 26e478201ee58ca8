"""OpenSearch backend: a k-NN index (HNSW, cosine) on a local node or Amazon OpenSearch Service.

The index records the model spec and dimension in its mapping's `_meta`, like the embedded
index does in SQLite, and refuses another model. Scores leave as cosine: cos = 2 * score - 1.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
from opensearchpy import OpenSearch, RequestsHttpConnection
from opensearchpy import exceptions as os_errors
from opensearchpy import helpers as os_helpers

from clipsearch.errors import BadRequest, ConfigError, NotFound, Unavailable
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
)

__all__ = ["OpenSearchIndex", "ENGINES", "AUTH_MODES", "MAX_K"]

# 1: the first release. 2: taken_at (a `date` holding the wall-clock capture time with no zone, so
# OpenSearch's UTC handling shifts nothing) and taken_offset (keyword). An older index gets the two fields
# (put_mapping) and the new version in `_meta` on its first write; a search never changes it.
SCHEMA_VERSION = 2
# yyyy-MM-dd'T'HH:mm:ss (OpenSearch docs, "Date field type": built-in formats).
TAKEN_FORMAT = "strict_date_hour_minute_second"
_DATE_FIELDS: dict[str, Any] = {
    "taken_at": {"type": "date", "format": TAKEN_FORMAT},
    "taken_offset": {"type": "keyword"},
}
ENGINES = ("lucene", "faiss")
AUTH_MODES = ("none", "basic", "sigv4")
VECTOR_FIELD = "vector"
# The k-NN plugin caps k at 10000, and index.max_result_window caps from + size at the same.
MAX_K = 10_000
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
    ) -> None:
        """deadline(): the seconds the caller has left (a Lambda's budget). With it, no attempt starts (opening
        included) unless timeout_s still fits, no backoff sleeps past it, and a bulk write's passes share one
        budget of max_retries + 1 attempts; without it (the CLI), each call retries on its own.
        bulk_clients: how many bulk requests of one upsert run at once (the CLI's --bulk-load); needs no deadline.
        """
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
        }
        settings: dict[str, Any] = {"index.knn": True}
        if self.service != "aoss":  # Serverless manages shards, replicas and refresh itself.
            settings.update(
                {"number_of_shards": shards, "number_of_replicas": replicas, "refresh_interval": refresh_interval}
            )
        body = {
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
                },
            },
        }
        try:
            self._call(
                "creating the index",
                self.client.indices.create,
                index=self.name,
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
        """Bring an older index to SCHEMA_VERSION before its first write: add the fields, record the version.

        Adding fields to an existing mapping is allowed (OpenSearch docs, "Create or update mappings"), and
        `_meta` is replaced as a whole, so it is sent complete.
        """
        if self.schema >= SCHEMA_VERSION:
            return
        meta = {**self._meta, "schema_version": SCHEMA_VERSION}
        self._call(
            "migrating the mapping",
            self.client.indices.put_mapping,
            index=self.name,
            body={"_meta": {"clipsearch": meta}, "properties": _DATE_FIELDS},
        )
        self._meta, self.schema = meta, SCHEMA_VERSION

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
                VECTOR_FIELD: vec.tolist(),
                "key": d.key,
                "bucket": d.bucket,
                "title": d.title,
                "content_hash": d.content_hash,
                "size": d.size,
                "mtime": d.mtime,
                "width": d.width,
                "height": d.height,
                "model": self.model,
                "indexed_at": d.indexed_at or now,
                "taken_at": d.taken_at,
                "taken_offset": d.taken_offset,
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
        s = resp["_source"]
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
        )

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
        filters: list[dict[str, Any]] = []
        if prefix:
            filters.append({"prefix": {"key": prefix}})
        if taken:
            if self.schema < 2:  # migrated since this process opened it (a warm search Lambda)?
                meta = self._load_meta() or {}
                if int(meta.get("schema_version", 1)) >= 2:
                    self._meta, self.schema = meta, int(meta["schema_version"])
            if self.schema < 2:
                raise BadRequest(
                    f"OpenSearch index {self.name!r} has no capture dates yet (it was written by an "
                    "older clipsearch): run `clipsearch index` once to add them"
                )
            bounds = {op: value for op, value in (("gte", taken.after), ("lt", taken.before)) if value}
            filters.append({"range": {"taken_at": {**bounds, "format": TAKEN_FORMAT}}})
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
        hits = []
        for h in resp["hits"]["hits"]:
            s = h.get("_source", {})
            hits.append(
                Hit(
                    id=h["_id"],
                    key=s.get("key", ""),
                    score=_score_to_cos(float(h["_score"])),
                    title=s.get("title", ""),
                    bucket=s.get("bucket", ""),
                    width=int(s.get("width", 0)),
                    height=int(s.get("height", 0)),
                    taken_at=s.get("taken_at"),
                    taken_offset=s.get("taken_offset") or "",
                )
            )
        return hits

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
        if self.schema < 2:
            return set()
        query: dict[str, Any] = {"bool": {"must_not": [{"exists": {"field": "taken_at"}}]}}
        if prefix:
            query["bool"]["filter"] = [{"prefix": {"key": prefix}}]
        out: set[str] = set()
        after: list[Any] | None = None
        self._see_own_writes()
        while True:
            body: dict[str, Any] = {
                "size": 1000,
                "query": query,
                "_source": ["key"],
                "sort": [{"key": "asc"}, {"bucket": "asc"}],
                "track_total_hits": False,
            }
            if after is not None:
                body["search_after"] = after
            hits = self._call("listing undated keys", self.client.search, index=self.name, body=body)["hits"]["hits"]
            out.update(h["_source"]["key"] for h in hits)
            if len(hits) < 1000:
                return out
            after = hits[-1]["sort"]

    def set_taken(self, taken: dict[str, tuple[str, str]]) -> int:
        """Fill in capture times (key -> (taken_at, taken_offset)) by partial updates; vectors are kept."""
        self._migrate()
        wanted = {doc_id("", key): value for key, value in taken.items()}
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
            at, offset = wanted[entry["_id"]]
            doc: dict[str, Any] = {"taken_at": at, "taken_offset": offset}
            if entry.get("_source", {}).get("indexed_at") is not None:
                doc["indexed_at"] = repr(float(entry["_source"]["indexed_at"]))
            actions[entry["_id"]] = ({"update": {"_index": self.name, "_id": entry["_id"]}}, {"doc": doc})
        done, failed = self._bulk(actions)
        if failed:
            raise IndexError_(f"{len(failed)} capture-date updates failed, e.g. {next(iter(failed.values()))}")
        return done

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
        """Delete the whole OpenSearch index (tests and benchmarks)."""
        try:
            self._call(
                "deleting the index", self.client.indices.delete, index=self.name, expect=(os_errors.NotFoundError,)
            )
        except os_errors.NotFoundError:
            pass

    def close(self) -> None:
        # A CLI run that wrote something should be searchable by the next command at once.
        try:
            self._see_own_writes()
        except NotFound:
            pass
        self.client.close()


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
