"""Local ingest: walk folders, skip what is unchanged, decode in threads, encode in batches, upsert.

Each batch is committed on its own, so an interrupted run keeps what it finished and a re-run
picks up the rest (unchanged files are recognised by size and mtime).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clipsearch.encoders import Encoder
from clipsearch.errors import BadImage, BadRequest
from clipsearch.images import is_image_name, load_file
from clipsearch.index.base import Document, VectorIndex, doc_id


@dataclass
class IngestSummary:
    """Counts for one run; skipped lists (path, reason)."""

    seen: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Loaded:
    path: Path
    image: Image.Image | None
    data_hash: str = ""
    width: int = 0
    height: int = 0
    size: int = 0
    mtime: float = 0.0
    error: str = ""


def scan(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Image files under the given folders, recursively, in a stable order, and every file named.

    A file named on its own is always tried, so one that is not an image (an SVG, a HEIC) is reported
    as skipped with its reason instead of being passed over in silence.
    """
    for root in paths:
        root = Path(root).expanduser()
        if root.is_file():
            yield root.resolve()
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if is_image_name(name):
                    yield (Path(dirpath) / name).resolve()


def title_from_path(path: Path) -> str:
    """A readable title from a file name: `2019_pool-party.jpg` -> `2019 pool party`."""
    return re.sub(r"[_\-.]+", " ", path.stem).strip()


def _load(path: Path) -> _Loaded:
    try:
        st = path.stat()
        loaded = load_file(path)
    except (BadImage, OSError) as e:
        return _Loaded(path, None, error=str(e))
    return _Loaded(path, loaded.image, hashlib.sha256(loaded.data).hexdigest(), loaded.width,
                   loaded.height, st.st_size, st.st_mtime)


def index_paths(
    paths: list[str | Path],
    encoder: Encoder,
    index: VectorIndex,
    batch_size: int = 32,
    workers: int = 2,
    on_skip: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Index every image under paths; remove indexed files under those folders that are gone."""
    started = time.perf_counter()
    summary = IngestSummary()
    roots = [Path(p).expanduser().resolve() for p in paths]
    for root in roots:
        if not root.exists():
            raise BadRequest(f"no such file or folder: {root}")
    files = list(scan(roots))
    summary.seen = len(files)
    known: dict[str, tuple[int, float]] = {}
    for root in roots:
        known.update(index.fingerprints(str(root) if root.is_file() else str(root) + os.sep))
    todo = []
    for path in files:
        fp = known.get(str(path))
        try:
            st = path.stat()
        except OSError as e:
            summary.skipped.append((str(path), str(e)))
            continue
        if fp is not None and fp[0] == st.st_size and fp[1] == st.st_mtime:
            summary.unchanged += 1
        else:
            todo.append(path)
    present = {str(p) for p in files}
    gone = [key for key in known if key not in present]
    if gone:
        summary.deleted = index.delete([doc_id("", key) for key in gone])
    if on_plan:
        on_plan(len(todo))

    def skip(path: str, reason: str) -> None:
        summary.skipped.append((path, reason))
        if on_skip:
            on_skip(path, reason)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Decoding runs ahead of the encoder by two batches, so IO and decode overlap the forward.
        pending: list[Future[_Loaded]] = []
        it = iter(todo)
        lookahead = batch_size * 2
        for path in it:
            pending.append(pool.submit(_load, path))
            if len(pending) >= lookahead:
                break
        while pending:
            batch_futures, pending = pending[:batch_size], pending[batch_size:]
            for path in it:
                pending.append(pool.submit(_load, path))
                if len(pending) >= lookahead:
                    break
            loaded = [f.result() for f in batch_futures]
            good = [item for item in loaded if item.image is not None]
            for item in loaded:
                if item.image is None:
                    skip(str(item.path), item.error)
            if good:
                vectors = encoder.encode_images([item.image for item in good if item.image is not None])
                docs = [
                    Document(key=str(item.path), vector=vec, title=title_from_path(item.path),
                             content_hash=item.data_hash, size=item.size, mtime=item.mtime,
                             width=item.width, height=item.height)
                    for item, vec in zip(good, vectors, strict=True)
                ]
                result = index.upsert(docs)
                summary.indexed += result.written
                for id_, reason in result.failed.items():
                    skip(id_, reason)
            if on_progress:
                on_progress(len(loaded))
    summary.seconds = time.perf_counter() - started
    return summary
