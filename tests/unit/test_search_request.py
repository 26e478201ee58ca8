"""Parsing search requests: the REST contract's validation, host-neutral."""

from __future__ import annotations

import base64

import pytest

from clipsearch.errors import BadRequest
from clipsearch.search import parse_json, parse_params


def test_given_text_with_options_when_parsed_then_fields_set():
    req = parse_json({"text": " a red circle ", "k": 5, "from": 10, "min_score": 0.2, "filter": {"prefix": "family/"}})
    assert (req.kind, req.text, req.k, req.offset, req.min_score, req.prefix) == (
        "text",
        "a red circle",
        5,
        10,
        0.2,
        "family/",
    )


def test_given_image_and_id_when_parsed_then_kinds():
    assert parse_json({"image": base64.b64encode(b"abc").decode()}).image == b"abc"
    assert parse_json({"id": "abc"}).kind == "id"


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "text",
        {},
        {"text": "a", "id": "b"},
        {"text": ""},
        {"text": "   "},
        {"text": 5},
        {"text": "a", "k": 0},
        {"text": "a", "k": 101},
        {"text": "a", "k": True},
        {"text": "a", "k": 2.5},
        {"text": "a", "k": "NaN"},
        {"text": "a", "from": -1},
        {"text": "a", "min_score": 1.5},
        {"text": "a", "min_score": float("nan")},
        {"text": "a", "min_score": "high"},
        {"text": "a", "filter": "family/"},
        {"text": "a", "filter": {"suffix": ".jpg"}},
        {"text": "a", "unknown": 1},
        {"image": "***"},
        {"image": 12},
        {"id": ""},
    ],
)
def test_given_off_contract_payload_when_parsed_then_bad_request(payload):
    with pytest.raises(BadRequest):
        parse_json(payload)


def test_given_query_params_when_parsed_then_text_request():
    req = parse_params({"q": "a blue star", "k": "3", "prefix": "x/"})
    assert (req.text, req.k, req.prefix) == ("a blue star", 3, "x/")


@pytest.mark.parametrize("params", [{}, {"q": ""}, {"q": "a", "k": "ten"}, {"q": "a", "zzz": "1"}])
def test_given_bad_query_params_when_parsed_then_bad_request(params):
    with pytest.raises(BadRequest):
        parse_params(params)


def test_given_huge_text_when_parsed_then_bounded():
    req = parse_json({"text": "pool " * 100_000})
    assert req.text is not None and len(req.text) <= 10_000


# -- capture-time filters (CONTRACT §7) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "bound"),
    [
        ("2019", "2019-01-01T00:00:00"),
        ("2019-07", "2019-07-01T00:00:00"),
        ("2019-07-14", "2019-07-14T00:00:00"),
        (" 2019-07-14T15:02 ", "2019-07-14T15:02:00"),
        ("2019-07-14T15:02:11", "2019-07-14T15:02:11"),
        ("2019-07-14 15:02:11", "2019-07-14T15:02:11"),
    ],
)
def test_given_an_iso_date_or_date_time_when_parsed_then_it_stands_for_the_first_second_it_names(given, bound):
    req = parse_json({"text": "a", "filter": {"taken_after": given, "taken_before": "2100"}})
    assert (req.taken.after, req.taken.before) == (bound, "2100-01-01T00:00:00")
    assert parse_json({"text": "a", "filter": {"taken_before": given}}).taken.before == bound


@pytest.mark.parametrize(
    "bad",
    [
        "2019-07-14T15:02:11+02:00",
        "2019-07-14T15:02:11Z",
        "2019-02-30",
        "2019-13",
        "2019-07-14T24:00",
        "19",
        "July 2019",
        "",
        2019,
        "2019-7-4",
        ["2019"],
    ],
)
def test_given_a_date_that_is_not_iso_or_has_a_zone_when_parsed_then_bad_request_naming_the_field(bad):
    with pytest.raises(BadRequest, match="filter.taken_after"):
        parse_json({"text": "a", "filter": {"taken_after": bad}})


def test_given_after_not_before_before_when_parsed_then_bad_request():
    with pytest.raises(BadRequest, match="exclusive"):
        parse_json({"text": "a", "filter": {"taken_after": "2020", "taken_before": "2020-01-01"}})


def test_given_get_params_after_and_before_when_parsed_then_the_same_filter_as_the_body():
    got = parse_params({"q": "beach", "after": "2019-06", "before": "2019-09", "prefix": "x/"})
    posted = parse_json(
        {"text": "beach", "filter": {"taken_after": "2019-06", "taken_before": "2019-09", "prefix": "x/"}}
    )
    assert got == posted
    assert got.describe() == {
        "type": "text",
        "text": "beach",
        "filter": {"taken_after": "2019-06-01", "taken_before": "2019-09-01"},
    }
    assert parse_json({"text": "beach"}).describe() == {"type": "text", "text": "beach"}
    with pytest.raises(BadRequest, match="after"):
        parse_params({"q": "beach", "after": "soon"})


@pytest.mark.parametrize("name", ["after", "before"])
def test_given_an_empty_date_param_when_parsed_then_bad_request_not_an_unfiltered_search(name):
    with pytest.raises(BadRequest, match=f"filter.taken_{name}|taken_{name}"):
        parse_params({"q": "beach", name: ""})
