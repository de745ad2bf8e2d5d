#!/usr/bin/env python
"""Chapter 06's recipe with a longer stage 2 (9,000 steps instead of 6,000) on three seeds: does longer help?

    python scripts/vlm_longer.py              # every row (32-42 minutes each on one CPU thread)
    python scripts/vlm_longer.py --rows 1 2   # some rows only (merged into the results file)

Each row is `VLMRecipe(seed=s)` with `stage2_steps=9000`, trained, rounded to float16 as a
shipped file is stored, and scored exactly as `vlm_seeds.py` scores the shipped recipe: 1,000
*test* and 1,000 *compositional* questions per skill. The results go to
data/results/vlm_longer.json, which chapter 06 prints beside vlm_two_stage_seeds.json (the same recipe, 6,000 steps).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from vlm_seeds import trained_and_scored  # noqa: E402  (train, round to float16, score: as vlm_seeds.py)
from xattn_seeds import table  # noqa: E402

from mllm_scratch.vlm import VLMRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "vlm_longer.json"
SEEDS = (0, 1, 2)
STAGE2_STEPS = 9000


def recipe(seed: int = 0) -> VLMRecipe:
    return replace(VLMRecipe(seed=seed), stage2_steps=STAGE2_STEPS)


def run(i: int) -> dict:
    seed = SEEDS[i]
    return search_rows.timed_row(i, {"seed": seed}, lambda: trained_and_scored(recipe(seed)))


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" for s in SEEDS], run, RESULTS,
        header=lambda: {"what": f"chapter 06's recipe with stage 2 of {STAGE2_STEPS} steps, on three seeds "
                                "(scripts/vlm_longer.py)",
                        "recipe": recipe().to_dict(), "questions_per_skill": 1000},
        table=table,
        summary=lambda r: " test " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"]["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
