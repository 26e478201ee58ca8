"""The SageMaker handler contract, called the way the SageMaker toolkit calls it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from support.images import bad_files, picture, png_bomb

from clipsearch import models
from model_code import inference


@pytest.fixture(scope="module")
def model(monkeypatch_module):
    monkeypatch_module.setenv("MODEL_NAME", "demo.pt")
    monkeypatch_module.delenv("ENCODE_TYPE", raising=False)
    return inference.model_fn(str(models.DATA_DIR))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def invoke(model, body, content_type, accept="application/json"):
    data = inference.input_fn(body, content_type)
    prediction = inference.predict_fn(data, model)
    return json.loads(inference.output_fn(prediction, accept))


def assert_unit_vectors(vectors, n, dim):
    arr = np.asarray(vectors, dtype=np.float64)
    assert arr.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)


def test_given_seed_text_format_when_invoked_then_one_unit_vector_per_text(model):
    out = invoke(model, json.dumps({"inputs": ["a red circle", "a small blue star"]}), "application/json")
    assert_unit_vectors(out, 2, model.dim)
    assert out[0] != out[1]


def test_given_base64_images_when_invoked_then_one_vector_per_image(model):
    images = [base64.b64encode(picture((200, 0, 0))).decode(), base64.b64encode(picture((0, 0, 200))).decode()]
    out = invoke(model, json.dumps({"images": images}), "application/json; charset=utf-8")
    assert_unit_vectors(out, 2, model.dim)


@pytest.mark.parametrize(
    "ctype,fmt", [("application/x-image", "PNG"), ("image/jpeg", "JPEG"), ("image/png", "PNG"), ("image/webp", "WEBP")]
)
def test_given_raw_image_body_when_invoked_then_one_vector(model, ctype, fmt):
    out = invoke(model, picture(fmt=fmt), ctype)
    assert_unit_vectors(out, 1, model.dim)


def test_given_same_pixels_as_png_and_base64_json_when_invoked_then_same_vector(model):
    raw = picture()
    a = invoke(model, raw, "image/png")
    b = invoke(model, json.dumps({"images": [base64.b64encode(raw).decode()]}), "application/json")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_given_text_longer_than_context_when_invoked_then_truncated_not_an_error(model):
    long_text = "two people stand in front of a swimming pool " * 200
    out = invoke(model, json.dumps({"inputs": [long_text]}), "application/json")
    assert_unit_vectors(out, 1, model.dim)


def test_given_vectors_then_float32_unit_length(model):
    vectors = inference.predict_fn({"kind": "TEXT", "texts": ["a green square"]}, model)
    assert vectors.dtype == np.float32
    assert abs(float(np.linalg.norm(vectors[0])) - 1.0) < 1e-5


BAD_REQUESTS = [
    ("hello", "text/plain", "unsupported content type"),
    ("{not json", "application/json", "not valid JSON"),
    (json.dumps([1, 2]), "application/json", "must be an object"),
    (json.dumps({"inputs": []}), "application/json", "empty"),
    (json.dumps({"images": []}), "application/json", "empty"),
    (json.dumps({}), "application/json", "exactly one"),
    (json.dumps({"inputs": ["a"], "images": ["b"]}), "application/json", "exactly one"),
    (json.dumps({"inputs": [1, 2]}), "application/json", "list of strings"),
    (json.dumps({"images": ["***not base64***"]}), "application/json", "not valid base64"),
    (b"", "image/png", "empty image"),
]


@pytest.mark.parametrize("body,ctype,message", BAD_REQUESTS)
def test_given_bad_request_when_parsed_then_value_error_with_clear_message(body, ctype, message):
    with pytest.raises(ValueError, match=message):
        inference.input_fn(body, ctype)


@pytest.mark.parametrize("body,ctype,message", BAD_REQUESTS)
def test_given_bad_request_when_parsed_then_the_toolkit_sees_a_400_that_is_still_a_value_error(body, ctype, message):
    from sagemaker_inference.errors import BaseInferenceToolkitError

    with pytest.raises(inference.BadInput, match=message) as info:
        inference.input_fn(body, ctype)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BaseInferenceToolkitError)
    assert (info.value.status_code, info.value.message) == (400, str(info.value))


def test_given_kind_or_accept_the_endpoint_refuses_when_served_then_bad_input_with_status_400(monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "demo")
    monkeypatch.setenv("ENCODE_TYPE", "TEXT")
    text_only = inference.model_fn(str(models.DATA_DIR))

    with pytest.raises(inference.BadInput, match="encodes text only") as refused_kind:
        inference.predict_fn(inference.input_fn(picture(), "image/png"), text_only)
    with pytest.raises(inference.BadInput, match="accept") as refused_accept:
        inference.output_fn(np.zeros((1, 4), np.float32), "text/csv")
    assert refused_kind.value.status_code == refused_accept.value.status_code == 400


# Outside the serving container (clipsearch itself, the Lambdas) the toolkit is absent.
WITHOUT_TOOLKIT = r"""
import json, sys


class NoToolkit:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("sagemaker_inference", "sagemaker_pytorch_serving_container"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoToolkit())
from model_code import inference

try:
    inference.input_fn(b"", "image/png")
except ValueError as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e),
                      "bases": [c.__name__ for c in type(e).__mro__]}))
"""


def test_given_no_toolkit_when_model_code_refuses_an_input_then_bad_input_is_a_plain_value_error():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TOOLKIT], capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    refused = json.loads(done.stdout)
    assert refused["type"] == "BadInput" and refused["message"] == "empty image"
    assert "BaseInferenceToolkitError" not in refused["bases"] and "ValueError" in refused["bases"]


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_given_bad_image_bytes_when_parsed_then_value_error(name):
    with pytest.raises(ValueError):
        inference.input_fn(bad_files()[name], "application/x-image")


def test_given_decompression_bomb_when_parsed_then_refused_as_too_large():
    with pytest.raises(ValueError, match="too large"):
        inference.input_fn(png_bomb(), "image/png")


def test_given_unsupported_accept_when_output_then_value_error(model):
    with pytest.raises(ValueError, match="accept"):
        inference.output_fn(np.zeros((1, 4), np.float32), "text/csv")


@pytest.mark.parametrize("encode_type,allowed,refused", [("TEXT", "TEXT", "IMAGE"), ("IMAGE", "IMAGE", "TEXT")])
def test_given_encode_type_when_other_kind_requested_then_refused(monkeypatch, encode_type, allowed, refused):
    monkeypatch.setenv("MODEL_NAME", "demo")
    monkeypatch.setenv("ENCODE_TYPE", encode_type.lower())
    model = inference.model_fn(str(models.DATA_DIR))
    inputs = {"TEXT": ("a red circle", "application/json"), "IMAGE": (picture(), "image/png")}
    body, ctype = inputs[allowed]
    if allowed == "TEXT":
        body = json.dumps({"inputs": [body]})
    assert len(invoke(model, body, ctype)) == 1
    body, ctype = inputs[refused]
    if refused == "TEXT":
        body = json.dumps({"inputs": [body]})
    with pytest.raises(ValueError, match=f"encodes {encode_type.lower()} only"):
        invoke(model, body, ctype)


def test_given_unknown_model_name_when_loaded_then_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(inference.ModelLoadError, match="demo"):
        inference.load_model("no-such-model", str(tmp_path))


def test_given_clip_name_not_cached_and_offline_when_loaded_then_error_names_the_fix(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(inference.ModelLoadError) as info:
        inference.load_model("RN50", str(tmp_path))
    message = str(info.value)
    assert "--model demo" in message and "RN50.pt" in message and "\n" not in message


def test_given_corrupt_checkpoint_file_when_loaded_then_model_load_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(inference.ModelLoadError, match="cannot load"):
        inference.load_model("broken.pt", str(tmp_path))


class PreprocessFault(ValueError):
    """What torch or numpy raise inside a forward pass: a ValueError that is no fault of the request."""


def failing_preprocess(image):
    raise PreprocessFault("operands could not be broadcast together")


def test_given_a_value_error_inside_prediction_when_served_then_not_a_400(model):
    # The toolkit answers a BaseInferenceToolkitError with its status and anything else with 500
    # (sagemaker_inference/transformer.py, transform()); a 400 makes ingest drop the picture for good,
    # so only the request's own faults may become BadInput.
    from dataclasses import replace

    from sagemaker_inference.errors import BaseInferenceToolkitError

    broken = replace(model, preprocess=failing_preprocess, graphs={})
    with pytest.raises(PreprocessFault) as info:
        inference.predict_fn(inference.input_fn(picture(), "image/png"), broken)
    assert not isinstance(info.value, (inference.BadInput, BaseInferenceToolkitError))
