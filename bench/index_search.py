"""Embedded index query latency and memory vs plain numpy and FAISS IndexFlatIP, and the opt-in approximate
mode's recall and latency, on synthetic unit vectors.

    python bench/index_search.py [--sizes 10000,100000,1000000] [--dims 512,1024] [--queries 50]
                                 [--data random,clustered] [--approx]

Data: `random` is uniform on the sphere (no structure: the worst case for any approximate index);
`clustered` imitates real embeddings (clusters in a 128-dim latent space with a power-law spectrum,
plus isotropic noise; nearest-neighbour cosine ~0.8 as for CLIP image-image pairs).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, pct, rss_mb, table, timings  # noqa: E402

from clipsearch.index.ann import PARALLEL_SCAN  # noqa: E402
from clipsearch.index.base import Document  # noqa: E402
from clipsearch.index.embedded import EmbeddedIndex  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def random_rows(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32))


def clustered_rows(
    n: int, dim: int, seed: int, clusters: int, spread: float = 0.9, latent: int = 128, noise: float = 0.15
) -> np.ndarray:
    """Points around shared centres in a low-dimensional latent space, as real embeddings are."""
    base = np.random.default_rng(1234)  # the structure is shared by data and queries
    latent = min(latent, dim)
    scale = np.arange(1, latent + 1, dtype=np.float32) ** -0.5
    basis = np.linalg.qr(base.standard_normal((dim, latent)).astype(np.float32))[0]
    centres = unit((base.standard_normal((clusters, latent), dtype=np.float32) * scale) @ basis.T)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        offset = unit((rng.standard_normal((m, latent), dtype=np.float32) * scale) @ basis.T)
        offset += rng.standard_normal((m, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[start : start + m] = unit(centres[rng.integers(0, clusters, m)] + spread * offset)
    return out


def make(kind: str, n: int, dim: int, seed: int, collection: int) -> np.ndarray:
    """n rows; for clustered data, from the structure of a collection of that size (n // 200 clusters)."""
    if kind == "random":
        return random_rows(n, dim, seed)
    return clustered_rows(n, dim, seed, clusters=max(16, collection // 200))


def fill(index: EmbeddedIndex, vectors: np.ndarray, batch: int = 20_000) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        index.upsert(
            [
                Document(key=f"img/{(start + i) % 10}/{start + i:08d}.jpg", vector=v)
                for i, v in enumerate(vectors[start : start + batch])
            ]
        )
    return time.perf_counter() - started


def cycle(queries: np.ndarray):  # type: ignore[no-untyped-def]
    state = iter(range(10**9))
    return lambda: queries[next(state) % len(queries)]


def old_search(index: EmbeddedIndex, q: np.ndarray, k: int, prefix: str | None = None) -> object:
    """EmbeddedIndex.search as it was before this round of work (kept here as the baseline)."""
    matrix, ids, keys = index._matrix, index._ids, index._keys
    scores = matrix @ q
    candidates = None
    if prefix:
        candidates = np.flatnonzero([key.startswith(prefix) for key in keys])
        scores = scores[candidates]
    top = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    order = sorted(top.tolist(), key=lambda i: (-float(scores[i]), ids[i if candidates is None else candidates[i]]))
    rows = [int(i if candidates is None else candidates[i]) for i in order]
    return index._hits(rows, [float(scores[i]) for i in order], ids)


def old_prefix_ms(index: EmbeddedIndex, prefix: str, repeat: int) -> float:
    """The filter as it was: str.startswith over every key in a Python list comprehension."""
    keys = index._keys
    return median(timings(lambda: np.flatnonzero([k.startswith(prefix) for k in keys]), repeat, 1)) * 1e3


def exact_row(
    index: EmbeddedIndex, n: int, dim: int, kind: str, queries: np.ndarray, k: int, fill_s: float
) -> list[object]:
    import faiss

    matrix = index._matrix
    q = cycle(queries)
    t_before = timings(lambda: old_search(index, q(), k), len(queries))
    t_emb = timings(lambda: index.search(q(), k=k), len(queries))
    few = max(5, len(queries) // 5)
    t_pre_before = timings(lambda: old_search(index, q(), k, prefix="img/3/"), few)
    t_pre = timings(lambda: index.search(q(), k=k, prefix="img/3/"), few)
    t_np = timings(lambda: np.argsort(-(matrix @ q()))[:k], max(5, len(queries) // 5))
    flat = faiss.IndexFlatIP(dim)
    flat.add(matrix)
    t_faiss = timings(lambda: flat.search(q()[None, :], k), len(queries))
    flat.reset()  # frees its copy of the vectors
    return [
        n,
        dim,
        kind,
        n / fill_s,
        median(t_before) * 1e3,
        median(t_emb) * 1e3,
        pct(t_emb, 99) * 1e3,
        median(t_faiss) * 1e3,
        median(t_np) * 1e3,
        median(t_emb) / median(t_faiss),
        median(t_pre_before) * 1e3,
        median(t_pre) * 1e3,
    ]


def approx_row(
    index: EmbeddedIndex, n: int, dim: int, kind: str, queries: np.ndarray, k: int, t_exact: float
) -> list[object]:
    truth = [[h.id for h in index.search(q, k=k)] for q in queries]
    index.search_mode = "approx"
    started = time.perf_counter()
    index.search(queries[0], k=k)  # builds (or loads) the structure
    build_s = time.perf_counter() - started
    found = sum(len({h.id for h in index.search(q, k=k)} & set(t)) for q, t in zip(queries, truth, strict=True))
    q = cycle(queries)
    t_ann = timings(lambda: index.search(q(), k=k), len(queries))
    # The same structure with FAISS's default single-threaded scan per query, as it was before.
    ann = index._ann
    t_serial = t_ann  # no structure (below min_rows, or exact fallback): nothing to compare
    if ann is not None and hasattr(ann.index, "implem"):
        ann.index.implem = 0
        t_serial = timings(lambda: index.search(q(), k=k), len(queries))
        ann.index.implem = PARALLEL_SCAN
    info = index.info().extra
    index.search_mode = "exact"
    return [
        n,
        dim,
        kind,
        build_s,
        info.get("ann_lists", "-"),
        info.get("ann_nprobe", "-"),
        info.get("ann_rerank", "-"),
        found / (k * len(queries)),
        median(t_serial) * 1e3,
        median(t_ann) * 1e3,
        pct(t_ann, 99) * 1e3,
        t_exact / 1e3 / median(t_ann),
        dim * 4 + info.get("ann_bytes_per_vector", 0),
    ]


def sweep_rows(index: EmbeddedIndex, n: int, dim: int, queries: np.ndarray, k: int) -> list[list[object]]:
    """What recall costs: AnnIndex.search alone (no SQLite fetch) with nprobe and re-rank depth forced,
    on the structure approx_row built; recall of fresh queries against the exact top k."""
    import faiss

    ann, matrix = index._ann, index._matrix
    if ann is None:
        return []
    _, truth = faiss.knn(queries, matrix, k, faiss.METRIC_INNER_PRODUCT)
    calibrated = (ann.nprobe, ann.rerank)
    next_query = cycle(queries)
    rows = []
    for nprobe in (calibrated[0], calibrated[0] * 5 // 4, calibrated[0] * 3 // 2):
        for rerank in (600, 800, 1000, 1200):
            ann.nprobe, ann.rerank = nprobe, rerank
            found = sum(
                len(set(ann.search(q, k, matrix)[0].tolist()) & set(t.tolist()))
                for q, t in zip(queries, truth, strict=True)
            )
            times = timings(lambda: ann.search(next_query(), k, matrix), len(queries))
            rows.append([n, dim, nprobe, rerank, found / (k * len(queries)), median(times) * 1e3])
    ann.nprobe, ann.rerank = calibrated
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="512,1024")
    ap.add_argument("--data", default="random")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--approx", action="store_true", help="also build and measure the approximate mode")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="with --approx: recall and latency of the ANN structure alone at forced list counts and re-rank depths",
    )
    args = ap.parse_args()

    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}\n")
    exact_rows, approx_rows, memory_rows, sweep = [], [], [], []
    for kind in args.data.split(","):
        for dim in map(int, args.dims.split(",")):
            for n in map(int, args.sizes.split(",")):
                vectors = make(kind, n, dim, seed=n + dim, collection=n)
                queries = make(kind, args.queries, dim, seed=1, collection=n)
                with tempfile.TemporaryDirectory() as tmp:
                    index = EmbeddedIndex(tmp, model="bench", dim=dim, ann={"persist": False})
                    fill_s = fill(index, vectors)
                    del vectors
                    gc.collect()
                    row = exact_row(index, n, dim, kind, queries, args.k, fill_s)
                    exact_rows.append(row)
                    if args.approx:
                        approx_rows.append(approx_row(index, n, dim, kind, queries, args.k, float(row[5])))  # type: ignore[arg-type]
                        if args.sweep:
                            sweep += sweep_rows(index, n, dim, queries, args.k)
                    db_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
                    memory_rows.append([n, dim, kind, dim * 4, db_bytes / n, rss_mb()])
                    index.close()
                gc.collect()
                print(f"  done {kind} n={n} dim={dim} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    print("Exact search (ms per query, k=10; embedded = EmbeddedIndex.search, hits included):\n")
    print(
        table(
            [
                "vectors",
                "dim",
                "data",
                "ingest vec/s",
                "before p50",
                "embedded p50",
                "embedded p99",
                "faiss flat p50",
                "numpy argsort p50",
                "embedded/faiss",
                "prefix before p50",
                "prefix p50",
            ],
            exact_rows,
        )
    )
    if approx_rows:
        print(
            "\nApproximate mode (IVF lists of 4-bit PQ fast-scan codes + exact re-rank; recall@10 vs exact;"
            " below min_rows it answers exactly):\n"
        )
        print(
            table(
                [
                    "vectors",
                    "dim",
                    "data",
                    "build s",
                    "lists",
                    "nprobe",
                    "re-ranked",
                    "recall@10",
                    "p50 ms, one-thread scan (before)",
                    "p50 ms",
                    "p99 ms",
                    "speed-up vs exact",
                    "RAM B/vec",
                ],
                approx_rows,
            )
        )
    if sweep:
        print("\nWhat recall costs (AnnIndex.search alone, nprobe and re-rank depth forced, fresh queries):\n")
        print(table(["vectors", "dim", "nprobe", "re-ranked", "recall@10", "p50 ms"], sweep))
    print("\nMemory:\n")
    print(table(["vectors", "dim", "data", "matrix RAM B/vec", "disk B/vec", "peak RSS MB so far"], memory_rows))
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
