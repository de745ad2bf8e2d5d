#!/usr/bin/env python
"""The recipe chapter 10 started with, on three seeds: stage 1 on reading questions alone.

    python scripts/tiled_reading_only_seeds.py              # every row (about 40 minutes each on one CPU thread)
    python scripts/tiled_reading_only_seeds.py --rows 1 2   # some rows only (merged into the results file)

`READING_ONLY` is `TiledRecipe()` with stage 1 as it first was: 3,000 steps of reading questions
alone (no other skill rehearsed), the LM at 5e-4 and the reading tower frozen. Row s trains it with
seed s and scores it as `tiled_seeds.py` scores the recipe (1,000 test and 1,000 compositional
questions per skill of 64 px scenes). The results go to data/results/tiled_reading_only_seeds.json,
which chapter 10 sets beside tiled_seeds.json.

Its rows were trained before `train()` cleared stale gradients (commit f8489fe): the clipping norm of
both stages counted the reading tower's last gradient from its own training, which a run today does
not. Re-run all three rows (delete the results file first) rather than adding rows to them.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from tiled_seeds import SEEDS, run  # noqa: E402
from xattn_seeds import table  # noqa: E402

from mllm_scratch.tiling import TiledRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "tiled_reading_only_seeds.json"
READING_ONLY = replace(TiledRecipe(), reading_steps=3000, reading_share=1.0, reading_lm_lr=5e-4, tile_tower_lr=0.0)


def main(argv: list[str] | None = None) -> int:
    return search_rows.seeds_main(argv, __doc__, SEEDS, lambda i: run(i, READING_ONLY), RESULTS,
                                  "chapter 10's first recipe, stage 1 on reading alone, on three seeds "
                                  "(scripts/tiled_reading_only_seeds.py)", READING_ONLY.to_dict(), table)


if __name__ == "__main__":
    sys.exit(main())
