"""The route table: one Powertools resolver, used by the search Lambda and by `clipsearch serve`.

Typed errors from the core become JSON error bodies here, and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, CORSConfig, Response

from clipsearch import duplicates, errors
from clipsearch.search import SearchService, hit_json, image_request, parse_json, parse_params

logger = Logger(service="clipsearch", child=True)

MAX_BODY_BYTES = 10 * 1024 * 1024
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/heic", "image/heif", "image/avif")

STATUS = {
    errors.BadRequest: 400,
    errors.NotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Unavailable: 503,
}

# Reads the bytes and content type of an indexed image by id (local mode serves /images/<id>).
ImageReader = Callable[[str], tuple[bytes, str]]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status_code=status,
        content_type="application/json",
        body=json.dumps({"error": {"code": code, "message": message}}),
        headers=headers or {},
    )


def status_for(exc: errors.ClipsearchError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def build_app(
    service: SearchService,
    image_reader: ImageReader | None = None,
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
        return duplicates.duplicates(service.index, request, lambda hit: hit_json(hit, service.url_for(hit)))

    @app.post("/search")
    def search_post() -> dict[str, Any]:
        ctype = app.current_event.headers.get("content-type") or app.current_event.headers.get("Content-Type") or ""
        ctype = ctype.split(";")[0].strip().lower()
        data = body_bytes()
        if ctype in IMAGE_CONTENT_TYPES:
            params = app.current_event.query_string_parameters or {}
            return service.search(image_request(data, params))
        if ctype != "application/json":
            raise errors.UnsupportedMediaType(
                f"unsupported content type {ctype or '(none)'!r}; use application/json or "
                + ", ".join(IMAGE_CONTENT_TYPES)
            )
        if app.current_event.query_string_parameters:
            raise errors.BadRequest(
                "with a JSON body, put k, from, min_score and filter in the body, not in the query string"
            )
        try:
            payload = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise errors.BadRequest("body is not valid JSON") from None
        return service.search(parse_json(payload))

    if image_reader is not None:
        reader = image_reader

        @app.get("/images/<id>")
        def image(id: str) -> Response:
            data, content_type = reader(id)
            return Response(
                status_code=200,
                content_type=content_type,
                body=data,
                headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
            )

    @app.exception_handler(errors.ClipsearchError)
    def handle_error(exc: errors.ClipsearchError) -> Response:
        status = status_for(exc)
        headers = {}
        if isinstance(exc, errors.Unavailable):
            headers["Retry-After"] = str(exc.retry_after)
        if status >= 500:
            logger.error("request failed", extra={"error": str(exc), "code": exc.code})
        return error_response(status, exc.code, str(exc), headers)

    @app.exception_handler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        # The edge of every host: the trace goes to the log, the client gets the contract's JSON 500.
        logger.exception("unexpected error")
        return error_response(500, "internal_error", "internal server error")

    @app.not_found
    def not_found(exc: Exception) -> Response:
        return error_response(404, "not_found", "no such route")

    return app
