"""Photo-like generated pictures for the duplicate tests and bench/duplicates.py.

A scene is a lit gradient, a texture (grain and a wave pattern) and a few soft shapes. The copies a
duplicate finder must catch (JPEG quality 60, half size, 5% cropped) and the pictures it must not (the same
subject drawn again: same palette and shapes, moved as between two burst shots) are made from it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Subject:
    """What a scene shows: its palette and its shapes (kind, colour); the layout is drawn per picture."""

    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    shapes: tuple[tuple[str, tuple[int, int, int]], ...]
    wave: float


def subject(seed: int) -> Subject:
    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        r, g, b = (int(v) for v in rng.integers(20, 236, 3))
        return r, g, b

    kinds = ("ellipse", "rectangle", "triangle")
    shapes = tuple((kinds[int(rng.integers(0, 3))], colour()) for _ in range(int(rng.integers(2, 5))))
    return Subject(colour(), colour(), shapes, float(rng.uniform(0.02, 0.08)))


def scene(what: Subject, seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """One picture of the subject; another seed moves the light, the grain and every shape."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    horizon = rng.uniform(0.35, 0.65)
    mix = np.clip((y - horizon) * 6.0 + 0.5, 0.0, 1.0)
    base = np.array(what.sky, np.float32) * (1 - mix) + np.array(what.ground, np.float32) * mix
    light = 0.75 + 0.35 * (1.0 - np.hypot(x - rng.uniform(0, 1), y - rng.uniform(0, 1)))
    wave = 1.0 + 0.08 * np.sin((x * rng.uniform(20, 60) + y * rng.uniform(5, 30)) / what.wave * 0.05)
    grain = rng.normal(0.0, 6.0, (h, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(base * light * wave + grain, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for kind, fill in what.shapes:
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        r = rng.uniform(0.08, 0.2) * min(w, h)
        if kind == "ellipse":
            draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=fill)
        elif kind == "rectangle":
            draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img.filter(ImageFilter.GaussianBlur(0.8))


def encoded(img: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def reencoded(img: Image.Image) -> bytes:
    """The picture saved again as JPEG at quality 60."""
    return encoded(img, quality=60)


def half_size(img: Image.Image) -> bytes:
    """The picture resized to 50% on each side."""
    return encoded(img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS))


def cropped(img: Image.Image) -> bytes:
    """The picture with 5% of its width and height cut away (from the right and the bottom)."""
    return encoded(img.crop((0, 0, round(img.width * 0.95), round(img.height * 0.95))))


# The edits a duplicate finder must see through, by name.
EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg-q60": reencoded,
    "resized-50%": half_size,
    "cropped-5%": cropped,
}
