"""Bulk writes through opensearch-py's bulk helpers, and bulk-load mode, against the real OpenSearch node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opensearchpy import OpenSearch

from clipsearch.demo.catalogue import write_catalogue
from clipsearch.index.base import Document
from clipsearch.index.opensearch import OpenSearchIndex

pytestmark = pytest.mark.opensearch

CLI = [sys.executable, "-m", "clipsearch.cli"]


def unit_docs(idx: OpenSearchIndex, n: int, seed: int = 0) -> list[Document]:
    x = np.random.default_rng(seed).standard_normal((n, idx.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [Document(key=f"bulk/{i:04d}.jpg", vector=v, bucket="images") for i, v in enumerate(x)]


def settings(idx: OpenSearchIndex) -> tuple[str, str]:
    """The index's (refresh_interval, number_of_replicas) as the node reports them."""
    # By the name given: an alias over the physical index `NAME-<model>-<n>`, the one entry of the answer.
    (entry,) = idx.client.indices.get_settings(index=idx.name).values()
    got = entry["settings"]["index"]
    return got.get("refresh_interval"), got["number_of_replicas"]


class CountingClient:
    """Wraps the real client and counts the bulk requests the helpers send."""

    def __init__(self, real: OpenSearch) -> None:
        self._real = real
        self.bulk_bodies: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def bulk(self, body: str) -> Any:
        self.bulk_bodies.append(body)
        return self._real.bulk(body=body)


def test_given_an_index_with_replicas_when_bulk_loaded_then_no_refresh_or_replicas_during_and_both_back_after(
    make_index,
) -> None:
    # GIVEN an index refreshing every 10s with one replica (unassigned on one node, but set)
    idx = make_index(replicas=1)
    assert settings(idx) == ("10s", "1")
    # WHEN documents are loaded in bulk-load mode
    with idx.bulk_load():
        during = settings(idx)
        result = idx.upsert(unit_docs(idx, 20))
    # THEN refresh and replicas were off while loading, are back afterwards, and everything is searchable
    assert during == ("-1", "0")
    assert settings(idx) == ("10s", "1")
    assert result.written == 20
    assert idx.client.count(index=idx.name)["count"] == 20


@pytest.mark.parametrize("interruption", [RuntimeError("node went away"), KeyboardInterrupt()])
def test_given_a_bulk_load_when_it_stops_midway_then_the_settings_are_restored_and_the_written_part_kept(
    make_index, interruption: BaseException
) -> None:
    # GIVEN a bulk load that has written a first batch
    idx = make_index(replicas=1)
    # WHEN an exception (or Ctrl-C) ends it before the second
    with pytest.raises(type(interruption)):
        with idx.bulk_load():
            idx.upsert(unit_docs(idx, 10))
            raise interruption
    # THEN the settings are back and the first batch is searchable
    assert settings(idx) == ("10s", "1")
    assert idx.client.count(index=idx.name)["count"] == 10


def test_given_a_load_killed_earlier_left_refresh_off_when_bulk_loaded_again_then_refresh_is_turned_back_on(
    make_index,
) -> None:
    # GIVEN an index whose refresh a killed load left at -1
    idx = make_index()
    idx.client.indices.put_settings(index=idx.name, body={"index": {"refresh_interval": "-1"}})
    # WHEN the next load finishes
    with idx.bulk_load():
        idx.upsert(unit_docs(idx, 3))
    # THEN refresh is on again (the default), not -1 forever
    assert settings(idx) == ("10s", "0")


def test_given_small_bulk_limits_when_upserting_then_requests_are_cut_by_count_and_by_bytes(make_index) -> None:
    # GIVEN at most 4 documents per request
    idx = make_index(max_bulk_docs=4)
    counting = CountingClient(idx.client)
    idx.client = counting
    # WHEN 10 are upserted THEN 3 requests (4 + 4 + 2) carry them
    assert idx.upsert(unit_docs(idx, 10)).written == 10
    assert [body.count("\n") // 2 for body in counting.bulk_bodies] == [4, 4, 2]
    # GIVEN a byte limit below two documents WHEN 3 are upserted THEN one request each
    idx.max_bulk_docs, idx.max_bulk_bytes = 500, 600
    counting.bulk_bodies.clear()
    assert idx.upsert(unit_docs(idx, 3, seed=1)).written == 3
    assert len(counting.bulk_bodies) == 3


@pytest.mark.parametrize("clients", [1, 3])
def test_given_a_document_the_mapping_rejects_when_bulk_written_then_it_alone_is_reported(
    make_index, clients: int
) -> None:
    # GIVEN 25 documents over several requests (in parallel with 3 clients), one with a zero vector,
    # which the cosine mapping rejects
    idx = make_index(max_bulk_docs=4, bulk_clients=clients)
    docs = unit_docs(idx, 25)
    docs[13] = Document(key="bulk/blank.jpg", vector=np.zeros(idx.dim, np.float32), bucket="images")
    # WHEN they are upserted
    result = idx.upsert(docs)
    # THEN that one is named with the node's reason and the other 24 are written
    assert list(result.failed) == [docs[13].id]
    assert "mapper_parsing_exception" in result.failed[docs[13].id]
    assert result.written == 24
    idx.refresh()
    assert idx.client.count(index=idx.name)["count"] == 24


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=dict(os.environ))


def test_given_bulk_load_when_indexing_through_the_cli_then_all_is_searchable_and_refresh_is_back(
    opensearch_url: str, tmp_path: Path
) -> None:
    # GIVEN a small catalogue
    write_catalogue(tmp_path / "pics", count=12)
    name = f"bulk-cli-{uuid.uuid4().hex[:10]}"
    backend = ["--backend", "opensearch", "--opensearch-url", opensearch_url, "--index", name]
    try:
        # WHEN indexed with --bulk-load
        proc = run("index", str(tmp_path / "pics"), "--model", "demo", "--bulk-load", *backend)
        # THEN every picture is indexed and searchable at once, and the index refreshes normally again
        assert proc.returncode == 0, proc.stderr
        assert "indexed 12," in proc.stdout and "index holds 12" in proc.stdout
        idx = OpenSearchIndex(name, url=opensearch_url)
        assert idx.client.count(index=name)["count"] == 12
        assert settings(idx) == ("10s", "0")
    finally:
        OpenSearchIndex(name, url=opensearch_url).drop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["index", "photos", "--bulk-load", "--model", "demo"], "--bulk-load is for --backend opensearch"),
        (["backfill", "s3://bucket/photos/", "--bulk-load"], "--bulk-load is for --batch-transform"),
    ],
)
def test_given_bulk_load_where_it_does_not_apply_then_one_clear_line(
    opensearch_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "photos").mkdir()
    proc = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home"), "CLIPSEARCH_OPENSEARCH_URL": opensearch_url},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_given_float32_vectors_when_upserted_then_sent_as_float32_text_and_read_back_bit_for_bit(make_index) -> None:
    # GIVEN a 512-d index whose bulk requests are recorded
    idx = make_index(dim=512)
    counting = CountingClient(idx.client)
    idx.client = counting
    docs = unit_docs(idx, 5, seed=3)
    # WHEN they are upserted
    assert idx.upsert(docs).written == 5
    # THEN every number of a vector in the bodies has at most 9 significant digits (float32's shortest text;
    # json writes float64's 17), so a document's line is far shorter than json's
    sources = [json.loads(line) for body in counting.bulk_bodies for line in body.splitlines() if "vector" in line]
    assert len(sources) == 5
    numbers = counting.bulk_bodies[0].split('"vector":[')[1].split("]")[0].split(",")
    mantissas = [n.lstrip("-").split("e")[0].replace(".", "").lstrip("0") for n in numbers]
    assert len(numbers) == 512 and max(len(m) for m in mantissas) <= 9
    as_json = json.dumps({"vector": docs[0].vector.tolist()})
    assert len(json.dumps({"vector": sources[0]["vector"]}, separators=(",", ":"))) < 0.7 * len(as_json)
    # AND the node gives back exactly the same float32 values
    got = idx.documents([d.id for d in docs])
    for d in docs:
        assert np.array_equal(got[d.id].vector, d.vector)
