"""AWS ingest: S3 notifications (delivered through SQS) -> GetObject -> encode -> OpenSearch.

One SQS record is handled at a time. Anything that may work on a retry (endpoint throttled or
cold, OpenSearch down, S3 errors) raises, so only that record fails and SQS redelivers it; objects
that can never be indexed (not images, undecodable) are skipped with one log line and a metric.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from clipsearch.encoders import Encoder
from clipsearch.errors import BadRequest, ClipsearchError
from clipsearch.images import is_image_name
from clipsearch.index.base import Document, IndexError_, VectorIndex, doc_id
from clipsearch.ingest import title_from_path
from model_code.inference import decode_image, downscale

logger = Logger(service="clipsearch", child=True)

# Bigger objects are not photos worth decoding inside a Lambda; MAX_PIXELS bounds the decode anyway.
MAX_OBJECT_BYTES = 64 * 1024 * 1024
CREATED, REMOVED = "created", "removed"


class _Skip(Exception):
    """This object can never be indexed; the reason is logged once."""


class BadMessage(ClipsearchError):
    """An SQS message that is not an S3 notification: it fails, and ends in the dead-letter queue."""

    code = "bad_message"


@dataclass(frozen=True)
class ObjectEvent:
    """One S3 change, with the key decoded."""

    action: str
    bucket: str
    key: str
    size: int = 0


def parse_notification(body: str) -> list[ObjectEvent]:
    """The S3 changes in one SQS message body; [] for the s3:TestEvent that S3 sends on setup."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        raise BadMessage("message body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadMessage("message body is not an S3 notification")
    if payload.get("Event") == "s3:TestEvent":
        return []
    if not isinstance(payload.get("Records"), list):
        raise BadMessage("message body is not an S3 notification (no Records)")
    events = []
    for record in S3Event(payload).records:
        try:
            name, bucket, raw_key = record.event_name, record.s3.bucket.name, record.s3.get_object.key
            size = int(record.s3.get_object.raw_event.get("size") or 0)
        except (KeyError, TypeError, ValueError):
            raise BadMessage("S3 record without eventName, bucket or key") from None
        if name.startswith("ObjectCreated:"):
            action = CREATED
        elif name.startswith("ObjectRemoved:"):
            action = REMOVED
        else:
            logger.info("ignored S3 event", extra={"event_name": name})
            continue
        # S3 URL-encodes keys in notifications, with '+' for spaces.
        events.append(ObjectEvent(action, bucket, unquote_plus(raw_key), size))
    return events


def metadata_text(value: str | None) -> str:
    """An S3 user-metadata value, with RFC 2047 encoded words (how non-ASCII travels) decoded."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value))).strip()
    except (HeaderParseError, LookupError, UnicodeDecodeError):
        return value.strip()


class Ingestor:
    """Applies S3 changes to the index; `handle_record` is the BatchProcessor record handler."""

    def __init__(self, encoder: Encoder, index: VectorIndex, s3: Any, metrics: Metrics | None = None) -> None:
        self.encoder, self.index, self.s3, self.metrics = encoder, index, s3, metrics

    def handle_record(self, record: SQSRecord) -> None:
        for event in parse_notification(record.body):
            self.apply(event)

    def apply(self, event: ObjectEvent) -> None:
        if event.action == REMOVED:
            removed = self.index.delete([doc_id(event.bucket, event.key)])
            logger.info("deleted", extra={"bucket": event.bucket, "key": event.key, "existed": removed})
            self._count("ImagesDeleted")
            return
        try:
            doc = self._document(event)
        except _Skip as skip:
            self._skip(event, str(skip))
            return
        result = self.index.upsert([doc])
        if result.failed:
            raise IndexError_(f"OpenSearch refused s3://{event.bucket}/{event.key}: "
                              f"{next(iter(result.failed.values()))}")
        logger.info("indexed", extra={"bucket": event.bucket, "key": event.key, "id": doc.id})
        self._count("ImagesIndexed")

    def _document(self, event: ObjectEvent) -> Document:
        from botocore.exceptions import ClientError

        bucket, key = event.bucket, event.key
        if key.endswith("/"):
            raise _Skip("a folder marker")
        if PurePosixPath(key).suffix and not is_image_name(key):
            raise _Skip("not an image file name")
        if event.size > MAX_OBJECT_BYTES:
            raise _Skip(f"object is over {MAX_OBJECT_BYTES // (1024 * 1024)} MB")
        try:
            obj = self.s3.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                # Deleted since the event was sent: its ObjectRemoved event cleans up.
                raise _Skip("object no longer exists") from None
            raise
        body = obj["Body"]
        if not PurePosixPath(key).suffix and not str(obj.get("ContentType", "")).startswith("image/"):
            body.close()
            raise _Skip(f"content type {obj.get('ContentType')!r} is not an image")
        data = body.read()
        try:
            full = decode_image(data)
        except ValueError as e:
            raise _Skip(str(e)) from None
        try:
            vector = self.encoder.encode_images([downscale(full)])[0]
        except BadRequest as e:  # the endpoint refused this image: retrying cannot help
            raise _Skip(str(e)) from None
        meta = {k.lower(): v for k, v in (obj.get("Metadata") or {}).items()}
        # The Document has one text field: the title, else the description, else the file name.
        title = (metadata_text(meta.get("title")) or metadata_text(meta.get("description"))
                 or title_from_path(Path(PurePosixPath(key).name)))
        modified = obj.get("LastModified")
        return Document(
            key=key, vector=vector, bucket=bucket, title=title,
            content_hash=hashlib.sha256(data).hexdigest(), size=len(data),
            mtime=modified.timestamp() if modified is not None else 0.0,
            width=full.width, height=full.height,
        )

    def _skip(self, event: ObjectEvent, reason: str) -> None:
        logger.warning(f"skipped s3://{event.bucket}/{event.key}: {reason}",
                       extra={"bucket": event.bucket, "key": event.key, "reason": reason})
        self._count("ObjectsSkipped")

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
