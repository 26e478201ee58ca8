"""The near-duplicate candidate search (multi-index hashing) and the perceptual hash, against plain baselines."""

from __future__ import annotations

import numpy as np
from PIL import Image
from support import photos

from clipsearch.duplicates import candidate_pairs
from clipsearch.perceptual import hamming, parse_hash, perceptual_hash


def test_given_random_and_planted_hashes_when_candidates_are_found_then_they_are_exactly_the_close_pairs() -> None:
    rng = np.random.default_rng(3)
    values = [int(v) for v in rng.integers(0, 2**63, 1500, dtype=np.int64)]
    for distance in range(0, 16):  # planted pairs at every distance around the threshold
        flips = rng.choice(64, distance, replace=False)
        values.append(values[distance] ^ sum(1 << int(b) for b in flips))
    array = np.array(values, dtype=np.uint64)

    found = candidate_pairs(array, 12)

    brute = {
        (i, j) for i in range(len(values)) for j in range(i + 1, len(values)) if hamming(values[i], values[j]) <= 12
    }
    assert found == brute and len(brute) >= 13


def test_given_a_photo_when_it_is_hashed_then_a_resized_copy_is_close_and_a_mirrored_one_is_far() -> None:
    img = photos.scene(photos.subject(3), 1003)

    original = parse_hash(perceptual_hash(img))
    resized = parse_hash(perceptual_hash(img.resize((320, 240), Image.Resampling.LANCZOS)))
    mirrored = parse_hash(perceptual_hash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))

    assert len(perceptual_hash(img)) == 16
    assert hamming(original, resized) <= 2 and hamming(original, mirrored) > 12
