#!/usr/bin/env python
"""Chapter 06's two stages alone, `VLMRecipe()`, on three seeds: the recipe before the spatial switches.

    python scripts/vlm_two_stage_seeds.py              # every row (21-25 minutes each on one CPU thread)
    python scripts/vlm_two_stage_seeds.py --rows 1 2   # some rows only (merged into the results file)

Each row is `VLMRecipe(seed=s)` (LLaVA's two stages, one-word answers, no place codes), trained,
rounded to float16 as a shipped file is stored, and scored as `vlm_seeds.py` scores the shipped
recipe: 1,000 test and 1,000 compositional questions per skill, and how often each yes/no answer
is given. The results go to data/results/vlm_two_stage_seeds.json, which chapter 06 prints
beside vlm_longer.json (the same recipe with a longer stage 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from vlm_seeds import trained_and_scored  # noqa: E402  (train, round to float16, score)
from xattn_seeds import table  # noqa: E402

from mllm_scratch.vlm import VLMRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "vlm_two_stage_seeds.json"
SEEDS = (0, 1, 2)


def run(i: int) -> dict:
    seed = SEEDS[i]
    return search_rows.timed_row(i, {"seed": seed}, lambda: trained_and_scored(VLMRecipe(seed=seed)))


def main(argv: list[str] | None = None) -> int:
    return search_rows.seeds_main(argv, __doc__, SEEDS, run, RESULTS,
                                  "chapter 06's two stages, VLMRecipe(), on three seeds (scripts/vlm_two_stage_seeds.py)",
                                  VLMRecipe().to_dict(), table)


if __name__ == "__main__":
    sys.exit(main())
