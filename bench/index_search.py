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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="512,1024")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    import faiss

    print(f"machine: {machine()}\n")
    rows = []
    for dim in map(int, args.dims.split(",")):
        for n in map(int, args.sizes.split(",")):
            vectors = unit_rows(n, dim, seed=n + dim)
            queries = unit_rows(args.queries, dim, seed=1)
            with tempfile.TemporaryDirectory() as tmp:
                index = EmbeddedIndex(tmp, model="bench", dim=dim)
                ingest_s = fill(index, vectors)
                qi = iter(range(10**9))

                def embedded() -> None:
                    index.search(queries[next(qi) % len(queries)], k=args.k)

                t_emb = timings(embedded, args.queries)
                flat = faiss.IndexFlatIP(dim)
                flat.add(vectors)

                def faiss_flat() -> None:
                    flat.search(queries[next(qi) % len(queries)][None, :], args.k)

                t_faiss = timings(faiss_flat, args.queries)

                def numpy_plain() -> None:
                    s = vectors @ queries[next(qi) % len(queries)]
                    np.argsort(-s)[: args.k]

                t_np = timings(numpy_plain, max(5, args.queries // 5))
                db_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
                index.close()
            rows.append([n, dim, n / ingest_s, median(t_emb) * 1e3, pct(t_emb, 99) * 1e3,
                         median(t_faiss) * 1e3, median(t_np) * 1e3, median(t_emb) / median(t_faiss),
                         dim * 4, db_bytes / n])
            print(f"  done n={n} dim={dim}", file=sys.stderr, flush=True)
            del vectors, flat
    print(table(["vectors", "dim", "ingest vec/s", "embedded p50 ms", "embedded p99 ms", "faiss flat p50 ms",
                 "numpy argsort p50 ms", "embedded/faiss", "RAM B/vec", "disk B/vec"], rows))


if __name__ == "__main__":
    main()
