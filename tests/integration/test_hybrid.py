"""Hybrid mode (CONTRACT §7): RRF of the word ranking over titles and keys with the vector ranking.

A crafted set in both backends, the embedded index and the real OpenSearch node: random vectors, so the
vector side knows nothing of the words, and titles and keys in which some words are rare.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.fakes import FAKE_DIM, FakeEncoder
from support.schema_v1 import opensearch_v1_body, opensearch_v1_source

from clipsearch.errors import BadRequest
from clipsearch.index.base import Document, VectorIndex
from clipsearch.index.embedded import DB_NAME, EmbeddedIndex
from clipsearch.index.opensearch import OpenSearchIndex
from clipsearch.search import SearchService, parse_json

N = 40
WORDS = ("beach", "sunset", "family", "dinner", "garden", "snow")
LIGHTHOUSE, HARBOUR, DINNER = 17, 29, 8


def corpus() -> list[Document]:
    """Titles of two common words each; "lighthouse" only in title 17, "harbour" only in key 29."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((N, FAKE_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    docs = []
    for i in range(N):
        title = f"{WORDS[i % 6]} {WORDS[(i // 6) % 6]}"
        if i == LIGHTHOUSE:
            title = "old lighthouse at dusk"
        if i == DINNER:
            title = "family dinner"
        folder = "trips/harbour" if i == HARBOUR else ("trips" if i % 2 else "home")
        docs.append(
            Document(
                key=f"{folder}/img{i:04d}.jpg",
                vector=vectors[i],
                title=title,
                taken_at=f"2019-{1 + i % 12:02d}-10T12:00:00",
            )
        )
    return docs


DOCS = corpus()


def service(index: VectorIndex) -> SearchService:
    return SearchService(FakeEncoder(), index, url_for=lambda hit: "")


def hits(index: VectorIndex, **payload: Any) -> list[dict[str, Any]]:
    return service(index).search(parse_json({"k": 10, **payload}))["hits"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedIndex]:
    index = EmbeddedIndex(tmp_path_factory.mktemp("hybrid"), model="fake", dim=FAKE_DIM)
    assert index.upsert(DOCS).failed == {}
    yield index
    index.close()


@pytest.fixture(scope="module")
def remote(opensearch_url: str) -> Iterator[OpenSearchIndex]:
    index = OpenSearchIndex(f"terms-hybrid-{uuid.uuid4().hex[:10]}", model="fake", dim=FAKE_DIM, url=opensearch_url)
    assert index.upsert(DOCS).failed == {}
    index.refresh()
    yield index
    index.drop()
    index.close()


@pytest.fixture(params=["embedded", "opensearch"])
def backend(request: pytest.FixtureRequest) -> VectorIndex:
    if request.param == "opensearch":
        request.applymarker(pytest.mark.opensearch)
    return request.getfixturevalue("embedded" if request.param == "embedded" else "remote")


@pytest.mark.opensearch
@pytest.mark.parametrize(
    "text", ["lighthouse", "the harbour", "old lighthouse at dusk", "an old lighthouse by the harbour"]
)
def test_given_the_same_set_in_both_backends_when_a_title_query_runs_hybrid_then_the_same_item_first(
    embedded, remote, text
):
    ours, theirs = hits(embedded, text=text, mode="hybrid"), hits(remote, text=text, mode="hybrid")
    assert ours[0]["id"] == theirs[0]["id"], text
    assert abs(ours[0]["score"] - theirs[0]["score"]) <= 1e-3
    assert abs(ours[0]["rank_score"] - theirs[0]["rank_score"]) <= 1e-9
    # the word side of a rare word agrees exactly
    vector = FakeEncoder().encode_texts([text])[0]
    if text == "lighthouse":
        assert [h.id for h in embedded.lexical(text, vector, k=5)] == [h.id for h in remote.lexical(text, vector, k=5)]


@pytest.mark.opensearch
def test_given_a_common_word_when_both_backends_search_words_then_the_same_documents_match(embedded, remote):
    # BM25 differs between SQLite FTS5 and Lucene (docs/ranking.md), so only the matching set is compared
    vector = FakeEncoder().encode_texts(["family dinner"])[0]
    ours, theirs = embedded.lexical("Family, dinner!", vector, k=N), remote.lexical("Family, dinner!", vector, k=N)
    expected = {d.id for d in DOCS if {"family", "dinner"} & set(d.title.split())}
    assert {h.id for h in ours} == {h.id for h in theirs} == expected
    cosines = {h.id: h.score for h in theirs}
    assert all(abs(h.score - cosines[h.id]) <= 1e-3 for h in ours)


@pytest.mark.parametrize(("text", "item"), [("lighthouse", LIGHTHOUSE), ("harbour", HARBOUR)])
def test_given_a_rare_title_or_key_word_when_searched_then_first_in_hybrid_mode_not_in_vector_mode(backend, text, item):
    hybrid = hits(backend, text=text, mode="hybrid")
    vector = hits(backend, text=text)
    assert hybrid[0]["id"] == DOCS[item].id and hybrid[0]["key"] == DOCS[item].key
    assert vector[0]["id"] != DOCS[item].id
    # score stays the cosine: the same as the vector mode's for a hit both list
    cosines = {h["id"]: h["score"] for h in hits(backend, text=text, k=N)}
    assert all(abs(h["score"] - cosines[h["id"]]) <= 1e-3 for h in hybrid)
    assert all("rank_score" in h for h in hybrid) and not any("rank_score" in h for h in vector)
    assert [h["rank_score"] for h in hybrid] == sorted((h["rank_score"] for h in hybrid), reverse=True)


def test_given_min_score_when_searched_hybrid_then_it_filters_the_vector_side_only(backend):
    assert hits(backend, text="lighthouse", min_score=0.99) == []
    fused = hits(backend, text="lighthouse", min_score=0.99, mode="hybrid")
    assert [h["id"] for h in fused] == [DOCS[LIGHTHOUSE].id] and fused[0]["score"] < 0.99
    loose = hits(backend, text="lighthouse", min_score=-1.0, mode="hybrid")
    assert len(loose) == 10


def test_given_filters_and_paging_when_searched_hybrid_then_both_sides_filtered_and_pages_follow(backend):
    assert DOCS[LIGHTHOUSE].id not in {
        h["id"] for h in hits(backend, text="lighthouse", mode="hybrid", k=N, filter={"prefix": "home/"})
    }
    dated = hits(
        backend, text="lighthouse", mode="hybrid", k=N, filter={"taken_after": "2019-07", "taken_before": "2019-08"}
    )
    assert {h["id"] for h in dated} == {d.id for d in DOCS if d.taken_at and d.taken_at.startswith("2019-07")}
    everything = [h["id"] for h in hits(backend, text="family dinner", mode="hybrid", k=20)]
    assert [h["id"] for h in hits(backend, text="family dinner", mode="hybrid", k=10, **{"from": 10})] == everything[
        10:
    ]


def test_given_hybrid_with_a_picture_or_terms_when_searched_then_400(embedded):
    with pytest.raises(BadRequest, match="text queries only"):
        service(embedded).search(parse_json({"id": DOCS[0].id, "mode": "hybrid"}))
    with pytest.raises(BadRequest, match="text queries only"):
        service(embedded).search(parse_json({"query": [{"text": "lighthouse"}], "mode": "hybrid"}))


def v2_index(directory: Path) -> Path:
    """An embedded index as schema 2 wrote it: no word index."""
    index = EmbeddedIndex(directory, model="fake", dim=FAKE_DIM)
    assert index.upsert(DOCS).failed == {}
    index.close()
    db = sqlite3.connect(directory / DB_NAME)
    for trigger in ("replace", "insert", "delete", "update"):
        db.execute(f"DROP TRIGGER images_fts_{trigger}")
    db.execute("DROP TABLE images_fts")
    db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    db.commit()
    db.close()
    return directory / DB_NAME


def test_given_a_schema_2_index_opened_read_only_when_searched_hybrid_then_400_naming_the_fix(tmp_path):
    path = v2_index(tmp_path / "v2")
    before = path.read_bytes()
    reader = EmbeddedIndex(tmp_path / "v2", read_only=True)
    assert hits(reader, text="lighthouse")  # vector mode answers as before
    with pytest.raises(BadRequest, match="no word index for hybrid search yet.*clipsearch index"):
        hits(reader, text="lighthouse", mode="hybrid")
    reader.close()
    assert path.read_bytes() == before


def test_given_a_schema_2_index_when_opened_for_writing_then_its_word_index_is_filled_and_kept_in_step(tmp_path):
    v2_index(tmp_path / "v2")
    index = EmbeddedIndex(tmp_path / "v2", model="fake", dim=FAKE_DIM)
    assert index.info().extra["schema_version"] == 3
    assert hits(index, text="lighthouse", mode="hybrid")[0]["id"] == DOCS[LIGHTHOUSE].id
    vector = DOCS[0].vector
    # a re-written title replaces its words; a deleted picture leaves the word index
    renamed = Document(key=DOCS[LIGHTHOUSE].key, vector=DOCS[LIGHTHOUSE].vector, title="windmill")
    index.upsert([renamed])
    assert index.lexical("lighthouse", vector) == []
    assert [h.id for h in index.lexical("windmill", vector)] == [renamed.id]
    assert index.delete([renamed.id]) == 1
    assert index.lexical("windmill", vector) == []
    assert [h.id for h in index.lexical("harbour", vector)] == [DOCS[HARBOUR].id]
    # migrating again (an interrupted run re-opened) changes nothing
    again = sqlite3.connect(tmp_path / "v2" / DB_NAME)
    rows = again.execute("SELECT COUNT(*) FROM images_fts").fetchone()[0]
    again.close()
    assert rows == N - 1
    index.close()


@pytest.mark.opensearch
def test_given_an_older_opensearch_index_when_first_written_then_keys_gain_their_word_field(opensearch_url):
    name = f"terms-hybrid-v1-{uuid.uuid4().hex[:10]}"
    raw = OpenSearchIndex(name, model="fake", dim=FAKE_DIM, url=opensearch_url)
    raw.drop()
    client = raw.client
    try:
        client.indices.create(index=name, body=opensearch_v1_body("fake", FAKE_DIM))
        old_boat = Document(key="trips/old_boat.jpg", vector=DOCS[5].vector, title="snow snow")
        for d in [*DOCS[:20], old_boat]:
            client.index(index=name, id=d.id, body=opensearch_v1_source(d, "fake"), refresh=True)
        index = OpenSearchIndex(name, url=opensearch_url)
        # an older index searched hybrid: titles match, keys not yet, and nothing is changed
        assert hits(index, text="lighthouse", mode="hybrid")[0]["id"] == DOCS[LIGHTHOUSE].id
        assert "key_words" not in client.indices.get_mapping(index=name)[name]["mappings"]["properties"]
        assert index.lexical("boat", DOCS[5].vector, k=5) == []
        new = Document(key="trips/harbour/new.jpg", vector=DOCS[3].vector, title="snow snow")
        assert index.upsert([new]).failed == {}
        mapping = client.indices.get_mapping(index=name)[name]["mappings"]
        assert mapping["properties"]["key_words"]["type"] == "text"
        assert mapping["_meta"]["clipsearch"]["schema_version"] == 3
        assert hits(index, text="harbour", mode="hybrid")[0]["id"] == new.id
        # the first write also gave the older documents their key words: a file name matches at once
        assert [h.id for h in index.lexical("boat", DOCS[5].vector, k=5)] == [old_boat.id]
    finally:
        raw.drop()


@pytest.mark.opensearch
@pytest.mark.parametrize("word", ["lighthouse", "beach", "day", "boat", "0001", "harbour"])
def test_given_file_names_when_a_word_of_one_is_searched_then_both_backends_match_the_same_files(
    embedded_files, remote_files, word
):
    # `lighthouse.jpg`, `beach_day.png`, `IMG_0001.JPG`: the standard analyzer keeps such names whole, so
    # both backends must split keys alike (letters and digits) for the word side to agree.
    vector = FILES[0].vector
    found = [sorted(h.key for h in index.lexical(word, vector, k=10)) for index in (embedded_files, remote_files)]
    assert found[0] == found[1] != []


FILES = [
    Document(key=key, vector=DOCS[n].vector, title="Summer trip")
    for n, key in enumerate(
        ["trips/lighthouse.jpg", "trips/beach_day.png", "trips/harbour/boat.jpg", "family/2019/IMG_0001.JPG"]
    )
]


@pytest.fixture(scope="module")
def embedded_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedIndex]:
    index = EmbeddedIndex(tmp_path_factory.mktemp("files"), model="fake", dim=FAKE_DIM)
    index.upsert(FILES)
    yield index
    index.close()


@pytest.fixture(scope="module")
def remote_files(opensearch_url: str) -> Iterator[OpenSearchIndex]:
    index = OpenSearchIndex(f"terms-files-{uuid.uuid4().hex[:10]}", model="fake", dim=FAKE_DIM, url=opensearch_url)
    index.upsert(FILES)
    yield index
    index.drop()
