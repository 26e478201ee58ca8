"""Fault-injected ingest: S3 ObjectCreated events through the real ingest Lambda, with everything failing a bit.

- S3 and SQS are a moto server; the bucket's notifications put the S3 events on a queue with a redrive
  policy (maxReceiveCount, as template.yaml's IngestMaxReceiveCount) to a dead-letter queue.
- A driver honours SQS semantics: batches of 10 to functions/ingest/app.py's handler, successes deleted,
  the batchItemFailures made visible again after a (shortened) visibility timeout.
- The SageMaker runtime stand-in (tests/support/sagemaker_endpoint.py's, running model_code with the
  demo model) throttles 10% of calls, answers 5xx / model errors on 2% and answers slowly on 1%.
- A fault proxy in front of the real OpenSearch node answers 429 to 5% of _bulk calls and fails the
  items of 2% more (item status 429, nothing written).
- Poison objects (corrupt .jpg), s3:TestEvent messages, objects deleted before their event is handled,
  and messages that are not S3 notifications at all (the only ones that belong in the DLQ).
- With --restart-node, the OpenSearch node is stopped and started again once, mid-run
  (scripts/opensearch-local; other users of the node see it go away for that time).

Outcome checked: one document per valid image, none lost, none duplicated, no deleted or poison object
indexed, poison skipped with a log line and an ObjectsSkipped metric, only the junk messages dead-lettered.

    CLIPSEARCH_OPENSEARCH_URL=$(scripts/opensearch-local url) python bench/fault_ingest.py --images 1000 --restart-node
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from common import moto_aws  # noqa: E402
from support.fakes import LambdaContext, load_function  # noqa: E402
from support.sagemaker_endpoint import InvokeEndpointServer, _InvokeHandler, running_endpoint  # noqa: E402
from support.sqs import lambda_event  # noqa: E402

BUCKET = "clipsearch-fault-ingest"
ENDPOINT = "clipsearch-demo"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


@dataclass
class Faults:
    """Probabilities per call, and sizes of the bad inputs."""

    throttle: float = 0.10
    server_error: float = 0.02
    slow: float = 0.01
    slow_s: float = 1.5
    bulk_429: float = 0.05
    bulk_item_fail: float = 0.02
    poison: int = 10
    test_events: int = 5
    deleted: int = 10
    junk_messages: int = 3
    max_receive_count: int = 5
    retry_after_s: float = 3.0  # the visibility timeout a failed message waits, shortened
    seed: int = 11


# -- the SageMaker runtime stand-in, with faults -------------------------------------------------


class FaultyEndpoint(InvokeEndpointServer):
    """tests/support's InvokeEndpoint server, throttling / failing / stalling a share of calls."""

    def __init__(self, model_dir: Path, faults: Faults) -> None:
        super().__init__(model_dir)
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.injected: Counter[str] = Counter()
        self.RequestHandlerClass = _FaultyInvokeHandler

    def draw(self) -> str:
        with self.lock:
            r = self.rng.random()
            f = self.faults
            kind = (
                "throttle"
                if r < f.throttle
                else "5xx"
                if r < f.throttle + f.server_error
                else "slow"
                if r < f.throttle + f.server_error + f.slow
                else ""
            )
            if kind:
                self.injected[kind] += 1
            return kind


class _FaultyInvokeHandler(_InvokeHandler):
    server: FaultyEndpoint

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        kind = self.server.draw()
        if kind == "slow":
            time.sleep(self.server.faults.slow_s)
        elif kind:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if kind == "throttle":
                return self._send(400, {"message": "Rate exceeded"}, "ThrottlingException")
            if self.server.rng.random() < 0.5:
                return self._send(
                    424,
                    {
                        "message": "Received server error (500) from model",
                        "OriginalStatusCode": 500,
                        "ErrorCode": "SERVER_ERROR_FROM_MODEL",
                    },
                    "ModelError",
                )
            return self._send(503, {"message": "Service unavailable"}, "ServiceUnavailable")
        return super().do_POST()


@contextmanager
def endpoint(work: Path, faults: Faults) -> Iterator[FaultyEndpoint]:
    with running_endpoint(work, make=lambda model_dir, _env: FaultyEndpoint(model_dir, faults)) as server:
        assert isinstance(server, FaultyEndpoint)
        yield server


# -- the OpenSearch fault proxy ------------------------------------------------------------------


class FaultProxy(ThreadingHTTPServer):
    """Forwards to the real node; 429s some _bulk calls and fails the items of others."""

    daemon_threads = True

    def __init__(self, upstream: str, faults: Faults) -> None:
        self.upstream = urlsplit(upstream)
        self.faults = faults
        self.rng = random.Random(faults.seed + 1)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def draw(self) -> str:
        with self.lock:
            r = self.rng.random()
            kind = (
                "429"
                if r < self.faults.bulk_429
                else "items"
                if r < self.faults.bulk_429 + self.faults.bulk_item_fail
                else ""
            )
            if kind:
                self.injected[kind] += 1
            return kind


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "POST" and self.path.split("?")[0].endswith("/_bulk"):
            kind = self.server.draw()
            if kind == "429":
                return self._reply(
                    429,
                    {
                        "error": {"type": "es_rejected_execution_exception", "reason": "injected: bulk queue full"},
                        "status": 429,
                    },
                )
            if kind == "items":
                items = []
                for line in body.decode().splitlines()[::2]:
                    ((op, meta),) = json.loads(line).items()
                    items.append(
                        {
                            op: {
                                "_index": meta.get("_index"),
                                "_id": meta.get("_id"),
                                "status": 429,
                                "error": {
                                    "type": "es_rejected_execution_exception",
                                    "reason": "injected: item rejected",
                                },
                            }
                        }
                    )
                return self._reply(200, {"took": 1, "errors": True, "items": items})
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except OSError as e:  # the node is down (restart): what a load balancer would answer
            return self._reply(503, {"error": {"type": "node_unavailable", "reason": str(e)}, "status": 503})
        finally:
            conn.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in _HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    valid: int = 0
    indexed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    unexpected: list[str] = field(default_factory=list)
    poison_logged: int = 0
    skipped_metric: int = 0
    indexed_metric: int = 0
    dlq: list[str] = field(default_factory=list)
    junk: list[str] = field(default_factory=list)
    batches: int = 0
    records: int = 0
    record_failures: int = 0
    endpoint_faults: Counter[str] = field(default_factory=Counter)
    bulk_faults: Counter[str] = field(default_factory=Counter)
    restarted: bool = False
    seconds: float = 0.0

    def ok(self) -> bool:
        return (
            self.indexed == self.valid
            and not self.lost
            and not self.duplicated
            and not self.unexpected
            and sorted(self.dlq) == sorted(self.junk)
        )

    def table(self) -> str:
        rows = [
            ("valid images uploaded", self.valid),
            ("documents in the index", self.indexed),
            ("lost", len(self.lost)),
            ("duplicated", self.duplicated),
            ("indexed but should not be (poison, deleted)", len(self.unexpected)),
            ("poison 'skipped' log lines", self.poison_logged),
            ("ObjectsSkipped metric", self.skipped_metric),
            ("ImagesIndexed metric (incl. re-indexing after retries)", self.indexed_metric),
            ("messages in the DLQ", len(self.dlq)),
            ("of which junk (not S3 notifications)", len(set(self.dlq) & set(self.junk))),
            ("batches delivered", self.batches),
            ("records handled (incl. redeliveries)", self.records),
            ("records failed and redelivered", self.record_failures),
            ("endpoint faults injected", dict(self.endpoint_faults)),
            ("OpenSearch _bulk faults injected", dict(self.bulk_faults)),
            ("node restarted mid-run", "yes" if self.restarted else "no"),
            ("wall time (s)", f"{self.seconds:.1f}"),
        ]
        return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


class MetricCounter:
    """Stands in for the handler's Powertools Metrics on the Ingestor and counts what it is told."""

    def __init__(self, real: Any) -> None:
        self.real, self.counts = real, Counter[str]()

    def add_metric(self, name: str, unit: Any, value: float) -> None:
        self.counts[name] += int(value)
        self.real.add_metric(name=name, unit=unit, value=value)


def _png(n: int) -> bytes:
    from PIL import Image

    rng = random.Random(n)
    img = Image.new("RGB", (48, 48), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    img.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (12, 12, 36, 36))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _restart_node(log: list[str]) -> None:
    script = str(ROOT / "scripts" / "opensearch-local")
    started = time.monotonic()
    subprocess.run([script, "stop"], check=True, capture_output=True)
    log.append(f"node stopped at +{time.monotonic() - started:.1f}s")
    time.sleep(3)
    subprocess.run([script, "start"], check=True, capture_output=True)
    log.append(f"node healthy again after {time.monotonic() - started:.1f}s")


def _restore_env(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


def run(
    images: int, opensearch_url: str, faults: Faults | None = None, restart_node: bool = False, quiet: bool = True
) -> Report:
    """Upload `images` valid pictures plus the bad inputs, drain the queue through the handler, check."""
    import boto3

    from clipsearch.errors import NotFound
    from clipsearch.index.base import doc_id
    from clipsearch.index.opensearch import OpenSearchIndex

    faults = faults or Faults()
    report = Report(valid=images)
    index_name = f"clipsearch-fault-ingest-{uuid.uuid4().hex[:8]}"
    saved_env = dict(os.environ)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipsearch-fault-")))
        stack.callback(_restore_env, saved_env)
        runtime = stack.enter_context(endpoint(work, faults))
        proxy = FaultProxy(opensearch_url, faults)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        stack.callback(proxy.server_close)
        stack.callback(proxy.shutdown)
        moto_aws(stack, runtime.url)
        os.environ.update(
            {
                "AWS_MAX_ATTEMPTS": "1",  # a throttle reaches the handler, and SQS redelivers the record
                "CLIPSEARCH_ENDPOINT_NAME": ENDPOINT,
                "CLIPSEARCH_OPENSEARCH_URL": proxy.url,
                "CLIPSEARCH_OPENSEARCH_AUTH": "none",
                "CLIPSEARCH_INDEX": index_name,
                "CLIPSEARCH_MODEL": "demo",
                "CLIPSEARCH_DIM": "128",
                "CLIPSEARCH_BUCKET": BUCKET,
                "POWERTOOLS_SERVICE_NAME": "clipsearch",
                "POWERTOOLS_METRICS_NAMESPACE": "clipsearch-fault",
                "POWERTOOLS_TRACE_DISABLED": "true",
            }
        )
        if quiet:  # the metrics are counted by MetricCounter; their EMF lines would bury the report
            os.environ.update(POWERTOOLS_LOG_LEVEL="WARNING", POWERTOOLS_METRICS_DISABLED="true")
        s3, sqs = boto3.client("s3"), boto3.client("sqs")
        run_id = uuid.uuid4().hex[:8]
        dlq_url = sqs.create_queue(QueueName=f"fault-dlq-{run_id}")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        queue_url = sqs.create_queue(
            QueueName=f"fault-{run_id}",
            Attributes={
                "VisibilityTimeout": "1080",
                "RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": faults.max_receive_count}
                ),
            },
        )["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET,
            NotificationConfiguration={
                "QueueConfigurations": [{"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]
            },
        )

        ingest = load_function("ingest")
        metrics = MetricCounter(ingest.metrics)
        ingest.ingestor.metrics = metrics
        skip_lines: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if message.startswith("skipped "):
                    skip_lines.append(message)

        collector = Collect(level=logging.INFO)
        logging.getLogger("clipsearch").addHandler(collector)
        stack.callback(logging.getLogger("clipsearch").removeHandler, collector)

        # The inputs: valid pictures, poison, deleted-before-processing, test events, junk messages.
        valid = [f"photos/{n // 100:02d}/img {n:05d}.png" for n in range(images)]
        poison = [f"poison/bad {n}.jpg" for n in range(faults.poison)]
        deleted = [f"deleted/gone {n}.png" for n in range(faults.deleted)]
        for key in valid:
            s3.put_object(Bucket=BUCKET, Key=key, Body=_png(zlib.crc32(key.encode())))
        for n, key in enumerate(poison):
            s3.put_object(Bucket=BUCKET, Key=key, Body=(b"\xff\xd8\xff\xe0 not really a jpeg " * (n + 1)))
        for key in deleted:
            s3.put_object(Bucket=BUCKET, Key=key, Body=_png(7))
            s3.delete_object(Bucket=BUCKET, Key=key)
        for _ in range(faults.test_events):
            sqs.send_message(
                QueueUrl=queue_url,
                MessageBody=json.dumps(
                    {
                        "Service": "Amazon S3",
                        "Event": "s3:TestEvent",
                        "Time": "2026-01-01T00:00:00Z",
                        "Bucket": BUCKET,
                        "RequestId": uuid.uuid4().hex,
                        "HostId": "x",
                    }
                ),
            )
        report.junk = [f"junk message {n}: not an S3 notification" for n in range(faults.junk_messages)]
        for body in report.junk:
            sqs.send_message(QueueUrl=queue_url, MessageBody=body)

        # The driver: SQS semantics, as Lambda's event source mapping applies them.
        started = time.monotonic()
        restart_log: list[str] = []
        restarter: threading.Thread | None = None
        waiting: list[tuple[float, str]] = []  # (visible again at, receipt handle)
        idle_polls = 0
        handled_target = images // 2
        while idle_polls < 3:
            now = time.monotonic()
            for due, receipt in [w for w in waiting if w[0] <= now]:
                waiting.remove((due, receipt))
                try:
                    sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=0)
                except sqs.exceptions.ClientError:
                    pass  # already moved on
            messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]).get(
                "Messages", []
            )
            if not messages:
                idle_polls = idle_polls + 1 if not waiting else 0
                time.sleep(0.2 if not waiting else min(1.0, max(0.05, min(w[0] for w in waiting) - now)))
                continue
            idle_polls = 0
            event = lambda_event(messages, queue_arn)
            response = ingest.handler(event, LambdaContext())
            failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
            report.batches += 1
            report.records += len(messages)
            report.record_failures += len(failed)
            for m in messages:
                if m["MessageId"] in failed:
                    waiting.append((time.monotonic() + faults.retry_after_s, m["ReceiptHandle"]))
                else:
                    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
            if restart_node and restarter is None and report.records - report.record_failures >= handled_target:
                restarter = threading.Thread(target=_restart_node, args=(restart_log,), daemon=True)
                restarter.start()
            if restarter is not None and restarter.is_alive():
                idle_polls = 0  # keep going until the node is back
        if restarter is not None:
            restarter.join()
            report.restarted = True
        report.seconds = time.monotonic() - started

        # The outcome, read from the real node (not through the proxy).
        index = OpenSearchIndex(name=index_name, url=opensearch_url, auth="none")
        index.refresh()
        report.indexed = index.count()
        keys = {doc_id(BUCKET, k): k for k in valid}
        report.lost = [k for i, k in keys.items() if index.get(i) is None]
        stored = index.fingerprints()
        report.duplicated = max(0, report.indexed - len(stored))
        report.unexpected = [k for k in poison + deleted if doc_id(BUCKET, k) in stored]
        report.poison_logged = sum(any(f"/{k}:" in line for line in skip_lines) for k in poison)
        report.skipped_metric = metrics.counts["ObjectsSkipped"]
        report.indexed_metric = metrics.counts["ImagesIndexed"]
        dead: list[str] = []
        while batch := sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10).get("Messages", []):
            for m in batch:
                dead.append(m["Body"])
                sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=m["ReceiptHandle"])
        report.dlq = dead
        report.endpoint_faults = runtime.injected
        report.bulk_faults = proxy.injected
        for line in restart_log:
            print(line, file=sys.stderr)
        try:
            index.drop()
        except NotFound:
            pass
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--restart-node", action="store_true", help="stop and start the OpenSearch node mid-run")
    parser.add_argument("--opensearch-url", default=os.environ.get("CLIPSEARCH_OPENSEARCH_URL"))
    args = parser.parse_args(argv)
    if not args.opensearch_url:
        parser.error("needs --opensearch-url or CLIPSEARCH_OPENSEARCH_URL (scripts/opensearch-local url)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    report = run(args.images, args.opensearch_url, restart_node=args.restart_node)
    print(f"machine: {machine()}\n")
    print(report.table())
    if report.lost:
        print(f"\nlost: {report.lost[:10]}")
    print(
        f"\n{'OK' if report.ok() else 'FAILED'}: one document per valid image, 0 lost, 0 duplicated, "
        "only junk messages dead-lettered"
    )
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
