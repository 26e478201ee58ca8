"""HTTP/1.1 for `clipsearch serve`: uvicorn's httptools protocol (llhttp), held to what RFC 9112 asks of a server.

llhttp parses in C, about 1 ms a request faster here than h11 (docs/benchmarks.md), but leaves a few rules to
the server that h11 enforced itself. Each one is checked here, before the app starts on the request, and
answered with the contract's JSON 400 (one log line, connection closed):

- one Host header in an HTTP/1.1 request, at most one in HTTP/1.0 (RFC 9112 3.2);
- Transfer-Encoding only with chunked as its last coding, and never beside Content-Length (RFC 9112 6.1,
  6.3): both are the shapes of request smuggling, and llhttp would otherwise refuse some of them only after
  the app had started;
- HTTP/1.0 or 1.1, not a bare `GET /path` (HTTP/0.9);
- a request head (target and headers) of at most 64 KiB: llhttp itself has no limit;
- no Upgrade with a body: llhttp ends an Upgrade request at its headers, so its body would be lost (curl
  --http2 sends `Upgrade: h2c` with a POST). An Upgrade request without a body is answered as plain HTTP/1.1
  (RFC 9110 7.8 lets a server ignore Upgrade), then the connection closes: llhttp reads nothing more on it.
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from clipsearch.http.routes import error_body

__all__ = ["MAX_HEAD_BYTES", "protocol_class"]

MAX_HEAD_BYTES = 64 * 1024
_NOT_HTTP = "the request is not valid HTTP/1.1"


class _Refused(Exception):
    """Raised from a parser callback: httptools stops parsing, and uvicorn calls send_400_response."""


def _refusal(version: str, headers: list[tuple[bytes, bytes]], upgrade: bool) -> str | None:
    """Why a request whose head was just parsed must not reach the app, or None."""
    if version not in ("1.0", "1.1"):
        return _NOT_HTTP
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        return f"{_NOT_HTTP}: it needs exactly one Host header"
    codings = [v for name, value in headers if name == b"transfer-encoding" for v in value.lower().split(b",")]
    lengths = [value for name, value in headers if name == b"content-length"]
    if codings and (codings[-1].strip() != b"chunked" or lengths):
        return f"{_NOT_HTTP}: Transfer-Encoding must end in chunked and come without Content-Length"
    if upgrade and (codings or any(value.strip() not in (b"", b"0") for value in lengths)):
        return "Upgrade is not supported, and a body sent with it would be lost: send the request without it"
    return None


def protocol_class(log: Callable[[str], None], headers: dict[str, str]) -> type[HttpToolsProtocol]:
    """The protocol uvicorn runs per connection; log gets the one line of a refused request, headers are added
    to its answer (the security headers every answer carries)."""
    extra = [(name.encode(), value.encode()) for name, value in headers.items()]

    class Protocol(HttpToolsProtocol):
        head_bytes = 0
        reason = _NOT_HTTP

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self.head_bytes += size
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(f"the request's target and headers are over {MAX_HEAD_BYTES // 1024} KiB")

        def on_headers_complete(self) -> None:
            upgrade = self.parser.should_upgrade()
            why = _refusal(self.parser.get_http_version(), self.headers, upgrade)
            if why:
                self._refuse(why)
            super().on_headers_complete()
            if upgrade:  # answered as plain HTTP/1.1; llhttp parses nothing after it on this connection
                self.cycle.keep_alive = False

        def _refuse(self, why: str) -> None:
            self.reason = why
            raise _Refused(why)

        def send_400_response(self, msg: str) -> None:
            body = error_body("bad_request", self.reason).encode()
            answer = [
                *self.server_state.default_headers,
                (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(body)).encode()),
                (b"Connection", b"close"),
                *extra,
            ]
            if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
                body = b""  # a reply is under way on this connection: end it, add nothing
            else:
                head = b"".join(name + b": " + value + b"\r\n" for name, value in answer)
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\n" + head + b"\r\n" + body)
            self.transport.close()
            client = self.client[0] if self.client else "-"
            log(f'{client} "(not HTTP/1.1)" 400 {len(body)} 0.0ms')

    return Protocol
