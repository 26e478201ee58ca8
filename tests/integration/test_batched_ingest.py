"""A whole SQS batch through the ingest Lambda: few endpoint invocations, one bulk write, per-record outcomes.

The ingest function module (functions/ingest/app.py) is loaded as Lambda loads it; its sagemaker-runtime
client calls the local SageMaker stand-in (the demo model behind the serving toolkit, as strict as
Serverless, which counts the invocations and the images in each), its S3 client a moto server. The index is
the embedded one, counting the bulk calls: these tests are about what is sent, not where it lands.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageChops
from support.fakes import LambdaContext, load_function
from support.sagemaker_endpoint import SERVERLESS_MAX_BODY_BYTES, InvokeEndpointServer
from support.sqs import lambda_event

from clipsearch.aws import backfill
from clipsearch.images import to_transport
from clipsearch.index.base import Document, UpsertResult, doc_id
from clipsearch.index.embedded import EmbeddedIndex
from model_code.inference import decode_for_model

BUCKET = "clipsearch-batched-ingest"
ENDPOINT = "clipsearch-demo"
DIM = 128  # the demo model
ENV = {
    "CLIPSEARCH_ENDPOINT_NAME": ENDPOINT,
    "CLIPSEARCH_OPENSEARCH_URL": "https://search-example.us-east-1.es.amazonaws.com",
    "CLIPSEARCH_INDEX": "images",
    "CLIPSEARCH_MODEL": "demo",
    "CLIPSEARCH_DIM": str(DIM),
    "POWERTOOLS_SERVICE_NAME": "clipsearch",
    "POWERTOOLS_METRICS_NAMESPACE": "clipsearch",
}
# A bright green square in the middle: the stand-in's container refuses any request holding such a picture.
MARK = (0, 255, 0)


class CountingIndex(EmbeddedIndex):
    """The embedded index, counting bulk calls (upsert) and refusing the documents of `refused` keys."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, model="demo", dim=DIM)
        self.upserts: list[int] = []
        self.refused: set[str] = set()

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        self.upserts.append(len(docs))
        kept = [d for d in docs if d.key not in self.refused]
        result = super().upsert(kept)
        result.failed.update({d.id: "400 mapper_parsing_exception" for d in docs if d.key in self.refused})
        return result


@pytest.fixture
def ingest(aws_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The ingest function module over the stand-ins; its index is a CountingIndex."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    module = load_function("ingest")
    module.ingestor.index = CountingIndex(tmp_path / "index")
    yield module
    module.ingestor.index.close()


@pytest.fixture
def stand_in(endpoint: InvokeEndpointServer) -> Iterator[InvokeEndpointServer]:
    """The module's endpoint, its counts cleared and its knobs reset afterwards."""
    endpoint.calls.clear()
    endpoint.images.clear()
    yield endpoint
    endpoint.refuse_image = None


def photo(seed: int, size: tuple[int, int] = (1200, 900), mark: bool = False) -> bytes:
    """A photo-like JPEG: a smooth random scene with sensor noise (its PNG transport is some 100s of KB)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 150 + 2, size[0] // 150 + 2, 3), dtype=np.uint8))
    scene = small.resize(size, Image.Resampling.BICUBIC)
    img = ImageChops.add(scene, Image.effect_noise(size, 8 + seed % 12).convert("RGB"), scale=1.0, offset=-128)
    if mark:
        img.paste(MARK, (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def is_marked(img: Image.Image) -> bool:
    r, g, b = img.convert("RGB").getpixel((img.width // 2, img.height // 2))  # type: ignore[misc]
    return r < 40 and g > 215 and b < 40


def batch(s3: Any, objects: dict[str, bytes]) -> dict[str, Any]:
    """Put the objects and make one SQS batch of their ObjectCreated notifications, message id = key."""
    messages = []
    for key, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        notification = backfill.s3_event(BUCKET, backfill.S3Object(key, len(data)))
        messages.append({"MessageId": key, "ReceiptHandle": key, "Body": json.dumps(notification)})
    return lambda_event(messages)


def failed(response: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


def transport_bytes(data: bytes) -> int:
    """What one picture adds to a request: its transport form (PNG, or JPEG) as base64."""
    body, _ = to_transport(decode_for_model(data).image)
    return len(base64.b64encode(body))


def test_given_a_batch_of_ten_photos_when_ingested_then_few_invocations_carry_them_and_one_bulk_writes_them(
    s3: Any, ingest: Any, stand_in: InvokeEndpointServer
) -> None:
    objects = {f"batch/{n}.jpg": photo(n, (480 + 160 * (n % 4), 480)) for n in range(10)}
    total = sum(transport_bytes(data) for data in objects.values())

    response = ingest.handler(batch(s3, objects), LambdaContext())

    assert failed(response) == []
    index = ingest.ingestor.index
    assert sorted(index.fingerprints()) == sorted(objects)
    assert 1 < len(stand_in.calls) <= math.ceil(total / SERVERLESS_MAX_BODY_BYTES), (total, stand_in.images)
    assert sum(stand_in.images) == 10 and index.upserts == [10]
    # Each vector is its own picture's, whatever request it travelled in.
    for n, key in enumerate(objects):
        alone = ingest.ingestor.encoder.encode_images([decode_for_model(objects[key]).image])[0]
        doc = index.get(doc_id(BUCKET, key))
        assert doc is not None and np.allclose(doc.vector, alone, atol=1e-5), n


def test_given_poison_images_in_a_batch_when_ingested_then_only_their_records_are_skipped(
    s3: Any, ingest: Any, stand_in: InvokeEndpointServer
) -> None:
    objects = {f"mixed/{n}.jpg": photo(20 + n, (320, 240)) for n in range(4)}
    objects["mixed/truncated.jpg"] = photo(30)[:2000]
    objects["mixed/tiny.png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    objects["mixed/8x8.png"] = tiny.getvalue()

    response = ingest.handler(batch(s3, objects), LambdaContext())

    # Skipped, not failed: a redelivery could not help (as for a record on its own).
    assert failed(response) == []
    assert sorted(ingest.ingestor.index.fingerprints()) == [f"mixed/{n}.jpg" for n in range(4)]
    assert len(stand_in.calls) == 1 and stand_in.images == [4]


def test_given_the_endpoint_refuses_one_image_of_a_request_when_ingested_then_halves_isolate_it(
    s3: Any, ingest: Any, stand_in: InvokeEndpointServer
) -> None:
    objects = {f"refused/{n}.jpg": photo(40 + n, (320, 240), mark=n == 5) for n in range(8)}
    stand_in.refuse_image = is_marked

    response = ingest.handler(batch(s3, objects), LambdaContext())

    # The refused picture is skipped (the endpoint's 4xx: retrying cannot help); its neighbours are indexed.
    assert failed(response) == []
    keys = sorted(ingest.ingestor.index.fingerprints())
    assert keys == sorted(k for k in objects if k != "refused/5.jpg")
    # All 8 refused; halves: 0-3 answered, 4-7 refused; 4-5 refused (4 answered, 5 refused), 6-7 answered.
    assert stand_in.images == [8, 4, 4, 2, 1, 1, 2]
    assert ingest.ingestor.index.upserts == [7]


def test_given_the_model_fails_on_one_image_of_a_request_when_ingested_then_halves_isolate_it_and_only_it_is_retried(
    s3: Any, ingest: Any, stand_in: InvokeEndpointServer
) -> None:
    # GIVEN a batch in which one picture makes the container fail (a 5xx: a poison input crashing the model)
    objects = {f"poison/{n}.jpg": photo(50 + n, (320, 240), mark=n == 5) for n in range(8)}
    stand_in.refuse_image, stand_in.refuse_status = is_marked, 500

    response = ingest.handler(batch(s3, objects), LambdaContext())

    # THEN only its record fails (SQS redelivers it alone, and alone it reaches the dead-letter queue);
    # its neighbours are indexed, found by the same halving as a refusal
    assert failed(response) == ["poison/5.jpg"]
    assert sorted(ingest.ingestor.index.fingerprints()) == sorted(k for k in objects if k != "poison/5.jpg")
    assert stand_in.images == [8, 4, 4, 2, 1, 1, 2]


def test_given_the_index_refuses_one_document_of_the_bulk_when_ingested_then_only_its_record_fails(
    s3: Any, ingest: Any, stand_in: InvokeEndpointServer
) -> None:
    objects = {f"bulk/{n}.jpg": photo(60 + n, (320, 240)) for n in range(3)}
    ingest.ingestor.index.refused = {"bulk/1.jpg"}

    response = ingest.handler(batch(s3, objects), LambdaContext())

    assert failed(response) == ["bulk/1.jpg"]
    assert sorted(ingest.ingestor.index.fingerprints()) == ["bulk/0.jpg", "bulk/2.jpg"]
    assert ingest.ingestor.index.upserts == [3] and len(stand_in.calls) == 1
