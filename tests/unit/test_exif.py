"""EXIF orientation: a phone photo stored rotated with an orientation tag embeds like the upright one.

The rotation is applied once, in model_code.inference.decode_image (ImageOps.exif_transpose), which
every host shares: clipsearch.images.load_bytes/load_file, the SageMaker handler and the AWS ingest.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support.images import jpeg_with_orientation, upright

from clipsearch.images import load_bytes
from model_code import inference

ORIENTATIONS = range(2, 9)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_given_rotated_pixels_with_their_orientation_tag_when_loaded_then_the_upright_picture_comes_back(
    orientation: int,
) -> None:
    plain = load_bytes(jpeg_with_orientation(upright(), 1))

    tagged = load_bytes(jpeg_with_orientation(upright(), orientation))

    assert tagged.size == plain.size
    assert float(np.abs(pixels(tagged) - pixels(plain)).mean()) < 3.0  # JPEG noise only


def test_given_rotated_pixels_without_a_tag_when_loaded_then_they_stay_rotated() -> None:
    # The control: the comparison above would notice a rotation that was not undone.
    rotated = upright().transpose(Image.Transpose.ROTATE_90)

    img = load_bytes(jpeg_with_orientation(rotated, 1))

    assert img.size == (64, 96)


def test_given_a_pair_differing_only_in_orientation_when_embedded_then_the_vectors_match(demo_encoder) -> None:
    picture = upright((224, 160))
    upright_jpeg = jpeg_with_orientation(picture, 1)
    phone_jpeg = jpeg_with_orientation(picture, 6)  # stored rotated, tag "rotate 90 CW to display"
    untagged = jpeg_with_orientation(picture.transpose(Image.Transpose.ROTATE_90), 1)

    vectors = demo_encoder.encode_images([load_bytes(upright_jpeg), load_bytes(phone_jpeg), load_bytes(untagged)])

    same, control = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert same > 0.999
    assert same - control > 0.02, (same, control)


def test_given_a_tagged_jpeg_when_the_sagemaker_handler_parses_it_then_it_is_upright() -> None:
    phone_jpeg = jpeg_with_orientation(upright(), 8)

    data = inference.input_fn(phone_jpeg, "image/jpeg")

    (img,) = data["images"]
    assert img.size == (96, 64)
    assert img.getpixel((5, 5))[0] > 180  # the red block is back in the top-left corner


def test_given_a_large_camera_jpeg_when_only_its_date_is_wanted_then_only_its_head_is_read(tmp_path, monkeypatch):
    from clipsearch import ingest

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2019:07:14 15:02:11"
    path = tmp_path / "IMG_0001.JPG"
    picture.save(path, quality=95, exif=exif)
    assert path.stat().st_size > 4 * ingest.EXIF_HEAD_BYTES
    read: list[int] = []
    real = ingest.read_picture_file

    def recording(p, limit=ingest.MAX_FILE_BYTES, head=None):
        data, st = real(p, limit, head)
        read.append(len(data))
        return data, st

    monkeypatch.setattr(ingest, "read_picture_file", recording)

    assert ingest.capture_time_of(path) == ("2019-07-14T15:02:11", "")
    assert read == [ingest.EXIF_HEAD_BYTES]
