"""A local stand-in for the CLIP checkpoint host: serves given bytes at given paths on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CheckpointServer:
    """files: URL path -> body. `gate`, when set, holds every answer until it is set (for overlap tests)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.gets: list[str] = []
        self.gate: threading.Event | None = None
        self.arrived = threading.Event()
        self.url = ""


@contextmanager
def serving(files: dict[str, bytes]) -> Iterator[CheckpointServer]:
    state = CheckpointServer(files)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.gets.append(self.path)
            state.arrived.set()
            if state.gate is not None:
                state.gate.wait(timeout=60)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for start in range(0, len(body), 64 * 1024):  # several reads, so progress moves in steps
                self.wfile.write(body[start : start + 64 * 1024])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        if state.gate is not None:
            state.gate.set()
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A 127.0.0.1 URL where nothing listens: a download from it is refused at once (never hangs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/clip/models"
