"""Soak and crash tests for the local product: `clipsearch serve` under concurrent clients, and
`clipsearch index` killed with SIGKILL mid-ingest.

1. Soak: `clipsearch serve` (its own process, the demo model, a 240-picture demo catalogue) takes
   CLIENTS concurrent keep-alive clients for SECONDS, each sending a mix of requests: text queries
   (GET and POST, most of them new to the encoder's cache), raw image queries, more-like-this by id,
   /health and /images/<id>. Any non-200 answer or connection error is an error. The server's
   resident memory (VmRSS) is sampled every second after a warm-up; growth = last / first - 1.
2. Kill trials: `clipsearch index` over the catalogue is killed with SIGKILL once a random number of
   pictures (1 to half the catalogue) is committed, so the kill lands mid-ingest however fast the
   machine; the index must then be consistent (SQLite integrity ok, one row per file, `stats` works)
   and a re-run must finish with exactly one document per picture.

    python bench/soak.py                              # 32 clients x 60 s, 10 kill trials
    python bench/soak.py --clients 8 --seconds 5 --trials 2
Exit status 1 when the soak saw errors, RSS grew 10% or more, or a trial ended with wrong counts.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from PIL import Image

CLI = [sys.executable, "-m", "clipsearch.cli"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]
MAX_RSS_GROWTH = 0.10


def _env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1"}


def make_catalogue(folder: Path, count: int) -> Path:
    from clipsearch.demo.catalogue import write_catalogue

    write_catalogue(folder, count=count)
    return folder


def index_rows(index_dir: Path) -> tuple[int, int]:
    """(rows, distinct keys) in the embedded index, read straight from SQLite."""
    from clipsearch.index.embedded import DB_NAME as name

    db = sqlite3.connect(index_dir / name)
    try:
        return db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM images").fetchone()
    finally:
        db.close()


def integrity(index_dir: Path) -> str:
    from clipsearch.index.embedded import DB_NAME as name

    db = sqlite3.connect(index_dir / name)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


# -- the soak -------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    clients: int
    seconds: float
    requests: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def growth(self) -> float:
        return self.rss_mb[-1] / self.rss_mb[0] - 1 if len(self.rss_mb) >= 2 else 0.0

    def ok(self) -> bool:
        return not self.errors and self.growth < MAX_RSS_GROWTH


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def served(index_dir: Path, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`clipsearch serve` on a free loopback port; yields (process, base URL)."""
    log = work / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--index", str(index_dir), "--port", "0"], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            text = log.read_text(errors="replace")
            if " on http://" in text:
                url = text.split(" on ", 1)[1].split()[0].rstrip("/")
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"clipsearch serve did not start:\n{text}")
            time.sleep(0.1)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (64, 64), (250, 250, 250))
    img.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (16, 16, 48, 48))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _requests(ids: list[str], seed: int) -> Iterator[tuple[str, str, str, bytes | None, str]]:
    """(kind, method, path, body, content type), forever; most texts are new to the encoder's cache."""
    rng = random.Random(seed)
    for n in itertools.count():
        text = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} number {seed}-{n}"
        kind = n % 8
        if kind in (0, 1, 2):
            yield "GET text", "GET", f"/search?k=10&q={quote(text)}", None, ""
        elif kind == 3:
            yield "POST text", "POST", "/search", json.dumps({"text": text, "k": 5}).encode(), "application/json"
        elif kind == 4:
            yield "POST image", "POST", "/search?k=5", _png(seed * 100_000 + n), "image/png"
        elif kind == 5:
            body = json.dumps({"id": rng.choice(ids), "k": 5}).encode()
            yield "POST id", "POST", "/search", body, "application/json"
        elif kind == 6:
            yield "GET image", "GET", f"/images/{rng.choice(ids)}", None, ""
        else:
            image = base64.b64encode(_png(n)).decode()
            yield "POST b64", "POST", "/search", json.dumps({"image": image}).encode(), "application/json"
        if n % 50 == 49:
            yield "health", "GET", "/health", None, ""


def drive(url: str, ids: list[str], clients: int, seconds: float, result: SoakResult | None = None) -> SoakResult:
    """`clients` keep-alive connections sending the mix for `seconds`; counts answers and errors."""
    result = result or SoakResult(clients, seconds)
    parts = urlsplit(url)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)

    def worker(seed: int) -> None:
        conn = connect()
        for kind, method, path, body, ctype in _requests(ids, seed):
            if time.monotonic() > deadline:
                break
            try:
                conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{kind} -> {response.status}: {data[:160]!r}")
                with lock:
                    result.requests[kind] += 1
            except Exception as e:  # a soak counts every failure; it does not stop at the first
                with lock:
                    result.errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = connect()
        conn.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def soak(index_dir: Path, work: Path, clients: int, seconds: float, warmup_s: float = 5.0) -> SoakResult:
    """Run the soak against a fresh `clipsearch serve` over an existing index."""
    ids = _ids(index_dir)
    with served(index_dir, work) as (proc, url):
        drive(url, ids, clients, warmup_s)  # caches, graphs and thread stacks reach their working size
        result = SoakResult(clients, seconds)
        result.rss_mb.append(rss_mb(proc.pid))
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(1.0):
                result.rss_mb.append(rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        drive(url, ids, clients, seconds, result)
        sampler_stop.set()
        sampler.join()
        result.rss_mb.append(rss_mb(proc.pid))
        if proc.poll() is not None:
            result.errors.append(f"the server exited with {proc.returncode}")
    return result


def _ids(index_dir: Path) -> list[str]:
    from clipsearch.index.embedded import DB_NAME as name

    db = sqlite3.connect(index_dir / name)
    try:
        return [row[0] for row in db.execute("SELECT id FROM images")]
    finally:
        db.close()


# -- kill -9 trials -------------------------------------------------------------------------------


@dataclass
class Trial:
    n: int
    killed_after_s: float
    rows_after_kill: int
    integrity: str
    rerun_unchanged: int
    final_rows: int
    final_distinct: int
    expected: int
    finished_before_kill: bool = False

    def ok(self) -> bool:
        return (
            self.integrity == "ok"
            and self.final_rows == self.final_distinct == self.expected
            and self.rerun_unchanged == self.rows_after_kill
            and not self.finished_before_kill
        )


def kill_trial(
    n: int, catalogue: Path, index_dir: Path, expected: int, rng: random.Random, batch_size: int = 4
) -> Trial:
    """Index, SIGKILL once a random number of pictures is committed, check, re-run, check again.

    The kill point is chosen by progress (rows committed), not by wall time, so a faster machine still
    kills mid-ingest: the indexer is stopped as soon as at least `target` rows are in, with half the
    catalogue or more still to go.
    """
    target = rng.randint(1, max(1, expected // 2))
    proc = subprocess.Popen(
        [*CLI, "index", "--model", "demo", str(catalogue), "--index", str(index_dir), "--batch-size", str(batch_size)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    started = time.monotonic()
    from clipsearch.index.embedded import DB_NAME

    db = index_dir / DB_NAME
    while proc.poll() is None and time.monotonic() - started < 300:
        if db.exists():
            try:
                if index_rows(index_dir)[0] >= target:
                    break
            except sqlite3.Error:
                pass  # the schema is still being created
        time.sleep(0.005)
    finished = proc.poll() is not None
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited between the poll and the kill
        finished = True
    proc.wait()
    killed_after = time.monotonic() - started
    rows, _ = index_rows(index_dir)
    check = integrity(index_dir)
    rerun = subprocess.run(
        [*CLI, "index", "--model", "demo", str(catalogue), "--index", str(index_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    if rerun.returncode != 0:
        raise RuntimeError(f"re-run failed: {rerun.stderr}")
    unchanged = int(rerun.stdout.split("unchanged ", 1)[1].split(",", 1)[0])
    final, distinct = index_rows(index_dir)
    return Trial(n, killed_after, rows, check, unchanged, final, distinct, expected, finished)


def kill_trials(catalogue: Path, work: Path, trials: int, expected: int, seed: int = 1) -> list[Trial]:
    rng = random.Random(seed)
    out = []
    for n in range(1, trials + 1):
        index_dir = work / f"kill-{n}"
        out.append(kill_trial(n, catalogue, index_dir, expected, rng))
    return out


# -- the report -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--count", type=int, default=240, help="pictures in the catalogue")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="clipsearch-soak-") as tmp:
        work = Path(tmp)
        catalogue = make_catalogue(work / "catalogue", args.count)
        index_dir = work / "index"
        subprocess.run(
            [*CLI, "index", "--model", "demo", str(catalogue), "--index", str(index_dir)],
            check=True,
            capture_output=True,
            env=_env(),
        )

        result = soak(index_dir, work, args.clients, args.seconds)
        print(
            f"\n### Soak: {args.clients} clients x {args.seconds:g} s on `clipsearch serve` (demo model, "
            f"{args.count} pictures)\n"
        )
        print("| requests | req/s | errors | RSS first (MB) | RSS peak (MB) | RSS last (MB) | growth |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {result.total} | {result.total / args.seconds:.1f} | {len(result.errors)} | "
            f"{result.rss_mb[0]:.1f} | {max(result.rss_mb):.1f} | {result.rss_mb[-1]:.1f} | "
            f"{result.growth * 100:+.1f}% |"
        )
        print("\nmix: " + ", ".join(f"{k} {v}" for k, v in sorted(result.requests.items())))
        for line in result.errors[:10]:
            print(f"error: {line}")

        trials = kill_trials(catalogue, work, args.trials, args.count)
        print(f"\n### kill -9 during `clipsearch index` ({args.count} pictures, batch size 16)\n")
        print(
            "| trial | killed after (s) | rows after kill | SQLite integrity | re-run: unchanged | final rows "
            "| distinct keys | expected | ok |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for t in trials:
            print(
                f"| {t.n} | {t.killed_after_s:.2f} | {t.rows_after_kill} | {t.integrity} | {t.rerun_unchanged} "
                f"| {t.final_rows} | {t.final_distinct} | {t.expected} | {'yes' if t.ok() else '**NO**'} |"
            )
    failed = (not result.ok()) or not all(t.ok() for t in trials)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
