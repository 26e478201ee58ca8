"""The indexing pipeline's images/s as a ratio of the bare model forward on pre-decoded tensors.

Goal: >= 0.9 for RN50, i.e. decoding, resizing and SQLite writes are hidden behind the forward.
Each model is measured twice in the same run: "before" forces clip's eager visual tower (the code as
it was), "after" uses model_code as it serves now. The bare forward of each uses the same tower.

    python bench/pipeline.py [--models RN50,ViT-B/32,demo] [--images 128] [--batch-size 32]
                             [--jpeg-size 0]   # >0: photo-sized JPEGs (longer side), decode-heavy
    python bench/pipeline.py --draft --models RN50 --images 48 --jpeg-size 4000

--draft compares, in the same run, the shared decode with JPEG draft (DCT-domain) scaling switched
off ("full decode", the code before) and on, on photo-like JPEGs (textures, gradients and sensor
noise, not flat shapes), and reports the cosine between each picture's two vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_model as load  # noqa: E402
from common import machine, table


def photo_like(size: tuple[int, int], seed: int):  # type: ignore[no-untyped-def]
    """A camera-like picture: smooth light, a textured scene, fine detail and sensor noise."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    scene = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)  # gradients and blobs
    texture = (
        Image.fromarray(rng.integers(0, 256, (h // 4, w // 4), dtype=np.uint8))
        .resize((w, h), Image.Resampling.BILINEAR)
        .filter(ImageFilter.GaussianBlur(1.5))
    )  # foliage-like texture
    arr = np.asarray(scene, dtype=np.float32) * 0.8 + np.asarray(texture, dtype=np.float32)[..., None] * 0.2
    arr += rng.normal(0, 4, (h, w, 1))  # sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_photos(folder: Path, count: int, long_side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo_like((long_side, long_side * 3 // 4), seed=i).save(folder / f"IMG_{i:04d}.jpg", quality=90)


def full_decode(enabled: bool) -> None:
    """Switch JPEG draft scaling off (the decode as it was) or back on, for this process."""
    from PIL import JpegImagePlugin

    original = getattr(full_decode, "original", None) or JpegImagePlugin.JpegImageFile.draft
    full_decode.original = original  # type: ignore[attr-defined]
    JpegImagePlugin.JpegImageFile.draft = (lambda self, mode, size: None) if enabled else original  # type: ignore[method-assign,assignment]


def agreement(loaded, folder: Path) -> list[float]:  # type: ignore[no-untyped-def]
    """Per picture, the cosine between its vectors from the full decode and from the draft decode."""
    import numpy as np

    from clipsearch.images import load_file
    from model_code import inference

    paths = sorted(folder.iterdir())
    full_decode(True)
    full = inference.encode_images(loaded, [load_file(p).image for p in paths])
    full_decode(False)
    draft = inference.encode_images(loaded, [load_file(p).image for p in paths])
    return [float(c) for c in np.sum(full * draft, axis=1)]


def draft_run(args: argparse.Namespace, tmp: Path) -> None:
    import numpy as np

    from model_code import inference

    folder = tmp / "photos"
    write_photos(folder, args.images, args.jpeg_size or 4000)
    rows = []
    # Randomly initialised towers map most inputs to nearly one direction, so agreement is measured
    # with the trained demo model as well as with each named one.
    for name in dict.fromkeys(["demo", *args.models.split(",")]):
        loaded = load(name)
        inference.prepare_graphs(loaded)
        cosines = agreement(loaded, folder)
        print(
            f"{name}: cosine full vs draft over {len(cosines)} photos: min {min(cosines):.6f}, "
            f"mean {float(np.mean(cosines)):.6f}"
        )
        if name not in args.models.split(","):
            continue
        for label, off in (("full decode (before)", True), ("draft decode (after)", False)):
            full_decode(off)
            bare = bare_forward(loaded, folder, args.batch_size)
            piped = pipeline(name, loaded, folder, tmp, args.batch_size, args.workers)
            rows.append([name, label, bare, piped, piped / bare])
            print(f"  done {name} {label}", file=sys.stderr, flush=True)
        full_decode(False)
    side = args.jpeg_size or 4000
    print(
        f"\n{args.images} photo-like JPEGs {side}x{side * 3 // 4} ({side * side * 3 // 4 / 1e6:.1f} MP), "
        f"quality 90, {args.workers} decode workers, batch {args.batch_size}\n"
    )
    print(table(["model", "decode", "bare forward img/s", "pipeline img/s", "ratio"], rows))
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


def write_pictures(folder: Path, count: int, jpeg_size: int) -> None:
    from PIL import Image

    from clipsearch.demo.catalogue import write_catalogue

    write_catalogue(folder, count=count)
    if jpeg_size:
        for path in sorted(folder.glob("*.png")):
            img = Image.open(path).convert("RGB")
            img.resize((jpeg_size, jpeg_size * 3 // 4), Image.Resampling.BICUBIC).save(
                path.with_suffix(".jpg"), quality=90
            )
            path.unlink()


def bare_forward(loaded, folder: Path, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """images/s of the tower alone, on tensors decoded and preprocessed beforehand."""
    from clipsearch.images import load_file
    from model_code import inference

    images = [load_file(p).image for p in sorted(folder.iterdir())]
    batches = [
        inference.preprocess_images(loaded, images[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]
    inference.encode_pixels(loaded, batches[0])
    started = time.perf_counter()
    for batch in batches:
        inference.encode_pixels(loaded, batch)
    return len(images) / (time.perf_counter() - started)


def pipeline(name: str, loaded, folder: Path, tmp: Path, batch_size: int, workers: int) -> float:  # type: ignore[no-untyped-def]
    from clipsearch.encoders import LocalEncoder
    from clipsearch.index.embedded import EmbeddedIndex
    from clipsearch.ingest import index_paths

    encoder = LocalEncoder(name, loaded=loaded)
    index = EmbeddedIndex(tempfile.mkdtemp(dir=tmp), model=name, dim=encoder.dim)
    summary = index_paths([folder], encoder, index, batch_size=batch_size, workers=workers)
    index.close()
    return summary.images_per_second


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="RN50")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--jpeg-size", type=int, default=0)
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--draft", action="store_true", help="compare full and draft JPEG decoding")
    args = ap.parse_args()
    import torch

    from model_code import inference

    torch.set_num_threads(args.threads)
    print(
        f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.draft:
            draft_run(args, tmp)
            return
        folder = tmp / "pics"
        write_pictures(folder, args.images, args.jpeg_size)
        for name in args.models.split(","):
            loaded = load(name)
            runs = [("after", None)] if args.skip_before else [("before", loaded.model.visual), ("after", None)]
            for label, tower in runs:
                loaded.graphs.clear()
                if tower is not None:
                    loaded.graphs["visual"] = tower  # clip's eager tower, as before the graph runtime
                else:
                    inference.prepare_graphs(loaded)  # steady state: built after 256 images in a real run
                bare = bare_forward(loaded, folder, args.batch_size)
                piped = pipeline(name, loaded, folder, tmp, args.batch_size, args.workers)
                rows.append([name, label, args.images, args.batch_size, bare, piped, piped / bare])
                print(f"  done {name} {label}", file=sys.stderr, flush=True)
    kind = f"{args.jpeg_size}px JPEG" if args.jpeg_size else "192px PNG"
    print(f"{args.images} pictures ({kind}), {args.workers} decode workers\n")
    print(table(["model", "code", "images", "batch", "bare forward img/s", "pipeline img/s", "ratio"], rows))
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
