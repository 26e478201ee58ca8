"""Hand-written fakes for fast tests: a deterministic encoder with the Encoder interface."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

FAKE_DIM = 16


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
