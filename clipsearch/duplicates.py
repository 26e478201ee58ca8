"""Duplicate pictures in two tiers (CONTRACT §7): exact (the same bytes) and near (the same picture).

exact: documents sharing a content hash (the sha256 of the file), grouped by the backend (SQL GROUP BY, a
terms aggregation). near: the same picture re-encoded, resized or lightly cropped. Candidates come from the
perceptual hashes (clipsearch/perceptual.py) by multi-index hashing: the 64 bits are cut into 4 bands of 16,
and two hashes within NEAR_HAMMING bits agree to within NEAR_HAMMING // 4 bits on at least one band (the
pigeonhole principle), so probing each band's neighbours within that radius finds every such pair without
comparing all pairs. A candidate pair counts only when the CLIP vectors agree too (cosine >= NEAR_COSINE),
so two pictures of the same subject whose hashes happen to be close are not called duplicates. Near groups
are the connected components of the confirmed pairs; exact copies enter the near scan as one picture.
Thresholds and the measurement behind them: docs/duplicates.md.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.errors import BadRequest
from clipsearch.index.base import Document, HashScannable, Hit, VectorIndex
from clipsearch.perceptual import HASH_BITS, parse_hash
from clipsearch.search import _int_field

KINDS = ("exact", "near", "all")
DEFAULT_LIMIT = 50
# A page is bounded three ways, so it fits a Lambda's 6 MB response ("Lambda quotas": invocation payload)
# and is built well inside API Gateway's 29 s: at most MAX_LIMIT groups, MAX_GROUP_HITS hits in each (a
# group's `count` says how many it has), and no group is added once the hits so far are over PAGE_BYTES.
MAX_LIMIT = 200
MAX_GROUP_HITS = 50
PAGE_BYTES = 4 * 1024 * 1024
MAX_FROM = 10_000
# Chosen by `bench/duplicates.py quality` (docs/duplicates.md): re-encoded and resized copies are within 2
# bits, 5% crops within 20 (median 10); pictures of the same subject drawn again, 10 or more. At 12 bits and
# a cosine of 0.80, 94% of the edited copies were found and 1 of 168 look-alike pairs was taken for one.
NEAR_HAMMING = 12
NEAR_COSINE = 0.80
_BANDS = 4
_BAND_BITS = HASH_BITS // _BANDS
_PROBE_CHUNK = 2048  # documents probed at once: bounds the (docs x neighbours) arrays


@dataclass(frozen=True)
class DuplicatesRequest:
    kind: str = "all"
    limit: int = DEFAULT_LIMIT
    offset: int = 0


@dataclass(frozen=True)
class Group:
    """One group before display: its kind, how many documents it has, and up to MAX_GROUP_HITS of their ids.

    tiebreak orders groups of the same size and kind the same way on every backend.
    """

    kind: str
    count: int
    ids: tuple[str, ...]
    tiebreak: str


def parse_params(params: Mapping[str, str]) -> DuplicatesRequest:
    """GET /duplicates?kind=exact|near|all&limit=50&from=0; BadRequest on anything else."""
    unknown = set(params) - {"kind", "limit", "from"}
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    kind = params.get("kind", "all")
    if kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}")
    limit = _int_field("limit", params["limit"], 1, MAX_LIMIT) if "limit" in params else DEFAULT_LIMIT
    offset = _int_field("from", params["from"], 0, MAX_FROM) if "from" in params else 0
    return DuplicatesRequest(kind, limit, offset)


def scannable(index: VectorIndex) -> HashScannable:
    """The index as the duplicate scan uses it; BadRequest for a backend without the scan's queries."""
    if not isinstance(index, HashScannable):
        raise BadRequest(f"the {type(index).__name__} backend cannot list duplicates")
    return index


def find_groups(index: VectorIndex, kind: str = "all") -> list[Group]:
    """Every duplicate group of the index, largest first (then exact before near)."""
    scan = scannable(index)
    groups: list[Group] = []
    if kind in ("exact", "all"):
        groups.extend(Group("exact", count, (), content_hash) for content_hash, count in scan.exact_groups())
    if kind in ("near", "all"):
        groups.extend(near_groups(scan))
    groups.sort(key=lambda g: (-g.count, g.kind != "exact", g.tiebreak))
    return groups


def near_groups(scan: HashScannable) -> list[Group]:
    """Pictures whose perceptual hashes are close and whose vectors agree, as connected components."""
    # One picture per content hash: exact copies are the exact tier's, and would only repeat each pair.
    picked: dict[str, tuple[str, int]] = {}
    for id_, content_hash, phash in scan.perceptual_hashes():
        try:
            value = parse_hash(phash)
        except ValueError:
            continue  # not a hash this code wrote: left out rather than matched wrongly
        key = content_hash or id_
        if key not in picked or id_ < picked[key][0]:
            picked[key] = (id_, value)
    ids = sorted(i for i, _ in picked.values())
    hashes = {i: v for i, v in picked.values()}
    # Equal hashes are probed once (a thousand dark pocket shots would otherwise make a million pairs): the
    # pictures sharing one are paired with its first, and pairs across hashes go through those firsts.
    unique, first, inverse = np.unique(
        np.array([hashes[i] for i in ids], dtype=np.uint64), return_index=True, return_inverse=True
    )
    pairs = {(int(first[u]), int(first[v])) for u, v in candidate_pairs(unique, NEAR_HAMMING)}
    pairs.update((int(first[u]), i) for i, u in enumerate(inverse.tolist()) if i != first[u])
    if not pairs:
        return []
    docs = scan.documents([ids[i] for i in sorted({i for pair in pairs for i in pair})])
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = docs.get(ids[i]), docs.get(ids[j])
        if a is not None and b is not None and cosine(a.vector, b.vector) >= NEAR_COSINE:
            parent[root(i)] = root(j)
    components: dict[int, list[str]] = {}
    for i in sorted({i for pair in pairs for i in pair}):
        components.setdefault(root(i), []).append(ids[i])
    return [
        Group("near", len(members), tuple(members[:MAX_GROUP_HITS]), members[0])
        for members in components.values()
        if len(members) > 1
    ]


def candidate_pairs(values: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) of the 64-bit values within max_distance bits, by multi-index hashing.

    Per band: a table of where each 16-bit value's documents sit (a counting sort), then every document's
    neighbours within the radius are looked up in it and checked on all 64 bits, all in numpy.
    """
    radius = max_distance // _BANDS
    masks = np.array(
        [sum(1 << b for b in bits) for r in range(radius + 1) for bits in itertools.combinations(range(_BAND_BITS), r)],
        dtype=np.int64,
    )
    n = len(values)
    found: list[np.ndarray] = []
    for band in range(_BANDS):
        keys = ((values >> np.uint64(band * _BAND_BITS)) & np.uint64((1 << _BAND_BITS) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=1 << _BAND_BITS)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for first in range(0, n, _PROBE_CHUNK):
            probes = keys[first : first + _PROBE_CHUNK, None] ^ masks[None, :]
            sizes = counts[probes].reshape(-1)
            if not sizes.any():
                continue
            # Expand each (document, probe) into the documents of the probed bucket.
            left = np.repeat(np.arange(probes.size) // len(masks) + first, sizes)
            offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            right = order[np.repeat(starts[probes].reshape(-1), sizes) + offsets]
            keep = left < right
            left, right = left[keep], right[keep]
            close = _popcount(values[left] ^ values[right]) <= max_distance
            found.append(left[close] * n + right[close])
    if not found:
        return set()
    pairs = np.unique(np.concatenate(found))  # a pair close in several bands is found in each
    return set(zip((pairs // n).tolist(), (pairs % n).tolist(), strict=True))


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (a byte table: np.bitwise_count needs numpy 2.0, older layers may lack it)."""
    return _BYTE_BITS[words.astype(np.uint64).view(np.uint8)].reshape(-1, 8).sum(axis=1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two stored vectors (unit vectors already; normalised again so a drifted one cannot pass)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


def _hit(doc: Document, id_: str, score: float) -> Hit:
    return Hit(
        id=id_,
        key=doc.key,
        score=max(-1.0, min(1.0, score)),
        title=doc.title,
        bucket=doc.bucket,
        width=doc.width,
        height=doc.height,
        taken_at=doc.taken_at,
        taken_offset=doc.taken_offset,
    )


def group_hits(docs: dict[str, Document], ids: list[str]) -> list[Hit]:
    """A group's hits: the largest picture first (then by key), each scored by its cosine to the first."""
    present = sorted((i for i in ids if i in docs), key=lambda i: (-docs[i].width * docs[i].height, docs[i].key))
    if not present:
        return []
    first = docs[present[0]].vector
    return [_hit(docs[i], i, cosine(first, docs[i].vector)) for i in present]


def duplicates(
    index: VectorIndex, request: DuplicatesRequest, shape: Callable[[Hit], dict[str, Any]]
) -> dict[str, Any]:
    """The GET /duplicates response: one page of groups; shape(hit) writes a hit as the REST contract does."""
    started = time.perf_counter()
    scan = scannable(index)
    groups = find_groups(index, request.kind)
    page = groups[request.offset : request.offset + request.limit]
    exact = [g.tiebreak for g in page if g.kind == "exact"]
    members = scan.members(exact, MAX_GROUP_HITS) if exact else {}
    ids = {g.tiebreak: list(members.get(g.tiebreak, ())) if g.kind == "exact" else list(g.ids) for g in page}
    docs = scan.documents([i for group_ids in ids.values() for i in group_ids])
    out: list[dict[str, Any]] = []
    size = consumed = 0
    for group in page:
        if size > PAGE_BYTES:
            break  # the rest of the page comes with the next one (next_from)
        consumed += 1
        hits = [shape(h) for h in group_hits(docs, ids[group.tiebreak])]
        if len(hits) < 2:
            continue  # deleted since the scan: no longer a group
        size += len(json.dumps(hits, ensure_ascii=False).encode())
        out.append({"kind": group.kind, "count": group.count, "hits": hits})
    next_from = request.offset + consumed
    return {
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
        "groups": out,
        # None at the end, and past MAX_FROM: a page that `from` could not ask for is not offered.
        "next_from": next_from if next_from < len(groups) and next_from <= MAX_FROM else None,
    }
