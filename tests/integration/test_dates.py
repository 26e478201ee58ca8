"""Capture time end to end (CONTRACT §7): EXIF (JPEG and HEIC) or the file's mtime, filtered through the CLI
and REST on both backends, and indexes written before capture times were kept (schema version 1)."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from PIL import Image
from support.schema_v1 import opensearch_v1_body, opensearch_v1_source, write_embedded_v1

from clipsearch.cli import main
from clipsearch.errors import BadRequest
from clipsearch.index.base import DateRange, Document, SchemaTooNew
from clipsearch.index.embedded import SCHEMA_VERSION as EMBEDDED_SCHEMA
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.index.opensearch import SCHEMA_VERSION as OPENSEARCH_SCHEMA
from clipsearch.ingest import title_from_path
from model_code.inference import decode_for_model

CLI = [sys.executable, "-m", "clipsearch.cli"]
ZONE = "Asia/Tokyo"  # the CLI runs in this zone: a file's mtime counts as Tokyo wall-clock time
# name -> (EXIF DateTimeOriginal, OffsetTimeOriginal) as written into the picture; None: no EXIF date.
PHOTOS: dict[str, tuple[str | None, str | None]] = {
    "summer.jpg": ("2019:07:14 15:02:11", "+02:00"),
    "first-of-june.jpg": ("2019:06:01 00:00:00", None),
    "late-august.jpg": ("2019:08:31 23:59:59", "-05:00"),
    "new-year.jpg": ("2020:01:01 00:00:00", "+01:00"),
    "new-years-eve.JPG": ("2018:12:31 23:59:59", None),
    "no-clock.jpg": ("0000:00:00 00:00:00", None),  # a camera without its clock set: the mtime counts
    "scan.png": (None, None),
    "iphone.HEIC": ("2019:07:04 12:00:00", "+09:00"),
}
MTIME = datetime.datetime(2019, 7, 20, 10, 0, 0, tzinfo=ZoneInfo(ZONE))
# What each picture's hit says: the wall-clock time, with the EXIF offset appended when there is one.
TAKEN = {
    "summer.jpg": "2019-07-14T15:02:11+02:00",
    "first-of-june.jpg": "2019-06-01T00:00:00",
    "late-august.jpg": "2019-08-31T23:59:59-05:00",
    "new-year.jpg": "2020-01-01T00:00:00+01:00",
    "new-years-eve.JPG": "2018-12-31T23:59:59",
    "no-clock.jpg": "2019-07-20T10:00:00",
    "scan.png": "2019-07-20T10:00:00",
    "iphone.HEIC": "2019-07-04T12:00:00+09:00",
}
SUMMER_2019 = {"summer.jpg", "first-of-june.jpg", "late-august.jpg", "no-clock.jpg", "scan.png", "iphone.HEIC"}


def photo(name: str, when: str | None, offset: str | None, colour: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (96, 72), (255, 255, 255))
    img.paste(colour, (24, 18, 72, 54))
    exif = Image.Exif()
    if when is not None:
        ifd = exif.get_ifd(0x8769)
        ifd[0x9003] = when
        if offset is not None:
            ifd[0x9011] = offset
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".png": "PNG", ".heic": "HEIF"}[Path(name).suffix.lower()]
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    img.save(buf, format=fmt, **({"exif": exif.tobytes()} if when is not None else {}))
    return buf.getvalue()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`index` runs as a subprocess in ZONE (the mtime's local time); the other commands in this process,
    which loads the demo model once, through the same main() the console script calls."""
    if args[0] == "index":
        proc = subprocess.run(
            [*CLI, *args], capture_output=True, text=True, timeout=600, env={**os.environ, "TZ": ZONE}
        )
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(list(args))
            except SystemExit as e:  # argparse: --help, and usage errors
                status = int(e.code or 0)
        proc = subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"clipsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def found(index: Path, *args: str) -> dict[str, str | None]:
    """name -> taken_at of every hit of a search (k=50: all pictures in range)."""
    out = json.loads(run("search", "a red square", "-k", "50", "--index", str(index), "--json", *args).stdout)
    return {Path(h["key"]).name: h["taken_at"] for h in out["hits"]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(11)
    for name, (when, offset) in PHOTOS.items():
        path = folder / name
        path.write_bytes(photo(name, when, offset, tuple(int(c) for c in rng.integers(0, 255, 3))))
        os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))
    return folder


@pytest.fixture(scope="module")
def indexed(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index = tmp_path_factory.mktemp("index")
    run("index", str(photos), "--model", "demo", "--index", str(index))
    return index


def test_given_photos_when_indexed_then_each_hit_carries_its_capture_time_from_exif_or_the_local_mtime(indexed):
    assert found(indexed) == TAKEN


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--after", "2019-06-01", "--before", "2019-09-01"], SUMMER_2019),
        (["--after", "2019-06", "--before", "2019-09"], SUMMER_2019),
        (
            ["--after", "2019-06-01T00:00:01", "--before", "2019-08-31T23:59:59"],
            SUMMER_2019 - {"first-of-june.jpg", "late-august.jpg"},
        ),
        (["--after", "2019"], set(PHOTOS) - {"new-years-eve.JPG"}),
        (["--before", "2019"], {"new-years-eve.JPG"}),
        (["--after", "2020-01-01T00:00:00"], {"new-year.jpg"}),
        (["--after", "2019-07-20T10:00", "--before", "2019-07-20T10:00:01"], {"no-clock.jpg", "scan.png"}),
    ],
)
def test_given_after_and_before_when_searched_then_after_is_inclusive_and_before_exclusive_in_wall_clock_time(
    indexed, args, names
):
    # the offsets never move a picture: late-august (-05:00) is 2019-09-01 in UTC, yet stays in summer
    assert set(found(indexed, *args)) == names


def test_given_search_help_then_it_says_after_is_inclusive_and_before_exclusive():
    text = " ".join(run("search", "--help").stdout.split())
    assert "on or after DATE (inclusive)" in text and "before DATE (exclusive" in text


@pytest.mark.parametrize(
    "args", [["--after", "July"], ["--before", "2019-07-14T15:02:11+02:00"], ["--after", "2020", "--before", "2019"]]
)
def test_given_a_bad_date_when_searched_then_one_line_and_exit_2(indexed, args):
    proc = run("search", "a red square", "--index", str(indexed), *args, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("clipsearch: error: --") and proc.stderr.count("\n") == 1


# -- REST ------------------------------------------------------------------------------------------


def http(server: Any, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body) if body is not None else None,
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_given_the_rest_api_when_filtered_by_date_then_post_and_get_agree_with_the_cli(indexed, demo_encoder):
    from clipsearch.http.server import make_server

    index = EmbeddedIndex(indexed, read_only=True)
    with make_server(index, demo_encoder, port=0).start() as server:
        status, posted = http(
            server,
            "POST",
            "/search",
            {"text": "a red square", "k": 50, "filter": {"taken_after": "2019-06-01", "taken_before": "2019-09"}},
        )
        assert status == 200
        assert {Path(h["key"]).name: h["taken_at"] for h in posted["hits"]} == {n: TAKEN[n] for n in SUMMER_2019}
        assert posted["query"]["filter"] == {"taken_after": "2019-06-01", "taken_before": "2019-09-01"}
        status, got = http(server, "GET", "/search?q=a+red+square&k=50&after=2019-06-01&before=2019-09")
        assert status == 200 and got["hits"] == posted["hits"]
        status, bad = http(server, "POST", "/search", {"text": "x", "filter": {"taken_after": "2019-07-14T15:02Z"}})
        assert status == 400 and "time zone" in bad["error"]["message"]
    index.close()


# -- indexes written before capture times (schema version 1) ----------------------------------------


def v1_index(photos: Path, directory: Path, demo_encoder: Any) -> Path:
    """The photos as version 1 indexed them: same keys, sizes, mtimes and vectors, no capture time."""
    docs = []
    for path in sorted(photos.iterdir()):
        st = path.stat()
        decoded = decode_for_model(path.read_bytes())
        docs.append(
            Document(
                key=str(path),
                vector=demo_encoder.encode_images([decoded.image])[0],
                title=title_from_path(path),
                size=st.st_size,
                mtime=st.st_mtime,
                width=decoded.width,
                height=decoded.height,
            )
        )
    return write_embedded_v1(directory, demo_encoder.model, demo_encoder.dim, docs)


def vectors(db_path: Path) -> dict[str, bytes]:
    db = sqlite3.connect(db_path)
    try:
        return {r[0]: r[1] for r in db.execute("SELECT id, vector FROM images")}
    finally:
        db.close()


def test_given_a_version_1_index_when_searched_then_it_answers_unchanged_and_the_next_index_run_dates_it(
    photos, tmp_path, demo_encoder
):
    db_path = v1_index(photos, tmp_path / "v1", demo_encoder)
    before = db_path.read_bytes()
    stored = vectors(db_path)
    # GIVEN an index from before capture times; WHEN searched (read-only) THEN it answers, dates unknown
    assert found(tmp_path / "v1") == dict.fromkeys(PHOTOS)
    assert json.loads(run("stats", "--index", str(tmp_path / "v1"), "--json").stdout)["schema_version"] == 1
    # ...a date filter says what to do, in one line, and nothing was written
    proc = run("search", "a red square", "--index", str(tmp_path / "v1"), "--after", "2019", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run `clipsearch index`" in proc.stderr
    assert db_path.read_bytes() == before
    # WHEN indexed again THEN it is migrated, every unchanged picture gets its date, none is re-encoded
    out = run("index", str(photos), "--index", str(tmp_path / "v1")).stdout
    assert f"indexed 0, unchanged {len(PHOTOS)}" in out
    assert f"read the capture dates of {len(PHOTOS)} unchanged pictures" in out
    assert vectors(db_path) == stored
    assert found(tmp_path / "v1") == TAKEN
    assert set(found(tmp_path / "v1", "--after", "2019-06-01", "--before", "2019-09-01")) == SUMMER_2019
    # ...and the run after that has nothing left to date
    assert "capture dates" not in run("index", str(photos), "--index", str(tmp_path / "v1")).stdout


def test_given_a_version_1_index_when_checked_and_repaired_then_repair_migrates_it(photos, tmp_path, demo_encoder):
    v1_index(photos, tmp_path / "v1", demo_encoder)
    assert "schema version 1" in run("check", "--index", str(tmp_path / "v1")).stdout
    repaired = run("check", "--repair", "--index", str(tmp_path / "v1")).stdout
    assert f"migrated the schema from version 1 to {EMBEDDED_SCHEMA}" in repaired
    stats = json.loads(run("stats", "--index", str(tmp_path / "v1"), "--json").stdout)
    assert stats["schema_version"] == EMBEDDED_SCHEMA


def test_given_an_index_from_a_newer_release_when_any_command_opens_it_then_one_line_and_exit_2(
    photos, tmp_path, demo_encoder
):
    directory = tmp_path / "newer"
    db_path = v1_index(photos, directory, demo_encoder)
    db = sqlite3.connect(db_path)
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(EMBEDDED_SCHEMA + 1),))
    db.commit()
    db.close()
    before = db_path.read_bytes()
    for args in (["search", "a red square"], ["stats"], ["index", str(photos)], ["check"], ["check", "--repair"]):
        proc = run(*args, "--index", str(directory), check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1
        assert f"schema version {EMBEDDED_SCHEMA + 1}, newer than this clipsearch" in proc.stderr
    assert db_path.read_bytes() == before


# -- OpenSearch --------------------------------------------------------------------------------------


@pytest.fixture
def os_name(opensearch_url: str) -> Iterator[str]:
    from opensearchpy import OpenSearch

    name = f"cs-dates-{uuid.uuid4().hex[:10]}"
    yield name
    # A plain client: opening the index as clipsearch would need its model, and a failed open left it behind.
    # `name*`: the index, the physical one behind the alias `name` (clipsearch reindex) and the probe.
    client = OpenSearch(opensearch_url)
    for physical in client.indices.get(index=f"{name}*"):
        client.indices.delete(index=physical)


@pytest.mark.opensearch
def test_given_the_opensearch_backend_when_filtered_through_the_cli_then_the_same_pictures_as_embedded(
    photos, indexed, os_name, opensearch_url
):
    backend = ["--backend", "opensearch", "--opensearch-url", opensearch_url, "--index", os_name]
    run("index", str(photos), "--model", "demo", *backend)
    for args in (["--after", "2019-06-01", "--before", "2019-09-01"], ["--before", "2019"], []):
        out = json.loads(run("search", "a red square", "-k", "50", "--json", *args, *backend).stdout)
        embedded = json.loads(
            run("search", "a red square", "-k", "50", "--json", *args, "--index", str(indexed)).stdout
        )
        assert [(Path(h["key"]).name, h["taken_at"]) for h in out["hits"]] == [
            (Path(h["key"]).name, h["taken_at"]) for h in embedded["hits"]
        ]


@pytest.mark.opensearch
def test_given_a_version_1_opensearch_index_when_searched_then_written_then_it_is_migrated_by_the_write(
    os_name, opensearch_url
):
    from clipsearch.index.opensearch import OpenSearchIndex

    rng = np.random.default_rng(4)
    old = [Document(key=f"old/{i}.jpg", vector=(v := rng.standard_normal(16)) / np.linalg.norm(v)) for i in range(6)]
    raw = OpenSearchIndex(f"{os_name}-probe", model="fake", dim=16, url=opensearch_url)  # a client to borrow
    client = raw.client
    try:
        client.indices.create(index=os_name, body=opensearch_v1_body("fake", 16))
        for d in old:
            client.index(index=os_name, id=d.id, body=opensearch_v1_source(d, "fake"), refresh=True)
        # GIVEN a version 1 index; WHEN searched THEN it answers, with no capture times, and is unchanged
        index = OpenSearchIndex(os_name, url=opensearch_url)
        reader = OpenSearchIndex(os_name, url=opensearch_url)  # a warm search Lambda, opened before the write
        hits = index.search(old[2].vector, k=3)
        assert hits[0].id == old[2].id and hits[0].taken_at is None
        with pytest.raises(BadRequest, match="no capture dates yet"):
            index.search(old[2].vector, k=3, taken=DateRange("2019-01-01T00:00:00", None))
        mapping = client.indices.get_mapping(index=os_name)[os_name]["mappings"]
        assert "taken_at" not in mapping["properties"] and mapping["_meta"]["clipsearch"]["schema_version"] == 1
        # WHEN written THEN the fields and the version are added first, and old documents can be dated
        new = Document(key="new/1.jpg", vector=old[0].vector, taken_at="2019-07-14T15:02:11", taken_offset="+02:00")
        assert index.upsert([new]).failed == {}
        mapping = client.indices.get_mapping(index=os_name)[os_name]["mappings"]
        assert mapping["properties"]["taken_at"]["type"] == "date"
        assert mapping["_meta"]["clipsearch"]["schema_version"] == OPENSEARCH_SCHEMA
        assert mapping["_meta"]["clipsearch"]["model"] == "fake"
        assert index.undated("old/") == {d.key for d in old}
        assert index.set_taken({old[3].key: ("2019-07-01T08:00:00", "")}) == 1
        index.refresh()
        dated = index.search(old[3].vector, k=10, taken=DateRange("2019-07-01T00:00:00", "2019-08-01T00:00:00"))
        assert [(h.key, h.taken_at, h.taken_offset) for h in dated][:1] == [(old[3].key, "2019-07-01T08:00:00", "")]
        assert {h.key for h in dated} == {old[3].key, new.key}
        assert reader.search(old[3].vector, k=10, taken=DateRange("2019-07-01T00:00:00", None)) == dated
        assert OpenSearchIndex(os_name, url=opensearch_url).info().extra["schema_version"] == OPENSEARCH_SCHEMA
        # a newer release's index is refused, in one line
        client.indices.put_mapping(
            index=os_name,
            body={"_meta": {"clipsearch": {**mapping["_meta"]["clipsearch"], "schema_version": OPENSEARCH_SCHEMA + 1}}},
        )
        with pytest.raises(SchemaTooNew, match=f"schema version {OPENSEARCH_SCHEMA + 1}"):
            OpenSearchIndex(os_name, url=opensearch_url)
    finally:
        raw.drop()
        raw.close()


# -- S3: EXIF, else the object's LastModified -------------------------------------------------------


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process in ZONE (a Lambda's local zone is whatever TZ says; UTC by default)."""
    import time

    monkeypatch.setenv("TZ", ZONE)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_given_s3_uploads_when_ingested_then_taken_at_is_exif_else_last_modified_as_local_time(
    aws: None, tokyo: None, tmp_path: Path
) -> None:
    import boto3
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from support.fakes import FakeEncoder

    from clipsearch.aws.ingest import Ingestor
    from clipsearch.index.base import doc_id

    root = Path(__file__).resolve().parents[2]
    record = json.loads((root / "events" / "ingest" / "put.json").read_text())["Records"][0]
    bucket, key = "clipsearch-images-example", "holiday photos/Café – été 2019+1.jpg"  # the key in put.json
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    index = EmbeddedIndex(tmp_path / "index", model=FakeEncoder.model, dim=FakeEncoder.dim)
    ingestor = Ingestor(FakeEncoder(), index, s3)
    # GIVEN a picture without an EXIF date THEN its LastModified, as Tokyo wall-clock time, no offset
    s3.put_object(Bucket=bucket, Key=key, Body=photo("scan.png", None, None, (200, 30, 30)))
    ingestor.handle_record(SQSRecord(record))
    modified = s3.head_object(Bucket=bucket, Key=key)["LastModified"]
    doc = index.get(doc_id(bucket, key))
    assert doc is not None
    assert (doc.taken_at, doc.taken_offset) == (
        modified.astimezone(ZoneInfo(ZONE)).replace(tzinfo=None).isoformat(timespec="seconds"),
        "",
    )
    # GIVEN an iPhone HEIC with its EXIF date and offset THEN those
    s3.put_object(Bucket=bucket, Key=key, Body=photo("x.heic", "2019:07:04 12:00:00", "+09:00", (30, 30, 200)))
    ingestor.handle_record(SQSRecord(record))
    doc = index.get(doc_id(bucket, key))
    assert doc is not None and (doc.taken_at, doc.taken_offset) == ("2019-07-04T12:00:00", "+09:00")
    index.close()
