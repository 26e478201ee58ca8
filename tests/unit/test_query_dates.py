"""Dates in the query (CONTRACT §7): date words of a text become a taken_at filter and CLIP reads the rest."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest
from support.date_queries import NOW, TABLE, markdown_table

from clipsearch.dates import parse_dates
from clipsearch.errors import BadRequest
from clipsearch.index.base import DateRange
from clipsearch.search import parse_json, parse_params

DOCS = Path(__file__).resolve().parents[2] / "docs" / "dates.md"


def wall(day: str | None) -> str | None:
    return None if day is None else f"{day}T00:00:00"


@pytest.mark.parametrize(("text", "search_text", "after", "before"), TABLE, ids=[row[0] for row in TABLE])
def test_given_a_search_text_when_read_at_a_pinned_now_then_its_date_words_become_the_range_and_clip_reads_the_rest(
    text, search_text, after, before
):
    read = parse_dates(text, NOW)
    assert (read.search_text, read.taken) == (search_text, DateRange(wall(after), wall(before)))


def test_given_the_table_then_docs_dates_md_shows_every_row_and_the_count():
    doc = DOCS.read_text(encoding="utf-8")
    assert markdown_table() in doc
    assert f"{len(TABLE)} queries" in doc and len(TABLE) >= 60


@pytest.mark.parametrize(
    ("now", "text", "after", "before"),
    [
        # the month named is running now: it has started, so it is this one
        (datetime.datetime(2024, 12, 24, 9, 0), "in December", "2024-12-01", "2025-01-01"),
        # ...but "last December" is the one that has ended
        (datetime.datetime(2024, 12, 24, 9, 0), "last December", "2023-12-01", "2024-01-01"),
        # during a summer, "last summer" is the one before it; just after, the one that has just ended
        (datetime.datetime(2024, 7, 1, 9, 0), "last summer", "2023-06-01", "2023-09-01"),
        (datetime.datetime(2024, 9, 1, 0, 0), "last summer", "2024-06-01", "2024-09-01"),
        # winter spans the new year: in January "this winter" began in December
        (datetime.datetime(2025, 1, 10, 9, 0), "this winter", "2024-12-01", "2025-03-01"),
        (datetime.datetime(2025, 1, 10, 9, 0), "last winter", "2023-12-01", "2024-03-01"),
        (datetime.datetime(2025, 1, 10, 9, 0), "last month", "2024-12-01", "2025-01-01"),
        (datetime.datetime(2025, 1, 1, 0, 0), "yesterday", "2024-12-31", "2025-01-01"),
        # a month back from the 31st ends on the shorter month's last day (2024 is a leap year)
        (datetime.datetime(2024, 3, 31, 9, 0), "the last 1 month", "2024-02-29", "2024-04-01"),
    ],
)
def test_given_relative_words_when_now_is_at_a_boundary_then_the_documented_period(now, text, after, before):
    assert parse_dates(text, now).taken == DateRange(wall(after), wall(before))


# -- the request: parse_json and parse_params -------------------------------------------------------------


def test_given_a_dated_text_when_posted_then_clip_reads_the_rest_and_the_query_shows_the_filter():
    req = parse_json({"text": " beach summer 2019 "}, now=NOW)
    assert req.describe() == {
        "type": "text",
        "text": "beach summer 2019",
        "search_text": "beach",
        "filter": {"taken_after": "2019-06-01", "taken_before": "2019-09-01"},
    }
    assert req.taken == DateRange("2019-06-01T00:00:00", "2019-09-01T00:00:00")


def test_given_a_dated_text_and_an_explicit_filter_when_posted_then_the_two_ranges_are_intersected():
    req = parse_json(
        {"text": "beach summer 2019", "filter": {"taken_after": "2019-07-15", "taken_before": "2020", "prefix": "a/"}},
        now=NOW,
    )
    assert (req.taken, req.prefix) == (DateRange("2019-07-15T00:00:00", "2019-09-01T00:00:00"), "a/")


def test_given_a_dated_text_outside_the_explicit_filter_when_posted_then_an_empty_range_and_no_error():
    req = parse_json({"text": "beach 2019", "filter": {"taken_after": "2021"}}, now=NOW)
    assert req.taken == DateRange("2021-01-01T00:00:00", "2020-01-01T00:00:00")
    assert req.describe()["filter"] == {"taken_after": "2021-01-01", "taken_before": "2020-01-01"}


def test_given_only_date_words_when_posted_then_clip_reads_the_whole_text_and_the_filter_applies():
    req = parse_json({"text": "last summer"}, now=NOW)
    assert (req.search_text, req.taken) == ("last summer", DateRange("2023-06-01T00:00:00", "2023-09-01T00:00:00"))


@pytest.mark.parametrize(
    "request_",
    [
        lambda: parse_json({"text": "beach 2019", "dates": False}, now=NOW),
        lambda: parse_params({"q": "beach 2019", "dates": "false"}, now=NOW),
    ],
)
def test_given_dates_false_when_parsed_then_the_text_is_searched_as_written_without_a_filter(request_):
    req = request_()
    assert (req.search_text, req.taken) == (None, DateRange())
    assert req.describe() == {"type": "text", "text": "beach 2019"}


def test_given_a_dated_q_when_got_then_the_same_request_as_the_post():
    assert parse_params({"q": "beach summer 2019", "after": "2019-07"}, now=NOW) == parse_json(
        {"text": "beach summer 2019", "filter": {"taken_after": "2019-07"}}, now=NOW
    )
    assert parse_params({"q": "beach 2019", "dates": "true"}, now=NOW) == parse_json({"text": "beach 2019"}, now=NOW)


def test_given_no_date_words_when_parsed_then_the_query_object_is_unchanged():
    assert parse_json({"text": "dogs that may bite"}, now=NOW).describe() == {
        "type": "text",
        "text": "dogs that may bite",
    }


def test_given_an_image_or_an_id_when_dates_is_given_then_it_is_accepted_and_reads_nothing():
    image = parse_json({"image": base64.b64encode(b"abc").decode(), "dates": False})
    assert (image.kind, image.taken) == ("image", DateRange())
    assert parse_json({"id": "summer 2019", "dates": True}).taken == DateRange()


@pytest.mark.parametrize(
    "parse",
    [
        lambda: parse_json({"text": "beach 2019", "dates": "no"}),
        lambda: parse_json({"text": "beach 2019", "dates": 0}),
        lambda: parse_json({"text": "beach 2019", "dates": "false"}),
        lambda: parse_params({"q": "beach 2019", "dates": "0"}),
        lambda: parse_params({"q": "beach 2019", "dates": "False"}),
        lambda: parse_params({"q": "beach 2019", "dates": ""}),
    ],
)
def test_given_dates_neither_true_nor_false_when_parsed_then_bad_request(parse):
    with pytest.raises(BadRequest, match="dates must be true or false"):
        parse()
