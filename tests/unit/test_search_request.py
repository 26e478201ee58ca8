"""Parsing search requests: the REST contract's validation, host-neutral."""

from __future__ import annotations

import base64

import pytest

from clipsearch.errors import BadRequest
from clipsearch.search import parse_json, parse_params


def test_given_text_with_options_when_parsed_then_fields_set():
    req = parse_json({"text": " a red circle ", "k": 5, "from": 10, "min_score": 0.2,
                      "filter": {"prefix": "family/"}})
    assert (req.kind, req.text, req.k, req.offset, req.min_score, req.prefix) == (
        "text", "a red circle", 5, 10, 0.2, "family/")


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
