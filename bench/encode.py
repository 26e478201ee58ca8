"""Encoder speed on this CPU, ours vs clip's eager reference measured in the same run: image throughput at
several batch sizes and text-query latency, for the demo model and randomly initialised RN50 / ViT-B/32
(compute does not depend on the weight values).

    python bench/encode.py [--models demo,RN50,ViT-B/32] [--batches 1,8,32] [--threads 2]

Text columns: clip's encode_text (all 77 positions) and the same model run only up to the end-of-text
token through clip's own blocks (the first lever, as first written), both on a model exactly as clip
builds it; then ours as served (model_code.encode_texts, prepared by model_code.prepare_model), plus a
LocalEncoder cache hit. The three text variants run interleaved, query by query, so that they share the
machine's state; each sees every query text once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_model as load  # noqa: E402
from common import machine, median, pct, table, timings


def pictures(n: int):  # type: ignore[no-untyped-def]
    from clipsearch.demo.shapes import demo_catalogue

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


def truncated_eager(model: Any, tokens: Any) -> Any:
    """The first lever alone, as it was first written: clip's own blocks (nn.MultiheadAttention with the
    causal mask), run only up to the last end-of-text token."""
    import torch

    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    x = x.permute(1, 0, 2)
    mask = model.build_attention_mask()[:length, :length]
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def untouched(name: str) -> Any:
    """The same model as load_model(name) gives, as clip builds it: no prepare_model changes."""
    import torch

    from model_code import inference

    clip = inference._import_clip()
    if name == "demo":
        from clipsearch import models

        source = models.resolve("demo")
        return clip.load(str(Path(source.model_dir) / source.name), device="cpu", jit=False)[0].eval()
    from clipsearch.models import ARCHITECTURES

    torch.manual_seed(0)
    return clip.model.CLIP(*ARCHITECTURES[name]).eval()


def text_row(name: str, model, repeat: int) -> list[object]:  # type: ignore[no-untyped-def]
    """Latency of one query: clip eager, EOT truncation alone, ours, and an encoder cache hit (ms)."""
    import time

    import clip
    import torch

    from clipsearch.encoders import LocalEncoder
    from model_code import inference

    reference = untouched(name)

    def eager(text: str) -> None:
        reference.encode_text(clip.tokenize([text]))

    def truncated(text: str) -> None:
        truncated_eager(reference, clip.tokenize([text]))

    def ours(text: str) -> None:
        inference.encode_texts(model, [text])

    variants = [eager, truncated, ours]
    times: list[list[float]] = [[], [], []]
    with torch.inference_mode():
        for i in range(repeat + 2):
            text = f"a photo of a {['red', 'blue'][i % 2]} thing number {i}"
            for j in range(3):  # rotate the order so that no variant always follows the same one
                k = (i + j) % 3
                started = time.perf_counter()
                variants[k](text)
                if i >= 2:  # two warm-up rounds
                    times[k].append(time.perf_counter() - started)
    slow, trunc, fast = times
    encoder = LocalEncoder(name, loaded=model)
    encoder.encode_texts(["a red circle"])
    cached = timings(lambda: encoder.encode_texts(["a red circle"]), repeat)
    return [
        name,
        median(slow) * 1e3,
        median(trunc) * 1e3,
        median(fast) * 1e3,
        pct(fast, 99) * 1e3,
        median(slow) / median(fast),
        median(cached) * 1e6,
    ]


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
    print(
        f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
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
    print(
        table(
            ["model", "clip encode_text p50", "EOT-truncated p50", "ours p50", "ours p99", "speed-up", "cache hit µs"],
            text_rows,
        )
    )
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
