"""Stand-ins shared by the AWS integration tests: the local SageMaker runtime and a moto server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from support.sagemaker_endpoint import InvokeEndpointServer, running_endpoint


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
