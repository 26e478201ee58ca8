"""Shared by the integration tests: the local SageMaker runtime, a moto server, fresh OpenSearch indices."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from support.sagemaker_endpoint import InvokeEndpointServer, running_endpoint

from clipsearch.index.opensearch import OpenSearchIndex


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InvokeEndpointServer]:
    """The demo model packaged by package-model, behind the toolkit, as strict as SageMaker Serverless."""
    with running_endpoint(tmp_path_factory.mktemp("endpoint")) as server:
        yield server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_url: str, endpoint: InvokeEndpointServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3 pointed at moto (S3) and the local SageMaker runtime, with test credentials."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",  # pragma: allowlist secret
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": moto_url,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint.url,
        # One attempt: a refused body reaches our code instead of botocore's retry loop.
        "AWS_MAX_ATTEMPTS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3(aws_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[Any]:
    """The test module's BUCKET on moto, emptied and removed afterwards."""
    bucket = request.module.BUCKET
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    yield client
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def make_index(opensearch_url: str) -> Iterator[Callable[..., OpenSearchIndex]]:
    """Opens OpenSearchIndex objects on fresh, uniquely named indices, dropped afterwards."""
    opened: list[OpenSearchIndex] = []

    def make(name: str | None = None, **kwargs: Any) -> OpenSearchIndex:
        kwargs.setdefault("model", "fake")
        kwargs.setdefault("dim", 16)  # test_opensearch_index.DIM
        idx = OpenSearchIndex(name or f"cs-test-{uuid.uuid4().hex[:10]}", url=opensearch_url, **kwargs)
        opened.append(idx)
        return idx

    yield make
    for idx in opened:
        idx.drop()
        idx.client.close()
