"""The formats a phone or camera writes: HEIC/HEIF (pillow-heif), AVIF (Pillow 11.3+) and camera RAW (rawpy).

Every fixture is made from a shape picture (clipsearch.demo.shapes): HEIC with pillow-heif, AVIF with
Pillow's own encoder, and a minimal DNG whose JPEG preview rawpy's extract_thumb() returns (support.camera,
which the AWS pipeline and built-layer tests share). Each is indexed and then found by its text with the demo model,
through the CLI, the local REST server and the ingest Lambda's path (S3 on moto, the SageMaker stand-in).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image
from support.camera import dng, jpeg, shape

from clipsearch.aws.ingest import CREATED, Ingestor, ObjectEvent
from clipsearch.encoders import SageMakerEncoder
from clipsearch.http.server import make_server
from clipsearch.images import is_image_name, load_bytes
from clipsearch.index.base import doc_id
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.ingest import has_picture_signature
from clipsearch.search import SearchRequest, SearchService, image_request
from model_code.inference import decode_for_model

pillow_heif = pytest.importorskip("pillow_heif")
rawpy = pytest.importorskip("rawpy")

CLI = [sys.executable, "-m", "clipsearch.cli"]
BUCKET = "clipsearch-formats"
ENDPOINT = "clipsearch-demo"
DIM = 128  # the demo model
# What each picture shows, by the file name a phone or camera gives it (upper-case extensions on purpose).
PICTURES = {
    "IMG_0001.HEIC": ("red", "circle"),
    "IMG_0002.AVIF": ("blue", "square"),
    "DSC_0003.DNG": ("yellow", "triangle"),
}
DISTRACTORS = {
    "IMG_0004.JPG": ("green", "star"),
    "IMG_0005.JPG": ("purple", "square"),
    "IMG_0006.JPG": ("orange", "triangle"),
}


# -- fixtures made here --------------------------------------------------------------------------


def heic(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, format="HEIF", quality=90)
    return buf.getvalue()


def avif(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="AVIF", quality=90)
    return buf.getvalue()


def encoded(name: str, img: Image.Image) -> bytes:
    suffix = Path(name).suffix.lower()
    return dng(img) if suffix == ".dng" else {".heic": heic, ".avif": avif, ".jpg": jpeg}[suffix](img)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camera roll")
    for n, (name, (colour, kind)) in enumerate({**PICTURES, **DISTRACTORS}.items()):
        (root / name).write_bytes(encoded(name, shape(colour, kind, seed=n)))
    (root / "DSC_0007.NEF").write_bytes(dng(None))  # a RAW without any preview
    return root


def run(*args: str, code: int = 0, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter; no traceback may reach the user."""
    done = subprocess.run(
        [*(prefix or CLI), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def indexed(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    index_dir = tmp_path_factory.mktemp("index")
    return index_dir, run("index", str(folder), "--index", str(index_dir), "--model", "demo")


def top(index_dir: Path, *query: str) -> str:
    done = run("search", *query, "-k", "1", "--index", str(index_dir), "--json")
    return Path(json.loads(done.stdout)["hits"][0]["key"]).name


def stderr_line(err: str, name: str) -> str:
    lines = [ln for ln in err.splitlines() if name in ln]
    assert len(lines) == 1, err
    return lines[0]


# -- names and signatures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "IMG_0001.HEIC",
        "img.heif",
        "IMG_0002.AVIF",
        "x.Avif",
        "DSC_0003.DNG",
        "a.cr2",
        "b.NEF",
        "c.arw",
        "d.RAF",
        "e.orf",
        "f.RW2",
        "g.CR3",
    ],
)
def test_given_a_phone_or_camera_file_name_when_checked_then_it_is_an_image_name_whatever_its_case(name: str) -> None:
    assert is_image_name(name)


@pytest.mark.parametrize(
    "head",
    [
        b"IIRO\x08\x00\x00\x00",
        b"IIU\x00\x18\x00\x00\x00",
        b"FUJIFILMCCD-RAW ",
        b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01",
    ],
    ids=["ORF", "RW2", "RAF", "CR3"],
)
def test_given_the_start_of_a_raw_file_that_is_not_tiff_when_sniffed_then_it_passes(head: bytes) -> None:
    assert has_picture_signature(head)


def test_given_generated_heic_avif_and_dng_when_sniffed_then_each_passes_before_being_read() -> None:
    img = shape("red", "circle", seed=0)
    for data in (heic(img), avif(img), dng(img)):
        assert has_picture_signature(data[:16])


# -- local: CLI and REST ---------------------------------------------------------------------------


def test_given_heic_avif_and_dng_in_a_folder_when_indexed_then_each_is_found_by_its_text(
    indexed: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    index_dir, done = indexed
    # The three formats and the three JPEGs are indexed; the RAW without a preview is skipped with the reason.
    assert done.stdout.splitlines()[-1].startswith("indexed 6,"), done.stdout
    assert "RAW file without an embedded JPEG preview" in stderr_line(done.stderr, "DSC_0007.NEF")
    for name, (colour, kind) in PICTURES.items():
        assert top(index_dir, f"a {colour} {kind}") == name


def test_given_a_heic_picture_when_decoded_then_it_matches_the_same_picture_losslessly_stored(
    demo_encoder: Any,
) -> None:
    img = shape("red", "circle", seed=11)
    png = io.BytesIO()
    img.save(png, format="PNG")
    vectors = demo_encoder.encode_images(
        [load_bytes(heic(img)), load_bytes(png.getvalue()), load_bytes(avif(img)), load_bytes(dng(img), name="x.dng")]
    )
    assert load_bytes(heic(img)).size == img.size
    assert float(vectors[0] @ vectors[1]) > 0.99  # HEIC (lossy, quality 90) against the PNG
    assert float(vectors[2] @ vectors[1]) > 0.99  # AVIF
    assert float(vectors[3] @ vectors[1]) > 0.99  # the DNG's JPEG preview


def test_given_a_dng_whose_camera_was_turned_when_decoded_then_the_preview_is_upright() -> None:
    img = shape("red", "circle", seed=12).crop((0, 0, 256, 192))  # landscape as stored
    for orientation in (6, 8):
        decoded = decode_for_model(dng(img, orientation=orientation), name="DSC_0100.DNG")
        assert (decoded.width, decoded.height) == (192, 256)  # a portrait once turned


def test_given_a_heic_query_picture_when_searched_by_the_cli_then_the_heic_photo_comes_first(
    indexed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    query = tmp_path / "query.HEIC"
    query.write_bytes(heic(shape("red", "circle", seed=99)))  # another red circle
    assert top(indexed[0], "--image", str(query)) == "IMG_0001.HEIC"


@pytest.mark.parametrize("name", ["query.DNG", "query.NEF"])
def test_given_a_raw_query_picture_when_searched_by_the_cli_then_the_raw_photo_comes_first(
    indexed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, name: str
) -> None:
    # Only its name tells a RAW file: read as the TIFF it is, IFD0 shows the thumbnail (a purple square).
    thumbnail = shape("purple", "square", seed=98).resize((40, 30))
    query = tmp_path / name
    query.write_bytes(dng(shape("yellow", "triangle", seed=99), thumbnail=thumbnail))  # another yellow triangle
    assert top(indexed[0], "--image", str(query)) == "DSC_0003.DNG"


def test_given_a_heic_upload_when_posted_to_the_rest_server_then_the_heic_photo_comes_first(
    indexed: tuple[Path, subprocess.CompletedProcess[str]], demo_encoder: Any
) -> None:
    import http.client

    index = EmbeddedIndex(indexed[0], read_only=True)
    try:
        with make_server(index, demo_encoder, port=0).start() as server:
            host, port = server.server_address[:2]
            conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
            conn.request(
                "POST",
                "/search?k=1",
                body=heic(shape("red", "circle", seed=98)),
                headers={"Content-Type": "image/heic"},
            )
            reply = conn.getresponse()
            status, body = reply.status, json.loads(reply.read())
            conn.close()
    finally:
        index.close()
    assert status == 200, body
    assert Path(body["hits"][0]["key"]).name == "IMG_0001.HEIC"


# Imports of pillow_heif and rawpy fail in this interpreter, as on a machine without them.
WITHOUT_HEIF_AND_RAWPY = """
import runpy, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pillow_heif", "rawpy"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Absent())
sys.argv = ["clipsearch", *sys.argv[1:]]
runpy.run_module("clipsearch.cli", run_name="__main__")
"""


def test_given_no_pillow_heif_and_no_rawpy_when_indexed_then_heic_and_raw_are_skipped_with_the_reason(
    folder: Path, tmp_path: Path
) -> None:
    done = run(
        "index",
        str(folder),
        "--index",
        str(tmp_path / "index"),
        "--model",
        "demo",
        prefix=(sys.executable, "-c", WITHOUT_HEIF_AND_RAWPY),
    )

    assert done.stdout.splitlines()[-1].startswith("indexed 4,"), done.stdout  # the AVIF and the JPEGs
    assert "HEIC/HEIF needs pillow-heif" in stderr_line(done.stderr, "IMG_0001.HEIC")
    assert "RAW needs rawpy" in stderr_line(done.stderr, "DSC_0003.DNG")
    assert "RAW needs rawpy" in stderr_line(done.stderr, "DSC_0007.NEF")


# -- AWS: the ingest Lambda's path and the search Lambda's image query -----------------------------


@pytest.fixture
def sent() -> list[str]:
    """The Content-Type of every InvokeEndpoint request the `encoder` fixture's client sends."""
    return []


@pytest.fixture
def encoder(aws_env: dict[str, str], sent: list[str]) -> SageMakerEncoder:
    client = boto3.client("sagemaker-runtime")

    def record(request: Any, **_: Any) -> None:
        ctype = request.headers.get("Content-Type")
        sent.append(ctype.decode("ascii") if isinstance(ctype, bytes) else str(ctype))

    client.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", record)
    return SageMakerEncoder("demo", DIM, ENDPOINT, client=client)


def test_given_heic_and_avif_uploads_to_s3_when_ingested_then_they_are_indexed_and_found_by_text(
    folder: Path, s3: Any, encoder: SageMakerEncoder, sent: list[str], tmp_path: Path, demo_encoder: Any
) -> None:
    index = EmbeddedIndex(tmp_path / "index", model="demo", dim=DIM)
    try:
        names = ["IMG_0001.HEIC", "IMG_0002.AVIF", *DISTRACTORS]
        for name in names:
            data = (folder / name).read_bytes()
            key = f"phone/{name}"
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)  # no ContentType: the key's extension says it
            Ingestor(encoder, index, s3).apply(ObjectEvent(CREATED, BUCKET, key, len(data)))
            doc = index.get(doc_id(BUCKET, key))
            assert doc is not None, f"{name} was not indexed"
            # The Lambda decoded the picture itself: the endpoint's Pillow reads neither HEIC nor AVIF.
            assert sent[-1] in ("image/png", "image/jpeg"), sent
            local = demo_encoder.encode_images([load_bytes(data)])[0]
            assert np.allclose(doc.vector, local, atol=1e-5)

        service = SearchService(encoder, index, url_for=lambda hit: "")
        for name in ("IMG_0001.HEIC", "IMG_0002.AVIF"):
            colour, kind = PICTURES[name]
            found = service.search(SearchRequest("text", text=f"a {colour} {kind}", k=1))
            assert found["hits"][0]["key"] == f"phone/{name}"
        # The search Lambda's image query: a HEIC upload is decoded here and reaches the endpoint as PNG/JPEG.
        sent.clear()
        found = service.search(image_request(heic(shape("red", "circle", seed=97)), {"k": "1"}))
        assert found["hits"][0]["key"] == "phone/IMG_0001.HEIC"
        assert sent and all(ctype in ("image/png", "image/jpeg") for ctype in sent), sent
    finally:
        index.close()
