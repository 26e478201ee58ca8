"""AWS ingest: S3 notifications (delivered through SQS) -> GetObject -> encode -> OpenSearch.

A whole SQS batch at a time: each record's objects are read and decoded in turn, then all of them are
encoded in as few endpoint requests as the 4 MB body limit allows and written with one bulk call. Anything
that may work on a retry (endpoint throttled or cold, OpenSearch down, S3 errors) fails the records it
concerns (those of that request, that write, that read), so SQS redelivers them alone; objects that can
never be indexed (not images, undecodable, refused by the endpoint) are skipped with one log line and a
metric, a request the endpoint refuses being halved until the refused image stands alone. A request the
model fails on (5xx) is halved the same way, and only the image it fails on alone is retried.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from clipsearch.aws import config as aws_config
from clipsearch.aws.config import AwsConfig, Deadline, DeadlineExceeded
from clipsearch.encoders import Encoder, encode_each
from clipsearch.errors import BadRequest, ClipsearchError
from clipsearch.images import is_image_name
from clipsearch.index.base import Document, IndexError_, VectorIndex, doc_id, wall_clock
from clipsearch.ingest import title_from_path
from clipsearch.perceptual import perceptual_hash
from model_code.inference import DecodedImage, decode_for_model

logger = Logger(service="clipsearch", child=True)

# Bigger objects are not photos worth decoding inside a Lambda; MAX_PIXELS bounds the decode anyway.
MAX_OBJECT_BYTES = 64 * 1024 * 1024
CREATED, REMOVED = "created", "removed"

# -- the time budget ------------------------------------------------------------------------------
# A Lambda timeout fails the whole batch: the partial-batch report is lost and every message in it
# comes back and burns a receive count ("Handling errors for an SQS event source in Lambda"). So each
# record of a batch starts (its read and decode) only when its worst case fits in what is left: its own
# read and decode, then one endpoint request and the bulk write, which it may be the last to join. The rest
# are reported as failures. The batch's requests each take the read timeout the deadline leaves after the
# bulk write; one that cannot get ENDPOINT_MIN_READ_S fails its records as items (DeadlineExceeded).
# The worst cases follow from the client settings here, every call with explicit attempts:
S3_ATTEMPTS, S3_CONNECT_S, S3_READ_S = 2, 3.0, 10.0
S3_CALL_S = S3_ATTEMPTS * (S3_CONNECT_S + S3_READ_S) + 1.0  # + standard mode's backoff (at most 1 s)
# OpenSearch: up to 4 attempts 10 s each, backing off 0.5, 1 and 2 s (jittered down) for 429s and restarts.
# With the deadline given (make_index), the bulk write's passes over items refused with 429 draw on the same
# 4 attempts, and no attempt or backoff starts past the deadline, opening the index included.
INDEX_OPTIONS: dict[str, Any] = {"timeout_s": 10.0, "max_retries": 3, "backoff_s": 0.5}
INDEX_CALL_S = 4 * 10.0 + (0.5 + 1.0 + 2.0)
# InvokeEndpoint: a read timeout of up to 70 s (SageMaker's advised socket timeout), cut to what the deadline
# leaves after the index call, but never under ENDPOINT_MIN_READ_S. Throttling is retried while a further
# attempt fits; a read timeout never is (SQS redelivers).
ENDPOINT_CONNECT_S, ENDPOINT_MAX_READ_S, ENDPOINT_MIN_READ_S = 3.0, 70.0, 15.0
# Decoding and downscaling the largest accepted picture (MAX_PIXELS): 1.7-2.0 s for 100 MP (JPEG or PNG)
# on the 2-core dev machine; a 1024 MB function has about 0.6 of a vCPU (Lambda: 1,769 MB = 1 vCPU).
DECODE_S = 8.0
RECORD_MIN_S = S3_CALL_S + DECODE_S + ENDPOINT_CONNECT_S + ENDPOINT_MIN_READ_S + aws_config.ANSWER_READ_S + INDEX_CALL_S
# Kept back from the function's timeout to return the batch report.
END_RESERVE_S = 2.0


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


def s3_document(
    bucket: str,
    key: str,
    vector: np.ndarray,
    response: Mapping[str, Any],
    content_hash: str,
    size: int,
    decoded: DecodedImage | None = None,
    phash: str | None = None,
) -> Document:
    """The Document of an S3 object from its GetObject or HeadObject response (user metadata, LastModified).

    The Document has one text field: the title metadata, else the description, else the file name.
    Capture time (CONTRACT §7): the decoded picture's EXIF DateTimeOriginal, else the object's LastModified
    as wall-clock time (no decode, as for a batch transform's output: no EXIF, and width/height stay 0).
    """
    meta = {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}
    title = (
        metadata_text(meta.get("title"))
        or metadata_text(meta.get("description"))
        or title_from_path(Path(PurePosixPath(key).name))
    )
    modified = response.get("LastModified")
    modified_at = wall_clock(modified) if modified is not None else None
    return Document(
        key=key,
        vector=vector,
        bucket=bucket,
        title=title,
        content_hash=content_hash,
        size=size,
        mtime=modified.timestamp() if modified is not None else 0.0,
        width=decoded.width if decoded else 0,
        height=decoded.height if decoded else 0,
        taken_at=(decoded.taken_at if decoded else None) or modified_at,
        taken_offset=decoded.taken_offset if decoded else "",
        # The perceptual hash of the one shared decode (duplicates); a caller without the decode passes its own.
        phash=perceptual_hash(decoded.image) if decoded else phash,
    )


@dataclass
class _Fetched:
    """A created object read and decoded, waiting for its vector; `response` is GetObject's, less the body."""

    message_id: str
    event: ObjectEvent
    response: dict[str, Any]
    content_hash: str
    size: int
    decoded: DecodedImage


class Ingestor:
    """Applies S3 changes to the index, a whole SQS batch at a time.

    `handle_batch` is the Lambda's: every record's objects are read and decoded first, then encoded in as
    few endpoint requests as the 4 MB body limit allows and written with one bulk call. `handle_record`
    is the same path for a batch of one (Powertools' record handler).
    """

    def __init__(
        self,
        encoder: Encoder,
        index: VectorIndex,
        s3: Any,
        metrics: Metrics | None = None,
        deadline: Deadline | None = None,
        record_min_s: float = 0.0,
    ) -> None:
        """record_min_s: the worst case of one record; a record starts only with that much time left."""
        self.encoder, self.index, self.s3, self.metrics = encoder, index, s3, metrics
        self.deadline = deadline or Deadline(reserve_s=END_RESERVE_S)
        self.record_min_s = record_min_s

    def handle_batch(
        self, event: dict[str, Any], lambda_context: Any, processor: BatchProcessor
    ) -> PartialItemFailureResponse:
        """The Lambda handler's work: the batch's outcomes, reported by Powertools as batchItemFailures."""
        # A malformed event is Powertools' to refuse (process_partial_response): nothing to ingest here.
        raw = event.get("Records") if isinstance(event, dict) else None
        records = [SQSRecord(r) for r in raw if isinstance(r, dict)] if isinstance(raw, list) else []
        outcomes = self._ingest(records, lambda_context)

        def replay(record: SQSRecord) -> None:
            failure = outcomes.get(record.message_id)
            if failure is not None:
                raise failure

        return process_partial_response(event=event, record_handler=replay, processor=processor, context=lambda_context)

    def handle_record(self, record: SQSRecord, lambda_context: Any = None) -> None:
        """BatchProcessor's record handler: raising fails only this record (SQS redelivers it)."""
        failure = self._ingest([record], lambda_context).get(record.message_id)
        if failure is not None:
            raise failure

    def apply(self, event: ObjectEvent) -> None:
        """One S3 change, now; raises what would fail its record."""
        outcomes = _Outcomes()
        self._apply("", event, outcomes.pending, outcomes)
        self._flush(outcomes.pending, outcomes)
        failure = outcomes.failures.get("")
        if failure is not None:
            raise failure

    def _ingest(self, records: list[SQSRecord], lambda_context: Any) -> dict[str, Exception]:
        """message id -> why it failed, for the records that did; the rest were applied (or skipped)."""
        self.deadline.start(lambda_context)
        outcomes = _Outcomes()
        for record in records:
            left = self.deadline.remaining_s()
            # A record starts only when its own worst case (read, decode, then one endpoint request and the
            # bulk write that it may be the last to join) fits; the batch's requests are fitted to the
            # deadline each, so one that cannot start fails its records as items, never the invocation.
            if left < self.record_min_s:
                self._count("RecordsOutOfTime")
                logger.warning(
                    "not started: too little time left in this invocation",
                    extra={"message_id": record.message_id, "left_s": round(left, 1), "needed_s": self.record_min_s},
                )
                outcomes.fail(
                    record.message_id,
                    DeadlineExceeded(
                        f"{left:.0f} s left, one record may take {self.record_min_s:.0f} s; SQS redelivers it"
                    ),
                )
                continue
            try:
                for change in parse_notification(record.body):
                    self._apply(record.message_id, change, outcomes.pending, outcomes)
            except Exception as e:  # whatever fails a record fails only it, as BatchProcessor does
                outcomes.fail(record.message_id, e)
        self._flush(outcomes.pending, outcomes)
        return outcomes.failures

    def _apply(self, message_id: str, event: ObjectEvent, pending: list[_Fetched], outcomes: _Outcomes) -> None:
        if event.action == REMOVED:
            id_ = doc_id(event.bucket, event.key)
            if any(doc_id(f.event.bucket, f.event.key) == id_ for f in pending):
                self._flush(pending, outcomes)  # an earlier record of the batch wrote it: deleted after it
            removed = self.index.delete([id_])
            logger.info("deleted", extra={"bucket": event.bucket, "key": event.key, "existed": removed})
            self._count("ImagesDeleted")
            return
        try:
            pending.append(self._fetch(message_id, event))
        except _Skip as skip:
            self._skip(event, str(skip))

    def _flush(self, pending: list[_Fetched], outcomes: _Outcomes) -> None:
        """Encode the fetched objects in as few requests as fit, and write them with one bulk call."""
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        vectors: list[np.ndarray | Exception]
        try:
            vectors = list(encode_each(self.encoder, [f.decoded.image for f in batch]))
        except Exception as e:  # an unexpected failure fails the records it concerns
            vectors = [e] * len(batch)
        docs: dict[str, tuple[_Fetched, Document]] = {}
        for fetched, vector in zip(batch, vectors, strict=True):
            if isinstance(vector, BadRequest):  # the endpoint refused this image: retrying cannot help
                self._skip(fetched.event, str(vector))
            elif isinstance(vector, Exception):
                outcomes.fail(fetched.message_id, vector)
            else:
                doc = s3_document(
                    fetched.event.bucket,
                    fetched.event.key,
                    vector,
                    fetched.response,
                    fetched.content_hash,
                    fetched.size,
                    fetched.decoded,
                )
                docs[doc.id] = (fetched, doc)  # the same key twice in a batch: the later event wins
        if not docs:
            return
        try:
            result = self.index.upsert([doc for _, doc in docs.values()])
        except Exception as e:  # the bulk call failed: each of its records is retried
            for fetched, _ in docs.values():
                outcomes.fail(fetched.message_id, e)
            return
        for id_, (fetched, doc) in docs.items():
            bucket, key = fetched.event.bucket, fetched.event.key
            if id_ in result.failed:
                outcomes.fail(
                    fetched.message_id, IndexError_(f"OpenSearch refused s3://{bucket}/{key}: {result.failed[id_]}")
                )
                continue
            logger.info("indexed", extra={"bucket": bucket, "key": key, "id": doc.id})
            self._count("ImagesIndexed")

    def _fetch(self, message_id: str, event: ObjectEvent) -> _Fetched:
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
        body = obj.pop("Body")
        if not PurePosixPath(key).suffix and not str(obj.get("ContentType", "")).startswith("image/"):
            body.close()
            raise _Skip(f"content type {obj.get('ContentType')!r} is not an image")
        data = body.read()
        try:
            # Cropped to 2:1, downscaled and sent as PNG/JPEG (the endpoint's Pillow reads no HEIC, AVIF or RAW);
            # the key's extension tells a camera RAW file, whose embedded JPEG preview is what is decoded (rawpy
            # is in the layer). One without a preview is skipped with the reason, never retried.
            # Only the downscaled picture is kept: a batch holds one original at a time.
            decoded = decode_for_model(data, name=key)
        except ValueError as e:
            raise _Skip(str(e)) from None
        return _Fetched(message_id, event, obj, hashlib.sha256(data).hexdigest(), len(data), decoded)

    def _skip(self, event: ObjectEvent, reason: str) -> None:
        logger.warning(
            f"skipped s3://{event.bucket}/{event.key}: {reason}",
            extra={"bucket": event.bucket, "key": event.key, "reason": reason},
        )
        self._count("ObjectsSkipped")

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)


@dataclass
class _Outcomes:
    """A batch in progress: the objects fetched but not yet written, and the records that failed."""

    pending: list[_Fetched] = field(default_factory=list)
    failures: dict[str, Exception] = field(default_factory=dict)

    def fail(self, message_id: str, error: Exception) -> None:
        self.failures.setdefault(message_id, error)  # the first reason a record failed is the one reported


def build_ingestor(
    config: AwsConfig, metrics: Metrics | None = None, deadline: Deadline | None = None, runtime: Any = None
) -> Ingestor:
    """The ingest record handler for this stack, its clients fitted into the function's timeout.

    runtime(read_timeout_s) makes the sagemaker-runtime client (default: boto3's, one attempt each;
    EndpointRuntime retries throttling while the deadline allows).
    """
    deadline = deadline or Deadline(reserve_s=END_RESERVE_S)
    timed = aws_config.EndpointRuntime(
        deadline,
        ENDPOINT_MAX_READ_S,
        reserve_s=INDEX_CALL_S,
        connect_timeout_s=ENDPOINT_CONNECT_S,
        min_read_timeout_s=ENDPOINT_MIN_READ_S,
        factory=runtime,
    )
    timed.prepare(math.inf)  # the client of a record with time to spare: the longest read timeout
    return Ingestor(
        encoder=aws_config.make_encoder(config, timed),
        index=aws_config.make_index(config, deadline, INDEX_CALL_S, **INDEX_OPTIONS),
        s3=aws_config.s3_client(S3_ATTEMPTS, S3_CONNECT_S, S3_READ_S),
        metrics=metrics,
        deadline=deadline,
        record_min_s=RECORD_MIN_S,
    )
