"""A local SageMaker runtime: InvokeEndpoint answered by the real SageMaker PyTorch serving toolkit.

Three layers, as in AWS, so the stand-in cannot be friendlier than the real thing:
1. the SageMaker runtime (this server): the route, throttling, the serverless body limit, and a
   container's non-200 answer turned into ModelError 424;
2. TorchServe's frontend: it refuses a body over its max_request_size before any Python runs;
3. the toolkit's HandlerService (sagemaker-pytorch-inference) and Transformer (sagemaker-inference),
   running model_code's model_fn/input_fn/predict_fn/output_fn; any exception that is not a
   BaseInferenceToolkitError becomes 500 there.
Knobs: throttle_next (answer ThrottlingException), delay_s (sleep before answering, as a cold or
hung endpoint does, or a warm one's fixed overhead per invocation), per_image_s (sleep as long again per
image in the request: a forward's cost grows with its batch), max_body_bytes (SageMaker Serverless
refuses request bodies over 4 MB), refuse_image (a predicate on each picture of a request: the
container answers 400 for a request holding one it is true of, as model_code does for input it
refuses, and SageMaker turns that into ModelError 424; refuse_status 500 makes it the container failing on
such a picture instead, as on a poison input that crashes the model). `calls` lists (endpoint, content type) and
`images` the number of images of each call that passed the runtime's checks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image
from sagemaker_pytorch_serving_container.handler_service import HandlerService

# "Maximum request payload size: 4 MB" (SageMaker Developer Guide, Serverless Inference, feature exclusions / limits).
SERVERLESS_MAX_BODY_BYTES = 4 * 1024 * 1024
# TorchServe's max_request_size default, in bytes; TS_MAX_REQUEST_SIZE overrides it because the
# toolkit's default-ts.properties sets enable_envvars_config=true (TorchServe docs, "Advanced
# configuration": max_request_size, and "All the above config properties can be set using
# environment variable ... TS_<PROPERTY_NAME>").
TORCHSERVE_MAX_REQUEST_SIZE = 6553500
REGION, ACCOUNT = "us-east-1", "123456789012"


class _RequestProcessor:
    """TorchServe's ts.context.RequestProcessor, as far as the toolkit uses it: the request's
    headers in, the status the handler reports out."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)
        self.status: tuple[int, str | None] = (200, None)

    def get_request_properties(self) -> dict[str, str]:
        return self._headers

    def get_request_property(self, key: str) -> str | None:
        return self._headers.get(key)

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self.status = (code, reason_phrase)


class _TorchServeContext:
    """TorchServe's ts.context.Context, the members the SageMaker toolkit calls."""

    def __init__(self, model_dir: Path, headers: Mapping[str, str]) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 1}
        self.request_processor = [_RequestProcessor(headers)]
        self.content_types: dict[int, str] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.request_processor[idx].report_status(code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


class ServingContainer:
    """The PyTorch inference container: TorchServe's request limit and the toolkit's HandlerService.

    `environment` is the SageMaker Model's container Environment (template.yaml); it is in force
    while the model loads, as in the container. `program` (SAGEMAKER_PROGRAM) defaults to
    model_code.inference itself, the byte-identical source of the archive's code/inference.py
    (test_packaging), so that a test process keeps importing clip from the venv rather than from an
    archive's code/lib; a cold-start test passes "inference.py" with model_dir/code on sys.path.
    """

    def __init__(
        self, model_dir: Path, environment: Mapping[str, str] | None = None, program: str = "model_code.inference"
    ) -> None:
        env = dict(environment or {})
        self.model_dir = model_dir
        self.max_request_size = int(env.get("TS_MAX_REQUEST_SIZE", TORCHSERVE_MAX_REQUEST_SIZE))
        self.handler = HandlerService()
        overrides = {**env, "SAGEMAKER_PROGRAM": program}
        saved = {k: os.environ.get(k) for k in [*overrides, "PYTHONPATH"]}
        try:
            os.environ.update(overrides)
            self.handler.initialize(_TorchServeContext(model_dir, {}))
        finally:  # initialize() also prepends model_dir/code to PYTHONPATH: undo it for this process
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def invoke(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        """One request as the container answers it: (status, body, content type)."""
        if len(body) > self.max_request_size:
            # Netty's aggregator in TorchServe's frontend: 413 with an empty body, no handler call.
            return 413, b"", "text/plain"
        context = _TorchServeContext(self.model_dir, headers)
        answer = self.handler.handle([{"body": body}], context)[0]
        status, _phrase = context.request_processor[0].status
        payload = answer if isinstance(answer, bytes) else str(answer).encode()
        return status, payload, context.content_types.get(0, "text/plain")


class InvokeEndpointServer(ThreadingHTTPServer):
    """POST /endpoints/NAME/invocations -> the serving container, with SageMaker's answers."""

    daemon_threads = True  # a request sleeping in delay_s must not hold up shutdown

    def __init__(self, model_dir: Path, environment: Mapping[str, str] | None = None) -> None:
        self.container = ServingContainer(model_dir, environment)
        self.throttle_next = 0
        self.delay_s = 0.0
        self.per_image_s = 0.0
        self.refuse_image: Callable[[Image.Image], bool] | None = None
        self.refuse_status = 400
        self.images: list[int] = []
        self.max_body_bytes = SERVERLESS_MAX_BODY_BYTES
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _InvokeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def model_error(endpoint: str, status: int, body: bytes) -> dict[str, Any]:
    """InvokeEndpoint's ModelError for a container's non-200 answer.

    Fields: the ModelError shape of the sagemaker-runtime API (botocore reference, "SageMakerRuntime /
    Client / exceptions / ModelError"). Message: the service's wording as users report it, e.g.
    aws/amazon-sagemaker-examples#1881 and aws-samples/amazon-sagemaker-custom-recommender-system#2.
    """
    text = body.decode("utf-8", "replace")
    kind = "client" if 400 <= status < 500 else "server"
    group = f"/aws/sagemaker/Endpoints/{endpoint}"
    return {
        "Message": f'Received {kind} error ({status}) from primary with message "{text}". See '
        f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}#logEventViewer:"
        f"group={group} in account {ACCOUNT} for more information.",
        "OriginalStatusCode": status,
        "OriginalMessage": text,
        "LogStreamArn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}:log-stream:AllTraffic/local",
    }


def _image_count(body: bytes, content_type: str) -> int:
    """How many images a request carries: model_code's JSON {"images": [...]}, else one (a raw image)."""
    return len(_encoded_images(body, content_type))


def _encoded_images(body: bytes, content_type: str) -> list[bytes]:
    if not content_type.startswith("application/json"):
        return [body]
    try:
        images = json.loads(body).get("images", [])
    except (ValueError, AttributeError):
        return []
    images = [images] if isinstance(images, str) else images
    return [base64.b64decode(i) for i in images if isinstance(i, str)] if isinstance(images, list) else []


def _pictures(body: bytes, content_type: str) -> Iterator[Image.Image]:
    for data in _encoded_images(body, content_type):
        try:
            yield Image.open(io.BytesIO(data))
        except OSError:
            continue  # not a picture: the container's own decode refuses it


class _InvokeHandler(BaseHTTPRequestHandler):
    server: InvokeEndpointServer

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        parts = self.path.strip("/").split("/")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if len(parts) != 3 or parts[0] != "endpoints" or parts[2] != "invocations":
            return self._send(404, {"message": "no such route"}, "UnknownOperationException")
        ctype = self.headers.get("Content-Type", "")
        images = _image_count(body, ctype)
        if self.server.delay_s or self.server.per_image_s:
            time.sleep(self.server.delay_s + self.server.per_image_s * images)
        if len(body) > self.server.max_body_bytes:
            return self._send(
                400,
                {
                    "message": f"Request payload size {len(body)} exceeds the serverless "
                    f"limit of {self.server.max_body_bytes} bytes"
                },
                "ValidationError",
            )
        # SageMaker passes the request's Content-Type and Accept on to the container.
        forwarded = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        with self.server.lock:
            self.server.calls.append((parts[1], ctype))
            self.server.images.append(images)
            if self.server.throttle_next > 0:
                self.server.throttle_next -= 1
                return self._send(400, {"message": "Rate exceeded"}, "ThrottlingException")
            refused = self.server.refuse_image is not None and any(
                self.server.refuse_image(img) for img in _pictures(body, ctype)
            )
            if refused:
                status, payload, answer_type = self.server.refuse_status, b"one of the images: no", "text/plain"
            else:
                status, payload, answer_type = self.server.container.invoke(body, forwarded)
        if status != 200:
            return self._send(424, model_error(parts[1], status, payload), "ModelError")
        self.send_response(200)
        self.send_header("Content-Type", answer_type)
        self.send_header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send(self, status: int, body: dict[str, Any], error_type: str) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def unpack_model(work: Path, spec: str = "demo") -> Path:
    """Package `spec` as `clipsearch package-model` does and unpack it as SageMaker does (/opt/ml/model)."""
    from clipsearch.sagemaker.packaging import package_model  # here: a cold-start subprocess imports this module

    packaged = package_model(spec, work / "model.tar.gz")
    model_dir = work / "model"
    with tarfile.open(packaged.path) as tar:
        tar.extractall(model_dir, filter="data")
    return model_dir


@contextmanager
def running_endpoint(
    work: Path,
    environment: Mapping[str, str] | None = None,
    make: Callable[[Path, Mapping[str, str] | None], InvokeEndpointServer] = InvokeEndpointServer,
) -> Iterator[InvokeEndpointServer]:
    """Package the demo model as `clipsearch package-model` does and serve it on loopback."""
    server = make(unpack_model(work), environment)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
