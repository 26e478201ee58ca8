"""Hybrid ranking: reciprocal rank fusion (RRF) of a lexical and a vector ranking, the same for every backend.

Each side contributes its WINDOW best hits; a hit's fused score is the sum, over the
rankings it appears in, of 1 / (RRF_CONSTANT + rank), rank counted from 1 (Cormack, Clarke and Büttcher,
"Reciprocal rank fusion outperforms Condorcet and individual rank learning methods", SIGIR 2009, which
also gives the constant 60). Fusing here rather than in OpenSearch keeps both backends' answers the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from clipsearch.errors import BadRequest
from clipsearch.index.base import Hit

RRF_CONSTANT = 60
# Each side contributes its WINDOW best hits, for every page alike: a depth that grew with `from` would
# fuse deeper lists for page 2 than for page 1, so the pages would repeat some hits and skip others.
WINDOW = 200


def candidates(k: int, offset: int) -> int:
    """How many hits each side contributes: WINDOW, the same for every page; a page past it is a 400."""
    if offset + k > WINDOW:
        raise BadRequest(f"hybrid ranks the best {WINDOW} pictures: from + k must be at most {WINDOW}")
    return WINDOW


def fuse(vector_hits: Sequence[Hit], lexical_hits: Sequence[Hit], constant: int = RRF_CONSTANT) -> list[Hit]:
    """Both rankings fused by RRF, best first, each hit carrying its fused `rank_score`.

    `score` stays each hit's cosine. Equal fused scores are ordered by cosine, then by id, so both
    backends and repeated runs agree.
    """
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in (vector_hits, lexical_hits):
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (constant + rank)
            first.setdefault(hit.id, hit)
    order = sorted(fused, key=lambda id_: (-fused[id_], -first[id_].score, id_))
    return [dataclasses.replace(first[id_], rank_score=fused[id_]) for id_ in order]
