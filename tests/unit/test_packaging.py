"""`clipsearch package-model`: the archive SageMaker's PyTorch container loads, and what it serves."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsearch.cli import EXIT_OK, EXIT_USAGE, main
from clipsearch.errors import BadRequest
from clipsearch.images import load_file
from clipsearch.sagemaker.packaging import MANIFEST, VENDOR_DIR, WHEEL_PYTHON, package_model, vendor_pins, wheel_cache
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
    answer = inference.output_fn(
        inference.predict_fn(inference.input_fn(body, content_type), model), "application/json"
    )
    return np.asarray(json.loads(answer), dtype=np.float32)


def cold_start(script: str, model_dir: Path, vendored: list[str], photo: Path, cwd: Path) -> dict[str, Any]:
    """Run script in a fresh interpreter as the container would (no MODEL_NAME, no PYTHONPATH of ours)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "ENCODE_TYPE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT / "tests")
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), json.dumps(vendored), str(photo)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_given_checkpoint_path_when_packaged_then_archive_has_the_sagemaker_layout(
    checkpoint: Path, tmp_path: Path
) -> None:
    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")

    with tarfile.open(packaged.path) as tar:
        names = sorted(tar.getnames())
        code = tar.extractfile("code/inference.py").read()  # type: ignore[union-attr]
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    # No code/requirements.txt: the toolkit would pip-install it at every cold start.
    assert [n for n in names if not n.startswith(VENDOR_DIR)] == sorted([MANIFEST, "code/inference.py", "tiny-clip.pt"])
    vendored = {n[len(VENDOR_DIR) :].split("/")[0] for n in names if n.startswith(VENDOR_DIR)}
    assert {"clip", "ftfy", "regex", "wcwidth"} <= vendored
    assert code == (ROOT / "model_code" / "inference.py").read_bytes()
    assert manifest == {"spec": str(checkpoint), "dim": 32, "checkpoint": "tiny-clip.pt", "python": WHEEL_PYTHON}
    assert MANIFEST == inference.MANIFEST  # where model_fn reads the Python that code/lib is built for
    assert (packaged.dim, packaged.checkpoint) == (32, "tiny-clip.pt")


def test_given_packaged_model_when_loaded_like_the_container_then_it_serves_the_local_vectors(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    tmp_path: Path,
) -> None:
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
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.tar.gz"

    assert main(["package-model", "--model", "demo", "--out", str(out)]) == EXIT_OK

    printed = capsys.readouterr().out
    assert "ModelSpec=demo ModelDimension=128" in printed
    with tarfile.open(out) as tar:
        assert "demo.pt" in tar.getnames()


def test_given_uncached_clip_name_offline_when_packaged_then_one_line_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
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


# The SageMaker PyTorch image has no clip, ftfy or regex: this interpreter refuses any copy of the
# archive's vendored packages that is not under code/lib, then serves through the real toolkit's
# HandlerService with SAGEMAKER_PROGRAM=inference.py and code/ on the path, as the container does.
COLD_START = r"""
import importlib.machinery, json, sys
from pathlib import Path

model_dir, vendored, photo = Path(sys.argv[1]), set(json.loads(sys.argv[2])), Path(sys.argv[3])
lib = str(model_dir / "code" / "lib") + "/"


class OnlyFromTheArchive:
    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in vendored:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is None or not (spec.origin or "").startswith(lib):
            raise ModuleNotFoundError(f"{name} is not in the serving image: {spec and spec.origin}")
        return spec


sys.meta_path.insert(0, OnlyFromTheArchive())
sys.path.insert(0, str(model_dir / "code"))  # the toolkit's PYTHONPATH (torchserve.py, _set_python_path)
from support.sagemaker_endpoint import ServingContainer

container = ServingContainer(model_dir, {}, program="inference.py")
answers = {}
for name, body, ctype in [("text", json.dumps({"inputs": ["a red circle"]}).encode(), "application/json"),
                          ("image", photo.read_bytes(), "image/jpeg"),
                          ("refused", b"not an image", "image/png")]:
    status, payload, _ = container.invoke(body, {"Content-Type": ctype, "Accept": "application/json"})
    answers[name] = [status, payload.decode()]
loaded = {n: sys.modules[n].__file__ for n in sorted(vendored) if n in sys.modules}
print(json.dumps({"answers": answers, "loaded": loaded, "inference": sys.modules["inference"].__file__}))
"""


def test_given_packaged_model_when_cold_started_without_clip_ftfy_regex_then_it_loads_them_from_the_archive(
    checkpoint: Path, tmp_path: Path
) -> None:
    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")
    model_dir = tmp_path / "opt-ml-model"
    with tarfile.open(packaged.path) as tar:
        tar.extractall(model_dir, filter="data")
    vendored = sorted(p.name for p in (model_dir / VENDOR_DIR).iterdir() if not p.name.endswith(".dist-info"))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg())
    result = cold_start(COLD_START, model_dir, vendored, photo, tmp_path)
    assert result["inference"] == str(model_dir / "code" / "inference.py")
    assert {"clip", "ftfy", "regex"} <= set(result["loaded"])
    assert all(path.startswith(str(model_dir / VENDOR_DIR)) for path in result["loaded"].values())
    local = inference.load_model(checkpoint.name, str(checkpoint.parent))
    status, text = result["answers"]["text"]
    assert status == 200
    assert np.allclose(json.loads(text), inference.encode_texts(local, ["a red circle"]), atol=1e-5)
    status, image = result["answers"]["image"]
    assert status == 200
    assert np.allclose(json.loads(image), inference.encode_images(local, [load_file(photo).image]), atol=1e-5)
    status, refused = result["answers"]["refused"]
    with pytest.raises(ValueError) as local_refusal:
        inference.input_fn(b"not an image", "image/png")
    assert status == 400 and refused.splitlines()[0] == str(local_refusal.value)


def test_given_no_package_index_and_no_cached_wheels_when_packaged_then_one_line_names_the_fix(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLIPSEARCH_WHEEL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: offline, at once
    monkeypatch.setenv("PIP_RETRIES", "0")
    (tmp_path / "no-links").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    out = tmp_path / "model.tar.gz"

    status = main(["package-model", "--model", str(checkpoint), "--out", str(out)])

    err = capsys.readouterr().err.strip().splitlines()
    assert status != EXIT_OK and len(err) == 1
    assert "package index" in err[0] and str(wheel_cache()) in err[0] and "Traceback" not in err[0]
    assert all(f"{name}=={version}" in err[0] for name, version in vendor_pins())
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# The batch-transform path reads originals inside the container, whose Pillow reads no HEIC: the archive
# carries pillow-heif, and the cold start above (only the archive's copy may load) decodes an iPhone photo.
HEIC_COLD_START = (
    COLD_START.split("container = ServingContainer")[0]
    + r"""
container = ServingContainer(model_dir, {}, program="inference.py")
status, payload, _ = container.invoke(photo.read_bytes(), {"Content-Type": "image/heic", "Accept": "application/json"})
print(json.dumps({"status": status, "payload": payload.decode(), "heif": sys.modules["pillow_heif"].__file__}))
"""
)


def test_given_packaged_model_when_a_heic_photo_reaches_the_container_then_the_archives_pillow_heif_decodes_it(
    checkpoint: Path, tmp_path: Path
) -> None:
    import pillow_heif

    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")
    model_dir = tmp_path / "opt-ml-model"
    with tarfile.open(packaged.path) as tar:
        tar.extractall(model_dir, filter="data")
    vendored = sorted(p.name for p in (model_dir / VENDOR_DIR).iterdir() if not p.name.endswith(".dist-info"))
    assert "pillow_heif" in vendored
    picture = Image.open(io.BytesIO(jpeg((640, 480)))).convert("RGB")
    buf = io.BytesIO()
    pillow_heif.from_pillow(picture).save(buf, format="HEIF", quality=90)
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(buf.getvalue())
    result = cold_start(HEIC_COLD_START, model_dir, vendored, photo, tmp_path)
    assert result["status"] == 200, result["payload"]
    assert result["heif"].startswith(str(model_dir / VENDOR_DIR))
    local = inference.load_model(checkpoint.name, str(checkpoint.parent))
    assert np.allclose(
        json.loads(result["payload"]), inference.encode_images(local, [load_file(photo).image]), atol=1e-3
    )


# The container imports code/inference.py with code/ on the path (torchserve.py, _set_python_path); the
# manifest's Python is the archive's, the interpreter's is the image's.
OTHER_PYTHON_START = r"""
import json, sys
model_dir = sys.argv[1]
sys.path.insert(0, model_dir + "/code")
import inference
try:
    inference.model_fn(model_dir)
except inference.ModelLoadError as e:
    print(json.dumps({"error": str(e), "lib_on_path": any(p.startswith(model_dir + "/code/lib") for p in sys.path)}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.mark.parametrize("built_for", ["3.10", "3.12"])
def test_given_archive_built_for_another_python_when_model_fn_runs_then_model_load_error_names_both(
    checkpoint: Path, tmp_path: Path, built_for: str
) -> None:
    packaged = package_model(str(checkpoint), tmp_path / "model.tar.gz")
    model_dir = tmp_path / "opt-ml-model"
    with tarfile.open(packaged.path) as tar:
        tar.extractall(model_dir, filter="data")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if built_for == running:
        pytest.skip("this interpreter is the other Python")
    (model_dir / MANIFEST).write_text(json.dumps({**manifest, "python": built_for}))
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_NAME", "ENCODE_TYPE", "PYTHONPATH")}

    done = subprocess.run(
        [sys.executable, "-c", OTHER_PYTHON_START, str(model_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and not result["lib_on_path"]
    assert f"Python {built_for}" in result["error"] and f"Python {running}" in result["error"]
    assert f"-py{built_for.replace('.', '')}" in result["error"]
