"""The duplicate finder: how well its thresholds separate copies from look-alikes, and how fast it scans.

    python bench/duplicates.py quality [--subjects 60]
    python bench/duplicates.py scan [--docs 10000] [--runs 3] [--opensearch URL]

quality: photo-like generated pictures (tests/support/photos.py: gradients, grain, waves, shapes), each with
three edited copies that must be found (JPEG quality 60, resized to 50%, 5% cropped) and two kinds of
pictures that must not: the same subject drawn again (moved as between burst shots), and two pictures of
the same demo class (clipsearch/demo/shapes.py, e.g. two large red circles). Every picture goes through
decode_for_model, the perceptual hash and the demo model, as `clipsearch index --model demo` would. Prints
the distance distributions, then recall per edit and precision for a sweep of Hamming thresholds.

scan: an index of synthetic documents (random unit vectors and hashes; 5% exact copies and 10% near copies
planted), then the whole `all` scan and one page, timed, on the embedded backend (and OpenSearch if given).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine  # noqa: E402
from support import photos  # noqa: E402

from clipsearch import duplicates  # noqa: E402
from clipsearch.index.base import Document, VectorIndex  # noqa: E402
from clipsearch.perceptual import hamming, parse_hash, perceptual_hash  # noqa: E402


def quality(subjects: int) -> None:
    from clipsearch.demo import shapes
    from clipsearch.encoders import LocalEncoder
    from model_code.inference import decode_for_model

    encoder = LocalEncoder("demo")

    def measure(a: bytes, b: bytes) -> tuple[int, float]:
        images = [decode_for_model(a).image, decode_for_model(b).image]
        va, vb = encoder.encode_images(images)
        return hamming(*(parse_hash(perceptual_hash(i)) for i in images)), float(va @ vb)

    pairs: dict[str, list[tuple[int, float]]] = {name: [] for name in photos.EDITS}
    pairs["same subject, redrawn"] = []
    pairs["same demo class"] = []
    pairs["different subjects"] = []
    for s in range(subjects):
        what = photos.subject(s)
        img = photos.scene(what, 1000 + s)
        original = photos.encoded(img)
        for name, edit in photos.EDITS.items():
            pairs[name].append(measure(original, edit(img)))
        pairs["same subject, redrawn"].append(measure(original, photos.encoded(photos.scene(what, 5000 + s))))
        other = photos.scene(photos.subject(subjects + s), 1000 + s)
        pairs["different subjects"].append(measure(original, photos.encoded(other)))
    rng = np.random.default_rng(0)
    classes = [(c, s, z) for c in shapes.COLOURS for s in shapes.SHAPES for z in shapes.SIZES]
    for colour, shape, size in classes:
        a, b = (shapes.render(colour, shape, size, rng=rng, image_size=256) for _ in range(2))
        pairs["same demo class"].append(measure(photos.encoded(a), photos.encoded(b)))

    print(machine())
    print(f"\n{subjects} subjects, {len(classes)} demo classes; Hamming distance (of 64 bits) and cosine (demo model)")
    print(f"{'pair':<24} {'n':>4} {'hamming min/median/max':>24} {'cosine min/median/max':>24}")
    for name, found in pairs.items():
        d, c = np.array([f[0] for f in found]), np.array([f[1] for f in found])
        print(
            f"{name:<24} {len(found):>4} {f'{d.min()}/{np.median(d):.0f}/{d.max()}':>24} "
            f"{f'{c.min():.3f}/{np.median(c):.3f}/{c.max():.3f}':>24}"
        )
    positives = list(photos.EDITS)
    print(f"\nduplicate = hamming <= T and cosine >= {duplicates.NEAR_COSINE}")
    print(f"{'T':>3} " + " ".join(f"{'recall ' + p:>20}" for p in positives) + f" {'recall':>8} {'precision':>10}")
    for t in (8, 10, 12, 14, 15, 16, 18, 20):

        def hit(pair: tuple[int, float], t: int = t) -> bool:
            return pair[0] <= t and pair[1] >= duplicates.NEAR_COSINE

        tp = {p: sum(hit(x) for x in pairs[p]) for p in positives}
        fp = sum(hit(x) for name, found in pairs.items() if name not in positives for x in found)
        total_pos = sum(len(pairs[p]) for p in positives)
        recall = sum(tp.values()) / total_pos
        precision = sum(tp.values()) / max(1, sum(tp.values()) + fp)
        cells = " ".join(f"{tp[p] / len(pairs[p]):>20.3f}" for p in positives)
        mark = "  <- NEAR_HAMMING" if t == duplicates.NEAR_HAMMING else ""
        print(f"{t:>3} {cells} {recall:>8.3f} {precision:>10.3f}  ({fp} false){mark}")


def synthetic(n: int, dim: int = 512, seed: int = 0) -> list[Document]:
    """n documents: random pictures, 5% exact copies of one of them, 10% near copies (hash and vector nudged)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    exact, near = int(n * 0.05), int(n * 0.10)
    for i in range(n - exact - near, n - near):  # exact copies
        j = int(rng.integers(0, n - exact - near))
        vectors[i], hashes[i], sha[i] = vectors[j], hashes[j], sha[j]
    for i in range(n - near, n):  # near copies: a few bits flipped, the vector nudged
        j = int(rng.integers(0, n - exact - near))
        flips = rng.choice(64, int(rng.integers(0, 9)), replace=False)
        hashes[i] = hashes[j] ^ np.uint64(sum(1 << int(b) for b in flips))
        vectors[i] = vectors[j] + 0.1 * rng.standard_normal(dim).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        Document(
            key=f"/photos/{i:06d}.jpg",
            vector=vectors[i],
            content_hash=sha[i],
            phash=f"{int(hashes[i]):016x}",
            width=640,
            height=480,
        )
        for i in range(n)
    ]


def scan(n: int, runs: int, opensearch: str | None) -> None:
    docs = synthetic(n)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        from clipsearch.index.embedded import EmbeddedIndex

        index: VectorIndex = EmbeddedIndex(Path(tmp) / "idx", model="bench", dim=docs[0].vector.shape[0])
        for start in range(0, n, 1000):
            index.upsert(docs[start : start + 1000])
        _time("embedded", index, n, runs)
        index.close()
    if opensearch:
        from clipsearch.index.opensearch import OpenSearchIndex

        os_index = OpenSearchIndex("dups-bench-duplicates", model="bench", dim=docs[0].vector.shape[0], url=opensearch)
        try:
            for start in range(0, n, 500):
                os_index.upsert(docs[start : start + 500])
            os_index.refresh()
            _time("opensearch", os_index, n, runs)
        finally:
            os_index.drop()
            os_index.close()


def _time(backend: str, index: VectorIndex, n: int, runs: int) -> None:
    scans, pages = [], []
    groups: list[duplicates.Group] = []
    for _ in range(runs):
        started = time.perf_counter()
        groups = duplicates.find_groups(index, "all")
        scans.append(time.perf_counter() - started)
        started = time.perf_counter()
        duplicates.duplicates(index, duplicates.DuplicatesRequest(), lambda hit: {"id": hit.id})
        pages.append(time.perf_counter() - started)
    kinds = {k: sum(1 for g in groups if g.kind == k) for k in ("exact", "near")}
    print(
        f"{backend}: {n} documents, {kinds['exact']} exact and {kinds['near']} near groups; whole scan "
        f"median {statistics.median(scans):.2f} s, one page (scan + 50 groups) median "
        f"{statistics.median(pages):.2f} s over {runs} runs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--subjects", type=int, default=60)
    s = sub.add_parser("scan")
    s.add_argument("--docs", type=int, default=10_000)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--opensearch")
    args = parser.parse_args()
    if args.what == "quality":
        quality(args.subjects)
    else:
        scan(args.docs, args.runs, args.opensearch)


if __name__ == "__main__":
    main()
