"""OpenSearch bulk loading: docs/s before and after, lever by lever, and a large run with latency and recall.

    scripts/opensearch-local start
    python bench/opensearch_bulk.py levers [--n 100000] [--dim 512] [--rows 0,4] [--more-clients 4]
        [--url http://127.0.0.1:9200]
    python bench/opensearch_bulk.py scale [--n 1000000] [--queries 200] [--ef-search 100,200]
        [--max-ingest-s 3000] [--before 100000] [--url ...]

`levers` loads the same clustered vectors into a fresh index once per configuration, in one run:
"before" is OpenSearchIndex as of commit 81184e0 (its hand-written chunker, read with `git show`, so
this needs the git history), default settings, one client; then today's streaming_bulk path with
the same settings; then each bulk-load lever added in turn. A row's time runs from the first upsert
until everything is searchable (the final refresh included). "node CPU ms/doc" is the node
process's CPU time over the same span per document, which a busy shared machine inflates far less
than wall time (other clients of the same node still add to it).

`scale` (after --before vectors loaded the "before" way, for comparison) loads N vectors with
--bulk-load's settings, logging docs/s as it goes (so a run cut short
by --max-ingest-s still reports the size it reached), then measures query p50/p99 at k=10 per
ef_search, recall@10 against exact (numpy brute force over everything loaded), JVM heap
(_nodes/stats) and disk (_cat/indices store size).

The vectors mimic CLIP embeddings: a few thousand Gaussian clusters on the unit sphere, normalised.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, pct, table  # noqa: E402

from clipsearch.index.base import Document  # noqa: E402
from clipsearch.index.opensearch import BULK_LOAD, OpenSearchIndex  # noqa: E402

BASE = "81184e0"  # the commit before streaming_bulk and --bulk-load
K = 10
CLUSTERS = 2000
CHUNK = 10_000  # vectors generated (and fed to exact search) at a time


def centres(dim: int) -> np.ndarray:
    c = np.random.default_rng(1).standard_normal((CLUSTERS, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(n: int, dim: int, seed: int, c: np.ndarray) -> np.ndarray:
    """n unit vectors, each a noisy copy of one centre (cosine to it about 0.7, like CLIP's topic spread)."""
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(n: int, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    c = centres(dim)
    for start in range(0, n, CHUNK):
        yield start, clustered(min(CHUNK, n - start), dim, seed=start + 11, c=c)


def docs(start: int, vectors: np.ndarray) -> list[Document]:
    return [Document(key=f"img/{start + i:08d}.jpg", vector=v) for i, v in enumerate(vectors)]


def base_module() -> ModuleType:
    """opensearch.py as of BASE: the hand-written chunker, for the "before" row."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BASE}:clipsearch/index/opensearch.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("opensearch_at_base", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{BASE}:clipsearch/index/opensearch.py", "exec"), module.__dict__)
    return module


def segments(index: Any) -> int:
    # By the name given, an alias: the answer is keyed by the physical index behind it.
    (entry,) = index.client.indices.segments(index=index.name)["indices"].values()
    shards = entry["shards"]
    return sum(len(copy["segments"]) for copies in shards.values() for copy in copies)


def node_cpu_s(index: Any) -> float:
    """CPU seconds the node's process has used so far (all its threads): a measure other load cannot inflate."""
    nodes = index.client.nodes.stats(metric="process")["nodes"]
    return sum(n["process"]["cpu"]["total_in_millis"] for n in nodes.values()) / 1000


def load(index: Any, n: int, dim: int, batch: int, bulk_load: bool) -> float:
    """Seconds from the first upsert until all n are searchable."""
    started = time.perf_counter()
    with index.bulk_load() if bulk_load else contextlib.nullcontext():
        for start, vectors in chunks(n, dim):
            for at in range(0, len(vectors), batch):
                result = index.upsert(docs(start + at, vectors[at : at + batch]))
                if result.failed:
                    raise SystemExit(f"{len(result.failed)} failed, e.g. {next(iter(result.failed.items()))}")
    index.refresh()
    return time.perf_counter() - started


def levers(args: argparse.Namespace) -> None:
    base = base_module()
    bigger = {"max_bulk_docs": BULK_LOAD["max_bulk_docs"], "max_bulk_bytes": BULK_LOAD["max_bulk_bytes"]}
    configs: list[tuple[str, Any, dict[str, int], bool]] = [
        ("before: hand-written chunker (81184e0), 500/bulk, refresh 10s, 1 client", base.OpenSearchIndex, {}, False),
        ("streaming_bulk, same settings", OpenSearchIndex, {}, False),
        ("+ refresh_interval -1 while loading", OpenSearchIndex, {}, True),
        (f"+ {bigger['max_bulk_docs']} docs/bulk", OpenSearchIndex, bigger, True),
        (f"+ {BULK_LOAD['bulk_clients']} parallel bulk clients (= --bulk-load)", OpenSearchIndex, BULK_LOAD, True),
    ]
    if args.more_clients:
        configs.append(
            (
                f"+ {args.more_clients} parallel bulk clients",
                OpenSearchIndex,
                {**BULK_LOAD, "bulk_clients": args.more_clients},
                True,
            )
        )
    if args.rows:
        configs = [configs[int(i)] for i in args.rows.split(",")]
    rows = []
    first = 0.0
    for label, cls, options, bulk_load in configs:
        index = cls(f"bulk-bench-{uuid.uuid4().hex[:8]}", model="bench", dim=args.dim, url=args.url, **options)
        try:
            batch = options.get("max_bulk_docs", 500) * options.get("bulk_clients", 1)
            load1, cpu1 = os.getloadavg()[0], node_cpu_s(index)
            seconds = load(index, args.n, args.dim, batch, bulk_load)
            cpu_ms = (node_cpu_s(index) - cpu1) * 1000 / args.n
            assert index.count() == args.n
            rate = args.n / seconds
            first = first or rate
            rows.append([label, args.n, round(seconds, 1), round(rate), f"{rate / first:.2f}×", segments(index)])
            rows[-1] += [round(cpu_ms, 2), f"{load1:.1f}–{os.getloadavg()[0]:.1f}"]
            print(json.dumps({"config": label, "n": args.n, "seconds": seconds, "docs_s": rate, "cpu_ms": cpu_ms}))
        finally:
            index.drop()
            index.client.close()
    print(f"\n{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; dim {args.dim}\n")
    headers = ["configuration", "N", "seconds", "docs/s", "vs before", "segments", "node CPU ms/doc", "load avg"]
    print(table(headers, rows))


def before(args: argparse.Namespace) -> None:
    """The "before" row for scale: --before vectors through the base commit's chunker, default settings."""
    index = base_module().OpenSearchIndex(
        f"bulk-before-{uuid.uuid4().hex[:8]}", model="bench", dim=args.dim, url=args.url
    )
    try:
        cpu0 = node_cpu_s(index)
        seconds = load(index, args.before, args.dim, 500, bulk_load=False)
        row = {"before": args.before, "seconds": seconds, "docs_s": args.before / seconds}
        row["node_cpu_ms_per_doc"] = (node_cpu_s(index) - cpu0) * 1000 / args.before
        print(json.dumps(row), flush=True)
    finally:
        index.drop()
        index.client.close()


def scale(args: argparse.Namespace) -> None:
    if args.before:
        before(args)
    c = centres(args.dim)
    queries = clustered(args.queries, args.dim, seed=7, c=c)
    best = np.full((args.queries, K), -2.0, dtype=np.float32)  # exact top-k scores and ids so far
    best_ids = np.zeros((args.queries, K), dtype=np.int64)
    name = f"bulk-scale-{uuid.uuid4().hex[:8]}"
    index = OpenSearchIndex(name, model="bench", dim=args.dim, url=args.url, **BULK_LOAD)
    batch = BULK_LOAD["max_bulk_docs"] * BULK_LOAD["bulk_clients"]
    loaded = 0
    started, cpu0 = time.perf_counter(), node_cpu_s(index)
    try:
        with index.bulk_load():
            for start, vectors in chunks(args.n, args.dim):
                for at in range(0, len(vectors), batch):
                    result = index.upsert(docs(start + at, vectors[at : at + batch]))
                    if result.failed:
                        raise SystemExit(f"{len(result.failed)} failed, e.g. {next(iter(result.failed.items()))}")
                scores = queries @ vectors.T
                merged = np.concatenate([best, scores], axis=1)
                ids = np.concatenate(
                    [best_ids, np.arange(start, start + len(vectors))[None, :].repeat(len(queries), 0)], 1
                )
                top = np.argsort(-merged, axis=1)[:, :K]
                best, best_ids = np.take_along_axis(merged, top, 1), np.take_along_axis(ids, top, 1)
                loaded = start + len(vectors)
                elapsed = time.perf_counter() - started
                progress = {"loaded": loaded, "seconds": round(elapsed, 1), "docs_s": round(loaded / elapsed)}
                progress["node_cpu_ms_per_doc"] = round((node_cpu_s(index) - cpu0) * 1000 / loaded, 2)
                print(json.dumps(progress), flush=True)
                if time.time() > args.stop_loading_at:
                    print(json.dumps({"stopped": "max-ingest-s reached", "loaded": loaded}), flush=True)
                    break
        ingest_s = time.perf_counter() - started
        print(json.dumps({"ingest_done": loaded, "seconds": ingest_s, "docs_s": loaded / ingest_s}), flush=True)
        truth = [set(row.tolist()) for row in best_ids]
        rows = []
        for ef in args.ef_search:
            index.ef_search = ef
            for q in queries[:20]:
                index.search(q, k=K)
            latencies, found = [], 0
            for q, exact in zip(queries, truth, strict=True):
                t = time.perf_counter()
                hits = index.search(q, k=K)
                latencies.append((time.perf_counter() - t) * 1000)
                found += len({int(h.key[4:12]) for h in hits} & exact)
            row = {"ef_search": ef, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99)}
            row["recall@10"] = found / (K * len(queries))
            print(json.dumps(row), flush=True)
            rows.append(row)
        heap = index.client.nodes.stats(metric="jvm")["nodes"]
        jvm = next(iter(heap.values()))["jvm"]["mem"]
        store = index.client.cat.indices(index=name, format="json", bytes="b")[0]
        summary = {
            "n": loaded,
            "ingest_docs_s": loaded / ingest_s,
            "segments": segments(index),
            "heap_used_mb": jvm["heap_used_in_bytes"] / 2**20,
            "heap_max_mb": jvm["heap_max_in_bytes"] / 2**20,
            "store_mb": int(store["store.size"]) / 2**20,
            "queries": rows,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(json.dumps(summary), flush=True)
    finally:
        if not args.keep:
            index.drop()
        index.client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("levers", "scale"))
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--url", default=os.environ.get("CLIPSEARCH_OPENSEARCH_URL", "http://127.0.0.1:9200"))
    p.add_argument("--more-clients", type=int, default=0, help="levers: one more row with this many clients")
    p.add_argument("--rows", help="levers: only these rows, by number from 0 (e.g. 0,4: before and --bulk-load)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ef-search", type=lambda s: [int(x) for x in s.split(",")], default=[100, 200])
    p.add_argument("--max-ingest-s", type=float, default=float("inf"), help="scale: stop loading this long after start")
    p.add_argument("--before", type=int, default=0, help="scale: first load this many the old way, for comparison")
    p.add_argument("--keep", action="store_true", help="scale: keep the index (to query it again)")
    args = p.parse_args()
    args.stop_loading_at = time.time() + args.max_ingest_s
    levers(args) if args.mode == "levers" else scale(args)


if __name__ == "__main__":
    main()
