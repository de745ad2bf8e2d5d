#!/usr/bin/env python
"""Chapter 12's chat model on three seeds: per-turn accuracy on held-out dialogues, two-image questions, POPE.

    python scripts/chat_seeds.py              # every row (seed 0: the shipped model, a few minutes; the others about an hour each)
    python scripts/chat_seeds.py --rows 1 2   # some rows only (merged into the results file)

Row s is `ChatRecipe()` with seed s (the order of the batches; seed 0 is the shipped checkpoint, which
`build_checkpoints.py chat_vlm` trains with this very recipe), tuned from chapter 06's shipped model.
A trained row is rounded to float16, as the shipped file is stored, and scored by `chat.chat_scores`:
1,000 held-out dialogues without a caption (each turn given the true history), 1,000 two-image
questions with and without the one-image control, and 1,000 POPE questions. The results go to
data/results/chat_seeds.json, which chapter 12 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.chat import CHAT_EVAL, ChatRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "chat_seeds.json"
SEEDS = (0, 1, 2)


def run(i: int) -> dict:
    seed = SEEDS[i]

    def compute() -> dict:
        import torch

        from mllm_scratch.chat import chat_scores, load_chat_vlm, train_chat_vlm
        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        if seed == 0:
            model = load_chat_vlm()  # the shipped model: this very recipe on seed 0
        else:
            model, _ = train_chat_vlm(replace(ChatRecipe(), seed=seed), tokenizer, progress=False, device="cpu")
            round_to_dtype(model, torch.float16)
        return chat_scores(model, tokenizer)

    return search_rows.timed_row(i, {"seed": seed}, compute)


def table(rows: list[dict]) -> str:
    lines = ["seed  per turn  " + "  ".join(f"{s:>9s}" for s in sorted(rows[0]["dialogue"]["by_skill"]))
             + "  two images (one-image control)  POPE accuracy, yes-ratio"]
    for r in sorted(rows, key=lambda r: r["row"]):
        d, two, pope = r["dialogue"], r["two_image"], r["pope"]
        lines.append(f"{r['seed']:4d}  {d['turns']:8.3f}  " + "  ".join(f"{v:9.3f}" for _, v in sorted(d["by_skill"].items()))
                     + f"  {two['accuracy']:10.3f} ({two['one_image']:.3f})               "
                     + f"{pope['accuracy']:.3f}, {pope['yes_ratio']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" + (" (the shipped model)" if s == 0 else "") for s in SEEDS], run, RESULTS,
        header=lambda: {"what": "chapter 12's chat recipe on three seeds (scripts/chat_seeds.py)",
                        "recipe": ChatRecipe().to_dict(), "sizes": CHAT_EVAL},
        table=table,
        summary=lambda r: f" per turn {r['dialogue']['turns']:.3f}, two images {r['two_image']['accuracy']:.3f}, "
                          f"POPE {r['pope']['accuracy']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
