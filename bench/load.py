"""Loopback load on `clipsearch serve`: text queries against a 100k-image embedded index.

The bulk of the index is random unit vectors (inserted straight through the VectorIndex API); the queries
are real sentences encoded by the demo model. The server runs in its own process, as `clipsearch serve`
does; this process drives it with a bounded number of keep-alive http.client connections and prints
p50/p99 latency and throughput at each concurrency, for uncached texts (each one new to the encoder's
cache) and for cached ones (a few sentences repeated). Any failed request makes the exit status 1.

    python bench/load.py                                  # 100k items, concurrency 1, 8, 32
    python bench/load.py --count 20000 --requests 200 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large", "tiny", "big", "")
FRAMES = (
    "a {size} {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "{colour} {shape}, {size}",
    "a drawing of a {colour} {shape} number {n}",
    "the {size} {shape} that is {colour} (#{n})",  # "#": a number, not a year (docs/dates.md)
)


def sentences(unique: bool) -> Iterator[str]:
    """Query texts: all different (uncached), or eight repeated ones (cached after the first round)."""
    rng = np.random.default_rng(7)
    if not unique:
        fixed = [f"a {c} {s}" for c, s in zip(COLOURS * 2, SHAPES * 2, strict=False)][:8]
        return itertools.cycle(fixed)

    def text(n: int) -> str:
        frame = FRAMES[n % len(FRAMES)]
        return " ".join(
            frame.format(
                size=SIZES[rng.integers(len(SIZES))],
                colour=COLOURS[rng.integers(6)],
                shape=SHAPES[rng.integers(4)],
                n=n,
            ).split()
        )

    return map(text, itertools.count())


# -- the server process ----------------------------------------------------------------------------


def build_index(directory: Path, encoder_model: str, dim: int, count: int, batch: int = 10_000) -> None:
    """`count` random unit vectors, written in big batches through the index API."""
    from clipsearch.index.base import Document
    from clipsearch.index.embedded import EmbeddedIndex

    index = EmbeddedIndex(directory, model=encoder_model, dim=dim)
    have = index.count()
    rng = np.random.default_rng(0)
    for start in range(have, count, batch):
        n = min(batch, count - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.upsert(
            [
                Document(key=f"/bench/photos/{start + i:06d}.jpg", vector=vectors[i], title=f"photo {start + i}")
                for i in range(n)
            ]
        )
    index.close()


def run_server(index_dir: str, model: str, count: int, threads: int | None, ready: Connection) -> None:
    from clipsearch.encoders import LocalEncoder
    from clipsearch.http.server import make_server
    from clipsearch.index.embedded import EmbeddedIndex

    if threads:
        import torch

        torch.set_num_threads(threads)
    encoder = LocalEncoder(model)
    started = time.perf_counter()
    build_index(Path(index_dir), encoder.model, encoder.dim, count)
    built = time.perf_counter() - started
    index = EmbeddedIndex(index_dir)
    server = make_server(index, encoder, port=0)
    ready.send({"url": server.url, "count": index.count(), "dim": index.dim, "build_s": built})
    server.serve_forever()


# -- the load generator ----------------------------------------------------------------------------


@dataclass
class Level:
    mode: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> str:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.array([float("nan")])
        rate = len(self.latencies) / self.seconds if self.seconds else 0.0
        return (
            f"| {self.mode:8} | {self.concurrency:11d} | {len(self.latencies) + len(self.errors):8d} | "
            f"{len(self.errors):6d} | {np.percentile(ms, 50):8.1f} | {np.percentile(ms, 99):8.1f} | "
            f"{rate:9.1f} |"
        )


def drive(url: str, level: Level, texts: Iterator[str], requests: int, k: int, max_seconds: float) -> None:
    """`requests` queries over `concurrency` keep-alive connections, stopping early at max_seconds."""
    parts = urlsplit(url)
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.perf_counter() + max_seconds

    def next_text() -> str | None:
        with lock:
            if remaining[0] <= 0 or time.perf_counter() > deadline:
                return None
            remaining[0] -= 1
            return next(texts)

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        while (text := next_text()) is not None:
            began = time.perf_counter()
            try:
                conn.request("GET", f"/search?k={k}&q={quote(text)}")
                response = conn.getresponse()
                body = response.read()
                took = time.perf_counter() - began
                if response.status != 200 or len(json.loads(body)["hits"]) != k:
                    raise RuntimeError(f"status {response.status}: {body[:120]!r}")
                with lock:
                    level.latencies.append(took)
            except Exception as e:  # a benchmark counts failures; it does not stop at the first
                with lock:
                    level.errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(level.concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.seconds = time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="items in the index (default 100000)")
    parser.add_argument("--model", default="demo", help="model spec that encodes the queries (default demo)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=400, help="requests per level and mode (default 400)")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="time bound per level and mode")
    parser.add_argument("--modes", default="uncached,cached", help="uncached, cached or both")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: torch's choice)")
    parser.add_argument("--index", help="keep the index in this folder (reused if it holds --count items)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]

    with tempfile.TemporaryDirectory(prefix="clipsearch-load-") as tmp:
        index_dir = args.index or str(Path(tmp) / "index")
        ctx = mp.get_context("spawn")
        mine, theirs = ctx.Pipe()
        server = ctx.Process(
            target=run_server, daemon=True, args=(index_dir, args.model, args.count, args.threads, theirs)
        )
        server.start()
        try:
            while not mine.poll(1.0):
                if not server.is_alive():
                    print(f"the server process failed (exit code {server.exitcode})", file=sys.stderr)
                    return 1
            info = mine.recv()
            print(
                f"# clipsearch serve load: {info['count']} items (dim {info['dim']}, model {args.model}), "
                f"k={args.k}, index built in {info['build_s']:.1f}s"
            )
            print(
                f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}; client and server share it over loopback"
            )
            print()
            print("| queries  | concurrency | requests | errors | p50 (ms) | p99 (ms) | req/s     |")
            print("|----------|-------------|----------|--------|----------|----------|-----------|")
            failed = 0
            for mode in modes:
                texts = sentences(unique=(mode == "uncached"))
                # Warm up: load lazy code paths, and fill the cache for the cached mode.
                drive(info["url"], Level(mode, 1), texts, 16, args.k, 60)
                for concurrency in levels:
                    level = Level(mode, concurrency)
                    drive(info["url"], level, texts, args.requests, args.k, args.max_seconds)
                    print(level.row(), flush=True)
                    failed += len(level.errors)
                    for error in sorted(set(level.errors))[:5]:
                        print(f"#   error: {error}")
        finally:
            server.terminate()
            server.join(10)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
