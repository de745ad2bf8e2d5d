#!/usr/bin/env python
"""Chapter 06's shipped recipe with a quarter of the image tokens: a token-reducing connector in place of its projector.

    python scripts/budget_seeds.py              # every row (about 25 minutes each on a CPU core of its own)
    python scripts/budget_seeds.py --rows 1 2   # some rows only (merged into the results file)

Row i trains `tiling.train_budget_vlm(SHIPPED_RECIPE with seed s, connector)`: the same tower, the
same pretrained GPT, the same stages, data and steps as chapter 06's model, but a connector that
turns the tower's 64 patch vectors into 16 image tokens (pixel shuffle on three seeds; 2 x 2
average pooling on seed 0, a C-Abstractor and 16 learned queries on seeds 0-2), and pixel
shuffle of 4 x 4 blocks into 4 tokens (seed 0). A row records its `image_tokens`, and the header's `row_settings`
lists (connector, seed, factor) for every row. A trained row is rounded to float16, as a shipped
file is stored, and answers 1,000 test and 1,000 compositional questions
per skill, scored as `vlm_seeds.py` scores chapter 06's model (`xattn_seeds.answers`), so that
the rows compare with data/results/vlm_seeds.json seed by seed. The results go to
data/results/budget_seeds.json, which chapter 10 prints and checks.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from xattn_seeds import answers, table  # noqa: E402  (the same scoring and table as chapters 06 and 07)

from mllm_scratch.vlm import SHIPPED_RECIPE  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "budget_seeds.json"
ROWS = (("pixelshuffle", 0, 2), ("pixelshuffle", 1, 2), ("pixelshuffle", 2, 2),  # (connector, seed, factor)
        ("avgpool", 0, 2), ("cabstractor", 0, 2), ("queries", 0, 2), ("pixelshuffle", 0, 4),
        ("queries", 1, 2), ("queries", 2, 2), ("cabstractor", 1, 2), ("cabstractor", 2, 2))


def run(i: int) -> dict:
    connector, seed, factor = ROWS[i]

    def compute() -> dict:
        import torch

        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tiling import train_budget_vlm
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model, _ = train_budget_vlm(replace(SHIPPED_RECIPE, seed=seed), connector, tokenizer, factor=factor,
                                    progress=False, device="cpu")  # on the CPU, as vlm_seeds.py trains chapter 06's
        round_to_dtype(model, torch.float16)
        scored = {split: answers(model, tokenizer, split) for split in ("test", "compositional")}
        return {"image_tokens": model.num_image_tokens, **scored}

    return search_rows.timed_row(i, {"connector": connector, "seed": seed}, compute)


def budget_table(rows: list[dict]) -> str:
    """`xattn_seeds.table`, one block per row, each under its connector's name."""
    return "\n".join(f"{r['connector']} ({r['image_tokens']} image tokens)\n{table([r])}"
                     for r in sorted(rows, key=lambda r: r["row"]))


def header() -> dict:
    return {"what": "chapter 06's shipped recipe with a token-reducing connector (scripts/budget_seeds.py)",
            "recipe": SHIPPED_RECIPE.to_dict(), "row_settings": [list(r) for r in ROWS], "questions_per_skill": 1000}


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{c}, seed {s}, {64 // f**2} tokens" for c, s, f in ROWS], run, RESULTS, header=header,
        table=budget_table,
        summary=lambda r: " test " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"]["accuracy"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
