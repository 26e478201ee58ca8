"""Weighted query terms (CONTRACT §7) with the demo model on its shapes catalogue: the service and the CLI."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clipsearch.cli import main
from clipsearch.demo.catalogue import write_catalogue
from clipsearch.errors import BadRequest, NotFound
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.ingest import index_paths
from clipsearch.search import SearchService, parse_json


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, demo_encoder: Any) -> Iterator[tuple[SearchService, Path]]:
    """96 shape pictures (every colour, shape and size twice) indexed with the demo model."""
    base = tmp_path_factory.mktemp("terms")
    write_catalogue(base / "catalogue", count=96)
    index = EmbeddedIndex(base / "index", model=demo_encoder.model, dim=demo_encoder.dim)
    assert index_paths([base / "catalogue"], demo_encoder, index).indexed == 96
    yield SearchService(demo_encoder, index, url_for=lambda hit: f"/images/{hit.id}"), base
    index.close()


def search(service: SearchService, payload: dict[str, Any]) -> list[tuple[str, float]]:
    return [(h["title"], h["score"]) for h in service.search(parse_json(payload))["hits"]]


def picture(base: Path, name: str) -> Path:
    return next((base / "catalogue").glob(f"*-{name}.png"))


def test_given_one_term_when_searched_then_the_same_hits_and_scores_as_the_plain_query(shapes):
    service, base = shapes
    png = base64.b64encode(picture(base, "a-large-blue-star").read_bytes()).decode()
    some_id = service.search(parse_json({"text": "a green triangle", "k": 1}))["hits"][0]["id"]
    for plain, term in [
        ({"text": "a red circle"}, {"text": "a red circle"}),
        ({"text": "a red circle"}, {"text": "a red circle", "weight": 2.5}),
        ({"image": png}, {"image": png}),
        ({"id": some_id}, {"id": some_id, "weight": 0.3}),
    ]:
        expected = search(service, {**plain, "k": 12})
        assert search(service, {"query": [term], "k": 12}) == expected, term.keys()
        assert len(expected) == 12


def test_given_two_terms_when_searched_then_the_hits_mix_both_result_sets(shapes):
    service, _ = shapes
    red_circles = {t for t, _ in search(service, {"text": "a red circle", "k": 8})}
    blue_squares = {t for t, _ in search(service, {"text": "a blue square", "k": 8})}
    assert not red_circles & blue_squares
    mixed = {t for t, _ in search(service, {"query": [{"text": "a red circle"}, {"text": "a blue square"}], "k": 8})}
    assert mixed & red_circles and mixed & blue_squares


def test_given_a_negative_term_when_searched_then_its_class_is_pushed_down(shapes):
    service, _ = shapes
    plain = [t for t, _ in search(service, {"text": "red", "k": 16})]
    minus = [t for t, _ in search(service, {"query": [{"text": "red"}, {"text": "a circle", "weight": -1}], "k": 16})]
    assert any("circle" in t for t in plain)
    assert not any("circle" in t for t in minus)
    assert sum("red" in t for t in minus) >= 8  # still red things


def test_given_terms_naming_indexed_pictures_when_searched_then_those_pictures_are_not_hits(shapes):
    service, _ = shapes
    first, second = (h["id"] for h in service.search(parse_json({"text": "a small yellow star", "k": 2}))["hits"])
    response = service.search(parse_json({"query": [{"id": first}, {"id": second, "weight": 0.5}], "k": 10}))
    assert {first, second}.isdisjoint(h["id"] for h in response["hits"]) and len(response["hits"]) == 10
    assert response["query"] == {
        "type": "terms",
        "terms": [{"type": "id", "id": first, "weight": 1.0}, {"type": "id", "id": second, "weight": 0.5}],
    }


def test_given_terms_that_cancel_out_or_an_unknown_id_when_searched_then_400_or_404(shapes):
    service, _ = shapes
    with pytest.raises(BadRequest, match="cancel out"):
        service.search(parse_json({"query": [{"text": "a dog"}, {"text": "a dog", "weight": -1}]}))
    with pytest.raises(NotFound, match="no indexed image with id 'nope'"):
        service.search(parse_json({"query": [{"text": "a dog"}, {"id": "nope"}]}))


def cli_json(capsys: pytest.CaptureFixture[str], index: Path, *args: str) -> dict[str, Any]:
    assert main(["search", *args, "--index", str(index), "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    del response["took_ms"]
    return response


def test_given_rclip_terms_on_the_cli_when_searched_then_weighted_terms_with_the_file_as_an_image(shapes, capsys):
    service, base = shapes
    star = picture(base, "a-large-blue-star")
    got = cli_json(capsys, base / "index", "2:a red circle", "+", str(star), "-", "a", "t-shirt", "2018-2020")
    assert got["query"] == {
        "type": "terms",
        "terms": [
            {"type": "text", "text": "a red circle", "weight": 2.0},
            {"type": "image", "bytes": star.stat().st_size, "weight": 1.0},
            {"type": "text", "text": "a t-shirt 2018-2020", "weight": -1.0},
        ],
    }
    # --image is one more term of weight 1: the same as "+ FILE"
    mixed = cli_json(capsys, base / "index", "a red circle", "--image", str(star))
    assert mixed == cli_json(capsys, base / "index", "a red circle", "+", str(star)) and mixed["hits"]
    # one plain term is the plain query; a lone picture file is an image query
    assert cli_json(capsys, base / "index", "a", "red", "circle")["query"] == {"type": "text", "text": "a red circle"}
    assert cli_json(capsys, base / "index", str(star))["query"] == {"type": "image", "bytes": star.stat().st_size}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a", "+"], "end with a separator"),
        (["a red circle", "+", "a blue square", "--hybrid"], "text queries only"),
        (["0:a red circle"], "weight is 0"),
    ],
)
def test_given_bad_terms_on_the_cli_when_searched_then_exit_2_and_one_line(shapes, capsys, args, message):
    _, base = shapes
    assert main(["search", *args, "--index", str(base / "index")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
