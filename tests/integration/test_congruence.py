"""Congruence: the same corpus and queries on the embedded index and on the real OpenSearch node.

At this size HNSW finds the exact neighbours, so both backends must return the same ids in the
same order, with cosine scores that agree within 1e-3.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch.errors import ModelMismatch
from clipsearch.index import open_index
from clipsearch.index.base import DateRange, Document, Hit, VectorIndex
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.index.opensearch import OpenSearchIndex

pytestmark = pytest.mark.opensearch

N, DIM, N_QUERIES, SEED = 200, 64, 12, 20240611
SCORE_TOL = 1e-3
PREFIXES = ("family/2019/", "family/2020/", "work/", "trips/")


def taken(i: int) -> tuple[str | None, str]:
    """Capture times five days and 37 minutes apart from 2018-06-30 22:00, some with an offset, every
    eleventh unknown. Picture 66 is taken at midnight on 2019-06-01 (a filter's bound)."""
    if i % 11 == 5:
        return None, ""
    when = datetime.datetime(2018, 6, 30, 22, 0) + datetime.timedelta(days=5 * i, minutes=37 * i)
    if i == 66:
        when = datetime.datetime(2019, 6, 1)
    return when.isoformat(), ("+02:00", "-05:00", "")[i % 3]


def corpus() -> tuple[list[Document], np.ndarray]:
    rng = np.random.default_rng(SEED)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    docs = [
        Document(
            key=f"{PREFIXES[i % len(PREFIXES)]}img{i:04d}.jpg",
            vector=vectors[i],
            bucket="photos",
            title=f"image {i}",
            size=i,
            mtime=float(i),
            width=32,
            height=24,
            taken_at=taken(i)[0],
            taken_offset=taken(i)[1],
        )
        for i in range(N)
    ]
    queries = rng.standard_normal((N_QUERIES, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return docs, queries


class Pair:
    """One embedded and one OpenSearch index fed identically."""

    def __init__(self, embedded: EmbeddedIndex, remote: OpenSearchIndex) -> None:
        self.embedded, self.remote = embedded, remote

    @property
    def both(self) -> tuple[VectorIndex, VectorIndex]:
        return self.embedded, self.remote

    def upsert(self, docs: list[Document]) -> None:
        for idx in self.both:
            result = idx.upsert(docs)
            assert result.failed == {}
        self.remote.refresh()

    def delete(self, ids: list[str]) -> None:
        removed = [idx.delete(ids) for idx in self.both]
        assert removed[0] == removed[1]
        self.remote.refresh()

    def search(self, q: np.ndarray, **kwargs: Any) -> tuple[list[Hit], list[Hit]]:
        return self.embedded.search(q, **kwargs), self.remote.search(q, **kwargs)


def assert_congruent(embedded: list[Hit], remote: list[Hit], what: str) -> None:
    assert [h.id for h in remote] == [h.id for h in embedded], what
    for a, b in zip(embedded, remote, strict=True):
        assert abs(a.score - b.score) <= SCORE_TOL, f"{what}: {a.key} {a.score} vs {b.score}"
        assert (a.key, a.title, a.bucket, a.width, a.height) == (b.key, b.title, b.bucket, b.width, b.height)
        assert (a.taken_at, a.taken_offset) == (b.taken_at, b.taken_offset), f"{what}: {a.key}"


@pytest.fixture(scope="module")
def pair(opensearch_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    docs, _ = corpus()
    embedded = EmbeddedIndex(tmp_path_factory.mktemp("congruence"), model="fake", dim=DIM)
    remote = OpenSearchIndex(f"cs-congruence-{uuid.uuid4().hex[:10]}", model="fake", dim=DIM, url=opensearch_url)
    p = Pair(embedded, remote)
    p.upsert(docs)
    yield p
    remote.drop()
    remote.close()
    embedded.close()


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return corpus()[1]


@pytest.mark.parametrize("k", [1, 10, 50])
def test_top_k_ids_and_scores_match(pair: Pair, queries: np.ndarray, k: int) -> None:
    # GIVEN the same corpus in both backends; WHEN each query runs on both; THEN the hits agree
    for i, q in enumerate(queries):
        assert_congruent(*pair.search(q, k=k), what=f"query {i} k={k}")


@pytest.mark.parametrize("prefix", [*PREFIXES, "family/", "family/2019/img00", "nowhere/"])
def test_prefix_filters_match(pair: Pair, queries: np.ndarray, prefix: str) -> None:
    for i, q in enumerate(queries):
        embedded, remote = pair.search(q, k=10, prefix=prefix)
        assert_congruent(embedded, remote, what=f"query {i} prefix={prefix}")
        assert all(h.key.startswith(prefix) for h in remote)
    if prefix == "nowhere/":
        assert remote == []


@pytest.mark.parametrize("min_score", [-1.0, 0.0, 0.15, 0.3, 0.99])
def test_min_score_as_cosine_matches(pair: Pair, queries: np.ndarray, min_score: float) -> None:
    for i, q in enumerate(queries):
        embedded, remote = pair.search(q, k=30, min_score=min_score)
        assert_congruent(embedded, remote, what=f"query {i} min_score={min_score}")
        assert all(h.score >= min_score - SCORE_TOL for h in remote)


def test_min_score_keeps_some_and_drops_some(pair: Pair, queries: np.ndarray) -> None:
    # Guards the test above against thresholds that keep everything or nothing.
    kept = [len(pair.remote.search(q, k=30, min_score=0.15)) for q in queries]
    assert 0 < sum(kept) < 30 * len(queries)


def test_pages_match_and_concatenate_to_the_top_k(pair: Pair, queries: np.ndarray) -> None:
    for i, q in enumerate(queries[:4]):
        pages = []
        for offset in (0, 10, 20):
            embedded, remote = pair.search(q, k=10, offset=offset)
            assert_congruent(embedded, remote, what=f"query {i} from={offset}")
            pages.extend(remote)
        assert [h.id for h in pages] == [h.id for h in pair.remote.search(q, k=30)]


def test_filter_min_score_and_pagination_combined_match(pair: Pair, queries: np.ndarray) -> None:
    for i, q in enumerate(queries):
        embedded, remote = pair.search(q, k=5, offset=3, min_score=0.0, prefix="family/")
        assert_congruent(embedded, remote, what=f"query {i} combined")


def test_more_like_this_finds_the_document_itself_first(pair: Pair) -> None:
    docs, _ = corpus()
    for d in docs[:5]:
        embedded, remote = pair.search(d.vector, k=5)
        assert_congruent(embedded, remote, what=d.key)
        assert remote[0].id == d.id
        assert remote[0].score == pytest.approx(1.0, abs=1e-5)


def test_counts_and_fingerprints_match(pair: Pair) -> None:
    assert pair.embedded.count() == pair.remote.count() == N
    for prefix in ("", "work/", "family/2020/"):
        assert pair.embedded.fingerprints(prefix) == pair.remote.fingerprints(prefix)


def test_get_returns_the_same_document(pair: Pair) -> None:
    docs, _ = corpus()
    a, b = pair.embedded.get(docs[7].id), pair.remote.get(docs[7].id)
    assert a is not None and b is not None
    assert (a.key, a.bucket, a.title, a.size, a.mtime) == (b.key, b.bucket, b.title, b.size, b.mtime)
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-7)


def test_deletes_and_updates_stay_congruent(opensearch_url: str, tmp_path: Path) -> None:
    # GIVEN a fresh pair with the corpus (its own, so the shared one stays intact)
    docs, queries = corpus()
    embedded = EmbeddedIndex(tmp_path / "idx", model="fake", dim=DIM)
    remote = OpenSearchIndex(f"cs-congruence-{uuid.uuid4().hex[:10]}", model="fake", dim=DIM, url=opensearch_url)
    try:
        p = Pair(embedded, remote)
        p.upsert(docs)
        # WHEN the current best hits of some queries are deleted, and other documents move
        doomed = list({h.id for q in queries[:4] for h in p.remote.search(q, k=3)})
        p.delete([*doomed, "never-there"])
        rng = np.random.default_rng(SEED + 1)
        moved = []
        for d in [d for d in docs[100:140] if d.id not in doomed][:20]:
            v = rng.standard_normal(DIM).astype(np.float32)
            moved.append(
                Document(
                    key=d.key,
                    bucket=d.bucket,
                    title=d.title + " (edited)",
                    size=d.size,
                    mtime=d.mtime + 1,
                    width=d.width,
                    height=d.height,
                    vector=v / np.linalg.norm(v),
                )
            )
        p.upsert(moved)
        # THEN both backends still agree, deleted ids never come back, and counts agree
        assert embedded.count() == remote.count() == N - len(doomed)
        for i, q in enumerate(queries):
            for kwargs in ({"k": 10}, {"k": 10, "prefix": "work/"}, {"k": 5, "offset": 5, "min_score": 0.05}):
                e_hits, r_hits = p.search(q, **kwargs)
                assert_congruent(e_hits, r_hits, what=f"query {i} after edits {kwargs}")
                assert not set(doomed) & {h.id for h in r_hits}
        for m in moved:
            e_hits, r_hits = p.search(m.vector, k=1)
            assert r_hits[0].id == m.id and r_hits[0].title.endswith("(edited)")
            assert_congruent(e_hits, r_hits, what=f"moved {m.key}")
    finally:
        remote.drop()
        remote.close()
        embedded.close()


def test_both_backends_refuse_another_model_alike(pair: Pair, opensearch_url: str) -> None:
    errors = []
    for backend, name in (("embedded", str(pair.embedded.directory)), ("opensearch", pair.remote.name)):
        options = {"url": opensearch_url} if backend == "opensearch" else {}
        with pytest.raises(ModelMismatch) as info:
            open_index(backend, name, model="RN50", dim=1024, **options)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


DATE_RANGES = [
    ("2019-06-01T00:00:00", "2019-09-01T00:00:00"),  # picture 66 sits on the inclusive bound
    (None, "2019-06-01T00:00:00"),  # ...and is left out by the exclusive one
    ("2020-01-01T00:00:00", None),
    ("2019-01-01T00:00:00", "2019-01-20T00:00:00"),  # narrow: fewer pictures than k
    ("2018-08-20T04:10:00", "2018-08-20T04:10:01"),  # one second: picture 10 alone
    ("2031-01-01T00:00:00", None),  # after every picture
]


@pytest.mark.parametrize(("after", "before"), DATE_RANGES)
def test_date_filters_match_and_keep_exactly_the_wall_clock_range(
    pair: Pair, queries: np.ndarray, after: str | None, before: str | None
) -> None:
    # GIVEN capture times (some with offsets, some unknown); WHEN filtered by a wall-clock range
    docs, _ = corpus()
    inside = {
        d.id
        for d in docs
        if d.taken_at is not None and (after is None or d.taken_at >= after) and (before is None or d.taken_at < before)
    }
    for i, q in enumerate(queries):
        embedded, remote = pair.search(q, k=10, taken=DateRange(after, before))
        # THEN both backends agree, every hit is in range as written (offsets never shift it), and the
        # filter runs inside the k-NN search: k hits come back whenever k pictures are in range
        assert_congruent(embedded, remote, what=f"query {i} taken {after}..{before}")
        assert {h.id for h in remote} <= inside
        assert len(remote) == min(10, len(inside))
    if after == "2019-06-01T00:00:00" or before == "2019-06-01T00:00:00":
        hits = pair.remote.search(docs[66].vector, k=1, taken=DateRange(after, before))
        assert (hits[0].id == docs[66].id) == (after is not None)


def test_date_prefix_min_score_and_pages_combined_match(pair: Pair, queries: np.ndarray) -> None:
    window = DateRange("2018-09-01T00:00:00", "2020-06-01T00:00:00")
    for i, q in enumerate(queries):
        for kwargs in (
            {"k": 5, "offset": 3, "prefix": "family/"},
            {"k": 20, "min_score": 0.0},
            {"k": 7, "offset": 7, "prefix": "work/", "min_score": -0.2},
        ):
            embedded, remote = pair.search(q, taken=window, **kwargs)
            assert_congruent(embedded, remote, what=f"query {i} {kwargs} with dates")


def test_get_carries_the_capture_time_alike(pair: Pair) -> None:
    docs, _ = corpus()
    for d in (docs[0], docs[5], docs[66]):
        a, b = pair.embedded.get(d.id), pair.remote.get(d.id)
        assert a is not None and b is not None
        assert (a.taken_at, a.taken_offset) == (b.taken_at, b.taken_offset) == (d.taken_at, d.taken_offset)
