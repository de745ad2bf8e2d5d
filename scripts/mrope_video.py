#!/usr/bin/env python
"""M-RoPE against 1-D RoPE on chapter 09's video questions, on three seeds.

    python scripts/mrope_video.py              # every row (about 5 minutes each on one CPU thread, 45 minutes in all)
    python scripts/mrope_video.py --rows 0 1   # some rows only (merged into the results file)

Each row trains `native.VideoGridLM` from scratch: 8 frames of each clip go through chapter
05's frozen image tower, each frame's 8 x 8 patch vectors are averaged to a 4 x 4 grid (with
their change since the previous frame, as chapter 09 found motion needs), and the 128 video
tokens come before the question in a small GPT (64 wide, 3 blocks). The only difference
between the rows of a seed is how the GPT numbers the tokens:

- **rope**: 1-D RoPE; a token's position is its index in the sequence, so a video token's
  frame, row and column are folded into one number (frame * 16 + row * 4 + column);
- **mrope**: M-RoPE (Qwen2-VL); a video token has (frame, row, column) on three axes, and
  the question continues after the largest index. Qwen2-VL's contiguous sections give time
  the fastest-turning pairs and width the slowest: with 8 pairs per head here, time gets 2
  (1 and 0.32 radians per step), height 3 (0.1 to 0.01) and width 3 (0.003 to 0.0003);
- **mrope-interleaved**: the same indices, with the pairs dealt to time, height and width in
  turn (Qwen3-VL's interleaved M-RoPE), so each axis gets fast and slow pairs.

Each trains 2,000 steps on 8,000 *train* clips and are scored on 1,000 *test* clips (250 per
skill), exact match of the whole answer. The results go to data/results/mrope_video.json,
which chapter 11 prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.native import VideoGridRecipe, train_video_grid, video_grid_accuracy, video_grid_features  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "mrope_video.json"
MOTION = True
SEEDS = (0, 1, 2)
ROWS = [(position, seed) for seed in SEEDS for position in ("rope", "mrope")] + \
    [("mrope-interleaved", seed) for seed in SEEDS]
_FEATURES: dict = {}


def features(recipe: VideoGridRecipe) -> tuple:
    """Train and test features, computed once per process (they do not depend on the seed)."""
    if not _FEATURES:
        _FEATURES["train"] = video_grid_features("train", recipe.train_clips, recipe)
        _FEATURES["test"] = video_grid_features("test", recipe.test_clips, recipe)
    return _FEATURES["train"], _FEATURES["test"]


def run(i: int) -> dict:
    position, seed = ROWS[i]
    recipe = VideoGridRecipe(seed=seed, motion=MOTION)

    def compute() -> dict:
        train_data, test_data = features(recipe)
        model, history = train_video_grid(position, recipe, train_data)
        return {"accuracy": video_grid_accuracy(model, test_data), "final_loss": round(history.loss[-1], 4)}

    return search_rows.timed_row(i, {"position": position, "seed": seed}, compute)


def table(rows: list[dict]) -> str:
    skills = ("direction", "mover", "order", "appearing", "all")
    lines = [f"{'position':17s} seed " + " ".join(f"{s:>9s}" for s in skills)]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['position']:17s} {r['seed']:4d} " + " ".join(f"{r['accuracy'][s]:9.3f}" for s in skills))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    recipe = VideoGridRecipe(motion=MOTION)
    return search_rows.main(
        argv, __doc__, [f"{p}, seed {s}" for p, s in ROWS], run, RESULTS,
        header=lambda: {"what": "M-RoPE vs 1-D RoPE on chapter 09's video questions (scripts/mrope_video.py)",
                        "recipe": recipe.to_dict()},
        table=table,
        summary=lambda r: " " + ", ".join(f"{k} {v:.2f}" for k, v in r["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
