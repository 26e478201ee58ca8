"""OpenSearch (lucene HNSW) vs the embedded index: bulk ingest rate, query p50/p99, recall@10 vs exact.

    scripts/opensearch-local start
    python bench/opensearch_vs_embedded.py [--sizes 10000,100000] [--dims 512,1024] [--queries 200]
        [--url http://127.0.0.1:9200] [--m 16] [--ef-construction 128] [--ef-search 100]
        [--data clustered|uniform] [--force-merge]

Both backends get the same vectors through the same VectorIndex calls (upsert in batches, then
search with k=10); latencies are end to end as the application sees them (for OpenSearch: through
opensearch-py over loopback). The vectors are synthetic: `clustered` (the default) mimics CLIP
embeddings, which bunch around topics; `uniform` is the hard case for any graph index.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from opensearchpy import OpenSearch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, pct, table  # noqa: E402

from clipsearch.index.base import Document, Hit, VectorIndex  # noqa: E402
from clipsearch.index.embedded import EmbeddedIndex  # noqa: E402
from clipsearch.index.opensearch import OpenSearchIndex  # noqa: E402

K = 10


def vectors(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        # Fixed topic centres (same for corpus and queries), each point a noisy copy of one.
        centres = np.random.default_rng(1).standard_normal((256, dim), dtype=np.float32)
        x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    out: list[set[int]] = []
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64] @ corpus.T
        out.extend(set(np.argpartition(-row, k)[:k].tolist()) for row in scores)
    return out


def ingest(index: VectorIndex, corpus: np.ndarray, batch: int) -> float:
    """Seconds to upsert the whole corpus, batch by batch, until searchable."""
    started = time.perf_counter()
    for start in range(0, len(corpus), batch):
        docs = [Document(key=f"img/{start + i:08d}.jpg", vector=v) for i, v in enumerate(corpus[start : start + batch])]
        result = index.upsert(docs)
        if result.failed:
            raise SystemExit(f"{len(result.failed)} documents failed, e.g. {next(iter(result.failed.items()))}")
    if isinstance(index, OpenSearchIndex):
        index.refresh()
    return time.perf_counter() - started


def query(index: VectorIndex, queries: np.ndarray, warmup: int = 20) -> tuple[list[float], list[list[Hit]]]:
    for q in queries[:warmup]:
        index.search(q, k=K)
    latencies, results = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, k=K)
        latencies.append(time.perf_counter() - t)
        results.append(hits)
    return latencies, results


def recall(results: list[list[Hit]], truth: list[set[int]]) -> float:
    found = 0
    for hits, exact in zip(results, truth, strict=True):
        found += len({int(h.key[4:12]) for h in hits} & exact)
    return found / (K * len(truth))


def wait_for_merges(index: OpenSearchIndex, limit_s: float = 600) -> int:
    """Let background merges settle so latency is measured on a stable set of segments."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        stats = index.client.indices.stats(index=index.name, metric="merge")
        if stats["_all"]["primaries"]["merges"]["current"] == 0:
            break
        time.sleep(2)
    segments = index.client.indices.segments(index=index.name)
    shards = segments["indices"][index.name]["shards"]
    return sum(len(copy["segments"]) for copies in shards.values() for copy in copies)


def run_one(n: int, dim: int, args: argparse.Namespace) -> list[list[Any]]:
    corpus = vectors(n, dim, args.data, seed=n + dim)
    queries = vectors(args.queries, dim, args.data, seed=7)
    truth = exact_top_k(corpus, queries, K)
    rows: list[list[Any]] = []

    with tempfile.TemporaryDirectory() as tmp:
        emb = EmbeddedIndex(Path(tmp) / "idx", model="bench", dim=dim)
        took = ingest(emb, corpus, args.batch)
        lat, res = query(emb, queries)
        rows.append(
            [
                "embedded (exact)",
                f"{n:,}",
                dim,
                "-",
                n / took,
                "-",
                pct(lat, 50) * 1e3,
                pct(lat, 99) * 1e3,
                recall(res, truth),
            ]
        )
        emb.close()
    print(table(HEADERS, rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    osi = OpenSearchIndex(
        f"bench-{n}-{dim}-{uuid.uuid4().hex[:6]}",
        model="bench",
        dim=dim,
        url=args.url,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        refresh_interval="30s",
        timeout_s=120,
    )
    try:
        took = ingest(osi, corpus, args.batch)
        segments = wait_for_merges(osi)
        lat, res = query(osi, queries)
        hnsw = f"m={args.m}, ef_c={args.ef_construction}, ef_s={args.ef_search}"
        rows.append(
            [
                "opensearch lucene HNSW",
                f"{n:,}",
                dim,
                hnsw,
                n / took,
                segments,
                pct(lat, 50) * 1e3,
                pct(lat, 99) * 1e3,
                recall(res, truth),
            ]
        )
        print(table(HEADERS, rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.force_merge:
            t = time.perf_counter()
            osi.client.indices.forcemerge(index=osi.name, max_num_segments=1, request_timeout=3600)
            merge_s = time.perf_counter() - t
            lat, res = query(osi, queries)
            rows.append(
                [
                    f"  after force merge ({merge_s:.0f} s)",
                    f"{n:,}",
                    dim,
                    hnsw,
                    "-",
                    1,
                    pct(lat, 50) * 1e3,
                    pct(lat, 99) * 1e3,
                    recall(res, truth),
                ]
            )
            print(table(HEADERS, rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        osi.drop()
        osi.close()
    return rows


HEADERS = ["backend", "N", "dim", "HNSW", "ingest docs/s", "segments", "p50 ms", "p99 ms", f"recall@{K}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dims", default="512,1024")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--url", default="http://127.0.0.1:9200")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--ef-search", type=int, default=100)
    p.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    p.add_argument("--force-merge", action="store_true")
    args = p.parse_args()

    root = OpenSearch(hosts=[args.url]).info()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for dim in (int(d) for d in args.dims.split(",")):
            rows.extend(run_one(n, dim, args))
    print(
        f"Machine: {machine()}; OpenSearch {root['version']['number']} (k-NN plugin, lucene engine, "
        f"1 shard, 0 replicas) on the same machine; {args.data} synthetic unit vectors, "
        f"{args.queries} queries, k={K}, bulk batches of {args.batch}.\n"
    )
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
