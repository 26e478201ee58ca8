"""`clipsearch package-model`: model.tar.gz as the SageMaker PyTorch inference container expects it.

Layout: the checkpoint at the top (model_fn finds the single *.pt there), the handler and its extra
requirements under code/, and a small manifest naming the spec and dimension for template.yaml.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from clipsearch import models
from clipsearch.errors import BadRequest, ModelUnavailable

CODE_DIR = Path(__file__).resolve().parent.parent / "model_code"
CODE_FILES = ("inference.py", "requirements.txt")
MANIFEST = "clipsearch-model.json"


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

    source = models.resolve(spec)
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
    manifest = {"spec": canonical, "dim": dim, "checkpoint": name}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_file(tar, checkpoint, name)
        for file in CODE_FILES:
            _add_file(tar, CODE_DIR / file, f"code/{file}")
        _add_bytes(tar, (json.dumps(manifest, indent=2) + "\n").encode(), MANIFEST)
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
