"""`clipsearch copy` throughput: an embedded index into OpenSearch, back, and a re-run that finds all done.

(Not bench/copy.py: as a script its folder comes first on sys.path, and a copy.py there would shadow the
standard library's copy module.)

    scripts/opensearch-local start
    python bench/copy_index.py [--n 100000] [--dim 512] [--batch 500] [--url http://127.0.0.1:9200]

Builds an embedded index of N synthetic unit vectors (model "bench", never loaded), then times
transfer.copy_index, as `clipsearch copy` runs it: embedded -> OpenSearch, OpenSearch -> a new embedded
index, the same copy again (every document already there: skipped by fingerprint), and embedded ->
embedded. docs/s counts documents written (for the re-run: documents read). The OpenSearch index
(copy-bench-...) is deleted at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, rss_mb, table  # noqa: E402

from clipsearch.index.base import Document, VectorIndex  # noqa: E402
from clipsearch.index.embedded import EmbeddedIndex  # noqa: E402
from clipsearch.index.opensearch import OpenSearchIndex  # noqa: E402
from clipsearch.transfer import copy_index  # noqa: E402

HEADERS = ["copy", "N", "dim", "batch", "written", "unchanged", "seconds", "docs/s", "peak RSS MB"]


def build_source(directory: Path, n: int, dim: int) -> EmbeddedIndex:
    index = EmbeddedIndex(directory, model="bench", dim=dim)
    rng = np.random.default_rng(7)
    for start in range(0, n, 5000):
        block = rng.standard_normal((min(5000, n - start), dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index.upsert(
            [
                Document(key=f"/photos/{(start + i) // 1000:04d}/img{start + i:07d}.jpg", vector=v, size=start + i)
                for i, v in enumerate(block)
            ]
        )
    return index


def timed(what: str, source: VectorIndex, dest: VectorIndex, args: argparse.Namespace) -> list[object]:
    started = time.perf_counter()
    summary = copy_index(source, dest, batch=args.batch)
    dest.count()  # OpenSearch: refreshed, so the copy is searchable; part of the time
    seconds = time.perf_counter() - started
    done = summary.copied or summary.unchanged
    row: list[object] = [
        what,
        args.n,
        args.dim,
        args.batch,
        summary.copied,
        summary.unchanged,
        round(seconds, 1),
        done / seconds,
        rss_mb(),
    ]
    print(table(HEADERS, [row]).splitlines()[-1], file=sys.stderr, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--url", default="http://127.0.0.1:9200")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = build_source(Path(tmp) / "source", args.n, args.dim)
        remote = OpenSearchIndex(f"copy-bench-{uuid.uuid4().hex[:8]}", model="bench", dim=args.dim, url=args.url)
        try:
            rows.append(timed("embedded -> opensearch", source, remote, args))
            back = EmbeddedIndex(Path(tmp) / "back", model="bench", dim=args.dim)
            rows.append(timed("opensearch -> embedded", remote, back, args))
            rows.append(timed("embedded -> opensearch, re-run (all there)", source, remote, args))
            local = EmbeddedIndex(Path(tmp) / "local", model="bench", dim=args.dim)
            rows.append(timed("embedded -> embedded", source, local, args))
        finally:
            remote.drop()
            remote.close()
    print(machine())
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
