"""The embedded index's opt-in approximate mode: recall vs exact, exact scores, and SQLite as the truth."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from clipsearch.index import ann as ann_mod  # noqa: E402
from clipsearch.index.base import Document  # noqa: E402
from clipsearch.index.embedded import EmbeddedIndex  # noqa: E402

DIM = 64
N = 6000
# Small lists so that a few thousand vectors already make a real IVF structure; no size floor.
ANN = {"min_rows": 0, "list_size": 48, "calibration_queries": 100}


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_rows(n: int, seed: int, clusters: int = 40) -> np.ndarray:
    """Points around shared centres, as real embeddings are (uniform random ones have no structure)."""
    centres = unit_rows(clusters, seed=99)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * unit_rows(n, seed)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def key(i: int) -> str:
    return f"album{i % 7}/{i:05d}.jpg"


def fill(index: EmbeddedIndex, vectors: np.ndarray, start: int = 0) -> None:
    index.upsert([Document(key=key(start + i), vector=v) for i, v in enumerate(vectors)])


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered_rows(N, seed=1)


@pytest.fixture
def approx(tmp_path, data):
    exact = EmbeddedIndex(tmp_path, model="fake", dim=DIM)
    fill(exact, data)
    exact.close()
    index = EmbeddedIndex(tmp_path, search_mode="approx", ann=ANN)
    yield index
    index.close()


def top_keys(index: EmbeddedIndex, q: np.ndarray, **kw: object) -> list[str]:
    return [h.key for h in index.search(q, **kw)]  # type: ignore[arg-type]


def recall_at_10(index: EmbeddedIndex, exact: EmbeddedIndex, queries: np.ndarray) -> float:
    found = sum(len(set(top_keys(index, q, k=10)) & set(top_keys(exact, q, k=10))) for q in queries)
    return found / (10 * len(queries))


def test_given_random_vectors_when_searching_approx_then_recall_at_10_is_at_least_098(tmp_path):
    index = EmbeddedIndex(tmp_path, model="fake", dim=DIM, search_mode="approx", ann=ANN)
    fill(index, unit_rows(N, seed=1))
    exact = EmbeddedIndex(tmp_path)
    assert recall_at_10(index, exact, unit_rows(60, seed=2)) >= 0.98
    assert index.info().extra["ann_lists"] > 1  # the structure was built (and judged against a scan)


def test_given_clustered_vectors_when_searching_approx_then_recall_holds_while_visiting_few_lists(tmp_path):
    index = EmbeddedIndex(tmp_path, model="fake", dim=DIM, search_mode="approx", ann=ANN)
    fill(index, clustered_rows(N, seed=10))
    exact = EmbeddedIndex(tmp_path)
    assert recall_at_10(index, exact, clustered_rows(60, seed=11)) >= 0.98
    info = index.info().extra
    assert info["ann_useful"] and info["ann_nprobe"] <= info["ann_lists"] // 4  # really answered from the lists


def test_given_approx_hits_when_compared_with_the_vectors_then_scores_are_exact(approx, data):
    q = unit_rows(1, seed=3)[0]
    by_key = {key(i): float(data[i] @ q) for i in range(N)}
    for hit in approx.search(q, k=10):
        assert hit.score == pytest.approx(by_key[hit.key], abs=1e-6)


def test_given_a_prefix_when_searching_approx_then_only_keys_under_it_come_back(approx, data):
    q = unit_rows(1, seed=4)[0]
    best = sorted((i for i in range(N) if key(i).startswith("album3/")), key=lambda i: -float(data[i] @ q))
    assert top_keys(approx, q, k=5, prefix="album3/") == [key(i) for i in best[:5]]


def test_given_a_built_structure_when_reopening_unchanged_then_the_persisted_copy_is_reused(tmp_path, approx):
    q = unit_rows(1, seed=5)[0]
    before = top_keys(approx, q)
    approx.close()
    path = tmp_path / ann_mod.FILE_NAME
    stamp = path.stat().st_mtime_ns
    again = EmbeddedIndex(tmp_path, search_mode="approx", ann=ANN)
    assert top_keys(again, q) == before
    again.close()
    assert path.stat().st_mtime_ns == stamp


def test_given_a_write_by_another_process_when_reopening_then_the_stale_copy_is_rebuilt(tmp_path, approx):
    q = unit_rows(1, seed=6)[0]
    approx.search(q)
    approx.close()
    writer = EmbeddedIndex(tmp_path)  # exact mode: knows nothing of the ANN file
    writer.upsert([Document(key="new/exactly-the-query.jpg", vector=q)])
    writer.close()
    again = EmbeddedIndex(tmp_path, search_mode="approx", ann=ANN)
    hit = again.search(q, k=1)[0]
    again.close()
    assert (hit.key, round(hit.score, 5)) == ("new/exactly-the-query.jpg", 1.0)


def test_given_a_corrupt_structure_file_when_searching_then_it_is_rebuilt_from_sqlite(tmp_path, approx):
    q = unit_rows(1, seed=7)[0]
    before = top_keys(approx, q)
    approx.close()
    (tmp_path / ann_mod.FILE_NAME).write_bytes(b"\x00garbage")
    again = EmbeddedIndex(tmp_path, search_mode="approx", ann=ANN)
    assert top_keys(again, q) == before
    again.close()


def test_given_upserts_and_deletes_after_the_build_when_searching_then_the_structure_follows(approx, data):
    q = unit_rows(1, seed=8)[0]
    approx.search(q)  # builds
    approx.upsert([Document(key="late/added.jpg", vector=q)])
    assert approx.search(q, k=1)[0].key == "late/added.jpg"
    approx.upsert([Document(key=key(17), vector=q)])  # an existing row, changed in place
    assert set(top_keys(approx, q, k=2)) == {"late/added.jpg", key(17)}
    approx.delete([Document(key="late/added.jpg", vector=q).id])
    assert approx.search(q, k=1)[0].key == key(17)


@pytest.mark.parametrize("prefix", ["a/", "a", "a/\U0010ffff", "a/ü", "zz", "a/b"])
def test_given_awkward_keys_when_filtering_by_prefix_then_same_as_startswith(tmp_path, prefix):
    keys = ["a/", "a/b", "a/b/c", "a0", "a/\U0010ffff", "a/\U0010ffffx", "a/ü/1", "a/ü", "b", "A/b", "a//"]
    index = EmbeddedIndex(tmp_path, model="fake", dim=DIM)  # exact mode: the sorted-key range lookup
    vectors = unit_rows(len(keys), seed=12)
    index.upsert([Document(key=k, vector=v) for k, v in zip(keys, vectors, strict=True)])
    got = {h.key for h in index.search(vectors[0], k=len(keys), prefix=prefix)}
    assert got == {k for k in keys if k.startswith(prefix)}
