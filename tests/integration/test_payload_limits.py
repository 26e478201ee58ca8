"""Payload and memory limits of the AWS path, against a SageMaker stand-in as strict as Serverless.

- InvokeEndpoint is answered by tests/support/sagemaker_endpoint.py, which refuses request bodies over
  4 MB as SageMaker Serverless does; boto3's real sagemaker-runtime client calls it
  (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME), and an event hook on that client records every body it sends.
- S3 is a moto server. The index is the embedded one: these tests are about what travels, not where it lands.
- The ingest path's peak memory on a 100 MP camera JPEG is measured in a fresh interpreter (ru_maxrss)
  and compared with the ingest function's MemorySize in template.yaml.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image, ImageChops
from support.sagemaker_endpoint import SERVERLESS_MAX_BODY_BYTES, InvokeEndpointServer

from clipsearch.aws.ingest import CREATED, MAX_OBJECT_BYTES, Ingestor, ObjectEvent
from clipsearch.encoders import SageMakerEncoder
from clipsearch.images import load_bytes, load_file
from clipsearch.index.base import doc_id
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.search import SearchService, image_request

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "clipsearch-payload-limits"
ENDPOINT = "clipsearch-demo"
DIM = 128  # the demo model


@pytest.fixture
def bodies() -> list[int]:
    """The size of every InvokeEndpoint body sent by the `encoder` fixture's client."""
    return []


@pytest.fixture
def encoder(aws_env: dict[str, str], bodies: list[int]) -> SageMakerEncoder:
    client = boto3.client("sagemaker-runtime")

    def record(request: Any, **_: Any) -> None:
        body = request.body
        bodies.append(len(body) if isinstance(body, bytes | bytearray) else len(body.read()))

    client.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", record)
    return SageMakerEncoder("demo", DIM, ENDPOINT, client=client)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[EmbeddedIndex]:
    idx = EmbeddedIndex(tmp_path / "index", model="demo", dim=DIM)
    yield idx
    idx.close()


def noisy_picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random scene with sensor-like noise on top: compresses like a photo, not like a flat fill."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, size[1] // 80), max(2, size[0] // 80), 3), dtype=np.uint8))
    scene = small.resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 20).convert("RGB")
    return ImageChops.add(scene, noise, scale=1.0, offset=-128)


def jpeg(img: Image.Image, quality: int = 90, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40000x1000 and 24000x2000 noisy JPEGs, on disk (written once for the module)."""
    folder = tmp_path_factory.mktemp("panoramas")
    paths = {}
    for n, size in enumerate([(40_000, 1000), (24_000, 2000)]):
        path = paths[f"{size[0]}x{size[1]}"] = folder / f"panorama-{size[0]}x{size[1]}.jpg"
        path.write_bytes(jpeg(noisy_picture(size, seed=n)))
    return paths


# -- ingest --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["40000x1000", "24000x2000"])
def test_given_a_noisy_panorama_when_ingested_through_the_serverless_stand_in_then_it_is_indexed_under_4_mb(
    name: str,
    panoramas: dict[str, Path],
    s3: Any,
    encoder: SageMakerEncoder,
    index: EmbeddedIndex,
    bodies: list[int],
    demo_encoder: Any,
) -> None:
    data = panoramas[name].read_bytes()
    key = f"panoramas/{panoramas[name].name}"
    s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/jpeg")

    Ingestor(encoder, index, s3).apply(ObjectEvent(CREATED, BUCKET, key, len(data)))

    doc = index.get(doc_id(BUCKET, key))
    assert doc is not None, "the panorama was not indexed"
    assert f"{doc.width}x{doc.height}" == name  # the original's size, not the cropped one
    assert len(bodies) == 1 and bodies[0] <= SERVERLESS_MAX_BODY_BYTES, bodies
    # Local and AWS vectors agree as everywhere else: the endpoint saw exactly the local pixels (PNG).
    local = demo_encoder.encode_images([load_file(panoramas[name]).image])[0]
    assert np.allclose(doc.vector, local, atol=1e-5)


def test_given_several_big_pictures_in_one_call_when_encoded_then_each_request_fits_and_vectors_keep_their_order(
    encoder: SageMakerEncoder,
    bodies: list[int],
    demo_encoder: Any,
) -> None:
    # Downscaled pictures at the 2:1 limit, pure noise: ~1.2 MB each as PNG, ~1.6 MB as base64 in JSON.
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (448, 896, 3), dtype=np.uint8)) for _ in range(5)]

    vectors = encoder.encode_images(images)

    assert vectors.shape == (5, DIM)
    assert len(bodies) > 1 and max(bodies) <= SERVERLESS_MAX_BODY_BYTES, bodies
    assert np.allclose(vectors, demo_encoder.encode_images(images), atol=1e-5)


# -- search --------------------------------------------------------------------------------------


def test_given_a_big_picture_as_a_search_query_when_searched_then_the_endpoint_body_fits_and_it_finds_itself(
    panoramas: dict[str, Path],
    encoder: SageMakerEncoder,
    index: EmbeddedIndex,
    bodies: list[int],
    demo_encoder: Any,
) -> None:
    from clipsearch.index.base import Document

    docs = [
        Document(key=name, vector=demo_encoder.encode_images([load_file(path).image])[0])
        for name, path in panoramas.items()
    ]
    docs.append(
        Document(key="square.png", vector=demo_encoder.encode_images([Image.new("RGB", (300, 300), (200, 40, 40))])[0])
    )
    index.upsert(docs)
    query = panoramas["24000x2000"].read_bytes()

    response = SearchService(encoder, index, url_for=lambda hit: "").search(image_request(query))

    assert len(bodies) == 1 and bodies[0] <= SERVERLESS_MAX_BODY_BYTES, bodies
    assert response["hits"][0]["key"] == "24000x2000"
    assert response["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert load_bytes(query).size == (896, 448)


# -- ingest memory -------------------------------------------------------------------------------

# Runs in a fresh interpreter so that its peak RSS is the ingest path's own: the imports the ingest
# function makes, one GetObject from S3, the shared decode, the encoder's request to the endpoint.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child of this big pytest
# process would report the parent's size (proc(5): VmHWM is the peak resident set of this process).
INGEST_ONCE = """
import re, sys, boto3
from clipsearch.aws.ingest import CREATED, Ingestor, ObjectEvent
from clipsearch.encoders import SageMakerEncoder
from clipsearch.index.embedded import EmbeddedIndex
bucket, key, folder = sys.argv[1:4]
s3 = boto3.client("s3")
size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
index = EmbeddedIndex(folder, model="demo", dim=128)
def peak_mb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) // 1024
before = peak_mb()
Ingestor(SageMakerEncoder("demo", 128, "clipsearch-demo"), index, s3).apply(ObjectEvent(CREATED, bucket, key, size))
assert index.count() == 1
print(before, peak_mb())
"""


def ingest_memory_size_mb() -> int:
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse((ROOT / "template.yaml").read_text())
    ingest = next(
        r
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Serverless::Function" and "ingest" in str(r["Properties"].get("CodeUri"))
    )
    size = ingest["Properties"].get("MemorySize") or template["Globals"]["Function"]["MemorySize"]
    return int(size)


def ingest_peak_mb(s3: Any, key: str, data: bytes, folder: Path) -> tuple[int, int]:
    """(MB after the imports, peak MB) of a fresh interpreter that ingests `data` from S3 once."""
    assert len(data) <= MAX_OBJECT_BYTES  # else ingest skips it unread
    s3.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/" + key.rsplit(".", 1)[-1])
    out = subprocess.run(
        [sys.executable, "-c", INGEST_ONCE, BUCKET, key, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    imports_mb, peak_mb = (int(v) for v in out.stdout.split())
    print(json.dumps({"key": key, "imports_mb": imports_mb, "peak_mb": peak_mb}))
    return imports_mb, peak_mb


def test_given_a_100_mp_camera_jpeg_when_ingested_then_peak_memory_is_a_fraction_of_the_functions_memory(
    s3: Any,
    aws_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # 12000 x 8333 (99.996 MP, under the 100 MP limit), stored turned as a camera does (EXIF orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(noisy_picture((12_000, 8333), seed=9), quality=92, exif=exif.tobytes())

    _, peak_mb = ingest_peak_mb(s3, "camera/big.jpeg", data, tmp_path / "index")

    # The function handles a batch of records in one process, and Lambda's runtime and the
    # OpenSearch client live there too: one picture may take at most half of MemorySize.
    # Measured (a 58 MB file): 908 MB peak before draft decoding (all 100 MP decoded, then copied twice),
    # 157 MB after (91 MB of it the imports); MemorySize is 1024 MB.
    memory_mb = ingest_memory_size_mb()
    assert peak_mb <= memory_mb // 2, (peak_mb, memory_mb)


def test_given_a_100_mp_png_with_transparency_when_ingested_then_peak_memory_fits_the_functions_memory(
    s3: Any,
    aws_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # PNG has no reduced-scale decode: all 100 MP of RGBA (400 MB) are decoded whatever happens next.
    img = Image.new("RGBA", (10_000, 9999), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (2000, 2000, 8000, 8000))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    del img

    _, peak_mb = ingest_peak_mb(s3, "logos/big.png", buf.getvalue(), tmp_path / "index")

    # Measured: 1618 MB peak before (composited on white at full size: several 400 MB copies), 867 MB
    # after (shrunk first, then composited). It fits, not by much: PNG has no draft decoding.
    assert peak_mb <= ingest_memory_size_mb(), peak_mb


def test_given_the_stand_in_endpoint_when_started_then_it_refuses_what_serverless_refuses(
    endpoint: InvokeEndpointServer,
) -> None:
    assert endpoint.max_body_bytes == SERVERLESS_MAX_BODY_BYTES == 4 * 1024 * 1024
