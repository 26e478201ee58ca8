"""Pictures as a camera writes them: shape pictures, JPEGs, and minimal DNG files that LibRaw opens.

The DNG is written byte by byte (a TIFF with the DNG tags: an 8-bit JPEG preview in IFD0, as cameras store
it, and a tiny 16-bit CFA raw image in a SubIFD), so rawpy's extract_thumb() returns the preview. Used by the
format tests, the AWS pipeline test and the built-layer test (tests/unit/test_template.py).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.demo.shapes import render


def shape(colour: str, kind: str, seed: int) -> Image.Image:
    return render(colour, kind, "large", rng=np.random.default_rng(seed), image_size=256).convert("RGB")


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


_PACK = {1: "B", 3: "H", 4: "I", 10: "i"}  # TIFF field types: BYTE, SHORT, LONG, SRATIONAL
Entry = tuple[int, int, Any]  # (tag, type, values); a value ("blob", i) / ("ifd", j) is that offset


def little_tiff(ifds: list[list[Entry]], blobs: list[bytes]) -> bytes:
    """A little-endian TIFF: IFD 0 first, further IFDs reached through SubIFDs, then the blobs."""

    def field(typ: int, values: Any, where: Any) -> bytes:
        if typ == 2:  # ASCII, given as bytes with its NUL
            return bytes(values)
        return struct.pack("<" + _PACK[typ] * len(values), *(where(v) if isinstance(v, tuple) else v for v in values))

    def padded(n: int) -> int:
        return n + n % 2

    sizes = [
        2 + 12 * len(ifd) + 4 + sum(padded(len(d)) for d in (field(t, v, lambda _: 0) for _, t, v in ifd) if len(d) > 4)
        for ifd in ifds
    ]
    ifd_at = [8 + sum(sizes[:i]) for i in range(len(ifds))]
    blob_at = [8 + sum(sizes) + sum(padded(len(b)) for b in blobs[:i]) for i in range(len(blobs))]

    def where(ref: tuple[str, int]) -> int:
        return blob_at[ref[1]] if ref[0] == "blob" else ifd_at[ref[1]]

    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at[0]))
    for ifd, at in zip(ifds, ifd_at, strict=True):
        tail_at = at + 2 + 12 * len(ifd) + 4
        head, tail = struct.pack("<H", len(ifd)), b""
        for tag, typ, values in sorted(ifd, key=lambda e: e[0]):
            data = field(typ, values, where)
            if len(data) > 4:
                head += struct.pack("<HHII", tag, typ, len(values), tail_at + len(tail))
                tail += data + b"\x00" * (len(data) % 2)
            else:
                head += struct.pack("<HHI", tag, typ, len(values)) + data.ljust(4, b"\x00")
        out += head + struct.pack("<I", 0) + tail
    for blob in blobs:
        out += blob + b"\x00" * (len(blob) % 2)
    return bytes(out)


def dng(
    preview: Image.Image | None, orientation: int = 1, side: int = 64, thumbnail: Image.Image | None = None
) -> bytes:
    """A minimal DNG 1.4: the camera's JPEG preview in IFD0 (NewSubFileType 1), the raw CFA in a SubIFD.

    Without a preview, IFD0 is the raw image itself and the file has no thumbnail at all. With a thumbnail,
    IFD0 holds it (small, uncompressed RGB) and the preview moves to a SubIFD beside the raw image, as a
    Nikon NEF stores them: Pillow, which reads IFD0, sees only the thumbnail.
    """
    raw = (np.arange(side * side, dtype="<u2") % 1024).tobytes()
    model = b"clipsearch test camera\x00"
    camera: list[Entry] = [
        (271, 2, b"Canon\x00"),
        (272, 2, model),
        (274, 3, [orientation]),
        (50706, 1, [1, 4, 0, 0]),
        (50708, 2, model),
    ]
    cfa: list[Entry] = [
        (256, 4, [side]),
        (257, 4, [side]),
        (258, 3, [16]),
        (259, 3, [1]),
        (262, 3, [32803]),
        (277, 3, [1]),
        (278, 4, [side]),
        (279, 4, [len(raw)]),
        (284, 3, [1]),
        (33421, 3, [2, 2]),
        (33422, 1, [0, 1, 1, 2]),
    ]
    if preview is None:
        return little_tiff([[*camera, *cfa, (254, 4, [0]), (273, 4, [("blob", 0)])]], [raw])
    shown = jpeg(preview)
    width, height = preview.size
    shown_ifd: list[Entry] = [
        (254, 4, [1]),
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [8, 8, 8]),
        (259, 3, [7]),
        (262, 3, [6]),
        (273, 4, [("blob", 0)]),
        (277, 3, [3]),
        (278, 4, [height]),
        (279, 4, [len(shown)]),
    ]
    raw_ifd: list[Entry] = [*cfa, (254, 4, [0]), (273, 4, [("blob", 1)])]
    if thumbnail is None:
        return little_tiff([[*camera, *shown_ifd, (330, 4, [("ifd", 1)])], raw_ifd], [shown, raw])
    small = thumbnail.convert("RGB").tobytes()
    ifd0: list[Entry] = [
        *camera,
        (254, 4, [1]),
        (256, 4, [thumbnail.width]),
        (257, 4, [thumbnail.height]),
        (258, 3, [8, 8, 8]),
        (259, 3, [1]),
        (262, 3, [2]),
        (273, 4, [("blob", 2)]),
        (277, 3, [3]),
        (278, 4, [thumbnail.height]),
        (279, 4, [len(small)]),
        (330, 4, [("ifd", 1), ("ifd", 2)]),
    ]
    return little_tiff([ifd0, shown_ifd, raw_ifd], [shown, raw, small])
