"""Shared fixtures: the demo encoder (loaded once), the fake encoder, moto, the real OpenSearch URL, logs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fakes import FakeEncoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_encoder():
    """The bundled demo CLIP through model_code, as `clipsearch` uses it."""
    from clipsearch.encoders import LocalEncoder

    return LocalEncoder("demo")


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-process AWS, with test credentials and no endpoint or profile from the environment."""
    from moto import mock_aws

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # pragma: allowlist secret
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


@pytest.fixture(scope="session")
def opensearch_url() -> str:
    """The real OpenSearch node that `make test` starts; its absence is a failure, not a skip."""
    url = os.environ.get("CLIPSEARCH_OPENSEARCH_URL")
    if not url:
        pytest.fail(
            "CLIPSEARCH_OPENSEARCH_URL is not set: run the suite with `make test`, which starts "
            "a real OpenSearch node (scripts/opensearch-local start)"
        )
    return url


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Messages logged under the service logger `clipsearch` (the Lambda prints them as JSON lines)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("clipsearch")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
