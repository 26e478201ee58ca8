"""Encoder speed on this CPU, ours vs clip's eager reference measured in the same run: image throughput at
several batch sizes and text-query latency, for the demo model and randomly initialised RN50 / ViT-B/32
(compute does not depend on the weight values).

    python bench/encode.py [--models demo,RN50,ViT-B/32] [--batches 1,8,32] [--threads 2]

Text columns: clip's encode_text (all 77 positions), the same model run only up to the end-of-text token
(the first lever), and ours as served (model_code.encode_texts), plus a LocalEncoder cache hit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_model as load  # noqa: E402
from common import machine, median, pct, table, timings


def pictures(n: int):  # type: ignore[no-untyped-def]
    from clipsearch.shapes import demo_catalogue

    return [img for _, img in demo_catalogue(n, seed=3, image_size=256)]


def image_rows(name: str, model, images, batches: list[int]) -> list[list[object]]:  # type: ignore[no-untyped-def]
    """images/s of clip's eager encode_image and of ours, preprocessing included in both."""
    import torch

    from model_code import inference

    def eager(b: int) -> None:
        batch = inference.preprocess_images(model, images[:b])
        with torch.inference_mode():
            model.model.encode_image(batch)

    inference.prepare_graphs(model)  # steady state: the graph bulk indexing builds after 256 images
    rows = []
    for b in batches:
        repeat = 3 if b > 8 else 5
        t_eager = timings(lambda b=b: eager(b), repeat=repeat, warmup=1)
        t_ours = timings(lambda b=b: inference.encode_images(model, images[:b]), repeat=repeat, warmup=1)
        rows.append([name, b, b / median(t_eager), b / median(t_ours), median(t_eager) / median(t_ours)])
    return rows


def text_row(name: str, model, repeat: int) -> list[object]:  # type: ignore[no-untyped-def]
    """Latency of one query: clip eager, EOT truncation alone, ours, and an encoder cache hit (ms)."""
    import clip
    import torch

    from clipsearch.encoders import LocalEncoder
    from model_code import inference

    queries = iter([f"a photo of a {c} thing number {i}" for i, c in enumerate(["red", "blue"] * 2000)])

    def eager() -> None:
        with torch.inference_mode():
            model.model.encode_text(clip.tokenize([next(queries)]))

    def truncated() -> None:
        tokens = clip.tokenize([next(queries)])
        with torch.inference_mode():
            inference._encode_text_to_eot(model.model, tokens)

    slow = timings(eager, repeat)
    trunc = timings(truncated, repeat)
    fast = timings(lambda: inference.encode_texts(model, [next(queries)]), repeat)
    encoder = LocalEncoder(name, loaded=model)
    encoder.encode_texts(["a red circle"])
    cached = timings(lambda: encoder.encode_texts(["a red circle"]), repeat)
    return [name, median(slow) * 1e3, median(trunc) * 1e3, median(fast) * 1e3, pct(fast, 99) * 1e3,
            median(slow) / median(fast), median(cached) * 1e6]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,RN50,ViT-B/32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--text-repeat", type=int, default=30)
    ap.add_argument("--skip-images", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    batches = [int(b) for b in args.batches.split(",")]
    images = pictures(max(batches))
    img_rows, text_rows = [], []
    for name in args.models.split(","):
        model = load(name)
        text_rows.append(text_row(name, model, args.text_repeat))
        if not args.skip_images:
            img_rows += image_rows(name, model, images, batches)
        print(f"  done {name}", file=sys.stderr, flush=True)
    if img_rows:
        print("Image encoding (images/s, preprocessing included):\n")
        print(table(["model", "batch", "clip eager img/s", "ours img/s", "speed-up"], img_rows))
    print("\nText query latency (one query, ms; cache hit in µs):\n")
    print(table(["model", "clip encode_text p50", "EOT-truncated p50", "ours p50", "ours p99", "speed-up",
                 "cache hit µs"], text_rows))
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
