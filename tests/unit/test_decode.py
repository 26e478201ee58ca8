"""The one shared decode (model_code.inference): centre-crop to 2:1, refuse slivers, JPEG draft decoding.

Every host goes through it: `clipsearch index` (load_file), search and serve (load_bytes), the ingest
Lambda (decode_for_model) and the SageMaker handler (input_fn).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.images import jpeg_with_orientation

from clipsearch.demo.shapes import render
from clipsearch.errors import BadImage
from clipsearch.images import MAX_TRANSPORT_BYTES, load_bytes, load_file, to_png, to_transport
from model_code import inference
from model_code.inference import MAX_ASPECT, MAX_SIDE, MIN_SIDE, decode_for_model, decode_image, downscale


def encoded(img: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def banded(size: tuple[int, int]) -> Image.Image:
    """Red outer fifths, green middle fifths, blue centre fifth along the long side: shows what a crop kept."""
    img = Image.new("RGB", size, (220, 30, 30))
    wide = size[0] >= size[1]
    long = size[0] if wide else size[1]
    for lo, hi, colour in ((long // 5, 4 * long // 5, (30, 170, 60)), (2 * long // 5, 3 * long // 5, (30, 60, 220))):
        img.paste(colour, (lo, 0, hi, size[1]) if wide else (0, lo, size[0], hi))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is garbage: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def shapes_scene(size: tuple[int, int], seed: int = 7) -> Image.Image:
    """A demo-model picture (a blue star) in the middle of a wider, noisy background."""
    rng = np.random.default_rng(seed)
    background = Image.fromarray(rng.integers(90, 166, (size[1], size[0], 3), dtype=np.uint8))
    side = min(size)
    background.paste(
        render("blue", "star", "large", rng=rng, image_size=side), ((size[0] - side) // 2, (size[1] - side) // 2)
    )
    return background


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the 2:1 crop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5000, 500), (500, 5000)], ids=["wide", "tall"])
def test_given_a_long_picture_when_decoded_then_only_its_centre_at_two_to_one_is_kept(size: tuple[int, int]) -> None:
    img = decode_image(encoded(banded(size)))

    assert sorted(img.size) == [500, 1000]
    arr = np.asarray(img)
    # The kept 1000 px of 5000 are the centre: all blue (2/5..3/5 of the long side), nothing red or green.
    assert (arr[..., 2] > 200).all() and (arr[..., 0] < 50).all()


def test_given_a_picture_at_most_two_to_one_when_decoded_then_nothing_is_cropped() -> None:
    assert decode_image(encoded(banded((1000, 500)))).size == (1000, 500)
    assert decode_image(encoded(banded((300, 400)))).size == (300, 400)


def test_given_a_40000x1000_picture_when_loaded_then_the_model_gets_896x448_and_the_size_is_the_original() -> None:
    data = encoded(Image.new("RGB", (40_000, 1000), (10, 120, 200)))

    decoded = decode_for_model(data)
    loaded = load_bytes(data)

    assert decoded.image.size == loaded.size == (MAX_ASPECT * MAX_SIDE, MAX_SIDE)
    assert (decoded.width, decoded.height) == (40_000, 1000)


def test_given_a_tall_photo_stored_turned_when_decoded_then_the_upright_centre_is_kept_and_the_size_is_upright(
    tmp_path: Path,
) -> None:
    upright = banded((4000, 400))
    path = tmp_path / "panorama.jpg"
    path.write_bytes(jpeg_with_orientation(upright, 6))  # stored 400x4000, turned by its EXIF tag

    loaded = load_file(path)

    assert (loaded.width, loaded.height) == (4000, 400)
    assert loaded.image.size == (800, 400)
    arr = np.asarray(loaded.image)
    # The centre fifth (blue) only: no red from the ends, and blue to the edges but for JPEG's bleed there.
    assert (arr[..., 0] < 100).all() and (arr[:, 8:-8, 2] > 200).all()


@pytest.mark.parametrize("size", [(3000, 600), (3037, 611), (4001, 777)])
def test_given_a_wide_picture_when_cropped_then_the_demo_model_vector_is_unchanged_beyond_resampling_noise(
    demo_encoder: Any, size: tuple[int, int]
) -> None:
    # What CLIP saw before: the whole picture downscaled (short side 448), then its own centre crop.
    picture = shapes_scene(size)
    whole = picture.resize((round(size[0] * MAX_SIDE / size[1]), MAX_SIDE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    cropped = decode_for_model(encoded(picture)).image
    assert cropped.size == (896, 448)

    before, after = demo_encoder.encode_images([whole, cropped])

    # Measured, in the order above: cosine 1.0 / 0.99997 / 0.9963, max |difference| 0 / 0.002 / 0.019.
    # Only where the two centre crops land on different sub-pixel positions (4001 is odd) do they differ,
    # and a noise background is the worst case for that; another picture of this kind is at cosine 0.88.
    assert cosine(before, after) > 0.99
    assert float(np.abs(before - after).max()) < 0.05


def test_downscale_crops_too_so_every_host_sends_at_most_two_to_one() -> None:
    assert downscale(Image.new("RGB", (9000, 300))).size == (600, 300)
    assert downscale(Image.new("RGB", (900, 3000))).size == (448, 896)


# -- slivers are refused, from the header ----------------------------------------------------------


def _index_file(data: bytes, tmp_path: Path) -> Image.Image:
    path = tmp_path / "sliver.png"
    path.write_bytes(data)
    return load_file(path).image


HOSTS: dict[str, Callable[[bytes, Path], Any]] = {
    "search and serve (load_bytes)": lambda data, _: load_bytes(data),
    "clipsearch index (load_file)": _index_file,
    "ingest Lambda (decode_for_model)": lambda data, _: decode_for_model(data),
    "SageMaker handler (input_fn)": lambda data, _: inference.input_fn(data, "image/png"),
}


@pytest.mark.parametrize("host", HOSTS)
def test_given_a_1x300000_png_when_any_host_decodes_it_then_it_is_refused_as_too_small(
    host: str, tmp_path: Path
) -> None:
    data = encoded(Image.new("L", (1, 300_000), 128))
    assert len(data) < 2_000

    with pytest.raises((ValueError, BadImage)) as raised:  # each host's typed refusal, with the reason
        HOSTS[host](data, tmp_path)

    assert "image too small: 1x300000 pixels" in str(raised.value)
    assert f"at least {MIN_SIDE}" in str(raised.value)


def test_given_a_sliver_when_loaded_then_bad_image_names_the_reason() -> None:
    with pytest.raises(BadImage, match="too small: 15x1000"):
        load_bytes(encoded(Image.new("RGB", (15, 1000))))


def test_given_a_header_claiming_a_sliver_when_decoded_then_it_is_refused_before_any_pixel_is_read() -> None:
    # The pixel data is garbage: any attempt to decode it would say "corrupt", not "too small".
    with pytest.raises(ValueError, match="image too small: 300000x1 pixels"):
        decode_image(png_header_only(300_000, 1))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decode_image(png_header_only(64, 64))


def test_given_the_smallest_accepted_picture_when_decoded_then_it_is_kept() -> None:
    assert decode_image(encoded(Image.new("RGB", (MIN_SIDE, 1000)))).size == (MIN_SIDE, 2 * MIN_SIDE)


# -- JPEG draft decoding ---------------------------------------------------------------------------


def camera_like_jpeg(size: tuple[int, int] = (4032, 3024)) -> bytes:
    """A phone-sized JPEG: a shapes scene upscaled smoothly, with sensor-like noise, quality 90."""
    scene = shapes_scene((size[0] // 8, size[1] // 8), seed=11).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(3).normal(0, 6, (size[1], size[0], 1))
    arr = np.clip(np.asarray(scene, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return encoded(Image.fromarray(arr), "JPEG", quality=90)


def full_decode(data: bytes) -> Image.Image:
    """The decode without draft: every pixel, then downscale (what the shared decode did before)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return downscale(img.convert("RGB"))


def test_given_a_camera_jpeg_when_decoded_then_it_is_decoded_at_a_reduced_scale_still_above_the_model_size() -> None:
    data = camera_like_jpeg()

    img = decode_image(data)

    # 4032x3024 at the 1/4 DCT scale: 1008x756, the smallest scale whose short side is still >= 448.
    assert img.size == (1008, 756)
    assert min(downscale(img).size) == MAX_SIDE


def test_given_a_camera_jpeg_when_draft_decoded_then_its_vector_agrees_with_the_full_decode(demo_encoder: Any) -> None:
    data = camera_like_jpeg()

    draft, full = decode_for_model(data).image, full_decode(data)
    assert draft.size == full.size == (597, MAX_SIDE)

    a, b = demo_encoder.encode_images([draft, full])

    # Measured: cosine 0.999996, max |difference| 0.0007; mean pixel difference 0.41 of 255.
    assert cosine(a, b) > 0.999
    pixels = np.abs(np.asarray(draft, np.int16) - np.asarray(full, np.int16))
    assert float(pixels.mean()) < 3.0


# -- transport encoding ----------------------------------------------------------------------------


def test_given_a_downscaled_picture_when_encoded_for_the_endpoint_then_it_is_lossless_png_under_4_mb() -> None:
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (448, 896, 3), dtype=np.uint8))

    body, ctype = to_transport(noise)

    assert ctype == "image/png" and len(body) <= MAX_TRANSPORT_BYTES
    assert decode_image(body).tobytes() == noise.tobytes()


def test_given_a_picture_whose_png_is_over_the_limit_when_encoded_then_it_travels_as_jpeg_under_it() -> None:
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    assert len(to_png(noise)) > MAX_TRANSPORT_BYTES

    body, ctype = to_transport(noise)

    assert ctype == "image/jpeg" and len(body) <= MAX_TRANSPORT_BYTES
    assert Image.open(io.BytesIO(body)).size == (2000, 1500)


# -- pictures whose conversion is bigger than they are: shrunk before they are converted ------------


def palette_with_transparency(size: tuple[int, int], seed: int = 3) -> tuple[Image.Image, int]:
    """A 64-colour palette picture of soft blobs; its most common index is the transparent one."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (size[1] // 64 + 1, size[0] // 64 + 1, 3), dtype=np.uint8))
    # Quantized at a quarter of the size (quick), then enlarged: palette pictures resize with NEAREST.
    quarter = (size[0] // 4, size[1] // 4)
    img = small.resize(quarter, Image.Resampling.BILINEAR).quantize(64).resize(size, Image.Resampling.NEAREST)
    transparent = max(img.getcolors(64) or [(0, 0)])[1]
    return img, int(transparent)


def grey_16_bit(size: tuple[int, int], seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (size[1] // 16 + 1, size[0] // 16 + 1), dtype=np.uint8))
    return Image.fromarray(np.asarray(small.resize(size, Image.Resampling.BILINEAR), dtype=np.uint16) * 250)


def converted_then_shrunk(data: bytes) -> np.ndarray:
    """What the decode gave before: to_rgb at full size, then downscale."""
    return np.asarray(downscale(inference.to_rgb(Image.open(io.BytesIO(data)))), dtype=np.int16)


@pytest.mark.parametrize("size", [(1200, 900), (3000, 2800)], ids=["kept-whole", "reduced"])
@pytest.mark.parametrize("kind", ["palette+transparency", "I;16", "I", "F"])
def test_given_a_picture_whose_conversion_is_large_when_decoded_then_pixels_agree_with_converting_first(
    kind: str, size: tuple[int, int]
) -> None:
    if kind == "palette+transparency":
        img, transparent = palette_with_transparency(size)
        assert np.mean(np.asarray(img) == transparent) > 0.01  # the transparency shows in the test
        data = encoded(img, transparency=transparent)
    elif kind == "I;16":
        data = encoded(grey_16_bit(size))
    else:  # 32-bit integer and float grey, as TIFF stores them
        data = encoded(grey_16_bit(size).convert(kind), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == ("P" if kind == "palette+transparency" else kind)

    decoded = decode_for_model(data)

    new = np.asarray(decoded.image, dtype=np.int16)
    old = converted_then_shrunk(data)
    assert decoded.image.mode == "RGB" and new.shape == old.shape and (decoded.width, decoded.height) == size
    difference = np.abs(new - old)
    assert difference.max() <= 4 and difference.mean() < 0.1, (difference.max(), difference.mean())


# In a fresh interpreter so that the peak is the decode's own (VmHWM: see tests/integration/test_payload_limits.py).
DECODE_ONCE = """
import re, sys
from model_code.inference import decode_for_model
def peak_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) // 1024
data = open(sys.argv[1], "rb").read()
before = peak_mb()
decoded = decode_for_model(data)
assert decoded.image.mode == "RGB" and max(decoded.image.size) <= 2 * min(decoded.image.size) == 896
print(before, peak_mb())
"""
BIG_SIDE = 7072  # 50 MP
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("kind", "bytes_per_pixel"), [("palette+transparency", 1), ("I;16", 2)])
def test_given_a_50_mp_picture_whose_conversion_is_large_when_decoded_then_it_is_shrunk_before_converted(
    kind: str, bytes_per_pixel: int, tmp_path: Path
) -> None:
    # Converted at full size, a palette picture becomes RGBA (4 bytes a pixel, then the composite and RGB)
    # and a 16-bit one float32 twice: ~12 bytes a pixel over the picture, 1.3 GB at MAX_PIXELS, past the
    # 1024 MB ingest function. Shrunk first, only a band of rows is converted at a time.
    size = (BIG_SIDE, BIG_SIDE)
    if kind == "I;16":
        data = encoded(grey_16_bit(size), compress_level=1)
    else:
        img, transparent = palette_with_transparency(size)
        data = encoded(img, transparency=transparent, compress_level=1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    del data

    done = subprocess.run(
        [sys.executable, "-c", DECODE_ONCE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    before_mb, peak_mb = (int(v) for v in done.stdout.split())
    picture_mb = BIG_SIDE * BIG_SIDE * bytes_per_pixel / 2**20  # the decoded picture itself: unavoidable
    assert peak_mb - before_mb <= picture_mb + 64, (kind, before_mb, peak_mb, picture_mb)
