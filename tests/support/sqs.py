"""SQS messages as the Lambda event source mapping hands them to the ingest function (tests and bench/)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:ingest"


def lambda_event(messages: Iterable[Mapping[str, Any]], queue_arn: str = QUEUE_ARN) -> dict[str, Any]:
    """The function's event for messages shaped as ReceiveMessage returns them (MessageId, ReceiptHandle,
    Body, and Attributes and MD5OfBody where known)."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }
