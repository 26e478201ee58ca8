"""A small soak and crash run of the local product (the full one is bench/soak.py: 32 clients x 60 s, 10 trials).

`clipsearch serve` runs as its own process with the demo model; `clipsearch index` is killed with SIGKILL
mid-ingest. No timing is asserted: only errors, memory growth and exact counts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soak import CLI, MAX_RSS_GROWTH, _env, kill_trials, make_catalogue, soak  # noqa: E402

COUNT = 96


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_catalogue(tmp_path_factory.mktemp("soak") / "catalogue", COUNT)


def test_given_8_clients_for_5_seconds_when_served_then_no_errors_and_memory_stays_flat(
    catalogue: Path, tmp_path: Path
) -> None:
    index_dir = tmp_path / "index"
    subprocess.run(
        [*CLI, "index", "--model", "demo", str(catalogue), "--index", str(index_dir)],
        check=True,
        capture_output=True,
        env=_env(),
    )

    result = soak(index_dir, tmp_path, clients=8, seconds=5, warmup_s=3)

    assert result.errors == []
    assert result.total > 0 and len(result.requests) == 7  # every kind of request was answered
    assert result.growth < MAX_RSS_GROWTH, result.rss_mb


def test_given_two_kill_9_trials_when_indexing_then_consistent_and_exact_after_rerun(
    catalogue: Path, tmp_path: Path
) -> None:
    trials = kill_trials(catalogue, tmp_path, trials=2, expected=COUNT)

    for t in trials:
        assert not t.finished_before_kill, "the indexer finished before the kill; make the catalogue bigger"
        assert t.integrity == "ok" and 0 < t.rows_after_kill < COUNT
        assert t.rerun_unchanged == t.rows_after_kill  # what was committed before the kill is kept
        assert (t.final_rows, t.final_distinct) == (COUNT, COUNT)
