"""The bad-input catalogue: every odd input, on every surface, gets a clear 4xx or a skip with a reason.

Surfaces: the local REST server (make_server, fake encoder), the search Lambda's resolver (API Gateway
events), the ingest Lambda's record handler (S3 notifications through SQS records, moto S3), the
SageMaker handler (model_code with the demo model) and the CLI (subprocess, demo model).

Each case is one row of the table in docs/reliability.md: bench/bad_input_table.py runs the same
CASES through the same Harness and prints the observed column. The rule checked for every case:
the observed outcome starts with the expected one, no traceback appears, and a refused input
leaves what is already indexed exactly as it was.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from moto import mock_aws
from support.fakes import FakeEncoder, LambdaContext
from support.images import (
    animated_gif,
    bad_files,
    cmyk_jpeg,
    heic,
    noise_photo,
    palette_png_transparent,
    picture,
    png_16bit,
    svg,
)

from clipsearch.aws.config import AwsConfig
from clipsearch.aws.ingest import Ingestor
from clipsearch.aws.search import build_search_app
from clipsearch.http.server import LocalServer, make_server
from clipsearch.index.base import Document, doc_id
from clipsearch.index.embedded import DB_NAME, EmbeddedIndex

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "clipsearch-bad-inputs"
CLI = [sys.executable, "-m", "clipsearch.cli"]
REST, LAMBDA_SEARCH, LAMBDA_INGEST, SAGEMAKER, CLI_SURFACE = (
    "REST server",
    "Lambda search",
    "Lambda ingest",
    "SageMaker handler",
    "CLI",
)
# Outcomes that add to an index; every other outcome must leave the indexes as they were.
ADDS = ("indexed",)


# -- the inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    name: str  # the file name used on disk and as the S3 key
    label: str
    data: Callable[[], bytes]
    accepted: bool


@cache
def _bad(name: str) -> bytes:
    return bad_files()[name]


@cache
def _forty_mb() -> bytes:
    return noise_photo(40.0)


IMAGES = [
    ImageInput("zero-byte.jpg", "zero-byte file", lambda: _bad("zero-byte.jpg"), False),
    ImageInput("truncated.jpg", "truncated JPEG (first half)", lambda: _bad("truncated.jpg"), False),
    ImageInput("corrupt.png", "corrupt PNG (signature + garbage)", lambda: _bad("corrupt.png"), False),
    ImageInput("not-an-image.jpg", "text file named .jpg", lambda: _bad("not-an-image.jpg"), False),
    ImageInput("bomb.png", "decompression bomb (PNG claiming 20000x20000)", lambda: _bad("bomb.png"), False),
    ImageInput("sixteen-bit.png", "16-bit greyscale PNG", png_16bit, True),
    ImageInput("palette-alpha.png", "palette PNG with transparency", palette_png_transparent, True),
    ImageInput("cmyk.jpg", "CMYK JPEG", cmyk_jpeg, True),
    ImageInput("animated.gif", "animated GIF (3 frames)", animated_gif, True),
    ImageInput("drawing.svg", "SVG drawing", svg, False),
    ImageInput("photo.heic", "HEIC header without its picture", heic, False),
    ImageInput("noise-40mb.png", "40 MB photo (noise PNG, 4.7k x 3.5k)", _forty_mb, True),
]
BIG = "noise-40mb.png"

TEXTS = {
    "empty text": "",
    "whitespace-only text": " \t\n ",
    "100 KB text": ("a photo of a red circle on a beach " * 3000)[: 100 * 1024],
    "emoji text": "🔴⭕ 🏖️🌊 red circle 😀",
    "right-to-left text (Arabic, Hebrew)": "دائرة حمراء على الشاطئ עיגול אדום",
}
EMPTY_TEXTS = ("empty text", "whitespace-only text")

DEEP = 100_000

# POST /search JSON bodies (raw bytes, so that NaN and invalid JSON can be sent) -> expected status.
JSON_REQUESTS: dict[str, tuple[bytes, str]] = {
    "k is NaN": (b'{"text": "red", "k": NaN}', "400"),
    "k is a word": (b'{"text": "red", "k": "ten"}', "400"),
    "k is a float": (b'{"text": "red", "k": 2.5}', "400"),
    "k = 0": (b'{"text": "red", "k": 0}', "400"),
    "k = 101": (b'{"text": "red", "k": 101}', "400"),
    "from = -1": (b'{"text": "red", "from": -1}', "400"),
    "from = 10001": (b'{"text": "red", "from": 10001}', "400"),
    "min_score = 1.5": (b'{"text": "red", "min_score": 1.5}', "400"),
    "min_score is the string NaN": (b'{"text": "red", "min_score": "NaN"}', "400"),
    "min_score is Infinity": (b'{"text": "red", "min_score": Infinity}', "400"),
    "unknown field": (b'{"text": "red", "limit": 5}', "400"),
    "two queries": (b'{"text": "red", "id": "abc"}', "400"),
    "no query": (b'{"k": 3}', "400"),
    "body is a JSON array": (b'["red"]', "400"),
    "invalid JSON": (b'{"text": "red",', "400"),
    "invalid UTF-8 in JSON": (b'{"text": "red \xff\xfe"}', "400"),
    f"JSON nested {DEEP} deep": (b"[" * DEEP + b"]" * DEEP, "400"),
    "deeply nested filter": (b'{"text": "red", "filter": ' + b'{"prefix": ' * 50 + b'"a"' + b"}" * 51, "400"),
    "filter is a string": (b'{"text": "red", "filter": "family/"}', "400"),
    "image is a number": (b'{"image": 12345}', "400"),
    "image is bad base64": (b'{"image": "not base64!!"}', "400"),
    "image is base64 of text": (b'{"image": "' + base64.b64encode(b"hello world") + b'"}', "400"),
    "unknown id": (b'{"id": "0000000000000000"}', "404"),
}
CONTENT_TYPES = {
    "text/plain body": ("text/plain", b'{"text": "red"}'),
    "multipart/form-data body": ("multipart/form-data; boundary=x", b"--x\r\n\r\nred\r\n--x--\r\n"),
    "no content type": ("", b'{"text": "red"}'),
    "image/svg+xml body": ("image/svg+xml", b"<svg/>"),
}
QUERY_STRINGS = {
    "GET k=abc": "/search?q=red&k=abc",
    "GET k=1000": "/search?q=red&k=1000",
    "GET without q": "/search?k=3",
    "GET unknown parameter": "/search?q=red&size=3",
}

S3_KEYS = {
    "key with spaces": "holiday photos/beach day 1.png",
    "key with +": "a+b=c/1+1.png",
    "unicode key": "東京/café – été ü.png",
    "very long key (1,000 bytes)": "long/" + "x" * 991 + ".png",
    "key with %": "100% real/50%off.png",
}


# -- the harness ---------------------------------------------------------------------------------


@dataclass
class Harness:
    """Every surface, set up once, with something already indexed."""

    work: Path
    server: LocalServer
    server_log: list[str]
    rest_index: EmbeddedIndex
    search_app: Any
    ingestor: Ingestor
    ingest_index: EmbeddedIndex
    s3: Any
    ingest_log: list[str]
    cli_index: Path
    _model: Any = None
    _cli_run: dict[str, str] = field(default_factory=dict)

    # state --------------------------------------------------------------------------------------

    def state(self) -> tuple[Any, ...]:
        """What is indexed, everywhere: must not change when an input is refused."""
        return (self.rest_index.fingerprints(), self.ingest_index.fingerprints(), cli_rows(self.cli_index))

    # the REST server ----------------------------------------------------------------------------

    def http(self, method: str, path: str, body: bytes | None = None, ctype: str = "") -> str:
        host, port = self.server.server_address[:2]
        conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
            r = conn.getresponse()
            return outcome(r.status, r.read())
        except (BrokenPipeError, ConnectionResetError):
            # The server answered early (413) and closed while the body was still being sent.
            return "connection closed before the answer was read"
        finally:
            conn.close()

    # the search Lambda ---------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        ctype: str = "",
        query: dict[str, str] | None = None,
        binary: bool = False,
    ) -> str:
        event = json.loads((ROOT / "events" / "api" / "search-text.json").read_text())
        headers = {"Accept": "application/json", "Host": "example.execute-api.us-east-1.amazonaws.com"}
        if ctype:
            headers["Content-Type"] = ctype
        event.update(
            httpMethod=method,
            path=path,
            resource=path,
            headers=headers,
            multiValueHeaders={k: [v] for k, v in headers.items()},
            queryStringParameters=query,
            multiValueQueryStringParameters=({k: [v] for k, v in query.items()} if query else None),
        )
        if body is None:
            event["body"], event["isBase64Encoded"] = None, False
        elif binary:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
        else:
            event["body"], event["isBase64Encoded"] = body.decode("utf-8", "surrogateescape"), False
        response = self.search_app.resolve(event, LambdaContext())
        raw = response["body"] or ""
        return outcome(response["statusCode"], raw.encode("utf-8", "surrogateescape"))

    # the ingest Lambda ---------------------------------------------------------------------------

    def ingest(self, body: str, key: str | None = None) -> str:
        """One SQS record through the ingest handler, as functions/ingest/app.py runs it."""
        record = {
            "messageId": "m-1",
            "receiptHandle": "r-1",
            "body": body,
            "attributes": {},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:ingest",
            "awsRegion": "us-east-1",
        }
        before = self.ingest_index.count()
        del self.ingest_log[:]
        processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
        with processor([record], self.ingestor.handle_record):
            ((status, result, _),) = processor.process()
        if status == "fail":
            return f"failed, retried by SQS then dead-lettered: {result}"
        skipped = [line.split(": ", 1)[1] for line in self.ingest_log if line.startswith("skipped ")]
        if skipped:
            return f"skipped: {skipped[0]}"
        if key is not None and self.ingest_index.count() == before + 1:
            doc = self.ingest_index.get(doc_id(BUCKET, key))
            return "indexed, key kept exactly" if doc is not None and doc.key == key else "indexed, key CHANGED"
        return "no change (nothing to index)"

    def put_and_ingest(self, key: str, data: bytes, ctype: str = "") -> str:
        extra = {"ContentType": ctype} if ctype else {}
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data, **extra)
        return self.ingest(notification(key, len(data)), key)

    # the SageMaker handler -----------------------------------------------------------------------

    def sagemaker(self, body: bytes, ctype: str) -> str:
        from model_code import inference

        if self._model is None:
            from clipsearch import models

            source = models.resolve(models.DEMO)
            self._model = inference.load_model(source.name, source.model_dir)
        try:
            vectors = json.loads(
                inference.output_fn(
                    inference.predict_fn(inference.input_fn(body, ctype), self._model), "application/json"
                )
            )
        except ValueError as e:
            return f"ValueError: {e}"
        return f"200: {len(vectors)} unit vector(s) of {len(vectors[0])} floats"

    # the CLI -------------------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        proc = subprocess.run(
            [*CLI, *args, "--index", str(self.cli_index)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        if "Traceback" in proc.stderr:
            return f"TRACEBACK: {proc.stderr}"
        if proc.returncode == 0:
            hits = json.loads(proc.stdout)["hits"] if "--json" in args else []
            return f"exit 0: {len(hits)} hits"
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1]}"

    def cli_index_run(self, name: str) -> str:
        """The outcome for one file of a single `clipsearch index` run over every image input."""
        if not self._cli_run:
            self._cli_run.update(run_cli_index(self.work, self.cli_index))
        return self._cli_run[name]


def outcome(status: int, body: bytes) -> str:
    """`STATUS code: message` for an error, `200: N hits` for an answer."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status}: {body[:200]!r}"
    if isinstance(payload, dict) and "error" in payload:
        return f"{status} {payload['error']['code']}: {payload['error']['message']}"
    if isinstance(payload, dict) and "hits" in payload:
        return f"{status}: {len(payload['hits'])} hits"
    return f"{status}: {json.dumps(payload)[:200]}"


def notification(key: str, size: int, event: str = "ObjectCreated:Put", bucket: str = BUCKET) -> str:
    """An S3 event notification as S3 sends it: the key URL-encoded, '+' for spaces."""
    return json.dumps(
        {
            "Records": [
                {
                    "eventVersion": "2.1",
                    "eventSource": "aws:s3",
                    "awsRegion": "us-east-1",
                    "eventName": event,
                    "eventTime": "2026-01-01T00:00:00.000Z",
                    "s3": {
                        "s3SchemaVersion": "1.0",
                        "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                        "object": {"key": quote_plus(key, safe="/"), "size": size, "sequencer": "0A"},
                    },
                }
            ]
        }
    )


def cli_rows(index_dir: Path) -> tuple[int, int]:
    if not (index_dir / DB_NAME).exists():
        return (0, 0)
    db = sqlite3.connect(index_dir / DB_NAME)
    try:
        return db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM images").fetchone()
    finally:
        db.close()


def run_cli_index(work: Path, index_dir: Path) -> dict[str, str]:
    """Run `clipsearch index` once over all image inputs (each named on the command line, plus the folder
    with two good pictures); returns file name -> outcome."""
    folder = work / "cli-files"
    folder.mkdir(exist_ok=True)
    for item in IMAGES:
        (folder / item.name).write_bytes(item.data())
    before = cli_rows(index_dir)[0]
    proc = subprocess.run(
        [*CLI, "index", "--model", "demo", *(str(folder / i.name) for i in IMAGES), "--index", str(index_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    results = {}
    for item in IMAGES:
        prefix = f"warning: skipped {(folder / item.name).resolve()}: "
        reasons = [line[len(prefix) :] for line in proc.stderr.splitlines() if line.startswith(prefix)]
        results[item.name] = f"skipped: {reasons[0]}" if reasons else "indexed"
    added = cli_rows(index_dir)[0] - before
    results["_added"] = str(added)
    return results


@contextmanager
def harness() -> Iterator[Harness]:
    """Set every surface up, each with something already indexed."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipsearch-bad-")))
        encoder = FakeEncoder()
        # The REST server and the search Lambda share one index holding three pictures.
        rest_index = EmbeddedIndex(work / "rest-index", model=encoder.model, dim=encoder.dim)
        pics = work / "pictures"
        pics.mkdir()
        docs = []
        for n, colour in enumerate([(220, 30, 30), (30, 160, 60), (30, 60, 220)]):
            path = pics / f"p{n}.png"
            path.write_bytes(picture(colour))
            from clipsearch.images import load_file

            docs.append(
                Document(key=str(path), vector=encoder.encode_images([load_file(path).image])[0], title=f"p{n}")
            )
        rest_index.upsert(docs)
        server_log: list[str] = []
        server = stack.enter_context(make_server(rest_index, encoder, port=0, log=server_log.append).start())

        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
            os.environ.pop(name, None)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        stack.enter_context(mock_aws())
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        config = AwsConfig(
            text_endpoint="e",
            image_endpoint="e",
            opensearch_url="http://127.0.0.1:1",
            opensearch_auth="none",
            index="bad-inputs",
            model=encoder.model,
            dim=encoder.dim,
            bucket=BUCKET,
        )
        search_app = build_search_app(config, encoder=encoder, index=rest_index, s3=s3)

        ingest_index = EmbeddedIndex(work / "ingest-index", model=encoder.model, dim=encoder.dim)
        ingest_log: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                ingest_log.append(record.getMessage())

        handler = Collect(level=logging.INFO)
        logging.getLogger("clipsearch").addHandler(handler)
        stack.callback(logging.getLogger("clipsearch").removeHandler, handler)
        ingestor = Ingestor(encoder=encoder, index=ingest_index, s3=s3)

        cli_index = work / "cli-index"
        h = Harness(work, server, server_log, rest_index, search_app, ingestor, ingest_index, s3, ingest_log, cli_index)
        assert h.put_and_ingest("existing/already indexed.png", picture((200, 200, 30))).startswith("indexed")
        yield h


# -- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    surface: str
    input: str
    expected: str  # the observed outcome must start with this
    run: Callable[[Harness], str]
    changes_index: bool = False

    @property
    def id(self) -> str:
        return f"{self.surface}: {self.input}"


Runner = Callable[["Harness"], str]


def rest_post(body: bytes, ctype: str = "application/json") -> Runner:
    return lambda h: h.http("POST", "/search", body, ctype)


def rest_get(target: str) -> Runner:
    return lambda h: h.http("GET", target)


def api_post(body: bytes, ctype: str) -> Runner:
    return lambda h: h.api("POST", "/search", body, ctype)


def api_get(query: dict[str, str]) -> Runner:
    return lambda h: h.api("GET", "/search", None, query=query)


def sagemaker(body: bytes, ctype: str) -> Runner:
    return lambda h: h.sagemaker(body, ctype)


def cli(*args: str) -> Runner:
    return lambda h: h.cli(*args)


def put(key: str, data: bytes, ctype: str = "") -> Runner:
    return lambda h: h.put_and_ingest(key, data, ctype)


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append

    # Images, through each surface.
    for item in IMAGES:
        ok = item.accepted
        big = item.name == BIG

        def by_rest(h: Harness, item: ImageInput = item) -> str:
            body = json.dumps({"image": base64.b64encode(item.data()).decode()}).encode()
            return h.http("POST", "/search", body, "application/json")

        def by_lambda_search(h: Harness, item: ImageInput = item) -> str:
            return h.api("POST", "/search", item.data(), "image/png", binary=True)

        def by_ingest(h: Harness, item: ImageInput = item) -> str:
            return h.put_and_ingest(f"images/{item.name}", item.data())

        def by_sagemaker(h: Harness, item: ImageInput = item) -> str:
            return h.sagemaker(item.data(), "application/x-image")

        def by_cli(h: Harness, item: ImageInput = item) -> str:
            return h.cli_index_run(item.name)

        add(Case(REST, item.label, "413" if big else ("200" if ok else "400 bad_image"), by_rest))
        add(Case(LAMBDA_SEARCH, item.label, "413" if big else ("200" if ok else "400 bad_image"), by_lambda_search))
        add(Case(LAMBDA_INGEST, item.label, "indexed" if ok else "skipped", by_ingest, changes_index=ok))
        add(Case(SAGEMAKER, item.label, "200" if ok else "ValueError", by_sagemaker))
        add(Case(CLI_SURFACE, f"`index` on a {item.label}", "indexed" if ok else "skipped", by_cli, changes_index=True))

    # Query texts.
    for label, text in TEXTS.items():
        empty = label in EMPTY_TEXTS
        add(Case(REST, label, "400" if empty else "200", rest_post(json.dumps({"text": text}).encode())))
        add(Case(LAMBDA_SEARCH, f"{label} (GET ?q=)", "400" if empty else "200", api_get({"q": text})))
        # The handler encodes what it is given (the search layer refuses empty text before it is called).
        add(Case(SAGEMAKER, label, "200", sagemaker(json.dumps({"inputs": [text]}).encode(), "application/json")))
        add(Case(CLI_SURFACE, f"`search` {label}", "exit 2" if empty else "exit 0", cli("search", text, "--json")))

    # Request fields and bodies, on both search hosts.
    for label, (body, status) in JSON_REQUESTS.items():
        add(Case(REST, label, status, rest_post(body)))
        add(Case(LAMBDA_SEARCH, label, status, api_post(body, "application/json")))
    for label, (ctype, body) in CONTENT_TYPES.items():
        add(Case(REST, label, "415", rest_post(body, ctype)))
        add(Case(LAMBDA_SEARCH, label, "415", api_post(body, ctype)))
    for label, target in QUERY_STRINGS.items():
        add(Case(REST, label, "400", rest_get(target)))
    add(Case(LAMBDA_SEARCH, "isBase64Encoded body that is not base64", "400", _bad_base64_event))
    add(
        Case(
            REST,
            "image path traversal, double-encoded",
            "404",
            lambda h: h.http("GET", "/images/%252e%252e%252fetc%252fpasswd"),
        )
    )
    add(
        Case(
            SAGEMAKER,
            "JSON images entry with bad base64",
            "ValueError",
            lambda h: h.sagemaker(b'{"images": ["not base64!!"]}', "application/json"),
        )
    )
    add(
        Case(
            SAGEMAKER,
            "JSON with both inputs and images",
            "ValueError",
            lambda h: h.sagemaker(b'{"inputs": ["a"], "images": []}', "application/json"),
        )
    )
    add(Case(SAGEMAKER, "text/csv content type", "ValueError", lambda h: h.sagemaker(b"a,b", "text/csv")))
    add(
        Case(
            SAGEMAKER,
            "JSON nested 100000 deep",
            "ValueError",
            lambda h: h.sagemaker(b"[" * DEEP + b"]" * DEEP, "application/json"),
        )
    )

    # CLI options.
    add(Case(CLI_SURFACE, "`search -k 0`", "exit 2", lambda h: h.cli("search", "red", "-k", "0")))
    add(Case(CLI_SURFACE, "`search --min-score nan`", "exit 2", lambda h: h.cli("search", "red", "--min-score", "nan")))
    add(Case(CLI_SURFACE, "`search --from -1`", "exit 2", lambda h: h.cli("search", "red", "--from", "-1")))
    add(
        Case(
            CLI_SURFACE,
            "`search --image` a zero-byte file",
            "exit 2",
            lambda h: h.cli("search", "--image", str(_file(h, "empty.jpg", b""))),
        )
    )

    # S3 keys and notifications.
    for label, key in S3_KEYS.items():
        add(
            Case(
                LAMBDA_INGEST, label, "indexed, key kept exactly", put(key, picture((90, 90, 200))), changes_index=True
            )
        )
    add(
        Case(
            LAMBDA_INGEST,
            "object deleted before its event is processed",
            "skipped: object no longer exists",
            lambda h: h.ingest(notification("gone/deleted.png", 1234), "gone/deleted.png"),
        )
    )
    add(
        Case(
            LAMBDA_INGEST,
            "folder marker key (ends in /)",
            "skipped: a folder marker",
            lambda h: h.put_and_ingest("folder/", b""),
        )
    )
    add(
        Case(
            LAMBDA_INGEST,
            "key without extension, text/plain object",
            "skipped: content type",
            lambda h: h.put_and_ingest("README", b"hello", "text/plain"),
        )
    )
    add(
        Case(
            LAMBDA_INGEST,
            "s3:TestEvent",
            "no change",
            lambda h: h.ingest(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})),
        )
    )
    add(
        Case(
            LAMBDA_INGEST,
            "SQS body that is not JSON",
            "failed, retried by SQS then dead-lettered",
            lambda h: h.ingest("definitely not an S3 notification"),
        )
    )
    add(
        Case(
            LAMBDA_INGEST,
            "JSON body without Records",
            "failed, retried by SQS then dead-lettered",
            lambda h: h.ingest('{"hello": "world"}'),
        )
    )
    return cases


def _bad_base64_event(h: Harness) -> str:
    event_body = "%%%not base64%%%"
    event = json.loads((ROOT / "events" / "api" / "search-binary.json").read_text())
    event["body"], event["isBase64Encoded"] = event_body, True
    response = h.search_app.resolve(event, LambdaContext())
    return outcome(response["statusCode"], response["body"].encode())


def _file(h: Harness, name: str, data: bytes) -> Path:
    path = h.work / name
    path.write_bytes(data)
    return path


CASES = _cases()


def run_case(h: Harness, case: Case) -> tuple[str, bool]:
    """(observed outcome, whether the indexes were left as they were)."""
    before = h.state()
    logged = len(h.server_log)
    observed = case.run(h)
    unchanged = h.state() == before
    if any("Traceback" in line or "unexpected" in line for line in h.server_log[logged:]):
        observed = "TRACEBACK in the server log: " + observed
    return observed, unchanged


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    saved = dict(os.environ)
    try:
        with harness() as ready:
            yield ready
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_given_the_catalogue_then_it_holds_at_least_40_distinct_cases_on_every_surface() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert {c.surface for c in CASES} == {REST, LAMBDA_SEARCH, LAMBDA_INGEST, SAGEMAKER, CLI_SURFACE}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_given_a_bad_or_odd_input_when_sent_then_a_clear_answer_and_the_index_is_untouched(
    h: Harness, case: Case
) -> None:
    observed, unchanged = run_case(h, case)

    assert observed.startswith(case.expected), observed
    assert "Traceback" not in observed and not observed.startswith("500")
    if not case.changes_index:
        assert unchanged, f"{case.id} changed what is indexed"


def test_given_every_image_input_when_the_cli_indexes_them_then_exactly_the_accepted_ones_are_added(h: Harness) -> None:
    h.cli_index_run(IMAGES[0].name)

    assert int(h._cli_run["_added"]) == sum(i.accepted for i in IMAGES)
    assert cli_rows(h.cli_index)[0] == cli_rows(h.cli_index)[1]


def test_given_an_animated_gif_when_decoded_then_the_first_frame_is_used() -> None:
    from clipsearch.images import load_bytes

    img = load_bytes(animated_gif())

    r, g, b = img.convert("RGB").getpixel((img.width // 2, img.height // 2))  # type: ignore[misc]
    assert r > 150 and g < 100 and b < 100  # red: the first of red, green, blue


def test_given_a_40_mb_photo_when_loaded_then_it_is_downscaled_to_the_transport_size() -> None:
    from clipsearch.images import MAX_SIDE, load_bytes

    data = _forty_mb()

    assert len(data) > 39 * 1024 * 1024
    assert min(load_bytes(data).size) == MAX_SIDE


def test_given_an_odd_key_when_url_encoded_by_s3_then_the_notification_round_trips() -> None:
    from clipsearch.aws.ingest import parse_notification

    for key in S3_KEYS.values():
        (event,) = parse_notification(notification(key, 1))
        assert event.key == key
