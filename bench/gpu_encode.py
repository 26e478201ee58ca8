"""Image-embedding throughput on one NVIDIA GPU: RN50 and ViT-B/32 at batch 256 in fp16 and bf16
(randomly initialised real architectures, synthetic input tensors: the forward pass alone, which is what
SageMaker batch transform on a GPU instance would see once decoding keeps up).

    python bench/gpu_encode.py [--models RN50,ViT-B/32] [--batch 256] [--dtypes fp16,bf16] [--iters 20]

Weights are cast to the dtype except LayerNorm, which stays fp32 as in clip's own convert_weights;
RN50 runs channels-last (tensor cores). Each row also reports the worst cosine between the low-precision
vectors and fp32 ones on the same input, as a sanity check. Without a CUDA device it says so and exits 0;
`--device cpu --batch 2 --iters 1` exercises the same code on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table  # noqa: E402

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def tower(arch: str, dtype, device: str):  # type: ignore[no-untyped-def]
    """The visual tower of a random `arch`, cast to dtype (LayerNorm kept fp32) on device."""
    import torch

    from clipsearch.models import random_model

    visual = random_model(arch).model.visual.eval().to(device=device, dtype=dtype)
    for module in visual.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()  # clip's LayerNorm computes in fp32 and casts back
    if arch.startswith("RN"):
        visual = visual.to(memory_format=torch.channels_last)
    return visual


def measure(arch: str, dtype_name: str, batch: int, iters: int, device: str) -> list[object]:
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    model = tower(arch, dtype, device)
    size = int(model.input_resolution)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype)
    if arch.startswith("RN"):
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        sync()
        started = time.perf_counter()
        for _ in range(iters):
            out = model(x)
        sync()
        seconds = (time.perf_counter() - started) / iters
        reference = tower(arch, torch.float32, device)(x[:8].float())
        cosine = torch.nn.functional.cosine_similarity(out[:8].float(), reference, dim=-1).min().item()
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return [arch, dtype_name, batch, batch / seconds, seconds * 1e3, peak_gb, cosine]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="RN50,ViT-B/32")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA device found (torch.cuda.is_available() is False): nothing to measure. "
            "Run this on a machine with an NVIDIA GPU, or pass --device cpu to check the script."
        )
        return
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(0)
    else:
        name = "CPU (script check only)"
    print(f"device: {name}, torch {torch.__version__}\n")
    rows = [
        measure(arch, d, args.batch, args.iters, args.device)
        for arch in args.models.split(",")
        for d in args.dtypes.split(",")
    ]
    print(table(["model", "dtype", "batch", "images/s", "ms per batch", "peak GPU GB", "min cos vs fp32"], rows))


if __name__ == "__main__":
    main()
