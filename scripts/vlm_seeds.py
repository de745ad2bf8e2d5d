#!/usr/bin/env python
"""Chapter 06's shipped recipe on three seeds: accuracy per skill, and how often each yes/no answer is given.

    python scripts/vlm_seeds.py              # every row (seed 0: the shipped model, 2 minutes; the others 21-25 each)
    python scripts/vlm_seeds.py --rows 1 2   # some rows only (merged into the results file)

Each row is `replace(SHIPPED_RECIPE, seed=s)`: the projector's first values and the order of the batches
(seed 0 is the shipped checkpoint, which `build_checkpoints.py vlm` trains with this very
recipe). A trained row is rounded to float16, as the shipped file is stored. Each row answers
1,000 *test* and 1,000 *compositional* questions per skill, as `xattn_seeds.py` does for
chapter 07, and records how often the model says "yes" to the yes/no questions. The results
go to data/results/vlm_seeds.json, which chapter 06 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from xattn_seeds import answers, table  # noqa: E402  (the same scoring and table as chapter 07's seeds)

from mllm_scratch.vlm import SHIPPED_RECIPE, VLMRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "vlm_seeds.json"
SEEDS = (0, 1, 2)


def trained_and_scored(recipe: VLMRecipe) -> dict:
    """Train `recipe`, round it to float16 as a shipped file holds it, and score both splits."""
    import torch

    from mllm_scratch.checkpoints import round_to_dtype
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import train_vlm

    tokenizer = load_tokenizer()
    model, _ = train_vlm(recipe, tokenizer, log_every=500, progress=False, device="cpu")
    round_to_dtype(model, torch.float16)
    return {split: answers(model, tokenizer, split) for split in ("test", "compositional")}


def recipe_on_seeds(argv: list[str] | None, doc: str, recipe: VLMRecipe, results: Path, what: str) -> int:
    """The command line of a script that trains `recipe` on SEEDS and scores each row as this one does."""

    def run(i: int) -> dict:
        seed = SEEDS[i]
        return search_rows.timed_row(i, {"seed": seed}, lambda: trained_and_scored(replace(recipe, seed=seed)))

    return search_rows.main(
        argv, doc, [f"seed {s}" for s in SEEDS], run, results,
        header=lambda: {"what": what, "recipe": recipe.to_dict(), "questions_per_skill": 1000},
        table=table,
        summary=lambda r: " compositional " + ", ".join(f"{k} {v:.2f}" for k, v in r["compositional"]["accuracy"].items()),
    )


def run(i: int) -> dict:
    seed = SEEDS[i]

    def compute() -> dict:
        if seed != 0:
            return trained_and_scored(replace(SHIPPED_RECIPE, seed=seed))
        from mllm_scratch.tokenizer import load_tokenizer
        from mllm_scratch.vlm import load_vlm

        tokenizer, model = load_tokenizer(), load_vlm()  # the shipped model: this very recipe on seed 0
        return {split: answers(model, tokenizer, split) for split in ("test", "compositional")}

    return search_rows.timed_row(i, {"seed": seed}, compute)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" + (" (the shipped model)" if s == 0 else "") for s in SEEDS], run, RESULTS,
        header=lambda: {"what": "chapter 06's shipped recipe on three seeds (scripts/vlm_seeds.py)",
                        "recipe": SHIPPED_RECIPE.to_dict(), "questions_per_skill": 1000},
        table=table,
        summary=lambda r: " test " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"]["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
