"""clipsearch reindex: a server keeps answering, one model at a time, while the index moves to another model."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from opensearchpy import OpenSearch
from support.fakes import FAKE_DIM, ROOT, FakeEncoder, InterruptingEncoder, RotatedEncoder
from support.images import picture

from clipsearch.follow import Follower
from clipsearch.http.server import make_server
from clipsearch.index import open_index
from clipsearch.index.base import Document, VectorIndex
from clipsearch.index.generations import BUILDING, model_slug, pointer_target
from clipsearch.index.opensearch import OpenSearchIndex
from clipsearch.ingest import forget, index_paths
from clipsearch.reindex import OnResume, ReindexSummary, reindex_embedded, reindex_opensearch

COLOURS = [(40 * i % 256, 90 * i % 256, 160 * i % 256) for i in range(1, 41)]
ENCODERS = {"fake": FakeEncoder(), "fake-rotated": RotatedEncoder()}


@dataclass(frozen=True)
class Answer:
    status: int
    model: str | None = None
    top_key: str | None = None
    top_score: float | None = None


class Stream:
    """Sends one image query after another to a server from a thread until stopped; keeps every answer."""

    def __init__(self, url: str, image: bytes) -> None:
        self.url, self.image = url, image
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.seen: dict[str, threading.Event] = {model: threading.Event() for model in ENCODERS}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(
                f"{self.url}/search?k=1", data=self.image, headers={"Content-Type": "image/png"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    body = json.loads(resp.read())
            except urllib.error.HTTPError as e:
                self.answers.append(Answer(e.code))
                continue
            top = body["hits"][0]
            self.answers.append(Answer(200, body["model"], top["key"], top["score"]))
            self.seen[body["model"]].set()

    def wait_for(self, model: str) -> None:
        assert self.seen[model].wait(120), f"no answer from {model} came back"

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, colour in enumerate(COLOURS):
        (folder / f"p{i:02d}.png").write_bytes(picture(colour))
    return folder


@pytest.fixture
def root(pictures: Path) -> Path:
    """A plain embedded index folder (no pointer) of the pictures, built with the fake model."""
    folder = pictures.parent / "idx"
    old = open_index("embedded", str(folder), model="fake", dim=FAKE_DIM)
    index_paths([pictures], ENCODERS["fake"], old)
    old.close()
    return folder


def open_at(folder: Path, model: str | None, dim: int | None) -> VectorIndex:
    return open_index("embedded", str(folder), model=model, dim=dim, read_only=model is None)


def images_encoded(encoder: FakeEncoder) -> int:
    return sum(n for kind, n in encoder.calls if kind == "image")


class Resumed:
    """An on_resume callback that keeps what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, int, int]] = []

    def __call__(self, name: str, done: int, total: int) -> None:
        self.told.append((name, done, total))


CUT_AFTER = 16  # images encoded (two batches of 8) before the Ctrl-C


def assert_one_model_per_answer(answers: list[Answer], query: Path) -> None:
    """Every answer succeeded and found the query picture itself (score 1.0: one model encoded and searched);
    the old model answered first, the new one from the switch on, never the old one again."""
    assert answers and all(a.status == 200 for a in answers), {a.status for a in answers}
    assert all(a.top_key == str(query) and a.top_score == pytest.approx(1.0, abs=1e-4) for a in answers), [
        a for a in answers if a.top_score != pytest.approx(1.0, abs=1e-4)
    ][:3]
    models = [a.model for a in answers]
    first_new = models.index("fake-rotated")
    assert set(models[:first_new]) == {"fake"} and set(models[first_new:]) == {"fake-rotated"}


def test_given_model_specs_when_slugged_then_they_are_lower_case_index_safe_names() -> None:
    assert model_slug("ViT-B/32") == "vit-b-32"
    assert model_slug("RN50x4") == "rn50x4"
    slug = model_slug("/models/My Model.pt")
    assert slug.startswith("my-model-") and len(slug) == len("my-model-") + 8
    assert model_slug("/other/My Model.pt") != slug


def test_given_a_served_plain_embedded_index_when_reindexed_then_no_request_fails_or_mixes_models(
    pictures: Path, root: Path
) -> None:
    def reopen() -> VectorIndex:
        return open_index("embedded", str(root), read_only=True)

    follower = Follower(lambda: pointer_target(root) or "", reopen, ENCODERS.__getitem__, every_s=0.05)
    query = pictures / "p07.png"
    with (
        make_server(reopen(), ENCODERS["fake"], port=0, follow=follower, log=lambda line: None).start() as server,
        Stream(server.url, query.read_bytes()) as stream,
    ):
        stream.wait_for("fake")
        summary = reindex_embedded(root, ENCODERS["fake-rotated"], open_at)
        stream.wait_for("fake-rotated")
    assert_one_model_per_answer(stream.answers, query)
    assert (summary.old_model, summary.ingest.indexed) == ("fake", len(COLOURS))
    now = reopen()
    assert (now.model, now.count()) == ("fake-rotated", len(COLOURS))
    assert pointer_target(root) == "index-fake-rotated-1"
    assert (root / "index.sqlite").exists()  # the old index is kept without --drop-old


def test_given_a_reindexed_embedded_index_when_reindexed_with_drop_old_then_the_old_database_is_deleted(
    root: Path,
) -> None:

    first = reindex_embedded(root, ENCODERS["fake-rotated"], open_at, drop_old=True)
    assert not any(root.glob("index.sqlite*"))  # the plain index and SQLite's side files
    assert first.dropped and Path(first.new).is_dir()
    second = reindex_embedded(root, ENCODERS["fake"], open_at, drop_old=True)
    assert second.dropped == [first.new] and not Path(first.new).exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["index-fake-1"]
    now = open_index("embedded", str(root), read_only=True)
    assert (now.model, now.count()) == ("fake", len(COLOURS))


@pytest.fixture
def index_name(opensearch_url: str) -> Iterator[str]:
    name = f"reindex-{uuid.uuid4().hex[:10]}"
    yield name
    client = OpenSearch(hosts=[opensearch_url])
    for physical in client.indices.get(index=f"{name}*"):  # the plain index and every physical one
        client.indices.delete(index=physical)
    client.close()


def test_given_a_new_opensearch_index_name_when_created_then_it_is_an_alias_over_a_physical_index(
    opensearch_url: str, index_name: str
) -> None:
    index = OpenSearchIndex(index_name, "ViT-B/32", FAKE_DIM, url=opensearch_url)
    assert index.targets() == [f"{index_name}-vit-b-32-1"]
    assert OpenSearchIndex(index_name, url=opensearch_url).model == "ViT-B/32"


def test_given_a_served_plain_opensearch_index_when_reindexed_twice_then_no_request_fails_or_mixes_models(
    pictures: Path, opensearch_url: str, index_name: str
) -> None:
    # An index as an older clipsearch created it: a plain index under the name itself.
    plain = OpenSearchIndex(index_name, "fake", FAKE_DIM, url=opensearch_url, alias=index_name)
    index_paths([pictures], ENCODERS["fake"], plain)
    plain.close()
    named = OpenSearchIndex(index_name, url=opensearch_url)

    def reopen() -> VectorIndex:
        return OpenSearchIndex(index_name, url=opensearch_url).pinned()

    def builder(model: str) -> object:
        return lambda physical: OpenSearchIndex(physical, model, FAKE_DIM, url=opensearch_url, alias=index_name)

    follower = Follower(lambda: ",".join(named.targets()), reopen, ENCODERS.__getitem__, every_s=0.05)
    query = pictures / "p07.png"
    with (
        make_server(reopen(), ENCODERS["fake"], port=0, follow=follower, log=lambda line: None).start() as server,
        Stream(server.url, query.read_bytes()) as stream,
    ):
        stream.wait_for("fake")
        first = reindex_opensearch(named, ENCODERS["fake-rotated"], builder("fake-rotated"))  # type: ignore[arg-type]
        stream.wait_for("fake-rotated")
    assert_one_model_per_answer(stream.answers, query)
    # The plain index could not be kept: its name is the alias now.
    assert first.dropped == [index_name] and named.targets() == [f"{index_name}-fake-rotated-1"]
    assert OpenSearchIndex(index_name, url=opensearch_url).model == "fake-rotated"

    named = OpenSearchIndex(index_name, url=opensearch_url)
    second = reindex_opensearch(named, ENCODERS["fake"], builder("fake"), drop_old=True)  # type: ignore[arg-type]
    assert second.dropped == [f"{index_name}-fake-rotated-1"]
    assert named.targets() == named.generations() == [f"{index_name}-fake-1"]
    again = OpenSearchIndex(index_name, url=opensearch_url)
    assert (again.model, again.count()) == ("fake", len(COLOURS))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipsearch.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.fixture
def where(opensearch_url: str, index_name: str) -> list[str]:
    """The CLI options naming an OpenSearch index of one S3 object, built with another model than demo."""
    old = OpenSearchIndex(index_name, "an-older-model", 128, url=opensearch_url)
    old.upsert([Document(key="photos/a.jpg", bucket="bucket", vector=np.ones(128, np.float32))])
    old.close()
    return ["--backend", "opensearch", "--index", index_name, "--opensearch-url", opensearch_url]


def test_given_an_index_of_s3_objects_when_reindexed_then_the_cli_refuses_in_one_line(where: list[str]) -> None:
    run = cli("reindex", "--model", "demo", *where)
    assert run.returncode == 2
    assert run.stderr.startswith(
        "clipsearch: error: 1 of the index's 1 images are S3 objects (e.g. 'photos/a.jpg'); reindex them on AWS"
    )
    assert len(run.stderr.splitlines()) == 1


def test_given_an_opensearch_index_when_prepared_filled_and_switched_as_on_aws_then_it_serves_the_new_model(
    opensearch_url: str, index_name: str, where: list[str]
) -> None:
    prepared = cli("reindex", "--model", "demo", "--prepare", *where)
    assert prepared.returncode == 0, prepared.stderr
    physical = prepared.stdout.strip()
    assert physical == f"{index_name}-demo-1"
    # The backfill's part: the new index, opened by its physical name, gets the re-encoded documents.
    new = OpenSearchIndex(physical, url=opensearch_url)
    new.upsert([Document(key="photos/a.jpg", bucket="bucket", vector=np.ones(128, np.float32))])
    new.close()
    assert OpenSearchIndex(index_name, url=opensearch_url).model == "an-older-model"  # not switched yet
    assert OpenSearchIndex(index_name, url=opensearch_url).unfinished("demo") == physical  # a reindex resumes it
    switched = cli("reindex", "--model", "demo", "--switch", physical, "--drop-old", *where)
    assert switched.returncode == 0, switched.stderr
    assert (
        switched.stdout.strip() == f"{index_name} now leads to {physical} (demo); deleted {index_name}-an-older-model-1"
    )
    now = OpenSearchIndex(index_name, url=opensearch_url)
    assert (now.model, now.count(), now.targets()) == ("demo", 1, [physical])
    assert now.unfinished("demo") is None  # live now: never resumed from here on
    refused = cli("reindex", "--model", "ViT-B/32", "--switch", physical, *where)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"clipsearch: error: {physical!r} was not built for {index_name!r} with model 'ViT-B/32' "
        f"(it records {index_name!r}, 'demo')"
    )


def test_given_an_embedded_index_when_reindexed_from_the_cli_then_stats_report_the_new_model(
    pictures: Path, tmp_path: Path
) -> None:
    from clipsearch import models

    checkpoint = tmp_path / "other.pt"  # the demo weights under another name: another model spec
    checkpoint.write_bytes(models.DEMO_CHECKPOINT.read_bytes())
    where = ["--index", str(tmp_path / "idx")]
    assert cli("index", str(pictures), "--model", "demo", *where).returncode == 0
    run = cli("reindex", "--model", str(checkpoint), "--drop-old", *where)
    assert run.returncode == 0, run.stderr
    stats = json.loads(cli("stats", "--json", *where).stdout)
    assert (stats["model"], stats["count"]) == (str(checkpoint), len(COLOURS))
    assert not (tmp_path / "idx" / "index.sqlite").exists()
    again = cli("reindex", "--model", str(checkpoint), *where)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"clipsearch: error: the index is already built with model {str(checkpoint)!r}; nothing to reindex"
    )


def test_given_a_file_unreadable_now_when_reindexed_with_drop_old_then_the_old_index_is_kept(
    root: Path, pictures: Path
) -> None:
    # A half-synced placeholder: its only vector is in the old index, so --drop-old must not delete it.
    (pictures / "p03.png").write_bytes(b"not a picture yet")
    summary = reindex_embedded(root, ENCODERS["fake-rotated"], open_at, drop_old=True)
    assert [Path(p).name for p, _ in summary.ingest.skipped] == ["p03.png"]
    assert summary.dropped == [] and (root / "index.sqlite").exists()
    with sqlite3.connect(root / "index.sqlite") as db:  # the old database, every picture's vector still there
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(COLOURS)


def test_given_an_embedded_reindex_cut_short_when_run_again_then_it_resumes_and_encodes_only_the_rest(
    root: Path, pictures: Path
) -> None:
    with pytest.raises(KeyboardInterrupt):
        reindex_embedded(root, InterruptingEncoder(RotatedEncoder(), CUT_AFTER), open_at, batch_size=8)
    assert pointer_target(root) is None  # never switched: searches still use the old index
    # Forgotten from the old index meanwhile, though already in the half-built one: not carried over.
    old = open_index("embedded", str(root))
    assert forget(old, pictures / "p00.png") == 1
    old.close()

    again, resumed = RotatedEncoder(), Resumed()
    summary = reindex_embedded(root, again, open_at, batch_size=8, on_resume=resumed)
    assert resumed.told == [("index-fake-rotated-1", CUT_AFTER - 1, len(COLOURS) - 1)]
    assert images_encoded(again) == summary.ingest.indexed == len(COLOURS) - CUT_AFTER
    assert pointer_target(root) == "index-fake-rotated-1"
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["index-fake-rotated-1"]  # no second generation
    assert not (root / "index-fake-rotated-1" / BUILDING).exists()
    now = open_index("embedded", str(root), read_only=True)
    assert (now.model, now.count()) == ("fake-rotated", len(COLOURS) - 1)
    assert str(pictures / "p00.png") not in now.fingerprints()


def test_given_an_embedded_generation_once_live_when_its_model_comes_back_then_a_fresh_one_is_built(
    root: Path,
) -> None:
    reindex_embedded(root, RotatedEncoder(), open_at)  # A -> B
    reindex_embedded(root, FakeEncoder(), open_at)  # B -> A: index-fake-rotated-1 was live, and is no more
    again, resumed = RotatedEncoder(), Resumed()
    summary = reindex_embedded(root, again, open_at, on_resume=resumed)  # A -> B again
    assert resumed.told == [] and images_encoded(again) == summary.ingest.indexed == len(COLOURS)
    assert pointer_target(root) == "index-fake-rotated-2"


def physical_builder(opensearch_url: str, index_name: str, model: str) -> Callable[[str], OpenSearchIndex]:
    return lambda physical: OpenSearchIndex(physical, model, FAKE_DIM, url=opensearch_url, alias=index_name)


@pytest.fixture
def named(pictures: Path, opensearch_url: str, index_name: str) -> OpenSearchIndex:
    """An OpenSearch index of the pictures, built with the fake model (an alias over `NAME-fake-1`)."""
    index = OpenSearchIndex(index_name, "fake", FAKE_DIM, url=opensearch_url)
    index_paths([pictures], ENCODERS["fake"], index)
    index.close()
    return OpenSearchIndex(index_name, url=opensearch_url)


def reindex_named(
    opensearch_url: str, index_name: str, encoder: FakeEncoder | InterruptingEncoder, on_resume: OnResume | None = None
) -> ReindexSummary:
    named = OpenSearchIndex(index_name, url=opensearch_url)
    build = physical_builder(opensearch_url, index_name, encoder.model)
    return reindex_opensearch(named, encoder, build, batch_size=8, on_resume=on_resume)  # type: ignore[arg-type]


def test_given_an_opensearch_reindex_cut_short_when_run_again_then_it_resumes_and_encodes_only_the_rest(
    named: OpenSearchIndex, opensearch_url: str, index_name: str
) -> None:
    with pytest.raises(KeyboardInterrupt):
        reindex_named(opensearch_url, index_name, InterruptingEncoder(RotatedEncoder(), CUT_AFTER))
    assert named.targets() == [f"{index_name}-fake-1"]  # never switched

    again, resumed = RotatedEncoder(), Resumed()
    summary = reindex_named(opensearch_url, index_name, again, resumed)
    physical = f"{index_name}-fake-rotated-1"
    assert resumed.told == [(physical, CUT_AFTER, len(COLOURS))]
    assert images_encoded(again) == summary.ingest.indexed == len(COLOURS) - CUT_AFTER
    assert named.targets() == [physical]
    assert named.generations() == [f"{index_name}-fake-1", physical]  # no second half-built index
    now = OpenSearchIndex(index_name, url=opensearch_url)
    assert (now.model, now.count()) == ("fake-rotated", len(COLOURS))


def test_given_an_opensearch_index_once_live_when_its_model_comes_back_then_a_fresh_one_is_built(
    named: OpenSearchIndex, opensearch_url: str, index_name: str
) -> None:
    reindex_named(opensearch_url, index_name, RotatedEncoder())  # A -> B
    reindex_named(opensearch_url, index_name, FakeEncoder())  # B -> A: NAME-fake-rotated-1 was live
    again, resumed = RotatedEncoder(), Resumed()
    summary = reindex_named(opensearch_url, index_name, again, resumed)  # A -> B again
    assert resumed.told == [] and images_encoded(again) == summary.ingest.indexed == len(COLOURS)
    assert named.targets() == [f"{index_name}-fake-rotated-2"]


def test_given_an_embedded_reindex_cut_short_when_the_cli_runs_it_again_then_it_says_it_resumes(
    pictures: Path, tmp_path: Path
) -> None:
    from clipsearch import models
    from clipsearch.encoders import LocalEncoder

    checkpoint = tmp_path / "other.pt"  # the demo weights under another name: another model spec
    checkpoint.write_bytes(models.DEMO_CHECKPOINT.read_bytes())
    spec = models.canonical_spec(str(checkpoint))
    root = tmp_path / "idx"
    assert cli("index", str(pictures), "--model", "demo", "--index", str(root)).returncode == 0
    with pytest.raises(KeyboardInterrupt):
        reindex_embedded(root, InterruptingEncoder(LocalEncoder(spec), CUT_AFTER), open_at, batch_size=8)
    run = cli("reindex", "--model", spec, "--batch-size", "8", "--index", str(root))
    assert run.returncode == 0, run.stderr
    generation = f"index-{model_slug(spec)}-1"
    assert (
        f"resuming {generation}, which an earlier reindex began: {CUT_AFTER} of {len(COLOURS)} images already encoded"
        in run.stderr.splitlines()
    )
    assert run.stdout.startswith(f"reindexed {len(COLOURS) - CUT_AFTER} of {len(COLOURS)} images with {spec}")
    assert pointer_target(root) == generation


class CountingIndex:
    """An index that counts its fingerprints() calls (on OpenSearch, each is a search request)."""

    def __init__(self, real: VectorIndex) -> None:
        self._real, self.lookups = real, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def fingerprints(self, prefix: str = "") -> object:
        self.lookups += 1
        return self._real.fingerprints(prefix)


def test_given_many_files_named_one_by_one_when_indexed_again_then_one_scan_finds_what_is_unchanged(
    pictures: Path, tmp_path: Path
) -> None:
    # GIVEN every picture indexed by name (as a reindex names them), one changed since, and a file beside
    # one of them whose name only starts like it (a prefix match must not take it for that one)
    files = sorted(pictures.iterdir())
    index = open_index("embedded", str(tmp_path / "idx"), model="fake", dim=FAKE_DIM)
    index_paths(list(files), ENCODERS["fake"], index)
    files[3].write_bytes(picture((1, 2, 3)))
    (pictures / (files[0].name + ".png")).write_bytes(picture((9, 9, 9)))
    # WHEN the same list is indexed again
    counting = CountingIndex(index)
    summary = index_paths(list(files), ENCODERS["fake"], counting)  # type: ignore[arg-type]
    # THEN the index was asked once, not once a file; only the changed one is encoded again
    assert len(files) > 16 and counting.lookups == 1
    assert (summary.indexed, summary.unchanged) == (1, len(files) - 1)
    assert str(pictures / (files[0].name + ".png")) not in index.fingerprints()
