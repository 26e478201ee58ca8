"""`clipsearch package-model`: model.tar.gz as the SageMaker PyTorch inference container expects it.

Layout: the checkpoint at the top (model_fn finds the single *.pt there), the handler as
code/inference.py, what the serving image lacks unpacked from wheels under code/lib (inference.py
puts it on sys.path), and a small manifest naming the spec and dimension for template.yaml.

No code/requirements.txt: the container's toolkit pip-installs that file at every cold start
(sagemaker_pytorch_serving_container/torchserve.py, start_torchserve), which would make the package
index a run-time dependency of the endpoint and add its download to each cold start.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clipsearch import models
from clipsearch.errors import BadRequest, ModelUnavailable, Unavailable

CODE_DIR = Path(__file__).resolve().parents[2] / "model_code"
CODE_FILES = ("inference.py",)
# The pins vendored into code/lib: what the SageMaker PyTorch inference image lacks.
VENDOR_PINS = CODE_DIR / "requirements.txt"
VENDOR_DIR = "code/lib/"
MANIFEST = "clipsearch-model.json"
# The serving image's interpreter: template.yaml's InferenceImageUri example, pytorch-inference:2.3.0-cpu-py311;
# its AllowedPattern requires this -py311 tag, and the manifest records the version for model_fn to check.
WHEEL_PLATFORM, WHEEL_PYTHON = "manylinux2014_x86_64", "3.11"


@dataclass(frozen=True)
class PackagedModel:
    """What was written: the archive, the checkpoint's name inside it, and the model's dimension."""

    path: Path
    spec: str
    checkpoint: str
    dim: int
    size: int


def checkpoint_for(spec: str) -> tuple[Path, int]:
    """The checkpoint file behind a spec and its dimension; downloads a CLIP name once when online."""
    from model_code import inference

    source = models.ensure(spec)  # a CLIP name: downloaded once under a lock, SHA-256 checked
    try:
        loaded = inference.load_model(source.name, source.model_dir)
    except inference.ModelLoadError as e:
        raise ModelUnavailable(str(e)) from None
    if source.spec in models.KNOWN_DIMS:
        import clip

        # clip.load() caches a name under the file name of its download URL (ViT-B/32 -> ViT-B-32.pt).
        path = Path(source.model_dir) / os.path.basename(clip.clip._MODELS[source.spec])
    else:
        candidates = [Path(source.model_dir) / source.name, Path(source.model_dir) / (source.name + ".pt")]
        path = next(p for p in candidates if p.is_file())
    return path, loaded.dim


def package_model(spec: str, out: str | Path) -> PackagedModel:
    """Write model.tar.gz for `spec`; reproducible: same inputs, same bytes."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise BadRequest(f"--out {out} is a folder; give a file name such as model.tar.gz")
    checkpoint, dim = checkpoint_for(spec)
    canonical = models.canonical_spec(spec)
    name = checkpoint.name if checkpoint.suffix in (".pt", ".pth") else checkpoint.name + ".pt"
    # python: what code/lib is built for; model_code/inference.py refuses to load on another Python.
    manifest = {"spec": canonical, "dim": dim, "checkpoint": name, "python": WHEEL_PYTHON}
    wheels = vendored_wheels()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_file(tar, checkpoint, name)
            for file in CODE_FILES:
                _add_file(tar, CODE_DIR / file, f"code/{file}")
            for wheel in wheels:
                _add_wheel(tar, wheel, VENDOR_DIR)
            _add_bytes(tar, (json.dumps(manifest, indent=2) + "\n").encode(), MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return PackagedModel(out, str(manifest["spec"]), name, dim, out.stat().st_size)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    with open(path, "rb") as f:
        tar.addfile(_info(name, path.stat().st_size), f)


def _add_bytes(tar: tarfile.TarFile, data: bytes, name: str) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


# -- vendored libraries ---------------------------------------------------------------------------


def vendor_pins() -> list[tuple[str, str]]:
    """(name, version) for each `name==version` line of model_code/requirements.txt."""
    pins = []
    for line in VENDOR_PINS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins.append((name.strip(), version.strip()))
    return pins


def wheel_cache() -> Path:
    """Where downloaded wheels stay: CLIPSEARCH_WHEEL_CACHE, else ~/.cache/clipsearch/wheels."""
    root = os.environ.get("CLIPSEARCH_WHEEL_CACHE") or str(Path.home() / ".cache" / "clipsearch" / "wheels")
    return Path(root) / f"cp{WHEEL_PYTHON.replace('.', '')}-{WHEEL_PLATFORM}"


def vendored_wheels() -> list[Path]:
    """One wheel per pin, built for the serving image; downloaded once with pip, then cached."""
    cache = wheel_cache()
    pins = vendor_pins()
    missing = [pin for pin in pins if _cached_wheel(cache, *pin) is None]
    if missing:
        _download(cache, missing)
    wheels = [_cached_wheel(cache, *pin) for pin in pins]
    absent = [f"{n}=={v}" for (n, v), w in zip(pins, wheels, strict=True) if w is None]
    if absent:
        raise Unavailable(f"pip fetched no {WHEEL_PLATFORM} wheel for {', '.join(absent)}")
    return [w for w in wheels if w is not None]


def _cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    # Wheel file names spell the project name with underscores (PEP 427 escaping).
    dist = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{dist}-{version}-"))
    return found[0] if found else None


def _download(cache: Path, pins: list[tuple[str, str]]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [f"{name}=={version}" for name, version in pins]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        WHEEL_PLATFORM,
        "--python-version",
        WHEEL_PYTHON,
        "--implementation",
        "cp",
        "--dest",
        str(cache),
        *wanted,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise Unavailable(f"cannot run pip to fetch the wheels for the model archive: {e}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "pip failed")
        raise Unavailable(
            f"cannot download {', '.join(wanted)} for the model archive (offline?): {reason[:200]}; "
            f"run package-model once with access to the package index, or put the wheels in {cache}"
        )


def _add_wheel(tar: tarfile.TarFile, wheel: Path, prefix: str) -> None:
    """Unpack a wheel as pip installs it into site-packages: its root, plus <name>.data/purelib|platlib."""
    with zipfile.ZipFile(wheel) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers and data files are not importable code
                parts = parts[2:]
            _add_bytes(tar, zf.read(info), prefix + "/".join(parts))
