"""The demo catalogue: generated shape pictures with titles in their file names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from clipsearch.demo.shapes import demo_catalogue, render_alt


def write_catalogue(folder: Path, count: int = 240, seed: int = 7) -> int:
    """Write `count` pictures as NNNN-a-large-red-circle.png (idempotent: same seed, same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for n, (title, image) in enumerate(demo_catalogue(count, seed=seed)):
        path = folder / f"{n:04d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png"
        if not path.exists():
            image.save(path, format="PNG")
        written += 1
    return written


def write_query_picture(path: Path) -> Path:
    """A large yellow star drawn by the other renderer: a picture the index has never seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    render_alt("yellow", "star", "large", rng=np.random.default_rng(5), image_size=200).save(path, format="PNG")
    return path
