"""Model migration with no downtime: build the index anew with another model beside the old one, then switch.

The new physical index is built from the original files through the normal ingest pipeline while searches
keep going to the old one; then the index name moves over in one atomic step (an OpenSearch alias, or the
embedded backend's pointer file, see clipsearch/index/generations.py). A running `clipsearch serve` notices
the move and swaps model and index together (clipsearch/follow.py). The old index is kept until drop_old.

A reindex cut short (Ctrl-C, a crash) leaves its new index half built; the next reindex with the same model
resumes it, encoding only the files not yet in it. Only an index never switched to is resumed (generations
and OpenSearchIndex.unfinished): one that was live may hold pictures deleted since.

Documents of S3 objects are not local files: they are re-encoded on AWS (docs/deploy.md), not here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.encoders import Encoder
from clipsearch.errors import BadRequest
from clipsearch.index import generations
from clipsearch.index.base import VectorIndex, doc_id
from clipsearch.ingest import IngestSummary, index_paths

if TYPE_CHECKING:
    from clipsearch.index.opensearch import OpenSearchIndex

__all__ = [
    "ReindexSummary",
    "reindex_embedded",
    "reindex_opensearch",
    "switch_opensearch",
    "originals",
    "require_new_model",
    "SIDE_FILES",
    "OnResume",
]

# What SQLite keeps beside a database in WAL mode, and the ANN cache: deleted with it.
SIDE_FILES = ("-wal", "-shm", "-journal")

# on_resume(new index's name, files already encoded into it, files to carry over in all)
OnResume = Callable[[str, int, int], None]


@dataclass
class ReindexSummary:
    """What a reindex did: the models and physical indexes before and after, and what was left behind."""

    old_model: str
    new_model: str
    old: str
    new: str
    ingest: IngestSummary
    gone: list[str] = field(default_factory=list)  # indexed files no longer on disk: not carried over
    dropped: list[str] = field(default_factory=list)


def require_new_model(current: str, new: str) -> None:
    """BadRequest when the index already uses the model asked for."""
    if current == new:
        raise BadRequest(f"the index is already built with model {new!r}; nothing to reindex")


def originals(index: VectorIndex, new_model: str) -> tuple[list[str], list[str]]:
    """The files the old index was built from: (those on disk, those gone). BadRequest when there is nothing
    to do (same model) or when some documents are S3 objects, which only AWS can re-encode."""
    require_new_model(index.model, new_model)
    keys = sorted(index.fingerprints())
    remote = [k for k in keys if not os.path.isabs(k)]
    if remote:
        raise BadRequest(
            f"{len(remote)} of the index's {len(keys)} images are S3 objects (e.g. {remote[0]!r}); reindex them "
            "on AWS with a second endpoint and a backfill into the new index (docs/deploy.md, Changing the model)"
        )
    present = [k for k in keys if os.path.lexists(k)]
    return present, sorted(set(keys) - set(present))


def _resume(new: VectorIndex, name: str, keys: list[str], on_resume: OnResume | None) -> None:
    """Ready a half-built new index for the rest of its build: drop what it holds of files that are no longer
    to carry over (forgotten or deleted since it began), and say how much is done.

    index_paths then skips each file already in it with the same size and mtime, and encodes the rest."""
    held = set(new.fingerprints())
    wanted = set(keys)
    stale = held - wanted
    if stale:
        new.delete([doc_id("", key) for key in sorted(stale)])
    if on_resume:
        on_resume(name, len(held & wanted), len(wanted))


def _build(keys: list[str], encoder: Encoder, index: VectorIndex, **ingest: Any) -> IngestSummary:
    # Each file is named on its own: a folder would also take in pictures the old index never had.
    return index_paths(list(keys), encoder, index, **ingest) if keys else IngestSummary()


def reindex_embedded(
    root: Path,
    encoder: Encoder,
    open_at: Callable[[Path, str | None, int | None], VectorIndex],
    drop_old: bool = False,
    on_resume: OnResume | None = None,
    **ingest: Any,
) -> ReindexSummary:
    """Build `<root>/index-<slug>-<n>` with encoder from the current index's files, then point root at it.

    open_at(folder, model, dim) opens (model given: creates) the database in folder. The caller holds the
    index's writer lock, so no `clipsearch index` writes to the old one meanwhile and is lost.
    A generation an earlier reindex with this model began and never switched to is resumed (on_resume).
    """
    old_dir = generations.resolve(root)
    old = open_at(old_dir, None, None)
    try:
        keys, gone = originals(old, encoder.model)
        old_model = old.model
    finally:
        old.close()
    new_dir = generations.unfinished(root, encoder.model)
    resumed = new_dir is not None
    if new_dir is None:
        new_dir = generations.next_generation(root, encoder.model)
        generations.begin(new_dir)
    new = open_at(new_dir, encoder.model, encoder.dim)
    try:
        if resumed:
            _resume(new, new_dir.name, keys, on_resume)
        built = _build(keys, encoder, new, **ingest)
    finally:
        new.close()
    generations.switch(root, new_dir)
    summary = ReindexSummary(old_model, encoder.model, str(old_dir), str(new_dir), built, gone)
    if drop_old and not built.skipped:  # a file unreadable now keeps its old vector in the old index
        summary.dropped = drop_embedded(root, old_dir)
    return summary


def drop_embedded(root: Path, old_dir: Path) -> list[str]:
    """Delete the old database: a generation folder whole, or a plain index's files (with SQLite's side files).

    A server still reading it keeps its open files (POSIX unlink) until it follows the pointer.
    """
    if old_dir != root:
        shutil.rmtree(old_dir, ignore_errors=True)
        return [str(old_dir)]
    from clipsearch.index.ann import FILE_NAME as ANN_FILE
    from clipsearch.index.embedded import DB_NAME

    dropped = []
    for name in (DB_NAME, *(DB_NAME + side for side in SIDE_FILES), ANN_FILE):
        path = root / name
        if path.exists():
            path.unlink()
            dropped.append(str(path))
    return dropped


def reindex_opensearch(
    old: OpenSearchIndex,
    encoder: Encoder,
    open_physical: Callable[[str], OpenSearchIndex],
    drop_old: bool = False,
    on_resume: OnResume | None = None,
    **ingest: Any,
) -> ReindexSummary:
    """Build `NAME-<slug>-<n>` for the OpenSearchIndex old (opened by its name), then move the alias to it.

    open_physical(physical) creates (or opens) that index for encoder's model without an alias. The first
    reindex of a plain index removes it in the switch itself (an alias cannot share its name), so drop_old is
    moot then. A physical index an earlier reindex with this model began and never switched to is resumed.
    """
    keys, gone = originals(old, encoder.model)
    before = old.targets()
    physical = old.unfinished(encoder.model)
    resumed = physical is not None
    physical = physical or old.next_physical(encoder.model)
    new = open_physical(physical)
    try:
        if resumed:
            new.refresh()  # what the run cut short wrote last is searchable, so it is skipped, not encoded again
            _resume(new, physical, keys, on_resume)
        built = _build(keys, encoder, new, **ingest)
    finally:
        new.close()
    summary = ReindexSummary(old.model, encoder.model, ",".join(before), physical, built, gone)
    # A file unreadable now (skipped) keeps its old vector in the old index: never drop it then.
    summary.dropped = switch_opensearch(old, physical, encoder.model, drop_old and not built.skipped)
    return summary


def switch_opensearch(old: OpenSearchIndex, physical: str, model: str, drop_old: bool = False) -> list[str]:
    """Move old's alias to physical, an index built for it (by `--prepare` and a backfill on AWS) with model.

    Returns the physical indexes deleted: a plain index always (the switch removes it), the old one on drop_old.
    """
    from clipsearch.index.opensearch import OpenSearchIndex

    target = OpenSearchIndex(physical, client=old.client)
    if target.built_for != old.name or target.model != model:
        raise BadRequest(
            f"{physical!r} was not built for {old.name!r} with model {model!r} "
            f"(it records {target.built_for!r}, {target.model!r})"
        )
    target.refresh()  # every document searchable before the first query reaches it
    target.finish()  # before the alias moves: cut short in between, it is left behind, never resumed
    plain = old.name in old.targets()
    left = old.switch_alias(physical)
    if plain:
        return [old.name]
    if drop_old:
        old.delete_physical(left)
        return left
    return []
