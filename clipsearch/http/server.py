"""`clipsearch serve`: the search Lambda's routes over HTTP on one machine, plus the web page.

Each HTTP request becomes an API Gateway REST (v1 proxy) event and goes through the resolver that
api.py builds for the Lambda, as `sam local start-api` does, without Docker. The server adds what only
a local host needs: the page and its assets from a fixed list, `/openapi.json`, images by hit id, the
upload limit checked from Content-Length before reading, security headers and one log line a request.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import stat
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from clipsearch import errors
from clipsearch.encoders import Encoder
from clipsearch.http.routes import MAX_BODY_BYTES, build_app, error_response
from clipsearch.index.base import Hit, VectorIndex
from clipsearch.search import SearchService

__all__ = ["LocalServer", "make_server", "serve", "image_reader", "to_event", "ASSETS", "MAX_BODY_BYTES"]

Log = Callable[[str], None]

# The page and what it loads: served by this fixed list only, never by a path from the request.
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/openapi.json": ("openapi.json", "application/json"),
}

# Images the page may show, by file extension of the indexed key.
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".avif": "image/avif",
    ".heic": "image/heic",
    ".heif": "image/heif",  # HEIC: shown by Safari only
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
# Headers that describe one hop of HTTP, which this server sets itself.
_HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "keep-alive", "date", "server"}
# After refusing a body, read and drop at most this much of it, so the client sees the answer
# rather than a connection reset.
_DRAIN_LIMIT = 64 * 1024 * 1024
_DRAIN_SECONDS = 2.0


def allowed_methods(path: str) -> str | None:
    """The methods a known path answers (for 405 and OPTIONS), or None for a path this server lacks."""
    if path == "/search":
        return "GET, HEAD, POST"
    if path in ASSETS or path in ("/health", "/duplicates"):
        return "GET, HEAD"
    name = path.removeprefix("/images/")
    if name != path and name and "/" not in name:
        return "GET, HEAD"
    return None


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _limit_text(max_body: int) -> str:
    mb = max_body / (1024 * 1024)
    return f"{mb:g} MB" if mb >= 1 else f"{max_body} bytes"


def _header_value(value: str) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


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
        content_type = IMAGE_TYPES.get(path.suffix.lower())
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
    method: str, target: str, headers: Message, body: bytes, source_ip: str, request_id: str
) -> dict[str, Any]:
    """An API Gateway REST (v1 proxy) event for one HTTP request, as API Gateway would send it."""
    parts = urlsplit(target)
    path = unquote(parts.path or "/")
    multi_query: dict[str, list[str]] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        multi_query.setdefault(name, []).append(value)
    multi_headers: dict[str, list[str]] = {}
    for name, value in headers.items():
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
        # Always base64: the bytes reach api.py exactly as sent, text or image.
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


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    close: bool = False


class LocalServer(ThreadingHTTPServer):
    """A threaded HTTP server for the search routes and the page; `url` is where it listens."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, host: str, port: int, service: SearchService, index: VectorIndex, log: Log, max_body: int
    ) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        # Request threads and the main thread all log; one line at a time, so lines never interleave.
        log_lock = threading.Lock()

        def log_line(line: str) -> None:
            with log_lock:
                log(line)

        self.log = log_line
        self.max_body = max_body
        self.loopback_only = _is_loopback(host)
        self.assets = {route: (_asset(name), ctype) for route, (name, ctype) in ASSETS.items()}
        self.app = build_app(service, image_reader=image_reader(index), max_body=max_body)
        # Powertools keeps the current event in class attributes (BaseRouter.current_event), so one
        # resolve runs at a time; bodies, static files and responses still move in parallel.
        self.resolve_lock = threading.Lock()
        self._thread: threading.Thread | None = None

        # Replaces api.py's catch-all so the trace lands in this server's log.
        @self.app.exception_handler(Exception)
        def unexpected(exc: Exception) -> Any:
            self.log("error: unexpected " + "".join(traceback.format_exception(exc)).rstrip())
            return error_response(500, "internal_error", "internal server error")

        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise errors.ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> LocalServer:
        """Serve on a background thread (for tests and benchmarks); stop with close()."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="clipsearch-serve", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _asset(name: str) -> bytes:
    return resources.files("clipsearch.http").joinpath("web", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer
    protocol_version = "HTTP/1.1"
    server_version = "clipsearch"
    sys_version = ""
    # Seconds a connection may sit idle or trickle a body before it is dropped.
    timeout = 30
    disable_nagle_algorithm = True
    # Set before parse_request runs, for refusals that come earlier.
    command = ""
    requestline = ""
    path = "/"
    _unread = 0

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = do_GET

    # -- request --------------------------------------------------------------------------------

    def _handle(self) -> None:
        started = time.perf_counter()
        try:
            reply = self._reply()
        except Exception:  # the edge of the process: whatever broke, the client gets JSON, not a trace
            self.server.log("error: unexpected " + traceback.format_exc().rstrip())
            reply = _Reply(
                500,
                {"Content-Type": "application/json"},
                _error_body("internal_error", "internal server error"),
                close=True,
            )
        self._send(reply, started)

    def _reply(self) -> _Reply:
        length, problem = self._body_length()
        if problem is None and not self._host_allowed():
            # A page elsewhere that rebinds its DNS name to 127.0.0.1 must not read this index.
            self._unread = length
            problem = _Reply(
                403,
                {"Content-Type": "application/json"},
                _error_body(
                    "forbidden_host", "this server answers to loopback names only (localhost, 127.0.0.1, [::1])"
                ),
                close=True,
            )
        if problem is not None:
            return problem
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            return _Reply(
                400,
                {"Content-Type": "application/json"},
                _error_body("bad_request", "the body ended before its Content-Length"),
                close=True,
            )
        method = "GET" if self.command == "HEAD" else self.command
        route = urlsplit(self.path).path
        allowed = allowed_methods(unquote(route))
        if allowed and method == "OPTIONS":
            return _Reply(204, {"Allow": allowed}, b"")
        if allowed and method not in allowed.split(", "):
            return _Reply(
                405,
                {"Content-Type": "application/json", "Allow": allowed},
                _error_body("method_not_allowed", f"{route} answers {allowed}"),
            )
        if method == "GET" and route in self.server.assets:
            data, ctype = self.server.assets[route]
            headers = {"Content-Type": ctype, "Cache-Control": "no-cache"}
            if ctype.startswith("text/html"):
                headers["Content-Security-Policy"] = PAGE_CSP
            return _Reply(200, headers, data)
        return self._resolve(method, body)

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host")
        if not self.server.loopback_only or host is None:
            return True
        host = host.strip()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return _is_loopback(name.lower())

    def _body_length(self) -> tuple[int, _Reply | None]:
        """The declared body size, or the reply that refuses it (before any of it is read)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return 0, _Reply(
                411,
                {"Content-Type": "application/json"},
                _error_body("length_required", "send the body with a Content-Length"),
                close=True,
            )
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            return 0, None
        try:
            if len(lengths) > 1:
                raise ValueError(lengths)
            length = int(lengths.pop())
            if length < 0:
                raise ValueError(length)
        except ValueError:
            return 0, _Reply(
                400,
                {"Content-Type": "application/json"},
                _error_body("bad_request", "Content-Length is not a size"),
                close=True,
            )
        if length > self.server.max_body:
            return 0, self._too_large(length)
        return length, None

    def _too_large(self, length: int) -> _Reply:
        reply = _Reply(
            413,
            {"Content-Type": "application/json"},
            _error_body(errors.PayloadTooLarge.code, f"body is over the {_limit_text(self.server.max_body)} limit"),
            close=True,
        )
        self._unread = length
        return reply

    def handle_expect_100(self) -> bool:
        # Answer 413 instead of "100 Continue", so an oversized upload is never sent.
        length, problem = self._body_length()
        if problem is not None:
            self._unread = 0
            self._send(problem, time.perf_counter())
            return False
        return super().handle_expect_100()

    def _resolve(self, method: str, body: bytes) -> _Reply:
        request_id = str(uuid.uuid4())
        event = to_event(method, self.path, self.headers, body, self.client_address[0], request_id)
        with self.server.resolve_lock:
            result = self.server.app.resolve(event, _LocalContext(request_id))  # type: ignore[arg-type]
        headers: dict[str, str] = {}
        for name, values in (result.get("multiValueHeaders") or {}).items():
            if name.lower() not in _HOP_HEADERS and values:
                headers[name] = ", ".join(str(v) for v in values)
        for name, value in (result.get("headers") or {}).items():
            if name.lower() not in _HOP_HEADERS:
                headers[name] = str(value)
        raw = result.get("body") or ""
        data = base64.b64decode(raw) if result.get("isBase64Encoded") else str(raw).encode("utf-8")
        headers.setdefault("Content-Security-Policy", API_CSP)
        headers.setdefault("Cache-Control", "no-store")
        return _Reply(int(result["statusCode"]), headers, data)

    # -- response -------------------------------------------------------------------------------

    def _send(self, reply: _Reply, started: float) -> None:
        unread = self._unread
        self._unread = 0
        if reply.close:
            self.close_connection = True
        sent = 0
        headers = {
            "Server": self.server_version,
            "Date": self.date_time_string(),
            **SECURITY_HEADERS,
            **reply.headers,
            "Content-Length": str(len(reply.body)),
        }
        if self.close_connection:
            headers["Connection"] = "close"
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        head = (
            f"{self.protocol_version} {reply.status} {phrase}\r\n"
            + "".join(f"{name}: {_header_value(value)}\r\n" for name, value in headers.items())
            + "\r\n"
        )
        body = b"" if self.command == "HEAD" else reply.body
        try:
            # Head and body in one write: two small writes meet Nagle and delayed ACKs (40 ms stalls).
            self.wfile.write(head.encode("latin-1", "replace") + body)
            self.wfile.flush()
            sent = len(body)
        except OSError as e:
            self.close_connection = True
            self.server.log(f"{self.client_address[0]} client went away: {e.__class__.__name__}")
        if unread:
            self._drain(unread)
        took = (time.perf_counter() - started) * 1000
        self.server.log(f'{self.client_address[0]} "{_printable(self.requestline)}" {reply.status} {sent} {took:.1f}ms')

    def _drain(self, length: int) -> None:
        """Drop a refused body for a moment, so the client reads the 413 instead of a reset."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_DRAIN_SECONDS)
            deadline = time.monotonic() + _DRAIN_SECONDS
            left = min(length, _DRAIN_LIMIT)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long) as JSON, not HTML."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            # An unparsable request line falls back to HTTP/0.9, which has no status line: answer in 1.1.
            self.request_version = "HTTP/1.1"
        headers = {"Content-Type": "application/json"}
        if code == HTTPStatus.NOT_IMPLEMENTED:
            # http.server says 501 for a method it has no do_ function for; that is the client's doing.
            code = HTTPStatus.METHOD_NOT_ALLOWED
            message = f"method {_printable(self.command, 20)} is not allowed"
            headers["Allow"] = allowed_methods(unquote(urlsplit(self.path).path)) or "GET, HEAD, POST"
        try:
            status = HTTPStatus(code)
            code_name = status.phrase.lower().replace(" ", "_") if code != 400 else "bad_request"
            phrase = status.phrase
        except ValueError:
            code_name, phrase = "bad_request", "error"
        self._send(_Reply(code, headers, _error_body(code_name, message or phrase), close=True), time.perf_counter())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Lines are written by _send, once per request, with the time taken."""

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.client_address[0]} {_printable(format % args)}")


def _service(index: VectorIndex, encoder: Encoder) -> SearchService:
    def url_for(hit: Hit) -> str:
        return f"/images/{hit.id}"

    return SearchService(encoder, index, url_for=url_for)


def make_server(
    index: VectorIndex,
    encoder: Encoder,
    host: str = "127.0.0.1",
    port: int = 8000,
    log: Log | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> LocalServer:
    """Bind a server (port 0 picks a free one) without serving yet: call serve_forever() or start()."""
    return LocalServer(host, port, _service(index, encoder), index, log or (lambda line: None), max_body)


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
) -> None:
    """Serve the REST API and the page until interrupted (Ctrl-C)."""
    server = make_server(index, encoder, host=host, port=port, log=log, max_body=max_body)
    say = server.log
    if not _is_loopback(host):
        say(f"warning: listening on {host}: anyone who can reach it can search and fetch the indexed images")
    say(f"serving {index.count()} images ({index.model}) on {server.url}/ - press Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()
