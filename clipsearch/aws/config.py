"""Lambda configuration: the environment set by template.yaml, read once at cold start.

Clients are created without an endpoint_url so that the standard AWS_ENDPOINT_URL_* variables can
point them at local stand-ins (moto, a local InvokeEndpoint server) in tests.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aws_lambda_powertools import Logger

from clipsearch.duplicates import scannable
from clipsearch.errors import ConfigError, Unavailable
from clipsearch.index.base import DateRange, Document, Hit, IndexInfo, UpsertResult, VectorIndex
from clipsearch.index.opensearch import AUTH_MODES
from clipsearch.models import KNOWN_DIMS

logger = Logger(service="clipsearch", child=True)

ROLES = ("ingest", "search")
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
    # Replica shards per primary when the index is created: template.yaml sets 1 on a multi-AZ domain.
    replicas: int = 0


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
        missing.insert(
            0, "CLIPSEARCH_ENDPOINT_NAME (or CLIPSEARCH_TEXT_ENDPOINT_NAME and CLIPSEARCH_IMAGE_ENDPOINT_NAME)"
        )
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
        replicas=_replicas(get("CLIPSEARCH_OPENSEARCH_REPLICAS")),
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
        raise ConfigError(
            f"CLIPSEARCH_DIM={dim} does not fit model {model!r}" + (f" (it gives {known})" if known else "")
        )
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


def _replicas(text: str) -> int:
    try:
        replicas = int(text or "0")
    except ValueError:
        raise ConfigError(f"CLIPSEARCH_OPENSEARCH_REPLICAS must be an integer, not {text!r}") from None
    if replicas < 0:
        raise ConfigError(f"CLIPSEARCH_OPENSEARCH_REPLICAS must be 0 or more, not {replicas}")
    return replicas


# -- clients ------------------------------------------------------------------------------------
#
# botocore's default retry mode ("legacy") makes 5 attempts and retries read timeouts (boto3 guide,
# "Retries": legacy mode). A hung endpoint then cost the search path about 100 s, so every client
# here states its attempts ("standard" mode, total_max_attempts) and its timeouts, and the callers
# fit them into the time the invocation has left.


class DeadlineExceeded(Unavailable):
    """Too little of the invocation's time is left for this call; retrying later can succeed."""


# Lambda's init phase is limited to 10 s; a longer init is run again inside the first invocation, under the
# function's timeout. Lambda may also initialise an environment well before any request arrives (provisioned
# concurrency, proactive initialisation of on-demand functions). (Lambda Developer Guide, "Understanding the
# Lambda execution environment lifecycle": Init phase.) So init time counts only for a request that arrives
# within this long of the start.
INIT_PHASE_LIMIT_S = 10.0


class Deadline:
    """How long the current invocation has left: the Lambda context's remaining time less a reserve,
    and at most `limit_s` from the invocation's start (API Gateway's own timeout, for search).

    `start(context)` at the start of each invocation. A request that arrives within INIT_PHASE_LIMIT_S of
    `started_at` (when the function's module began loading; default: when this object was made) waited
    through that init, which runs inside API Gateway's timeout but outside Lambda's, so its limit counts
    from `started_at`. A later first request met an environment initialised ahead of it: counted from now.
    """

    def __init__(
        self,
        reserve_s: float = 0.0,
        limit_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
    ) -> None:
        self.reserve_s, self.limit_s, self._clock = reserve_s, limit_s, clock
        self._context: Any = None
        self._limit_at: float | None = None
        self._loaded_at: float | None = clock() if started_at is None else started_at

    def start(self, context: Any) -> None:
        """Begin an invocation; context is the Lambda context (None: no deadline but limit_s)."""
        self._context = context
        now = self._clock()
        if self.limit_s is not None:
            began = now
            if self._loaded_at is not None and now - self._loaded_at <= INIT_PHASE_LIMIT_S:
                began = self._loaded_at
            self._limit_at = began + self.limit_s
        self._loaded_at = None

    def remaining_s(self) -> float:
        left = math.inf
        if self._context is not None:
            left = self._context.get_remaining_time_in_millis() / 1000.0
        if self._limit_at is not None:
            left = min(left, self._limit_at - self._clock())
        return left - self.reserve_s


def boto_client(service: str, *, attempts: int, connect_timeout_s: float, read_timeout_s: float, **config: Any) -> Any:
    """A boto3 client with explicit retries (standard mode, `attempts` in all) and timeouts.

    No endpoint_url: the standard AWS_ENDPOINT_URL_* variables still point it at a stand-in.
    """
    import boto3
    from botocore.config import Config

    factory: Any = boto3.client  # typed per service name; the name here is a plain str
    return factory(
        service,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            **config,
        ),
    )


def s3_client(attempts: int = 2, connect_timeout_s: float = 3.0, read_timeout_s: float = 10.0) -> Any:
    """S3 on the regional endpoint with virtual-hosted addressing, signing with SigV4.

    Presigned URLs then name BUCKET.s3.REGION.amazonaws.com in every region. Without these settings
    botocore presigns on the global host BUCKET.s3.amazonaws.com, which redirects for buckets outside
    us-east-1 and which newer regions refuse (S3 User Guide, "Virtual hosting of buckets" and
    "Making requests": use the Region-specific endpoint). For us-east-1 botocore keeps the legacy
    global endpoint unless the s3 option us_east_1_regional_endpoint is "regional" (botocore.config).
    """
    s3: dict[str, str] = {"us_east_1_regional_endpoint": "regional"}
    if not _endpoint_override("S3"):
        # A stand-in on a custom host (AWS_ENDPOINT_URL_S3) keeps botocore's choice: path style.
        s3["addressing_style"] = "virtual"
    return boto_client(
        "s3",
        attempts=attempts,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        signature_version="s3v4",
        s3=s3,
    )


def _endpoint_override(service_env: str) -> bool:
    """Whether the standard endpoint variables send this service to another host (a stand-in)."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return False
    return bool(os.environ.get(f"AWS_ENDPOINT_URL_{service_env}") or os.environ.get("AWS_ENDPOINT_URL"))


# The read timeouts EndpointRuntime's clients are made with (besides its own minimum and maximum): a call
# takes the largest that fits, so a few clients serve an invocation that runs down, each made once.
READ_TIMEOUT_BUCKETS_S = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 30.0, 40.0, 55.0, 70.0)
# InvokeEndpoint errors that say "not now", worth a retry while the deadline allows (SageMaker API Reference,
# InvokeEndpoint, Errors): ThrottlingException (400), ServiceUnavailable (503), ModelNotReadyException (429:
# a serverless variant's resources are still being provisioned). Read timeouts are never retried: the endpoint
# may still be working on the first request.
RETRY_CODES = frozenset({"ThrottlingException", "ServiceUnavailable", "ModelNotReadyException"})
ENDPOINT_ATTEMPTS = 3
# Kept after an endpoint call's read timeout: reading the answer once its first byte is in.
ANSWER_READ_S = 1.0


class EndpointRuntime:
    """sagemaker-runtime's invoke_endpoint with a read timeout that fits the deadline; throttling and
    "not ready" answers are retried with jittered backoff (at most `attempts` in all) while it allows.

    botocore fixes read_timeout per client, so a call takes the largest of a few fixed read timeouts
    (READ_TIMEOUT_BUCKETS_S, min_read_timeout_s, max_read_timeout_s) that fits, and one client is kept for
    each. `reserve_s` is kept back for the work after the call (the index). SageMaker gives a container 60 s
    to answer and advises a 70 s socket timeout (InvokeEndpoint, SageMaker API Reference), so
    max_read_timeout_s above 70 only waits for SageMaker's own error.
    """

    def __init__(
        self,
        deadline: Deadline,
        max_read_timeout_s: float,
        reserve_s: float = 0.0,
        connect_timeout_s: float = 3.0,
        min_read_timeout_s: float = 1.0,
        factory: Callable[[float], Any] | None = None,
        attempts: int = ENDPOINT_ATTEMPTS,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.deadline = deadline
        self.max_read_timeout_s, self.min_read_timeout_s = max_read_timeout_s, min_read_timeout_s
        self.reserve_s, self.connect_timeout_s = reserve_s, connect_timeout_s
        self.attempts, self.backoff_s, self._sleep = attempts, backoff_s, sleep
        self.buckets = sorted(
            {b for b in READ_TIMEOUT_BUCKETS_S if min_read_timeout_s <= b <= max_read_timeout_s}
            | {min_read_timeout_s, max_read_timeout_s}
        )
        self._factory = factory or self._client
        self._clients: dict[float, Any] = {}
        self._lock = threading.Lock()

    def read_timeout_s(self, remaining_s: float | None = None) -> float:
        """The read timeout a call gets with remaining_s left (default: the deadline's); 0 when none fits."""
        if remaining_s is None:
            remaining_s = self.deadline.remaining_s()
        left = remaining_s - self.reserve_s - self.connect_timeout_s - ANSWER_READ_S
        return max((b for b in self.buckets if b <= left), default=0.0)

    def prepare(self, remaining_s: float) -> None:
        """Make now the client a call with remaining_s left would use: the cold start, not the first
        request, then pays for loading the service model."""
        self._client_for(self.read_timeout_s(remaining_s) or self.min_read_timeout_s)

    def invoke_endpoint(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        for attempt in range(self.attempts):
            timeout = self.read_timeout_s()
            if timeout < self.min_read_timeout_s:
                raise DeadlineExceeded(
                    f"too little time left to call encoder endpoint {kwargs.get('EndpointName')}; retry later"
                )
            try:
                return self._client_for(timeout).invoke_endpoint(**kwargs)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in RETRY_CODES or attempt + 1 == self.attempts:
                    raise
                pause = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
                if self.read_timeout_s(self.deadline.remaining_s() - pause) < self.min_read_timeout_s:
                    raise  # no time for another attempt: the caller maps the endpoint's own answer
                logger.info(
                    "encoder endpoint busy; retrying",
                    extra={"code": e.response["Error"]["Code"], "attempt": attempt + 1},
                )
                self._sleep(pause)
        raise AssertionError("unreachable")

    def _client_for(self, read_timeout_s: float) -> Any:
        # One client per read timeout, made once even when threads ask together (boto3's default session
        # is not thread-safe, so making clients is serialised too).
        with self._lock:
            client = self._clients.get(read_timeout_s)
            if client is None:
                client = self._clients[read_timeout_s] = self._factory(read_timeout_s)
            return client

    def _client(self, read_timeout_s: float) -> Any:
        return boto_client(
            "sagemaker-runtime", attempts=1, connect_timeout_s=self.connect_timeout_s, read_timeout_s=read_timeout_s
        )


def make_encoder(config: AwsConfig, runtime: Any) -> Any:
    """The SageMaker endpoint(s) as an Encoder, called through runtime (an EndpointRuntime)."""
    from clipsearch.encoders import SageMakerEncoder

    return SageMakerEncoder(config.model, config.dim, config.text_endpoint, config.image_endpoint, client=runtime)


def make_index(
    config: AwsConfig, deadline: Deadline | None = None, call_time_s: float = 0.0, **options: Any
) -> LazyIndex:
    """The OpenSearch index, opened (and created with the model's dimension) on first use.

    options go to OpenSearchIndex (timeout_s, max_retries, backoff_s); call_time_s is the worst case
    they give one call, refused up front when the deadline leaves less. The index checks the deadline
    before each attempt and each backoff, opening included (reading the mapping, creating the index).
    """
    from clipsearch.index import open_index

    def opener() -> VectorIndex:
        return open_index(
            "opensearch",
            config.index,
            model=config.model,
            dim=config.dim,
            url=config.opensearch_url,
            auth=config.opensearch_auth,
            replicas=config.replicas,
            deadline=deadline.remaining_s if deadline is not None else None,
            **options,
        )

    return LazyIndex(opener, config.model, config.dim, deadline, call_time_s)


class LazyIndex:
    """A VectorIndex that opens the real one on first use.

    A domain that is briefly unreachable then answers 503 per request instead of failing the cold
    start; model and dim are known up front from the configuration.
    """

    def __init__(
        self,
        opener: Callable[[], VectorIndex],
        model: str,
        dim: int,
        deadline: Deadline | None = None,
        call_time_s: float = 0.0,
    ) -> None:
        self._opener = opener
        self._index: VectorIndex | None = None
        self.model, self.dim = model, dim
        self._deadline, self._call_time_s = deadline, call_time_s

    @property
    def opened(self) -> VectorIndex:
        if self._deadline is not None and self._deadline.remaining_s() < self._call_time_s:
            raise DeadlineExceeded("too little time left to call OpenSearch; retry later")
        if self._index is None:
            self._index = self._opener()
        return self._index

    def upsert(self, docs: Sequence[Document]) -> UpsertResult:
        return self.opened.upsert(docs)

    def delete(self, ids: Sequence[str]) -> int:
        return self.opened.delete(ids)

    def get(self, id: str) -> Document | None:
        return self.opened.get(id)

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        offset: int = 0,
        min_score: float | None = None,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        return self.opened.search(vector, k=k, offset=offset, min_score=min_score, prefix=prefix, taken=taken)

    def lexical(
        self,
        text: str,
        vector: np.ndarray,
        k: int = 10,
        prefix: str | None = None,
        taken: DateRange | None = None,
    ) -> list[Hit]:
        return self.opened.lexical(text, vector, k=k, prefix=prefix, taken=taken)

    def fingerprints(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        return self.opened.fingerprints(prefix)

    # The duplicate scan (GET /duplicates): the backend's own answers, through the same deadline check.
    def exact_groups(self) -> list[tuple[str, int]]:
        return scannable(self.opened).exact_groups()

    def members(self, content_hashes: Sequence[str], cap: int) -> dict[str, list[str]]:
        return scannable(self.opened).members(content_hashes, cap)

    def perceptual_hashes(self) -> list[tuple[str, str, str]]:
        return scannable(self.opened).perceptual_hashes()

    def documents(self, ids: Sequence[str]) -> dict[str, Document]:
        return scannable(self.opened).documents(ids)

    def count(self) -> int:
        return self.opened.count()

    def info(self) -> IndexInfo:
        return self.opened.info()

    def close(self) -> None:
        if self._index is not None:
            self._index.close()

    def scan(self, batch: int = 500) -> Iterator[list[Document]]:
        return self.opened.scan(batch)
