"""Ingest Lambda: SQS batches of S3 notifications -> clipsearch.aws.ingest, with partial batch failures."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.typing import LambdaContext

from clipsearch.aws import config as aws_config
from clipsearch.aws.ingest import build_ingestor

logger = Logger()
tracer = Tracer()
metrics = Metrics()
# A batch whose records all fail still answers with batchItemFailures rather than an error.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

# The whole batch is encoded in as few endpoint requests as fit and written with one bulk call; each record
# starts only if its worst case fits in the time left, the rest fail as items, not as a timeout.
ingestor = build_ingestor(aws_config.from_env("ingest"), metrics)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return ingestor.handle_batch(event, context, processor)
