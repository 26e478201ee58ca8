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
from PIL import Image, ImageDraw
from support.fakes import FakeClock, FakeEncoder, LambdaContext, load_function

from clipsearch.aws import config as aws_config
from clipsearch.aws import search as aws_search
from clipsearch.aws.config import LazyIndex
from clipsearch.aws.search import build_search_app
from clipsearch.encoders import SageMakerEncoder, _client_error
from clipsearch.errors import BadRequest, ConfigError, Unavailable
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
            raise ClientError(
                {
                    "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "InvokeEndpoint",
            )
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
    return aws_config.s3_client()  # as build_service makes it


@pytest.fixture
def index(tmp_path: Path) -> EmbeddedIndex:
    index = EmbeddedIndex(tmp_path / "index", model="fake", dim=16)
    encoder = FakeEncoder()
    pictures = [
        (ODD_KEY, "A red circle", shape((220, 30, 30))),
        ("shapes/blue square.png", "A blue square", shape((30, 30, 220), box=True)),
        ("shapes/green circle.png", "", shape((30, 180, 30))),
    ]
    index.upsert(
        [
            Document(key=key, bucket=BUCKET, title=title, vector=encoder.encode_images([img])[0])
            for key, title, img in pictures
        ]
    )
    return index


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


def make_app(index: VectorIndex, s3: Any, runtime: FakeRuntime) -> APIGatewayRestResolver:
    config = aws_config.from_env("search", ENV)
    encoder = SageMakerEncoder(config.model, config.dim, config.text_endpoint, config.image_endpoint, client=runtime)
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
    app: Any, runtime: FakeRuntime, event_name: str
) -> None:
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
    app: Any, runtime: FakeRuntime, event_name: str
) -> None:
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


@pytest.mark.parametrize(
    ("event_name", "status"),
    [
        ("bad-json.json", 400),
        ("bad-two-queries.json", 400),
        ("bad-k.json", 400),
        ("bad-base64.json", 400),
        ("bad-not-an-image.json", 400),
        ("unsupported-type.json", 415),
        ("unknown-id.json", 404),
    ],
)
def test_given_bad_request_when_handled_then_json_error_without_stack_trace(
    app: Any, event_name: str, status: int
) -> None:
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
    s3: Any, runtime: FakeRuntime
) -> None:
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
    s3: Any, index: EmbeddedIndex, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
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


# -- presigned URLs on the regional host ------------------------------------------------------------


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "eu-north-1"])
def test_given_region_when_hits_are_presigned_then_urls_name_the_bucket_on_the_regional_host(
    index: EmbeddedIndex, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    # The global host (BUCKET.s3.amazonaws.com) redirects for buckets outside us-east-1 and newer
    # regions refuse it: S3 User Guide, "Virtual hosting of buckets". Presigning needs no network.
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # pragma: allowlist secret
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    config = aws_config.from_env("search", ENV)
    encoder = SageMakerEncoder(config.model, config.dim, config.text_endpoint, config.image_endpoint, client=runtime)
    app = build_search_app(config, encoder=encoder, index=index)  # the S3 client build_service makes

    status, _, body = call(app, "search-text.json")

    assert status == 200 and body["hits"]
    for hit in body["hits"]:
        url = urlsplit(hit["url"])
        assert (url.scheme, url.netloc) == ("https", f"{BUCKET}.s3.{region}.amazonaws.com")
        assert unquote(url.path) == "/" + hit["key"]
        assert parse_qs(url.query)["X-Amz-Credential"][0].split("/")[2] == region


def test_given_s3_endpoint_override_when_presigned_then_the_stand_in_host_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # pragma: allowlist secret
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://localhost:4566")

    url = urlsplit(
        aws_config.s3_client().generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": "a b.png"}, ExpiresIn=60
        )
    )

    assert (url.scheme, url.netloc, unquote(url.path)) == ("http", "localhost:4566", f"/{BUCKET}/a b.png")


# -- the time budget --------------------------------------------------------------------------------


class TimedRuntimes:
    """Makes the sagemaker-runtime client for a read timeout; records the read timeout of each call."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.read_timeouts: list[float] = []

    def __call__(self, read_timeout_s: float) -> Any:
        runtimes = self

        class Client:
            def invoke_endpoint(self, **kwargs: Any) -> dict[str, Any]:
                runtimes.read_timeouts.append(read_timeout_s)
                return runtimes.runtime.invoke_endpoint(**kwargs)

        return Client()


def timed_app(index: VectorIndex, s3: Any, runtimes: TimedRuntimes, clock: FakeClock) -> APIGatewayRestResolver:
    return build_search_app(
        aws_config.from_env("search", ENV),
        deadline=aws_search.search_deadline(clock),
        index=index,
        s3=s3,
        runtime=runtimes,
    )


@pytest.mark.parametrize("function_timeout_s", [29.0, 60.0, 900.0])
def test_given_function_timeout_when_text_is_searched_then_endpoint_and_index_fit_inside_api_gateways_29_s(
    index: EmbeddedIndex, s3: Any, runtime: FakeRuntime, function_timeout_s: float
) -> None:
    clock = FakeClock()
    runtimes = TimedRuntimes(runtime)
    app = timed_app(index, s3, runtimes, clock)

    event = json.loads((EVENTS / "search-text.json").read_text())
    response = app.resolve(event, LambdaContext(timeout_s=function_timeout_s, clock=clock))

    assert response["statusCode"] == 200 and runtime.calls == [("clip-text", "application/json")]
    # The endpoint's whole time (connect, read, the answer) and then one index call's worst case.
    (read_timeout,) = runtimes.read_timeouts
    worst = aws_search.ENDPOINT_CONNECT_TIMEOUT_S + read_timeout + 1.0 + aws_search.INDEX_CALL_S
    assert read_timeout >= 1.0 and worst < aws_search.API_GATEWAY_TIMEOUT_S


def test_given_cold_start_init_when_first_request_arrives_then_init_time_counts_against_api_gateway(
    index: EmbeddedIndex, s3: Any, runtime: FakeRuntime
) -> None:
    clock = FakeClock()
    runtimes = TimedRuntimes(runtime)
    app = timed_app(index, s3, runtimes, clock)
    clock.advance(6.0)  # module init: inside API Gateway's 29 s, outside the function's timeout

    for _ in range(2):
        event = json.loads((EVENTS / "search-text.json").read_text())
        assert app.resolve(event, LambdaContext(timeout_s=29.0, clock=clock))["statusCode"] == 200

    cold, warm = runtimes.read_timeouts
    assert warm - cold >= 5.0


def test_given_environment_initialised_long_before_its_first_request_when_searched_then_the_request_gets_a_full_budget(
    index: EmbeddedIndex, s3: Any, runtime: FakeRuntime
) -> None:
    # Lambda may initialise an environment ahead of any request (provisioned concurrency, proactive init):
    # the first request then waited through none of it.
    clock = FakeClock()
    runtimes = TimedRuntimes(runtime)
    app = timed_app(index, s3, runtimes, clock)
    clock.advance(300.0)

    for _ in range(2):
        event = json.loads((EVENTS / "search-text.json").read_text())
        assert app.resolve(event, LambdaContext(timeout_s=29.0, clock=clock))["statusCode"] == 200

    first, warm = runtimes.read_timeouts
    assert first == warm >= 1.0


def test_given_imports_before_the_app_is_built_when_first_request_arrives_then_they_count_against_api_gateway(
    index: EmbeddedIndex, s3: Any, runtime: FakeRuntime
) -> None:
    clock = FakeClock()
    runtimes = TimedRuntimes(runtime)
    module_start = clock()
    clock.advance(6.0)  # functions/search/app.py importing numpy, Pillow and Powertools
    app = build_search_app(
        aws_config.from_env("search", ENV),
        deadline=aws_search.search_deadline(clock, started_at=module_start),
        index=index,
        s3=s3,
        runtime=runtimes,
    )

    for _ in range(2):
        event = json.loads((EVENTS / "search-text.json").read_text())
        assert app.resolve(event, LambdaContext(timeout_s=29.0, clock=clock))["statusCode"] == 200

    cold, warm = runtimes.read_timeouts
    assert warm - cold >= 5.0


@pytest.mark.parametrize("seconds_left", [0.5, 5.0, aws_search.INDEX_CALL_S + 2.0])
def test_given_too_little_time_left_when_text_is_searched_then_503_with_retry_after_and_no_endpoint_call(
    index: EmbeddedIndex, s3: Any, runtime: FakeRuntime, seconds_left: float
) -> None:
    clock = FakeClock()
    app = timed_app(index, s3, TimedRuntimes(runtime), clock)
    event = json.loads((EVENTS / "search-text.json").read_text())

    response = app.resolve(event, LambdaContext(timeout_s=seconds_left, clock=clock))

    body = json.loads(response["body"])
    headers = {k.lower(): v for k, v in (response.get("multiValueHeaders") or {}).items()}
    assert response["statusCode"] == 503 and body["error"]["code"] == "unavailable"
    assert int(headers["retry-after"][0]) > 0 and headers["content-type"] == ["application/json"]
    assert runtime.calls == []


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("ValidationError", "Request payload size 5000000 exceeds the serverless limit", BadRequest),
        ("ValidationError", "Endpoint clipsearch of account 123456789012 not found.", Unavailable),
        ("ThrottlingException", "Rate exceeded", Unavailable),
    ],
)
def test_given_an_invoke_endpoint_refusal_when_mapped_then_only_an_oversized_body_is_the_callers_fault(
    code: str, message: str, expected: type[Exception]
) -> None:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400}}

    error = _client_error("clipsearch", response)

    assert type(error) is expected
    assert message.splitlines()[0] in str(error)
