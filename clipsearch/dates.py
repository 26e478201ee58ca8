"""Dates in a search text: the date words of a plain text query become a taken_at range (CONTRACT §7).

"beach summer 2019" is CLIP's "beach" over pictures taken from 2019-06-01 up to 2019-09-01. A small
explicit grammar, not a date library: dateparser's search_dates reads ordinary words as dates ("may",
"march", "sat", "a second", "7 eleven", "1000") and answers instants, not periods. docs/dates.md has the
rules and the table of queries that the tests check.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

from clipsearch.index.base import DateRange

__all__ = ["DatedText", "parse_dates"]

Day = datetime.date
Span = tuple[Day, Day]  # start inclusive, end exclusive
Period = tuple[Day | None, Day | None]  # the same, where None is an open end

MONTHS = "january february march april may june july august september october november december".split()
_ABBREVIATIONS = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9}
_ABBREVIATIONS |= {"oct": 10, "nov": 11, "dec": 12}
MONTH_NUMBER = {name: i for i, name in enumerate(MONTHS, start=1)} | _ABBREVIATIONS
# Meteorological seasons of the northern hemisphere: (first month, months long). Winter starts in December
# of its year and runs into the next: "winter 2019" is 2019-12-01 up to 2020-03-01.
SEASONS = {"spring": 3, "summer": 6, "autumn": 9, "fall": 9, "winter": 12}

_FULL_MONTH = "|".join(MONTHS)
_ANY_MONTH = "|".join(sorted(MONTH_NUMBER, key=len, reverse=True))
_SEASON = "|".join(SEASONS)
_YEAR = r"(?:19|20)[0-9]{2}"
# A preposition in front of a date is a date word too; what it does to the period is in _PREPOSITIONS.
_PREP_WORD = r"(?P<prep>in|during|from|over|since|after|before|until|till|through)\s+(?:the\s+)?"
_PREP = rf"(?:{_PREP_WORD}|the\s+)"
_PREPOSITIONS: dict[str, Callable[[Day, Day], Period]] = {
    "since": lambda start, end: (start, None),
    "after": lambda start, end: (end, None),
    "before": lambda start, end: (None, start),
    "until": lambda start, end: (None, end),  # until 2019: up to the end of 2019
    "till": lambda start, end: (None, end),
    "through": lambda start, end: (None, end),
}


@dataclass(frozen=True)
class DatedText:
    """A search text read for dates: what goes to CLIP, and the capture-time range (empty: no date words)."""

    search_text: str
    taken: DateRange


def parse_dates(text: str, now: datetime.datetime) -> DatedText:
    """Take the date words out of text; relative ones ("last summer", "in December") count from now.

    Several date phrases give the smallest range holding them all ("2018 2020" is 2018 through 2020). When
    nothing but dates is left, CLIP gets the whole text, so "2019" still ranks the pictures of 2019.
    """
    periods: list[Period] = []
    work = text  # with the words already read masked
    for pattern, read in _GRAMMAR:
        for match in pattern.finditer(work):
            span = read(match, now.date())
            if span is None:
                continue
            prep = (match.groupdict().get("prep") or "").lower()
            periods.append(_PREPOSITIONS[prep](*span) if prep in _PREPOSITIONS else span)
            # Masked, so no later rule reads the same words again.
            work = work[: match.start()] + "\0" * (match.end() - match.start()) + work[match.end() :]
    if not periods:
        return DatedText(text, DateRange())
    rest = _tidy("".join(" " if ch == "\0" else text[i] for i, ch in enumerate(work)))
    starts = [p[0] for p in periods]
    ends = [p[1] for p in periods]
    start = None if None in starts else min(s for s in starts if s is not None)
    end = None if None in ends else max(e for e in ends if e is not None)
    return DatedText(rest or text, DateRange(_wall(start), _wall(end)))


def _wall(day: Day | None) -> str | None:
    return None if day is None else f"{day.isoformat()}T00:00:00"


def _tidy(rest: str) -> str:
    """The text around the date words, without the commas and dashes that joined them."""
    rest = " ".join(rest.split())  # first, so that no pattern below scans a long run of spaces twice
    return re.sub(r" ?([,;])(?: ?[,;])*", r"\1", rest).strip(" ,;:-\u2013\u2014")


def _year(y: int) -> Span:
    return Day(y, 1, 1), Day(y + 1, 1, 1)


def _month(y: int, m: int) -> Span:
    return Day(y, m, 1), Day(y + m // 12, m % 12 + 1, 1)


def _season(name: str, y: int) -> Span:
    first = SEASONS[name.lower()]
    return Day(y, first, 1), _months_back(Day(y, first, 1), -3)


def _months_back(day: Day, n: int) -> Day:
    """The same day n months earlier (later when n < 0), or that month's last day when it is shorter."""
    y, m = divmod(day.year * 12 + day.month - 1 - n, 12)
    last = (_month(y, m + 1)[1] - datetime.timedelta(days=1)).day
    return Day(y, m + 1, min(day.day, last))


def _read_year_range(m: re.Match[str], today: Day) -> Span:
    first, last = sorted((int(m["y1"]), int(m["y2"])))
    return _year(first)[0], _year(last)[1]


def _read_iso(m: re.Match[str], today: Day) -> Span | None:
    try:
        if m["d"] is None:
            return _month(int(m["y"]), int(m["m"]))
        day = Day(int(m["y"]), int(m["m"]), int(m["d"]))
    except ValueError:
        return None  # "2019-13" or "2019-02-30": not a date, stays text
    return day, day + datetime.timedelta(days=1)


def _read_season_year(m: re.Match[str], today: Day) -> Span:
    return _season(m["season"], int(m["y"]))


def _read_month_year(m: re.Match[str], today: Day) -> Span:
    return _month(int(m["y"]), MONTH_NUMBER[m["month"].lower()])


def _read_relative(m: re.Match[str], today: Day) -> Span:
    which, unit = m["which"].lower(), m["unit"].lower()
    back = 0 if which == "this" else 1
    if unit == "year":
        return _year(today.year - back)
    if unit == "month":
        start = _months_back(today.replace(day=1), back)
        return _month(start.year, start.month)
    if unit == "week":  # weeks start on Monday (ISO 8601)
        monday = today - datetime.timedelta(days=today.weekday() + 7 * back)
        return monday, monday + datetime.timedelta(days=7)
    if unit in SEASONS:
        if back:  # the latest one that has ended
            y = today.year
            while _season(unit, y)[1] > today:
                y -= 1
            return _season(unit, y)
        # This winter in January or February is the one that began last December.
        return _season(unit, today.year - (1 if SEASONS[unit] == 12 and today.month <= 2 else 0))
    number = MONTH_NUMBER[unit]
    # Last December: the latest December that has ended; this December: the one of this year.
    return _month(today.year - (1 if back and number >= today.month else 0), number)


def _read_last_n(m: re.Match[str], today: Day) -> Span | None:
    # "the past year" alone is the last 12 months, up to and including today.
    n, unit = int(m.groupdict().get("n") or 1), m["unit"].lower().rstrip("s")
    if n == 0 or n > 1200:
        return None
    tomorrow = today + datetime.timedelta(days=1)
    if unit == "day":
        return today - datetime.timedelta(days=n), tomorrow
    if unit == "week":
        return today - datetime.timedelta(weeks=n), tomorrow
    return _months_back(today, n * (12 if unit == "year" else 1)), tomorrow


def _read_day(m: re.Match[str], today: Day) -> Span:
    day = today - datetime.timedelta(days=1 if m["word"].lower() == "yesterday" else 0)
    return day, day + datetime.timedelta(days=1)


def _read_decade(m: re.Match[str], today: Day) -> Span:
    first = int(m["decade"])
    return _year(first)[0], _year(first + 9)[1]


def _read_bare_month(m: re.Match[str], today: Day) -> Span:
    # The latest one that has started: "in December" read in March 2024 is December 2023.
    number = MONTH_NUMBER[m["month"].lower()]
    return _month(today.year - (1 if number > today.month else 0), number)


# A bare number after one of these words is a number or a code, not a year: "number 2093", "SKU 2019".
_COUNTER = re.compile(
    r"(?:^|[\s(])(?:number|no|nr|#|sku|item|model|part|code|id|page|room|flight|route|track|episode|order|"
    r"invoice|size)\.?\s*$",
    re.IGNORECASE,
)


def _read_year(m: re.Match[str], today: Day) -> Span | None:
    if not m.groupdict().get("prep") and _COUNTER.search(m.string, 0, m.start()):
        return None
    return _year(int(m["y"]))


def _rule(pattern: str) -> re.Pattern[str]:
    # Whole words only, and not part of a version, path, size or sum: "1920x1080", "v2.2019", "$2000".
    # ASCII: digits and case folding stay Latin, so other scripts' digits are never read as a year.
    return re.compile(rf"(?<![\w./:$#-]){pattern}(?![\w/:]|[.-][0-9])", re.IGNORECASE | re.ASCII)


_GRAMMAR: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], Day], Span | None]], ...] = (
    (
        _rule(
            rf"(?:(?:between|from|in|during)\s+)?(?P<y1>{_YEAR})"
            rf"\s*(?:-|\u2013|\u2014|\s(?:to|and|until|till|through|thru)\s)\s*(?P<y2>{_YEAR})"
        ),
        _read_year_range,
    ),
    (_rule(rf"{_PREP}?(?P<y>{_YEAR})-(?P<m>[0-9]{{2}})(?:-(?P<d>[0-9]{{2}}))?"), _read_iso),
    (_rule(rf"{_PREP}?(?P<season>{_SEASON})(?:\s+of)?\s+(?P<y>{_YEAR})"), _read_season_year),
    (_rule(rf"{_PREP}?(?P<y>{_YEAR})\s+(?P<season>{_SEASON})"), _read_season_year),
    (_rule(rf"{_PREP}?(?P<month>{_ANY_MONTH})\.?(?:,|\s+of)?\s+(?P<y>{_YEAR})"), _read_month_year),
    (_rule(rf"{_PREP}?(?:last|past)\s+(?P<n>[0-9]{{1,4}})\s+(?P<unit>days?|weeks?|months?|years?)"), _read_last_n),
    (_rule(rf"{_PREP}?past\s+(?P<unit>day|week|month|year)"), _read_last_n),
    (
        _rule(rf"{_PREP}?(?P<which>last|this|previous)\s+(?P<unit>year|month|week|{_SEASON}|{_FULL_MONTH})"),
        _read_relative,
    ),
    (_rule(rf"{_PREP}?(?P<word>yesterday|today)"), _read_day),
    (_rule(rf"{_PREP}?(?P<decade>(?:19|20)[0-9]0)'?s"), _read_decade),
    # A month name alone is a date only after a preposition: "in may", never "dogs that may bite".
    (_rule(rf"{_PREP_WORD}(?P<month>{_FULL_MONTH})"), _read_bare_month),
    (_rule(rf"{_PREP}?(?P<y>{_YEAR})"), _read_year),
)
