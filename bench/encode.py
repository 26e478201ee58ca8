"""Encoder speed on this CPU: image throughput at several batch sizes and text-query latency,
for the demo model and randomly initialised RN50 / ViT-B/32 (compute does not depend on weights).

    python bench/encode.py [--models demo,RN50,ViT-B/32] [--batches 1,8,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, pct, table, timings  # noqa: E402


def load(name: str):  # type: ignore[no-untyped-def]
    from clipsearch import models
    from model_code import inference

    if name == "demo":
        source = models.resolve("demo")
        return inference.load_model(source.name, source.model_dir)
    return models.random_model(name)


def pictures(n: int):  # type: ignore[no-untyped-def]
    from clipsearch.shapes import demo_catalogue

    return [img for _, img in demo_catalogue(n, seed=3, image_size=256)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,RN50,ViT-B/32")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-repeat", type=int, default=30)
    args = ap.parse_args()
    import torch

    from model_code import inference

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads\n")
    batches = [int(b) for b in args.batches.split(",")]
    images = pictures(max(batches))
    img_rows, text_rows = [], []
    for name in args.models.split(","):
        model = load(name)
        for b in batches:
            t = timings(lambda model=model, b=b: inference.encode_images(model, images[:b]),
                        repeat=3 if b > 8 else 5, warmup=1)
            img_rows.append([name, b, b / median(t)])
        queries = [f"a photo of a {c} thing number {i}" for i, c in enumerate(["red", "blue"] * 50)]
        cycle = iter(queries * 10)
        fast = timings(lambda model=model, cycle=cycle: inference.encode_texts(model, [next(cycle)]),
                       args.text_repeat)

        def eager(model=model, cycle=cycle) -> None:  # type: ignore[no-untyped-def]
            import clip

            with torch.inference_mode():
                model.model.encode_text(clip.tokenize([next(cycle)]))

        slow = timings(eager, args.text_repeat)
        text_rows.append([name, median(slow) * 1e3, median(fast) * 1e3, pct(fast, 99) * 1e3,
                          median(slow) / median(fast)])
        print(f"  done {name}", file=sys.stderr, flush=True)
    print("Image encoding (images/s, preprocessing included):\n")
    print(table(["model", "batch", "images/s"], img_rows))
    print("\nText query latency (one query, ms):\n")
    print(table(["model", "clip encode_text p50", "ours p50", "ours p99", "speed-up"], text_rows))


if __name__ == "__main__":
    main()
