"""`clipsearch copy`: an index's documents and vectors into another backend and back, never re-encoded.

The source records a checkpoint path that does not exist: a copy must not need the model. The OpenSearch
side is the real local node (indices named copy-..., dropped afterwards).
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opensearchpy import OpenSearch

from clipsearch.aws.ingest import parse_notification
from clipsearch.cli import main
from clipsearch.index.base import DateRange, Document, UpsertResult, VectorIndex, doc_id
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.index.opensearch import OpenSearchIndex
from clipsearch.transfer import copy_index

ROOT = Path(__file__).resolve().parent.parent.parent
N, DIM, SEED = 5000, 128, 20261130
GONE_CHECKPOINT = "/nonexistent/checkpoints/clip-finetuned.pt"  # recorded by the source, absent here
FOLDERS = ("/photos/family/2019/", "/photos/family/2020/", "/photos/work/", "/photos/trips/")
SCORE_TOL = 1e-3


def corpus() -> list[Document]:
    """N documents with every field set, some capture times unknown, spread over four folders."""
    rng = np.random.default_rng(SEED)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    start = datetime.datetime(2018, 6, 30, 22, 0)
    docs = []
    for i in range(N):
        when = None if i % 11 == 5 else (start + datetime.timedelta(hours=7 * i)).isoformat()
        docs.append(
            Document(
                key=f"{FOLDERS[i % len(FOLDERS)]}img {i:05d}.jpg",
                vector=vectors[i],
                title=f"picture {i}",
                content_hash=f"{i:064x}",
                size=1000 + i,
                mtime=1_600_000_000.5 + i,
                width=32 + i % 7,
                height=24 + i % 5,
                indexed_at=1_700_000_000.25 + i,
                taken_at=when,
                taken_offset=("+02:00", "-05:00", "")[i % 3],
            )
        )
    return docs


def every_document(index: VectorIndex) -> dict[str, Document]:
    return {d.id: d for batch in index.scan(700) for d in batch}


def assert_same_documents(got: dict[str, Document], want: dict[str, Document]) -> None:
    """Same ids; every field equal, vectors to float32 precision."""
    assert sorted(got) == sorted(want)
    for id_, doc in want.items():
        a, b = asdict(got[id_]), asdict(doc)
        np.testing.assert_allclose(a.pop("vector"), b.pop("vector"), rtol=1e-6, atol=1e-7)
        assert a == b, doc.key


def copy(*args: str) -> int:
    return main(["copy", *args])


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert not Path(GONE_CHECKPOINT).exists()
    directory = tmp_path_factory.mktemp("copy-source")
    index = EmbeddedIndex(directory, model=GONE_CHECKPOINT, dim=DIM)
    assert index.upsert(corpus()).failed == {}
    index.close()
    return directory


@pytest.fixture(scope="module")
def source(source_dir: Path) -> Iterator[EmbeddedIndex]:
    index = EmbeddedIndex(source_dir, read_only=True)
    yield index
    index.close()


def remote_name(what: str) -> str:
    return f"copy-{what}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def copied(source_dir: Path, opensearch_url: str) -> Iterator[OpenSearchIndex]:
    """The source copied into OpenSearch by the CLI; searched with ef_search >= N, so HNSW answers exactly."""
    name = remote_name("5k")
    status = copy("--index", str(source_dir), "--to-backend", "opensearch", "--to-index", name)
    remote = OpenSearchIndex(name, url=opensearch_url, model=GONE_CHECKPOINT, dim=DIM, ef_search=N)
    try:
        assert status == 0
        yield remote
    finally:
        remote.drop()
        remote.close()


@pytest.fixture(autouse=True)
def _opensearch_env(opensearch_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--opensearch-url's default, as the CLI reads it from the environment when its parser is built."""
    monkeypatch.setenv("CLIPSEARCH_OPENSEARCH_URL", opensearch_url)


@pytest.mark.opensearch
def test_given_5k_embedded_index_when_copied_to_opensearch_then_ids_metadata_and_vectors_are_identical(
    source: EmbeddedIndex, copied: OpenSearchIndex
) -> None:
    # GIVEN 5k documents recorded with a checkpoint that is gone; WHEN copied; THEN all arrive as they were
    assert (copied.model, copied.dim) == (GONE_CHECKPOINT, DIM)
    assert copied.count() == N
    assert_same_documents(every_document(copied), every_document(source))


@pytest.mark.opensearch
def test_given_copied_index_when_the_same_queries_run_on_both_then_the_hits_agree(
    source: EmbeddedIndex, copied: OpenSearchIndex
) -> None:
    # GIVEN the source and its copy; WHEN queried, filtered or not; THEN the same ids in the same order
    rng = np.random.default_rng(SEED + 1)
    queries = rng.standard_normal((12, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # unit, as an encoder gives them
    filters: list[dict[str, Any]] = [
        {},
        {"prefix": "/photos/work/"},
        {"taken": DateRange(after="2019-01-01T00:00:00", before="2020-01-01T00:00:00")},
    ]
    for options in filters:
        for q in queries:
            want, got = source.search(q, k=10, **options), copied.search(q, k=10, **options)
            assert [h.id for h in got] == [h.id for h in want], options
            for a, b in zip(want, got, strict=True):
                assert abs(a.score - b.score) <= SCORE_TOL
                assert (a.key, a.title, a.taken_at, a.taken_offset) == (b.key, b.title, b.taken_at, b.taken_offset)


@pytest.mark.opensearch
def test_given_copied_index_when_copied_back_to_embedded_then_it_equals_the_source(
    source: EmbeddedIndex, copied: OpenSearchIndex, tmp_path: Path
) -> None:
    # GIVEN the OpenSearch copy; WHEN copied back into a new embedded index; THEN documents and hits are the source's
    back = tmp_path / "back"
    assert (
        copy("--backend", "opensearch", "--index", copied.name, "--to-backend", "embedded", "--to-index", str(back))
        == 0
    )
    index = EmbeddedIndex(back, read_only=True)
    try:
        assert (index.model, index.dim) == (GONE_CHECKPOINT, DIM)
        assert_same_documents(every_document(index), every_document(source))
        q = np.random.default_rng(SEED + 2).standard_normal(DIM).astype(np.float32)
        assert [h.id for h in index.search(q, k=20)] == [h.id for h in source.search(q, k=20)]
    finally:
        index.close()


def sample_document() -> Document:
    """One document with every field of Document set to a value other than its default, whatever the fields are.

    A field added to Document is covered here without a change; one whose stored form needs a format (a
    date) gets its value from FORMATTED.
    """
    formatted = {"taken_at": "2021-03-04T05:06:07", "taken_offset": "+02:00", "key": "/photos/every field.jpg"}
    values: dict[str, Any] = {"vector": np.linspace(-1.0, 1.0, DIM, dtype=np.float32)}
    for f in fields(Document):
        kind = str(f.type)
        if f.name in values:
            continue
        if f.name in formatted:
            values[f.name] = formatted[f.name]
        elif "bool" in kind:
            values[f.name] = True
        elif "float" in kind:
            values[f.name] = 1_650_000_000.75
        elif "int" in kind:
            values[f.name] = 4242
        elif "str" in kind:
            values[f.name] = f"{f.name}-sample"
        else:
            pytest.fail(f"Document.{f.name} ({kind}): add a sample value for it here")
    doc = Document(**values)
    for f in fields(Document):
        if f.name != "vector":
            assert getattr(doc, f.name) != (None if f.default is MISSING else f.default), f.name
    return doc


@pytest.mark.opensearch
def test_given_document_with_every_field_set_when_round_tripped_through_opensearch_then_every_field_survives(
    tmp_path: Path, opensearch_url: str
) -> None:
    # GIVEN every Document field set; WHEN copied embedded -> OpenSearch -> embedded; THEN every field is as it was
    doc = sample_document()
    start = EmbeddedIndex(tmp_path / "start", model="m", dim=DIM)
    assert start.upsert([doc]).failed == {}
    start.close()
    name = remote_name("fields")
    try:
        assert copy("--index", str(tmp_path / "start"), "--to-backend", "opensearch", "--to-index", name) == 0
        end = tmp_path / "end"
        assert copy("--backend", "opensearch", "--index", name, "--to-backend", "embedded", "--to-index", str(end)) == 0
    finally:
        OpenSearchIndex(name, url=opensearch_url, model="m", dim=DIM).drop()
    index = EmbeddedIndex(end, read_only=True)
    try:
        assert_same_documents(every_document(index), {doc.id: doc})
    finally:
        index.close()


class InterruptedIndex:
    """A destination that is interrupted (Ctrl-C) when a write would take it past `after` documents."""

    def __init__(self, inner: VectorIndex, after: int) -> None:
        self.inner, self.after, self.written = inner, after, 0
        self.model, self.dim = inner.model, inner.dim

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        return self.inner.fingerprints(prefix)

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        if self.written + len(docs) > self.after:
            raise KeyboardInterrupt
        self.written += len(docs)
        return self.inner.upsert(docs)


@pytest.mark.opensearch
def test_given_copy_interrupted_when_run_again_then_it_finishes_without_duplicates(
    source: EmbeddedIndex, opensearch_url: str
) -> None:
    # GIVEN a copy into OpenSearch stopped by Ctrl-C after two batches; WHEN re-run; THEN every document once
    name = remote_name("resume")
    first = OpenSearchIndex(name, url=opensearch_url, model=source.model, dim=source.dim)
    try:
        with pytest.raises(KeyboardInterrupt):
            copy_index(source, InterruptedIndex(first, after=1200), batch=500)  # type: ignore[arg-type]
        first.close()  # as the CLI does on its way out
        again = OpenSearchIndex(name, url=opensearch_url)
        summary = copy_index(source, again, batch=500)
        assert (summary.unchanged, summary.copied, summary.failed) == (1000, N - 1000, {})
        assert again.count() == N
        assert sorted(every_document(again)) == sorted(every_document(source))
    finally:
        first.drop()


def test_given_to_bucket_and_strip_prefix_when_copied_then_ids_are_those_the_ingest_lambda_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN local pictures uploaded with `aws s3 sync /photos s3://BUCKET/`, and one outside that folder
    event = json.loads((ROOT / "events" / "s3" / "put.json").read_text())
    bucket = event["Records"][0]["s3"]["bucket"]["name"]
    (s3_event,) = parse_notification(json.dumps(event))
    keys = ["/photos/" + s3_event.key, "/photos/family/a.jpg", "/elsewhere/b.jpg"]
    vectors = np.eye(3, DIM, dtype=np.float32)
    local = EmbeddedIndex(tmp_path / "local", model="m", dim=DIM)
    local.upsert([Document(key=k, vector=v, title=k) for k, v in zip(keys, vectors, strict=True)])
    local.close()
    # WHEN copied with --to-bucket and --strip-prefix
    status = copy(
        "--index", str(tmp_path / "local"), "--to-backend", "embedded", "--to-index", str(tmp_path / "s3"),
        "--to-bucket", bucket, "--strip-prefix", "/photos/",
    )  # fmt: skip
    # THEN the ids are doc_id(bucket, key), the S3 event's among them; the picture outside is counted and left out
    assert status == 0
    assert "left out 1 documents not under /photos" in capsys.readouterr().err
    index = EmbeddedIndex(tmp_path / "s3", read_only=True)
    try:
        docs = every_document(index)
        assert sorted(docs) == sorted([doc_id(bucket, s3_event.key), doc_id(bucket, "family/a.jpg")])
        assert {(d.bucket, d.key, d.title) for d in docs.values()} == {
            (bucket, s3_event.key, keys[0]),
            (bucket, "family/a.jpg", keys[1]),
        }
    finally:
        index.close()


def test_given_destination_with_another_model_when_copied_then_exit_2_with_one_line_and_nothing_written(
    source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a destination built with another model; WHEN copied into; THEN refused in one line, left as it was
    other = EmbeddedIndex(tmp_path / "other", model="ViT-B/32", dim=512)
    other.close()
    assert copy("--index", str(source_dir), "--to-backend", "embedded", "--to-index", str(tmp_path / "other")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'ViT-B/32' (dim 512)" in err and "--to-index" in err
    index = EmbeddedIndex(tmp_path / "other", read_only=True)
    assert index.count() == 0
    index.close()


def test_given_same_index_as_source_and_destination_when_copied_then_refused(
    source_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one folder named twice; WHEN copied onto itself; THEN exit 2, one line
    assert copy("--index", str(source_dir), "--to-backend", "embedded", "--to-index", str(source_dir)) == 2
    assert capsys.readouterr().err == "clipsearch: error: the source and the destination are the same index\n"


@pytest.mark.opensearch
def test_given_opensearch_index_without_vectors_in_source_when_copied_then_exit_1_with_the_reason(
    opensearch_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an index (made by another tool) whose mapping leaves the vector out of _source
    name = remote_name("novectors")
    client = OpenSearch(hosts=[opensearch_url])
    mapping = {
        "_meta": {"clipsearch": {"model": "m", "dim": 4}},
        "_source": {"excludes": ["vector"]},
        "properties": {
            # lucene, as clipsearch maps it: the local node has no native (faiss) engine
            "vector": {
                "type": "knn_vector",
                "dimension": 4,
                "method": {"name": "hnsw", "engine": "lucene", "space_type": "cosinesimil"},
            },
            "key": {"type": "keyword"},
            "bucket": {"type": "keyword"},
        },
    }
    client.indices.create(
        index=name, body={"settings": {"index.knn": True, "number_of_replicas": 0}, "mappings": mapping}
    )
    try:
        remote = OpenSearchIndex(name, url=opensearch_url)
        assert remote.upsert([Document(key="/a.jpg", vector=np.ones(4))]).failed == {}
        remote.close()
        # WHEN copied; THEN refused with the reason
        status = copy(
            "--backend", "opensearch", "--index", name, "--to-backend", "embedded", "--to-index", str(tmp_path)
        )
        assert status == 1
        assert "keeps no 'vector' in _source" in capsys.readouterr().err
    finally:
        client.indices.delete(index=name)
        client.close()
