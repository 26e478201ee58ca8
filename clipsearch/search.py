"""The query service: parse a search request, encode it, search the index, shape the response.

This is the REST contract (CONTRACT.md §3) without any HTTP: api.py, the Lambda and the CLI all
call it, so every host answers the same way.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch import fusion
from clipsearch.dates import parse_dates
from clipsearch.encoders import Encoder
from clipsearch.errors import BadRequest, IndexMoved, NotFound
from clipsearch.images import load_bytes
from clipsearch.index.base import DateRange, Hit, VectorIndex, check_model
from clipsearch.terms import Term, base64_image, combine, parse_terms

MAX_K = 100
DEFAULT_K = 10
MAX_FROM = 10_000
MAX_TEXT_CHARS = 10_000
QUERY_FIELDS = ("text", "image", "id", "query")
_SURROGATES = re.compile("[\udc80-\udcff]")  # the undecodable bytes of an OS file name (os.fsdecode)
OPTION_FIELDS = ("k", "from", "min_score", "filter", "dates", "mode")
MODES = ("vector", "hybrid")
FILTER_FIELDS = ("prefix", "taken_after", "taken_before")
# The query-string names of the filters of GET /search and of a raw image POST.
PARAM_FILTERS = {"prefix": "prefix", "after": "taken_after", "before": "taken_before"}
# ISO 8601 as people write it: a year, a month, a day, or a day and a time to the minute or second.
_ISO_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?)?)?")
_ZONE = re.compile(r"(?:Z|[+-]\d{2}(?::?\d{2})?)$", re.IGNORECASE)


@dataclass(frozen=True)
class SearchRequest:
    """One query (text, image bytes, the id of an indexed image, or weighted terms) plus its options."""

    kind: str
    text: str | None = None
    image: bytes | None = None
    id: str | None = None
    k: int = DEFAULT_K
    offset: int = 0
    min_score: float | None = None
    prefix: str | None = None
    taken: DateRange = DateRange()  # taken_after (inclusive) and taken_before (exclusive), wall-clock
    name: str = ""  # the query picture's file name, where it has one: it tells a camera RAW file
    search_text: str | None = None  # what CLIP reads when the text held date words; None: all of text
    terms: tuple[Term, ...] = ()  # kind "terms": the weighted terms
    mode: str = "vector"  # "hybrid": RRF of the vector and the word ranking (text queries only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadRequest(f"mode must be one of {', '.join(MODES)}")
        if self.mode == "hybrid" and self.kind != "text":
            raise BadRequest('mode "hybrid" is for text queries only (not image, id or query terms)')

    def describe(self) -> dict[str, Any]:
        if self.kind == "text":
            described: dict[str, Any] = {"type": "text", "text": self.text}
            if self.search_text is not None:
                described["search_text"] = self.search_text
        elif self.kind == "id":
            described = {"type": "id", "id": self.id}
        elif self.kind == "terms":
            described = {"type": "terms", "terms": [t.describe() for t in self.terms]}
        else:
            described = {"type": "image", "bytes": len(self.image or b"")}
        if self.mode != "vector":
            described["mode"] = self.mode
        if self.taken:
            described["filter"] = {
                name: _shown_time(value)
                for name, value in (("taken_after", self.taken.after), ("taken_before", self.taken.before))
                if value is not None
            }
        return described


def parse_time(name: str, value: Any) -> str:
    """An ISO date or date-time filter bound as wall-clock "YYYY-MM-DDTHH:MM:SS"; BadRequest if it is not one.

    "2019", "2019-07", "2019-07-14", "2019-07-14T15:02" and "2019-07-14T15:02:11" each stand for the first
    second they name. A time zone is refused: capture times are compared as the wall clock read (CONTRACT §7).
    """
    if not isinstance(value, str):
        raise BadRequest(f'{name} must be an ISO date or date-time string such as "2019-07-14"')
    text = value.strip()
    if _ZONE.search(text) and len(text) > 10:
        raise BadRequest(
            f"{name} {value!r} has a time zone; capture times are compared as wall-clock times, "
            'so give it without one ("2019-07-14T15:02:11")'
        )
    match = _ISO_DATE.fullmatch(text)
    if not match:
        raise BadRequest(
            f"{name} {value!r} is not an ISO date or date-time: use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]"
        )
    parts = [int(p) if p is not None else d for p, d in zip(match.groups(), (0, 1, 1, 0, 0, 0), strict=True)]
    try:
        when = datetime.datetime(parts[0], parts[1], parts[2]) + datetime.timedelta(
            hours=parts[3], minutes=parts[4], seconds=parts[5]
        )
        if (parts[3], parts[4], parts[5]) >= (24, 0, 0) or parts[4] > 59 or parts[5] > 59 or parts[0] < 1:
            raise ValueError("time out of range")
    except (ValueError, OverflowError):
        raise BadRequest(f"{name} {value!r} is not a valid date or time") from None
    return when.isoformat(timespec="seconds")


def date_range(after: Any = None, before: Any = None, prefix: str = "taken_") -> DateRange:
    """The capture-time filter of after (inclusive) and before (exclusive); BadRequest when it is empty."""
    lo = parse_time(f"{prefix}after", after) if after is not None else None
    hi = parse_time(f"{prefix}before", before) if before is not None else None
    if lo is not None and hi is not None and lo >= hi:
        raise BadRequest(f"{prefix}after ({lo}) must be earlier than {prefix}before ({hi}), which is exclusive")
    return DateRange(lo, hi)


def text_request(text: str, dates: bool = True, now: datetime.datetime | None = None, **opts: Any) -> SearchRequest:
    """A text query whose date words, unless dates is false, narrow its taken_at filter (CONTRACT §7).

    Relative words ("last summer") count from now, this machine's local wall-clock time by default.
    """
    read = parse_dates(text, now or datetime.datetime.now()) if dates else None
    if read is None or not read.taken:
        return SearchRequest("text", text=text, **opts)
    taken = _intersect(opts.pop("taken", DateRange()), read.taken)
    return SearchRequest("text", text=text, search_text=read.search_text, taken=taken, **opts)


def _intersect(given: DateRange, read: DateRange) -> DateRange:
    # Both hold: the later start and the earlier end. An empty range is a query with no hits, not an error.
    after = max((t for t in (given.after, read.after) if t is not None), default=None)
    before = min((t for t in (given.before, read.before) if t is not None), default=None)
    return DateRange(after, before)


def _dates_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("dates must be true or false")
    return value


def _shown_time(value: str) -> str:
    return value[:10] if value.endswith("T00:00:00") else value


def _int_field(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(f"{name} must be an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


def _score_field(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest("min_score must be a number")
    try:
        score = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise BadRequest("min_score must be a number") from None
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:
        raise BadRequest("min_score must be a cosine between -1 and 1")
    return score


def _options(payload: Mapping[str, Any], max_k: int) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if payload.get("k") is not None:
        opts["k"] = _int_field("k", payload["k"], 1, max_k)
    if payload.get("from") is not None:
        opts["offset"] = _int_field("from", payload["from"], 0, MAX_FROM)
    if payload.get("min_score") is not None:
        opts["min_score"] = _score_field(payload["min_score"])
    flt = payload.get("filter")
    if flt is not None:
        if not isinstance(flt, dict) or set(flt) - set(FILTER_FIELDS):
            raise BadRequest(
                'filter must be an object like {"prefix": "family/2019/", "taken_after": '
                '"2019-06-01", "taken_before": "2019-09-01"}'
            )
        prefix = flt.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise BadRequest("filter.prefix must be a string")
        opts["prefix"] = prefix or None
        opts["taken"] = date_range(flt.get("taken_after"), flt.get("taken_before"), prefix="filter.taken_")
    return opts


def _param_filter(params: Mapping[str, str]) -> dict[str, Any]:
    """The filter object of GET /search's (or a raw image POST's) prefix, after and before parameters."""
    # An empty prefix means none; an empty after= or before= is refused by parse_time, never dropped.
    return {
        field: params[name]
        for name, field in PARAM_FILTERS.items()
        if name in params and (params[name] or name != "prefix")
    }


def _text(value: Any, name: str = "text") -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if not value.strip():
        raise BadRequest(f"{name} is empty")
    # Far beyond CLIP's 77 tokens, so cutting here never changes the vector but bounds the work.
    return value.strip()[:MAX_TEXT_CHARS]


def parse_json(payload: Any, max_k: int = MAX_K, now: datetime.datetime | None = None) -> SearchRequest:
    """Parse a POST /search JSON body; BadRequest on anything off-contract. now: for relative date words."""
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(payload) - set(QUERY_FIELDS) - set(OPTION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    given = [f for f in QUERY_FIELDS if payload.get(f) is not None]
    if len(given) != 1:
        raise BadRequest('give exactly one of "text", "image", "id" or "query"')
    opts = {**_options(payload, max_k), **_mode(payload)}
    dates = _dates_flag(payload["dates"]) if payload.get("dates") is not None else True
    field = given[0]
    if field == "text":
        return text_request(_text(payload["text"]), dates, now, **opts)
    if field == "query":
        return SearchRequest("terms", terms=parse_terms(payload["query"], _text), **opts)
    if field == "id":
        if not isinstance(payload["id"], str) or not payload["id"]:
            raise BadRequest("id must be a non-empty string")
        return SearchRequest("id", id=payload["id"], **opts)
    return SearchRequest("image", image=base64_image(payload["image"], "image"), **opts)


def _mode(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `mode` of a JSON body or a query string: vector (the default) or hybrid."""
    mode = params.get("mode")
    if mode is None:
        return {}
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}")
    return {"mode": mode}


def parse_params(params: Mapping[str, str], max_k: int = MAX_K, now: datetime.datetime | None = None) -> SearchRequest:
    """Parse GET /search?q=TEXT&k=10&from=0&min_score=0.2&prefix=a/&dates=false&mode=hybrid."""
    unknown = set(params) - {"q", "k", "from", "min_score", "dates", "mode"} - set(PARAM_FILTERS)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    if "q" not in params:
        raise BadRequest("missing q")
    payload: dict[str, Any] = {k: v for k, v in params.items() if k in ("k", "from", "min_score")}
    if flt := _param_filter(params):
        payload["filter"] = flt
    # A boolean parameter is "true" or "false" in a query string, as OpenAPI writes it.
    dates = (
        _dates_flag({"true": True, "false": False}.get(params["dates"], params["dates"])) if "dates" in params else True
    )
    return text_request(_text(params["q"]), dates, now, **_options(payload, max_k), **_mode(params))


def image_request(data: bytes, params: Mapping[str, str] | None = None, max_k: int = MAX_K) -> SearchRequest:
    """A raw image body, with options from the query string."""
    params = dict(params or {})
    payload: dict[str, Any] = {k: v for k, v in params.items() if k in ("k", "from", "min_score")}
    if flt := _param_filter(params):
        payload["filter"] = flt
    return SearchRequest("image", image=data, **_options(payload, max_k), **_mode(params))


class SearchService:
    """Encode a request and search the index; returns the REST response object.

    The encoder and the index are held as one pair, read once per request and replaced by one assignment
    (swap), so a request never encodes with one model and searches vectors of another.
    """

    def __init__(
        self,
        encoder: Encoder,
        index: VectorIndex,
        url_for: Callable[[Hit], str],
        follow: Callable[[SearchService, bool], None] | None = None,
    ) -> None:
        """follow(service, moved): called before each request, and with moved=True when the index reports it
        moved to another model; it may swap in another pair (clipsearch/follow.py)."""
        if encoder.dim != index.dim:
            from clipsearch.errors import ModelMismatch

            raise ModelMismatch(f"model {encoder.model} gives dimension {encoder.dim}, index has {index.dim}")
        self._pair = (encoder, index)
        self.url_for, self.follow = url_for, follow

    @property
    def encoder(self) -> Encoder:
        return self._pair[0]

    @property
    def index(self) -> VectorIndex:
        return self._pair[1]

    def swap(self, encoder: Encoder, index: VectorIndex) -> None:
        """Answer with encoder and index from the next request on; the index must record encoder's model."""
        check_model(index.model, index.dim, encoder.model, encoder.dim)
        self._pair = (encoder, index)

    def current(self) -> tuple[Encoder, VectorIndex]:
        """The pair that answers the next request (after follow had its look)."""
        if self.follow is not None:
            self.follow(self, False)
        return self._pair

    def search(self, req: SearchRequest) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return self._search(req, *self.current(), started)
        except IndexMoved:
            if self.follow is None:
                raise
            self.follow(self, True)  # loads the new model and index now; the request is answered with them
            return self._search(req, *self._pair, started)

    def _search(self, req: SearchRequest, encoder: Encoder, index: VectorIndex, started: float) -> dict[str, Any]:
        """One request on one (encoder, index) pair: every vector of it comes from the same model."""
        vector, exclude = self._vector(req, encoder, index)
        if req.mode == "hybrid":
            hits = self._hybrid(req, vector, index)
        else:
            # The query's own pictures (an id query, id terms) are never hits: rank from the top with room
            # for them, drop them, then take the page, so that pages neither repeat nor skip a hit.
            first = req.offset if not exclude else 0
            hits = index.search(
                vector,
                k=req.offset - first + req.k + len(exclude),
                offset=first,
                min_score=req.min_score,
                prefix=req.prefix,
                taken=req.taken or None,
            )
            skip = req.offset - first
            hits = [h for h in hits if h.id not in exclude][skip : skip + req.k]
        return {
            "query": req.describe(),
            "model": index.model,
            "k": req.k,
            "from": req.offset,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
            "hits": [self._hit(h) for h in hits],
        }

    @staticmethod
    def _vector(req: SearchRequest, encoder: Encoder, index: VectorIndex) -> tuple[np.ndarray, set[str]]:
        """The query vector, and the ids of indexed pictures the query names (left out of the hits)."""
        if req.kind == "text":
            return encoder.encode_texts([req.search_text or req.text or ""])[0], set()
        if req.kind == "image":
            return encoder.encode_images([load_bytes(req.image or b"", name=req.name)])[0], set()
        if req.kind == "id":
            return _stored(index, req.id or ""), {req.id or ""}
        terms = req.terms
        vectors: dict[int, np.ndarray] = {}
        texts = [n for n, t in enumerate(terms) if t.kind == "text"]
        images = [n for n, t in enumerate(terms) if t.kind == "image"]
        # One encoder call per kind: a SageMaker endpoint is one round trip for all of a kind's terms.
        if texts:
            vectors.update(zip(texts, encoder.encode_texts([terms[n].text or "" for n in texts]), strict=True))
        if images:
            pictures = [load_bytes(terms[n].image or b"") for n in images]
            vectors.update(zip(images, encoder.encode_images(pictures), strict=True))
        for n, t in enumerate(terms):
            if t.kind == "id":
                vectors[n] = _stored(index, t.id or "")
        vector = combine([vectors[n] for n in range(len(terms))], [t.weight for t in terms])
        return vector, {t.id for t in terms if t.kind == "id" and t.id}

    @staticmethod
    def _hybrid(req: SearchRequest, vector: np.ndarray, index: VectorIndex) -> list[Hit]:
        """RRF of the vector ranking (min_score applies here only) and the word ranking of the text."""
        n = fusion.candidates(req.k, req.offset)
        taken = req.taken or None
        by_vector = index.search(vector, k=n, min_score=req.min_score, prefix=req.prefix, taken=taken)
        by_words = index.lexical(req.search_text or req.text or "", vector, k=n, prefix=req.prefix, taken=taken)
        return fusion.fuse(by_vector, by_words)[req.offset : req.offset + req.k]

    def _hit(self, hit: Hit) -> dict[str, Any]:
        return hit_json(hit, self.url_for(hit))

    def health(self) -> dict[str, Any]:
        _, index = self.current()
        return {"status": "ok", "model": index.model, "count": index.count()}


def _stored(index: VectorIndex, id: str) -> np.ndarray:
    doc = index.get(id)
    if doc is None:
        raise NotFound(f"no indexed image with id {id!r}")
    return doc.vector


def hit_json(hit: Hit, url: str) -> dict[str, Any]:
    """A hit as the REST contract writes it, in /search and /duplicates alike."""
    # taken_at: wall-clock, with the EXIF offset appended when known (CONTRACT §7); null: not known yet.
    taken = hit.taken_at + hit.taken_offset if hit.taken_at else None
    shown: dict[str, Any] = {
        "id": hit.id,
        "key": display_text(hit.key),
        "score": round(hit.score, 6),
        "title": display_text(hit.title),
        "url": url,
        "taken_at": taken,
    }
    if hit.rank_score is not None:  # hybrid mode only
        shown["rank_score"] = round(hit.rank_score, 6)
    return shown


def display_text(text: str) -> str:
    """A key or title fit for JSON: each byte of a file name that is not valid UTF-8 becomes U+FFFD.

    For display only: the hit id, not the key, is the handle for the file.
    """
    return _SURROGATES.sub("\ufffd", text)
