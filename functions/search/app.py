"""Search Lambda: API Gateway REST events -> the shared search routes (clipsearch.http.routes)."""

# Before the imports (numpy, Pillow, Powertools): a request that waits through this init has that time
# counted against API Gateway's 29 s.
import time

STARTED_AT = time.monotonic()

from typing import Any  # noqa: E402

from aws_lambda_powertools import Logger  # noqa: E402
from aws_lambda_powertools.logging import correlation_paths  # noqa: E402
from aws_lambda_powertools.utilities.typing import LambdaContext  # noqa: E402

from clipsearch.aws import config as aws_config  # noqa: E402
from clipsearch.aws.search import build_search_app  # noqa: E402

# No Powertools Tracer here: importing the X-Ray SDK costs ~285 ms of every cold start on the query
# path; the function's own X-Ray segment (Tracing: Active) still records each invocation.
logger = Logger()

app = build_search_app(aws_config.from_env("search"), started_at=STARTED_AT)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
