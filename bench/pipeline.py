"""The indexing pipeline's images/s as a ratio of the bare model forward on pre-decoded tensors.

Goal: >= 0.9 for RN50, i.e. decoding, resizing and SQLite writes are hidden behind the forward.

    python bench/pipeline.py [--model RN50] [--images 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import torch

    from clipsearch import models
    from clipsearch.demo import write_catalogue
    from clipsearch.encoders import LocalEncoder
    from clipsearch.index.embedded import EmbeddedIndex
    from clipsearch.ingest import index_paths
    from model_code import inference

    torch.set_num_threads(args.threads)
    if args.model == "demo":
        source = models.resolve("demo")
        loaded = inference.load_model(source.name, source.model_dir)
    else:
        loaded = models.random_model(args.model)
    encoder = LocalEncoder(args.model, loaded=loaded)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pics"
        write_catalogue(folder, count=args.images)
        from PIL import Image

        # Bare forward: tensors already decoded and preprocessed, so only the model runs.
        tensors = [loaded.preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
        batches = [torch.stack(tensors[i:i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
        with torch.inference_mode():
            loaded.model.encode_image(batches[0])
            started = time.perf_counter()
            for batch in batches:
                loaded.model.encode_image(batch)
            bare = len(tensors) / (time.perf_counter() - started)
        index = EmbeddedIndex(Path(tmp) / "idx", model=args.model, dim=encoder.dim)
        summary = index_paths([folder], encoder, index, batch_size=args.batch_size, workers=args.workers)
    pipeline = summary.images_per_second
    print(f"machine: {machine()}, torch {torch.__version__}, {args.threads} threads\n")
    print(table(["model", "images", "batch", "bare forward img/s", "pipeline img/s", "ratio"],
                [[args.model, args.images, args.batch_size, bare, pipeline, pipeline / bare]]))


if __name__ == "__main__":
    main()
