"""open_index(): the one factory that picks a VectorIndex backend from one setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clipsearch.errors import ConfigError
from clipsearch.index.base import Document, Hit, IndexInfo, UpsertResult, VectorIndex, doc_id

__all__ = ["Document", "Hit", "IndexInfo", "UpsertResult", "VectorIndex", "doc_id", "open_index", "default_home"]

BACKENDS = ("embedded", "opensearch")


def default_home() -> Path:
    """$CLIPSEARCH_HOME, else the XDG data dir."""
    if os.environ.get("CLIPSEARCH_HOME"):
        return Path(os.environ["CLIPSEARCH_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "clipsearch"


def open_index(
    backend: str = "embedded",
    index: str | None = None,
    model: str | None = None,
    dim: int | None = None,
    **options: Any,
) -> VectorIndex:
    """Open (or create, when model and dim are given) an index.

    embedded: `index` is a directory (default: default_home()/index); where it holds a `current` pointer
    (clipsearch/index/generations.py), the database is in the sub-folder that pointer names.
    opensearch: `index` is the OpenSearch index name; options carry url, auth, engine, m, ef_construction.
    """
    if backend == "embedded":
        from clipsearch.index.embedded import EmbeddedIndex
        from clipsearch.index.generations import resolve

        directory = Path(index).expanduser() if index else default_home() / "index"
        return EmbeddedIndex(resolve(directory), model=model, dim=dim, **options)
    if backend == "opensearch":
        from clipsearch.index.opensearch import OpenSearchIndex

        return OpenSearchIndex(name=index or "clipsearch", model=model, dim=dim, **options)
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
