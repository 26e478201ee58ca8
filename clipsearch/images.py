"""Image loading shared by every host: decode, validate, EXIF-rotate and downscale.

The decoding and pixel limits live in model_code (the SageMaker container needs them too);
this module adds file handling and the transport encoding used by the AWS ingest path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipsearch.errors import BadImage
from model_code.inference import MAX_PIXELS, MAX_SIDE, decode_image, downscale

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "MAX_SIDE", "load_bytes", "load_file", "to_png",
           "is_image_name", "LoadedImage"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension, whatever its case."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def load_bytes(data: bytes) -> Image.Image:
    """Decode, rotate upright and downscale; BadImage when it is not an acceptable image."""
    try:
        return downscale(decode_image(data))
    except ValueError as e:
        raise BadImage(str(e)) from None


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, downscaled image with its raw bytes and original size."""

    image: Image.Image
    data: bytes
    width: int
    height: int


def load_file(path: str | Path) -> LoadedImage:
    """Read and load an image file, keeping the raw bytes (for hashing) and the original size."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read {path}: {e.strerror or e}") from None
    try:
        full = decode_image(data)
    except ValueError as e:
        raise BadImage(str(e)) from None
    return LoadedImage(downscale(full), data, full.width, full.height)


def to_png(img: Image.Image) -> bytes:
    """Lossless transport encoding, so the endpoint sees exactly the pixels the local path encodes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
