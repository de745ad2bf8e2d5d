#!/usr/bin/env python
"""Chapter 06's shipped recipe with 20,000 text-only questions in stage 2, on three seeds: is it the language prior?

    python scripts/text_questions_seeds.py              # every row (about 40 minutes each on one CPU thread)
    python scripts/text_questions_seeds.py --rows 1 2   # some rows only (merged into the results file)

The shipped model never names a green circle's shape right: in training, no "what shape is the
green object?" is ever answered "circle". If that came from the question's words, text that
names the held-out pairs should help. Each row is `replace(SHIPPED_RECIPE, colour_shape_prior=False,
text_questions=20_000, seed=s)` (the shipped recipe as it was before chapter 06's section 12 added
its colour-shape prior): stage 2's mix gains 20,000 colour and shape questions about scenes described in words
and never drawn, whose objects come from every (colour, shape) pair (`DescribedQADataset`); no
image shows a held-out pair. A row is trained, rounded to float16 as a shipped file is stored,
and scored as `vlm_seeds.py` scores the shipped recipe: 1,000 test and 1,000 compositional
questions per skill, plus the colour and shape questions about a held-out pair's object
("held_out"). The results go to data/results/text_questions_seeds.json, which appendix A1 prints
beside no_prior_seeds.json (the same seeds without the text questions).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_seeds import recipe_on_seeds  # noqa: E402  (train, round to float16, score; the same table)

from mllm_scratch.vlm import SHIPPED_RECIPE  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "text_questions_seeds.json"
RECIPE = replace(SHIPPED_RECIPE, colour_shape_prior=False, text_questions=20_000)


def main(argv: list[str] | None = None) -> int:
    return recipe_on_seeds(argv, __doc__, RECIPE, RESULTS,
                           "chapter 06's shipped recipe with 20,000 text-only questions in stage 2, on three "
                           "seeds (scripts/text_questions_seeds.py)")


if __name__ == "__main__":
    sys.exit(main())
