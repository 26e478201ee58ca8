"""`clipsearch package-model`: the archive SageMaker's PyTorch container loads, and what it serves."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsearch.cli import EXIT_OK, EXIT_USAGE, main
from clipsearch.errors import BadRequest
from clipsearch.images import load_file
from clipsearch.packaging import MANIFEST, package_model
from model_code import inference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP (random weights) saved as a state dict, the way a user's own checkpoint would be."""
    import torch
    from clip.model import CLIP

    torch.manual_seed(0)
    # embed 32, 32 px images in 16 px patches, one layer each side; heads = width // 64, as clip infers.
    model = CLIP(32, 32, 1, 64, 16, 77, 49408, 64, 1, 1).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def jpeg(size: tuple[int, int] = (1200, 900)) -> bytes:
    img = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(img).ellipse([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=(200, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def serve(model: inference.ClipModel, body: bytes, content_type: str) -> np.ndarray:
    """One request through the four SageMaker serving functions."""
    answer = inference.output_fn(inference.predict_fn(inference.input_fn(body, content_type), model),
                                 "application/json")
    return np.asarray(json.loads(answer), dtype=np.float32)


def test_given_checkpoint_path_when_packaged_then_archive_has_the_sagemaker_layout(
        checkpoint: Path, tmp_path: Path) -> None:
    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")

    with tarfile.open(packaged.path) as tar:
        names = sorted(tar.getnames())
        code = tar.extractfile("code/inference.py").read()  # type: ignore[union-attr]
        requirements = tar.extractfile("code/requirements.txt").read()  # type: ignore[union-attr]
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert names == sorted([MANIFEST, "code/inference.py", "code/requirements.txt", "tiny-clip.pt"])
    assert code == (ROOT / "model_code" / "inference.py").read_bytes()
    assert requirements == (ROOT / "model_code" / "requirements.txt").read_bytes()
    assert manifest == {"spec": str(checkpoint), "dim": 32, "checkpoint": "tiny-clip.pt"}
    assert (packaged.dim, packaged.checkpoint) == (32, "tiny-clip.pt")


def test_given_packaged_model_when_loaded_like_the_container_then_it_serves_the_local_vectors(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")
    model_dir = tmp_path / "opt-ml-model"
    with tarfile.open(packaged.path) as tar:
        tar.extractall(model_dir, filter="data")
    for name in ("MODEL_NAME", "ENCODE_TYPE"):
        monkeypatch.delenv(name, raising=False)

    served = inference.model_fn(str(model_dir))  # finds the single checkpoint, as in the container
    local = inference.load_model(checkpoint.name, str(checkpoint.parent))

    text = serve(served, json.dumps({"inputs": ["a red circle"]}).encode(), "application/json")
    assert np.allclose(text, inference.encode_texts(local, ["a red circle"]), atol=1e-5)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg())
    image = serve(served, photo.read_bytes(), "image/jpeg")
    assert np.allclose(image, inference.encode_images(local, [load_file(photo).image]), atol=1e-5)


def test_given_full_size_image_when_the_endpoint_decodes_it_then_it_is_downscaled_like_clipsearch_index(
        tmp_path: Path) -> None:
    # Batch transform sends the original objects; the endpoint must give what `clipsearch index` gives.
    photo = tmp_path / "big.jpg"
    photo.write_bytes(jpeg((1600, 1000)))

    data = inference.input_fn(photo.read_bytes(), "image/jpeg")

    assert min(data["images"][0].size) == inference.MAX_SIDE
    assert data["images"][0].tobytes() == load_file(photo).image.tobytes()


def test_given_same_inputs_when_packaged_twice_then_archives_are_identical(checkpoint: Path, tmp_path: Path) -> None:
    first = package_model(str(checkpoint), tmp_path / "a" / "model.tar.gz")
    second = package_model(str(checkpoint), tmp_path / "b" / "model.tar.gz")
    assert first.path.read_bytes() == second.path.read_bytes()


def test_given_demo_when_packaged_by_the_cli_then_it_prints_the_template_parameters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.tar.gz"

    assert main(["package-model", "--model", "demo", "--out", str(out)]) == EXIT_OK

    printed = capsys.readouterr().out
    assert "ModelSpec=demo ModelDimension=128" in printed
    with tarfile.open(out) as tar:
        assert "demo.pt" in tar.getnames()


def test_given_uncached_clip_name_offline_when_packaged_then_one_line_names_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE", str(tmp_path / "empty-cache"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens there: offline, at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen caches an opener with the proxies it first saw; drop it after this test.
    monkeypatch.setattr(urllib.request, "_opener", None)

    status = main(["package-model", "--model", "RN50", "--out", str(tmp_path / "model.tar.gz")])

    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE and len(err) == 1
    assert "--model demo" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "model.tar.gz").exists()


def test_given_a_folder_as_out_when_packaged_then_bad_request(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="is a folder"):
        package_model(str(checkpoint), tmp_path)
