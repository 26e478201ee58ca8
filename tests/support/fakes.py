"""Hand-written fakes for fast tests: a deterministic encoder with the Encoder interface, one cut short as by
Ctrl-C, and the Lambda context plus a loader that imports a function's app.py as Lambda does."""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FAKE_DIM = 16
ROOT = Path(__file__).resolve().parents[2]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


class FakeEncoder:
    """Texts map to a hash-seeded random unit vector; images to their 2x2 colour layout.

    Deterministic, instant, and images that look alike get similar vectors.
    """

    model = "fake"
    dim = FAKE_DIM

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls.append(("text", len(texts)))
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out.append(_unit(np.random.default_rng(seed).standard_normal(FAKE_DIM)))
        return np.stack(out)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        self.calls.append(("image", len(images)))
        out = []
        for img in images:
            small = np.asarray(img.convert("RGB").resize((2, 2), Image.Resampling.BILINEAR), np.float32)
            v = np.zeros(FAKE_DIM, np.float32)
            v[:12] = small.reshape(-1) / 255.0 - 0.5
            v[12] = 0.1
            out.append(_unit(v))
        return np.stack(out)


class RotatedEncoder(FakeEncoder):
    """A second model of the same dimension: FakeEncoder's vectors rolled by 3 places.

    An image query finds its own picture with score 1.0 only in an index this same model built, so a
    response that mixed the two models shows.
    """

    model = "fake-rotated"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.roll(super().encode_texts(texts), 3, axis=1)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return np.roll(super().encode_images(images), 3, axis=1)


class InterruptingEncoder:
    """Wraps an encoder and, like a Ctrl-C, raises KeyboardInterrupt in the batch that would take it past
    `after` images: the batches before it are encoded and written, that one and the rest are not."""

    def __init__(self, encoder: Any, after: int) -> None:
        self.encoder, self.after, self.encoded = encoder, after, 0
        self.model, self.dim = encoder.model, encoder.dim

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode_texts(texts))

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if self.encoded + len(images) > self.after:
            raise KeyboardInterrupt
        self.encoded += len(images)
        return np.asarray(self.encoder.encode_images(images))


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LambdaContext:
    """The fields Powertools reads from a Lambda context; the remaining time counts down on `clock`.

    timeout_s is the function's Timeout; the default is Lambda's maximum (900 s), a context that
    never runs short unless a test says so.
    """

    def __init__(
        self,
        function_name: str = "clipsearch-test",
        timeout_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.function_name = function_name
        self.memory_limit_in_mb = 1024
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.aws_request_id = "00000000-0000-4000-8000-000000000000"
        self.log_group_name = f"/aws/lambda/{function_name}"
        self._clock = clock
        self._deadline = clock() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - self._clock()) * 1000))


def load_function(name: str) -> Any:
    """functions/<name>/app.py as a fresh module, its module-level setup run now (a cold start)."""
    spec = importlib.util.spec_from_file_location(f"{name}_app_under_test", ROOT / "functions" / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
