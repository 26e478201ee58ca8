"""Image loading shared by every host: decode, validate, EXIF-rotate, crop to 2:1 and downscale.

The decoding, the pixel limits and the table of picture formats live in model_code (the SageMaker
container needs them too); this module adds file handling, the names and content types derived from
that table, and the transport encoding used on the way to a SageMaker endpoint.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipsearch.errors import BadImage
from model_code.inference import IMAGE_FORMATS, MAX_PIXELS, MAX_SIDE, RAW_EXTENSIONS, UPLOAD_TYPES, decode_for_model

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_EXTENSIONS",
    "RAW_EXTENSIONS",
    "UPLOAD_TYPES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "MAX_TRANSPORT_BYTES",
    "load_bytes",
    "load_file",
    "to_png",
    "to_transport",
    "is_image_name",
    "content_type_of",
    "LoadedImage",
]

# "Maximum request payload size: 4 MB" for SageMaker Serverless Inference (SageMaker Developer Guide,
# "Deploy models with Amazon SageMaker Serverless Inference", feature exclusions); InvokeEndpoint's
# own limit for real-time endpoints is larger (6 MB), so the serverless one binds.
MAX_TRANSPORT_BYTES = 4 * 1024 * 1024

# Every name and content type below comes from the one table of formats, model_code's IMAGE_FORMATS.
IMAGE_EXTENSIONS = frozenset(IMAGE_FORMATS)


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension, whatever its case."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def content_type_of(name: str) -> str | None:
    """The content type of a picture file by its name; None for camera RAW and for other files."""
    fmt = IMAGE_FORMATS.get(Path(name).suffix.lower())
    return fmt.content_type if fmt is not None else None


def load_bytes(data: bytes, name: str = "") -> Image.Image:
    """Decode, rotate upright and downscale; BadImage when it is not an acceptable image.

    `name`, where there is one, tells a camera RAW file by its extension (see decode_for_model).
    """
    try:
        return decode_for_model(data, name=name).image
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
        decoded = decode_for_model(data, name=str(path))
    except ValueError as e:
        raise BadImage(str(e)) from None
    return LoadedImage(decoded.image, data, decoded.width, decoded.height)


def to_png(img: Image.Image) -> bytes:
    """Lossless transport encoding, so the endpoint sees exactly the pixels the local path encodes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_transport(img: Image.Image, limit: int = MAX_TRANSPORT_BYTES) -> tuple[bytes, str]:
    """(body, content type) for an endpoint: PNG, or JPEG (quality 95) when the PNG is over `limit`.

    A downscaled picture (at most 448 x 896) is ~1.2 MB as PNG even when pure noise, so JPEG is the
    fallback for larger images only; lossless PNG keeps local and endpoint vectors equal otherwise.
    """
    png = to_png(img)
    if len(png) <= limit:
        return png, "image/png"
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "image/jpeg"
