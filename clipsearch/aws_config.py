"""Lambda configuration: the environment set by template.yaml, read once at cold start.

Clients are created without an endpoint_url so that the standard AWS_ENDPOINT_URL_* variables can
point them at local stand-ins (moto, a local InvokeEndpoint server) in tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aws_lambda_powertools import Logger

from clipsearch.errors import ConfigError
from clipsearch.index.base import Document, Hit, IndexInfo, UpsertResult, VectorIndex
from clipsearch.models import KNOWN_DIMS

logger = Logger(service="clipsearch", child=True)

ROLES = ("ingest", "search")
AUTH_MODES = ("sigv4", "basic", "none")
# Presigned image URLs are short-lived: they are handed to browsers in search results.
MAX_URL_EXPIRY_S = 900


@dataclass(frozen=True)
class AwsConfig:
    """Everything a Lambda needs to know about its stack."""

    text_endpoint: str
    image_endpoint: str
    opensearch_url: str
    opensearch_auth: str
    index: str
    model: str
    dim: int
    bucket: str = ""
    cors_origin: str | None = None
    url_expiry_s: int = MAX_URL_EXPIRY_S


def from_env(role: str, env: Mapping[str, str] | None = None) -> AwsConfig:
    """Read the configuration for `ingest` or `search`; one log line and ConfigError when incomplete."""
    try:
        return _parse(role, os.environ if env is None else env)
    except ConfigError as e:
        logger.error(f"clipsearch {role} configuration: {e}")
        raise


def _parse(role: str, env: Mapping[str, str]) -> AwsConfig:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")

    def get(name: str) -> str:
        return (env.get(name) or "").strip()

    required = ["CLIPSEARCH_OPENSEARCH_URL", "CLIPSEARCH_INDEX", "CLIPSEARCH_MODEL"]
    if role == "search":
        required.append("CLIPSEARCH_BUCKET")
    single = get("CLIPSEARCH_ENDPOINT_NAME")
    text, image = get("CLIPSEARCH_TEXT_ENDPOINT_NAME") or single, get("CLIPSEARCH_IMAGE_ENDPOINT_NAME") or single
    missing = [name for name in required if not get(name)]
    if not image or (role == "search" and not text):
        missing.insert(0, "CLIPSEARCH_ENDPOINT_NAME (or CLIPSEARCH_TEXT_ENDPOINT_NAME and "
                       "CLIPSEARCH_IMAGE_ENDPOINT_NAME)")
    if missing:
        raise ConfigError(f"missing environment variable(s): {', '.join(missing)} (set by template.yaml)")
    auth = (get("CLIPSEARCH_OPENSEARCH_AUTH") or "sigv4").lower()
    if auth not in AUTH_MODES:
        raise ConfigError(f"CLIPSEARCH_OPENSEARCH_AUTH must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
    model = get("CLIPSEARCH_MODEL")
    return AwsConfig(
        text_endpoint=text or image,
        image_endpoint=image,
        opensearch_url=get("CLIPSEARCH_OPENSEARCH_URL"),
        opensearch_auth=auth,
        index=get("CLIPSEARCH_INDEX"),
        model=model,
        dim=_dimension(model, get("CLIPSEARCH_DIM")),
        bucket=get("CLIPSEARCH_BUCKET"),
        cors_origin=get("CLIPSEARCH_CORS_ORIGIN") or None,
        url_expiry_s=_expiry(get("CLIPSEARCH_URL_EXPIRY")),
    )


def _dimension(model: str, text: str) -> int:
    known = KNOWN_DIMS.get(model)
    if not text:
        if known is None:
            raise ConfigError(f"CLIPSEARCH_DIM is required for model {model!r} (its dimension is not known)")
        return known
    try:
        dim = int(text)
    except ValueError:
        raise ConfigError(f"CLIPSEARCH_DIM must be an integer, not {text!r}") from None
    if dim < 1 or (known is not None and dim != known):
        raise ConfigError(f"CLIPSEARCH_DIM={dim} does not fit model {model!r}"
                          + (f" (it gives {known})" if known else ""))
    return dim


def _expiry(text: str) -> int:
    if not text:
        return MAX_URL_EXPIRY_S
    try:
        seconds = int(text)
    except ValueError:
        raise ConfigError(f"CLIPSEARCH_URL_EXPIRY must be an integer, not {text!r}") from None
    if not 1 <= seconds <= MAX_URL_EXPIRY_S:
        raise ConfigError(f"CLIPSEARCH_URL_EXPIRY must be between 1 and {MAX_URL_EXPIRY_S} seconds")
    return seconds


# -- clients ------------------------------------------------------------------------------------


def boto_client(service: str, **config: Any) -> Any:
    """A boto3 client with optional botocore Config settings (read_timeout, signature_version, ...)."""
    import boto3
    from botocore.config import Config

    factory: Any = boto3.client  # typed per service name; the name here is a plain str
    return factory(service, config=Config(**config)) if config else factory(service)


def make_encoder(config: AwsConfig, read_timeout_s: float = 70.0, client: Any = None) -> Any:
    """The SageMaker endpoint(s) as an Encoder."""
    from clipsearch.encoders import SageMakerEncoder

    client = client or boto_client("sagemaker-runtime", read_timeout=read_timeout_s, connect_timeout=5)
    return SageMakerEncoder(config.model, config.dim, config.text_endpoint, config.image_endpoint,
                            client=client)


def make_index(config: AwsConfig, **options: Any) -> LazyIndex:
    """The OpenSearch index, opened (and created with the model's dimension) on first use."""
    from clipsearch.index import open_index

    def opener() -> VectorIndex:
        return open_index("opensearch", config.index, model=config.model, dim=config.dim,
                          url=config.opensearch_url, auth=config.opensearch_auth, **options)

    return LazyIndex(opener, config.model, config.dim)


class LazyIndex:
    """A VectorIndex that opens the real one on first use.

    A domain that is briefly unreachable then answers 503 per request instead of failing the cold
    start; model and dim are known up front from the configuration.
    """

    def __init__(self, opener: Callable[[], VectorIndex], model: str, dim: int) -> None:
        self._opener = opener
        self._index: VectorIndex | None = None
        self.model, self.dim = model, dim

    @property
    def opened(self) -> VectorIndex:
        if self._index is None:
            self._index = self._opener()
        return self._index

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        return self.opened.upsert(docs)

    def delete(self, ids: Sequence[str]) -> int:
        return self.opened.delete(ids)

    def get(self, id: str) -> Document | None:
        return self.opened.get(id)

    def search(self, vector: np.ndarray, k: int = 10, offset: int = 0, min_score: float | None = None,
               prefix: str | None = None) -> list[Hit]:
        return self.opened.search(vector, k=k, offset=offset, min_score=min_score, prefix=prefix)

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        return self.opened.fingerprints(prefix)

    def count(self) -> int:
        return self.opened.count()

    def info(self) -> IndexInfo:
        return self.opened.info()

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
