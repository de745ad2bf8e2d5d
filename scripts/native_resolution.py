#!/usr/bin/env python
"""Chapter 11's measurement on three seeds: which positions let a ViT see on canvases it never saw?

    python scripts/native_resolution.py              # every row (about 2 minutes each on one CPU thread, 45 minutes in all)
    python scripts/native_resolution.py --rows 0 1   # some rows only (merged into the results file)

Each row trains `native.train_native` (the leftmost-shape task, 1,500 steps on 20,000
scenes) with one way of giving patches their place and one seed, then scores 1,000 *test*
scenes on each canvas of `native.CANVASES` (24, 32, 40 and 48 px squares and a 32 x 64 strip;
the shapes keep their pixel size on all of them):

- **learned** / **sincos**: absolute positions, trained on 32 x 32, resized to each test
  grid (bicubic interpolation of the table; sin-cos codes stretched onto the trained range);
- **rope2d**: 2-D RoPE trained on 32 x 32. Scored twice: with positions extended over the
  bigger grid (what RoPE does by itself), and **squeezed** onto the trained range (RoPE's
  position interpolation, Chen et al. 2023; the same weights);
- **rope2d, mixed** / **learned, mixed**: trained on five canvases, none of them a test
  canvas other than 32 x 32 (28, 32 and 36 px squares, 28 x 44 and 44 x 28), one canvas per
  batch: native-resolution training, as NaViT and Pixtral do;
- **base 100**: the two 2-D RoPE rows again with RoPE's base 100 instead of 10,000, so
  that the 6 pairs per axis turn from 1 down to 0.02 radians per patch (base 10,000: down to
  0.0005): wavelengths sized for grids of 8 to 16 patches, not for texts of thousands of tokens.

The results go to data/results/native_resolution.json, which chapter 11 prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.native import CANVASES, NativeRecipe, accuracy_by_canvas, test_sets, train_native  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "native_resolution.json"
TEST_SCENES = 1_000  # per canvas
MIXED = ((28, 28), (32, 32), (36, 36), (28, 44), (44, 28))
METHODS = {  # name: (position, train_canvases, rope_base)
    "learned": ("learned", ((32, 32),), 10_000.0),
    "sincos": ("sincos", ((32, 32),), 10_000.0),
    "rope2d": ("rope2d", ((32, 32),), 10_000.0),
    "rope2d, mixed": ("rope2d", MIXED, 10_000.0),
    "learned, mixed": ("learned", MIXED, 10_000.0),
    "rope2d, base 100": ("rope2d", ((32, 32),), 100.0),
    "rope2d, mixed, base 100": ("rope2d", MIXED, 100.0),
}
SEEDS = (0, 1, 2)
ROWS = [(name, seed) for name in METHODS for seed in SEEDS]


def run(i: int) -> dict:
    name, seed = ROWS[i]
    position, canvases, base = METHODS[name]
    recipe = NativeRecipe(seed=seed, train_canvases=canvases, rope_base=base)

    def compute() -> dict:
        model, history = train_native(position, recipe)
        sets = test_sets(TEST_SCENES)
        out = {"accuracy": accuracy_by_canvas(model, sets), "final_loss": round(history.loss[-1], 4)}
        if position == "rope2d":
            out["accuracy, squeezed"] = accuracy_by_canvas(model, sets, squeeze=True)
        return out

    labels = {"name": name, "seed": seed, "position": position, "train_canvases": [list(c) for c in canvases]}
    if position == "rope2d":
        labels["rope_base"] = base
    return search_rows.timed_row(i, labels, compute)


def table(rows: list[dict]) -> str:
    lines = [f"{'method':28s} seed " + " ".join(f"{c:>8s}" for c in CANVASES)]
    for r in sorted(rows, key=lambda r: r["row"]):
        for key, label in (("accuracy", r["name"]), ("accuracy, squeezed", r["name"] + ", squeezed")):
            if key in r:
                lines.append(f"{label:28s} {r['seed']:4d} " + " ".join(f"{r[key][c]:8.3f}" for c in CANVASES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    recipe = NativeRecipe()
    return search_rows.main(
        argv, __doc__, [f"{name}, seed {seed}" for name, seed in ROWS], run, RESULTS,
        header=lambda: {"what": "the leftmost shape on canvases of other sizes (scripts/native_resolution.py)",
                        "steps": recipe.steps, "train_scenes": recipe.train_scenes, "test_scenes": TEST_SCENES,
                        "canvases": {k: list(v) for k, v in CANVASES.items()}},
        table=table,
        summary=lambda r: " " + ", ".join(f"{c} {v:.2f}" for c, v in r["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
