"""The query service: parse a search request, encode it, search the index, shape the response.

This is the REST contract (CONTRACT.md §3) without any HTTP: api.py, the Lambda and the CLI all
call it, so every host answers the same way.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from clipsearch.encoders import Encoder
from clipsearch.errors import BadRequest, NotFound
from clipsearch.images import load_bytes
from clipsearch.index.base import Hit, VectorIndex

MAX_K = 100
DEFAULT_K = 10
MAX_FROM = 10_000
MAX_TEXT_CHARS = 10_000
QUERY_FIELDS = ("text", "image", "id")
_SURROGATES = re.compile("[\udc80-\udcff]")  # the undecodable bytes of an OS file name (os.fsdecode)
OPTION_FIELDS = ("k", "from", "min_score", "filter")


@dataclass(frozen=True)
class SearchRequest:
    """One query (text, image bytes, or the id of an indexed image) plus its options."""

    kind: str
    text: str | None = None
    image: bytes | None = None
    id: str | None = None
    k: int = DEFAULT_K
    offset: int = 0
    min_score: float | None = None
    prefix: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"type": "text", "text": self.text}
        if self.kind == "id":
            return {"type": "id", "id": self.id}
        return {"type": "image", "bytes": len(self.image or b"")}


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
    except ValueError:
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
        if not isinstance(flt, dict) or set(flt) - {"prefix"}:
            raise BadRequest('filter must be an object like {"prefix": "family/2019/"}')
        prefix = flt.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise BadRequest("filter.prefix must be a string")
        opts["prefix"] = prefix or None
    return opts


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest("text must be a string")
    if not value.strip():
        raise BadRequest("text is empty")
    # Far beyond CLIP's 77 tokens, so cutting here never changes the vector but bounds the work.
    return value.strip()[:MAX_TEXT_CHARS]


def parse_json(payload: Any, max_k: int = MAX_K) -> SearchRequest:
    """Parse a POST /search JSON body; BadRequest on anything off-contract."""
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(payload) - set(QUERY_FIELDS) - set(OPTION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    given = [f for f in QUERY_FIELDS if payload.get(f) is not None]
    if len(given) != 1:
        raise BadRequest('give exactly one of "text", "image" or "id"')
    opts = _options(payload, max_k)
    field = given[0]
    if field == "text":
        return SearchRequest("text", text=_text(payload["text"]), **opts)
    if field == "id":
        if not isinstance(payload["id"], str) or not payload["id"]:
            raise BadRequest("id must be a non-empty string")
        return SearchRequest("id", id=payload["id"], **opts)
    if not isinstance(payload["image"], str):
        raise BadRequest("image must be a base64 string")
    import base64
    import binascii

    try:
        data = base64.b64decode(payload["image"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None
    return SearchRequest("image", image=data, **opts)


def parse_params(params: Mapping[str, str], max_k: int = MAX_K) -> SearchRequest:
    """Parse GET /search?q=TEXT&k=10&from=0&min_score=0.2&prefix=a/."""
    unknown = set(params) - {"q", "k", "from", "min_score", "prefix"}
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    if "q" not in params:
        raise BadRequest("missing q")
    payload: dict[str, Any] = {k: v for k, v in params.items() if k in ("k", "from", "min_score")}
    if params.get("prefix"):
        payload["filter"] = {"prefix": params["prefix"]}
    return SearchRequest("text", text=_text(params["q"]), **_options(payload, max_k))


def image_request(data: bytes, params: Mapping[str, str] | None = None, max_k: int = MAX_K) -> SearchRequest:
    """A raw image body, with options from the query string."""
    params = dict(params or {})
    payload: dict[str, Any] = {k: v for k, v in params.items() if k in ("k", "from", "min_score")}
    if params.get("prefix"):
        payload["filter"] = {"prefix": params["prefix"]}
    return SearchRequest("image", image=data, **_options(payload, max_k))


class SearchService:
    """Encode a request and search the index; returns the REST response object."""

    def __init__(self, encoder: Encoder, index: VectorIndex, url_for: Callable[[Hit], str]) -> None:
        if encoder.dim != index.dim:
            from clipsearch.errors import ModelMismatch

            raise ModelMismatch(f"model {encoder.model} gives dimension {encoder.dim}, "
                                f"index has {index.dim}")
        self.encoder, self.index, self.url_for = encoder, index, url_for

    def search(self, req: SearchRequest) -> dict[str, Any]:
        started = time.perf_counter()
        exclude = None
        if req.kind == "text":
            vector = self.encoder.encode_texts([req.text or ""])[0]
        elif req.kind == "image":
            vector = self.encoder.encode_images([load_bytes(req.image or b"")])[0]
        else:
            doc = self.index.get(req.id or "")
            if doc is None:
                raise NotFound(f"no indexed image with id {req.id!r}")
            vector, exclude = doc.vector, doc.id
        k = req.k + (1 if exclude else 0)
        hits = self.index.search(vector, k=k, offset=req.offset, min_score=req.min_score, prefix=req.prefix)
        hits = [h for h in hits if h.id != exclude][: req.k]
        return {
            "query": req.describe(),
            "model": self.index.model,
            "k": req.k,
            "from": req.offset,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
            "hits": [self._hit(h) for h in hits],
        }

    def _hit(self, hit: Hit) -> dict[str, Any]:
        return {"id": hit.id, "key": display_text(hit.key), "score": round(hit.score, 6),
                "title": display_text(hit.title), "url": self.url_for(hit)}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.index.model, "count": self.index.count()}


def display_text(text: str) -> str:
    """A key or title fit for JSON: each byte of a file name that is not valid UTF-8 becomes U+FFFD.

    For display only: the hit id, not the key, is the handle for the file.
    """
    return _SURROGATES.sub("\ufffd", text)
