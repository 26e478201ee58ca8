"""`clipsearch serve`: the search Lambda's routes over HTTP on one machine, plus the web page.

uvicorn (its httptools protocol, held to RFC 9112 by protocol.py) speaks HTTP; a small Starlette bridge
turns each API request into an API Gateway REST (v1 proxy) event and hands it to the resolver that
routes.py builds for the Lambda, as
`sam local start-api` does, without Docker. The bridge adds what only a local host needs, outside the
resolver: the page and its assets from a fixed list, `/openapi.json`, images by hit id, the Host check,
the upload limit (from Content-Length before reading, and while streaming a chunked body), security
headers and one log line a request. Blocking work runs on other threads (the routes on one resolve
thread), never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import signal
import socket
import stat
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import uvicorn
from aws_lambda_powertools.event_handler import Response as PowertoolsResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from clipsearch import errors
from clipsearch.encoders import Encoder
from clipsearch.http.protocol import protocol_class
from clipsearch.http.routes import (
    MAX_BODY_BYTES,
    build_app,
    error_body,
    error_for,
    error_response,
    internal_error,
)
from clipsearch.images import content_type_of
from clipsearch.index.base import Hit, VectorIndex
from clipsearch.search import SearchService

__all__ = ["LocalServer", "make_server", "serve", "image_reader", "to_event", "ASSETS", "MAX_BODY_BYTES"]

Log = Callable[[str], None]

# Where request lines go when no `log` is given (`clipsearch serve` sends this logger to stderr).
logger = logging.getLogger("clipsearch.serve")

# The page and what it loads: served by this fixed list only, never by a path from the request.
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/openapi.json": ("openapi.json", "application/json"),
}

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Headers that describe one hop of HTTP, which uvicorn sets itself.
_HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "keep-alive", "date", "server"}
# The methods this server knows; any other is refused with 405 whatever the path.
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
# After refusing a body, read and drop at most this much of it, so the client sees the answer
# rather than a connection reset; a client that declares more is closed on at once.
_DRAIN_LIMIT = 64 * 1024 * 1024
_DRAIN_SECONDS = 2.0
# Seconds a body may take to arrive, and a connection may sit idle between requests.
_BODY_SECONDS = 30.0
_KEEP_ALIVE_SECONDS = 30
# Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cancelled.
_GRACE_SECONDS = 30


def allowed_methods(path: str) -> str | None:
    """The methods a known path answers (for 405 and OPTIONS), or None for a path this server lacks."""
    if path == "/search":
        return "GET, HEAD, POST"
    if path in ASSETS or path in ("/health", "/duplicates"):
        return "GET, HEAD"
    if _image_id(path):
        return "GET, HEAD"
    return None


def _image_id(path: str) -> str | None:
    name = path.removeprefix("/images/")
    return name if name != path and name and "/" not in name else None


def _limit_text(max_body: int) -> str:
    mb = max_body / (1024 * 1024)
    return f"{mb:g} MB" if mb >= 1 else f"{max_body} bytes"


def _printable(text: str, limit: int = 300) -> str:
    """Keep log lines on one line whatever the request held."""
    safe = "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in text[:limit])
    return safe + ("..." if len(text) > limit else "")


def image_reader(index: VectorIndex) -> Callable[[str], tuple[bytes, str]]:
    """Read an indexed image by hit id: the file at the document's key, never a path from a request."""

    def read(id: str) -> tuple[bytes, str]:
        doc = index.get(id)
        if doc is None:
            raise errors.NotFound(f"no indexed image with id {id!r}")
        path = Path(doc.key)
        # The page may show what has a content type (HEIC: Safari only); never a camera RAW file.
        content_type = content_type_of(path.name)
        # A key with a bucket names an S3 object, not a file on this machine.
        if doc.bucket or not path.is_absolute() or content_type is None:
            raise errors.NotFound(f"image {id} is not a local file")
        try:
            # Only regular files: opening a FIFO or a device at an indexed key would hang or leak.
            if not stat.S_ISREG(path.stat().st_mode):
                raise errors.NotFound(f"image {id} is no longer a file")
            return path.read_bytes(), content_type
        except OSError:
            raise errors.NotFound(f"image {id} is no longer on disk") from None

    return read


def to_event(
    method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, source_ip: str, request_id: str
) -> dict[str, Any]:
    """An API Gateway REST (v1 proxy) event for one HTTP request, as API Gateway would send it."""
    parts = urlsplit(target)
    path = unquote(parts.path or "/")
    multi_query: dict[str, list[str]] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        multi_query.setdefault(name, []).append(value)
    multi_headers: dict[str, list[str]] = {}
    for name, value in headers:
        multi_headers.setdefault(name, []).append(value)
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {name: values[-1] for name, values in multi_headers.items()} or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": {name: values[-1] for name, values in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": path,
            "stage": "local",
            "requestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "protocol": "HTTP/1.1",
            "identity": {"sourceIp": source_ip},
        },
        # Always base64: the bytes reach the routes exactly as sent, text or image.
        "body": base64.b64encode(body).decode("ascii") if body else None,
        "isBase64Encoded": bool(body),
    }


@dataclass(frozen=True)
class _LocalContext:
    """The few Lambda context fields a resolver may read."""

    aws_request_id: str
    function_name: str = "clipsearch-serve"
    memory_limit_in_mb: int = 0
    invoked_function_arn: str = "local"


def _from_resolver(result: dict[str, Any]) -> Response:
    """A Powertools proxy result (the dict that resolve() returns) as a Starlette response."""
    headers: dict[str, str] = {}
    for name, values in (result.get("multiValueHeaders") or {}).items():
        if name.lower() not in _HOP_HEADERS and values:
            headers[name] = ", ".join(str(v) for v in values)
    for name, value in (result.get("headers") or {}).items():
        if name.lower() not in _HOP_HEADERS:
            headers[name] = str(value)
    raw = result.get("body") or ""
    data = base64.b64decode(raw) if result.get("isBase64Encoded") else str(raw).encode("utf-8")
    return Response(data, int(result["statusCode"]), headers)


def _from_powertools(answer: PowertoolsResponse) -> Response:
    """An error answer built by the routes (their JSON body and headers) as a Starlette response."""
    headers = {name: ", ".join(v) if isinstance(v, list) else v for name, v in answer.headers.items()}
    body = answer.body.encode() if isinstance(answer.body, str) else bytes(answer.body or b"")
    return Response(body, answer.status_code, headers)


class _Refusal(Response):
    """An answer that ends the connection without reading the request's body.

    The body the client may still be sending is read and dropped for a moment after the answer's
    bytes are out (at most _DRAIN_LIMIT, for _DRAIN_SECONDS): closing a socket with unread data makes
    the kernel send a reset, and the client would see that instead of the answer.
    """

    def __init__(self, status: int, code: str, message: str, drain: bool) -> None:
        super().__init__(error_body(code, message), status, {"Content-Type": "application/json", "Connection": "close"})
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": self.drain})
        if not self.drain:
            return
        with anyio.move_on_after(_DRAIN_SECONDS):
            left = _DRAIN_LIMIT
            while left > 0:
                message = await receive()
                left -= len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        await send({"type": "http.response.body", "body": b""})


class _Bridge:
    """The ASGI app: checks every request, serves the page and images, sends the rest to the resolver."""

    def __init__(self, service: SearchService, log: Log, max_body: int, loopback_only: bool):
        self.log = log
        self.max_body = max_body
        self.loopback_only = loopback_only
        self.assets = {route: (_asset(name), ctype) for route, (name, ctype) in ASSETS.items()}
        self.service = service
        self.app = build_app(service, max_body=max_body)
        # Powertools keeps the current event in class attributes (BaseRouter.current_event), so one
        # resolve runs at a time: on this one thread, which waiting requests queue for without a lock to
        # wake up on. Bodies, images, the page and responses still move in parallel.
        self.resolver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-resolve")
        # Replaces the routes' catch-all so the trace lands in this server's log.
        self.app.exception_handler(Exception)(self.unexpected)

    def unexpected(self, exc: BaseException) -> PowertoolsResponse:
        """The edge of the process: whatever broke, the trace is logged and the client gets JSON."""
        self.log("error: unexpected " + "".join(traceback.format_exception(exc)).rstrip())
        return internal_error()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served
            return
        started = time.perf_counter()
        request = Request(scope, receive)
        try:
            response = await self.answer(request)
        except Exception as exc:
            response = _from_powertools(self.unexpected(exc))
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        await response(scope, receive, send)
        sent = 0 if scope["method"] == "HEAD" else len(response.body)
        took = (time.perf_counter() - started) * 1000
        line = f"{scope['method']} {_target(scope)} HTTP/{scope['http_version']}"
        self.log(f'{_client(scope)} "{_printable(line)}" {response.status_code} {sent} {took:.1f}ms')

    async def answer(self, request: Request) -> Response:
        method = request.method
        path = request.scope["path"]
        allowed = allowed_methods(path)
        if method not in _METHODS:
            return _from_powertools(
                error_response(
                    405,
                    "method_not_allowed",
                    f"method {_printable(method, 20)} is not allowed",
                    {"Allow": allowed or "GET, HEAD, POST"},
                )
            )
        body = await self.body(request)
        if isinstance(body, Response):
            return body
        if allowed and method == "OPTIONS":
            return Response(None, 204, {"Allow": allowed})
        if allowed and method not in allowed.split(", "):
            answer = error_response(405, "method_not_allowed", f"{path} answers {allowed}", {"Allow": allowed})
            return _from_powertools(answer)
        if method in ("GET", "HEAD") and path in self.assets:
            data, ctype = self.assets[path]
            headers = {"Content-Type": ctype, "Cache-Control": "no-cache"}
            if ctype.startswith("text/html"):
                headers["Content-Security-Policy"] = PAGE_CSP
            return Response(data, 200, headers)
        if method in ("GET", "HEAD") and (id := _image_id(path)):
            response = await self.image(id)
        else:
            response = await self.resolve(request, body)
        response.headers.setdefault("Content-Security-Policy", API_CSP)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def body(self, request: Request) -> bytes | Response:
        """The request's body, or the refusal that answers it: a declared size over the limit, then a foreign Host."""
        headers = request.headers
        # The parser has already refused a Content-Length that is not one non-negative integer.
        declared = int(headers.get("content-length", 0))
        chunked = "content-length" not in headers and "chunked" in headers.get("transfer-encoding", "").lower()
        # Not while the client waits for "100 Continue": it has sent no body, and never will.
        drain = "expect" not in headers and (chunked or 0 < declared <= _DRAIN_LIMIT)
        if declared > self.max_body:
            return self.too_large(drain)
        if not self.host_allowed(headers.get("host")):
            # A page elsewhere that rebinds its DNS name to 127.0.0.1 must not read this index.
            return _Refusal(
                403,
                "forbidden_host",
                "this server answers to loopback names only (localhost, 127.0.0.1, [::1])",
                drain,
            )
        if not declared and not chunked:  # a GET, mostly: no body to wait for
            return b""
        data = bytearray()
        try:
            with anyio.fail_after(_BODY_SECONDS):
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > self.max_body:  # a chunked body has no length to check up front
                        return self.too_large(drain)
        except ClientDisconnect:
            return _Refusal(400, "bad_request", "the body ended before it was complete", drain=False)
        except TimeoutError:
            return _Refusal(400, "bad_request", f"the body did not arrive within {_BODY_SECONDS:g} s", drain=False)
        return bytes(data)

    def too_large(self, drain: bool) -> Response:
        message = f"body is over the {_limit_text(self.max_body)} limit"
        return _Refusal(413, errors.PayloadTooLarge.code, message, drain)

    def host_allowed(self, host: str | None) -> bool:
        if not self.loopback_only or host is None:
            return True
        host = host.strip()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return _is_loopback(name.lower())

    async def image(self, id: str) -> Response:
        """An indexed image by hit id, read off the event loop, beside the resolve thread."""
        try:
            # The index that answers now: after a reindex switch, the new one (clipsearch/follow.py).
            data, content_type = await run_in_threadpool(image_reader(self.service.index), id)
        except errors.ClipsearchError as exc:
            return _from_powertools(error_for(exc))
        return Response(data, 200, {"Content-Type": content_type, "Cache-Control": "private, max-age=300"})

    async def resolve(self, request: Request, body: bytes) -> Response:
        scope = request.scope
        request_id = str(uuid.uuid4())
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        event = to_event(method, _target(scope), headers, body, _client(scope), request_id)
        result = await asyncio.get_running_loop().run_in_executor(self.resolver, self._resolve, event, request_id)
        return _from_resolver(result)

    def _resolve(self, event: dict[str, Any], request_id: str) -> dict[str, Any]:
        return self.app.resolve(event, _LocalContext(request_id))  # type: ignore[arg-type]


def _target(scope: Scope) -> str:
    raw = scope["raw_path"].decode("latin-1")
    query = scope["query_string"].decode("latin-1")
    return f"{raw}?{query}" if query else raw


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _asset(name: str) -> bytes:
    return resources.files("clipsearch.http").joinpath("web", name).read_bytes()


class LocalServer:
    """uvicorn serving the bridge on a socket bound at creation; `url` is where it listens."""

    def __init__(self, host: str, port: int, service: SearchService, log: Log, max_body: int) -> None:
        # Request threads, the event loop and the main thread all log; one line at a time, so lines
        # never interleave.
        log_lock = threading.Lock()

        def log_line(line: str) -> None:
            with log_lock:
                log(line)

        self.log = log_line
        self.max_body = max_body
        self.loopback_only = _is_loopback(host)
        self.bridge = _Bridge(service, log_line, max_body, self.loopback_only)
        # Bound and listening now, so the port is known (port 0) and taken before serving starts.
        # IPPROTO_TCP by name: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP,
        # and accepted sockets inherit it; with Nagle on, a reply's head and body meet delayed ACKs (40 ms).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError as e:
            self.socket.close()
            raise errors.ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _uvicorn(self) -> uvicorn.Server:
        config = uvicorn.Config(
            self.bridge,
            http=protocol_class(self.log, SECURITY_HEADERS),
            ws="none",
            # uvloop where it is installed (the local extra, off Windows): its event loop hands a finished
            # resolve back to the connection in less time than asyncio's own.
            loop="auto",
            lifespan="off",
            interface="asgi3",
            # One line a request comes from the bridge; uvicorn's own lines would double it.
            log_config=None,
            access_log=False,
            # Behind no proxy: X-Forwarded-For must not change the client address that is logged.
            proxy_headers=False,
            server_header=False,
            headers=[("Server", "clipsearch")],
            timeout_keep_alive=_KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=_GRACE_SECONDS,
        )
        self._server = uvicorn.Server(config)
        return self._server

    def serve_forever(self) -> None:
        """Serve on this thread until close(), or SIGINT/SIGTERM on the main thread; in-flight requests finish."""
        server = self._uvicorn()
        if threading.current_thread() is not threading.main_thread():
            server.run(sockets=[self.socket])
            return

        def stop(sig: int, frame: FrameType | None) -> None:
            server.should_exit = True

        # uvicorn takes the signals while it serves, then raises the one it caught again for the handler
        # it found: this one, so a SIGTERM ends with a clean exit rather than the default kill.
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[self.socket])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> LocalServer:
        """Serve on a background thread (for tests and benchmarks); stop with close()."""
        self._thread = threading.Thread(target=self.serve_forever, name="clipsearch-serve", daemon=True)
        self._thread.start()
        while not (self._server and self._server.started) and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def close(self) -> None:
        """Stop serving (letting in-flight requests finish) and release the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.bridge.resolver.shutdown(wait=False)
        self.socket.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _service(
    index: VectorIndex, encoder: Encoder, follow: Callable[[SearchService, bool], None] | None = None
) -> SearchService:
    def url_for(hit: Hit) -> str:
        return f"/images/{hit.id}"

    return SearchService(encoder, index, url_for=url_for, follow=follow)


def make_server(
    index: VectorIndex,
    encoder: Encoder,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Log | None = None,
    max_body: int = MAX_BODY_BYTES,
    follow: Callable[[SearchService, bool], None] | None = None,
) -> LocalServer:
    """Bind a server (port 0 picks a free one) without serving yet: call serve_forever() or start().

    Each request logs one line: to `log` if given, else to the `clipsearch.serve` logger. follow: looks
    before each request whether a reindex moved the index name, and swaps in the new model (clipsearch/follow.py).
    """
    return LocalServer(host, port, _service(index, encoder, follow), log or logger.info, max_body)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index: VectorIndex,
    encoder: Encoder,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Log | None = None,
    max_body: int = MAX_BODY_BYTES,
    follow: Callable[[SearchService, bool], None] | None = None,
) -> None:
    """Serve the REST API and the page until SIGINT (Ctrl-C) or SIGTERM; in-flight requests finish."""
    server = make_server(index, encoder, host=host, port=port, log=log, max_body=max_body, follow=follow)
    say = server.log
    if not _is_loopback(host):
        say(f"warning: listening on {host}: anyone who can reach it can search and fetch the indexed images")
    say(f"serving {index.count()} images ({index.model}) on {server.url}/ - press Ctrl-C to stop")
    try:
        server.serve_forever()
    finally:
        server.close()
    say("stopped")
