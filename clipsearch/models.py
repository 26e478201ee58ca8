"""Model specs ("demo", a CLIP name such as "RN50", or a checkpoint path) and where they live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
DEMO_CHECKPOINT = DATA_DIR / "demo.pt"
DEMO = "demo"

# Output dimensions of the clip-anytorch models, so a dimension is known without loading weights.
KNOWN_DIMS = {
    "RN50": 1024, "RN101": 512, "RN50x4": 640, "RN50x16": 768, "RN50x64": 1024,
    "ViT-B/32": 512, "ViT-B/16": 512, "ViT-L/14": 768, "ViT-L/14@336px": 768,
}


@dataclass(frozen=True)
class ModelSource:
    """What model_code's load_model() needs: a directory and a name inside it (or a spec)."""

    spec: str
    model_dir: str
    name: str


def canonical_spec(spec: str) -> str:
    """The string recorded in an index: `demo`, a CLIP name, or an absolute checkpoint path."""
    if spec == DEMO or spec in KNOWN_DIMS:
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resolve(spec: str) -> ModelSource:
    """Map a spec onto a model_dir/name pair for model_code.load_model()."""
    spec = canonical_spec(spec)
    if spec == DEMO:
        return ModelSource(spec, str(DATA_DIR), DEMO_CHECKPOINT.name)
    if spec in KNOWN_DIMS:
        cache = os.environ.get("CLIPSEARCH_MODEL_CACHE") or str(Path.home() / ".cache" / "clip")
        return ModelSource(spec, cache, spec)
    path = Path(spec)
    return ModelSource(spec, str(path.parent), path.name)


# clip.model.CLIP constructor arguments of the real architectures, for benchmarks and parity tests
# with random weights (compute does not depend on the weight values).
ARCHITECTURES: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
}


def random_model(arch: str, seed: int = 0) -> Any:
    """A randomly initialised real CLIP architecture wrapped for model_code (no download needed)."""
    import clip
    import torch
    from clip.model import CLIP

    from model_code.inference import prepare_model

    torch.manual_seed(seed)
    model = CLIP(*ARCHITECTURES[arch])
    return prepare_model(arch, model, clip.clip._transform(model.visual.input_resolution))
