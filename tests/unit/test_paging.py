"""Pages of one query neither repeat nor skip a hit: id queries (their own picture left out) and hybrid mode
(a candidate depth that does not grow with `from`); numbers too large for a float are a 400, not a 500."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.fakes import FAKE_DIM, FakeEncoder

from clipsearch.errors import BadRequest
from clipsearch.fusion import WINDOW
from clipsearch.index.base import Document
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.search import SearchService, parse_json

WORDS = ["harbour", "boat", "lighthouse", "beach", "dune", "pier", "gull", "sail"]


@pytest.fixture
def service(tmp_path: Path) -> SearchService:
    rng = np.random.default_rng(7)
    index = EmbeddedIndex(tmp_path / "idx", model="fake", dim=FAKE_DIM)
    docs = []
    for i in range(300):
        v = rng.standard_normal(FAKE_DIM).astype(np.float32)
        title = " ".join(WORDS[j] for j in range(len(WORDS)) if (i >> j) & 1)
        docs.append(Document(key=f"pics/p{i:03d}.jpg", vector=v / np.linalg.norm(v), title=title))
    index.upsert(docs)
    return SearchService(FakeEncoder(), index, url_for=lambda hit: f"/images/{hit.id}")


def ids(service: SearchService, **body: object) -> list[str]:
    return [h["id"] for h in service.search(parse_json(body))["hits"]]


def test_given_an_id_query_when_paged_then_pages_join_into_the_one_long_page(service: SearchService) -> None:
    anchor = ids(service, text="anything", k=1)[0]
    pages = [ids(service, id=anchor, k=3, **{"from": n}) for n in (0, 3, 6)]
    whole = ids(service, id=anchor, k=9)
    assert sum(pages, []) == whole and anchor not in whole


def test_given_id_terms_when_paged_then_pages_join_into_the_one_long_page(service: SearchService) -> None:
    anchor = ids(service, text="anything", k=1)[0]
    query = [{"id": anchor}, {"text": "boat", "weight": 0.1}]
    pages = [ids(service, query=query, k=4, **{"from": n}) for n in (0, 4, 8)]
    assert sum(pages, []) == ids(service, query=query, k=12)


def test_given_hybrid_when_paged_then_pages_join_into_the_one_long_page(service: SearchService) -> None:
    pages = [ids(service, text="lighthouse pier", mode="hybrid", k=50, **{"from": n}) for n in (0, 50, 100)]
    whole = ids(service, text="lighthouse pier", mode="hybrid", k=100, **{"from": 50})
    assert pages[1] + pages[2] == whole
    assert len(set(sum(pages, []))) == 150


def test_given_hybrid_past_its_window_when_searched_then_bad_request(service: SearchService) -> None:
    with pytest.raises(BadRequest, match=f"at most {WINDOW}"):
        service.search(parse_json({"text": "boat", "mode": "hybrid", "k": 10, "from": WINDOW}))


@pytest.mark.parametrize(
    "body",
    [
        {"text": "red", "min_score": 10**400},
        {"query": [{"text": "red", "weight": 10**400}]},
    ],
)
def test_given_a_number_too_large_for_a_float_when_parsed_then_bad_request(body: dict) -> None:
    with pytest.raises(BadRequest):
        parse_json(body)
