"""Image bytes for tests: good pictures in several formats and a zoo of bad files."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def picture(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48),
            fmt: str = "PNG") -> bytes:
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
