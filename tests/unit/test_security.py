"""The security pass: what the template grants, how long image links live, what the local server exposes,
and that the repository holds no secrets.

The template checks read the transformed template (test_template.Deployed: SAM transform with the
conditions evaluated), for every layout the template supports. docs/security.md holds the checkov table.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from PIL import Image
from support.fakes import FakeEncoder
from support.template import LAYOUTS, Deployed, as_list

from clipsearch.aws import config as aws_config
from clipsearch.aws.config import MAX_URL_EXPIRY_S, AwsConfig
from clipsearch.aws.search import build_search_app, presigner
from clipsearch.http.server import LocalServer, make_server
from clipsearch.index.base import Document, Hit
from clipsearch.index.embedded import EmbeddedIndex

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = "DO-NOT-SERVE-7c1d"
FIFTEEN_MINUTES = 15 * 60


@pytest.fixture(scope="module", params=range(len(LAYOUTS)), ids=["default", "split+iam", "vpc+suffix"])
def deployed(request: pytest.FixtureRequest) -> Deployed:
    return Deployed(**LAYOUTS[request.param])


@pytest.fixture(scope="module")
def default() -> Deployed:
    return Deployed()


# -- IAM -------------------------------------------------------------------------------------------


def _allows(deployed: Deployed) -> Iterator[tuple[str, str, Any]]:
    for owner, st in deployed.statements():
        if st.get("Effect") == "Allow":
            for action in as_list(st.get("Action", [])):
                yield owner, str(action).lower(), st.get("Resource")


def test_given_any_layout_when_iam_is_read_then_no_s3_es_or_sagemaker_action_names_a_wildcard_resource(
    deployed: Deployed,
) -> None:
    for owner, action, resource in _allows(deployed):
        if action.startswith(("s3:", "es:", "sagemaker:")):
            assert "*" not in as_list(resource), f"{owner}: {action} on *"


def test_given_any_layout_when_iam_is_read_then_no_service_wide_or_global_action_is_allowed(deployed: Deployed) -> None:
    for owner, action, _ in _allows(deployed):
        assert action not in ("*", "s3:*", "es:*", "sagemaker:*", "sqs:*", "iam:*"), f"{owner}: {action}"


# -- API auth, encryption ----------------------------------------------------------------------------


def test_given_default_parameters_when_deployed_then_every_api_method_requires_auth(default: Deployed) -> None:
    assert default.params["ApiAuth"] in ("API_KEY", "AWS_IAM")
    allowed = default.template["Parameters"]["ApiAuth"]["AllowedValues"]
    assert "NONE" not in allowed and len(allowed) == 2  # auth cannot be switched off by a parameter
    (api,) = default.of_type("AWS::ApiGateway::RestApi").values()
    methods = [
        (path, verb, spec)
        for path, item in api["Properties"]["Body"]["paths"].items()
        for verb, spec in item.items()
        if verb != "options"
    ]
    assert methods
    for path, verb, spec in methods:
        assert spec.get("security"), f"{verb.upper()} {path} is open"


def test_given_default_parameters_when_deployed_then_bucket_is_encrypted_and_private(default: Deployed) -> None:
    (bucket,) = default.of_type("AWS::S3::Bucket").values()
    props = bucket["Properties"]
    rules = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rules and rules[0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert all(props["PublicAccessBlockConfiguration"].values())


def test_given_default_parameters_when_deployed_then_domain_encrypts_at_rest_in_transit_and_between_nodes(
    default: Deployed,
) -> None:
    (domain,) = default.of_type("AWS::OpenSearchService::Domain").values()
    props = domain["Properties"]
    assert props["EncryptionAtRestOptions"]["Enabled"] is True
    assert props["NodeToNodeEncryptionOptions"]["Enabled"] is True
    assert props["DomainEndpointOptions"]["EnforceHTTPS"] is True
    assert "TLS-1-2" in props["DomainEndpointOptions"]["TLSSecurityPolicy"]


def test_given_default_parameters_when_deployed_then_queues_are_encrypted(default: Deployed) -> None:
    queues = default.of_type("AWS::SQS::Queue")
    assert queues
    for name, queue in queues.items():
        props = queue["Properties"]
        assert props.get("SqsManagedSseEnabled") is True or props.get("KmsMasterKeyId"), name


# -- presigned URLs ----------------------------------------------------------------------------------


@pytest.fixture
def s3(aws: None) -> Any:
    return boto3.client("s3", config=Config(signature_version="s3v4"))


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_given_default_config_when_a_hit_url_is_signed_then_it_expires_within_15_minutes(s3: Any) -> None:
    env = {
        "CLIPSEARCH_ENDPOINT_NAME": "e",
        "CLIPSEARCH_OPENSEARCH_URL": "https://x",
        "CLIPSEARCH_INDEX": "i",
        "CLIPSEARCH_MODEL": "RN50",
        "CLIPSEARCH_BUCKET": "b",
    }
    config = aws_config.from_env("search", env)

    url = presigner(s3, config.bucket, config.url_expiry_s)(Hit(id="1", key="a b.jpg", score=0.5, bucket="b"))

    assert 0 < _expires(url) <= FIFTEEN_MINUTES
    assert MAX_URL_EXPIRY_S <= FIFTEEN_MINUTES


@pytest.mark.parametrize("value", ["901", "3600", "604800", "0", "-1"])
def test_given_an_expiry_outside_15_minutes_when_configured_then_refused(value: str) -> None:
    env = {
        "CLIPSEARCH_ENDPOINT_NAME": "e",
        "CLIPSEARCH_OPENSEARCH_URL": "https://x",
        "CLIPSEARCH_INDEX": "i",
        "CLIPSEARCH_MODEL": "RN50",
        "CLIPSEARCH_BUCKET": "b",
        "CLIPSEARCH_URL_EXPIRY": value,
    }

    with pytest.raises(aws_config.ConfigError):
        aws_config.from_env("search", env)


def test_given_the_template_when_deployed_then_the_search_function_signs_for_at_most_15_minutes(
    default: Deployed,
) -> None:
    env = default.resources["SearchFunction"]["Properties"]["Environment"]["Variables"]

    assert 0 < int(env.get("CLIPSEARCH_URL_EXPIRY", MAX_URL_EXPIRY_S)) <= FIFTEEN_MINUTES


# -- the local server --------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalServer]:
    """A server over one indexed picture, with a secret file beside the picture and above it."""
    encoder = FakeEncoder()
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "secret.txt").write_text(MARKER)
    (photos / "secret.jpg").write_text(MARKER)  # not indexed: an image name must not be enough
    picture = photos / "red.png"
    Image.new("RGB", (16, 16), (220, 30, 30)).save(picture)
    index = EmbeddedIndex(tmp_path / "index", model=encoder.model, dim=encoder.dim)
    index.upsert([Document(key=str(picture), vector=encoder.encode_images([Image.open(picture)])[0])])
    with make_server(index, encoder, port=0, max_body=64 * 1024).start() as srv:
        yield srv


def get(
    server: LocalServer,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


TRAVERSALS = [
    "/images/../secret.txt",
    "/images/%2e%2e/secret.txt",
    "/images/%2e%2e%2fsecret.txt",
    "/images/%252e%252e%252fsecret.txt",  # double-encoded
    "/images/%25252e%25252e%25252fsecret.txt",  # triple-encoded
    "/images/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/images/%2e%2e%5c%2e%2e%5csecret.txt",  # backslashes
    "/images/secret.jpg",
    "/images/%2Fetc%2Fpasswd",
    "/images/%00../secret.txt",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/web/../secret.txt",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_given_encoded_traversal_when_requested_then_404_and_no_file_leaks(server: LocalServer, path: str) -> None:
    status, _, body = get(server, path)

    assert status == 404
    assert MARKER.encode() not in body and b"root:" not in body


def test_given_the_indexed_picture_when_asked_by_id_then_only_that_route_serves_it(server: LocalServer) -> None:
    status, _, body = get(server, "/search?q=red&k=1")
    (hit,) = json.loads(body)["hits"]

    assert status == 200 and hit["url"] == f"/images/{hit['id']}"
    assert get(server, hit["url"])[0] == 200
    assert get(server, "/images/" + hit["key"])[0] == 404  # the path itself is not an id


@pytest.mark.parametrize("path", ["/images/", "/images", "/web/", "/static/", "/clipsearch/", "/.git/", "/index/"])
def test_given_folder_paths_when_requested_then_no_directory_listing(server: LocalServer, path: str) -> None:
    status, headers, body = get(server, path)

    assert status == 404 and headers["content-type"].startswith("application/json")
    assert b"Index of" not in body and b"<a href" not in body


def test_given_no_host_option_when_serving_then_only_loopback_is_bound(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    index = EmbeddedIndex(tmp_path / "i", model=encoder.model, dim=encoder.dim)

    with make_server(index, encoder, port=0) as srv:
        assert srv.server_address[0] == "127.0.0.1" and srv.loopback_only


def test_given_a_body_over_the_limit_when_posted_then_413_before_searching(server: LocalServer) -> None:
    status, _, body = get(server, "/search", "POST", b"x" * (64 * 1024 + 1), {"Content-Type": "image/png"})

    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/search?q=red"), ("OPTIONS", "/search"), ("POST", "/search"), ("GET", "/health"), ("GET", "/")],
)
def test_given_a_cross_origin_request_when_answered_then_no_cors_grant(
    server: LocalServer, method: str, path: str
) -> None:
    headers = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Content-Type": "application/json",
    }
    body = b'{"text": "red"}' if method == "POST" else None

    _, answer, _ = get(server, path, method, body, headers)

    assert not any(name.startswith("access-control-allow") for name in answer)


def test_given_no_cors_origin_when_the_search_lambda_answers_then_no_cors_grant(s3: Any, tmp_path: Path) -> None:
    encoder = FakeEncoder()
    index = EmbeddedIndex(tmp_path / "i", model=encoder.model, dim=encoder.dim)
    config = AwsConfig(
        text_endpoint="e",
        image_endpoint="e",
        opensearch_url="https://x",
        opensearch_auth="none",
        index="i",
        model=encoder.model,
        dim=encoder.dim,
        bucket="b",
    )
    app = build_search_app(config, encoder=encoder, index=index, s3=s3)
    event = json.loads((ROOT / "events" / "api" / "search-text.json").read_text())
    event["headers"]["Origin"] = "https://evil.example"

    response = app.resolve(event, None)  # type: ignore[arg-type]

    assert response["statusCode"] == 200
    headers = {**(response.get("headers") or {}), **(response.get("multiValueHeaders") or {})}
    assert not any(name.lower().startswith("access-control-allow") for name in headers)


# -- secrets -----------------------------------------------------------------------------------------


def _findings(results: dict[str, list[dict[str, Any]]]) -> set[tuple[str, str]]:
    return {(name, item["hashed_secret"]) for name, items in results.items() for item in items}


def test_given_the_repository_when_scanned_for_secrets_then_nothing_beyond_the_reviewed_baseline() -> None:
    scanner = BIN / "detect-secrets"
    if not scanner.exists():
        pytest.fail("detect-secrets is not installed: it belongs in the dev extra (make install)")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    files = [f for f in files if (ROOT / f).is_file() and f != ".secrets.baseline"]
    baseline = json.loads((ROOT / ".secrets.baseline").read_text())

    # A read-only scan (the hook would rewrite the baseline's line numbers), compared by file and hash.
    proc = subprocess.run(
        [str(scanner), "scan", *files], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )

    new = _findings(json.loads(proc.stdout)["results"]) - _findings(baseline["results"])
    assert not new, (
        f"possible secrets not in .secrets.baseline (review, then `detect-secrets scan --baseline "
        f".secrets.baseline`): {sorted(new)}"
    )
    assert all(item.get("is_secret") is False for items in baseline["results"].values() for item in items), (
        "the baseline holds a finding not yet marked as a false positive (detect-secrets audit)"
    )
