"""Small helpers shared by the bench scripts: timing, percentiles, markdown tables, machine line."""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timings(fn: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    """Seconds per call for `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return (
            f"{v:.3g}" if isinstance(v, float) and abs(v) < 1000 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
        )

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_model(name: str) -> Any:
    """The bundled demo model, or a randomly initialised real architecture (RN50, ViT-B/32)."""
    from clipsearch import models
    from model_code import inference

    if name == "demo":
        source = models.resolve("demo")
        return inference.load_model(source.name, source.model_dir)
    return models.random_model(name)


def moto_aws(stack: ExitStack, runtime_url: str) -> str:
    """Start a moto server (stopped with `stack`) and point this process's boto3 at it and at the SageMaker
    runtime stand-in at runtime_url, with test credentials; returns the moto server's URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the moto server's access log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    stack.callback(moto.stop)
    host, port = moto.get_host_and_port()
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    url = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # pragma: allowlist secret
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": url,
            "AWS_ENDPOINT_URL_SQS": url,
            "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url,
        }
    )
    return url
