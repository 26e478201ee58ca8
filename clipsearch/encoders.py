"""Encoders turn texts and images into unit vectors.

LocalEncoder calls model_code's handler functions in-process (torch imported lazily);
SageMakerEncoder calls the same handler behind a SageMaker endpoint.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
from PIL import Image

from clipsearch import models
from clipsearch.errors import BadRequest, ModelUnavailable, Unavailable
from clipsearch.images import to_png


class Encoder(Protocol):
    """Anything that embeds texts and images into the same space."""

    model: str
    dim: int

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


class LocalEncoder:
    """The model_code handler, in this process."""

    def __init__(self, spec: str = models.DEMO, loaded: Any = None) -> None:
        """Load the model for spec, or wrap `loaded` (a model_code ClipModel already in memory)."""
        from model_code import inference

        self._inference = inference
        if loaded is None:
            source = models.resolve(spec)
            try:
                loaded = inference.load_model(source.name, source.model_dir)
            except inference.ModelLoadError as e:
                raise ModelUnavailable(str(e)) from None
            spec = source.spec
        self._model = loaded
        self.model = spec
        self.dim = self._model.dim
        # torch releases the GIL but one model instance is not meant for concurrent forwards.
        self._lock = threading.Lock()
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if len(texts) == 1 and texts[0] in self._text_cache:
            with self._lock:
                self._text_cache.move_to_end(texts[0])
                return self._text_cache[texts[0]][None, :].copy()
        with self._lock:
            vectors = self._predict({"kind": "TEXT", "texts": texts})
            if len(texts) == 1:
                self._text_cache[texts[0]] = vectors[0]
                while len(self._text_cache) > 1024:
                    self._text_cache.popitem(last=False)
        return vectors

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with self._lock:
            return self._predict({"kind": "IMAGE", "images": images})

    def _predict(self, data: dict[str, Any]) -> np.ndarray:
        try:
            return np.asarray(self._inference.predict_fn(data, self._model), dtype=np.float32)
        except ValueError as e:
            raise BadRequest(str(e)) from None


class SageMakerEncoder:
    """Calls a SageMaker endpoint that runs model_code (one endpoint, or one each for text/image)."""

    def __init__(self, model: str, dim: int, text_endpoint: str, image_endpoint: str | None = None,
                 client: Any = None) -> None:
        import boto3

        self.model, self.dim = model, dim
        self._text_endpoint = text_endpoint
        self._image_endpoint = image_endpoint or text_endpoint
        self._client = client or boto3.client("sagemaker-runtime")

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"inputs": texts})
        return self._invoke(self._text_endpoint, body.encode(), "application/json")

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        if len(images) == 1:
            return self._invoke(self._image_endpoint, to_png(images[0]), "image/png")
        body = json.dumps({"images": [base64.b64encode(to_png(i)).decode() for i in images]})
        return self._invoke(self._image_endpoint, body.encode(), "application/json")

    def _invoke(self, endpoint: str, body: bytes, content_type: str) -> np.ndarray:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.invoke_endpoint(
                EndpointName=endpoint, Body=body, ContentType=content_type, Accept="application/json"
            )
            payload = response["Body"].read()
        except ClientError as e:
            raise _client_error(endpoint, e.response) from None
        except BotoCoreError as e:
            raise Unavailable(f"encoder endpoint {endpoint} unreachable: {e}") from None
        try:
            vectors = np.asarray(json.loads(payload), dtype=np.float32)
        except (ValueError, TypeError):
            raise Unavailable(f"encoder endpoint {endpoint} returned a malformed answer") from None
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise Unavailable(f"encoder endpoint {endpoint} returned vectors of shape {vectors.shape}, "
                              f"expected (*, {self.dim})")
        return vectors


def _client_error(endpoint: str, response: Any) -> Exception:
    """Map an InvokeEndpoint error: the caller's fault (4xx from the model) or retry later."""
    error = response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    original = str(response.get("OriginalStatusCode", ""))
    if code == "ModelError" and original.startswith("4"):
        return BadRequest(f"encoder refused the input: {message}")
    return Unavailable(f"encoder endpoint {endpoint} failed ({code or 'error'}): {message}", retry_after=2)
