#!/usr/bin/env python
"""Chapter 12's "what changed?" questions: a scene, the same scene after one edit, and the edit named, on three seeds.

    python scripts/what_changed.py              # every row (11-12 min each beside another run)
    python scripts/what_changed.py --rows 1 2   # some rows only (merged into the results file)

Row s (s = 0, 1, 2) tunes chapter 06's shipped model with `ChatRecipe(steps=MIX_STEPS,
what_changed=10_000, seed=s)`: the recipe of `chat_mix.py`'s rows without text-only data, with 10,000
"what changed?" questions added (`chat.ChangeDataset`: an object changes colour, disappears or
appears, a third of the items each). So each row has a twin in data/results/chat_mix.json that
differs only in those questions. A trained row is rounded to float16, as shipped models are stored,
and scored by `chat.chat_scores(what_changed=True)`: 1,000 held-out dialogues, 1,000 two-image
questions, 1,000 POPE questions and 1,000 "what changed?" questions (the two-image and "what changed?"
questions each with its one-image control), and the share of replies that name the right kind of edit and
the right object.
Results: data/results/what_changed.json, which chapter 12 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from chat_mix import MIX_STEPS  # noqa: E402

from mllm_scratch.chat import CHAT_EVAL, ChatRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "what_changed.json"
SEEDS = (0, 1, 2)
QUESTIONS = 10_000  # "what changed?" questions in the training mix


def recipe(seed: int) -> ChatRecipe:
    return ChatRecipe(steps=MIX_STEPS, what_changed=QUESTIONS, seed=seed)


def run(i: int) -> dict:
    def compute() -> dict:
        import torch

        from mllm_scratch.chat import chat_scores, train_chat_vlm
        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model, history = train_chat_vlm(recipe(SEEDS[i]), tokenizer, progress=False, device="cpu")
        round_to_dtype(model, torch.float16)
        return {"loss": round(history.loss[-1], 4), **chat_scores(model, tokenizer, what_changed=True)}

    return search_rows.timed_row(i, {"seed": SEEDS[i]}, compute)


def header() -> dict:
    return {"what": "chapter 12's \"what changed?\" questions (scripts/what_changed.py)",
            "recipe": recipe(0).to_dict(), "sizes": {**CHAT_EVAL, "what_changed": CHAT_EVAL["two_image"]}}


def table(rows: list[dict]) -> str:
    lines = ["seed  per turn  two images  what changed  (colour  gone  added)  kind named  object named  one image"]
    for r in sorted(rows, key=lambda r: r["row"]):
        w = r["what_changed"]
        k = w["by_kind"]
        lines.append(f"{r['seed']:4d}  {r['dialogue']['turns']:8.3f}  {r['two_image']['accuracy']:10.3f}  {w['accuracy']:12.3f}"
                     f"  ({k['colour']:.3f}  {k['gone']:.3f}  {k['added']:.3f})  {w['kind']:10.3f}  {w['object']:12.3f}"
                     f"  {w['one_image']:9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"seed {s}" for s in SEEDS], run, RESULTS, header=header, table=table,
        summary=lambda r: f" per turn {r['dialogue']['turns']:.3f}, what changed {r['what_changed']['accuracy']:.3f}"
                          f" (one image {r['what_changed']['one_image']:.3f})",
    )


if __name__ == "__main__":
    sys.exit(main())
