"""The SageMaker PyTorch serving toolkit, run for real on model_code, and what SageMaker makes of its answers.

sagemaker-pytorch-inference's HandlerService and sagemaker-inference's Transformer are the code
that calls model_code in the container; tests/support/sagemaker_endpoint.py runs them behind the
InvokeEndpoint stand-in, so an error status here is the one a real endpoint would give.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from PIL import Image
from support.sagemaker_endpoint import (
    TORCHSERVE_MAX_REQUEST_SIZE,
    InvokeEndpointServer,
    ServingContainer,
    unpack_model,
)

from clipsearch.aws import backfill
from clipsearch.encoders import SageMakerEncoder
from clipsearch.errors import BadRequest
from clipsearch.images import load_file
from model_code import inference

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = "clipsearch-demo"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_model(tmp_path_factory.mktemp("opt-ml"))


@pytest.fixture
def runtime(endpoint: InvokeEndpointServer) -> Any:
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # pragma: allowlist secret
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def local_refusal(body: bytes, content_type: str) -> str:
    """The message model_code itself gives for a refused input."""
    with pytest.raises(ValueError) as refused:
        inference.input_fn(body, content_type)
    return str(refused.value)


# -- item 4: client errors are 400 in the container, ModelError 424 from SageMaker ------------------


def test_given_an_image_the_model_refuses_when_invoked_then_model_error_424_with_original_status_400(
    runtime: Any,
) -> None:
    with pytest.raises(ClientError) as info:
        runtime.invoke_endpoint(
            EndpointName=ENDPOINT, Body=b"not an image", ContentType="image/png", Accept="application/json"
        )

    response: Any = info.value.response  # ModelError's own fields sit beside Error (botocore's parser)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["Error"]["Code"] == "ModelError"
    assert response["OriginalStatusCode"] == 400
    # The toolkit answers the message, then the traceback (Transformer.handle_error).
    assert response["OriginalMessage"].splitlines()[0] == local_refusal(b"not an image", "image/png")
    assert response["Error"]["Message"].startswith("Received client error (400) from primary with message")


def test_given_a_handler_raising_a_plain_value_error_when_served_by_the_toolkit_then_it_answers_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What model_code answered before BadInput: the toolkit makes any other exception a server error.
    (tmp_path / "plain_value_error.py").write_text(
        "def model_fn(model_dir):\n    return object()\n\n"
        "def input_fn(body, content_type):\n    raise ValueError('refused, but plainly')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    container = ServingContainer(tmp_path, program="plain_value_error.py")

    status, body, _ = container.invoke(b"{}", {"Content-Type": "application/x-image"})

    assert status == 500 and body.decode().splitlines()[0] == "refused, but plainly"


def test_given_a_body_the_toolkit_cannot_decode_when_invoked_then_original_status_500(runtime: Any) -> None:
    # The toolkit decodes application/json as UTF-8 before input_fn runs: a server-side error, as in AWS.
    with pytest.raises(ClientError) as info:
        runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=b'{"inputs": ["\xff"]}', ContentType="application/json")

    response: Any = info.value.response
    assert response["OriginalStatusCode"] == 500


def test_given_an_input_the_endpoint_refuses_when_the_encoder_sends_it_then_bad_request(runtime: Any) -> None:
    encoder = SageMakerEncoder("demo", 128, ENDPOINT, client=runtime)

    with pytest.raises(BadRequest, match="is empty"):
        encoder.encode_texts([])


def test_given_an_input_the_endpoint_refuses_when_the_encoder_reports_it_then_no_traceback(runtime: Any) -> None:
    encoder = SageMakerEncoder("demo", 128, ENDPOINT, client=runtime)

    with pytest.raises(BadRequest) as info:
        encoder.encode_texts([])

    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_given_a_good_request_when_invoked_through_the_toolkit_then_vectors_as_model_code_gives_them(
    runtime: Any, demo_encoder: Any
) -> None:
    answer = runtime.invoke_endpoint(
        EndpointName=ENDPOINT, Body=json.dumps({"inputs": ["a red circle"]}), ContentType="application/json"
    )

    assert answer["ContentType"] == "application/json"
    remote = np.asarray(json.loads(answer["Body"].read()), dtype=np.float32)
    assert float(np.max(np.abs(remote - demo_encoder.encode_texts(["a red circle"])))) <= 1e-5


# -- item 7: a batch transform admits a camera original --------------------------------------------


@pytest.fixture(scope="module")
def camera_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MP JPEG at quality 95 with sensor-like noise: about 8 MB, as a phone or camera writes it."""
    h, w = 3000, 4000
    rng = np.random.default_rng(7)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    base = np.stack(np.broadcast_arrays(y, x, (x + y) / 2), axis=2)
    pixels = np.clip(base + rng.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    path = tmp_path_factory.mktemp("camera") / "IMG_0001.JPG"
    path.write_bytes(buf.getvalue())
    return path


class RecordingSageMaker:
    """The SageMaker control plane's create_transform_job, recording what it was asked for."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def create_transform_job(self, **kwargs: Any) -> dict[str, str]:
        self.jobs.append(kwargs)
        name = kwargs["TransformJobName"]
        return {"TransformJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:transform-job/{name}"}


def transform_job() -> dict[str, Any]:
    control = RecordingSageMaker()
    backfill.start_transform(control, "job-1", "clip", "s3://b/manifest.json", "s3://b/out/", "ml.m5.xlarge")
    return control.jobs[0]


def transform_models() -> dict[str, dict[str, str]]:
    """The container Environment of each SageMaker Model that the TransformModelName output can name."""
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse((ROOT / "template.yaml").read_text())
    _condition, *choices = template["Outputs"]["TransformModelName"]["Value"]["Fn::If"]
    models = {}
    for choice in choices:
        name = choice["Fn::GetAtt"][0] if isinstance(choice["Fn::GetAtt"], list) else choice["Fn::GetAtt"].split(".")[0]
        env = template["Resources"][name]["Properties"]["PrimaryContainer"].get("Environment", {})
        # Single layout: ENCODE_TYPE is !If [SplitEndpoints, TEXT, AWS::NoValue], so unset.
        models[name] = {k: v for k, v in env.items() if isinstance(v, str)}
    return models


def test_given_a_camera_original_when_the_transform_job_is_created_then_its_payload_limit_admits_it(
    camera_original: Path,
) -> None:
    job = transform_job()
    size = camera_original.stat().st_size
    assert size > 6 * MIB  # the old MaxPayloadInMB, and the API's default

    assert size <= job["MaxPayloadInMB"] * MIB
    # CreateTransformJob: MaxPayloadInMB <= 100, and MaxConcurrentTransforms x MaxPayloadInMB <= 100.
    assert job["MaxConcurrentTransforms"] * job["MaxPayloadInMB"] <= 100
    assert job["TransformInput"]["SplitType"] == "None" and job["BatchStrategy"] == "SingleRecord"


@pytest.mark.parametrize("model", sorted(transform_models()))
def test_given_a_camera_original_when_the_transform_container_receives_it_then_it_is_encoded(
    model: str, camera_original: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MODEL_NAME", "ENCODE_TYPE"):
        monkeypatch.delenv(name, raising=False)
    job = transform_job()
    photo = camera_original.read_bytes()
    assert len(photo) > TORCHSERVE_MAX_REQUEST_SIZE  # TorchServe's default would refuse it with 413
    container = ServingContainer(model_dir, transform_models()[model])

    status, body, _ = container.invoke(
        photo, {"Content-Type": job["TransformInput"]["ContentType"], "Accept": job["TransformOutput"]["Accept"]}
    )

    assert status == 200, f"the container answered {status} (TS_MAX_REQUEST_SIZE in {model}'s Environment?)"
    local = inference.load_model("demo", str(model_dir))
    expected = inference.encode_images(local, [load_file(camera_original).image])
    assert np.allclose(np.asarray(json.loads(body), dtype=np.float32), expected, atol=1e-5)


class ListedBucket:
    """S3's ListObjectsV2 paginator over a fixed listing: sizes without the bytes."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def get_paginator(self, operation: str) -> ListedBucket:
        assert operation == "list_objects_v2"
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803 - boto3's names
        return [{"Contents": [{"Key": k, "Size": n} for k, n in self.sizes.items() if k.startswith(Prefix)]}]


def transform_nothing(sizes: dict[str, int]) -> tuple[backfill.BackfillSummary, RecordingSageMaker]:
    """A transform backfill of a listing (key -> size) none of which may reach a job: its summary and the jobs."""
    control = RecordingSageMaker()
    summary = backfill.batch_transform(
        ListedBucket(sizes),
        control,
        lambda dim: pytest.fail("nothing to index"),
        "bucket",
        "photos/",
        "clip",
        "ml.m5.xlarge",
        job="job-1",
        poll_s=0,
    )
    return summary, control


def test_given_an_object_over_the_payload_limit_when_backfilled_by_transform_then_reported_not_sent() -> None:
    key = "photos/panorama.tif"

    summary, control = transform_nothing({key: backfill.MAX_PAYLOAD_MB * MIB + 1})

    assert control.jobs == []  # one record over MaxPayloadInMB would fail the whole job
    assert summary.listed == 1 and [k for k, _ in summary.failed] == [key]
    assert f"{backfill.MAX_PAYLOAD_MB} MB" in summary.failed[0][1]


def test_given_camera_raw_objects_when_backfilled_by_transform_then_reported_as_left_to_the_ingest_queue() -> None:
    keys = ["photos/DSC_0001.NEF", "photos/IMG_0002.dng"]

    summary, control = transform_nothing(dict.fromkeys(keys, 25 * MIB))

    assert control.jobs == []  # the container gets no key to tell RAW by, and has no rawpy
    assert summary.listed == 2 and [k for k, _ in summary.failed] == keys
    assert all("ingest queue" in reason for _, reason in summary.failed)
