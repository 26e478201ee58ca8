"""Embedded index query latency and memory vs plain numpy and FAISS IndexFlatIP, on random unit vectors.

    python bench/index_search.py [--sizes 10000,100000,1000000] [--dims 512,1024] [--queries 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, pct, table, timings  # noqa: E402

from clipsearch.index.base import Document  # noqa: E402
from clipsearch.index.embedded import EmbeddedIndex  # noqa: E402


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def fill(index: EmbeddedIndex, vectors: np.ndarray, batch: int = 20_000) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        index.upsert([Document(key=f"img/{start + i:08d}.jpg", vector=v)
                      for i, v in enumerate(vectors[start:start + batch])])
    return time.perf_counter() - started


def measure(n: int, dim: int, n_queries: int, k: int) -> list[object]:
    """One row: ingest rate, embedded / faiss / numpy latencies and memory for n vectors of dim."""
    import faiss

    vectors = unit_rows(n, dim, seed=n + dim)
    queries = unit_rows(n_queries, dim, seed=1)
    cycle = iter(range(10**9))

    def query() -> np.ndarray:
        return queries[next(cycle) % len(queries)]

    with tempfile.TemporaryDirectory() as tmp:
        index = EmbeddedIndex(tmp, model="bench", dim=dim)
        ingest_s = fill(index, vectors)
        t_emb = timings(lambda: index.search(query(), k=k), n_queries)
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        t_faiss = timings(lambda: flat.search(query()[None, :], k), n_queries)
        t_np = timings(lambda: np.argsort(-(vectors @ query()))[:k], max(5, n_queries // 5))
        db_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
        index.close()
    print(f"  done n={n} dim={dim}", file=sys.stderr, flush=True)
    return [n, dim, n / ingest_s, median(t_emb) * 1e3, pct(t_emb, 99) * 1e3, median(t_faiss) * 1e3,
            median(t_np) * 1e3, median(t_emb) / median(t_faiss), dim * 4, db_bytes / n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="512,1024")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    print(f"machine: {machine()}\n")
    rows = [measure(n, dim, args.queries, args.k) for dim in map(int, args.dims.split(","))
            for n in map(int, args.sizes.split(","))]
    print(table(["vectors", "dim", "ingest vec/s", "embedded p50 ms", "embedded p99 ms", "faiss flat p50 ms",
                 "numpy argsort p50 ms", "embedded/faiss", "RAM B/vec", "disk B/vec"], rows))


if __name__ == "__main__":
    main()
