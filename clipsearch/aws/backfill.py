"""`clipsearch backfill`: index images that were in the bucket before the stack was.

Two ways: enqueue S3-event-shaped messages for the ingest Lambda (the same path as a new upload),
or run a SageMaker batch transform over the images and bulk-load its `.out` vectors into the index.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, urlsplit

import numpy as np

from clipsearch.aws.ingest import s3_document
from clipsearch.errors import BadRequest, ClipsearchError, Unavailable
from clipsearch.images import is_image_name
from clipsearch.index.base import Document, VectorIndex
from clipsearch.perceptual import perceptual_hash
from model_code.inference import decode_for_model, is_raw_name

SQS_BATCH = 10  # SendMessageBatch's limit
UPSERT_BATCH = 200
BATCH_OUTPUT_PREFIX = "_clipsearch-batch/"
# One image per request, sent whole: a camera original is 6-25 MB. 100 is the API's maximum, and
# MaxConcurrentTransforms x MaxPayloadInMB must stay within it too (SageMaker API Reference,
# CreateTransformJob: MaxPayloadInMB). The container must admit as much: TorchServe refuses bodies
# over its max_request_size (6553500 bytes unless TS_MAX_REQUEST_SIZE says otherwise), so the
# transform's SageMaker Model sets TS_MAX_REQUEST_SIZE (template.yaml).
MAX_PAYLOAD_MB = 100
MAX_CONCURRENT_TRANSFORMS = 1


class TransformFailed(ClipsearchError):
    code = "transform_failed"


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str = ""


@dataclass
class BackfillSummary:
    """Counts for one run; failed lists (key, reason)."""

    listed: int = 0
    sent: int = 0
    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    job: str = ""


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise BadRequest(f"expected s3://bucket/prefix, not {url!r}")
    return parts.netloc, parts.path.lstrip("/")


def list_images(s3: Any, bucket: str, prefix: str) -> Iterator[S3Object]:
    """Objects under the prefix whose names are images, camera RAW included (the backfill's own outputs excluded)."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if is_image_name(key) and not key.startswith(BATCH_OUTPUT_PREFIX):
                yield S3Object(key, int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"'))


def s3_event(bucket: str, obj: S3Object, region: str = "") -> dict[str, Any]:
    """An S3 ObjectCreated notification for one object, shaped as S3 sends it (key URL-encoded)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": region,
                "eventTime": now,
                "eventName": "ObjectCreated:Put",
                "userIdentity": {"principalId": "clipsearch-backfill"},
                "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                "responseElements": {},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "clipsearch-backfill",
                    "bucket": {"name": bucket, "ownerIdentity": {"principalId": ""}, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {
                        "key": quote_plus(obj.key, safe="/"),
                        "size": obj.size,
                        "eTag": obj.etag,
                        "sequencer": "0",
                    },
                },
            }
        ]
    }


def enqueue(
    s3: Any, sqs: Any, queue_url: str, bucket: str, prefix: str, on_progress: Callable[[int], None] | None = None
) -> BackfillSummary:
    """Send one S3-event message per image to the ingest queue, ten per request."""
    summary = BackfillSummary()
    region = getattr(getattr(s3, "meta", None), "region_name", "") or ""
    batch: list[S3Object] = []

    def flush() -> None:
        entries = [
            {"Id": str(n), "MessageBody": json.dumps(s3_event(bucket, obj, region))} for n, obj in enumerate(batch)
        ]
        resp = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        for failure in resp.get("Failed", []):
            summary.failed.append((batch[int(failure["Id"])].key, failure.get("Message", failure["Code"])))
        summary.sent += len(resp.get("Successful", []))
        if on_progress:
            on_progress(len(batch))
        batch.clear()

    for obj in list_images(s3, bucket, prefix):
        summary.listed += 1
        batch.append(obj)
        if len(batch) == SQS_BATCH:
            flush()
    if batch:
        flush()
    return summary


# -- batch transform ------------------------------------------------------------------------------


def write_manifest(s3: Any, bucket: str, keys: list[str], manifest_key: str) -> str:
    """A SageMaker manifest listing exactly the images (a plain prefix would also feed it non-images)."""
    body = json.dumps([{"prefix": f"s3://{bucket}/"}, *keys])
    s3.put_object(Bucket=bucket, Key=manifest_key, Body=body.encode(), ContentType="application/json")
    return f"s3://{bucket}/{manifest_key}"


def start_transform(
    sagemaker: Any,
    job: str,
    model_name: str,
    manifest_url: str,
    output_url: str,
    instance_type: str,
    instance_count: int = 1,
) -> None:
    """Create the transform job: one image per request, JSON vectors out (model_code's contract)."""
    sagemaker.create_transform_job(
        TransformJobName=job,
        ModelName=model_name,
        BatchStrategy="SingleRecord",
        MaxConcurrentTransforms=MAX_CONCURRENT_TRANSFORMS,
        MaxPayloadInMB=MAX_PAYLOAD_MB,
        TransformInput={
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": manifest_url}},
            "ContentType": "application/x-image",
            "SplitType": "None",
            "CompressionType": "None",
        },
        TransformOutput={"S3OutputPath": output_url, "Accept": "application/json", "AssembleWith": "None"},
        TransformResources={"InstanceType": instance_type, "InstanceCount": instance_count},
    )


def wait_transform(
    sagemaker: Any, job: str, poll_s: float = 30.0, on_status: Callable[[str], None] | None = None
) -> None:
    """Poll until the job ends; TransformFailed unless it completed."""
    while True:
        desc = sagemaker.describe_transform_job(TransformJobName=job)
        status = desc["TransformJobStatus"]
        if on_status:
            on_status(status)
        if status == "Completed":
            return
        if status in ("Failed", "Stopped"):
            raise TransformFailed(f"transform job {job} {status.lower()}: {desc.get('FailureReason', '')}")
        time.sleep(poll_s)


def read_vector(s3: Any, bucket: str, key: str) -> np.ndarray:
    """One `.out` file: model_code's JSON answer, a list holding one vector."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        vectors = np.asarray(json.loads(body), dtype=np.float32)
    except (ValueError, TypeError):
        raise Unavailable(f"s3://{bucket}/{key} is not a JSON list of vectors") from None
    if vectors.ndim != 2 or vectors.shape[0] != 1:
        raise Unavailable(f"s3://{bucket}/{key} holds shape {vectors.shape}, expected one vector")
    return vectors[0]


def document_for(s3: Any, bucket: str, key: str, vector: np.ndarray) -> Document:
    """A Document with the object's title metadata, size, time and hashes (width/height stay 0).

    A transform's `.out` holds the vector alone, so the object is read here (GetObject where HeadObject
    would do for the metadata) for its sha256 and its perceptual hash, from the same decode as every other
    path; it is decoded, never encoded. Its time stays the object's LastModified, as before.
    """
    response = s3.get_object(Bucket=bucket, Key=key)
    data = response.pop("Body").read()
    try:
        phash: str | None = perceptual_hash(decode_for_model(data, name=key).image)
    except ValueError:
        phash = None  # the container decoded what this machine cannot (HEIC without pillow-heif)
    return s3_document(bucket, key, vector, response, hashlib.sha256(data).hexdigest(), len(data), phash=phash)


def load_transform_output(
    s3: Any,
    index_for: Callable[[int], VectorIndex],
    bucket: str,
    keys: list[str],
    output_bucket: str,
    output_prefix: str,
    on_progress: Callable[[int], None] | None = None,
    batch: int = UPSERT_BATCH,
) -> BackfillSummary:
    """Upsert each key's `<output_prefix><key>.out` vector, `batch` at a time; index_for(dim) opens or creates
    the index."""
    from botocore.exceptions import ClientError

    summary = BackfillSummary(listed=len(keys))
    index: VectorIndex | None = None
    docs: list[Document] = []

    def flush() -> None:
        assert index is not None
        result = index.upsert(docs)
        summary.indexed += result.written
        by_id = {d.id: d.key for d in docs}
        summary.failed.extend((by_id.get(i, i), reason) for i, reason in result.failed.items())
        if on_progress:
            on_progress(len(docs))
        docs.clear()

    for key in keys:
        try:
            vector = read_vector(s3, output_bucket, f"{output_prefix}{key}.out")
            doc = document_for(s3, bucket, key, vector)
        except ClientError as e:
            summary.failed.append((key, e.response.get("Error", {}).get("Message") or str(e)))
            continue
        except Unavailable as e:
            summary.failed.append((key, str(e)))
            continue
        if index is None:
            index = index_for(int(vector.shape[0]))
        docs.append(doc)
        if len(docs) >= batch:
            flush()
    if docs:
        flush()
    return summary


def not_for_transform(obj: S3Object) -> str:
    """Why a batch transform cannot take this object; "" when it can."""
    if is_raw_name(obj.key):
        # The transform sends the container the bytes alone (application/x-image), without the key that tells
        # a RAW file, and the model archive carries no rawpy. The ingest Lambda reads the preview (its layer
        # has rawpy): the queue path indexes these.
        return "camera RAW, which a batch transform cannot read: backfill it through the ingest queue instead"
    if obj.size > MAX_PAYLOAD_MB * 1024 * 1024:
        return f"over the batch transform's {MAX_PAYLOAD_MB} MB payload limit"
    return ""


def batch_transform(
    s3: Any,
    sagemaker: Any,
    index_for: Callable[[int], VectorIndex],
    bucket: str,
    prefix: str,
    model_name: str,
    instance_type: str,
    output_url: str | None = None,
    job: str | None = None,
    poll_s: float = 30.0,
    on_status: Callable[[str], None] | None = None,
    batch: int = UPSERT_BATCH,
) -> BackfillSummary:
    """List the images, run a transform job over exactly them, and bulk-load the vectors.

    An object over MaxPayloadInMB would fail the whole job, and the container cannot read camera RAW: both
    are left out and reported as failed, each with its reason.
    """
    objects = list(list_images(s3, bucket, prefix))
    keys: list[str] = []
    left_out: list[tuple[str, str]] = []
    for obj in objects:
        reason = not_for_transform(obj)
        if reason:
            left_out.append((obj.key, reason))
        else:
            keys.append(obj.key)
    if not keys:
        return BackfillSummary(listed=len(objects), failed=left_out)
    job = job or f"clipsearch-backfill-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    out_bucket, out_prefix = parse_s3_url(output_url or f"s3://{bucket}/{BATCH_OUTPUT_PREFIX}{job}/")
    out_prefix = out_prefix if not out_prefix or out_prefix.endswith("/") else out_prefix + "/"
    manifest = write_manifest(s3, out_bucket, keys, f"{out_prefix}manifest.json")
    start_transform(sagemaker, job, model_name, manifest, f"s3://{out_bucket}/{out_prefix}", instance_type)
    wait_transform(sagemaker, job, poll_s=poll_s, on_status=on_status)
    summary = load_transform_output(s3, index_for, bucket, keys, out_bucket, out_prefix, batch=batch)
    summary.job = job
    summary.listed = len(objects)
    summary.failed[:0] = left_out
    return summary
