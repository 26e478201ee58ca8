"""A CLIP checkpoint's first download: progress, the SHA-256 check, concurrent downloaders, offline."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.checkpoint_server import closed_port_url, serving

from clipsearch import models
from clipsearch.errors import ModelUnavailable

PAYLOAD = random.Random(0).randbytes(300_000)  # a stand-in "checkpoint": only its bytes and hash matter
SHA = hashlib.sha256(PAYLOAD).hexdigest()
PATH = f"/clip/models/{SHA}/tiny.pt"


class Recorder:
    """A DownloadProgress that keeps what it was told."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.steps: list[tuple[int, int | None]] = []
        self.finished = 0

    def note(self, line: str) -> None:
        self.notes.append(line)

    def advance(self, done: int, total: int | None) -> None:
        self.steps.append((done, total))

    def finish(self) -> None:
        self.finished += 1


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".part"))


def test_a_first_download_reports_progress_and_is_checked_and_the_next_use_does_not_download(tmp_path):
    with serving({PATH: PAYLOAD}) as server:
        progress = Recorder()
        path = models.fetch(server.url + PATH, tmp_path, progress)
        assert path == tmp_path / "tiny.pt" and path.read_bytes() == PAYLOAD
        assert [total for _, total in progress.steps] == [len(PAYLOAD)] * len(progress.steps)
        done = [d for d, _ in progress.steps]
        assert len(done) > 1 and done == sorted(done) and done[-1] == len(PAYLOAD)
        assert progress.finished == 1 and any("downloading tiny.pt" in n for n in progress.notes)

        again = Recorder()
        assert models.fetch(server.url + PATH, tmp_path, again) == path
        assert server.gets == [PATH] and again.steps == [] and again.notes == []
    assert leftovers(tmp_path) == []


def test_a_download_whose_sha256_differs_is_deleted_and_refused_with_one_line(tmp_path):
    damaged = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])  # one bit off
    with serving({PATH: damaged}) as server:
        with pytest.raises(models.DownloadCorrupt) as caught:
            models.fetch(server.url + PATH, tmp_path, Recorder())
    message = str(caught.value)
    assert "\n" not in message and "corrupt" in message and "run again" in message and "tiny.pt" in message
    assert not (tmp_path / "tiny.pt").exists() and leftovers(tmp_path) == []


def test_a_damaged_cached_copy_is_downloaded_again(tmp_path):
    (tmp_path / "tiny.pt").write_bytes(PAYLOAD[: len(PAYLOAD) // 2])  # an old interrupted download
    with serving({PATH: PAYLOAD}) as server:
        assert models.fetch(server.url + PATH, tmp_path).read_bytes() == PAYLOAD
        assert server.gets == [PATH]


FETCH = """
import sys
from pathlib import Path
from clipsearch import models

class Lines:
    def note(self, line): print(line, flush=True)
    def advance(self, done, total): pass
    def finish(self): pass

print("fetched", models.fetch(sys.argv[1], Path(sys.argv[2]), Lines()), flush=True)
"""


def test_two_processes_downloading_at_once_fetch_once_and_leave_one_intact_file(tmp_path):
    with serving({PATH: PAYLOAD}) as server:
        server.gate = threading.Event()  # hold the first download open until the second process waits
        args = [sys.executable, "-c", FETCH, server.url + PATH, str(tmp_path)]
        first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second = None
        try:
            assert server.arrived.wait(timeout=120), "the first process never asked for the file"
            second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert second.stdout is not None
            line = second.stdout.readline()
            assert "waiting for another process downloading tiny.pt" in line, (line, second.stderr)
            server.gate.set()
            out1, err1 = first.communicate(timeout=120)
            out2, err2 = second.communicate(timeout=120)
        finally:
            server.gate.set()
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert first.returncode == 0 and second.returncode == 0, (err1, err2)
        assert f"fetched {tmp_path / 'tiny.pt'}" in out1 and f"fetched {tmp_path / 'tiny.pt'}" in out2
        assert server.gets == [PATH]  # the second found the first's finished file
    assert (tmp_path / "tiny.pt").read_bytes() == PAYLOAD and leftovers(tmp_path) == []


def test_a_clip_name_offline_and_uncached_fails_with_one_line_naming_the_ways_forward(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(models.URL_ENV, closed_port_url())
    with pytest.raises(ModelUnavailable) as caught:
        models.ensure("ViT-B/32")
    message = str(caught.value)
    assert "\n" not in message and "ViT-B/32" in message
    for way in ("connect", "--model demo", "--model /path/to/ViT-B-32.pt"):
        assert way in message, message
    assert not (tmp_path / "cache" / "ViT-B-32.pt").exists()


def test_the_url_base_can_be_redirected_and_keeps_the_hash_and_file_name(monkeypatch):
    real = models.checkpoint_url("RN50")
    monkeypatch.setenv(models.URL_ENV, "http://127.0.0.1:9/mirror/")
    moved = models.checkpoint_url("RN50")
    assert moved.startswith("http://127.0.0.1:9/mirror/") and moved.split("/")[-2:] == real.split("/")[-2:]


def test_the_listing_names_every_clip_model_with_its_dimension_and_cache_state(tmp_path, monkeypatch, demo_encoder):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (tmp_path / "RN50.pt").write_bytes(b"x")
    rows = {row["spec"]: row for row in models.listing()}
    assert rows["demo"]["dim"] == demo_encoder.dim and rows["demo"]["cached"]
    assert set(models.KNOWN_DIMS) <= set(rows) and rows[models.DEFAULT]["default"]
    assert rows["RN50"]["cached"] and rows["RN50"]["path"] == str(tmp_path / "RN50.pt")
    assert not rows["ViT-B/32"]["cached"]
    assert all(rows[name]["dim"] == dim for name, dim in models.KNOWN_DIMS.items())


def test_no_download_is_attempted_for_demo_or_a_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.setenv(models.URL_ENV, closed_port_url())
    assert models.ensure("demo").spec == "demo"
    checkpoint = tmp_path / "mine.pt"
    checkpoint.write_bytes(b"x")
    assert models.ensure(str(checkpoint)) == models.ModelSource(str(checkpoint), str(tmp_path), "mine.pt")
    assert os.listdir(tmp_path) == ["mine.pt"]


def test_a_verified_checkpoint_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    hashed: list[Path] = []
    real = models._sha256

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(models, "_sha256", counting)
    with serving({PATH: PAYLOAD}) as server:
        path = models.fetch(server.url + PATH, tmp_path)
        models.fetch(server.url + PATH, tmp_path)
        assert hashed == []  # the download hashed while streaming; the stamp vouches for the file since

        path.write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1]))  # changed in place: size same, mtime not
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
        assert models.fetch(server.url + PATH, tmp_path).read_bytes() == PAYLOAD
        assert set(hashed) == {path} and server.gets == [PATH, PATH]  # hashed again, found damaged, fetched
