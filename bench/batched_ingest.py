"""Batched ingest: endpoint invocations per image and images/s of one ingest Lambda, per-image vs batched.

The ingest function (functions/ingest/app.py) is loaded as Lambda loads it, over local stand-ins: S3 on a
moto server, InvokeEndpoint on tests/support/sagemaker_endpoint.py (the demo model behind the serving
toolkit) with a fixed cost per invocation (--overhead-s) and a cost per image (--per-image-s), and the index
on the OpenSearch node (or the embedded index). Both modes run the same code in the same run:

- per-image: each record handled on its own (Ingestor.handle_record through Powertools' BatchProcessor):
  one InvokeEndpoint and one index write per image, as the ingest function did before batching;
- batched: the function's handler, a whole SQS batch of --batch-sizes records at a time: as few
  InvokeEndpoint requests as the 4 MB body allows, and one bulk write.

One process handles the batches one after another: images/s is per concurrent Lambda. "endpoint slot s" is
the stand-in's modelled time (overhead x invocations + per-image cost x images): how long the run held one
of the endpoint's concurrency slots, which ingest shares with search.

    python bench/batched_ingest.py [--images 60] [--batch-sizes 1,5,10] [--overhead-s 0.1] [--per-image-s 0.05]
                                   [--index opensearch|embedded] [--opensearch-url http://127.0.0.1:9200]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, moto_aws, table  # noqa: E402
from support.sqs import lambda_event  # noqa: E402

BUCKET = "clipsearch-bench-batched"
ENDPOINT = "clipsearch-demo"


def photo(seed: int) -> bytes:
    """A phone-like JPEG (2000 x 1500): a smooth random scene with sensor noise."""
    import numpy as np
    from PIL import Image, ImageChops

    size = (2000, 1500)
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 150 + 2, size[0] // 150 + 2, 3), dtype=np.uint8))
    scene = small.resize(size, Image.Resampling.BICUBIC)
    img = ImageChops.add(scene, Image.effect_noise(size, 6 + seed % 10).convert("RGB"), scale=1.0, offset=-128)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def batches(keys: Sequence[str], sizes: dict[str, int], size: int) -> list[dict[str, Any]]:
    """SQS events of `size` ObjectCreated notifications each, as the event source mapping delivers them."""
    from clipsearch.aws import backfill

    messages = [
        {
            "MessageId": uuid.uuid4().hex,
            "ReceiptHandle": key,
            "Body": json.dumps(backfill.s3_event(BUCKET, backfill.S3Object(key, sizes[key]))),
        }
        for key in keys
    ]
    return [lambda_event(messages[n : n + size]) for n in range(0, len(messages), size)]


class Counted:
    """The ingest function's index, counting bulk calls."""

    def __init__(self, index: Any) -> None:
        self.index, self.bulks = index, 0

    def upsert(self, docs: Any) -> Any:
        self.bulks += 1
        return self.index.upsert(docs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)


def run(args: argparse.Namespace) -> list[list[object]]:
    import boto3
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
    from support.fakes import LambdaContext, load_function
    from support.sagemaker_endpoint import running_endpoint

    from clipsearch.index.embedded import EmbeddedIndex
    from clipsearch.index.opensearch import OpenSearchIndex

    rows: list[list[object]] = []
    saved = dict(os.environ)
    index_name = f"batch-bench-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipsearch-batched-")))
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        endpoint = stack.enter_context(running_endpoint(work))
        moto_aws(stack, endpoint.url)
        os.environ.update(
            {
                "CLIPSEARCH_ENDPOINT_NAME": ENDPOINT,
                "CLIPSEARCH_OPENSEARCH_URL": args.opensearch_url,
                "CLIPSEARCH_OPENSEARCH_AUTH": "none",
                "CLIPSEARCH_INDEX": index_name,
                "CLIPSEARCH_MODEL": "demo",
                "CLIPSEARCH_DIM": "128",
                "POWERTOOLS_SERVICE_NAME": "clipsearch",
                "POWERTOOLS_METRICS_NAMESPACE": "clipsearch-bench",
                "POWERTOOLS_TRACE_DISABLED": "true",
                "POWERTOOLS_LOG_LEVEL": "WARNING",
                "POWERTOOLS_METRICS_DISABLED": "true",
            }
        )
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        sizes: dict[str, int] = {}
        for n in range(args.images):
            data = photo(n)
            key = f"bench/IMG_{n:04d}.jpg"
            s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/jpeg")
            sizes[key] = len(data)
        keys = sorted(sizes)
        ingest = load_function("ingest")
        if args.index == "opensearch":
            real: Any = OpenSearchIndex(name=index_name, url=args.opensearch_url, auth="none", model="demo", dim=128)
            stack.callback(real.drop)
        else:
            real = EmbeddedIndex(work / "index", model="demo", dim=128)
            stack.callback(real.close)
        index = Counted(real)
        ingest.ingestor.index = index
        # The cost model: a warm endpoint's fixed overhead per invocation plus its forward per image.
        endpoint.delay_s, endpoint.per_image_s = args.overhead_s, args.per_image_s

        def per_image(event: dict[str, Any]) -> Any:
            processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
            return process_partial_response(
                event=event, record_handler=ingest.ingestor.handle_record, processor=processor, context=None
            )

        def batched(event: dict[str, Any]) -> Any:
            return ingest.handler(event, LambdaContext("clipsearch-bench"))

        modes: list[tuple[str, int, Callable[[dict[str, Any]], Any]]] = [
            ("per-image (before)", max(args.batch_sizes), per_image)
        ]
        modes += [("batched (after)", size, batched) for size in args.batch_sizes]
        batched(batches(keys[:2], sizes, 2)[0])  # warm-up: index created, clients made, model graphs built
        for mode, size, handle in modes:
            calls, images, bulks = len(endpoint.calls), sum(endpoint.images), index.bulks
            started = time.perf_counter()
            failed = 0
            for event in batches(keys, sizes, size):
                failed += len(handle(event)["batchItemFailures"])
            seconds = time.perf_counter() - started
            invocations = len(endpoint.calls) - calls
            rows.append(
                [
                    mode,
                    size,
                    args.images,
                    failed,
                    invocations,
                    round(invocations / args.images, 2),
                    round((sum(endpoint.images) - images) / max(1, invocations), 1),
                    index.bulks - bulks,
                    round(invocations * args.overhead_s + (sum(endpoint.images) - images) * args.per_image_s, 1),
                    round(seconds, 1),
                    round(args.images / seconds, 2),
                ]
            )
            print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    return rows


HEADERS = [
    "mode",
    "SQS batch",
    "images",
    "failed",
    "invocations",
    "invocations / image",
    "images / invocation",
    "index calls",
    "endpoint slot s (modelled)",
    "seconds",
    "images/s per Lambda",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 10])
    parser.add_argument("--overhead-s", type=float, default=0.1)
    parser.add_argument("--per-image-s", type=float, default=0.05)
    parser.add_argument("--index", choices=["opensearch", "embedded"], default="opensearch")
    parser.add_argument(
        "--opensearch-url", default=os.environ.get("CLIPSEARCH_OPENSEARCH_URL", "http://127.0.0.1:9200")
    )
    args = parser.parse_args(argv)
    print(f"# {machine()}; {threading.active_count()} thread(s) at start")
    print(
        f"# stand-in endpoint: {args.overhead_s} s per invocation + {args.per_image_s} s per image "
        f"(plus the demo model's own forward); index: {args.index}"
    )
    rows = run(args)
    print()
    print(table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
