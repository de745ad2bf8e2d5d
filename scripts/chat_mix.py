#!/usr/bin/env python
"""Chapter 12's data-mix ablation: the chat recipe with no text, with text-only rows, and with interleaved documents,
three seeds each.

    python scripts/chat_mix.py              # every row (17-20 min each beside three other runs; 12-13 min beside one)
    python scripts/chat_mix.py --rows 3 4   # some rows only (merged into the results file)

Each row tunes chapter 06's shipped model with `ChatRecipe(steps=MIX_STEPS, text_only=...,
interleaved=..., seed=...)`: a third of the shipped recipe's steps, so that the rows fit in a few
sessions. Rows 0-5 differ only in `text_only` (0, or TEXT_ROWS rows of six ShapeWorld descriptions
each, the kind of text chapter 04's LM was pretrained on, beside the 25,000 conversations). Rows 6-8 add instead
INTERLEAVED_ROWS interleaved documents (`ChatRecipe(interleaved=...)`: two images, each followed by
its description, the text scored), the same kind of text beside the images it describes. A trained row is rounded to
float16, as shipped models are stored, and scored by `chat.chat_scores` (1,000 held-out
dialogues, two-image questions and POPE questions) and by `chat.text_perplexity` on chapter 04's
1,000 held-out descriptions (chapter 12 measures the same for chapter 04's LM and chapter 06's,
from which every row starts). A text-only row scores its 128 tokens, a conversation only its
replies, so text is about two thirds of the scored tokens although it is a sixth of the rows
(chapter 12 counts them). Results: data/results/chat_mix.json, which chapter 12 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.chat import CHAT_EVAL, ChatRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "chat_mix.json"
MIX_STEPS = 1_000
TEXT_ROWS = 5_000
INTERLEAVED_ROWS = 5_000
# (text-only rows, interleaved documents, seed)
ROWS = [(text, 0, seed) for text in (0, TEXT_ROWS) for seed in (0, 1, 2)] + [(0, INTERLEAVED_ROWS, s) for s in (0, 1, 2)]


def recipe(i: int) -> ChatRecipe:
    text, interleaved, seed = ROWS[i]
    return ChatRecipe(steps=MIX_STEPS, text_only=text, interleaved=interleaved, seed=seed)


def run(i: int) -> dict:
    text, interleaved, seed = ROWS[i]

    def compute() -> dict:
        import torch

        from mllm_scratch.chat import chat_scores, text_perplexity, train_chat_vlm
        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model, history = train_chat_vlm(recipe(i), tokenizer, progress=False, device="cpu")
        round_to_dtype(model, torch.float16)
        return {"loss": round(history.loss[-1], 4), "text_perplexity": text_perplexity(model.lm, tokenizer),
                **chat_scores(model, tokenizer)}

    return search_rows.timed_row(i, {"text_only": text, "interleaved": interleaved, "seed": seed}, compute)


def header() -> dict:
    return {"what": "chapter 12's data mix: the chat recipe with no text, text-only rows or interleaved documents "
                    "(scripts/chat_mix.py)",
            "recipes": {**{f"text_only {t}": recipe(ROWS.index((t, 0, 0))).to_dict() for t in (0, TEXT_ROWS)},
                        f"interleaved {INTERLEAVED_ROWS}": recipe(ROWS.index((0, INTERLEAVED_ROWS, 0))).to_dict()},
            "sizes": CHAT_EVAL}


def table(rows: list[dict]) -> str:
    lines = ["text-only rows  interleaved  seed  per turn  two images  POPE   text perplexity"]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['text_only']:14d}  {r['interleaved']:11d}  {r['seed']:4d}  {r['dialogue']['turns']:8.3f}  "
                     f"{r['two_image']['accuracy']:10.3f}  {r['pope']['accuracy']:.3f}  {r['text_perplexity']:15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"text-only rows {t}, interleaved {n}, seed {s}" for t, n, s in ROWS], run, RESULTS, header=header, table=table,
        summary=lambda r: f" per turn {r['dialogue']['turns']:.3f}, two images {r['two_image']['accuracy']:.3f}, "
                          f"text perplexity {r['text_perplexity']:.2f}",
    )


if __name__ == "__main__":
    sys.exit(main())
