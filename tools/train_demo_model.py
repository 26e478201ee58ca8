"""Train the bundled `demo` CLIP on generated pictures of coloured shapes (deterministic, CPU).

    .venv/bin/python tools/train_demo_model.py          # train, evaluate, write clipsearch/demo/data/demo.pt
    .venv/bin/python tools/train_demo_model.py --eval   # only evaluate an existing checkpoint

The model is clip-anytorch's own `clip.model.CLIP` (ViT tower, real 49,408-token vocabulary), saved as an
fp16 state dict so that `clip.load(path, jit=False)` builds it like any released checkpoint. It is scored
on pictures from `shapes.render_alt`, a renderer it never trains on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
import clip  # noqa: E402
from clip.model import CLIP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout, installed or not
from clipsearch.demo import shapes  # noqa: E402

DEFAULT_OUT = ROOT / "clipsearch" / "data" / "demo.pt"

# Widths are multiples of 64 because `clip.model.build_model` infers heads as width // 64. The token
# embedding (49,408 x 64) is most of the size budget, so the vision tower stays narrow.
ARCH = {
    "embed_dim": 128,
    "image_resolution": 64,
    "vision_layers": 4,
    "vision_width": 128,
    "vision_patch_size": 8,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 3,
}
RES = int(ARCH["image_resolution"])
TEMPLATES = (
    "{}",
    "{}",
    "a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
    "a photo of {} on a plain background",
)
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Caption:
    text: str
    colour: str
    shape: str
    size: str | None  # None: the caption does not mention size, so it fits both


def all_captions() -> list[Caption]:
    """Every caption the trainer may pair with a picture."""
    out = []
    for colour, shape in shapes.classes():
        for size in (None, *shapes.SIZES):
            phrase = f"{size} {colour} {shape}" if size else f"{colour} {shape}"
            # Both articles before a vowel: users type "a orange star" as often as "an orange star".
            articles = ("a", "an") if phrase[0] in "aeiou" else ("a",)
            for template in TEMPLATES:
                for article in articles:
                    out.append(Caption(template.format(f"{article} {phrase}"), colour, shape, size))
    return out


def to_model_input(pic: Image.Image) -> np.ndarray:
    """CLIP's preprocess up to ToTensor (bicubic resize of the short side, centre crop), as uint8 CHW."""
    w, h = pic.size
    scale = RES / min(w, h)
    pic = pic.resize((max(RES, round(w * scale)), max(RES, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (pic.width - RES) // 2, (pic.height - RES) // 2
    pic = pic.crop((left, top, left + RES, top + RES))
    return np.asarray(pic.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """`n` training pictures, already at model resolution, with their (colour, shape, size) labels."""
    rng = np.random.default_rng(seed)
    kinds = [(c, s, z) for c, s in shapes.classes() for z in shapes.SIZES]
    labels = [kinds[i % len(kinds)] for i in range(n)]
    images = np.empty((n, 3, RES, RES), dtype=np.uint8)
    for i, (c, s, z) in enumerate(labels):
        images[i] = to_model_input(shapes.render(c, s, z, rng=rng))
    return torch.from_numpy(images), labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cheap per-batch augmentation on uint8 pictures: flips, quarter turns, brightness and contrast."""
    x = x.float() / 255.0
    b = x.shape[0]
    flip_h = torch.rand(b, generator=gen) < 0.5
    x[flip_h] = x[flip_h].flip(3)
    turns = torch.randint(0, 4, (b,), generator=gen)
    for k in (1, 2, 3):
        sel = turns == k
        x[sel] = torch.rot90(x[sel], k, dims=(2, 3))
    # Keep the jitter mild: a strong per-channel gain would change which colour name is right.
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.3
    bright = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.16
    gain = 1.0 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.08
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright) * gain
    return (x.clamp(0.0, 1.0) - MEAN) / STD


def encode_text_prefix(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` run on the tokens up to the longest end-of-text only.

    Exact, because the causal mask keeps later positions out of the end-of-text feature; it saves
    most of the text tower's work on these short captions.
    """
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    x = x.permute(1, 0, 2)
    full_mask = model.transformer.resblocks[0].attn_mask
    for block in model.transformer.resblocks:
        block.attn_mask = full_mask[:n, :n]
    try:
        x = model.transformer(x)
    finally:
        for block in model.transformer.resblocks:
            block.attn_mask = full_mask
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric loss with multi-positive targets: every caption that fits a picture counts."""
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    pos = positives.float()
    loss_i = -(F.log_softmax(logits, dim=1) * (pos / pos.sum(1, keepdim=True))).sum(1).mean()
    loss_t = -(F.log_softmax(logits.t(), dim=1) * (pos.t() / pos.t().sum(1, keepdim=True))).sum(1).mean()
    return (loss_i + loss_t) / 2


def train(steps: int, seed: int, n_images: int, batch: int, lr: float) -> CLIP:
    """Train from scratch; identical arguments give an identical model on the same torch build."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)

    t0 = time.time()
    images, labels = make_dataset(n_images, seed)
    print(f"rendered {n_images} training pictures in {time.time() - t0:.0f}s", flush=True)

    captions = all_captions()
    tokens = clip.tokenize([c.text for c in captions])
    by_kind: dict[tuple[str, str, str | None], list[int]] = {}
    for i, c in enumerate(captions):
        by_kind.setdefault((c.colour, c.shape, c.size), []).append(i)
    cap_colour = np.array([c.colour for c in captions])
    cap_shape = np.array([c.shape for c in captions])
    cap_size = np.array([c.size or "" for c in captions])
    lab_colour = np.array([c for c, _, _ in labels])
    lab_shape = np.array([s for _, s, _ in labels])
    lab_size = np.array([z for _, _, z in labels])

    model = CLIP(**ARCH)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = rng.choice(n_images, size=batch, replace=False)
        # One caption per picture: a random template, with or without its size word.
        picked = []
        for i in idx:
            size = lab_size[i] if rng.random() < 0.5 else None
            options = by_kind[(lab_colour[i], lab_shape[i], size)]
            picked.append(options[int(rng.integers(len(options)))])
        uniq = np.unique(picked)
        positives = torch.from_numpy(
            (lab_colour[idx][:, None] == cap_colour[uniq][None, :])
            & (lab_shape[idx][:, None] == cap_shape[uniq][None, :])
            & ((cap_size[uniq][None, :] == "") | (lab_size[idx][:, None] == cap_size[uniq][None, :]))
        )
        x = augment(images[torch.from_numpy(idx)], gen)
        loss = contrastive_loss(
            model.encode_image(x),
            encode_text_prefix(model, tokens[torch.from_numpy(uniq)]),
            positives,
            model.logit_scale,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step:5d}/{steps} loss {loss.item():.4f} scale {model.logit_scale.exp().item():5.1f} "
                f"lr {lr_at(step):.2e} {time.time() - t0:6.0f}s",
                flush=True,
            )
    return model.eval()


def save(model: CLIP, out: Path) -> None:
    """fp16 state dict, the format of released CLIP weights (the embedding too, which halves the file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().half() for k, v in model.state_dict().items()}, out)


def eval_set(renderer: str, per_class: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """Pictures from one renderer at random resolutions (48..256 px), `per_class` per (colour, shape)."""
    draw = shapes.render_alt if renderer == "alt" else shapes.render
    rng = np.random.default_rng(seed)
    pics, labels = [], []
    for k, (colour, shape) in enumerate(shapes.classes()):
        for j in range(per_class):
            pics.append(draw(colour, shape, shapes.SIZES[j % 2], rng=rng))
            labels.append(k)
    return pics, labels


@torch.no_grad()
def evaluate(model: CLIP, preprocess: object, pics: list[Image.Image], labels: list[int]) -> dict[str, float]:
    """Text->image precision@k (k = class size, and 4), zero-shot accuracy, image->image 1-NN accuracy."""
    x = torch.stack([preprocess(p) for p in pics])  # type: ignore[operator]
    img = F.normalize(model.encode_image(x).float(), dim=-1)
    queries = clip.tokenize([shapes.title(c, s) for c, s in shapes.classes()])
    txt = F.normalize(model.encode_text(queries).float(), dim=-1)
    lab = torch.tensor(labels)
    per_class = int((lab == 0).sum())
    sims = txt @ img.t()  # queries x pictures
    cls = torch.arange(len(queries))[:, None]

    def precision(k: int) -> float:
        top = sims.topk(k, dim=1).indices
        return float((lab[top] == cls).float().mean())

    zero_shot = float((sims.argmax(dim=0) == lab).float().mean())
    self_sims = img @ img.t()
    self_sims.fill_diagonal_(-2.0)
    nn_acc = float((lab[self_sims.argmax(dim=1)] == lab).float().mean())
    return {
        f"text->image P@{per_class}": precision(per_class),
        "text->image P@4": precision(min(4, per_class)),
        "zero-shot accuracy": zero_shot,
        "image->image 1-NN accuracy": nn_acc,
    }


def report(path: Path, seed: int, per_class: int) -> None:
    """Load through `clip.load` exactly as clipsearch does, and print the scores on both renderers."""
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    print(
        f"checkpoint {path} {path.stat().st_size / 1e6:.2f} MB, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"input {model.visual.input_resolution}px, dim {model.text_projection.shape[1]}"
    )
    for renderer in ("alt", "own"):
        # Seeds far from the training seed: these pictures are never trained on.
        pics, labels = eval_set(renderer, per_class, seed + 10_000 + (renderer == "alt"))
        scores = evaluate(model, preprocess, pics, labels)
        line = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        print(f"{renderer:>3} renderer ({len(pics)} pictures): {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint to write (or to evaluate)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=32_000, help="training pictures rendered up front")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-per-class", type=int, default=16)
    parser.add_argument("--eval", action="store_true", help="only evaluate the checkpoint at --out")
    args = parser.parse_args()

    torch.set_num_threads(2)
    if not args.eval:
        t0 = time.time()
        model = train(args.steps, args.seed, args.images, args.batch, args.lr)
        save(model, args.out)
        print(f"trained in {(time.time() - t0) / 60:.1f} min, wrote {args.out}", flush=True)
    report(args.out, args.seed, args.eval_per_class)


if __name__ == "__main__":
    main()
