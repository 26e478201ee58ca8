"""The AWS pipeline end to end, on this machine: moto S3/SQS, a local SageMaker runtime, real OpenSearch.

- S3 and SQS are a moto server; the bucket's notifications really put S3 events on the queue.
- InvokeEndpoint is answered by a small HTTP server on the runtime's route, running model_code
  from the model.tar.gz that `clipsearch package-model --model demo` writes, so boto3's real
  client, its signing and serialization are exercised.
- The index is the real OpenSearch node (CLIPSEARCH_OPENSEARCH_URL).
- The Lambda modules under functions/ are loaded as Lambda loads them, configured by environment.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image
from support import camera
from support.fakes import LambdaContext, load_function
from support.sagemaker_endpoint import InvokeEndpointServer
from support.sqs import lambda_event

from clipsearch.aws import config as aws_config
from clipsearch.aws import ingest as aws_ingest
from clipsearch.aws import search as aws_search
from clipsearch.demo import shapes
from clipsearch.errors import NotFound
from clipsearch.images import load_file
from clipsearch.index.base import doc_id
from clipsearch.index.opensearch import OpenSearchIndex

pytestmark = pytest.mark.opensearch

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "clipsearch-images-e2e"
ENDPOINT = "clipsearch-demo"
MAX_RECEIVE_COUNT = 2


# -- the stack -------------------------------------------------------------------------------------


@dataclass
class Stack:
    s3: Any
    sqs: Any
    queue_url: str
    dlq_url: str
    ingest: Any
    search: Any
    index_name: str
    opensearch_url: str

    def index(self) -> OpenSearchIndex:
        """A reader of the index the functions write, refreshed so that searches see every write."""
        index = OpenSearchIndex(name=self.index_name, url=self.opensearch_url, auth="none")
        index.refresh()
        return index

    def deliver(self, context: LambdaContext | None = None) -> tuple[list[str], list[str]]:
        """One SQS poll handed to the ingest function, as Lambda's event source mapping does it.

        Successful messages are deleted; failed ones become visible again at once (the visibility
        timeout, shortened). Returns (all message ids, failed message ids).
        """
        messages = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
        ).get("Messages", [])
        if not messages:
            return [], []
        event = lambda_event(messages)
        response = self.ingest.handler(event, context or LambdaContext("clipsearch-e2e"))
        failed = [f["itemIdentifier"] for f in response["batchItemFailures"]]
        for m in messages:
            if m["MessageId"] in failed:
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
                )
            else:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=m["ReceiptHandle"])
        return [m["MessageId"] for m in messages], failed

    def deliver_all(self) -> list[str]:
        """Poll until the queue is empty; returns the ids that failed along the way."""
        failures: list[str] = []
        for _ in range(20):
            seen, failed = self.deliver()
            failures += failed
            if not seen:
                return failures
        raise AssertionError("the queue did not drain")

    def api(
        self, event_file: str, body: dict[str, Any] | None = None, context: LambdaContext | None = None
    ) -> tuple[int, dict[str, Any]]:
        event = json.loads((ROOT / "events" / "api" / event_file).read_text())
        if body is not None:
            event["body"] = json.dumps(body)
        response = self.search.handler(event, context or LambdaContext("clipsearch-e2e"))
        return response["statusCode"], json.loads(response["body"])


@pytest.fixture
def stack(
    moto_url: str, endpoint: InvokeEndpointServer, opensearch_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    index_name = f"clipsearch-aws-e2e-{uuid.uuid4().hex[:8]}"
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",  # pragma: allowlist secret
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # The standard per-service endpoint variables: the functions' clients have no endpoint_url.
        "AWS_ENDPOINT_URL_S3": moto_url,
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint.url,
        # One attempt: a throttle reaches our code instead of botocore's retry loop.
        "AWS_MAX_ATTEMPTS": "1",
        "CLIPSEARCH_ENDPOINT_NAME": ENDPOINT,
        "CLIPSEARCH_OPENSEARCH_URL": opensearch_url,
        # SigV4 as on AWS: the local node (security plugin off) accepts the signed requests.
        "CLIPSEARCH_OPENSEARCH_AUTH": "sigv4",
        "CLIPSEARCH_INDEX": index_name,
        "CLIPSEARCH_MODEL": "demo",
        "CLIPSEARCH_DIM": "128",
        "CLIPSEARCH_BUCKET": BUCKET,
        "POWERTOOLS_SERVICE_NAME": "clipsearch",
        "POWERTOOLS_METRICS_NAMESPACE": "clipsearch-e2e",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    run = uuid.uuid4().hex[:8]
    dlq_url = sqs.create_queue(QueueName=f"ingest-dlq-{run}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(
        QueueName=f"ingest-{run}",
        Attributes={
            "VisibilityTimeout": "1080",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT}),
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
    stack = Stack(
        s3, sqs, queue_url, dlq_url, load_function("ingest"), load_function("search"), index_name, opensearch_url
    )
    # Configuring notifications sends an s3:TestEvent: it must be consumed without failing.
    assert stack.deliver_all() == []
    yield stack
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={})
    s3.delete_bucket(Bucket=BUCKET)
    try:
        OpenSearchIndex(name=index_name, url=opensearch_url, auth="none").drop()
    except NotFound:
        pass  # nothing was ever indexed (the poison-message test)


def picture(colour: str, shape: str, seed: int, fmt: str = "PNG") -> bytes:
    img = shapes.render(colour, shape, "large", rng=np.random.default_rng(seed), image_size=224)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=92)
    return buf.getvalue()


def fetch(url: str) -> bytes:
    """GET a presigned URL from the moto server on loopback, directly (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return bytes(response.read())


# -- the pipeline ----------------------------------------------------------------------------------


def test_given_picture_put_into_s3_when_pipeline_runs_then_search_finds_it_and_delete_removes_it(
    stack: Stack, endpoint: InvokeEndpointServer, demo_encoder: Any, tmp_path: Path
) -> None:
    red_key = "catalogue/Red circle – été+1 (copy).jpg"
    red = picture("red", "circle", seed=1, fmt="JPEG")
    stack.s3.put_object(
        Bucket=BUCKET,
        Key=red_key,
        Body=red,
        ContentType="image/jpeg",
        Metadata={"title": "A red circle", "description": "the one we look for"},
    )
    for n, (colour, shape) in enumerate(
        [("blue", "square"), ("green", "triangle"), ("yellow", "star"), ("purple", "square")]
    ):
        stack.s3.put_object(
            Bucket=BUCKET, Key=f"catalogue/{colour} {shape}.png", Body=picture(colour, shape, seed=10 + n)
        )

    before = len(endpoint.calls)
    assert stack.deliver_all() == []

    index = stack.index()
    assert index.count() == 5
    doc = index.get(doc_id(BUCKET, red_key))
    assert doc is not None and (doc.key, doc.title, doc.bucket) == (red_key, "A red circle", BUCKET)
    # The same picture through `clipsearch index` (local file -> LocalEncoder) gives the same vector.
    local_file = tmp_path / "red.jpg"
    local_file.write_bytes(red)
    local = demo_encoder.encode_images([load_file(local_file).image])[0]
    assert float(np.max(np.abs(doc.vector - local))) <= 1e-4
    # The five pictures travelled in one request (PNG inside its JSON: lossless, as the vector shows).
    assert endpoint.calls[before:] == [(ENDPOINT, "application/json")] and endpoint.images[before:] == [5]

    status, body = stack.api("search-text.json")
    assert status == 200 and body["query"]["text"] == "a red circle"
    top = body["hits"][0]
    assert (top["key"], top["title"]) == (red_key, "A red circle")
    assert fetch(top["url"]) == red

    stack.s3.delete_object(Bucket=BUCKET, Key=red_key)
    assert stack.deliver_all() == []

    index = stack.index()
    assert index.get(doc_id(BUCKET, red_key)) is None and index.count() == 4
    status, body = stack.api("search-text.json")
    assert status == 200 and red_key not in [h["key"] for h in body["hits"]]


def test_given_raw_image_query_when_searched_then_the_closest_picture_comes_first(stack: Stack) -> None:
    for n, (colour, shape) in enumerate([("red", "circle"), ("blue", "star"), ("green", "square")]):
        stack.s3.put_object(Bucket=BUCKET, Key=f"q/{colour} {shape}.png", Body=picture(colour, shape, seed=30 + n))
    assert stack.deliver_all() == []
    stack.index()

    status, body = stack.api("search-binary.json")  # a 64 px red circle, sent as image/png

    assert status == 200 and body["hits"][0]["key"] == "q/red circle.png"


def test_given_camera_raw_put_into_s3_when_pipeline_runs_then_its_preview_is_found_and_one_without_is_skipped(
    stack: Stack, endpoint: InvokeEndpointServer, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str | None] = []

    def note_format(img: Image.Image) -> bool:
        seen.append(img.format)  # every picture the endpoint receives, as its Pillow reads it
        return False

    monkeypatch.setattr(endpoint, "refuse_image", note_format)
    with_preview, without = "camera/DSC_0003.DNG", "camera/DSC_0007.nef"  # the extension's case does not matter
    stack.s3.put_object(Bucket=BUCKET, Key=with_preview, Body=camera.dng(camera.shape("yellow", "triangle", seed=3)))
    stack.s3.put_object(Bucket=BUCKET, Key=without, Body=camera.dng(None))
    for n, (colour, kind) in enumerate([("green", "star"), ("purple", "square"), ("orange", "triangle")]):
        stack.s3.put_object(
            Bucket=BUCKET, Key=f"camera/{colour} {kind}.jpg", Body=picture(colour, kind, 40 + n, "JPEG")
        )

    assert stack.deliver_all() == []  # the RAW without a preview is skipped, not failed and redelivered

    assert stack.sqs.receive_message(QueueUrl=stack.dlq_url, MaxNumberOfMessages=10).get("Messages", []) == []
    skipped = [line for line in log_lines if "skipped" in line]
    assert len(skipped) == 1 and without in skipped[0] and "RAW file without an embedded JPEG preview" in skipped[0]
    index = stack.index()
    assert index.count() == 4 and index.get(doc_id(BUCKET, without)) is None
    assert seen and set(seen) <= {"PNG", "JPEG"}, seen  # the endpoint's Pillow reads no RAW
    status, body = stack.api("search-text.json", {"text": "a yellow triangle", "k": 1})
    assert status == 200 and body["hits"][0]["key"] == with_preview


def test_given_throttled_endpoint_when_batch_arrives_then_only_the_records_of_that_request_fail_and_nothing_is_lost(
    stack: Stack, endpoint: InvokeEndpointServer
) -> None:
    stack.s3.put_object(Bucket=BUCKET, Key="t/gone.png", Body=picture("orange", "star", seed=52))
    assert stack.deliver_all() == []
    stack.s3.delete_object(Bucket=BUCKET, Key="t/gone.png")  # its ObjectRemoved event needs no endpoint
    keys = ["t/one.png", "t/two.png"]
    for n, key in enumerate(keys):
        stack.s3.put_object(Bucket=BUCKET, Key=key, Body=picture("orange", "triangle", seed=50 + n))
    endpoint.throttle_next = aws_config.ENDPOINT_ATTEMPTS  # every attempt of the batch's one request

    seen, failed = stack.deliver()

    assert len(seen) == 3 and len(failed) == 2  # the two pictures of the throttled request; the delete is done
    assert stack.index().count() == 0
    assert stack.deliver_all() == []  # the redelivered record succeeds
    index = stack.index()
    assert all(index.get(doc_id(BUCKET, key)) is not None for key in keys)


def test_given_poison_message_when_it_keeps_failing_then_it_lands_in_the_dead_letter_queue(stack: Stack) -> None:
    stack.sqs.send_message(QueueUrl=stack.queue_url, MessageBody="definitely not an S3 notification")

    failures = stack.deliver_all()

    assert len(failures) == MAX_RECEIVE_COUNT
    dead = stack.sqs.receive_message(QueueUrl=stack.dlq_url, MaxNumberOfMessages=10).get("Messages", [])
    assert [m["Body"] for m in dead] == ["definitely not an S3 notification"]


def test_given_odd_keys_when_round_tripped_then_ingest_search_and_download_keep_them_intact(stack: Stack) -> None:
    keys = ["odd/a+b c.png", "odd/ümlaut ñ 東京.png", "odd/100% sure?#&=.png", "odd/ spaces  around .png"]
    bodies = {key: picture("blue", "circle", seed=70 + n) for n, key in enumerate(keys)}
    for key, data in bodies.items():
        stack.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    stack.s3.put_object(Bucket=BUCKET, Key="elsewhere/x.png", Body=picture("red", "star", seed=99))

    assert stack.deliver_all() == []
    stack.index()
    status, body = stack.api("search-text.json", {"text": "a blue circle", "k": 10, "filter": {"prefix": "odd/"}})

    assert status == 200 and sorted(h["key"] for h in body["hits"]) == sorted(keys)
    for hit in body["hits"]:
        assert hit["id"] == doc_id(BUCKET, hit["key"])
        assert fetch(hit["url"]) == bodies[hit["key"]]


def test_given_demo_package_when_served_then_endpoint_answers_text_like_the_local_encoder(
    endpoint: InvokeEndpointServer, demo_encoder: Any
) -> None:
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # pragma: allowlist secret
    )
    answer = client.invoke_endpoint(
        EndpointName=ENDPOINT,
        Body=json.dumps({"inputs": ["a red circle"]}),
        ContentType="application/json",
        Accept="application/json",
    )
    remote = np.asarray(json.loads(answer["Body"].read()), dtype=np.float32)
    assert float(np.max(np.abs(remote - demo_encoder.encode_texts(["a red circle"])))) <= 1e-4


# -- the time budget, against an endpoint that sleeps -----------------------------------------------


def wait_for_calls(endpoint: InvokeEndpointServer, count: int, timeout_s: float) -> None:
    """The stand-in records a call once its delay is over: wait for that, or for timeout_s."""
    deadline = time.monotonic() + timeout_s
    while len(endpoint.calls) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def test_given_endpoint_slower_than_the_time_left_when_searched_then_json_503_with_retry_after_in_one_attempt(
    stack: Stack, endpoint: InvokeEndpointServer
) -> None:
    # Leaves the endpoint a 2 s read timeout after the response reserve, its connect, its answer and
    # one index call; the endpoint answers only after 5 s (a cold start). botocore's legacy default
    # would retry the read timeout 4 times (boto3 guide, "Retries").
    seconds = (
        aws_search.RESPONSE_RESERVE_S + aws_search.ENDPOINT_CONNECT_TIMEOUT_S + 1.0 + aws_search.INDEX_CALL_S + 2.5
    )
    before = len(endpoint.calls)
    endpoint.delay_s = 5.0
    try:
        status, body = stack.api("search-text.json", context=LambdaContext("clipsearch-e2e", timeout_s=seconds))
        event = json.loads((ROOT / "events" / "api" / "search-text.json").read_text())
        raw = stack.search.handler(event, LambdaContext("clipsearch-e2e", timeout_s=seconds))
        wait_for_calls(endpoint, before + 2, timeout_s=10.0)
    finally:
        endpoint.delay_s = 0.0

    assert status == 503 and body["error"]["code"] == "unavailable"
    assert raw["statusCode"] == 503 and int(raw["multiValueHeaders"]["Retry-After"][0]) > 0
    assert len(endpoint.calls) - before == 2  # one attempt per request


class SlowS3:
    """The ingest function's S3 client, each GetObject taking `seconds` longer."""

    def __init__(self, s3: Any, seconds: float) -> None:
        self.s3, self.seconds = s3, seconds

    def get_object(self, **kwargs: Any) -> Any:
        time.sleep(self.seconds)
        return self.s3.get_object(**kwargs)


def test_given_slow_s3_when_a_batch_outlasts_the_time_left_then_the_rest_fail_as_items_and_are_redelivered(
    stack: Stack, endpoint: InvokeEndpointServer
) -> None:
    keys = [f"budget/{n}.png" for n in range(3)]
    for n, key in enumerate(keys):
        stack.s3.put_object(Bucket=BUCKET, Key=key, Body=picture("red", "square", seed=90 + n))
    # Time for exactly one record's worst case (plus 1.5 s), and each record takes 2 s to read: the batch's one
    # endpoint request is paid once, but reading is paid per record.
    context = LambdaContext("clipsearch-e2e", timeout_s=aws_ingest.RECORD_MIN_S + aws_ingest.END_RESERVE_S + 1.5)
    s3 = stack.ingest.ingestor.s3
    stack.ingest.ingestor.s3 = SlowS3(s3, 2.0)
    try:
        seen, failed = stack.deliver(context)
    finally:
        stack.ingest.ingestor.s3 = s3

    assert len(seen) == 3 and len(failed) == 2 and context.get_remaining_time_in_millis() > 0
    assert stack.index().count() == 1
    assert stack.deliver_all() == []  # redelivered with a fresh invocation's time
    index = stack.index()
    assert all(index.get(doc_id(BUCKET, key)) is not None for key in keys)
