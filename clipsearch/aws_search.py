"""AWS search: the shared routes (api.py) over the SageMaker encoder and the OpenSearch index.

Hits link to their image with a short-lived presigned S3 URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver

from clipsearch import aws_config
from clipsearch.api import build_app
from clipsearch.aws_config import AwsConfig
from clipsearch.encoders import Encoder
from clipsearch.index.base import Hit, VectorIndex
from clipsearch.search import SearchService

# API Gateway gives up after 29 s, so a slow endpoint should fail first, as a 503 the client can retry.
ENDPOINT_READ_TIMEOUT_S = 20.0


def presigner(s3: Any, bucket: str, expires_s: int) -> Callable[[Hit], str]:
    """url_for(hit): a GET URL for the hit's object that expires after expires_s seconds."""

    def url_for(hit: Hit) -> str:
        return str(s3.generate_presigned_url(
            "get_object", Params={"Bucket": hit.bucket or bucket, "Key": hit.key}, ExpiresIn=expires_s))

    return url_for


def build_service(config: AwsConfig, encoder: Encoder | None = None, index: VectorIndex | None = None,
                  s3: Any = None) -> SearchService:
    """The search service for this stack; pass encoder/index/s3 to use stand-ins."""
    encoder = encoder or aws_config.make_encoder(config, read_timeout_s=ENDPOINT_READ_TIMEOUT_S)
    # Few, quick retries: a search is interactive, and a 503 tells the client to retry.
    index = index or aws_config.make_index(config, max_retries=2, backoff_s=0.2, timeout_s=10.0)
    s3 = s3 or aws_config.boto_client("s3", signature_version="s3v4")
    return SearchService(encoder, index, url_for=presigner(s3, config.bucket, config.url_expiry_s))


def build_search_app(config: AwsConfig, **overrides: Any) -> APIGatewayRestResolver:
    """The API Gateway resolver for the search Lambda."""
    return build_app(build_service(config, **overrides), cors_origin=config.cors_origin)
