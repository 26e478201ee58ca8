"""Weighted query terms (CONTRACT §7): parsed from a JSON `query` list or from the CLI's rclip-style
arguments, and combined into one query vector.

The query vector is the normalised weighted sum of the terms' unit vectors, so `"dog" + 0.5 * picture`
leans towards the picture and a negative weight pushes what a term describes down the ranking.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.errors import BadRequest

MAX_TERMS = 10
MAX_WEIGHT = 100.0
TERM_KINDS = ("text", "image", "id")
# The CLI's "W:term": a plain decimal weight before the first colon ("2:golden retriever", "0.5:./a.jpg").
_WEIGHTED = re.compile(r"(\d+(?:\.\d*)?|\.\d+):(.+)", re.DOTALL)
OPERATORS = {"+": 1.0, "-": -1.0}


@dataclass(frozen=True)
class Term:
    """One weighted term: a text, an image's bytes, or the id of an indexed image."""

    kind: str
    weight: float = 1.0
    text: str | None = None
    image: bytes | None = None
    id: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.kind == "text":
            return {"type": "text", "text": self.text, "weight": self.weight}
        if self.kind == "image":
            return {"type": "image", "bytes": len(self.image or b""), "weight": self.weight}
        return {"type": "id", "id": self.id, "weight": self.weight}


def weight_value(value: Any, where: str) -> float:
    """A term's weight: a finite, non-zero number between -MAX_WEIGHT and MAX_WEIGHT."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where}.weight must be a number")
    try:
        weight = float(value)
    except OverflowError:  # an integer too large for a float
        raise BadRequest(f"{where}.weight must be a finite number between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}") from None
    if not math.isfinite(weight) or not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise BadRequest(f"{where}.weight must be a finite number between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    if weight == 0:
        raise BadRequest(f"{where}.weight is 0, which leaves the term out: drop the term or give it a weight")
    return weight


def parse_terms(value: Any, text: Any) -> tuple[Term, ...]:
    """A JSON `query` list; text(value, where) checks and trims a text term as a plain text query's."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TERMS:
        raise BadRequest(
            f'query must be a list of 1 to {MAX_TERMS} terms like {{"text": "a dog", "weight": 1}}, '
            '{"image": "<base64>"} or {"id": "<hit id>", "weight": -0.5}'
        )
    return tuple(_term(item, f"query[{n}]", text) for n, item in enumerate(value))


def _term(item: Any, where: str, text: Any) -> Term:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with one of text, image or id, and an optional weight")
    unknown = set(item) - {*TERM_KINDS, "weight"}
    if unknown:
        raise BadRequest(f"{where} has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    given = [f for f in TERM_KINDS if item.get(f) is not None]
    if len(given) != 1:
        raise BadRequest(f'{where} must have exactly one of "text", "image" or "id"')
    weight = weight_value(item["weight"], where) if item.get("weight") is not None else 1.0
    kind, value = given[0], item[given[0]]
    if kind == "text":
        return Term("text", weight, text=text(value, f"{where}.text"))
    if kind == "id":
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{where}.id must be a non-empty string")
        return Term("id", weight, id=value)
    return Term("image", weight, image=base64_image(value, f"{where}.image"))


def base64_image(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


def combine(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The normalised weighted sum of unit vectors, as float32; BadRequest when the terms cancel out.

    One term of positive weight gives its own vector unchanged, so it ranks exactly as the plain query.
    """
    if len(vectors) == 1 and weights[0] > 0:
        return np.asarray(vectors[0], dtype=np.float32)
    total = np.zeros(len(vectors[0]), dtype=np.float64)
    for vector, weight in zip(vectors, weights, strict=True):
        v = np.asarray(vector, dtype=np.float64)
        total += weight * v / (np.linalg.norm(v) or 1.0)
    norm = float(np.linalg.norm(total))
    # Below 1e-6 the direction is rounding noise: the weighted terms cancel out.
    if not math.isfinite(norm) or norm < 1e-6:
        raise BadRequest("the weighted terms cancel out (their sum is the zero vector); change a weight or a term")
    return (total / norm).astype(np.float32)


def _names_a_file(text: str) -> bool:
    """Whether a term names an existing file; a text no file could have as its name (too long, NUL) does not."""
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def parse_argv(words: Sequence[str], is_image: Any = None) -> list[tuple[str, float, str]]:
    """The CLI's terms in rclip's syntax: (kind "text"|"image", weight, text or path) for each term.

    Only a `+` or `-` standing alone separates terms, so "t-shirt" and "2018-2020" stay text; the words
    between two separators form one term ("golden retriever"). "W:term" gives the weight W, signed by
    the separator before it; a term that names an existing file is an image (is_image decides).
    """
    is_image = is_image or _names_a_file
    out: list[tuple[str, float, str]] = []
    sign, pending = 1.0, False
    current: list[str] = []

    def close() -> None:
        text = " ".join(current).strip()
        if not text:
            raise BadRequest("an empty term: put a text or an image file between each + and -")
        weight, body = 1.0, text
        match = _WEIGHTED.fullmatch(text)
        if match:
            weight, body = float(match.group(1)), match.group(2).strip()
            if not body:
                raise BadRequest(f"the term {text!r} has a weight but nothing to search for")
            weight_value(weight, f"the term {text!r}")
        out.append(("image" if is_image(body) else "text", sign * weight, body))

    for word in words:
        if word in OPERATORS:
            if current:
                close()
            elif pending:
                raise BadRequest(f"two separators in a row before {word!r}: put a term between them")
            sign, pending, current = OPERATORS[word], True, []
            continue
        current.append(word)
        pending = False
    if current:
        close()
    elif pending:
        raise BadRequest("the terms end with a separator: put a term after the last + or -")
    if len(out) > MAX_TERMS:
        raise BadRequest(f"at most {MAX_TERMS} terms")
    return out
