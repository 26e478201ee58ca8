"""The embedded index: SQLite truth, exact cosine search, filters, paging, model records."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from clipsearch.errors import BadRequest, ModelMismatch, NotFound
from clipsearch.index import open_index
from clipsearch.index.base import Document, doc_id
from clipsearch.index.embedded import DB_NAME

DIM = 8


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def corpus(n: int = 50, seed: int = 1) -> list[Document]:
    rng = np.random.default_rng(seed)
    folders = ["a/", "b/", "a/x/"]
    return [Document(key=f"{folders[i % 3]}img{i:03d}.jpg", vector=unit(rng.standard_normal(DIM)),
                     title=f"image {i}", size=i, mtime=float(i)) for i in range(n)]


@pytest.fixture
def index(tmp_path):
    idx = open_index("embedded", str(tmp_path / "idx"), model="fake", dim=DIM)
    idx.upsert(corpus())
    yield idx
    idx.close()


def brute_force(docs, q, prefix=None):
    scored = [(float(d.vector @ q), d.id) for d in docs if prefix is None or d.key.startswith(prefix)]
    return sorted(scored, key=lambda s: (-s[0], s[1]))


def test_given_corpus_when_searching_then_exact_cosine_order(index):
    q = unit(np.arange(DIM) - 3.0)
    hits = index.search(q, k=10)
    expected = brute_force(corpus(), q)[:10]
    assert [h.id for h in hits] == [e[1] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[0] for e in expected], atol=1e-6)


def test_given_offset_when_paging_then_pages_concatenate_to_the_full_ranking(index):
    q = unit(np.ones(DIM))
    full = [h.id for h in index.search(q, k=30)]
    pages = [h.id for start in (0, 10, 20) for h in index.search(q, k=10, offset=start)]
    assert pages == full


def test_given_prefix_filter_when_searching_then_only_matching_keys(index):
    q = unit(np.ones(DIM))
    hits = index.search(q, k=50, prefix="a/x/")
    assert hits and all(h.key.startswith("a/x/") for h in hits)
    assert [h.id for h in hits] == [e[1] for e in brute_force(corpus(), q, "a/x/")]


def test_given_min_score_when_searching_then_no_hit_below_it(index):
    q = unit(np.ones(DIM))
    hits = index.search(q, k=50, min_score=0.2)
    assert all(h.score >= 0.2 for h in hits)
    assert len(hits) == sum(1 for s, _ in brute_force(corpus(), q) if s >= 0.2)


def test_given_same_key_upserted_twice_then_one_document_with_the_new_vector(index):
    doc = corpus()[0]
    new = Document(key=doc.key, vector=unit(np.eye(DIM)[0]), title="replaced")
    index.upsert([new])
    assert index.count() == 50
    top = index.search(np.eye(DIM, dtype=np.float32)[0], k=1)[0]
    assert top.id == doc.id and top.title == "replaced"


def test_given_deleted_ids_then_they_leave_search_and_count(index):
    victims = [d.id for d in corpus()[:5]]
    assert index.delete(victims) == 5
    assert index.count() == 45
    hits = index.search(unit(np.ones(DIM)), k=50)
    assert not set(victims) & {h.id for h in hits}
    assert index.get(victims[0]) is None


def test_given_reopened_index_then_data_model_and_dim_survive(tmp_path):
    path = str(tmp_path / "idx")
    idx = open_index("embedded", path, model="fake", dim=DIM)
    idx.upsert(corpus(10))
    idx.close()
    again = open_index("embedded", path)
    assert (again.model, again.dim, again.count()) == ("fake", DIM, 10)
    assert again.get(doc_id("", "a/img000.jpg")).title == "image 0"


def test_given_index_of_one_model_when_opened_with_another_then_refused(tmp_path):
    path = str(tmp_path / "idx")
    open_index("embedded", path, model="demo", dim=DIM).close()
    with pytest.raises(ModelMismatch, match="built with model 'demo'"):
        open_index("embedded", path, model="RN50", dim=1024)


def test_given_missing_index_when_opened_without_model_then_not_found(tmp_path):
    with pytest.raises(NotFound, match="clipsearch index"):
        open_index("embedded", str(tmp_path / "nothing"))


def test_given_second_connection_writes_then_first_sees_them_on_next_search(tmp_path):
    path = str(tmp_path / "idx")
    reader = open_index("embedded", path, model="fake", dim=DIM)
    writer = open_index("embedded", path)
    writer.upsert([Document(key="new.jpg", vector=unit(np.eye(DIM)[2]))])
    hits = reader.search(np.eye(DIM, dtype=np.float32)[2], k=1)
    assert hits[0].key == "new.jpg"


def test_given_wrong_dimension_or_k_when_searching_then_bad_request(index):
    with pytest.raises(BadRequest):
        index.search(np.ones(DIM + 1, np.float32), k=1)
    with pytest.raises(BadRequest):
        index.search(np.ones(DIM, np.float32), k=0)


def test_given_wrong_dimension_document_then_reported_failed_not_written(index):
    result = index.upsert([Document(key="bad.jpg", vector=np.ones(3, np.float32))])
    assert result.written == 0 and doc_id("", "bad.jpg") in result.failed
    assert index.count() == 50


def test_given_fingerprints_with_prefix_then_only_those_keys(index):
    fps = index.fingerprints("b/")
    assert fps and all(k.startswith("b/") for k in fps)
    assert fps["b/img001.jpg"] == (1, 1.0)


def test_given_index_then_sqlite_holds_exactly_one_row_per_key(index, tmp_path):
    index.upsert(corpus()[:10])
    db = sqlite3.connect(tmp_path / "idx" / DB_NAME)
    total, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM images").fetchone()
    assert total == distinct == 50
