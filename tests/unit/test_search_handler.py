"""The search Lambda over the sample API Gateway events in events/api/.

The SageMaker runtime is a hand-written fake client (answered by the fake encoder), so the real
SageMakerEncoder and its wire format are exercised; S3 presigning is moto; the index is a real
embedded index.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import numpy as np
import pytest
from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from botocore.exceptions import ClientError
from fakes import FakeEncoder, LambdaContext, load_function
from PIL import Image, ImageDraw

from clipsearch import aws_config
from clipsearch.aws_config import LazyIndex
from clipsearch.aws_search import build_search_app
from clipsearch.encoders import SageMakerEncoder
from clipsearch.errors import ConfigError, Unavailable
from clipsearch.index.base import Document, VectorIndex, doc_id
from clipsearch.index.embedded import EmbeddedIndex
from model_code.inference import decode_image

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events" / "api"
BUCKET = "clipsearch-images-example"
ODD_KEY = "holiday photos/Café – été 2019+1.jpg"  # the document that events/api/search-id.json names
ENV = {
    "CLIPSEARCH_TEXT_ENDPOINT_NAME": "clip-text",
    "CLIPSEARCH_IMAGE_ENDPOINT_NAME": "clip-image",
    "CLIPSEARCH_OPENSEARCH_URL": "https://search-example.us-east-1.es.amazonaws.com",
    "CLIPSEARCH_INDEX": "images",
    "CLIPSEARCH_MODEL": "fake",
    "CLIPSEARCH_DIM": "16",
    "CLIPSEARCH_BUCKET": BUCKET,
    "CLIPSEARCH_CORS_ORIGIN": "https://photos.example.com",
    "POWERTOOLS_SERVICE_NAME": "clipsearch",
}


class FakeRuntime:
    """A sagemaker-runtime client whose endpoints run the fake encoder, or throttle."""

    def __init__(self, throttle: bool = False) -> None:
        self.encoder = FakeEncoder()
        self.throttle = throttle
        self.calls: list[tuple[str, str]] = []

    def invoke_endpoint(self, EndpointName: str, Body: bytes, ContentType: str, Accept: str) -> dict[str, Any]:  # noqa: N803
        self.calls.append((EndpointName, ContentType))
        if self.throttle:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, "InvokeEndpoint")
        if ContentType == "application/json":
            vectors = self.encoder.encode_texts(json.loads(Body)["inputs"])
        else:
            vectors = self.encoder.encode_images([decode_image(Body)])
        return {"Body": io.BytesIO(json.dumps(vectors.tolist()).encode()), "ContentType": "application/json"}


def shape(colour: tuple[int, int, int], box: bool = False) -> Image.Image:
    img = Image.new("RGB", (64, 64), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    (draw.rectangle if box else draw.ellipse)([12, 12, 52, 52], fill=colour)
    return img


@pytest.fixture
def s3(aws: None) -> Any:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return aws_config.boto_client("s3", signature_version="s3v4")  # as build_service makes it


@pytest.fixture
def index(tmp_path: Path) -> EmbeddedIndex:
    index = EmbeddedIndex(tmp_path / "index", model="fake", dim=16)
    encoder = FakeEncoder()
    pictures = [(ODD_KEY, "A red circle", shape((220, 30, 30))),
                ("shapes/blue square.png", "A blue square", shape((30, 30, 220), box=True)),
                ("shapes/green circle.png", "", shape((30, 180, 30)))]
    index.upsert([Document(key=key, bucket=BUCKET, title=title, vector=encoder.encode_images([img])[0])
                  for key, title, img in pictures])
    return index


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


def make_app(index: VectorIndex, s3: Any, runtime: FakeRuntime) -> APIGatewayRestResolver:
    config = aws_config.from_env("search", ENV)
    encoder = SageMakerEncoder(config.model, config.dim, config.text_endpoint, config.image_endpoint,
                               client=runtime)
    return build_search_app(config, encoder=encoder, index=index, s3=s3)


@pytest.fixture
def app(index: EmbeddedIndex, s3: Any, runtime: FakeRuntime) -> APIGatewayRestResolver:
    return make_app(index, s3, runtime)


def call(app: Any, event_name: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    event = json.loads((EVENTS / event_name).read_text())
    event["headers"].update(headers)
    event["multiValueHeaders"].update({k: [v] for k, v in headers.items()})
    response = app.resolve(event, LambdaContext())
    answer = {k.lower(): v[0] for k, v in (response.get("multiValueHeaders") or {}).items()}
    answer.update({k.lower(): v for k, v in (response.get("headers") or {}).items()})
    return response["statusCode"], answer, json.loads(response["body"])


# -- answers ---------------------------------------------------------------------------------------


def test_given_health_event_when_handled_then_status_model_and_count(app: Any) -> None:
    status, _, body = call(app, "health.json")
    assert (status, body) == (200, {"status": "ok", "model": "fake", "count": 3})


@pytest.mark.parametrize("event_name", ["search-get.json", "search-text.json"])
def test_given_text_query_when_handled_then_text_endpoint_is_called_and_hits_carry_presigned_urls(
        app: Any, runtime: FakeRuntime, event_name: str) -> None:
    status, _, body = call(app, event_name)

    assert status == 200 and body["query"] == {"type": "text", "text": "a red circle"}
    assert runtime.calls == [("clip-text", "application/json")]
    assert len(body["hits"]) == 3 and all(-1.0 <= h["score"] <= 1.0 for h in body["hits"])
    for hit in body["hits"]:
        url = urlsplit(hit["url"])
        query = parse_qs(url.query)
        assert BUCKET in url.netloc + url.path and unquote(url.path).endswith(hit["key"])
        assert int(query["X-Amz-Expires"][0]) <= 900 and query["X-Amz-Signature"]


def test_given_hits_when_answered_then_titles_come_from_the_index(app: Any) -> None:
    _, _, body = call(app, "search-text.json")
    titles = {h["key"]: h["title"] for h in body["hits"]}
    assert titles[ODD_KEY] == "A red circle" and titles["shapes/blue square.png"] == "A blue square"


@pytest.mark.parametrize("event_name", ["search-image.json", "search-binary.json"])
def test_given_red_circle_picture_when_searched_then_red_circle_comes_first_via_image_endpoint(
        app: Any, runtime: FakeRuntime, event_name: str) -> None:
    status, _, body = call(app, event_name)

    assert status == 200 and body["query"]["type"] == "image"
    assert body["hits"][0]["key"] == ODD_KEY
    assert runtime.calls == [("clip-image", "image/png")]


def test_given_options_when_searched_then_prefix_filter_applies(app: Any) -> None:
    status, _, body = call(app, "search-text-options.json")
    assert status == 200 and [h["key"] for h in body["hits"]] in ([ODD_KEY], [])
    assert all(h["score"] >= 0.1 for h in body["hits"])


def test_given_indexed_id_when_searched_then_similar_images_without_itself(app: Any, runtime: FakeRuntime) -> None:
    status, _, body = call(app, "search-id.json")
    assert status == 200 and body["query"] == {"type": "id", "id": doc_id(BUCKET, ODD_KEY)}
    assert ODD_KEY not in [h["key"] for h in body["hits"]] and len(body["hits"]) == 2
    assert runtime.calls == []


@pytest.mark.parametrize(("event_name", "status"), [
    ("bad-json.json", 400), ("bad-two-queries.json", 400), ("bad-k.json", 400), ("bad-base64.json", 400),
    ("bad-not-an-image.json", 400), ("unsupported-type.json", 415), ("unknown-id.json", 404),
])
def test_given_bad_request_when_handled_then_json_error_without_stack_trace(
        app: Any, event_name: str, status: int) -> None:
    got, headers, body = call(app, event_name)
    assert got == status and headers["content-type"] == "application/json"
    assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
    assert "Traceback" not in json.dumps(body)


def test_given_throttled_endpoint_when_searched_then_503_with_retry_after(index: EmbeddedIndex, s3: Any) -> None:
    app = make_app(index, s3, FakeRuntime(throttle=True))

    status, headers, body = call(app, "search-text.json")

    assert status == 503 and body["error"]["code"] == "unavailable"
    assert int(headers["retry-after"]) > 0


def test_given_unreachable_opensearch_when_searched_then_503_not_a_failed_cold_start(
        s3: Any, runtime: FakeRuntime) -> None:
    def opener() -> VectorIndex:
        raise Unavailable("OpenSearch at https://search-example unavailable for reading the mapping")

    app = make_app(LazyIndex(opener, "fake", 16), s3, runtime)

    for event_name in ("health.json", "search-text.json"):
        status, headers, _ = call(app, event_name)
        assert status == 503 and "retry-after" in headers


def test_given_browser_origin_when_answered_then_cors_header_is_set(app: Any) -> None:
    _, headers, _ = call(app, "search-text.json", Origin="https://photos.example.com")
    assert headers["access-control-allow-origin"] == "https://photos.example.com"


# -- the handler module ----------------------------------------------------------------------------


def test_given_environment_when_module_loads_then_no_remote_call_until_first_request(
        s3: Any, index: EmbeddedIndex, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)

    module = load_function("search")  # OpenSearch at an unreachable URL: opened lazily, so this works
    module.app = make_app(index, s3, runtime)
    response = module.handler(json.loads((EVENTS / "search-binary.json").read_text()), LambdaContext())

    assert response["statusCode"] == 200
    assert json.loads(response["body"])["hits"][0]["key"] == ODD_KEY


def test_given_no_bucket_when_search_config_is_read_then_config_error() -> None:
    env = {k: v for k, v in ENV.items() if k != "CLIPSEARCH_BUCKET"}
    with pytest.raises(ConfigError, match="CLIPSEARCH_BUCKET"):
        aws_config.from_env("search", env)


def test_given_presigned_url_expiry_over_15_minutes_when_read_then_config_error() -> None:
    with pytest.raises(ConfigError, match="CLIPSEARCH_URL_EXPIRY"):
        aws_config.from_env("search", {**ENV, "CLIPSEARCH_URL_EXPIRY": "3600"})


def test_given_image_vectors_when_compared_then_fake_runtime_matches_fake_encoder() -> None:
    # Guards the fake itself: the wire path (PNG over InvokeEndpoint) must not change the vector.
    img = shape((220, 30, 30))
    encoder = SageMakerEncoder("fake", 16, "clip-text", "clip-image", client=FakeRuntime())
    assert np.allclose(encoder.encode_images([img]), FakeEncoder().encode_images([img]), atol=1e-6)
