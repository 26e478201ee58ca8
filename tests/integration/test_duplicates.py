"""Duplicates (CONTRACT §7): edited copies are grouped and look-alikes are not, on both backends, through the
CLI and REST (the local route table and the search Lambda's lazy index); hashes on every ingest path; the
schema migration of older indexes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import photos
from support.fakes import FakeEncoder, LambdaContext
from support.schema_v1 import opensearch_v1_body, opensearch_v1_source, write_embedded_v1

from clipsearch import duplicates
from clipsearch.aws import backfill
from clipsearch.aws.config import LazyIndex
from clipsearch.aws.ingest import CREATED, Ingestor, ObjectEvent
from clipsearch.cli import main
from clipsearch.demo import shapes
from clipsearch.errors import BadRequest
from clipsearch.http.routes import build_app
from clipsearch.index.base import Document, doc_id
from clipsearch.index.embedded import SCHEMA_VERSION, EmbeddedIndex
from clipsearch.index.opensearch import OpenSearchIndex
from clipsearch.perceptual import perceptual_hash
from clipsearch.search import SearchService
from model_code.inference import decode_for_model

ROOT = Path(__file__).resolve().parents[2]
# Subjects whose 5% crop stays well inside the thresholds (bench/duplicates.py measures the whole spread).
SUBJECTS = (2, 3, 4)
EXPECTED = {
    ("exact", frozenset({"s2/burst.jpg", "s2/burst copy.jpg"})),
    *(("near", frozenset({f"s{s}/original.jpg", *(f"s{s}/{edit}.jpg" for edit in photos.EDITS)})) for s in SUBJECTS),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per subject: the original, its three edited copies and a redrawn look-alike; an exact copy of one
    look-alike; and two different large red circles of the demo renderer."""
    root = tmp_path_factory.mktemp("library")
    for s in SUBJECTS:
        what = photos.subject(s)
        img = photos.scene(what, 1000 + s)
        (root / f"s{s}").mkdir()
        (root / f"s{s}" / "original.jpg").write_bytes(photos.encoded(img))
        for name, edit in photos.EDITS.items():
            (root / f"s{s}" / f"{name}.jpg").write_bytes(edit(img))
        (root / f"s{s}" / "burst.jpg").write_bytes(photos.encoded(photos.scene(what, 5000 + s)))
    (root / "s2" / "burst copy.jpg").write_bytes((root / "s2" / "burst.jpg").read_bytes())
    (root / "circles").mkdir()
    rng = np.random.default_rng(7)
    for n in (1, 2):
        circle = shapes.render("red", "circle", "large", rng=rng, image_size=256)
        (root / "circles" / f"red-{n}.jpg").write_bytes(photos.encoded(circle))
    return root


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def found(response: dict[str, Any], root: Path) -> set[tuple[str, frozenset[str]]]:
    return {
        (
            g["kind"],
            frozenset(os.path.relpath(h["key"], root) if h["key"].startswith("/") else h["key"] for h in g["hits"]),
        )
        for g in response["groups"]
    }


@pytest.fixture(scope="module")
def embedded(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index = tmp_path_factory.mktemp("embedded") / "index"
    status, _, err = cli("index", str(library), "--index", str(index), "--model", "demo")
    assert status == 0, err
    return index


@pytest.fixture
def opensearch_name(opensearch_url: str) -> Iterator[str]:
    name = f"dups-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(Exception):
        OpenSearchIndex(name, url=opensearch_url).drop()


def get(app: Any, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
    event = json.loads((ROOT / "events" / "api" / "search-get.json").read_text())
    event.update(
        path="/duplicates",
        resource="/duplicates",
        queryStringParameters=query or None,
        multiValueQueryStringParameters={k: [v] for k, v in query.items()} or None,
    )
    response = app.resolve(event, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


def test_given_edited_copies_and_look_alikes_when_the_embedded_index_is_scanned_then_only_copies_are_grouped(
    library: Path, embedded: Path
) -> None:
    status, out, err = cli("duplicates", "--index", str(embedded), "--json")

    assert status == 0, err
    response = json.loads(out)
    assert found(response, library) == EXPECTED
    assert [len(g["hits"]) for g in response["groups"]] == [4, 4, 4, 2]  # largest first
    for group in response["groups"]:
        assert group["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert all(h["score"] >= duplicates.NEAR_COSINE for h in group["hits"])
    assert response["next_from"] is None


def test_given_a_scanned_index_when_the_cli_prints_groups_then_each_names_its_kind_and_files(
    library: Path, embedded: Path
) -> None:
    status, out, _ = cli("duplicates", "--index", str(embedded), "--kind", "exact")

    assert status == 0
    assert out.splitlines()[0].strip() == "1  exact, 2 pictures"
    assert str(library / "s2" / "burst copy.jpg") in out and "original" not in out


def test_given_a_bad_kind_or_limit_when_the_cli_is_asked_then_it_says_why_in_one_line(embedded: Path) -> None:
    status, _, err = cli("duplicates", "--index", str(embedded), "--limit", "500")

    assert status == 2
    assert err.strip() == "clipsearch: error: limit must be between 1 and 200"


def test_given_the_same_library_when_the_opensearch_index_is_scanned_then_it_groups_as_the_embedded_one(
    library: Path, opensearch_url: str, opensearch_name: str
) -> None:
    where = ["--backend", "opensearch", "--opensearch-url", opensearch_url, "--index", opensearch_name]
    status, _, err = cli("index", str(library), "--model", "demo", *where)
    assert status == 0, err

    status, out, err = cli("duplicates", "--json", *where)

    assert status == 0, err
    assert found(json.loads(out), library) == EXPECTED


def test_given_the_rest_route_when_kinds_and_pages_are_asked_then_each_answers_its_part(
    library: Path, embedded: Path, demo_encoder: Any
) -> None:
    index = EmbeddedIndex(embedded, read_only=True)
    app = build_app(SearchService(demo_encoder, index, url_for=lambda hit: f"/images/{hit.id}"))

    status, exact = get(app, {"kind": "exact"})
    _, near = get(app, {"kind": "near"})
    _, first = get(app, {"limit": "1"})
    _, rest = get(app, {"limit": "50", "from": "1"})

    assert status == 200 and set(exact) == {"took_ms", "groups", "next_from"}
    assert found(exact, library) == {g for g in EXPECTED if g[0] == "exact"}
    assert found(near, library) == {g for g in EXPECTED if g[0] == "near"}
    assert len(first["groups"]) == 1 and first["next_from"] == 1
    assert found(first, library) | found(rest, library) == EXPECTED and rest["next_from"] is None
    hit = exact["groups"][0]["hits"][0]
    assert set(hit) == {"id", "key", "score", "title", "url", "taken_at"} and hit["url"] == f"/images/{hit['id']}"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"kind": "similar"}, "kind must be one of exact, near, all"),
        ({"limit": "0"}, "limit must be between 1 and 200"),
        ({"limit": "201"}, "limit must be between 1 and 200"),
        ({"from": "-1"}, "from must be between 0 and 10000"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"k": "3"}, "unknown parameter(s): k"),
    ],
)
def test_given_a_bad_parameter_when_duplicates_are_asked_then_400_says_why(
    embedded: Path, demo_encoder: Any, query: dict[str, str], message: str
) -> None:
    index = EmbeddedIndex(embedded, read_only=True)
    app = build_app(SearchService(demo_encoder, index, url_for=lambda hit: ""))

    status, body = get(app, query)

    assert (status, body["error"]["code"], body["error"]["message"]) == (400, "bad_request", message)


def test_given_the_search_lambdas_lazy_index_when_duplicates_are_asked_then_opensearch_answers(
    library: Path, opensearch_url: str, opensearch_name: str, demo_encoder: Any
) -> None:
    status, _, err = cli(
        "index", str(library), "--model", "demo", "--backend", "opensearch",
        "--opensearch-url", opensearch_url, "--index", opensearch_name,
    )  # fmt: skip
    assert status == 0, err
    lazy = LazyIndex(lambda: OpenSearchIndex(opensearch_name, url=opensearch_url), "demo", demo_encoder.dim)
    app = build_app(SearchService(demo_encoder, lazy, url_for=lambda hit: ""))

    status, body = get(app, {})

    assert status == 200 and found(body, library) == EXPECTED


# -- the hashes on every ingest path --------------------------------------------------------------


def test_given_one_picture_when_each_ingest_path_hashes_it_then_all_store_the_same_hashes(
    aws: None, library: Path, tmp_path: Path
) -> None:
    import boto3

    data = (library / "s3" / "original.jpg").read_bytes()
    expected = (hashlib.sha256(data).hexdigest(), perceptual_hash(decode_for_model(data).image))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="a/original.jpg", Body=data)
    index = EmbeddedIndex(tmp_path / "lambda", model=FakeEncoder.model, dim=FakeEncoder.dim)

    Ingestor(FakeEncoder(), index, s3).apply(ObjectEvent(CREATED, "photos", "a/original.jpg", len(data)))
    by_lambda = index.get(doc_id("photos", "a/original.jpg"))
    by_backfill = backfill.document_for(s3, "photos", "a/original.jpg", np.zeros(4, dtype=np.float32))
    status, _, _ = cli(
        "index", str(library / "s3" / "original.jpg"), "--index", str(tmp_path / "local"), "--model", "demo"
    )
    by_cli = EmbeddedIndex(tmp_path / "local", read_only=True).get(doc_id("", str(library / "s3" / "original.jpg")))

    assert status == 0 and by_lambda is not None and by_cli is not None
    assert {(d.content_hash, d.phash) for d in (by_lambda, by_backfill, by_cli)} == {expected}


# -- migration --------------------------------------------------------------------------------------


def write_embedded_v2(directory: Path, library: Path, encoder: Any) -> None:
    """The library as schema 2 indexed it: capture-time columns, no phash column, no content-hash index."""
    paths = sorted(p for p in library.rglob("*.jpg"))
    vectors = encoder.encode_images([decode_for_model(p.read_bytes()).image for p in paths])
    docs = [
        Document(
            key=str(p),
            vector=v,
            title=p.stem,
            content_hash=hashlib.sha256(p.read_bytes()).hexdigest(),
            size=p.stat().st_size,
            mtime=p.stat().st_mtime,
        )
        for p, v in zip(paths, vectors, strict=True)
    ]
    path = write_embedded_v1(directory, encoder.model, encoder.dim, docs, schema_version=2)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("ALTER TABLE images ADD COLUMN taken_at TEXT")
        db.execute("ALTER TABLE images ADD COLUMN taken_offset TEXT NOT NULL DEFAULT ''")
        db.execute("UPDATE images SET taken_at = '2020-01-01T00:00:00'")
    finally:
        db.close()


def test_given_a_schema_2_index_when_index_runs_then_it_is_migrated_and_hashed_without_re_encoding(
    library: Path, tmp_path: Path, demo_encoder: Any
) -> None:
    write_embedded_v2(tmp_path / "v2", library, demo_encoder)
    before = EmbeddedIndex(tmp_path / "v2", read_only=True)
    vector = before.get(doc_id("", str(library / "s2" / "original.jpg"))).vector  # type: ignore[union-attr]

    status, _, err = cli("duplicates", "--index", str(tmp_path / "v2"), "--kind", "near")
    assert status == 2 and "no perceptual hashes yet" in err
    status, out, err = cli("index", str(library), "--index", str(tmp_path / "v2"))
    assert status == 0, err
    assert out.startswith("indexed 0, unchanged 18") and "hashed 18 unchanged pictures" in out
    status, out, _ = cli("duplicates", "--index", str(tmp_path / "v2"), "--json")

    assert found(json.loads(out), library) == EXPECTED
    after = EmbeddedIndex(tmp_path / "v2", read_only=True)
    assert after.info().extra["schema_version"] == SCHEMA_VERSION == 3
    assert np.array_equal(after.get(doc_id("", str(library / "s2" / "original.jpg"))).vector, vector)  # type: ignore[union-attr]
    status, out, _ = cli("index", str(library), "--index", str(tmp_path / "v2"))
    assert "hashed" not in out


def test_given_an_old_opensearch_index_when_it_is_written_then_the_mapping_gains_phash(
    opensearch_url: str, opensearch_name: str
) -> None:
    old = OpenSearchIndex(opensearch_name, model="fake", dim=4, url=opensearch_url)
    old.drop()
    old.client.indices.create(index=opensearch_name, body=opensearch_v1_body("fake", 4))
    doc = Document(key="a.jpg", vector=np.array([1, 0, 0, 0], dtype=np.float32), content_hash="x")
    old.client.index(index=opensearch_name, id=doc.id, body=opensearch_v1_source(doc, "fake"), refresh=True)
    index = OpenSearchIndex(opensearch_name, url=opensearch_url)
    with pytest.raises(BadRequest, match="no perceptual hashes yet"):
        index.perceptual_hashes()

    index.upsert([Document(key="b.jpg", vector=doc.vector, content_hash="y", phash="00000000000000ff")])
    index.set_hashes({"a.jpg": ("z", "00000000000000fe")})
    index.refresh()

    mapping = next(iter(index.client.indices.get_mapping(index=opensearch_name).values()))["mappings"]
    assert mapping["properties"]["phash"] == {"type": "keyword"}
    assert mapping["_meta"]["clipsearch"]["schema_version"] == 3
    assert sorted(index.perceptual_hashes()) == sorted(
        [(doc.id, "z", "00000000000000fe"), (doc_id("", "b.jpg"), "y", "00000000000000ff")]
    )
