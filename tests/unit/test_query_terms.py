"""Weighted query terms and hybrid mode: parsing (JSON, query string, CLI arguments), combining, fusing."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from clipsearch.errors import BadRequest
from clipsearch.fusion import RRF_CONSTANT, WINDOW, candidates, fuse
from clipsearch.index.base import Hit
from clipsearch.search import parse_json, parse_params
from clipsearch.terms import Term, combine, parse_argv

PNG = base64.b64encode(b"\x89PNG not really").decode()


def test_given_a_query_list_when_parsed_then_terms_with_default_weights_and_described():
    req = parse_json(
        {"query": [{"text": " a dog "}, {"image": PNG, "weight": 0.5}, {"id": "abc", "weight": -2}], "k": 3}
    )
    assert req.kind == "terms" and req.k == 3
    assert req.terms == (
        Term("text", 1.0, text="a dog"),
        Term("image", 0.5, image=base64.b64decode(PNG)),
        Term("id", -2.0, id="abc"),
    )
    assert req.describe() == {
        "type": "terms",
        "terms": [
            {"type": "text", "text": "a dog", "weight": 1.0},
            {"type": "image", "bytes": len(base64.b64decode(PNG)), "weight": 0.5},
            {"type": "id", "id": "abc", "weight": -2.0},
        ],
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"query": []}, "1 to 10 terms"),
        ({"query": [{"text": "a"}] * 11}, "1 to 10 terms"),
        ({"query": {"text": "a"}}, "list"),
        ({"query": ["a dog"]}, r"query\[0\] must be an object"),
        ({"query": [{"text": "a", "id": "b"}]}, "exactly one"),
        ({"query": [{"weight": 2}]}, "exactly one"),
        ({"query": [{"text": "a", "colour": "red"}]}, "unknown field"),
        ({"query": [{"query": [{"text": "a"}]}]}, "unknown field"),
        ({"query": [{"text": "a", "weight": float("nan")}]}, "finite"),
        ({"query": [{"text": "a", "weight": float("inf")}]}, "finite"),
        ({"query": [{"text": "a", "weight": 1e6}]}, "between -100 and 100"),
        ({"query": [{"text": "a", "weight": 0}]}, "weight is 0"),
        ({"query": [{"text": "a", "weight": "2"}]}, "must be a number"),
        ({"query": [{"text": "a", "weight": True}]}, "must be a number"),
        ({"query": [{"text": "  "}]}, r"query\[0\].text is empty"),
        ({"query": [{"text": 5}]}, r"query\[0\].text must be a string"),
        ({"query": [{"image": "***"}]}, r"query\[0\].image is not valid base64"),
        ({"query": [{"id": ""}]}, r"query\[0\].id must be a non-empty string"),
        ({"query": [{"text": "a"}], "text": "b"}, "exactly one"),
        ({"query": [{"text": "a"}], "mode": "hybrid"}, "text queries only"),
        ({"image": PNG, "mode": "hybrid"}, "text queries only"),
        ({"id": "abc", "mode": "hybrid"}, "text queries only"),
        ({"text": "a", "mode": "fuzzy"}, "mode must be one of vector, hybrid"),
        ({"text": "a", "mode": 1}, "mode must be one of"),
    ],
)
def test_given_an_off_contract_query_or_mode_when_parsed_then_bad_request_naming_it(payload, message):
    with pytest.raises(BadRequest, match=message):
        parse_json(payload)


def test_given_mode_hybrid_in_body_or_query_string_when_parsed_then_the_same_request():
    posted = parse_json({"text": "lighthouse", "mode": "hybrid"})
    assert posted == parse_params({"q": "lighthouse", "mode": "hybrid"})
    assert posted.mode == "hybrid" and posted.describe() == {"type": "text", "text": "lighthouse", "mode": "hybrid"}
    assert parse_json({"text": "lighthouse", "mode": "vector"}) == parse_json({"text": "lighthouse"})
    with pytest.raises(BadRequest, match="mode"):
        parse_params({"q": "a", "mode": "semantic"})


def test_given_one_positive_term_when_combined_then_its_vector_unchanged():
    v = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    assert combine([v], [3.0]).tobytes() == v.tobytes()


def test_given_weighted_terms_when_combined_then_the_normalised_weighted_sum():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(combine([a, b], [1.0, -1.0]), np.array([1, -1]) / np.sqrt(2), atol=1e-7)
    np.testing.assert_allclose(combine([a, b], [3.0, 1.0]), np.array([3, 1]) / np.sqrt(10), atol=1e-7)
    np.testing.assert_allclose(combine([a], [-0.5]), -a, atol=1e-7)


def test_given_terms_that_cancel_out_when_combined_then_bad_request_saying_so():
    a = np.array([0.6, 0.8], np.float32)
    with pytest.raises(BadRequest, match="cancel out"):
        combine([a, a], [1.0, -1.0])


def test_given_rclip_syntax_when_parsed_then_terms_weights_and_images():
    files = {"./pool.jpg"}
    got = parse_argv(["2:golden retriever", "+", "./pool.jpg", "-", "fruit"], files.__contains__)
    assert got == [("text", 2.0, "golden retriever"), ("image", 1.0, "./pool.jpg"), ("text", -1.0, "fruit")]
    assert parse_argv(["-", "0.5:./pool.jpg"], files.__contains__) == [("image", -0.5, "./pool.jpg")]


def test_given_hyphens_inside_words_when_parsed_then_they_stay_text():
    assert parse_argv(["t-shirt", "2018-2020"], lambda _: False) == [("text", 1.0, "t-shirt 2018-2020")]
    assert parse_argv(["a+b", "x:y"], lambda _: False) == [("text", 1.0, "a+b x:y")]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["a", "+"], "end with a separator"),
        (["a", "+", "-", "b"], "two separators in a row"),
        (["0:a"], "weight is 0"),
        (["500:a"], "between -100 and 100"),
        (["a", *["+", "b"] * 10], "at most 10 terms"),
    ],
)
def test_given_bad_cli_terms_when_parsed_then_one_clear_line(words, message):
    with pytest.raises(BadRequest, match=message) as info:
        parse_argv(words, lambda _: False)
    assert "\n" not in str(info.value)


def hit(id_: str, score: float) -> Hit:
    return Hit(id=id_, key=f"{id_}.jpg", score=score)


def test_given_two_rankings_when_fused_then_rrf_sums_reciprocal_ranks_and_keeps_the_cosine():
    vector = [hit("a", 0.9), hit("b", 0.8), hit("c", 0.7)]
    lexical = [hit("c", 0.7), hit("d", 0.1)]
    fused = fuse(vector, lexical)
    assert [h.id for h in fused] == ["c", "a", "b", "d"]
    assert fused[0].rank_score == pytest.approx(1 / (RRF_CONSTANT + 3) + 1 / (RRF_CONSTANT + 1))
    assert fused[1].rank_score == pytest.approx(1 / (RRF_CONSTANT + 1))
    assert [h.score for h in fused] == [0.7, 0.9, 0.8, 0.1]  # score stays the cosine
    # equal fused scores ("b" and "d" are both second on one side; "x" and "y" both first): by cosine
    tied = fuse([hit("x", 0.2)], [hit("y", 0.5)])
    assert [h.id for h in tied] == ["y", "x"] and tied[0].rank_score == tied[1].rank_score


def test_given_any_page_when_candidates_counted_then_the_same_window_for_every_page():
    assert candidates(10, 0) == candidates(30, 40) == candidates(100, 100) == WINDOW


def test_given_a_text_no_file_could_be_named_when_parsed_from_the_command_line_then_it_is_text():
    # 100 KB (past NAME_MAX) and a NUL: os.stat raises instead of answering "no such file".
    for text in ["a red circle " * 8000, "nul\x00byte"]:
        assert parse_argv([text]) == [("text", 1.0, text.strip())]
