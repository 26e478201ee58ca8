"""`clipsearch serve` over real loopback sockets, with the fake encoder and a real embedded index."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.fakes import FakeEncoder

from clipsearch import errors
from clipsearch.http.server import LocalServer, make_server
from clipsearch.index.base import Document
from clipsearch.index.embedded import EmbeddedIndex

SECRET = "TOP-SECRET-CONTENTS-1f2e3d"
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 80, 220)}
LOG_LINE = re.compile(r'^127\.0\.0\.1 "(GET|POST|HEAD|PUT|DELETE) \S+ HTTP/1\.[01]" \d{3} \d+ [\d.]+ms$')


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


def request(
    server: LocalServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def raw_exchange(server: LocalServer, data: bytes) -> bytes:
    """Send bytes as they are and read until the server closes the connection."""
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def catalogue(tmp_path: Path, fake_encoder: FakeEncoder) -> tuple[EmbeddedIndex, dict[str, Path]]:
    """Three one-colour PNGs indexed with the fake encoder, and a secret file beside them."""
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    index = EmbeddedIndex(tmp_path / "index", model=fake_encoder.model, dim=fake_encoder.dim)
    files, docs = {}, []
    for name, rgb in COLOURS.items():
        path = images / f"{name}.png"
        picture = Image.new("RGB", (24, 24), rgb)
        picture.save(path)
        files[name] = path
        docs.append(Document(key=str(path), vector=fake_encoder.encode_images([picture])[0], title=name))
    index.upsert(docs)
    return index, files


@pytest.fixture
def log_lines() -> list[str]:
    return []


@pytest.fixture
def server(
    catalogue: tuple[EmbeddedIndex, dict[str, Path]], fake_encoder: FakeEncoder, log_lines: list[str]
) -> Iterator[LocalServer]:
    index, _ = catalogue
    with make_server(index, fake_encoder, port=0, log=log_lines.append, max_body=64 * 1024).start() as srv:
        yield srv


def wait_for_lines(lines: list[str], count: int) -> list[str]:
    """The server logs after the response is sent, so the client can be a moment ahead of the log."""
    import time

    deadline = time.monotonic() + 10
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return list(lines)


def doc_id_of(index: EmbeddedIndex, path: Path) -> str:
    return Document(key=str(path), vector=np.zeros(index.dim, np.float32)).id


def png_bytes(rgb: tuple[int, int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- routes ----------------------------------------------------------------------------------------


def test_given_a_running_server_when_health_is_asked_then_it_reports_status_model_and_count(server):
    reply = request(server, "GET", "/health")

    assert reply.status == 200
    assert reply.json() == {"status": "ok", "model": "fake", "count": 3}


def test_given_no_host_option_when_a_server_is_made_then_it_listens_on_loopback_only(catalogue, fake_encoder):
    index, _ = catalogue

    with make_server(index, fake_encoder, port=0) as srv:
        assert srv.server_address[0] == "127.0.0.1"
        assert srv.url.startswith("http://127.0.0.1:")


def test_given_a_busy_port_when_a_second_server_binds_it_then_a_config_error_names_the_address(
    server, catalogue, fake_encoder
):
    index, _ = catalogue
    port = server.server_address[1]

    with pytest.raises(errors.ConfigError, match=f"127.0.0.1:{port}"):
        make_server(index, fake_encoder, port=port)


def test_given_the_page_routes_when_fetched_then_page_script_and_style_come_with_their_types(server):
    page = request(server, "GET", "/")
    script = request(server, "GET", "/app.js")
    style = request(server, "GET", "/style.css")

    assert page.status == script.status == style.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<input id="q"' in page.body and b'src="/app.js"' in page.body
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")


def test_given_the_page_when_served_then_it_carries_a_csp_without_inline_script_and_nosniff(server):
    page = request(server, "GET", "/")

    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert b"<script>" not in page.body and b"style=" not in page.body


def test_given_a_head_request_when_the_page_is_asked_then_headers_come_without_a_body(server):
    reply = request(server, "HEAD", "/")

    assert reply.status == 200
    assert int(reply.headers["content-length"]) > 0
    assert reply.body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/web/",
        "/web/app.js",
        "/clipsearch/http/web/",
        "/static/",
        "/app.js/",
        "/index.html/..",
        "/%2e%2e/",
        "/server.py",
        "/web/openapi.json",
        "/images/",
        "/images",
    ],
)
def test_given_folder_like_paths_when_fetched_then_they_are_404_json_without_a_listing(server, path):
    reply = request(server, "GET", path)

    assert reply.status == 404
    assert reply.json()["error"]["code"] == "not_found"
    assert b"app.js" not in reply.body and b"index.html" not in reply.body


def test_given_the_openapi_route_when_fetched_then_it_is_the_packaged_openapi3_document(server):
    reply = request(server, "GET", "/openapi.json")

    doc = reply.json()
    assert reply.status == 200
    assert doc["openapi"].startswith("3.")
    assert {"/health", "/search", "/images/{id}"} <= set(doc["paths"])


def test_given_an_indexed_image_when_its_hit_url_is_fetched_then_the_file_bytes_come_back(server, catalogue):
    _, files = catalogue
    hits = request(server, "GET", "/search?q=anything&k=3").json()["hits"]
    red = next(h for h in hits if h["title"] == "red")

    reply = request(server, "GET", red["url"])

    assert red["url"] == f"/images/{red['id']}"
    assert reply.status == 200
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.body == files["red"].read_bytes()


def test_given_a_text_query_when_searched_then_hits_carry_cosine_scores_keys_titles_and_urls(server, catalogue):
    _, files = catalogue

    body = request(server, "GET", "/search?q=a%20red%20square&k=2").json()

    assert body["query"] == {"type": "text", "text": "a red square"}
    assert body["model"] == "fake" and len(body["hits"]) == 2
    for hit in body["hits"]:
        assert -1.0 <= hit["score"] <= 1.0
        assert hit["key"] in {str(p) for p in files.values()}
        assert hit["title"] in COLOURS
    assert body["hits"][0]["score"] >= body["hits"][1]["score"]


def test_given_a_raw_png_body_when_posted_then_the_same_coloured_picture_ranks_first(server):
    reply = request(
        server, "POST", "/search?k=1", body=png_bytes(COLOURS["blue"]), headers={"Content-Type": "image/png"}
    )

    assert reply.status == 200
    assert [h["title"] for h in reply.json()["hits"]] == ["blue"]


def test_given_a_hit_id_when_more_like_this_is_asked_then_other_pictures_come_back_without_it(server):
    first = request(server, "GET", "/search?q=x&k=1").json()["hits"][0]

    reply = request(
        server,
        "POST",
        "/search",
        body=json.dumps({"id": first["id"], "k": 5}).encode(),
        headers={"Content-Type": "application/json"},
    )

    ids = [h["id"] for h in reply.json()["hits"]]
    assert reply.status == 200
    assert first["id"] not in ids and len(ids) == 2


# -- errors ----------------------------------------------------------------------------------------


def test_given_an_unknown_id_when_more_like_this_is_asked_then_404_json(server):
    reply = request(
        server,
        "POST",
        "/search",
        body=b'{"id": "0000000000000000000000000000000000000000"}',
        headers={"Content-Type": "application/json"},
    )

    assert reply.status == 404
    assert reply.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"",
        b"[1, 2]",
        b'{"text": "a", "id": "b"}',
        b'{"text": "a", "k": 0}',
        b'{"text": "a", "k": 101}',
        b'{"image": "not base64!"}',
        b'{"image": "aGVsbG8="}',
        b"\xff\xfe",
        b'{"text": "   "}',
        b'{"text": "a", "extra": 1}',
    ],
)
def test_given_a_malformed_json_body_when_posted_then_400_json_names_the_problem(server, body):
    reply = request(server, "POST", "/search", body=body, headers={"Content-Type": "application/json"})

    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] in {"bad_request", "bad_image"} and error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/gif", ""])
def test_given_an_unsupported_content_type_when_posted_then_415_json(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}

    reply = request(server, "POST", "/search", body=b"q=red", headers=headers)

    assert reply.status == 415
    assert reply.json()["error"]["code"] == "unsupported_media_type"


def test_given_a_body_over_the_limit_when_posted_then_413_json_and_nothing_is_searched(server, fake_encoder):
    fake_encoder.calls.clear()

    reply = request(server, "POST", "/search", body=b"x" * (64 * 1024 + 1), headers={"Content-Type": "image/png"})

    assert reply.status == 413
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert reply.headers["connection"] == "close"
    assert fake_encoder.calls == []


def test_given_an_oversized_content_length_when_only_headers_are_sent_then_413_comes_before_any_body(server):
    answer = raw_exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 999999999\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"payload_too_large"' in answer


def test_given_expect_100_continue_with_an_oversized_body_then_413_replaces_the_continue(server):
    answer = raw_exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n",
    )

    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer


def chunked(*parts: bytes) -> bytes:
    """A body in HTTP/1.1 chunked framing (RFC 9112 §7.1)."""
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def test_given_a_chunked_json_body_under_the_limit_when_posted_then_it_is_read_and_answered(server):
    answer = raw_exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b'{"text": "a ', b'red square", "k": 2}'),
    )

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["query"] == {"type": "text", "text": "a red square"}


def test_given_a_chunked_image_upload_when_posted_then_the_same_coloured_picture_ranks_first(server):
    picture = png_bytes(COLOURS["green"])
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        # An iterable body with encode_chunked: http.client sends Transfer-Encoding: chunked, no length.
        conn.request(
            "POST",
            "/search?k=1",
            body=iter([picture[:50], picture[50:]]),
            headers={"Content-Type": "image/png", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        r = conn.getresponse()
        status, body = r.status, json.loads(r.read())
    finally:
        conn.close()

    assert status == 200
    assert [h["title"] for h in body["hits"]] == ["green"]


def test_given_a_chunked_body_over_the_limit_when_posted_then_413_json_and_nothing_is_searched(server, fake_encoder):
    fake_encoder.calls.clear()
    # 256 KiB in 16 KiB chunks against the fixture's 64 KiB limit: no Content-Length to refuse up front.
    body = chunked(*[b"x" * (16 * 1024)] * 16)

    answer = raw_exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body,
    )

    head, _, reply = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head.lower()
    assert json.loads(reply)["error"]["code"] == "payload_too_large"
    assert fake_encoder.calls == []


def test_given_two_different_content_lengths_when_posted_then_400_and_the_connection_closes(server):
    answer = raw_exchange(
        server,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
    )

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in answer


def test_given_a_garbage_request_line_when_sent_then_a_json_400_comes_back_not_html(server):
    answer = raw_exchange(server, b"NOT A REQUEST AT ALL\r\n\r\n")

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert b"<html" not in answer.lower()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health\r\n\r\n",  # HTTP/0.9: no version, no headers
        # Both framings at once, the request-smuggling shape (RFC 9112 6.3): never answered as if one were right
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n folded: header\r\n\r\n",  # obs-fold (RFC 9112 5.2)
        # A coding other than chunked last (RFC 9112 6.3), on a GET that would otherwise search
        b"GET /search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /search?q=red HTTP/1.1\r\nConnection: close\r\n\r\n",  # HTTP/1.1 without Host (RFC 9112 3.2)
        b"GET /search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: localhost\r\n\r\n",  # two Hosts
        b"GET /search?q=red HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        # curl --http2 on an http:// URL: llhttp would end the request at its headers and lose the body
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
        b'{"text":"red"}\n',
    ],
    ids=[
        "http-0.9",
        "chunked-and-content-length",
        "folded-header",
        "gzip-transfer-encoding",
        "no-host",
        "two-hosts",
        "70-kib-header",
        "upgrade-with-a-body",
    ],
)
def test_given_a_request_that_is_not_valid_http_1_1_when_sent_then_one_json_400_one_line_and_nothing_searched(
    server, fake_encoder: FakeEncoder, log_lines: list[str], request_bytes: bytes
) -> None:
    encoded_before, logged_before = list(fake_encoder.calls), len(log_lines)
    answer = raw_exchange(server, request_bytes)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"]
    assert fake_encoder.calls == encoded_before
    # One line for the one request, and nothing else logged after it (a request the app had started on
    # would log its own line too)
    assert [line.split('"')[1] for line in wait_for_lines(log_lines, logged_before + 1)[logged_before:]] == [
        "(not HTTP/1.1)"
    ]
    time.sleep(0.2)
    assert len(log_lines) == logged_before + 1


def test_given_an_upgrade_request_without_a_body_when_sent_then_answered_as_http_1_1_and_the_connection_closed(
    server,
) -> None:
    # RFC 9110 7.8: a server may ignore Upgrade. The parser reads nothing more on such a connection, so it
    # must close after the answer rather than leave a keep-alive client waiting for a second one.
    answer = raw_exchange(
        server,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)


def test_given_a_foreign_host_header_when_asked_then_403_so_dns_rebinding_cannot_read_the_index(server):
    reply = request(server, "GET", "/search?q=red", headers={"Host": "attacker.example:8000"})
    local = request(server, "GET", "/health", headers={"Host": f"localhost:{server.server_address[1]}"})

    assert reply.status == 403
    assert reply.json()["error"]["code"] == "forbidden_host"
    assert local.status == 200


def test_given_an_encoder_that_crashes_when_searched_then_json_500_without_trace_and_the_trace_is_logged(
    catalogue, log_lines
):
    class Exploding(FakeEncoder):
        def encode_texts(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("boom /very/private/path")

    index, _ = catalogue
    with make_server(index, Exploding(), port=0, log=log_lines.append).start() as srv:
        reply = request(srv, "GET", "/search?q=red")
        after = request(srv, "GET", "/health")

    assert reply.status == 500
    assert reply.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert b"Traceback" not in reply.body and b"private" not in reply.body
    lines = wait_for_lines(log_lines, 3)
    assert any("Traceback" in line and "boom /very/private/path" in line for line in lines)
    assert after.status == 200


# -- images by id only -----------------------------------------------------------------------------

TRAVERSALS = [
    "/images/../secret.txt",
    "/images/..%2Fsecret.txt",
    "/images/..%2f..%2fsecret.txt",
    "/images/%2e%2e%2fsecret.txt",
    "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/images/%252e%252e%252fsecret.txt",
    "/images/..%252f..%252fetc%252fpasswd",
    "/images/%25252e%25252e%25252fsecret.txt",
    "/images/..%5c..%5csecret.txt",
    "/images/%2fetc%2fpasswd",
    "/images/secret.txt",
    "/images/%00",
    "/images/..",
    "/images/.",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_given_traversal_attempts_when_images_are_asked_then_404_and_no_file_leaks(server, path):
    reply = request(server, "GET", path)

    assert reply.status == 404
    assert reply.json()["error"]["code"] == "not_found"
    assert SECRET.encode() not in reply.body and b"root:" not in reply.body


def test_given_an_indexed_file_path_when_used_instead_of_an_id_then_404(server, catalogue):
    _, files = catalogue
    from urllib.parse import quote

    reply = request(server, "GET", "/images/" + quote(str(files["red"]), safe=""))

    assert reply.status == 404


def test_given_a_document_whose_key_is_not_an_image_when_its_id_is_asked_then_404(server, catalogue, tmp_path):
    index, _ = catalogue
    secret = tmp_path / "secret.txt"
    index.upsert([Document(key=str(secret), vector=np.ones(index.dim, np.float32) / 4, title="sneaky")])

    reply = request(server, "GET", f"/images/{doc_id_of(index, secret)}")

    assert reply.status == 404
    assert SECRET.encode() not in reply.body


def test_given_an_indexed_image_deleted_from_disk_when_its_id_is_asked_then_404(server, catalogue):
    index, files = catalogue
    files["green"].unlink()

    reply = request(server, "GET", f"/images/{doc_id_of(index, files['green'])}")

    assert reply.status == 404


# -- concurrency and logging -----------------------------------------------------------------------


def test_given_many_concurrent_queries_when_answered_then_each_client_gets_its_own_query_back(server):
    texts = [f"query number {i}" for i in range(24)]
    answers: dict[str, Any] = {}

    def ask(text: str) -> None:
        from urllib.parse import quote

        answers[text] = request(server, "GET", f"/search?k=2&q={quote(text)}").json()

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(answers) == sorted(texts)
    for text, body in answers.items():
        assert body["query"] == {"type": "text", "text": text}
        assert len(body["hits"]) == 2


def test_given_several_requests_when_served_then_each_one_logs_exactly_one_line(server, log_lines):
    request(server, "GET", "/health")
    request(server, "GET", "/search?q=red")
    request(server, "POST", "/search", body=b"{", headers={"Content-Type": "application/json"})
    request(server, "GET", "/images/nope")

    lines = wait_for_lines(log_lines, 4)
    assert len(lines) == 4
    assert all(LOG_LINE.match(line) for line in lines), lines
    # Each connection has its own thread, so lines may land in any order.
    assert sorted(line.split('"')[2].split()[0] for line in lines) == ["200", "200", "400", "404"]


def test_given_a_log_that_writes_in_two_steps_when_requests_run_concurrently_then_lines_never_interleave(
    catalogue, fake_encoder
):
    """print() writes a line and its newline separately; the server must not let two threads' writes mix."""
    import time
    from urllib.parse import quote

    index, _ = catalogue
    written: list[str] = []

    def two_step_log(line: str) -> None:  # like print(line, file=sys.stderr)
        written.append(line)
        time.sleep(0.002)  # widen the window between the two writes
        written.append("\n")

    with make_server(index, fake_encoder, port=0, log=two_step_log).start() as srv:
        threads = [
            threading.Thread(target=request, args=(srv, "GET", f"/search?q={quote(f'query {i}')}")) for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 10  # each line is logged just after its response is sent
        while written.count("\n") < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.log("stopped")

    lines = "".join(written).split("\n")
    assert lines[-1] == "" and lines[-2] == "stopped"
    assert len(lines[:-2]) == 16 and all(LOG_LINE.match(line) for line in lines[:-2]), lines


def test_given_a_forwarded_for_header_when_logged_then_the_line_names_the_socket_peer(server, log_lines):
    request(server, "GET", "/health", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})

    (line,) = wait_for_lines(log_lines, 1)
    assert line.startswith('127.0.0.1 "GET /health HTTP/1.1" 200 ') and "203.0.113.9" not in line


def test_given_a_request_with_control_characters_when_logged_then_the_line_stays_one_line(server, log_lines):
    raw_exchange(server, b"GET /search?q=a%0Ab\x1b[2J HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")

    lines = wait_for_lines(log_lines, 1)
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\x1b" not in lines[0]


# -- shutdown --------------------------------------------------------------------------------------


def test_given_a_request_in_flight_when_serve_gets_sigterm_then_it_is_answered_and_serve_exits_0(
    tmp_path, demo_encoder
):
    import os
    import signal
    import subprocess
    import sys
    import time

    from clipsearch.demo.catalogue import write_catalogue

    write_catalogue(tmp_path / "images", count=4)
    index = EmbeddedIndex(tmp_path / "index", model=demo_encoder.model, dim=demo_encoder.dim)
    paths = sorted((tmp_path / "images").iterdir())
    vectors = demo_encoder.encode_images([Image.open(p).convert("RGB") for p in paths])
    index.upsert([Document(key=str(p), vector=v, title=p.stem) for p, v in zip(paths, vectors, strict=True)])
    index.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "--model", "demo", "--index", str(tmp_path / "index")]
        + ["--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")},
    )
    try:
        assert proc.stderr is not None
        listening = re.search(r"on http://127\.0\.0\.1:(\d+)/", proc.stderr.readline())
        assert listening, "serve did not say where it listens"
        port = int(listening.group(1))
        picture = png_bytes((200, 40, 40))
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(
                b"POST /search?k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(picture)
            )
            # "100 Continue" comes once the server reads the body: the request is in flight.
            assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30  # shutting down: the listening socket closes first
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the server kept accepting connections after SIGTERM")
            sock.sendall(picture)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()

    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(json.loads(body)["hits"]) == 2
    assert proc.returncode == 0
    lines = rest.splitlines()
    assert lines[-1] == "stopped" and "Traceback" not in rest, rest
    assert sum('"POST /search?k=2 HTTP/1.1" 200' in line for line in lines) == 1, rest


def test_given_a_json_integer_past_pythons_digit_limit_when_posted_then_json_400_not_500(server: LocalServer) -> None:
    body = b'{"text": "red", "k": ' + b"9" * 5000 + b"}"
    reply = request(server, "POST", "/search", body, {"Content-Type": "application/json"})
    assert reply.status == 400 and json.loads(reply.body)["error"]["code"] == "bad_request"
