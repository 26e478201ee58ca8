"""OpenSearchIndex against the real OpenSearch node with the k-NN plugin (CLIPSEARCH_OPENSEARCH_URL)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pytest
from opensearchpy import OpenSearch
from opensearchpy import exceptions as os_errors

from clipsearch.errors import BadRequest, ConfigError, ModelMismatch, NotFound, Unavailable
from clipsearch.index import open_index
from clipsearch.index.base import Document, doc_id
from clipsearch.index.opensearch import OpenSearchIndex, _make_client

pytestmark = pytest.mark.opensearch

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def docs_for(vectors: np.ndarray, prefix: str = "photos/", bucket: str = "images") -> list[Document]:
    return [
        Document(
            key=f"{prefix}{i:04d}.jpg",
            vector=v,
            bucket=bucket,
            title=f"photo {i}",
            content_hash=f"h{i}",
            size=1000 + i,
            mtime=1.7e9 + i,
            width=64,
            height=48,
            indexed_at=1.7e9,
        )
        for i, v in enumerate(vectors)
    ]


class RecordingClient:
    """Wraps the real client: records search bodies, and fails bulk items or calls on demand."""

    def __init__(self, real: OpenSearch) -> None:
        self._real = real
        self.indices = real.indices
        self.search_bodies: list[dict[str, Any]] = []
        self.bulk_calls = 0
        self.reject_ids_once: set[str] = set()
        self.fail_calls_with: list[Exception] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def search(self, index: str, body: dict[str, Any]) -> Any:
        self.search_bodies.append(body)
        return self._real.search(index=index, body=body)

    def bulk(self, body: str) -> Any:
        self.bulk_calls += 1
        if self.fail_calls_with:
            raise self.fail_calls_with.pop(0)
        if not self.reject_ids_once:
            return self._real.bulk(body=body)
        # Answer as a node whose write queue is full would: 429 for those items, the rest written.
        lines = body.splitlines(keepends=True)
        kept: list[tuple[str, str]] = []
        rejected: list[tuple[str, str]] = []
        for action, source in zip(lines[::2], lines[1::2], strict=True):
            id_ = next(iter(json.loads(action).values()))["_id"]
            (rejected if id_ in self.reject_ids_once else kept).append((id_, action + source))
        resp = self._real.bulk(body="".join(t for _, t in kept)) if kept else {"items": []}
        items = list(resp["items"]) + [
            {
                "index": {
                    "_id": i,
                    "status": 429,
                    "error": {"type": "es_rejected_execution_exception", "reason": "queue full"},
                }
            }
            for i, _ in rejected
        ]
        self.reject_ids_once.clear()
        return {"errors": True, "items": items}


def test_new_index_has_knn_hnsw_lucene_cosine_mapping_and_records_model(make_index) -> None:
    # GIVEN a fresh index opened with a model and dimension
    idx = make_index(m=8, ef_construction=64)
    # WHEN its settings and mapping are read back from the node
    (physical,) = idx.targets()  # the name is an alias over one physical index
    settings = idx.client.indices.get_settings(index=idx.name)[physical]["settings"]["index"]
    mapping = idx.client.indices.get_mapping(index=idx.name)[physical]["mappings"]
    # THEN k-NN is on, replicas are 0 and the vector field is HNSW/lucene/cosine with our parameters
    assert settings["knn"] == "true"
    assert settings["number_of_replicas"] == "0"
    field = mapping["properties"]["vector"]
    assert field["type"] == "knn_vector" and field["dimension"] == DIM
    assert field["method"]["name"] == "hnsw"
    assert field["method"]["engine"] == "lucene"
    assert field["method"]["space_type"] == "cosinesimil"
    assert field["method"]["parameters"] == {"m": 8, "ef_construction": 64}
    for name in ("key", "bucket", "title", "content_hash", "size", "width", "height", "model", "indexed_at"):
        assert name in mapping["properties"], name
    assert mapping["_meta"]["clipsearch"]["model"] == "fake"
    assert mapping["_meta"]["clipsearch"]["dim"] == DIM


def test_reopening_without_a_model_uses_the_recorded_model(make_index, opensearch_url) -> None:
    # GIVEN an index built with model "fake"
    idx = make_index()
    # WHEN it is opened through the factory with no model
    again = open_index("opensearch", idx.name, url=opensearch_url)
    # THEN the recorded model and dimension come back
    assert (again.model, again.dim) == ("fake", DIM)
    assert again.info().as_dict()["backend"] == "opensearch"


def test_another_model_or_dimension_is_refused(make_index, opensearch_url) -> None:
    # GIVEN an index built with model "fake" at DIM
    idx = make_index()
    # WHEN it is opened with another model, or another dimension
    # THEN both are refused with the same typed error the embedded backend uses
    with pytest.raises(ModelMismatch, match="fake"):
        OpenSearchIndex(idx.name, model="RN50", dim=1024, url=opensearch_url)
    with pytest.raises(ModelMismatch, match="dimension"):
        OpenSearchIndex(idx.name, model="fake", dim=DIM + 1, url=opensearch_url)


def test_opening_a_missing_index_without_a_model_is_not_found(opensearch_url) -> None:
    with pytest.raises(NotFound, match="clipsearch index"):
        OpenSearchIndex(f"cs-missing-{uuid.uuid4().hex[:8]}", url=opensearch_url)


def test_an_index_not_made_by_clipsearch_is_refused(make_index, opensearch_url) -> None:
    # GIVEN an index created by someone else, with no clipsearch _meta
    name = f"cs-foreign-{uuid.uuid4().hex[:8]}"
    client = OpenSearch(hosts=[opensearch_url])
    client.indices.create(index=name, body={"mappings": {"properties": {"x": {"type": "keyword"}}}})
    try:
        # WHEN clipsearch opens it THEN it says so instead of writing into it
        with pytest.raises(ConfigError, match="not created by clipsearch"):
            OpenSearchIndex(name, model="fake", dim=DIM, url=opensearch_url)
    finally:
        client.indices.delete(index=name)


def test_upsert_uses_the_deterministic_id_so_reprocessing_never_duplicates(make_index) -> None:
    # GIVEN ten documents indexed once
    idx = make_index()
    docs = docs_for(unit(np.random.default_rng(1), 10))
    assert idx.upsert(docs).written == 10
    # WHEN the same objects are processed again with new vectors
    again = docs_for(unit(np.random.default_rng(2), 10))
    result = idx.upsert(again)
    idx.refresh()
    # THEN there are still ten documents, under doc_id(bucket, key), holding the new vectors
    assert result.written == 10 and result.failed == {}
    assert idx.count() == 10
    stored = idx.get(doc_id("images", "photos/0003.jpg"))
    assert stored is not None
    np.testing.assert_allclose(stored.vector, again[3].vector, atol=1e-7)


def test_get_round_trips_every_field(make_index) -> None:
    idx = make_index()
    doc = docs_for(unit(np.random.default_rng(3), 1))[0]
    idx.upsert([doc])
    got = idx.get(doc.id)
    assert got is not None
    assert (got.key, got.bucket, got.title, got.content_hash) == (doc.key, doc.bucket, doc.title, doc.content_hash)
    assert (got.size, got.mtime, got.width, got.height, got.indexed_at) == (
        doc.size,
        doc.mtime,
        doc.width,
        doc.height,
        doc.indexed_at,
    )
    np.testing.assert_allclose(got.vector, doc.vector, atol=1e-7)
    assert idx.get("no-such-id") is None


def test_bulk_partial_failure_is_reported_per_item_and_the_rest_is_written(make_index) -> None:
    # GIVEN a batch where the node rejects one document (a zero vector has no cosine)
    # and one has the wrong dimension
    idx = make_index()
    docs = docs_for(unit(np.random.default_rng(4), 5))
    zero = Document(key="photos/blank.jpg", vector=np.zeros(DIM, np.float32), bucket="images")
    short = Document(key="photos/short.jpg", vector=np.ones(DIM - 1, np.float32), bucket="images")
    # WHEN the batch is upserted
    result = idx.upsert([*docs, zero, short])
    idx.refresh()
    # THEN both failures are named by id with a reason, and the five good documents are searchable
    assert result.written == 5
    assert set(result.failed) == {zero.id, short.id}
    assert "mapper_parsing_exception" in result.failed[zero.id]
    assert "dimension" in result.failed[short.id]
    assert idx.count() == 5
    assert idx.search(docs[0].vector, k=1)[0].id == docs[0].id


def test_items_rejected_with_429_are_retried_until_written(make_index) -> None:
    # GIVEN a node that rejects two items of the first bulk request with 429
    idx = make_index(backoff_s=0.01)
    recording = RecordingClient(idx.client)
    idx.client = recording
    docs = docs_for(unit(np.random.default_rng(5), 6))
    recording.reject_ids_once = {docs[1].id, docs[4].id}
    # WHEN the batch is upserted
    result = idx.upsert(docs)
    idx.refresh()
    # THEN only the rejected items were sent again, and everything is written
    assert recording.bulk_calls == 2
    assert result.written == 6 and result.failed == {}
    assert idx.count() == 6


def test_a_bulk_call_failing_with_503_then_succeeding_is_retried(make_index) -> None:
    idx = make_index(backoff_s=0.01)
    recording = RecordingClient(idx.client)
    idx.client = recording
    recording.fail_calls_with = [
        os_errors.TransportError(503, "unavailable", {}),
        os_errors.ConnectionError("N/A", "connection reset", None),
    ]
    result = idx.upsert(docs_for(unit(np.random.default_rng(6), 3)))
    assert recording.bulk_calls == 3
    assert result.written == 3


def test_an_unreachable_node_is_unavailable_after_retries() -> None:
    # GIVEN a URL where nothing listens
    # WHEN the index is opened THEN, after the retries, the typed Unavailable error comes out
    with pytest.raises(Unavailable, match="unavailable"):
        OpenSearchIndex(
            "x", model="fake", dim=DIM, url="http://127.0.0.1:9", max_retries=1, backoff_s=0.01, timeout_s=2
        )


class SecondsLeft:
    """A caller's deadline: deadline() gives the seconds left, set by the test."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def test_with_a_deadline_bulk_passes_and_their_requests_share_one_budget_of_attempts(make_index) -> None:
    # GIVEN a node whose bulk endpoint fails three times with 503, then keeps rejecting one item with 429
    docs = docs_for(unit(np.random.default_rng(7), 2))

    class Rejecting(RecordingClient):
        def bulk(self, body: str) -> Any:
            self.reject_ids_once = {docs[0].id}  # on every pass
            return super().bulk(body)

    idx = make_index(backoff_s=0.01, max_retries=3, deadline=SecondsLeft(100.0))
    recording = Rejecting(idx.client)
    idx.client = recording
    recording.fail_calls_with = [os_errors.TransportError(503, "unavailable", {}) for _ in range(3)]
    # WHEN the batch is upserted
    result = idx.upsert(docs)
    # THEN four requests in all (not four per pass), and the rejected item is reported, the other written
    assert recording.bulk_calls == 4
    assert list(result.failed) == [docs[0].id] and result.written == 1


def test_without_a_deadline_each_bulk_pass_keeps_its_own_retries(make_index) -> None:
    # The CLI's behaviour: the 503s use up the first pass's retries, the 429 item gets its own passes.
    idx = make_index(backoff_s=0.01, max_retries=3)
    recording = RecordingClient(idx.client)
    idx.client = recording
    docs = docs_for(unit(np.random.default_rng(8), 2))
    recording.fail_calls_with = [os_errors.TransportError(503, "unavailable", {}) for _ in range(3)]
    recording.reject_ids_once = {docs[0].id}
    result = idx.upsert(docs)
    assert recording.bulk_calls == 5 and result.failed == {} and result.written == 2


def test_with_a_deadline_no_attempt_starts_and_no_backoff_sleeps_past_it(make_index) -> None:
    left = SecondsLeft(100.0)
    idx = make_index(timeout_s=10.0, backoff_s=4.0, deadline=left)
    recording = RecordingClient(idx.client)
    idx.client = recording
    docs = docs_for(unit(np.random.default_rng(9), 1))
    # GIVEN less than one attempt's timeout left WHEN writing THEN Unavailable, and nothing was sent
    left.seconds = 9.0
    with pytest.raises(Unavailable, match="too little time"):
        idx.upsert(docs)
    assert recording.bulk_calls == 0
    # GIVEN time for one attempt but not for a backoff (2-4 s) and another: one request, then Unavailable
    left.seconds = 12.0
    recording.fail_calls_with = [os_errors.TransportError(503, "unavailable", {}) for _ in range(3)]
    with pytest.raises(Unavailable, match="no time left to retry"):
        idx.upsert(docs)
    assert recording.bulk_calls == 1


def test_with_too_little_time_left_opening_the_index_sends_nothing() -> None:
    # Opening reads the mapping (and may create the index): those are calls under the deadline too.
    with pytest.raises(Unavailable, match="too little time left for OpenSearch reading the mapping"):
        OpenSearchIndex("x", model="fake", dim=DIM, url="http://127.0.0.1:9", timeout_s=10.0, deadline=SecondsLeft(5.0))


def test_delete_removes_documents_and_counts_only_those_that_existed(make_index) -> None:
    idx = make_index()
    docs = docs_for(unit(np.random.default_rng(7), 8))
    idx.upsert(docs)
    assert idx.delete([docs[0].id, docs[1].id, "never-there"]) == 2
    idx.refresh()
    assert idx.count() == 6
    assert idx.get(docs[0].id) is None
    assert docs[0].id not in {h.id for h in idx.search(docs[0].vector, k=8)}
    assert idx.delete([]) == 0


def test_scores_are_cosine_similarities_from_minus_one_to_one(make_index) -> None:
    # GIVEN a vector, its opposite and an orthogonal one
    idx = make_index()
    e0 = np.eye(DIM, dtype=np.float32)[0]
    e1 = np.eye(DIM, dtype=np.float32)[1]
    idx.upsert(
        [Document(key="same", vector=e0), Document(key="opposite", vector=-e0), Document(key="orthogonal", vector=e1)]
    )
    idx.refresh()
    # WHEN the first is the query
    hits = {h.key: h.score for h in idx.search(e0, k=3)}
    # THEN OpenSearch's (1 + cos) / 2 came back as the cosine itself
    assert hits["same"] == pytest.approx(1.0, abs=1e-6)
    assert hits["orthogonal"] == pytest.approx(0.0, abs=1e-6)
    assert hits["opposite"] == pytest.approx(-1.0, abs=1e-6)


def test_query_shape_excludes_the_vector_keeps_k_at_least_from_plus_size_and_filters_inside_knn(
    make_index,
) -> None:
    idx = make_index()
    recording = RecordingClient(idx.client)
    idx.client = recording
    vectors = unit(np.random.default_rng(8), 30)
    idx.upsert(docs_for(vectors))
    idx.refresh()
    hits = idx.search(vectors[0], k=5, offset=10, min_score=0.0, prefix="photos/00")
    body = recording.search_bodies[-1]
    knn = body["query"]["knn"]["vector"]
    assert "vector" not in body["_source"]
    assert (body["from"], body["size"], knn["k"]) == (10, 5, 15)
    assert knn["filter"] == {"prefix": {"key": "photos/00"}}
    assert body["min_score"] == pytest.approx(0.5)
    assert len(hits) <= 5 and all(h.key.startswith("photos/00") for h in hits)


def test_from_plus_k_beyond_the_knn_limit_is_a_bad_request(make_index) -> None:
    idx = make_index()
    with pytest.raises(BadRequest, match="10000"):
        idx.search(np.ones(DIM, np.float32), k=100, offset=9950)


def test_fingerprints_list_size_and_mtime_under_a_prefix(make_index) -> None:
    idx = make_index()
    vectors = unit(np.random.default_rng(9), 4)
    idx.upsert(docs_for(vectors[:2], prefix="a/") + docs_for(vectors[2:], prefix="b/"))
    idx.refresh()
    assert idx.fingerprints("a/") == {"a/0000.jpg": (1000, 1.7e9), "a/0001.jpg": (1001, 1.7e9 + 1)}
    assert len(idx.fingerprints()) == 4


def test_reads_after_own_writes_see_them_without_an_explicit_refresh(make_index) -> None:
    # GIVEN an index whose refresh interval is long
    idx = make_index(refresh_interval="60s")
    vectors = unit(np.random.default_rng(12), 4)
    docs = docs_for(vectors)
    # WHEN this process writes and then reads, as the embedded index allows
    idx.upsert(docs)
    # THEN count, search and fingerprints already see the writes, and deletes too
    assert idx.count() == 4
    assert idx.search(vectors[1], k=1)[0].id == docs[1].id
    assert len(idx.fingerprints()) == 4
    idx.delete([docs[1].id])
    assert idx.count() == 3


def test_close_makes_pending_writes_visible_to_the_next_process(make_index, opensearch_url) -> None:
    # GIVEN writes on an index whose refresh interval is long
    idx = make_index(refresh_interval="60s")
    idx.upsert(docs_for(unit(np.random.default_rng(10), 3)))
    # WHEN the writer closes (as the CLI does at the end of `clipsearch index`)
    idx.close()
    # THEN a new reader counts them at once
    assert OpenSearchIndex(idx.name, url=opensearch_url).count() == 3
    idx.client = OpenSearch(hosts=[opensearch_url])  # so the fixture can drop it


def test_sigv4_signed_requests_reach_the_node(make_index, monkeypatch) -> None:
    # GIVEN SigV4 auth with (fake) AWS credentials; the local node ignores the signature,
    # so this checks that signing leaves requests intact, bodies included
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    idx = make_index(auth="sigv4", region="eu-west-1")
    vectors = unit(np.random.default_rng(11), 3)
    idx.upsert(docs_for(vectors))
    idx.refresh()
    assert idx.search(vectors[2], k=1)[0].key == "photos/0002.jpg"


@pytest.mark.parametrize(
    ("url", "service", "region"),
    [
        ("https://search-x-abc.eu-west-1.es.amazonaws.com", "es", "eu-west-1"),
        ("https://abc123.us-east-1.aoss.amazonaws.com", "aoss", "us-east-1"),
    ],
)
def test_sigv4_signs_for_es_or_aoss_in_the_host_region(url, service, region, monkeypatch) -> None:
    from requests_aws4auth import AWS4Auth

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    clean, client, got_service = _make_client(url, "sigv4", None, None, None, None, 5.0)
    auth = client.transport.connection_pool.connections[0].session.auth
    assert isinstance(auth, AWS4Auth)
    assert (got_service, auth.service, auth.region) == (service, service, region)
    assert clean == url


def test_basic_auth_takes_credentials_from_the_url_and_hides_them(monkeypatch) -> None:
    clean, client, _ = _make_client("https://user:p%40ss@search.example:9200", "basic", None, None, None, None, 5.0)
    assert clean == "https://search.example:9200"
    assert client.transport.connection_pool.connections[0].session.auth == ("user", "p@ss")
    monkeypatch.delenv("CLIPSEARCH_OPENSEARCH_USER", raising=False)
    with pytest.raises(ConfigError, match="basic auth"):
        _make_client("https://search.example", "basic", None, None, None, None, 5.0)


def test_bad_settings_fail_with_one_clear_line(monkeypatch) -> None:
    monkeypatch.delenv("CLIPSEARCH_OPENSEARCH_URL", raising=False)
    with pytest.raises(ConfigError, match="CLIPSEARCH_OPENSEARCH_URL"):
        OpenSearchIndex("x", model="fake", dim=DIM)
    with pytest.raises(ConfigError, match="engine"):
        OpenSearchIndex("x", model="fake", dim=DIM, url="http://127.0.0.1:9", engine="nmslib")
    with pytest.raises(ConfigError, match="auth"):
        OpenSearchIndex("x", model="fake", dim=DIM, url="http://127.0.0.1:9", auth="kerberos")
