"""Dates in the query end to end (CONTRACT §7): the CLI, REST POST and GET through `clipsearch serve`, and
the same parsed filter on the embedded and the OpenSearch backend."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image
from support.fakes import FakeEncoder

from clipsearch.cli import main
from clipsearch.encoders import Encoder
from clipsearch.http.server import make_server
from clipsearch.index.base import Document, VectorIndex
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.index.opensearch import OpenSearchIndex
from clipsearch.search import SearchService, parse_json

# name -> capture time, wall-clock as stored; None: not known.
TAKEN: dict[str, str | None] = {
    "summer": "2019-07-14T15:02:11",
    "first-of-june": "2019-06-01T00:00:00",
    "late-august": "2019-08-31T23:59:59",
    "christmas": "2019-12-24T18:00:00",
    "new-year": "2020-01-01T00:00:00",
    "new-years-eve": "2018-12-31T23:59:59",
    "undated": None,
}
IN_2019 = {"summer", "first-of-june", "late-august", "christmas"}
SUMMER_2019 = {"summer", "first-of-june", "late-august"}


def documents(encoder: Encoder) -> list[Document]:
    """One small picture per capture time, each a square of its own colour."""
    docs = []
    for i, (name, taken) in enumerate(TAKEN.items()):
        picture = Image.new("RGB", (64, 64), (250, 250, 250))
        picture.paste((40 * i, 255 - 30 * i, 90), (16, 16, 48, 48))
        vector = encoder.encode_images([picture])[0]
        docs.append(Document(key=f"/photos/{name}.png", vector=vector, title=name, taken_at=taken))
    return docs


def names(response: dict[str, Any]) -> set[str]:
    return {Path(h["key"]).stem for h in response["hits"]}


@pytest.fixture(scope="module")
def dated_index(demo_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dated")
    index = EmbeddedIndex(folder, model=demo_encoder.model, dim=demo_encoder.dim)
    index.upsert(documents(demo_encoder))
    index.close()
    return folder


def search(index: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["search", *args, "-k", "50", "--index", str(index), "--model", "demo", "--json"])
    return status, json.loads(out.getvalue())


# -- CLI -----------------------------------------------------------------------------------------------


def test_given_dated_pictures_when_searched_for_a_text_with_a_year_then_only_that_year_and_clip_reads_the_rest(
    dated_index,
):
    status, response = search(dated_index, "a green square 2019")
    assert status == 0 and names(response) == IN_2019
    assert response["query"] == {
        "type": "text",
        "text": "a green square 2019",
        "search_text": "a green square",
        "filter": {"taken_after": "2019-01-01", "taken_before": "2020-01-01"},
    }
    # CLIP read "a green square": the scores are those of that text with the same explicit filter
    _, plain = search(dated_index, "a green square", "--after", "2019", "--before", "2020")
    assert response["hits"] == plain["hits"]


def test_given_no_dates_when_searched_then_the_whole_text_goes_to_clip_and_every_picture_can_match(dated_index):
    status, response = search(dated_index, "a green square 2019", "--no-dates")
    assert status == 0 and names(response) == set(TAKEN)
    assert response["query"] == {"type": "text", "text": "a green square 2019"}


def test_given_after_and_a_dated_text_when_searched_then_both_hold(dated_index):
    status, response = search(dated_index, "a green square summer 2019", "--after", "2019-07")
    assert status == 0 and names(response) == {"summer", "late-august"}
    assert response["query"]["filter"] == {"taken_after": "2019-07-01", "taken_before": "2019-09-01"}


def test_given_a_dated_text_outside_before_when_searched_then_no_hits_and_exit_0(dated_index):
    status, response = search(dated_index, "a green square 2019", "--before", "2018")
    assert (status, response["hits"]) == (0, [])
    assert response["query"]["filter"] == {"taken_after": "2019-01-01", "taken_before": "2018-01-01"}


# -- REST: clipsearch serve ----------------------------------------------------------------------------


def call(server: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_given_the_rest_api_when_a_dated_text_is_posted_and_got_then_the_filter_applies_and_dates_false_lifts_it(
    dated_index, demo_encoder
):
    index = EmbeddedIndex(dated_index, read_only=True)
    with make_server(index, demo_encoder, port=0).start() as server:
        status, posted = call(server, "POST", "/search", {"text": "a green square summer 2019", "k": 50})
        assert status == 200 and names(posted) == SUMMER_2019
        assert posted["query"]["search_text"] == "a green square"
        status, got = call(server, "GET", "/search?k=50&q=" + quote("a green square summer 2019"))
        assert status == 200 and got["hits"] == posted["hits"] and got["query"] == posted["query"]

        body = {"text": "a green square summer 2019", "k": 50, "filter": {"taken_before": "2019-07"}}
        status, narrowed = call(server, "POST", "/search", body)
        assert status == 200 and names(narrowed) == {"first-of-june"}

        status, as_written = call(server, "POST", "/search", {"text": "a green square 2019", "k": 50, "dates": False})
        assert status == 200 and names(as_written) == set(TAKEN) and "filter" not in as_written["query"]
        status, got = call(server, "GET", "/search?k=50&dates=false&q=" + quote("a green square 2019"))
        assert status == 200 and got["hits"] == as_written["hits"]

        status, bad = call(server, "GET", "/search?dates=maybe&q=x")
        assert status == 400 and bad["error"]["message"] == "dates must be true or false"
    index.close()


# -- both backends -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends(opensearch_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VectorIndex]]:
    encoder = FakeEncoder()
    embedded = EmbeddedIndex(tmp_path_factory.mktemp("dated-congruence"), model=encoder.model, dim=encoder.dim)
    remote = OpenSearchIndex(f"dates-{uuid.uuid4().hex[:10]}", model=encoder.model, dim=encoder.dim, url=opensearch_url)
    for index in (embedded, remote):
        assert index.upsert(documents(encoder)).failed == {}
    remote.refresh()
    yield [embedded, remote]
    remote.drop()
    remote.close()
    embedded.close()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"text": "a square summer 2019"}, SUMMER_2019),
        ({"text": "a square between 2018 and 2019"}, IN_2019 | {"new-years-eve"}),
        ({"text": "a square since December 2019"}, {"christmas", "new-year"}),
        ({"text": "a square 2019", "filter": {"taken_after": "2019-08"}}, {"late-august", "christmas"}),
        ({"text": "a square 2019", "filter": {"taken_after": "2020"}}, set()),
        ({"text": "a square 2019", "dates": False}, set(TAKEN)),
    ],
)
def test_given_both_backends_when_a_parsed_query_runs_then_the_same_hits_and_scores(backends, body, expected):
    encoder = FakeEncoder()
    answers = [
        SearchService(encoder, index, url_for=lambda hit: hit.id).search(parse_json({**body, "k": 50}))
        for index in backends
    ]
    embedded, remote = (a["hits"] for a in answers)
    assert [h["id"] for h in remote] == [h["id"] for h in embedded]
    assert all(abs(a["score"] - b["score"]) <= 1e-3 for a, b in zip(embedded, remote, strict=True))
    assert names(answers[0]) == expected and answers[0]["query"] == answers[1]["query"]
