#!/usr/bin/env python
"""Chapter 12's two-image questions answered with the counts first, on three seeds, with 5,000 and 20,000 of them;
and the one-word answers with 20,000, to tell what the counts do from what the data does.

    python scripts/two_image_counts.py              # every row (10-16 min each beside another run)
    python scripts/two_image_counts.py --rows 1 2   # some rows only (merged into the results file)

Rows 0-2 tune chapter 06's shipped model with `ChatRecipe(steps=MIX_STEPS, two_image_counts=True,
seed=s)`, s = 0, 1, 2: the recipe of `chat_mix.py`'s rows without text-only data, except that
the 5,000 two-image answers say both counts before the verdict ("three and two, so no"). So each
row has a twin in data/results/chat_mix.json that differs only in that switch. Rows 3-5 are the
same with 20,000 two-image questions beside the 20,000 dialogues (`two_image=20_000`). Rows 6-8 are
rows 3-5 with one-word answers ("no"), `two_image_counts=False`: they differ from rows 3-5 only in
the answer's words, and from chat_mix.json's twins only in the number of two-image questions. A trained row is
rounded to float16, as shipped models are stored, and scored by `chat.chat_scores(two_image_counts=...)` as it was trained:
1,000 held-out dialogues, 1,000 two-image questions (the verdict, the counts said, and the
one-image control) and 1,000 POPE questions. Results: data/results/two_image_counts.json, which
chapter 12 prints and checks on every seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)
from chat_mix import MIX_STEPS  # noqa: E402

from mllm_scratch.chat import CHAT_EVAL, ChatRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "two_image_counts.json"
# (two-image questions, counts said first, seed)
ROWS = [(two_image, True, seed) for two_image in (5_000, 20_000) for seed in (0, 1, 2)] + [
    (20_000, False, seed) for seed in (0, 1, 2)]


def recipe(i: int) -> ChatRecipe:
    two_image, counts, seed = ROWS[i]
    return ChatRecipe(steps=MIX_STEPS, two_image=two_image, two_image_counts=counts, seed=seed)


def run(i: int) -> dict:
    def compute() -> dict:
        import torch

        from mllm_scratch.chat import chat_scores, train_chat_vlm
        from mllm_scratch.checkpoints import round_to_dtype
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model, history = train_chat_vlm(recipe(i), tokenizer, progress=False, device="cpu")
        round_to_dtype(model, torch.float16)
        return {"loss": round(history.loss[-1], 4), **chat_scores(model, tokenizer, two_image_counts=ROWS[i][1])}

    two_image, counts, seed = ROWS[i]
    return search_rows.timed_row(i, {"two_image_rows": two_image, "counts_first": counts, "seed": seed}, compute)


def header() -> dict:
    return {"what": "chapter 12's two-image answers with the counts first, and one-word twins (scripts/two_image_counts.py)",
            "recipes": {f"two_image {n}{'' if counts else ' one word'}": recipe(ROWS.index((n, counts, 0))).to_dict()
                        for n, counts in ((5_000, True), (20_000, True), (20_000, False))},
            "sizes": CHAT_EVAL}


def table(rows: list[dict]) -> str:
    lines = ["two-image rows  answer        seed  per turn  two images  one image  counts said: both  first  second"
             "  (counts equal, not)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        t, c = r["two_image"], r["two_image"].get("counts")
        said = (f"  {c['both']:17.3f}  {c['first']:5.3f}  {c['second']:6.3f}  ({c['same']:.3f}, {c['differ']:.3f})"
                if c else "")
        lines.append(f"{r['two_image_rows']:14,d}  {'counts first' if r['counts_first'] else 'one word':12s}  {r['seed']:4d}"
                     f"  {r['dialogue']['turns']:8.3f}  {t['accuracy']:10.3f}  {t['one_image']:9.3f}{said}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"two-image rows {n}, {'counts first' if c else 'one word'}, seed {s}" for n, c, s in ROWS], run, RESULTS, header=header, table=table,
        summary=lambda r: f" per turn {r['dialogue']['turns']:.3f}, two images {r['two_image']['accuracy']:.3f}"
                          + (f" (counts {r['two_image']['counts']['both']:.3f})" if r["counts_first"] else ""),
    )


if __name__ == "__main__":
    sys.exit(main())
