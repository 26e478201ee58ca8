"""An OpenSearch index written by an older clipsearch: what it lacks is listed even before it is migrated, and
the schema version is recorded only once the migration's back-fill is complete, so a cut-short one resumes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from support.fakes import FAKE_DIM
from support.schema_v1 import opensearch_v1_body, opensearch_v1_source

from clipsearch.errors import Unavailable
from clipsearch.index.base import Document
from clipsearch.index.opensearch import SCHEMA_VERSION, OpenSearchIndex

pytestmark = pytest.mark.opensearch
N = 30


def docs() -> list[Document]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(N):
        v = rng.standard_normal(FAKE_DIM).astype(np.float32)
        out.append(Document(key=f"trips/boat_{i:02d}.jpg", vector=v / np.linalg.norm(v), title="Summer trip"))
    return out


@pytest.fixture
def v1_name(opensearch_url: str) -> Iterator[str]:
    from opensearchpy import OpenSearch

    client = OpenSearch(opensearch_url)
    name = f"migrate-v1-{uuid.uuid4().hex[:10]}"
    client.indices.create(index=name, body=opensearch_v1_body("fake", FAKE_DIM))
    for d in docs():
        client.index(index=name, id=d.id, body=opensearch_v1_source(d, "fake"))
    client.indices.refresh(index=name)
    yield name
    client.indices.delete(index=name, ignore_unavailable=True)


class CutShort(OpenSearchIndex):
    """The real index whose partial updates fail, as a Ctrl-C or a Lambda's timeout would cut them short."""

    def _update(self, wanted: dict[str, dict[str, Any]], what: str) -> int:
        if wanted:
            raise Unavailable(f"{what} cut short")
        return 0


def schema(name: str, url: str) -> int:
    return int(OpenSearchIndex(name, url=url).info().extra["schema_version"])


def test_given_a_version_1_index_when_listing_what_it_lacks_then_every_document_is_listed(v1_name, opensearch_url):
    # `clipsearch index` of unchanged files fills dates and hashes from these lists; empty ones meant never.
    index = OpenSearchIndex(v1_name, url=opensearch_url)
    keys = {d.key for d in docs()}
    assert index.unhashed("trips/") == keys and index.undated("trips/") == keys
    assert schema(v1_name, opensearch_url) == 1  # listing changes nothing


def test_given_a_migration_cut_short_when_written_again_then_the_back_fill_resumes_and_the_version_is_recorded(
    v1_name, opensearch_url
):
    new = Document(key="home/new.jpg", vector=docs()[0].vector, title="snow")
    with pytest.raises(Unavailable):
        CutShort(v1_name, url=opensearch_url).upsert([new])
    assert schema(v1_name, opensearch_url) == 1  # not recorded: the next write migrates again
    index = OpenSearchIndex(v1_name, url=opensearch_url)
    assert index.upsert([new]).failed == {}
    assert schema(v1_name, opensearch_url) == SCHEMA_VERSION
    found = index.lexical("boat", docs()[0].vector, k=50)
    assert sorted(h.key for h in found) == sorted(d.key for d in docs())
