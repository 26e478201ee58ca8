"""The model of a new index: ViT-B/32 by default, demo only when asked for, one line when unavailable."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.checkpoint_server import closed_port_url, serving

from clipsearch import models
from clipsearch.index.embedded import EmbeddedIndex

CLI = [sys.executable, "-m", "clipsearch.cli"]


@pytest.fixture
def offline(tmp_path: Path) -> dict[str, str]:
    """An environment with an empty model cache, downloads refused at once, and its own home."""
    return {
        **os.environ,
        "CLIPSEARCH_MODEL_CACHE": str(tmp_path / "cache"),
        models.URL_ENV: closed_port_url(),
        "CLIPSEARCH_HOME": str(tmp_path / "home"),
        "TQDM_DISABLE": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    from clipsearch.demo.catalogue import write_catalogue

    write_catalogue(tmp_path / "pictures", count=4)
    return tmp_path / "pictures"


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_names_the_ways_forward(line: str) -> None:
    assert "ViT-B/32" in line, line
    for way in ("connect", "--model demo", "--model /path/to/ViT-B-32.pt"):
        assert way in line, line


@pytest.mark.parametrize("where", ["--index", "home"])
def test_index_without_model_offline_and_uncached_exits_2_with_one_line_and_writes_nothing(
    tmp_path, offline, pictures, where
):
    index_args = ["--index", str(tmp_path / "idx")] if where == "--index" else []
    proc = run("index", str(pictures), *index_args, env=offline)
    assert proc.returncode == 2, proc.stderr
    assert_names_the_ways_forward(one_line(proc))
    assert not (tmp_path / "idx").exists() and not (tmp_path / "home").exists()
    assert not (tmp_path / "cache" / "ViT-B-32.pt").exists()


def test_search_and_serve_of_an_index_whose_model_is_unavailable_exit_2_with_one_line(tmp_path, offline):
    EmbeddedIndex(tmp_path / "idx", model="ViT-B/32", dim=512).close()  # recorded as built by ViT-B/32
    for command in (["search", "a dog"], ["serve", "--port", "0"]):
        proc = run(*command, "--index", str(tmp_path / "idx"), env=offline)
        assert proc.returncode == 2, (command, proc.stderr)
        assert_names_the_ways_forward(one_line(proc))


def test_search_and_serve_of_a_new_index_exit_2_with_one_line_and_create_nothing(tmp_path, offline):
    for command in (["search", "a dog"], ["serve", "--port", "0"]):
        proc = run(*command, "--index", str(tmp_path / "idx"), env=offline)
        assert proc.returncode == 2 and "clipsearch index" in one_line(proc), (command, proc.stderr)
        assert not (tmp_path / "idx").exists()


def test_an_existing_index_keeps_its_model_when_no_model_is_given(tmp_path, offline, pictures):
    assert run("index", str(pictures), "--index", str(tmp_path / "idx"), "--model", "demo", env=offline).returncode == 0
    more = pictures / "more"
    more.mkdir()
    (more / "copy.png").write_bytes(next(pictures.glob("*.png")).read_bytes())
    proc = run("index", str(pictures), "--index", str(tmp_path / "idx"), env=offline)  # offline, no --model
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(run("stats", "--json", "--index", str(tmp_path / "idx"), env=offline).stdout)
    assert stats["model"] == "demo" and stats["count"] == len(list(pictures.rglob("*.png")))


def test_a_corrupt_first_download_exits_with_one_error_line_and_keeps_no_file(tmp_path, offline, pictures):
    real = models.checkpoint_url("ViT-B/32")
    path = "/clip/models/" + "/".join(real.split("/")[-2:])  # the real hash: these bytes cannot match it
    with serving({path: b"not the checkpoint" * 1000}) as server:
        env = {**offline, models.URL_ENV: server.url + "/clip/models"}
        proc = run("index", str(pictures), "--index", str(tmp_path / "idx"), env=env)
        assert server.gets == [path]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "downloading ViT-B-32.pt" in lines[0]  # the first download says what it fetches, where
    assert "corrupt" in lines[-1] and "run again" in lines[-1] and len(lines) == 2, proc.stderr
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-32.pt.lock"]
    assert not (tmp_path / "idx").exists()


def test_models_lists_every_spec_with_its_dimension_and_where_it_is_cached(tmp_path, offline):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "RN50.pt").write_bytes(b"x")
    rows = {row["spec"]: row for row in json.loads(run("models", "--json", env=offline).stdout)}
    assert set(rows) == {"demo", *models.KNOWN_DIMS}
    assert rows["RN50"]["cached"] and rows["RN50"]["path"] == str(tmp_path / "cache" / "RN50.pt")
    assert not rows["ViT-B/32"]["cached"] and rows["ViT-B/32"]["default"] and rows["ViT-B/32"]["dim"] == 512
    text = run("models", env=offline).stdout
    assert str(tmp_path / "cache" / "RN50.pt") in text and "default for a new index" in text


def test_a_first_download_draws_a_progress_bar_when_stderr_is_a_terminal(tmp_path, offline, pictures):
    import fcntl
    import pty
    import struct
    import termios

    real = models.checkpoint_url("ViT-B/32")
    path = "/clip/models/" + "/".join(real.split("/")[-2:])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    env = {name: value for name, value in offline.items() if name != "TQDM_DISABLE"}
    with serving({path: b"x" * 300_000}) as server:
        env[models.URL_ENV] = server.url + "/clip/models"
        proc = subprocess.run(
            [*CLI, "index", str(pictures), "--index", str(tmp_path / "idx")],
            stderr=slave,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=300,
        )
    os.close(slave)
    drawn = b""
    with contextlib.suppress(OSError):  # EIO once everything written has been read
        while chunk := os.read(master, 65536):
            drawn += chunk
    os.close(master)
    text = drawn.decode(errors="replace")
    assert proc.returncode == 1 and "downloading: 100%" in text and "293k/293k" in text, text
