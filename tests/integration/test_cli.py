"""The `clipsearch` CLI end to end, as a subprocess, with the bundled demo model on real pictures."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.images import bad_files

from clipsearch.demo.catalogue import write_catalogue
from clipsearch.index.embedded import DB_NAME

CLI = [sys.executable, "-m", "clipsearch.cli"]


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"clipsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def rows(index_dir: Path) -> tuple[int, int]:
    db = sqlite3.connect(index_dir / DB_NAME)
    try:
        return db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM images").fetchone()
    finally:
        db.close()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalogue") / "shapes and ünïcode"
    write_catalogue(folder, count=96)
    return folder


@pytest.fixture(scope="module")
def indexed(catalogue, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("index")
    run("index", "--model", "demo", str(catalogue), "--index", str(index_dir), "--batch-size", "16")
    return index_dir


def search_json(index_dir: Path, *args: str) -> dict:
    return json.loads(run("search", *args, "--index", str(index_dir), "--json").stdout)


def test_given_demo_catalogue_when_searching_a_red_circle_then_red_circles_come_first(indexed):
    response = search_json(indexed, "a red circle", "-k", "4")
    keys = [Path(h["key"]).name for h in response["hits"]]
    assert len(keys) == 4
    assert all("red-circle" in k for k in keys), keys


def test_given_an_image_query_then_its_own_class_comes_first(indexed, catalogue):
    query = sorted(catalogue.glob("*blue-star*"))[0]
    response = search_json(indexed, "--image", str(query), "-k", "2")
    first, second = response["hits"]
    assert first["key"] == str(query.resolve()) and first["score"] > 0.999
    assert "blue-star" in Path(second["key"]).name, second
    assert response["query"]["type"] == "image"


def test_given_json_flag_then_output_is_the_rest_response_object(indexed):
    response = search_json(indexed, "a green square", "-k", "2")
    assert set(response) >= {"query", "model", "took_ms", "hits"}
    assert response["model"] == "demo" and response["query"] == {"type": "text", "text": "a green square"}
    hit = response["hits"][0]
    assert set(hit) >= {"id", "key", "score", "title", "url"}
    assert -1.0 <= hit["score"] <= 1.0 and hit["url"] == f"/images/{hit['id']}"


def test_given_plain_output_then_rank_score_and_path(indexed):
    out = run("search", "a yellow triangle", "-k", "3", "--index", str(indexed)).stdout.splitlines()
    assert len(out) == 3
    rank, score, _taken, path = out[0].split(maxsplit=3)
    assert rank == "1" and -1 <= float(score) <= 1 and Path(path).exists()


def test_given_under_prefix_then_only_hits_below_it(indexed, catalogue, tmp_path):
    response = search_json(indexed, "a red circle", "--under", str(catalogue / "0001"), "-k", "5")
    assert response["hits"] and all(Path(h["key"]).name.startswith("0001") for h in response["hits"])


def test_given_stats_json_then_count_model_and_dim(indexed):
    stats = json.loads(run("stats", "--index", str(indexed), "--json").stdout)
    assert stats["count"] == 96 and stats["model"] == "demo" and stats["dim"] > 0


def test_given_changed_added_and_deleted_files_when_reindexed_then_index_follows(catalogue, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    files = sorted(catalogue.iterdir())[:6]
    for f in files:
        (folder / f.name.upper().replace(".PNG", ".PnG")).write_bytes(f.read_bytes())
    index_dir = tmp_path / "idx"
    first = run("index", "--model", "demo", str(folder), "--index", str(index_dir)).stdout
    assert "indexed 6" in first
    again = run("index", "--model", "demo", str(folder), "--index", str(index_dir)).stdout
    assert "indexed 0, unchanged 6" in again
    victim, changed = sorted(folder.iterdir())[:2]
    victim.unlink()
    changed.write_bytes(files[-1].read_bytes())
    os.utime(changed, (time.time() + 5, time.time() + 5))
    third = run("index", "--model", "demo", str(folder), "--index", str(index_dir)).stdout
    assert "indexed 1, unchanged 4, removed 1" in third
    assert rows(index_dir) == (5, 5)


def test_given_bad_files_when_indexing_then_each_skipped_with_one_warning_and_run_goes_on(catalogue, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    for f in sorted(catalogue.iterdir())[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    for name, data in bad_files().items():
        (folder / name).write_bytes(data)
    index_dir = tmp_path / "idx"
    proc = run("index", "--model", "demo", str(folder), "--index", str(index_dir))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == len(bad_files())
    assert f"skipped {len(bad_files())}" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert rows(index_dir) == (3, 3)


def test_given_index_of_demo_when_other_model_requested_then_refused_with_one_line(indexed):
    proc = run("search", "a red circle", "--index", str(indexed), "--model", "RN50", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "built with model 'demo'" in proc.stderr


def test_given_uncached_model_offline_then_one_line_error_naming_the_fix(catalogue, tmp_path):
    proc = run(
        "index",
        str(catalogue),
        "--index",
        str(tmp_path / "idx"),
        "--model",
        "ViT-B/32",
        env={
            "CLIPSEARCH_MODEL_CACHE": str(tmp_path / "cache"),
            "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
        },
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--model demo" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_given_missing_index_when_searching_then_clear_error(tmp_path):
    proc = run("search", "a red circle", "--index", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "clipsearch index" in proc.stderr and "Traceback" not in proc.stderr
