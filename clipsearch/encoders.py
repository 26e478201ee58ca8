"""Encoders turn texts and images into unit vectors.

LocalEncoder calls model_code's handler functions in-process (torch imported lazily);
SageMakerEncoder calls the same handler behind a SageMaker endpoint.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from clipsearch import models
from clipsearch.errors import BadRequest, ClipsearchError, ModelFailed, ModelUnavailable, Unavailable
from clipsearch.images import MAX_TRANSPORT_BYTES, to_transport


class Encoder(Protocol):
    """Anything that embeds texts and images into the same space."""

    model: str
    dim: int

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


T = TypeVar("T")


def encode_each(encoder: Encoder, images: list[Image.Image]) -> list[np.ndarray | ClipsearchError]:
    """Each image's vector, or the typed error that kept it from one (BadRequest: the encoder refused
    that image; Unavailable: retry later). Other encoders than SageMaker's are bisected the same way."""
    if isinstance(encoder, SageMakerEncoder):
        return encoder.encode_each(images)
    return bisect_encode(encoder.encode_images, images)


def bisect_encode(encode: Callable[[list[T]], np.ndarray], items: list[T]) -> list[np.ndarray | ClipsearchError]:
    """encode(items) as one call; when it is refused (BadRequest) or the model fails on it (ModelFailed: a
    poison input can crash a container), each half again, down to single items. A lone input keeps its error:
    refused, it is skipped; failed, it alone is retried (and reaches the dead-letter queue alone)."""
    try:
        vectors = encode(items)
    except (BadRequest, ModelFailed) as e:
        if len(items) == 1:
            return [e]
        half = len(items) // 2
        return bisect_encode(encode, items[:half]) + bisect_encode(encode, items[half:])
    except ClipsearchError as e:  # not the input's fault: every item may succeed on a retry
        return [e] * len(items)
    return list(vectors)


class LocalEncoder:
    """The model_code handler, in this process."""

    def __init__(self, spec: str, loaded: Any = None, progress: models.DownloadProgress | None = None) -> None:
        """Load the model for spec, or wrap `loaded` (a model_code ClipModel already in memory).

        A CLIP name not cached yet is downloaded once (reported to `progress`); offline, ModelUnavailable.
        """
        from model_code import inference

        self._inference = inference
        if loaded is None:
            source = models.ensure(spec, progress)
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

    def __init__(
        self, model: str, dim: int, text_endpoint: str, image_endpoint: str | None = None, client: Any = None
    ) -> None:
        self.model, self.dim = model, dim
        self._text_endpoint = text_endpoint
        self._image_endpoint = image_endpoint or text_endpoint
        self._client = client or _default_runtime()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"inputs": texts})
        return self._invoke(self._text_endpoint, body.encode(), "application/json")

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """As few requests as keep each body within the endpoint's 4 MB; an image alone travels raw."""
        vectors = np.zeros((len(images), self.dim), np.float32)
        for request in self._requests(images):
            vectors[[n for n, _, _ in request]] = self._send(request)
        return vectors

    def encode_each(self, images: list[Image.Image]) -> list[np.ndarray | ClipsearchError]:
        """Each image's vector or the reason it has none, in as few requests as the 4 MB allows.

        A request the endpoint refuses (4xx) or the model fails on (5xx) is split in halves until the images
        at fault stand alone, so one bad image costs its neighbours a few requests, not their vectors; a
        retryable failure of a request (throttled, timed out) is that of each of its images.
        """
        out: dict[int, np.ndarray | ClipsearchError] = {}
        for request in self._requests(images):
            out.update(zip([n for n, _, _ in request], bisect_encode(self._send, request), strict=True))
        return [out[n] for n in range(len(images))]

    def _requests(self, images: list[Image.Image]) -> list[list[tuple[int, bytes, str]]]:
        """The images' transport forms with their positions, packed into as few requests as keep each JSON
        body within 4 MB: largest first, each into the first request with room (first-fit decreasing)."""
        encoded = [to_transport(img) for img in images]
        requests: list[list[tuple[int, bytes, str]]] = []
        room: list[int] = []
        for n in sorted(range(len(encoded)), key=lambda n: -len(encoded[n][0])):
            body, ctype = encoded[n]
            # The JSON form costs base64's 4/3 plus quotes and a separator per image.
            cost = 4 * ((len(body) + 2) // 3) + 4
            fits = next((r for r, left in enumerate(room) if cost <= left), None)
            if fits is None:
                requests.append([])
                room.append(MAX_TRANSPORT_BYTES - len('{"images": []}'))
                fits = len(requests) - 1
            requests[fits].append((n, body, ctype))
            room[fits] -= cost
        return [sorted(request) for request in requests]  # the batch's order within each request

    def _send(self, request: list[tuple[int, bytes, str]]) -> np.ndarray:
        if len(request) == 1:
            _, body, ctype = request[0]
            vectors = self._invoke(self._image_endpoint, body, ctype)
        else:
            body = json.dumps({"images": [base64.b64encode(b).decode() for _, b, _ in request]}).encode()
            vectors = self._invoke(self._image_endpoint, body, "application/json")
        if len(vectors) != len(request):
            raise Unavailable(
                f"encoder endpoint {self._image_endpoint} returned {len(vectors)} vectors for {len(request)} images"
            )
        return vectors

    def _invoke(self, endpoint: str, body: bytes, content_type: str) -> np.ndarray:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        try:
            response = self._client.invoke_endpoint(
                EndpointName=endpoint, Body=body, ContentType=content_type, Accept="application/json"
            )
            payload = response["Body"].read()
        except ClientError as e:
            raise _client_error(endpoint, e.response) from None
        except (ReadTimeoutError, ConnectTimeoutError):
            # One attempt: a cold or hung endpoint is the caller's 503 (or SQS's retry), not botocore's.
            raise Unavailable(
                f"encoder endpoint {endpoint} did not answer in time (cold start or overloaded); retry later",
                retry_after=10,
            ) from None
        except BotoCoreError as e:
            raise Unavailable(f"encoder endpoint {endpoint} unreachable: {e}") from None
        try:
            vectors = np.asarray(json.loads(payload), dtype=np.float32)
        except (ValueError, TypeError):
            raise Unavailable(f"encoder endpoint {endpoint} returned a malformed answer") from None
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise Unavailable(
                f"encoder endpoint {endpoint} returned vectors of shape {vectors.shape}, expected (*, {self.dim})"
            )
        return vectors


def _default_runtime() -> Any:
    """sagemaker-runtime with one attempt and SageMaker's advised 70 s socket timeout (InvokeEndpoint,
    SageMaker API Reference: a container has 60 s to answer); botocore's default would retry 5 times."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "sagemaker-runtime",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=70),
    )


def _client_error(endpoint: str, response: Any) -> Exception:
    """Map an InvokeEndpoint error: the caller's fault (4xx from the model) or retry later."""
    error = response.get("Error", {})
    code = error.get("Code", "")
    # A ModelError's Message quotes the container's whole answer (a traceback, the log stream's URL
    # and the account id); OriginalMessage is what the handler said. Keep its first line only.
    message = str(response.get("OriginalMessage") or error.get("Message", ""))
    message = (message.strip().splitlines() or [""])[0]
    original = str(response.get("OriginalStatusCode", ""))
    if code == "ModelError" and original.startswith("4"):
        return BadRequest(f"encoder refused the input: {message}")
    if code == "ModelError" and original.startswith("5"):
        # The container answered, with an error: unlike throttling or a timeout, an input may be the cause.
        return ModelFailed(f"encoder endpoint {endpoint}: the model failed ({original}): {message}", retry_after=2)
    if code == "ValidationError" and "payload" in message.lower():
        # A body over the serverless 4 MB cap: resending the same body cannot help. Other
        # ValidationErrors (an endpoint that does not exist) are configuration, so retried.
        return BadRequest(f"encoder refused the request: {message}")
    return Unavailable(f"encoder endpoint {endpoint} failed ({code or 'error'}): {message}", retry_after=2)
