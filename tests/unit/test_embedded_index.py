"""The embedded index: SQLite truth, exact cosine search, filters, paging, model records."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from clipsearch.errors import (
    BadRequest,
    IndexCorrupt,
    IndexReadOnly,
    IndexUnavailable,
    ModelMismatch,
    NotFound,
    Unavailable,
)
from clipsearch.index import embedded, open_index
from clipsearch.index.base import Document, doc_id
from clipsearch.index.embedded import DB_NAME, SCHEMA_VERSION, EmbeddedIndex, check_index, storage_error
from clipsearch.ingest import forget

DIM = 8


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def corpus(n: int = 50, seed: int = 1) -> list[Document]:
    rng = np.random.default_rng(seed)
    folders = ["a/", "b/", "a/x/"]
    return [
        Document(
            key=f"{folders[i % 3]}img{i:03d}.jpg",
            vector=unit(rng.standard_normal(DIM)),
            title=f"image {i}",
            size=i,
            mtime=float(i),
        )
        for i in range(n)
    ]


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


# -- the SQLite layer under faults (issue 15) -----------------------------------------------------


def test_given_a_read_only_open_then_nothing_is_created_or_migrated(tmp_path):
    with pytest.raises(NotFound, match="clipsearch index"):
        open_index("embedded", str(tmp_path / "nothing"), read_only=True)
    assert not (tmp_path / "nothing").exists()
    path = tmp_path / "idx"
    open_index("embedded", str(path), model="fake", dim=DIM).close()
    db = sqlite3.connect(path / DB_NAME)
    db.execute("DROP INDEX images_key")  # an older schema: a writable open would add it back
    db.close()
    reader = open_index("embedded", str(path), read_only=True)
    assert reader.count() == 0
    with pytest.raises(IndexReadOnly):
        reader.upsert(corpus(1))
    reader.close()
    db = sqlite3.connect(path / DB_NAME)
    assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'images_key'").fetchall()
    db.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_given_a_non_finite_vector_when_upserting_then_refused_with_one_line(index, bad):
    vec = unit(np.ones(DIM))
    vec[3] = bad
    result = index.upsert([Document(key="nan.jpg", vector=vec)])
    assert result.written == 0 and "non-finite" in result.failed[doc_id("", "nan.jpg")]
    assert index.count() == 50 and index.get(doc_id("", "nan.jpg")) is None


def test_given_a_stored_non_finite_or_short_vector_then_skipped_on_load_and_re_embedded(tmp_path):
    path = tmp_path / "idx"
    open_index("embedded", str(path), model="fake", dim=DIM).upsert(corpus())
    docs = corpus()
    db = sqlite3.connect(path / DB_NAME)
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (np.full(DIM, np.nan, np.float32).tobytes(), docs[0].id))
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (b"\0" * 5, docs[1].id))
    db.commit()
    db.close()
    idx = open_index("embedded", str(path))
    for q in np.eye(DIM, dtype=np.float32):
        ids = [h.id for h in idx.search(q, k=50)]
        assert docs[0].id not in ids and docs[1].id not in ids and len(ids) == 48
    fps = idx.fingerprints()
    assert docs[0].key not in fps and docs[1].key not in fps and len(fps) == 48  # so `index` re-embeds them
    assert idx.info().extra["unreadable_rows"] == 2
    idx.upsert(docs[:2])
    assert docs[0].id in [h.id for h in idx.search(docs[0].vector, k=1)]
    assert len(idx.fingerprints()) == 50


@pytest.mark.parametrize("kind", ["zero bytes", "header only"])
def test_given_an_empty_or_half_created_file_then_treated_as_new(tmp_path, kind):
    path = tmp_path / "idx"
    path.mkdir()
    if kind == "zero bytes":
        (path / DB_NAME).touch()
    else:
        sqlite3.connect(path / DB_NAME).execute("PRAGMA journal_mode=WAL").fetchall()
    for read_only in (False, True):
        with pytest.raises(NotFound, match="is empty"):
            open_index("embedded", str(path), read_only=read_only)
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    idx.upsert(corpus(5))
    assert (idx.model, idx.dim, idx.count()) == ("fake", DIM, 5)


def test_given_the_index_file_replaced_underneath_then_a_reader_follows_it(tmp_path):
    path = tmp_path / "idx"
    writer = open_index("embedded", str(path), model="fake", dim=DIM)
    writer.upsert(corpus(10))
    writer.close()
    reader = open_index("embedded", str(path), read_only=True)
    q = np.eye(DIM, dtype=np.float32)[0]
    assert len(reader.search(q, k=50)) == 10
    other = tmp_path / "other"
    replacement = open_index("embedded", str(other), model="fake", dim=DIM)
    replacement.upsert([Document(key="only.jpg", vector=q)])
    replacement.close()
    (other / DB_NAME).replace(path / DB_NAME)
    assert [h.key for h in reader.search(q, k=50)] == ["only.jpg"]
    assert reader.count() == 1


def test_given_the_index_replaced_by_another_model_then_a_reader_refuses_with_one_line(tmp_path):
    path = tmp_path / "idx"
    writer = open_index("embedded", str(path), model="fake", dim=DIM)
    writer.upsert(corpus(10))
    writer.close()
    reader = open_index("embedded", str(path), read_only=True)
    other = tmp_path / "other"
    open_index("embedded", str(other), model="RN50", dim=DIM).close()
    (other / DB_NAME).replace(path / DB_NAME)
    with pytest.raises(Unavailable, match="replaced by one built with model 'RN50'.*restart"):
        reader.search(np.eye(DIM, dtype=np.float32)[0], k=5)


@pytest.mark.parametrize(
    ("message", "code", "error", "words"),
    [
        ("database or disk is full", 13, IndexUnavailable, "full"),
        ("disk I/O error", 10 | (3 << 8), IndexUnavailable, "I/O error"),
        ("database is locked", 5, IndexUnavailable, "locked by another process"),
        ("database disk image is malformed", 11, IndexCorrupt, "clipsearch check --repair --index"),
        ("file is not a database", 26, IndexCorrupt, "clipsearch check --repair --index"),
        ("attempt to write a readonly database", 8, IndexReadOnly, "read-only"),
    ],
)
def test_given_an_sqlite_error_then_it_becomes_a_typed_error_with_one_line(tmp_path, message, code, error, words):
    e = sqlite3.OperationalError(message)
    e.sqlite_errorcode = code  # type: ignore[attr-defined]
    typed = storage_error(e, tmp_path / DB_NAME)
    assert type(typed) is error and words in str(typed) and "\n" not in str(typed)


def test_given_check_then_healthy_index_is_ok_and_nan_rows_are_dropped_by_repair(tmp_path):
    path = tmp_path / "idx"
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    idx.upsert(corpus())
    idx.close()
    assert check_index(path).healthy
    db = sqlite3.connect(path / DB_NAME)
    db.execute(
        "UPDATE images SET vector = ? WHERE id = ?", (np.full(DIM, np.inf, np.float32).tobytes(), corpus()[7].id)
    )
    db.commit()
    db.close()
    report = check_index(path)
    assert not report.healthy and "1 rows have an unusable vector" in report.problems[0]
    repaired = check_index(path, repair=True)
    assert repaired.healthy and repaired.repaired
    assert check_index(path).healthy and open_index("embedded", str(path)).count() == 49


def large_index(tmp_path):
    """A 3,000-row index on disk, its documents, and each row's stored vector bytes by id."""
    path = tmp_path / "idx"
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    docs = corpus(3000)
    idx.upsert(docs)
    idx.close()
    db = sqlite3.connect(path / DB_NAME)
    before = {r[0]: r[1] for r in db.execute("SELECT id, vector FROM images")}
    db.close()
    return path, docs, before


def test_given_a_page_damaged_in_a_large_index_then_repair_keeps_every_readable_row_and_the_file(tmp_path):
    path, docs, before = large_index(tmp_path)
    # Damage the table page that holds a row in the middle (found by its vector's bytes).
    page = (path / DB_NAME).read_bytes().index(before[docs[1500].id]) // 4096
    with open(path / DB_NAME, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xa5" * 4096)
    with pytest.raises(IndexCorrupt, match="check --repair"):
        open_index("embedded", str(path))
    report = check_index(path, repair=True)
    assert report.healthy and "moved the damaged file" in report.repaired[0]
    assert list(path.glob(f"{DB_NAME}.damaged-*"))
    repaired = open_index("embedded", str(path))
    db = sqlite3.connect(path / DB_NAME)
    after = {r[0]: r[1] for r in db.execute("SELECT id, vector FROM images")}
    db.close()
    assert after.items() <= before.items() and len(after) >= len(before) - 200
    assert repaired.count() == len(after) and check_index(path).healthy


def test_given_a_key_that_is_not_utf8_then_check_and_repair_read_it(tmp_path):
    path = tmp_path / "idx"
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    key = "/photos/caf\udce9.png"  # os.fsdecode(b"/photos/caf\xe9.png")
    idx.upsert([*corpus(5), Document(key=key, vector=np.full(DIM, np.nan, np.float32))])
    idx.upsert([Document(key=key, vector=unit(np.ones(DIM)))])
    idx.close()
    report = check_index(path)
    assert report.healthy and report.rows == 6
    db = sqlite3.connect(path / DB_NAME)
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (b"\0" * 3, doc_id("", key)))
    db.commit()
    db.close()
    report = check_index(path)
    assert not report.healthy and key in report.problems[0]
    assert check_index(path, repair=True).healthy and open_index("embedded", str(path)).count() == 5


# -- capture time (taken_at) and the schema version --------------------------------------------------


def dated_corpus(n: int = 60, seed: int = 3) -> list[Document]:
    """Documents a day apart from 2019-05-20 at noon; every seventh has no capture time."""
    import datetime

    rng = np.random.default_rng(seed)
    start = datetime.datetime(2019, 5, 20, 12, 0, 0)
    docs = []
    for i in range(n):
        taken = None if i % 7 == 3 else (start + datetime.timedelta(days=i)).isoformat()
        docs.append(
            Document(
                key=f"{'ab'[i % 2]}/img{i:03d}.jpg",
                vector=unit(rng.standard_normal(DIM)),
                taken_at=taken,
                taken_offset="+02:00" if i % 3 == 0 and taken else "",
            )
        )
    return docs


def in_range(d: Document, after: str | None, before: str | None) -> bool:
    return d.taken_at is not None and (after is None or d.taken_at >= after) and (before is None or d.taken_at < before)


@pytest.mark.parametrize(
    ("after", "before", "prefix"),
    [
        ("2019-06-01T12:00:00", "2019-06-10T12:00:00", None),  # both bounds fall exactly on a picture
        ("2019-06-15T00:00:00", None, None),
        (None, "2019-05-25T12:00:01", "a/"),
        ("2019-07-01T00:00:00", "2019-07-02T00:00:00", "b/"),
        ("2030-01-01T00:00:00", None, None),
    ],
)
def test_given_capture_times_when_searched_by_date_then_exactly_the_pictures_in_range_rank_as_a_full_scan(
    tmp_path, after, before, prefix
):
    from clipsearch.index.base import DateRange

    docs = dated_corpus()
    idx = open_index("embedded", str(tmp_path / "idx"), model="fake", dim=DIM)
    idx.upsert(docs[:30])
    idx.upsert(docs[30:])  # the second batch goes through the in-memory delta, not a reload
    q = unit(np.ones(DIM))
    for index in (idx, open_index("embedded", str(tmp_path / "idx"), read_only=True)):
        hits = index.search(q, k=100, prefix=prefix, taken=DateRange(after, before))
        wanted = [d for d in docs if in_range(d, after, before) and (prefix is None or d.key.startswith(prefix))]
        truth = sorted(wanted, key=lambda d: -float(d.vector @ q))
        assert [h.id for h in hits] == [d.id for d in truth]
        for h in hits:
            doc = next(d for d in docs if d.id == h.id)
            assert (h.taken_at, h.taken_offset) == (doc.taken_at, doc.taken_offset)
    if after == "2019-06-01T12:00:00":  # inclusive after, exclusive before
        assert "a/img012.jpg" in {h.key for h in hits} and "b/img021.jpg" not in {h.key for h in hits}


def test_given_a_picture_re_dated_when_searched_then_the_filter_follows_it(tmp_path):
    from clipsearch.index.base import DateRange

    idx = open_index("embedded", str(tmp_path / "idx"), model="fake", dim=DIM)
    docs = dated_corpus(10)
    idx.upsert(docs)
    moved = Document(key=docs[0].key, vector=docs[0].vector, taken_at="2001-01-01T00:00:00")
    idx.upsert([moved])
    assert [h.key for h in idx.search(docs[0].vector, k=5, taken=DateRange(None, "2002"))] == [docs[0].key]
    assert idx.get(moved.id).taken_at == "2001-01-01T00:00:00"


def test_given_approximate_mode_when_searched_by_date_then_only_pictures_in_range_come_back(tmp_path):
    from clipsearch.index.base import DateRange
    from clipsearch.index.embedded import EmbeddedIndex

    rng = np.random.default_rng(5)
    n = 3000
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    docs = [
        Document(key=f"k{i:05d}", vector=unit(vectors[i]), taken_at=f"{2000 + i % 20}-06-01T00:00:00") for i in range(n)
    ]
    idx = EmbeddedIndex(
        tmp_path / "idx",
        model="fake",
        dim=DIM,
        search_mode="approx",
        ann={"min_rows": 0, "list_size": 48, "calibration_queries": 100},
    )
    idx.upsert(docs)
    taken = DateRange("2005-01-01T00:00:00", "2015-01-01T00:00:00")  # half the pictures
    for q in vectors[:5]:
        hits = idx.search(unit(q), k=20, taken=taken)
        assert len(hits) == 20
        assert all("2005" <= (h.taken_at or "") < "2015" for h in hits)


def test_given_a_version_1_index_when_searched_read_only_then_it_answers_and_is_left_as_it_was(tmp_path):
    from support.schema_v1 import write_embedded_v1

    from clipsearch.index.base import DateRange

    docs = corpus(20)
    path = write_embedded_v1(tmp_path / "idx", "fake", DIM, docs)
    before = path.read_bytes()
    idx = open_index("embedded", str(tmp_path / "idx"), read_only=True)
    hits = idx.search(docs[4].vector, k=3)
    assert hits[0].id == docs[4].id and hits[0].taken_at is None
    assert idx.get(docs[4].id).taken_at is None
    with pytest.raises(BadRequest, match="no capture dates yet"):
        idx.search(docs[4].vector, k=3, taken=DateRange("2019-01-01T00:00:00", None))
    assert idx.info().extra["schema_version"] == 1
    idx.close()
    assert path.read_bytes() == before


def test_given_a_version_1_index_when_opened_for_writing_then_it_is_migrated_and_its_dates_can_be_filled(tmp_path):
    from support.schema_v1 import write_embedded_v1

    from clipsearch.index.base import DateRange

    docs = corpus(20)
    write_embedded_v1(tmp_path / "idx", "fake", DIM, docs)
    idx = open_index("embedded", str(tmp_path / "idx"))
    assert idx.info().extra["schema_version"] == embedded.SCHEMA_VERSION
    db = sqlite3.connect(tmp_path / "idx" / DB_NAME)
    assert db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0] == str(
        embedded.SCHEMA_VERSION
    )
    db.close()
    assert idx.undated("a/") == {d.key for d in docs if d.key.startswith("a/")}
    assert idx.search(docs[0].vector, k=5, taken=DateRange("2019-01-01T00:00:00", None)) == []
    filled = idx.set_taken({d.key: ("2019-03-04T05:06:07", "-05:00") for d in docs if d.key.startswith("a/")})
    assert filled == len([d for d in docs if d.key.startswith("a/")])
    assert idx.undated() == {d.key for d in docs if not d.key.startswith("a/")}
    hits = idx.search(docs[0].vector, k=50, taken=DateRange("2019-03-04T05:06:07", "2019-03-04T05:06:08"))
    assert {h.key for h in hits} == {d.key for d in docs if d.key.startswith("a/")}
    assert hits[0].taken_offset == "-05:00"
    # another process (a read-only server) sees the filled dates
    reader = open_index("embedded", str(tmp_path / "idx"), read_only=True)
    assert len(reader.search(docs[0].vector, k=50, taken=DateRange("2019-01-01T00:00:00", None))) == len(hits)


@pytest.mark.parametrize("read_only", [True, False])
def test_given_an_index_from_a_newer_release_when_opened_then_it_is_refused_with_one_line(tmp_path, read_only):
    from support.schema_v1 import write_embedded_v1

    from clipsearch.index.base import SchemaTooNew

    newer = embedded.SCHEMA_VERSION + 1
    path = write_embedded_v1(tmp_path / "idx", "fake", DIM, corpus(3), schema_version=newer)
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match=f"schema version {newer}, newer than this clipsearch supports") as info:
        open_index("embedded", str(tmp_path / "idx"), read_only=read_only)
    assert "\n" not in str(info.value)
    with pytest.raises(SchemaTooNew):
        check_index(tmp_path / "idx", repair=True)
    assert path.read_bytes() == before


def test_given_a_version_1_index_when_checked_then_noted_and_repair_migrates_it(tmp_path):
    from support.schema_v1 import write_embedded_v1

    write_embedded_v1(tmp_path / "idx", "fake", DIM, corpus(5))
    report = check_index(tmp_path / "idx")
    assert report.healthy and "schema version 1" in report.notes[0]
    report = check_index(tmp_path / "idx", repair=True)
    assert report.healthy and f"migrated the schema from version 1 to {embedded.SCHEMA_VERSION}" in report.repaired[0]
    reopened = open_index("embedded", str(tmp_path / "idx"), read_only=True)
    assert reopened.info().extra["schema_version"] == embedded.SCHEMA_VERSION


def test_given_a_page_damaged_then_repair_keeps_every_row_not_on_that_page(tmp_path):
    path, docs, before = large_index(tmp_path)
    data = (path / DB_NAME).read_bytes()
    page = data.index(before[docs[1500].id]) // 4096
    on_page = {id_ for id_, vector in before.items() if data.find(vector) // 4096 == page}
    with open(path / DB_NAME, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xa5" * 4096)
    report = check_index(path, repair=True)
    db = sqlite3.connect(path / DB_NAME)
    after = {r[0] for r in db.execute("SELECT id FROM images")}
    db.close()
    assert after == before.keys() - on_page and report.rows == len(after)


def test_given_the_rebuilt_file_not_checkpointed_at_close_then_repair_fails_with_one_line_and_keeps_the_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "idx"
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    idx.upsert(corpus(3000))
    idx.close()
    data = (path / DB_NAME).read_bytes()
    with open(path / DB_NAME, "r+b") as f:
        f.seek((len(data) // 4096 // 2) * 4096)
        f.write(b"\xa5" * 4096)
    damaged = (path / DB_NAME).read_bytes()
    # A close that cannot checkpoint (as on a full disk): another connection keeps the WAL open meanwhile.
    held: list[sqlite3.Connection] = []
    real_close = EmbeddedIndex.close

    def close_without_checkpoint(self):
        if self.directory.name == ".repair":
            other = sqlite3.connect(self.path)
            other.execute("BEGIN")
            other.execute("SELECT COUNT(*) FROM images").fetchone()  # holds a read snapshot
            held.append(other)
        real_close(self)

    monkeypatch.setattr(EmbeddedIndex, "close", close_without_checkpoint)
    monkeypatch.setattr(embedded, "BUSY_TIMEOUT_S", 0)
    try:
        report = check_index(path, repair=True)
    except IndexUnavailable as e:
        assert "repair could not finish" in str(e) and "\n" not in str(e)
        assert (path / DB_NAME).read_bytes() == damaged and not (path / ".repair").exists()
    else:  # or, if it went on, the file it reports holds every row it reports
        for other in held:
            other.close()
        held.clear()
        db = sqlite3.connect(path / DB_NAME)
        try:
            kept: object = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error as e:
            kept = f"unreadable ({e})"
        db.close()
        assert kept == report.rows
    finally:
        for other in held:
            other.close()


def test_given_another_process_creates_the_index_first_then_its_model_record_is_kept(tmp_path):
    path = tmp_path / "idx"
    path.mkdir()
    first = sqlite3.connect(path / DB_NAME, isolation_level=None)
    first.execute("PRAGMA journal_mode=WAL").fetchall()
    first.execute("BEGIN IMMEDIATE")  # the first creator holds the write lock; the second saw an empty file
    outcome: list[object] = []

    def second() -> None:
        try:
            outcome.append(open_index("embedded", str(path), model="fake-b", dim=DIM))
        except Exception as e:  # noqa: BLE001 - the outcome is asserted below
            outcome.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)  # the second reads the empty file and waits for the write lock
    first.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    first.execute("CREATE TABLE images (id TEXT PRIMARY KEY, key TEXT NOT NULL, vector BLOB NOT NULL)")
    first.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema_version", str(SCHEMA_VERSION)), ("model", "fake-a"), ("dim", str(DIM))],
    )
    first.execute("COMMIT")
    thread.join(30)
    first.close()
    assert len(outcome) == 1 and isinstance(outcome[0], ModelMismatch), outcome
    db = sqlite3.connect(path / DB_NAME)
    assert dict(db.execute("SELECT name, value FROM meta"))["model"] == "fake-a"
    db.close()


def test_given_rows_with_unusable_vectors_then_forget_removes_them(tmp_path):
    path = tmp_path / "idx"
    idx = open_index("embedded", str(path), model="fake", dim=DIM)
    docs = [Document(key=f"/photos/trip/{i}.jpg", vector=unit(np.eye(DIM)[i % DIM] + 0.1)) for i in range(4)]
    idx.upsert(docs)
    idx.close()
    db = sqlite3.connect(path / DB_NAME)
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (np.full(DIM, np.nan, np.float32).tobytes(), docs[0].id))
    db.execute("UPDATE images SET vector = ? WHERE id = ?", (b"\0" * 5, docs[1].id))
    db.commit()
    db.close()
    idx = open_index("embedded", str(path))
    assert forget(idx, "/photos/trip") == 4
    assert idx.count() == 0
    idx.close()
