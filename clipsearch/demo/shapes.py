"""Procedural pictures of coloured shapes: the demo model's training data and the demo catalogue.

Two independent renderers draw the same vocabulary:

- `render` (PIL `ImageDraw` polygons, HSV colour jitter) trains the demo model and draws the demo catalogue;
- `render_alt` (a numpy signed-distance rasteriser with its own palette, geometry, shading and shadows) is
  used only to evaluate it, so the reported accuracy measures generalisation to pictures it never saw.

Pure PIL/numpy on purpose: the CLI can build a catalogue without importing torch.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")

# Hue centre (degrees) and allowed spread for the training renderer. The spreads stop short of the
# neighbouring colour so that every jittered sample still deserves its name.
_HUES: dict[str, tuple[float, float]] = {
    "red": (0.0, 9.0),
    "orange": (28.0, 7.0),
    "yellow": (53.0, 6.0),
    "green": (122.0, 25.0),
    "blue": (218.0, 16.0),
    "purple": (282.0, 14.0),
}

# The evaluation renderer uses a different, RGB-defined palette with RGB-space jitter.
_ALT_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 205, 25),
    "green": (44, 160, 44),
    "blue": (31, 100, 200),
    "purple": (140, 70, 185),
}

# Canonical colours for anything that needs one swatch per name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}

# Shape extent (radius as a fraction of the picture side) for each size word.
_RADIUS: dict[str, tuple[float, float]] = {"small": (0.12, 0.22), "large": (0.28, 0.45)}
_ALT_RADIUS: dict[str, tuple[float, float]] = {"small": (0.13, 0.21), "large": (0.26, 0.44)}


def classes() -> list[tuple[str, str]]:
    """All (colour, shape) pairs, in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def title(colour: str, shape: str, size: str | None = None) -> str:
    """The plain caption of a picture, e.g. "a large red circle" or "an orange star"."""
    phrase = f"{size} {colour} {shape}" if size else f"{colour} {shape}"
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _check(colour: str, shape: str, size: str) -> None:
    if colour not in COLOURS or shape not in SHAPES or size not in SIZES:
        raise ValueError(f"unknown picture: {colour!r} {shape!r} {size!r}")


def _side(rng: np.random.Generator, image_size: int | None) -> int:
    # Any input resolution: the model sees these only after CLIP's own resize.
    return int(image_size) if image_size else int(rng.integers(48, 257))


def _light_colour(rng: np.random.Generator, low: float = 0.8) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(low, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255.0


# --------------------------------------------------------------------------- training renderer (PIL)


def _shape_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    centre, spread = _HUES[colour]
    hue = ((centre + rng.uniform(-spread, spread)) % 360.0) / 360.0
    # Dark yellow/orange read as olive/brown, so those keep a high value.
    v_low = 0.8 if colour in ("yellow", "orange") else 0.6
    sat = rng.uniform(0.6, 1.0)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, rng.uniform(v_low, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _background(side: int, rng: np.random.Generator) -> np.ndarray:
    a = _light_colour(rng)
    if rng.random() < 0.5:
        return np.broadcast_to(a, (side, side, 3)).copy()
    b = _light_colour(rng)
    t = _ramp(side, rng)[..., None]
    return a * (1.0 - t) + b * t


def _ramp(side: int, rng: np.random.Generator) -> np.ndarray:
    """A linear 0..1 ramp across the picture in a random direction."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    proj = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
    return np.asarray((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6), dtype=np.float32)


def _polygon(shape: str, radius: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Vertices around the origin, unrotated; circles are handled by the caller."""
    if shape == "square":
        h = radius * rng.uniform(0.72, 0.85)
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        pts = []
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15)
            r = radius * rng.uniform(0.9, 1.05)
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    inner = radius * rng.uniform(0.36, 0.55)
    return [
        (
            (radius if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
            (radius if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5),
        )
        for k in range(10)
    ]


def render(
    colour: str,
    shape: str,
    size: str = "large",
    *,
    rng: np.random.Generator,
    image_size: int | None = None,
) -> Image.Image:
    """Draw one picture with the training renderer (PIL polygons), randomly posed and degraded.

    `image_size` fixes the square picture's side; by default it is random in 48..256.
    """
    _check(colour, shape, size)
    side = _side(rng, image_size)
    # Supersample sometimes, so the model sees both hard aliased edges and smooth ones.
    ss = int(rng.choice([1, 2, 4]))
    big = side * ss
    radius = rng.uniform(*_RADIUS[size]) * side * ss
    margin = radius + 1.0
    cx = rng.uniform(margin, big - margin) if big - 2 * margin > 0 else big / 2
    cy = rng.uniform(margin, big - margin) if big - 2 * margin > 0 else big / 2
    angle = rng.uniform(0.0, 2.0 * math.pi)

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        squash = rng.uniform(0.92, 1.0)
        draw.ellipse([cx - radius, cy - radius * squash, cx + radius, cy + radius * squash], fill=255)
        outline_pts = None
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in _polygon(shape, radius, rng)]
        draw.polygon(pts, fill=255)
        outline_pts = pts
    if ss > 1:
        mask = mask.resize((side, side), Image.Resampling.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0

    fill = _shape_colour(colour, rng)
    # Uneven lighting across the shape, as on a photographed object.
    shade = 1.0 + rng.uniform(-0.18, 0.18) * (_ramp(side, rng)[..., None] - 0.5) * 2.0
    shape_rgb = np.clip(fill * shade, 0, 255)
    img = _background(side, rng) * (1.0 - alpha) + shape_rgb * alpha

    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if outline_pts is not None and rng.random() < 0.25:
        # A darker edge line, as clip-art often has.
        width = max(1, int(round(side * rng.uniform(0.01, 0.03))))
        edge = tuple(int(v) for v in fill * rng.uniform(0.4, 0.7))
        scaled = [(x / ss, y / ss) for x, y in outline_pts]
        ImageDraw.Draw(pic).line([*scaled, scaled[0]], fill=edge, width=width)
    return _degrade(pic, side, rng)


def _degrade(pic: Image.Image, side: int, rng: np.random.Generator) -> Image.Image:
    """Blur, sensor noise and JPEG artefacts, each at random."""
    if rng.random() < 0.6:
        pic = pic.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.018 * side + 0.5)))
    if rng.random() < 0.5:
        arr = np.asarray(pic, dtype=np.float32)
        noisy = arr + rng.normal(0.0, rng.uniform(1.0, 8.0), arr.shape)
        pic = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        buf = io.BytesIO()
        pic.save(buf, format="JPEG", quality=int(rng.integers(35, 95)))
        buf.seek(0)
        pic = Image.open(buf).convert("RGB")
    return pic


# --------------------------------------------------------------------- evaluation renderer (numpy SDF)


def _sd_polygon(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside), after Inigo Quilez's sdPolygon."""
    d = (px - verts[0, 0]) ** 2 + (py - verts[0, 1]) ** 2
    s = np.ones_like(px)
    n = len(verts)
    for i in range(n):
        j = (i - 1) % n
        ex, ey = verts[j, 0] - verts[i, 0], verts[j, 1] - verts[i, 1]
        wx, wy = px - verts[i, 0], py - verts[i, 1]
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        d = np.minimum(d, bx * bx + by * by)
        c1 = py >= verts[i, 1]
        c2 = py < verts[j, 1]
        c3 = ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        s = np.where(flip, -s, s)
    return np.asarray(s * np.sqrt(d))


def _alt_sdf(shape: str, px: np.ndarray, py: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Distance field of a shape of extent `r` centred at the origin (coordinates already rotated)."""
    if shape == "circle":
        return np.asarray(np.hypot(px, py) - r)
    if shape == "square":
        # Rounded box: a different geometry from the training renderer's sharp polygon.
        h = r * rng.uniform(0.7, 0.8)
        k = h * rng.uniform(0.0, 0.18)
        qx, qy = np.abs(px) - (h - k), np.abs(py) - (h - k)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return np.asarray(outside + np.minimum(np.maximum(qx, qy), 0.0) - k)
    if shape == "triangle":
        # Isosceles with a varying apex, slightly rounded corners.
        half_base = r * rng.uniform(0.8, 1.0)
        height = r * rng.uniform(1.45, 1.75)
        k = r * rng.uniform(0.0, 0.06)
        verts = np.array([[0.0, -height * 0.6], [half_base, height * 0.4], [-half_base, height * 0.4]])
        return _sd_polygon(px, py, verts * (1.0 - k / r)) - k
    # Star: five points with fatter arms than the training stars, rounded tips.
    inner = rng.uniform(0.45, 0.52)
    k = r * rng.uniform(0.0, 0.05)
    ang = -math.pi / 2 + np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r - k, (r - k) * inner)
    verts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    return _sd_polygon(px, py, verts) - k


def _box_blur(arr: np.ndarray, k: int) -> np.ndarray:
    """Separable box blur of odd width k, edges clamped."""
    if k <= 1:
        return arr
    pad = k // 2
    out = arr
    for axis in (0, 1):
        padded = np.pad(out, [(pad, pad) if a == axis else (0, 0) for a in range(out.ndim)], mode="edge")
        c = np.cumsum(padded, axis=axis, dtype=np.float64)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        n = out.shape[axis]
        out = (np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(0, n), axis=axis)) / k
    return np.asarray(out, dtype=np.float32)


def render_alt(
    colour: str,
    shape: str,
    size: str = "large",
    *,
    rng: np.random.Generator,
    image_size: int | None = None,
) -> Image.Image:
    """Draw one picture with the evaluation-only renderer (anti-aliased signed distance fields).

    Different palette, geometry, radial backgrounds, soft drop shadows and box blur: the demo model
    never trains on these pictures.
    """
    _check(colour, shape, size)
    side = _side(rng, image_size)
    r = rng.uniform(*_ALT_RADIUS[size]) * side
    margin = r * 1.05 + 1.0
    span = max(side - 2 * margin, 0.0)
    cx, cy = margin + rng.random() * span, margin + rng.random() * span
    theta = rng.uniform(0.0, 2.0 * math.pi)

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    ct, st = math.cos(theta), math.sin(theta)

    # The shadow must have the same geometry as the shape, hence one seed for both fields.
    geometry_seed = int(rng.integers(0, 2**31))

    def field(ox: float, oy: float) -> np.ndarray:
        dx, dy = xx - ox, yy - oy
        return _alt_sdf(shape, dx * ct + dy * st, -dx * st + dy * ct, r, np.random.default_rng(geometry_seed))

    sdf = field(cx, cy)
    # One pixel of anti-aliasing ramp on the distance field.
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]

    # Radial background between two light tints.
    inner, outer = _light_colour(rng, 0.82), _light_colour(rng, 0.78)
    gx, gy = rng.uniform(0, side), rng.uniform(0, side)
    t = np.clip(np.hypot(xx - gx, yy - gy) / (side * rng.uniform(0.6, 1.4)), 0.0, 1.0)[..., None]
    img = inner * (1.0 - t) + outer * t

    if rng.random() < 0.35:
        off = side * rng.uniform(0.01, 0.03)
        shadow = np.clip(0.5 - field(cx + off, cy + off) / max(side * 0.02, 1.0), 0.0, 1.0)[..., None]
        img = img * (1.0 - 0.25 * shadow)

    palette = np.array(_ALT_PALETTE[colour], dtype=np.float32)
    base = np.clip(palette + rng.normal(0.0, 10.0, 3), 0, 255) * rng.uniform(0.85, 1.05)
    # Radial highlight: brighter towards a light source inside the shape.
    lx, ly = cx + rng.uniform(-0.4, 0.4) * r, cy + rng.uniform(-0.4, 0.4) * r
    glow = np.clip(1.0 - np.hypot(xx - lx, yy - ly) / (2.0 * r), 0.0, 1.0)[..., None]
    fill = np.clip(base * (0.9 + rng.uniform(0.0, 0.2) * glow), 0, 255)
    img = img * (1.0 - alpha) + fill * alpha

    img = _box_blur(img.astype(np.float32), int(rng.choice([1, 1, 3, 3, 5])) if side >= 96 else 1)
    img = img + rng.normal(0.0, 3.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------- demo catalogue


def demo_catalogue(n: int, seed: int = 0, image_size: int = 192) -> Iterator[tuple[str, Image.Image]]:
    """Yield `n` (title, picture) pairs, e.g. ("a large red circle", <image>), cycling through all classes.

    Titles repeat (there are 48 of them); the order of classes is shuffled by `seed`.
    """
    rng = np.random.default_rng(seed)
    kinds = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]
    order: list[tuple[str, str, str]] = []
    while len(order) < n:
        order.extend(kinds[i] for i in rng.permutation(len(kinds)))
    for colour, shape, size in order[:n]:
        yield title(colour, shape, size), render(colour, shape, size, rng=rng, image_size=image_size)
