"""Image bytes for tests: good pictures in several formats and a zoo of bad files."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def picture(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A small picture: a coloured square on white."""
    img = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    img.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (side // 8 + 1) * 16, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def bad_files() -> dict[str, bytes]:
    """name -> bytes of files that must be skipped, never indexed."""
    good = picture(fmt="JPEG")
    return {
        "zero-byte.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50,
        "not-an-image.jpg": b"hello, I am a text file\n" * 20,
        "bomb.png": png_bomb(),
    }


# -- odd but real-world files (the bad-input catalogue, EXIF orientation) ---------------------------

# The transpose that undoes each EXIF orientation (what ImageOps.exif_transpose applies), and its inverse.
_EXIF_UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_INVERSE = {**_EXIF_UNDO, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
ORIENTATION_TAG = 0x0112


def upright(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An asymmetric picture (a red block top-left, a blue bar at the bottom) that shows any rotation."""
    img = Image.new("RGB", size, (250, 250, 250))
    w, h = size
    img.paste((220, 30, 30), (0, 0, w // 3, h // 2))
    img.paste((30, 60, 220), (0, 3 * h // 4, w, h))
    return img


def jpeg_with_orientation(img: Image.Image, orientation: int, store_rotated: bool = True) -> bytes:
    """A JPEG whose EXIF says `orientation`; with store_rotated the pixels are stored as a camera would
    (so that applying the tag gives `img` back)."""
    stored = img.transpose(_EXIF_INVERSE[orientation]) if store_rotated and orientation != 1 else img
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png_16bit(size: tuple[int, int] = (64, 48)) -> bytes:
    """A 16-bit greyscale PNG (mode I;16) with a gradient using the full range."""
    import numpy as np

    arr = np.tile(np.linspace(0, 65535, size[0], dtype=np.uint16), (size[1], 1))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def palette_png_transparent(size: tuple[int, int] = (64, 48)) -> bytes:
    """A palette PNG whose background index is transparent (tRNS)."""
    img = Image.new("P", size, 0)
    img.putpalette([0, 0, 0, 220, 30, 30] + [0] * 762)
    img.paste(1, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def cmyk_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    """A CMYK JPEG, as print workflows export them."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(picture(size=size))).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def animated_gif(size: tuple[int, int] = (64, 48)) -> bytes:
    """A three-frame GIF: red, green, blue squares; the first frame is the red one."""
    frames = [
        Image.open(io.BytesIO(picture(c, size))).convert("P") for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    ]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def svg() -> bytes:
    """A valid SVG drawing (a vector format clipsearch does not rasterise)."""
    return (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect x="16" y="12" width="32" height="24" fill="red"/></svg>\n'
    )


def heic() -> bytes:
    """The start of an HEIC file (ISO-BMFF `ftyp heic` box and a `meta` box), as iPhones write them."""
    ftyp = b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heic"
    meta = b"meta" + b"\x00" * 4 + b"hdlr" + b"\x00" * 64
    return struct.pack(">I", len(ftyp) + 4) + ftyp + struct.pack(">I", len(meta) + 4) + meta


def noise_photo(megabytes: float = 40.0, seed: int = 0) -> bytes:
    """An RGB PNG of random noise (incompressible), about `megabytes` MB on disk."""
    import numpy as np

    pixels = int(megabytes * 1024 * 1024 / 3)
    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
