"""Our handler's vectors equal clip's own normalised encode_image / encode_text (random real archs)."""

from __future__ import annotations

import io

import clip
import numpy as np
import pytest
import torch
from PIL import Image
from support.images import picture

from clipsearch.models import ARCHITECTURES, random_model
from model_code import inference

TEXTS = ["a red circle", "two people stand in front of a swimming pool", "x " * 120, "🙂 مرحبا"]


def _reference(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


@pytest.fixture(scope="module", params=["RN50", "ViT-B/32"])
def arch(request):
    return random_model(request.param)


def test_given_random_real_architecture_when_encoding_texts_then_equal_to_clip_reference(arch):
    ours = inference.predict_fn({"kind": "TEXT", "texts": TEXTS}, arch)
    # The reference is a model clip built and nobody touched: same seed as random_model, and none of
    # prepare_model's changes (such as the text weights' memory layout).
    torch.manual_seed(0)
    untouched = clip.model.CLIP(*ARCHITECTURES[arch.name]).eval()
    with torch.no_grad():
        ref = _reference(untouched.encode_text(clip.tokenize(TEXTS, truncate=True)))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_given_random_real_architecture_when_encoding_images_then_equal_to_clip_reference(arch):
    raw = [picture((220, 40, 40), (320, 200), "PNG"), picture((30, 60, 220), (97, 131), "JPEG")]
    parsed = [inference.input_fn(data, "application/x-image")["images"][0] for data in raw]
    ours = inference.predict_fn({"kind": "IMAGE", "images": parsed}, arch)
    with torch.no_grad():
        batch = torch.stack([arch.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in raw])
        ref = _reference(arch.model.encode_image(batch))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["RN50", "ViT-B/32"])
def test_given_prepared_graphs_when_encoding_pixels_then_equal_to_clip_reference(name):
    """The frozen RN50 visual graph (used after the first batches of a long ingest) stays exact."""
    model = random_model(name)
    inference.prepare_graphs(model)
    batch = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours = inference.encode_pixels(model, batch)
    with torch.no_grad():
        ref = _reference(model.model.encode_image(batch))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert isinstance(model.graphs["visual"], torch.jit.ScriptModule) == (name == "RN50")
