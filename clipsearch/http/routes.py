"""The route table: one Powertools resolver, used by the search Lambda and by `clipsearch serve`.

Typed errors from the core become JSON error bodies here, and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, CORSConfig, Response

from clipsearch import duplicates, errors
from clipsearch.images import UPLOAD_TYPES
from clipsearch.search import SearchService, hit_json, image_request, parse_json, parse_params

logger = Logger(service="clipsearch", child=True)

MAX_BODY_BYTES = 10 * 1024 * 1024

STATUS = {
    errors.BadRequest: 400,
    errors.NotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Unavailable: 503,
}


def error_body(code: str, message: str) -> str:
    """The contract's JSON error body (CONTRACT §3), for every host of these routes."""
    return json.dumps({"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status_code=status,
        content_type="application/json",
        body=error_body(code, message),
        headers=headers or {},
    )


def internal_error() -> Response:
    """What the client gets for anything unexpected: the contract's JSON 500, never a trace."""
    return error_response(500, "internal_error", "internal server error")


def error_for(exc: errors.ClipsearchError) -> Response:
    """A typed error from the core as its status and JSON body (503 also says when to retry)."""
    status = status_for(exc)
    headers = {}
    if isinstance(exc, errors.Unavailable):
        headers["Retry-After"] = str(exc.retry_after)
    if status >= 500:
        logger.error("request failed", extra={"error": str(exc), "code": exc.code})
    return error_response(status, exc.code, str(exc), headers)


def status_for(exc: errors.ClipsearchError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def build_app(
    service: SearchService,
    max_body: int = MAX_BODY_BYTES,
    cors_origin: str | None = None,
) -> APIGatewayRestResolver:
    """Create the resolver with the search routes bound to one SearchService."""
    cors = CORSConfig(allow_origin=cors_origin, max_age=600) if cors_origin else None
    app = APIGatewayRestResolver(cors=cors)

    def body_bytes() -> bytes:
        event = app.current_event
        raw = event.body or ""
        if len(raw) > max_body * 4 // 3 + 4:
            raise errors.PayloadTooLarge(f"body is over the {max_body // (1024 * 1024)} MB limit")
        if event.is_base64_encoded:
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise errors.BadRequest("body is not valid base64") from None
        else:
            data = raw.encode("utf-8", "surrogateescape")
        if len(data) > max_body:
            raise errors.PayloadTooLarge(f"body is over the {max_body // (1024 * 1024)} MB limit")
        return data

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/search")
    def search_get() -> dict[str, Any]:
        params = app.current_event.query_string_parameters or {}
        return service.search(parse_params(params))

    @app.get("/duplicates")
    def duplicates_get() -> dict[str, Any]:
        params = app.current_event.query_string_parameters or {}
        request = duplicates.parse_params(params)
        # current(): the pair after a model switch was followed, as /search reads it.
        _, index = service.current()
        return duplicates.duplicates(index, request, lambda hit: hit_json(hit, service.url_for(hit)))

    @app.post("/search")
    def search_post() -> dict[str, Any]:
        ctype = app.current_event.headers.get("content-type") or app.current_event.headers.get("Content-Type") or ""
        ctype = ctype.split(";")[0].strip().lower()
        data = body_bytes()
        if ctype in UPLOAD_TYPES:
            params = app.current_event.query_string_parameters or {}
            return service.search(image_request(data, params))
        if ctype != "application/json":
            raise errors.UnsupportedMediaType(
                f"unsupported content type {ctype or '(none)'!r}; use application/json or " + ", ".join(UPLOAD_TYPES)
            )
        if app.current_event.query_string_parameters:
            raise errors.BadRequest(
                "with a JSON body, put k, from, min_score and filter in the body, not in the query string"
            )
        try:
            payload = json.loads(data)
        # ValueError: an integer past Python's 4300-digit limit for int(str) (json.JSONDecodeError is one too).
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise errors.BadRequest("body is not valid JSON") from None
        return service.search(parse_json(payload))

    app.exception_handler(errors.ClipsearchError)(error_for)

    @app.exception_handler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        # The edge of every host: the trace goes to the log, the client gets the contract's JSON 500.
        logger.exception("unexpected error")
        return internal_error()

    @app.not_found
    def not_found(exc: Exception) -> Response:
        return error_response(404, "not_found", "no such route")

    return app
