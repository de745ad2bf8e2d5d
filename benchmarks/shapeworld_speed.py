"""Is ShapeWorld ever the bottleneck? Data generation speed next to what a tiny training step consumes.

Measured side by side in one run, one CPU thread:
- scenes/s for generate_scene + render (+ to_tensor) at 32/64/128 px, with and without text;
- clips/s for generate_clip + render_clip (8 frames, 32 px);
- examples/s that a small conv net consumes in forward + backward on batches of 64 images,
  at 32 px (the book's default) and at the scene's own size.

Usage: python benchmarks/shapeworld_speed.py [--quick]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mllm_scratch import shapeworld as sw  # noqa: E402


def rate(fn, n: int) -> float:
    """Calls of fn per second, best of 3 runs of n calls (after one warm-up call)."""
    fn(0)
    best = float("inf")
    for r in range(3):
        start = time.perf_counter()
        for i in range(n):
            fn(1 + r * n + i)
        best = min(best, time.perf_counter() - start)
    return n / best


def training_rate(steps: int, size: int = 32, batch: int = 64) -> float:
    """Examples per second consumed by forward + backward + step of a small conv net on size x size images."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, size/2, size/2)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(8),  # (B, 32, 8, 8)
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, len(sw.SHAPES)),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, len(sw.SHAPES), (batch,))

    def step(_):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return rate(step, steps) * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 100 if args.quick else 1000

    steps = 5 if args.quick else 30
    train = {size: training_rate(max(3, steps * 32 // size), size) for size in (32, 64, 128)}
    rows = []
    for size in (32, 64, 128):
        for text in (0.0, 1.0):
            config = sw.ShapeWorldConfig.preset(size, text_probability=text)
            r = rate(lambda s: sw.to_tensor(sw.render(sw.generate_scene(s, config))), n)
            rows.append((f"scene {size:>3} px {'text' if text else 'no text'}", r, "scenes/s", r, size))
    r = rate(lambda s: sw.description(sw.generate_scene(s)), n)
    rows.append(("description (no render)", r, "texts/s", r, 32))
    r = rate(lambda s: sw.to_tensor(sw.render_clip(sw.generate_clip(s, 8))), max(20, n // 8))
    rows.append(("clip 8 frames 32 px", r, "clips/s", 8 * r, 32))  # a clip feeds 8 frames

    print("training step: small conv net, forward + backward + AdamW, batch 64, 1 thread")
    for size, t in train.items():
        print(f"  {size:>3} px: {t:8.0f} examples/s")
    header = f"{'data (generate + render + to_tensor)':<38} {'rate':>8} {'unit':<9}"
    print(f"{header} {'vs 32 px step':>13} {'vs same-size step':>17}")
    for name, r, unit, images, size in rows:
        print(f"{name:<38} {r:8.0f} {unit:<9} {images / train[32]:12.1f}x {images / train[size]:16.1f}x")


if __name__ == "__main__":
    main()
