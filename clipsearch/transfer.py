"""Copy one index's documents and vectors into another, of either backend, without re-encoding anything.

The model is never loaded: vectors travel as they are, so a collection indexed on a laptop can move to
OpenSearch (and back) on a machine that has neither the checkpoint nor a GPU. Both sides must record the
same model and dimension. Documents keep their ids, so a re-run after an interruption overwrites what
the first run wrote (no duplicates) and, by default, skips what the destination already holds with the
same key, size and mtime.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clipsearch.errors import ModelMismatch
from clipsearch.index.base import Document, VectorIndex

__all__ = ["Rekey", "CopySummary", "check_compatible", "copy_index"]


@dataclass(frozen=True)
class Rekey:
    """Local paths under `strip_prefix` become keys in `bucket`: `P/x` -> s3://bucket/x.

    That is the key `aws s3 sync P s3://bucket/` gives the file, and the ingest Lambda ids an object by
    doc_id(bucket, key) (clipsearch/aws/ingest.py), so later S3 events for it update the same document.
    """

    bucket: str
    strip_prefix: str

    def apply(self, doc: Document) -> Document | None:
        """The document under its S3 bucket and key; None when its key is not under strip_prefix."""
        root = self.strip_prefix.rstrip("/") + "/"
        if not doc.key.startswith(root) or len(doc.key) == len(root):
            return None
        return dataclasses.replace(doc, bucket=self.bucket, key=doc.key[len(root) :])


@dataclass
class CopySummary:
    """What a copy did. unchanged: already in the destination with the same key, size and mtime."""

    read: int = 0
    copied: int = 0
    unchanged: int = 0
    outside: int = 0  # not under Rekey.strip_prefix: left out
    outside_example: str = ""
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def docs_per_second(self) -> float:
        return self.copied / self.seconds if self.seconds > 0 else 0.0


def check_compatible(source: VectorIndex, dest: VectorIndex) -> None:
    """Refuse a destination built with another model or dimension: its vectors could not be compared."""
    if (source.model, source.dim) != (dest.model, dest.dim):
        raise ModelMismatch(
            f"the destination holds vectors of model {dest.model!r} (dim {dest.dim}), the source of "
            f"{source.model!r} (dim {source.dim}); copy into another --to-index"
        )


def copy_index(
    source: VectorIndex,
    dest: VectorIndex,
    *,
    rekey: Rekey | None = None,
    batch: int = 500,
    rewrite: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> CopySummary:
    """Stream every document of source into dest, one batch in memory at a time.

    rewrite: write every document, even those dest already holds with the same key, size and mtime.
    on_batch(n): called after each batch of n source documents. A KeyboardInterrupt between batches
    leaves every written batch in dest; the next run skips or overwrites them by id.
    """
    check_compatible(source, dest)
    started = time.perf_counter()
    summary = CopySummary()
    # Read once, before the first write: key -> (size, mtime), as `clipsearch index` uses it. Fingerprints
    # name no bucket, so a destination holding the same key, size and mtime in another bucket counts as
    # having it; --rewrite (rewrite=True) writes every document regardless.
    have = {} if rewrite else dest.fingerprints()
    for docs in source.scan(batch):
        summary.read += len(docs)
        todo: list[Document] = []
        for doc in docs:
            moved = rekey.apply(doc) if rekey is not None else doc
            if moved is None:
                summary.outside += 1
                summary.outside_example = summary.outside_example or doc.key
            elif have.get(moved.key) == (moved.size, moved.mtime):
                summary.unchanged += 1
            else:
                todo.append(moved)
        if todo:
            result = dest.upsert(todo)
            summary.copied += result.written
            summary.failed.update(result.failed)
        if on_batch is not None:
            on_batch(len(docs))
    summary.seconds = time.perf_counter() - started
    return summary
