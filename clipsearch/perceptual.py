"""The perceptual hash of a picture: 64 bits that stay close when it is re-encoded, resized or lightly cropped.

A DCT hash (pHash) in numpy: the picture as 32 x 32 grey levels, its 8 x 8 lowest DCT frequencies, one bit
per frequency for "above their median". Computed by every ingest path from the image decode_for_model gives
(upright, centre-cropped to 2:1, downscaled), so the local index, the ingest Lambda and a backfill agree.
numpy and Pillow only: the Lambda layer has no room for scipy (which imagehash pulls in).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

__all__ = ["HASH_BITS", "perceptual_hash", "hamming", "parse_hash"]

HASH_BITS = 64
_SIDE = 32  # the grey thumbnail the DCT runs on
_LOW = 8  # the low-frequency corner kept: 8 x 8 = 64 bits


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: d = M @ x is the transform of a column x."""
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def perceptual_hash(image: Image.Image) -> str:
    """The picture's 64-bit DCT hash as 16 hex digits."""
    # BOX averages every source pixel into the thumbnail, so JPEG noise and resampling cancel out.
    grey = np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BOX), dtype=np.float64)
    m = _dct_matrix(_SIDE)
    low = (m @ grey @ m.T)[:_LOW, :_LOW].reshape(-1)
    bits = low > np.median(low)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def parse_hash(text: str) -> int:
    """A stored hash (16 hex digits) as an integer; ValueError if it is not one."""
    if len(text) != HASH_BITS // 4:
        raise ValueError(f"not a {HASH_BITS}-bit hash: {text!r}")
    return int(text, 16)


def hamming(a: int, b: int) -> int:
    """How many of the bits differ."""
    return (a ^ b).bit_count()
