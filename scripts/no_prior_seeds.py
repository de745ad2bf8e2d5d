#!/usr/bin/env python
"""Chapter 06's shipped recipe without its colour-shape prior, on three seeds: what the prior is measured against.

    python scripts/no_prior_seeds.py              # every row (about 40 minutes each on one CPU thread)
    python scripts/no_prior_seeds.py --rows 1 2   # some rows only (merged into the results file)

Each row is `replace(SHIPPED_RECIPE, colour_shape_prior=False, seed=s)`: stage 2's plain loss, with
no bias expert. A row is trained, rounded to float16 as a shipped file is stored, and scored as
`vlm_seeds.py` scores the shipped recipe: 1,000 test and 1,000 compositional questions per skill,
the colour and shape questions about a held-out pair's object ("held_out"), and the same questions
split by the pair asked about ("by_pair"). The results go to data/results/no_prior_seeds.json,
which chapter 06's section 12 prints beside vlm_seeds.json (the same seeds with the prior) and
appendix A1 beside text_questions_seeds.json.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_seeds import recipe_on_seeds  # noqa: E402  (train, round to float16, score; the same table)

from mllm_scratch.vlm import SHIPPED_RECIPE  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "no_prior_seeds.json"
RECIPE = replace(SHIPPED_RECIPE, colour_shape_prior=False)


def main(argv: list[str] | None = None) -> int:
    return recipe_on_seeds(argv, __doc__, RECIPE, RESULTS,
                           "chapter 06's shipped recipe without its colour-shape prior, on three seeds "
                           "(scripts/no_prior_seeds.py)")


if __name__ == "__main__":
    sys.exit(main())
