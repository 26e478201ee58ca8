"""AWS search: the shared routes (api.py) over the SageMaker encoder and the OpenSearch index.

Hits link to their image with a short-lived presigned S3 URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware

from clipsearch.aws import config as aws_config
from clipsearch.aws.config import AwsConfig
from clipsearch.encoders import Encoder
from clipsearch.http.routes import build_app
from clipsearch.index.base import Hit, VectorIndex
from clipsearch.search import SearchService

# API Gateway answers 504 itself once its integration timeout passes: 29 s by default for REST APIs
# (API Gateway Developer Guide, "Amazon API Gateway quotas": integration timeout 50 ms - 29 s; Regional
# APIs may raise it by quota request). The function must have answered, with its own 503, by then.
API_GATEWAY_TIMEOUT_S = 29.0
# Kept back from the deadline: the runtime's start before our module loads, writing the response, and
# API Gateway's own overhead.
RESPONSE_RESERVE_S = 1.5
# A k-NN query takes milliseconds; one quick retry of a 429/5xx/connection error, then a 503.
INDEX_OPTIONS: dict[str, Any] = {"timeout_s": 4.0, "max_retries": 1, "backoff_s": 0.2}
INDEX_CALL_S = 2 * 4.0 + 0.2  # worst case of one index call with INDEX_OPTIONS
# The encoder gets what is left after its connect and one index call, at most this; a read timeout is not
# retried, throttling is while the time allows (aws_config.EndpointRuntime).
ENDPOINT_MAX_READ_TIMEOUT_S = 20.0
ENDPOINT_CONNECT_TIMEOUT_S = 2.0


def presigner(s3: Any, bucket: str, expires_s: int) -> Callable[[Hit], str]:
    """url_for(hit): a GET URL for the hit's object that expires after expires_s seconds."""

    def url_for(hit: Hit) -> str:
        return str(
            s3.generate_presigned_url(
                "get_object", Params={"Bucket": hit.bucket or bucket, "Key": hit.key}, ExpiresIn=expires_s
            )
        )

    return url_for


def build_service(
    config: AwsConfig,
    encoder: Encoder | None = None,
    index: VectorIndex | None = None,
    s3: Any = None,
    deadline: aws_config.Deadline | None = None,
    runtime: Callable[[float], Any] | None = None,
) -> SearchService:
    """The search service for this stack; pass encoder/index/s3 to use stand-ins.

    runtime(read_timeout_s) makes the sagemaker-runtime client (default: boto3's, one attempt per call).
    """
    deadline = deadline or search_deadline()
    if encoder is None:
        timed = aws_config.EndpointRuntime(
            deadline,
            ENDPOINT_MAX_READ_TIMEOUT_S,
            reserve_s=INDEX_CALL_S,
            connect_timeout_s=ENDPOINT_CONNECT_TIMEOUT_S,
            factory=runtime,
        )
        timed.prepare(API_GATEWAY_TIMEOUT_S - RESPONSE_RESERVE_S)  # a warm request's client
        encoder = aws_config.make_encoder(config, timed)
    index = index or aws_config.make_index(config, deadline, INDEX_CALL_S, **INDEX_OPTIONS)
    # Presigning is local; S3 itself is never called on the search path.
    s3 = s3 or aws_config.s3_client()
    return SearchService(encoder, index, url_for=presigner(s3, config.bucket, config.url_expiry_s))


def search_deadline(
    clock: Callable[[], float] = time.monotonic, started_at: float | None = None
) -> aws_config.Deadline:
    """The search function's deadline: API Gateway's timeout or the function's, whichever comes first.

    started_at: clock() when the function's module began loading (default: now); a first request that came
    during init counts from then.
    """
    return aws_config.Deadline(
        reserve_s=RESPONSE_RESERVE_S, limit_s=API_GATEWAY_TIMEOUT_S, clock=clock, started_at=started_at
    )


def build_search_app(
    config: AwsConfig, deadline: aws_config.Deadline | None = None, started_at: float | None = None, **overrides: Any
) -> APIGatewayRestResolver:
    """The API Gateway resolver for the search Lambda; each request starts the deadline.

    started_at: time.monotonic() at the top of the function's module, before its imports.
    """
    deadline = deadline or search_deadline(started_at=started_at)
    app = build_app(build_service(config, deadline=deadline, **overrides), cors_origin=config.cors_origin)

    def start_deadline(app: APIGatewayRestResolver, next_middleware: NextMiddleware) -> Response:
        deadline.start(app.lambda_context)
        return next_middleware(app)

    app.use(middlewares=[start_deadline])
    return app
