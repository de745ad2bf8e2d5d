#!/usr/bin/env python
"""Chapter 03's comparisons: [CLS] or mean pooling, learned or sin-cos positions, a ViT or a small CNN.

    python scripts/ch03_vit_comparisons.py             # every row (about ten minutes on one idle CPU thread)
    python scripts/ch03_vit_comparisons.py --rows 0 3  # some rows only (merged into the results file)

Each row trains one model with one seed (its first weights and the order of the batches) on
chapter 03's task, the shape of the one object in a 32 px ShapeWorld image (4,000 training
images, batches of 64, AdamW at 3e-3 with warm-up and cosine decay, on one thread with
deterministic kernels), and scores it on the chapter's 1,000 test images and on the same
1,000 test scenes drawn at 48 px:

- **chapter** (seeds 0, 1, 2): the chapter's ViT ([CLS], learned positions) trained the
  chapter's 600 steps. It records the test accuracy and how similar the learned position
  codes of neighbouring patches are against those of patches 6 or more apart, the check the
  chapter asserts.
- **comparisons** (seeds 0, 1, 2), each trained 300 steps, half the chapter's run (about five
  passes over the images), where the models have not all reached the ceiling yet and so can
  differ. The ViT (87,557 to 90,677 parameters) with [CLS] and learned positions (the chapter's),
  with mean pooling, with 2-D sin-cos positions as the package builds them, with the sin-cos
  codes scaled down by 0.15 (to about a patch vector's size at initialisation), and with no
  positions at all (a zero table); and a small CNN (`ConvNetClassifier`, three 3 x 3
  convolutions, 93,893 parameters). Validation accuracy every 50 steps gives the learning curves.

At 48 px a ViT with 4 px patches sees a 12 x 12 grid instead of 8 x 8: `resize_vit` interpolates
a learned position table (bicubic and bilinear) and recomputes a sin-cos one, either on
positions 0..11 ("extend") or stretched onto the trained 0..7 range ("stretch"), scaled as in
training; the CNN's global average pool takes any size as it is. No model is trained at 48 px.

The results go to data/results/ch03_vit_comparisons.json (with the PyTorch version); chapter 03
prints them and checks its conclusions on every seed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)


RESULTS = ROOT / "data" / "results" / "ch03_vit_comparisons.json"
SEEDS = (0, 1, 2)
CHAPTER_STEPS, SHORT_STEPS, EVAL_EVERY = 600, 300, 50
SMALL_SINCOS = 0.15  # shrinks the sin-cos codes (norm 4.9) to about a patch vector's norm at initialisation (0.77)
VARIANTS = {  # name: (pool, positions, scale of the sin-cos table), or None for the CNN
    "cls_learned": ("cls", "learned", 1.0),
    "mean_learned": ("mean", "learned", 1.0),
    "cls_sincos": ("cls", "sincos", 1.0),
    "cls_sincos_small": ("cls", "sincos", SMALL_SINCOS),
    "cls_none": ("cls", "sincos", 0.0),  # a zero table: no position information at all
    "cnn": None,
}
ROWS: list[tuple[str, int]] = [("chapter", s) for s in SEEDS] + [(v, s) for v in VARIANTS for s in SEEDS]


@functools.cache
def data() -> dict:
    import torch

    from mllm_scratch.shapeworld import ShapeClassificationDataset, ShapeWorldConfig

    def as_tensors(split, size, image_size=32):
        config = ShapeWorldConfig(image_size=image_size, max_objects=1, text_probability=0.0)
        ds = ShapeClassificationDataset(split, size, config, task="shape")
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images), torch.tensor(labels)

    out = {"train": as_tensors("train", 4000), "val": as_tensors("val", 1000), "test": as_tensors("test", 1000),
           "test48": as_tensors("test", 1000, 48)}
    assert torch.equal(out["test"][1], out["test48"][1]), "the 48 px test scenes should be the 32 px ones, redrawn"
    return out


def accuracy(model, images, labels) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return round((model(images).argmax(-1) == labels).float().mean().item(), 4)


def near_far(pos) -> tuple[float, float]:
    """Mean cosine similarity of the position codes of neighbouring patches, and of patches >= 6 apart."""
    import torch
    import torch.nn.functional as F

    grid = int(pos.shape[0] ** 0.5)
    sims = F.normalize(pos, dim=-1) @ F.normalize(pos, dim=-1).T
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    dist = (rc[:, None] - rc[None]).abs().sum(-1)  # Manhattan distance between patches
    return round(sims[dist == 1].mean().item(), 4), round(sims[dist >= 6].mean().item(), 4)


def run_variant(variant: str, seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from mllm_scratch.runtime import count_parameters
    from mllm_scratch.train import TrainConfig, batches, train
    from mllm_scratch.vit import ConvNetClassifier, ViTClassifier, ViTConfig, resize_vit

    d = data()
    (train_x, train_y), (val_x, val_y) = d["train"], d["val"]
    (test_x, test_y), (test48_x, test48_y) = d["test"], d["test48"]
    chapter = variant == "chapter"
    pool, pos, scale = ("cls", "learned", 1.0) if chapter else (VARIANTS[variant] or (None, None, None))

    def scaled(vit):  # a sin-cos table is a buffer: scale it in place (1.0 leaves it as the package builds it)
        if pos == "sincos":
            vit.encoder.pos_embed.mul_(scale)
        return vit

    torch.manual_seed(seed)
    if pool is None:
        model = ConvNetClassifier(5)
    else:
        model = scaled(ViTClassifier(ViTConfig(image_size=32, patch_size=4, dim=48, depth=3, num_heads=4,
                                               pos_embedding=pos, pool=pool, num_classes=5)))
    steps = CHAPTER_STEPS if chapter else SHORT_STEPS
    config = TrainConfig(steps=steps, lr=3e-3, warmup_steps=30, log_every=0, progress=False,
                         eval_every=0 if chapter else EVAL_EVERY)
    history = train(model, batches(TensorDataset(train_x, train_y), 64, seed=seed),
                    lambda m, b: F.cross_entropy(m(b[0]), b[1]), config, device="cpu",
                    evaluate=None if chapter else (lambda m: {"val_acc": accuracy(m, val_x, val_y)}))
    row = {"steps": steps, "params": count_parameters(model), "test_32": accuracy(model, test_x, test_y)}
    if not chapter:
        row["val_curve"] = [[s, round(m["val_acc"], 4)] for s, m in history.evals]
    if pool is None:
        row["test_48"] = {"as_is": accuracy(model, test48_x, test48_y)}
    elif pos == "learned":
        row["test_48"] = {mode: accuracy(resize_vit(model, 48, mode=mode), test48_x, test48_y)
                          for mode in ("bicubic", "bilinear")}
        row["near"], row["far"] = near_far(model.encoder.pos_embed[0, model.encoder.num_prefix:].detach())
    else:
        row["test_48"] = {how: accuracy(scaled(resize_vit(model, 48, sincos=how)), test48_x, test48_y)
                          for how in ("extend", "stretch")}
    return row


def run(index: int) -> dict:
    variant, seed = ROWS[index]
    return search_rows.timed_row(index, {"variant": variant, "seed": seed}, lambda: run_variant(variant, seed))


def table(rows: list[dict]) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: r["row"]):
        extra = f" near {r['near']} far {r['far']}" if "near" in r else ""
        lines.append(f"{r['variant']:12s} seed {r['seed']}: {r['steps']} steps, test {r['test_32']:.3f}, "
                     f"48 px {r['test_48']}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{v}, seed {s}" for v, s in ROWS], run, RESULTS,
        header=lambda: {"what": "chapter 03's comparisons, one row per model and seed "
                                "(scripts/ch03_vit_comparisons.py)",
                        "chapter_steps": CHAPTER_STEPS, "short_steps": SHORT_STEPS, "eval_every": EVAL_EVERY},
        table=table,
        summary=lambda r: f": test {r['test_32']:.3f}, 48 px {r['test_48']}",
    )


if __name__ == "__main__":
    sys.exit(main())
