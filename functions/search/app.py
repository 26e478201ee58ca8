"""Search Lambda: API Gateway REST events -> the shared search routes (clipsearch.api)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from clipsearch import aws_config
from clipsearch.aws_search import build_search_app

# No Powertools Tracer here: importing the X-Ray SDK costs ~285 ms of every cold start on the query
# path; the function's own X-Ray segment (Tracing: Active) still records each invocation.
logger = Logger()

app = build_search_app(aws_config.from_env("search"))


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
