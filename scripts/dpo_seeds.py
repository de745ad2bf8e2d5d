#!/usr/bin/env python
"""Chapter 12's preference tuning: the chat model before DPO, and after DPO with and without replay on three seeds.

    python scripts/dpo_seeds.py              # every row (the first 2 min; rows 1-3 10-13 min each, rows 4-9 7-9 min)
    python scripts/dpo_seeds.py --rows 1 2   # some rows only (merged into the results file)

Row 0 is the shipped chat model as it is. Rows 1-3 tune it with `DPORecipe(seed=s)`, s = 0, 1, 2
(the order of the pairs), on `PreferenceDataset` pairs, in float32; rows 4-6 with `REPLAY`, the
same recipe with rows of the chat model's own instruction data replayed at every step
(`DPORecipe.replay`); rows 7-9 with replay and POPE pairs about near misses as well as binding
misses, in turn (`DPORecipe(pope_kind="both")`). Every row is scored by
`chat.chat_scores` (1,000 held-out dialogues without a caption, two-image questions and POPE
questions about near misses) and on 1,000 POPE questions about binding misses
(`PopeDataset(kind="binding")`). Results: data/results/dpo_seeds.json, which chapter 12 prints
and checks on every seed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.chat import CHAT_EVAL, DPORecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "dpo_seeds.json"
REPLAY = DPORecipe(replay=32)
RECIPES = {"DPO": DPORecipe(), "DPO + replay": REPLAY,
           "DPO + replay, near and binding pairs": DPORecipe(replay=32, pope_kind="both")}
ROWS = [(None, None)] + [(name, seed) for name in RECIPES for seed in (0, 1, 2)]  # (recipe, seed); None: before DPO


def run(i: int) -> dict:
    name, seed = ROWS[i]

    def compute() -> dict:
        from mllm_scratch.chat import (ChatTemplate, PopeDataset, base_scene_config, chat_scores, load_chat_vlm,
                                       pope_accuracy, train_dpo)
        from mllm_scratch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model = load_chat_vlm()
        extra = {}
        if seed is not None:
            model, history = train_dpo(model, replace(RECIPES[name], seed=seed), tokenizer, progress=False, device="cpu")
            extra = {"loss": [round(history.loss[0], 4), round(history.loss[-1], 4)]}
        binding = PopeDataset("test", CHAT_EVAL["pope"], base_scene_config(model), kind="binding")
        return {**extra, **chat_scores(model, tokenizer),
                "pope_binding": pope_accuracy(model, ChatTemplate(tokenizer, model.num_image_tokens), binding)}

    return search_rows.timed_row(i, {"recipe": name, "dpo_seed": seed}, compute)


def table(rows: list[dict]) -> str:
    lines = ["model                     per turn  existence  pointing  two images  POPE near (yes)  POPE binding (yes)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        d, p, b = r["dialogue"], r["pope"], r["pope_binding"]
        name = "before DPO" if r["recipe"] is None else f"{r['recipe']}, seed {r['dpo_seed']}"
        lines.append(f"{name:24s}  {d['turns']:8.3f}  {d['by_skill']['existence']:9.3f}  {d['by_skill']['pointing']:8.3f}"
                     f"  {r['two_image']['accuracy']:10.3f}  {p['accuracy']:.3f} ({p['yes_ratio']:.2f})"
                     f"     {b['accuracy']:.3f} ({b['yes_ratio']:.2f})")
    return "\n".join(lines)


def header() -> dict:
    return {"what": "chapter 12's chat model before and after DPO (scripts/dpo_seeds.py)",
            "recipes": {name: r.to_dict() for name, r in RECIPES.items()}, "sizes": {**CHAT_EVAL, "pope_binding": CHAT_EVAL["pope"]}}


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, ["before DPO"] + [f"{name}, seed {s}" for name, s in ROWS[1:]], run, RESULTS, header=header,
        table=table,
        summary=lambda r: f" per turn {r['dialogue']['turns']:.3f}, POPE {r['pope']['accuracy']:.3f}, "
                          f"binding {r['pope_binding']['accuracy']:.3f} (yes {r['pope_binding']['yes_ratio']:.2f})",
    )


if __name__ == "__main__":
    sys.exit(main())
