"""One table of picture formats (model_code IMAGE_FORMATS): every list of names and content types agrees with it.

The route table, the SageMaker handler and the local server derive theirs from the table; the web page
and the OpenAPI document cannot, so they are read here and compared with it.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.fakes import FAKE_DIM, FakeEncoder, LambdaContext
from support.images import picture

from clipsearch.http.routes import build_app
from clipsearch.images import IMAGE_FORMATS, UPLOAD_TYPES, content_type_of, is_image_name
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.search import SearchService
from model_code import inference

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "clipsearch" / "http" / "web"
EVERY_TYPE = sorted({fmt.content_type for fmt in IMAGE_FORMATS.values() if fmt.content_type})


def js_constant(name: str) -> Any:
    """A constant of app.js written as a JSON-like literal (an array, or an object with bare keys)."""
    match = re.search(rf"const {name} = (\[.*?\]|\{{.*?\}});", (WEB / "app.js").read_text(encoding="utf-8"))
    assert match, f"app.js no longer defines {name}"
    return json.loads(re.sub(r"(\w+):", r'"\1":', match.group(1)))


def test_given_the_web_page_when_its_type_lists_are_read_then_they_are_the_tables_upload_types() -> None:
    sent_as_is, server_decodes = js_constant("SENT_AS_IS"), js_constant("SERVER_DECODES")
    assert sorted([*sent_as_is, *server_decodes.values()]) == sorted(UPLOAD_TYPES)
    for ext, content_type in server_decodes.items():  # a file the browser gives no type is typed by its name
        assert IMAGE_FORMATS["." + ext].content_type == content_type
    accept = re.search(r'accept="([^"]*)"', (WEB / "index.html").read_text(encoding="utf-8"))
    assert accept and accept.group(1).split(",") == ["image/*", *("." + ext for ext in server_decodes)]


def test_given_the_openapi_document_when_read_then_post_search_takes_exactly_the_upload_types() -> None:
    for doc in (ROOT / "docs" / "openapi.json", WEB / "openapi.json"):
        body = json.loads(doc.read_text(encoding="utf-8"))["paths"]["/search"]["post"]["requestBody"]["content"]
        assert sorted(t for t in body if t.startswith("image/")) == sorted(UPLOAD_TYPES), doc


def post(app: Any, content_type: str, body: bytes) -> int:
    event = json.loads((ROOT / "events" / "api" / "search-image.json").read_text())
    event["headers"]["Content-Type"] = content_type
    event["multiValueHeaders"]["Content-Type"] = [content_type]
    event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    return int(app.resolve(event, LambdaContext())["statusCode"])


def test_given_every_content_type_in_the_table_when_sent_then_the_api_and_the_endpoint_take_the_same_ones(
    tmp_path: Path,
) -> None:
    index = EmbeddedIndex(tmp_path / "index", model="fake", dim=FAKE_DIM)
    app = build_app(SearchService(FakeEncoder(), index, url_for=lambda hit: f"/images/{hit.id}"))
    body = picture(fmt="PNG")  # decoded by its bytes whatever the label: only the label is on trial
    api = {t for t in EVERY_TYPE if post(app, t, body) != 415}
    endpoint = set()
    for t in EVERY_TYPE:
        try:
            inference.input_fn(body, t)
        except ValueError as e:
            assert "unsupported content type" in str(e)
        else:
            endpoint.add(t)
    assert api == endpoint == set(UPLOAD_TYPES)
    assert {"image/gif", "image/bmp", "image/tiff"}.isdisjoint(api)  # the page sends those as PNG or JPEG


@pytest.mark.parametrize(
    "name,content_type",
    [("IMG_0001.JPG", "image/jpeg"), ("a.jpeg", "image/jpeg"), ("x.Heic", "image/heic"), ("s.tif", "image/tiff")],
)
def test_given_a_picture_name_when_typed_then_its_content_type_comes_from_the_table_whatever_the_case(
    name: str, content_type: str
) -> None:
    assert is_image_name(name) and content_type_of(name) == content_type


@pytest.mark.parametrize("name", ["DSC_0003.NEF", "b.cr3", "c.DNG", "d.ARW"])
def test_given_a_camera_raw_name_when_typed_then_it_is_a_picture_without_a_content_type(name: str) -> None:
    # Indexed by its name, never served to a browser nor taken as a request body.
    assert is_image_name(name) and inference.is_raw_name(name) and content_type_of(name) is None


@pytest.mark.parametrize("name", ["notes.txt", "movie.mp4", "drawing.svg", "noext"])
def test_given_a_name_outside_the_table_when_typed_then_it_is_no_picture(name: str) -> None:
    assert not is_image_name(name) and content_type_of(name) is None
