"""The ingest Lambda's record handling, with moto S3/SQS, the fake encoder and a real embedded index.

The sample events under events/ingest/ drive it, as `sam local invoke -e` would.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from email.header import Header
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from aws_lambda_powertools import Metrics
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from botocore.exceptions import ClientError, ReadTimeoutError
from PIL import Image, ImageDraw
from support.fakes import FakeClock, FakeEncoder, LambdaContext, load_function

from clipsearch.aws import backfill
from clipsearch.aws import config as aws_config
from clipsearch.aws import ingest as aws_ingest
from clipsearch.aws.config import Deadline
from clipsearch.aws.ingest import Ingestor, parse_notification
from clipsearch.encoders import SageMakerEncoder
from clipsearch.errors import BadRequest, ConfigError, Unavailable
from clipsearch.index.base import Document, UpsertResult, doc_id, wall_clock
from clipsearch.index.embedded import EmbeddedIndex
from model_code.inference import decode_image, downscale

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events" / "ingest"
BUCKET = "clipsearch-images-example"
ODD_KEY = "holiday photos/Café – été 2019+1.jpg"  # the key in events/ingest/put.json


def load_event(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


def picture(
    colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (900, 600), fmt: str = "JPEG"
) -> bytes:
    img = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(img).ellipse([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def s3(aws: None) -> Any:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def index(tmp_path: Path) -> EmbeddedIndex:
    return EmbeddedIndex(tmp_path / "index", model=FakeEncoder.model, dim=FakeEncoder.dim)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics(namespace="clipsearch-test", service="clipsearch")
    metrics.clear_metrics()  # Powertools shares one metric set between all Metrics instances
    yield metrics
    metrics.clear_metrics()


def run_batch(ingestor: Ingestor, event: dict[str, Any]) -> list[str]:
    """Run a batch record by record (Ingestor.handle_record); returns the failed message ids."""
    result = process_partial_response(
        event=event,
        record_handler=ingestor.handle_record,
        processor=BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False),
        context=None,
    )
    return [f["itemIdentifier"] for f in result["batchItemFailures"]]


def handle_batch(ingestor: Ingestor, event: dict[str, Any], context: Any = None) -> list[str]:
    """Run a batch the way functions/ingest/app.py does; returns the failed message ids."""
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return [f["itemIdentifier"] for f in ingestor.handle_batch(event, context, processor)["batchItemFailures"]]


def counted(metrics: Metrics, name: str) -> float:
    entry = metrics.metric_set.get(name)
    return sum(entry["Value"]) if entry else 0


class ThrottledOnce(FakeEncoder):
    """An endpoint that throttles its first call (SageMakerEncoder raises Unavailable then)."""

    def __init__(self) -> None:
        super().__init__()
        self.throttled = False

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if not self.throttled:
            self.throttled = True
            raise Unavailable("encoder endpoint clip failed (ThrottlingException): Rate exceeded")
        return super().encode_images(images)


class RefusingIndex(EmbeddedIndex):
    """OpenSearch rejecting the document (mapping conflict, disk full...)."""

    def upsert(self, docs: Any) -> UpsertResult:
        return UpsertResult(failed={d.id: "429 es_rejected_execution_exception" for d in docs})


# -- notifications ---------------------------------------------------------------------------------


def test_given_put_event_when_parsed_then_key_with_spaces_plus_and_unicode_is_decoded() -> None:
    body = load_event("put.json")["Records"][0]["body"]
    (event,) = parse_notification(body)
    assert (event.action, event.bucket, event.key, event.size) == ("created", BUCKET, ODD_KEY, 48213)


def test_given_s3_test_event_when_parsed_then_nothing_to_do() -> None:
    assert parse_notification(load_event("test-event.json")["Records"][0]["body"]) == []


# -- the batch handler ---------------------------------------------------------------------------


def test_given_put_event_when_ingested_then_document_has_decoded_key_title_and_downscaled_vector(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    data = picture()
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=data, Metadata={"title": "Sunset at the pool"})
    ingestor = Ingestor(FakeEncoder(), index, s3, metrics)

    assert run_batch(ingestor, load_event("put.json")) == []

    doc = index.get(doc_id(BUCKET, ODD_KEY))
    assert doc is not None
    assert (doc.key, doc.bucket, doc.title) == (ODD_KEY, BUCKET, "Sunset at the pool")
    assert (doc.width, doc.height, doc.size) == (900, 600, len(data))
    expected = FakeEncoder().encode_images([downscale(decode_image(data))])[0]
    assert np.allclose(doc.vector, expected, atol=1e-6)
    assert counted(metrics, "ImagesIndexed") == 1


def test_given_same_event_twice_when_ingested_then_exactly_one_document(s3: Any, index: EmbeddedIndex) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())
    ingestor = Ingestor(FakeEncoder(), index, s3)

    run_batch(ingestor, load_event("put.json"))
    run_batch(ingestor, load_event("put.json"))

    assert index.count() == 1


def test_given_indexed_image_when_delete_event_then_document_is_removed(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())
    ingestor = Ingestor(FakeEncoder(), index, s3, metrics)
    run_batch(ingestor, load_event("put.json"))

    assert run_batch(ingestor, load_event("delete.json")) == []

    assert index.get(doc_id(BUCKET, ODD_KEY)) is None
    assert counted(metrics, "ImagesDeleted") == 1


def test_given_s3_test_event_when_handled_then_ignored_without_failure(s3: Any, index: EmbeddedIndex) -> None:
    encoder = FakeEncoder()
    assert run_batch(Ingestor(encoder, index, s3), load_event("test-event.json")) == []
    assert encoder.calls == [] and index.count() == 0


def test_given_non_image_key_when_handled_then_skipped_with_one_log_line_and_a_metric(
    s3: Any, index: EmbeddedIndex, metrics: Metrics, log_lines: list[str]
) -> None:
    encoder = FakeEncoder()

    assert run_batch(Ingestor(encoder, index, s3, metrics), load_event("not-an-image.json")) == []

    assert encoder.calls == [] and index.count() == 0
    assert counted(metrics, "ObjectsSkipped") == 1
    skipped = [line for line in log_lines if "skipped" in line]
    assert len(skipped) == 1 and "notes/read me.txt" in skipped[0]


def test_given_undecodable_image_when_handled_then_skipped_not_retried(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=b"\xff\xd8\xff\xe0 truncated jpeg")

    assert run_batch(Ingestor(FakeEncoder(), index, s3, metrics), load_event("put.json")) == []

    assert index.count() == 0 and counted(metrics, "ObjectsSkipped") == 1


def test_given_object_deleted_before_processing_when_handled_then_skipped(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    assert run_batch(Ingestor(FakeEncoder(), index, s3, metrics), load_event("put.json")) == []
    assert index.count() == 0 and counted(metrics, "ObjectsSkipped") == 1


# A whole batch is read first and written after: the delete of a key put earlier in it must still come last.
@pytest.mark.parametrize("handle", [run_batch, handle_batch], ids=["record by record", "whole batch"])
def test_given_mixed_batch_when_handled_then_each_record_gets_its_own_outcome(
    s3: Any, index: EmbeddedIndex, metrics: Metrics, handle: Callable[[Ingestor, dict[str, Any]], list[str]]
) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())

    # put, test event, non-image, delete of the same key
    assert handle(Ingestor(FakeEncoder(), index, s3, metrics), load_event("batch.json")) == []

    assert index.count() == 0
    assert [counted(metrics, m) for m in ("ImagesIndexed", "ObjectsSkipped", "ImagesDeleted")] == [1, 1, 1]


def test_given_throttled_endpoint_when_batch_handled_then_only_that_record_fails_and_retry_indexes_it(
    s3: Any, index: EmbeddedIndex
) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())
    s3.put_object(Bucket=BUCKET, Key="b/blue.png", Body=picture((30, 30, 220), fmt="PNG"))
    event = load_event("put.json")
    second = json.loads(json.dumps(event["Records"][0]))
    second["messageId"] = "second"
    second["body"] = json.dumps(backfill.s3_event(BUCKET, backfill.S3Object("b/blue.png", 100)))
    event["Records"].append(second)
    ingestor = Ingestor(ThrottledOnce(), index, s3)

    failed = run_batch(ingestor, event)

    assert failed == [event["Records"][0]["messageId"]]
    assert index.get(doc_id(BUCKET, "b/blue.png")) is not None
    # SQS redelivers the failed message only.
    assert run_batch(ingestor, {"Records": [event["Records"][0]]}) == []
    assert index.count() == 2


def test_given_index_refuses_document_when_handled_then_record_fails(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())
    index = RefusingIndex(tmp_path / "refusing", model="fake", dim=16)
    event = load_event("put.json")

    assert run_batch(Ingestor(FakeEncoder(), index, s3), event) == [event["Records"][0]["messageId"]]


def test_given_poison_message_when_handled_then_it_fails_towards_the_dead_letter_queue(
    s3: Any, index: EmbeddedIndex
) -> None:
    event = load_event("poison.json")
    assert run_batch(Ingestor(FakeEncoder(), index, s3), event) == [event["Records"][0]["messageId"]]


def test_given_non_ascii_title_encoded_as_rfc2047_when_ingested_then_title_is_decoded(
    s3: Any, index: EmbeddedIndex
) -> None:
    title = "Été à la plage"
    s3.put_object(
        Bucket=BUCKET,
        Key=ODD_KEY,
        Body=picture(),
        Metadata={"title": Header(title, "utf-8").encode(), "description": "ignored"},
    )

    run_batch(Ingestor(FakeEncoder(), index, s3), load_event("put.json"))

    doc = index.get(doc_id(BUCKET, ODD_KEY))
    assert doc is not None and doc.title == title


def test_given_only_a_description_when_ingested_then_it_is_the_title(s3: Any, index: EmbeddedIndex) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture(), Metadata={"description": "Two people by a pool"})
    run_batch(Ingestor(FakeEncoder(), index, s3), load_event("put.json"))
    doc = index.get(doc_id(BUCKET, ODD_KEY))
    assert doc is not None and doc.title == "Two people by a pool"


def test_given_no_metadata_when_ingested_then_title_comes_from_the_file_name(s3: Any, index: EmbeddedIndex) -> None:
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())
    run_batch(Ingestor(FakeEncoder(), index, s3), load_event("put.json"))
    doc = index.get(doc_id(BUCKET, ODD_KEY))
    assert doc is not None and doc.title == "Café – été 2019+1"


def test_given_key_without_extension_but_image_content_type_when_ingested_then_indexed(
    s3: Any, index: EmbeddedIndex
) -> None:
    s3.put_object(Bucket=BUCKET, Key="scans/0001", Body=picture(), ContentType="image/jpeg")
    s3.put_object(Bucket=BUCKET, Key="scans/0002", Body=b"plain text", ContentType="text/plain")
    event = {
        "Records": [
            {
                **load_event("put.json")["Records"][0],
                "messageId": key,
                "body": json.dumps(backfill.s3_event(BUCKET, backfill.S3Object(key, 10))),
            }
            for key in ("scans/0001", "scans/0002")
        ]
    }

    assert run_batch(Ingestor(FakeEncoder(), index, s3), event) == []

    assert index.get(doc_id(BUCKET, "scans/0001")) is not None and index.count() == 1


# -- the time budget ------------------------------------------------------------------------------


class SlowEncoder(FakeEncoder):
    """An endpoint that takes `seconds` per call, on the test's clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        self.clock.advance(self.seconds)
        return super().encode_images(images)


def put_batch(s3: Any, keys: list[str]) -> dict[str, Any]:
    """One SQS batch of ObjectCreated notifications, message id = key."""
    template = load_event("put.json")["Records"][0]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=picture())
    return {
        "Records": [
            {**template, "messageId": key, "body": json.dumps(backfill.s3_event(BUCKET, backfill.S3Object(key, 10)))}
            for key in keys
        ]
    }


def test_given_slow_endpoint_when_time_runs_short_then_remaining_records_fail_as_items_not_as_a_timeout(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    clock = FakeClock()
    ingestor = Ingestor(
        SlowEncoder(clock, seconds=30.0), index, s3, metrics, deadline=Deadline(clock=clock), record_min_s=50.0
    )
    keys = [f"slow/{n}.jpg" for n in range(4)]
    context = LambdaContext(timeout_s=100.0, clock=clock)

    result = process_partial_response(
        event=put_batch(s3, keys),
        record_handler=ingestor.handle_record,
        processor=BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False),
        context=context,
    )

    # 100 s: two records of 30 s start with 100 and 70 s left; at 40 s left the rest are not started.
    assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == keys[2:]
    assert sorted(index.fingerprints()) == keys[:2]
    assert counted(metrics, "RecordsOutOfTime") == 2 and context.get_remaining_time_in_millis() > 0


@pytest.mark.parametrize(("spare_s", "failed"), [(-1.0, 2), (1.0, 0)])
def test_given_ingest_module_when_less_than_one_records_worst_case_is_left_then_no_record_starts(
    s3: Any, index: EmbeddedIndex, monkeypatch: pytest.MonkeyPatch, spare_s: float, failed: int
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    module = load_function("ingest")
    # The deployed budget (S3, decode, the endpoint's shortest read, OpenSearch); local stand-ins.
    module.ingestor.encoder, module.ingestor.index = FakeEncoder(), index
    keys = ["late/a.jpg", "late/b.jpg"]
    context = LambdaContext(timeout_s=aws_ingest.RECORD_MIN_S + aws_ingest.END_RESERVE_S + spare_s, clock=FakeClock())

    response = module.handler(put_batch(s3, keys), context)

    assert [f["itemIdentifier"] for f in response["batchItemFailures"]] == keys[:failed]
    assert index.count() == len(keys) - failed


class EndpointClients:
    """Makes sagemaker-runtime clients (one per read timeout) whose endpoint runs the fake encoder.

    Each call first raises the next of `errors`, if any; `made` and `calls` record read timeouts, `images`
    the number of images in each call answered.
    """

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.encoder = FakeEncoder()
        self.errors = list(errors or [])
        self.made: list[float] = []
        self.calls: list[float] = []
        self.images: list[int] = []

    def __call__(self, read_timeout_s: float) -> Any:
        self.made.append(read_timeout_s)
        clients = self

        class Client:
            def invoke_endpoint(
                self,
                EndpointName: str,
                Body: bytes,
                ContentType: str,  # noqa: N803
                Accept: str,
            ) -> dict[str, Any]:
                clients.calls.append(read_timeout_s)
                if clients.errors:
                    raise clients.errors.pop(0)
                if ContentType == "application/json":  # model_code's several images in one request
                    images = [decode_image(base64.b64decode(i)) for i in json.loads(Body)["images"]]
                else:
                    images = [decode_image(Body)]
                clients.images.append(len(images))
                vectors = clients.encoder.encode_images(images)
                return {"Body": io.BytesIO(json.dumps(vectors.tolist()).encode())}

        return Client()


class SlowS3:
    """S3 whose GetObject takes `seconds` on the test's clock (with the decode after it: one advance)."""

    def __init__(self, s3: Any, clock: FakeClock, seconds: float) -> None:
        self.s3, self.clock, self.seconds = s3, clock, seconds

    def get_object(self, **kwargs: Any) -> Any:
        self.clock.advance(self.seconds)
        return self.s3.get_object(**kwargs)


def throttling(code: str = "ThrottlingException") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "Rate exceeded"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        "InvokeEndpoint",
    )


def fake_model_ingestor(
    index: EmbeddedIndex, clients: EndpointClients, clock: FakeClock | None = None, s3: Any = None
) -> Ingestor:
    """build_ingestor's ingestor (its endpoint budget and retries) over the fake model and a local index."""
    config = aws_config.from_env("ingest", {**ENV, "CLIPSEARCH_MODEL": "fake", "CLIPSEARCH_DIM": "16"})
    deadline = Deadline(reserve_s=aws_ingest.END_RESERVE_S, clock=clock) if clock else None
    ingestor = aws_ingest.build_ingestor(config, deadline=deadline, runtime=clients)
    ingestor.index = index
    if s3 is not None:
        ingestor.s3 = s3
    return ingestor


def test_given_record_starting_with_its_worst_case_left_when_s3_and_decode_take_theirs_then_endpoint_gets_its_minimum(
    s3: Any, index: EmbeddedIndex
) -> None:
    clock = FakeClock()
    clients = EndpointClients()
    ingestor = fake_model_ingestor(index, clients, clock, SlowS3(s3, clock, aws_ingest.S3_CALL_S + aws_ingest.DECODE_S))
    context = LambdaContext(timeout_s=aws_ingest.RECORD_MIN_S + aws_ingest.END_RESERVE_S, clock=clock)

    result = process_partial_response(
        event=put_batch(s3, ["edge/a.jpg"]),
        record_handler=ingestor.handle_record,
        processor=BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False),
        context=context,
    )

    assert result["batchItemFailures"] == [] and index.count() == 1
    assert clients.calls == [aws_ingest.ENDPOINT_MIN_READ_S]


def test_given_endpoint_throttles_once_when_record_is_handled_then_it_is_retried_in_the_same_invocation(
    s3: Any, index: EmbeddedIndex
) -> None:
    clients = EndpointClients(errors=[throttling()])
    ingestor = fake_model_ingestor(index, clients)

    assert run_batch(ingestor, put_batch(s3, ["busy/a.jpg"])) == []
    assert len(clients.calls) == 2 and index.count() == 1


@pytest.mark.parametrize(
    "error",
    [
        ReadTimeoutError(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com/endpoints/clip/invocations"),
        throttling("ModelError"),
    ],
)
def test_given_endpoint_read_timeout_or_model_error_when_record_is_handled_then_it_fails_without_a_retry(
    s3: Any, index: EmbeddedIndex, error: Exception
) -> None:
    clients = EndpointClients(errors=[error])
    ingestor = fake_model_ingestor(index, clients)

    assert run_batch(ingestor, put_batch(s3, ["hung/a.jpg"])) == ["hung/a.jpg"]
    assert len(clients.calls) == 1 and index.count() == 0


def test_given_endpoint_keeps_throttling_when_called_then_retries_stop_in_time_and_the_error_is_typed() -> None:
    clock = FakeClock()
    deadline = Deadline(clock=clock)
    clients = EndpointClients(errors=[throttling("ModelNotReadyException")] * 10)
    runtime = aws_config.EndpointRuntime(
        deadline, 20.0, connect_timeout_s=2.0, factory=clients, attempts=10, sleep=clock.advance
    )
    encoder = SageMakerEncoder("fake", 16, "clip", client=runtime)
    deadline.start(LambdaContext(timeout_s=8.0, clock=clock))

    with pytest.raises(Unavailable, match="ModelNotReadyException"):
        encoder.encode_texts(["a dog"])

    # Retried, but stopped by the deadline (backoffs 0.5, 1, 2, 4 s jittered down), not by the attempts.
    assert 2 <= len(clients.calls) < 10
    assert deadline.remaining_s() >= 0


def test_given_an_invocation_running_down_when_the_endpoint_is_called_each_second_then_few_clients_are_made() -> None:
    clock = FakeClock()
    deadline = Deadline(reserve_s=aws_ingest.END_RESERVE_S, clock=clock)
    clients = EndpointClients()
    runtime = aws_config.EndpointRuntime(
        deadline,
        aws_ingest.ENDPOINT_MAX_READ_S,
        reserve_s=aws_ingest.INDEX_CALL_S,
        connect_timeout_s=aws_ingest.ENDPOINT_CONNECT_S,
        min_read_timeout_s=aws_ingest.ENDPOINT_MIN_READ_S,
        factory=clients,
    )
    for _ in range(2):  # two invocations, each from time to spare down to the last record that fits
        deadline.start(LambdaContext(timeout_s=150.0, clock=clock))
        while runtime.read_timeout_s() >= aws_ingest.ENDPOINT_MIN_READ_S:
            runtime.invoke_endpoint(
                EndpointName="clip", Body=picture(), ContentType="image/jpeg", Accept="application/json"
            )
            clock.advance(1.0)

    assert len(clients.calls) > 100
    assert len(clients.made) == len(set(clients.made)) <= 8


# -- whole batches ----------------------------------------------------------------------------------


def test_given_a_batch_whose_reads_run_the_time_down_when_handled_then_the_records_read_in_time_share_one_request(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    clock = FakeClock()
    clients = EndpointClients()
    ingestor = fake_model_ingestor(index, clients, clock, SlowS3(s3, clock, 30.0))
    ingestor.metrics = metrics
    keys = [f"reads/{n}.jpg" for n in range(4)]
    context = LambdaContext(timeout_s=aws_ingest.RECORD_MIN_S + aws_ingest.END_RESERVE_S + 70.0, clock=clock)

    failed = handle_batch(ingestor, put_batch(s3, keys), context)

    # Records start with 70, 40 and 10 s to spare; the fourth would start 20 s short of its worst case.
    assert failed == keys[3:] and counted(metrics, "RecordsOutOfTime") == 1
    assert sorted(index.fingerprints()) == keys[:3]
    assert clients.images == [3] and context.get_remaining_time_in_millis() > 0


def test_given_a_throttled_request_when_a_batch_is_handled_then_its_records_fail_and_a_redelivery_indexes_them(
    s3: Any, index: EmbeddedIndex
) -> None:
    keys = ["busy/a.jpg", "busy/b.jpg"]
    event = put_batch(s3, keys)
    event["Records"].insert(0, load_event("poison.json")["Records"][0])
    encoder = ThrottledOnce()
    ingestor = Ingestor(encoder, index, s3)

    assert handle_batch(ingestor, event) == [event["Records"][0]["messageId"], *keys]
    assert encoder.calls == [] and index.count() == 0  # the throttled call never answered

    assert handle_batch(ingestor, put_batch(s3, keys)) == []
    assert encoder.calls == [("image", 2)] and index.count() == 2


class RefusingEncoder(FakeEncoder):
    """An encoder that refuses any call holding a green picture, as an endpoint answering 4xx does."""

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if any(img.convert("RGB").getpixel((img.width // 2, img.height // 2)) == (0, 200, 0) for img in images):
            raise BadRequest("encoder refused the input: images[0] is not a photo")
        return super().encode_images(images)


def test_given_an_encoder_refusing_one_image_when_a_batch_is_handled_then_halves_isolate_it_and_it_is_skipped(
    s3: Any, index: EmbeddedIndex, metrics: Metrics
) -> None:
    keys = [f"mixed/{n}.png" for n in range(5)]
    event = put_batch(s3, keys)
    s3.put_object(Bucket=BUCKET, Key="mixed/3.png", Body=picture((0, 200, 0), size=(600, 600), fmt="PNG"))
    encoder = RefusingEncoder()

    assert handle_batch(Ingestor(encoder, index, s3, metrics), event) == []

    assert sorted(index.fingerprints()) == ["mixed/0.png", "mixed/1.png", "mixed/2.png", "mixed/4.png"]
    assert counted(metrics, "ObjectsSkipped") == 1 and counted(metrics, "ImagesIndexed") == 4
    # Refused calls record nothing: 5 -> 2 + (3 -> 1 + (2 -> 1 + 1)) answered as 2, 1 and 1.
    assert encoder.calls == [("image", 2), ("image", 1), ("image", 1)]


# -- the handler module and its configuration -------------------------------------------------------


ENV = {
    "CLIPSEARCH_ENDPOINT_NAME": "clip-endpoint",
    "CLIPSEARCH_OPENSEARCH_URL": "https://search-example.us-east-1.es.amazonaws.com",
    "CLIPSEARCH_INDEX": "images",
    "CLIPSEARCH_MODEL": "demo",
    "CLIPSEARCH_DIM": "128",
    "POWERTOOLS_SERVICE_NAME": "clipsearch",
    "POWERTOOLS_METRICS_NAMESPACE": "clipsearch",
}


def test_given_complete_environment_when_read_then_config_matches_contract() -> None:
    config = aws_config.from_env("ingest", ENV)
    assert (config.image_endpoint, config.text_endpoint) == ("clip-endpoint", "clip-endpoint")
    assert (config.index, config.model, config.dim, config.opensearch_auth) == ("images", "demo", 128, "sigv4")


def test_given_two_endpoint_layout_when_read_then_text_and_image_endpoints_differ() -> None:
    env = {k: v for k, v in ENV.items() if k != "CLIPSEARCH_ENDPOINT_NAME"}
    env.update(
        CLIPSEARCH_TEXT_ENDPOINT_NAME="clip-text", CLIPSEARCH_IMAGE_ENDPOINT_NAME="clip-image", CLIPSEARCH_BUCKET="b"
    )
    config = aws_config.from_env("search", env)
    assert (config.text_endpoint, config.image_endpoint) == ("clip-text", "clip-image")


def test_given_known_model_without_dim_when_read_then_dimension_comes_from_the_model() -> None:
    env = {**ENV, "CLIPSEARCH_MODEL": "RN50"}
    del env["CLIPSEARCH_DIM"]
    assert aws_config.from_env("ingest", env).dim == 1024


def test_given_dim_that_contradicts_the_model_when_read_then_config_error() -> None:
    with pytest.raises(ConfigError, match="does not fit model 'RN50'"):
        aws_config.from_env("ingest", {**ENV, "CLIPSEARCH_MODEL": "RN50", "CLIPSEARCH_DIM": "512"})


def test_given_missing_variables_when_function_starts_then_one_clear_log_line_and_config_error(
    aws: None, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    for name in (*ENV, "CLIPSEARCH_IMAGE_ENDPOINT_NAME", "CLIPSEARCH_TEXT_ENDPOINT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIPSEARCH_MODEL", "demo")

    with pytest.raises(ConfigError):
        load_function("ingest")

    assert len(log_lines) == 1
    for name in ("CLIPSEARCH_ENDPOINT_NAME", "CLIPSEARCH_OPENSEARCH_URL", "CLIPSEARCH_INDEX"):
        assert name in log_lines[0]


def test_given_ingest_module_when_invoked_with_sample_batch_then_partial_batch_response(
    s3: Any, index: EmbeddedIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    module = load_function("ingest")
    # The module's clients are built from the environment; the stand-ins replace the remote ones.
    module.ingestor = Ingestor(FakeEncoder(), index, s3, module.metrics)
    s3.put_object(Bucket=BUCKET, Key=ODD_KEY, Body=picture())

    response = module.handler(load_event("put.json"), LambdaContext())

    assert response == {"batchItemFailures": []}
    assert index.get(doc_id(BUCKET, ODD_KEY)) is not None


# -- backfill (existing objects -> the same ingest path) --------------------------------------------


def test_given_existing_objects_when_backfill_enqueues_then_ingest_indexes_each_image_once(
    s3: Any, index: EmbeddedIndex
) -> None:
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName="ingest")["QueueUrl"]
    keys = [ODD_KEY, "2019/pool party.png", "a+b/ça.webp"]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=picture(fmt="PNG"))
    s3.put_object(Bucket=BUCKET, Key="2019/notes.txt", Body=b"not an image")

    summary = backfill.enqueue(s3, sqs, queue_url, BUCKET, "")

    assert (summary.listed, summary.sent, summary.failed) == (3, 3, [])
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    event = {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
            }
            for m in messages
        ]
    }
    assert run_batch(Ingestor(FakeEncoder(), index, s3), event) == []
    assert sorted(index.fingerprints()) == sorted(keys)


def test_given_transform_output_when_loaded_then_vectors_land_under_their_keys(s3: Any, index: EmbeddedIndex) -> None:
    sagemaker = boto3.client("sagemaker")
    sagemaker.create_model(
        ModelName="clip",
        ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
        PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/p:1"},
    )
    keys = ["photos/red one.png", "photos/blue+two.png"]
    for key, colour in zip(keys, [(220, 30, 30), (30, 30, 220)], strict=True):
        s3.put_object(Bucket=BUCKET, Key=key, Body=picture(colour, fmt="PNG"), Metadata={"title": key[7:]})
    vectors = {
        key: FakeEncoder().encode_images(
            [Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))]
        )[0]
        for key in keys
    }

    def fake_transform(**kwargs: Any) -> None:
        # What the real job writes: one `<key>.out` per manifest entry, model_code's JSON answer.
        out = kwargs["TransformOutput"]["S3OutputPath"]
        out_bucket, out_prefix = backfill.parse_s3_url(out)
        for key, vec in vectors.items():
            s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}{key}.out", Body=json.dumps([vec.tolist()]))
        sagemaker.create_transform_job(**kwargs)

    class Control:
        create_transform_job = staticmethod(fake_transform)
        describe_transform_job = staticmethod(sagemaker.describe_transform_job)

    summary = backfill.batch_transform(
        s3, Control(), lambda dim: index, BUCKET, "photos/", "clip", "ml.m5.xlarge", job="job-1", poll_s=0
    )

    assert (summary.indexed, summary.failed, summary.job) == (2, [], "job-1")
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="_clipsearch-batch/job-1/manifest.json")["Body"].read())
    assert manifest == [{"prefix": f"s3://{BUCKET}/"}, *sorted(keys)]
    job = sagemaker.describe_transform_job(TransformJobName="job-1")
    assert job["TransformInput"]["ContentType"] == "application/x-image"
    for key in keys:
        doc = index.get(doc_id(BUCKET, key))
        assert isinstance(doc, Document) and doc.title == key[7:]
        assert np.allclose(doc.vector, vectors[key], atol=1e-6)


def test_given_cli_backfill_when_run_then_it_reports_what_it_queued(
    s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipsearch.cli import EXIT_OK, main

    queue_url = boto3.client("sqs").create_queue(QueueName="ingest-cli")["QueueUrl"]
    s3.put_object(Bucket=BUCKET, Key="photos/a b.jpg", Body=picture())

    assert main(["backfill", f"s3://{BUCKET}/photos/", "--queue-url", queue_url]) == EXIT_OK
    assert f"queued 1 of 1 images under s3://{BUCKET}/photos/" in capsys.readouterr().out


def test_given_cli_backfill_without_a_queue_when_run_then_one_line_names_the_fix(
    s3: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipsearch.cli import EXIT_USAGE, main

    monkeypatch.delenv("CLIPSEARCH_QUEUE_URL", raising=False)

    assert main(["backfill", f"s3://{BUCKET}/"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--queue-url" in err[0]


def test_given_raw_and_ordinary_objects_when_backfill_enqueues_then_raw_goes_to_the_ingest_queue_too(
    s3: Any,
) -> None:
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName="ingest-raw")["QueueUrl"]
    for key in ("a/IMG_1.jpg", "a/DSC_2.NEF", "a/x.dng", "a/IMG_3.HEIC"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")

    summary = backfill.enqueue(s3, sqs, queue_url, BUCKET, "a/")

    assert (summary.listed, summary.sent, summary.failed) == (4, 4, [])
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    keys = [ev.key for m in messages for ev in parse_notification(m["Body"])]
    assert sorted(keys) == ["a/DSC_2.NEF", "a/IMG_1.jpg", "a/IMG_3.HEIC", "a/x.dng"]


def test_given_a_transformed_object_when_its_document_is_built_then_it_has_a_capture_time(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="b/blue.png", Body=picture(fmt="PNG"))
    modified = s3.head_object(Bucket=BUCKET, Key="b/blue.png")["LastModified"]

    doc = backfill.document_for(s3, BUCKET, "b/blue.png", np.zeros(4, dtype=np.float32))

    assert doc.taken_at == wall_clock(modified)
