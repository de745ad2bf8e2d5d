#!/usr/bin/env python
"""What chapter 07's spatial stage needs: each of its three changes taken away, one at a time,
and its canonical questions asked about the four-word questions' own scenes.

    python scripts/xattn_spatial_search.py             # every row (four to eight minutes each on one CPU thread)
    python scripts/xattn_spatial_search.py --rows 0 3  # some rows only (merged into the results file)

Each row trains a fresh cross-attention VLM (`build_xattn`, seed 0) for the recipe's spatial
stage only: 3,000 steps on spatial questions, on one thread with deterministic kernels, then
scores 600 *val* spatial questions asked as the evaluation asks them (all four relation words,
"yes" half the time) and records how often it says "yes". The rows:

- **the recipe's spatial stage**: `XAttnRecipe()`: the LM pretrained with questions in its text
  (`pretrained_gpt_qa`), place codes on the media, half the questions in "left of" / "above" only;
- **chapter 04's LM**: the same with `lm="base"`, the GPT that never saw a question;
- **no place codes**: the same with `place_codes=False`;
- **four words only**: the same data without the "left of" / "above" half (all four words, each
  answered "yes" half the time: neither object's place alone predicts the answer, only their
  combination with the word);
- **canonical on the same scenes**: `canonical_offset=0`, the canonical questions asked about the
  very scenes and object pairs of the four-word ones, not about scenes of their own.

The results go to data/results/xattn_spatial_search.json, which chapter 07 prints.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.xattn import XAttnRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "xattn_spatial_search.json"
STEPS = 3000
VAL_QUESTIONS = 600
ROWS: list[tuple[str, dict, bool]] = [  # (name, fields changed from XAttnRecipe(), canonical half kept)
    ("the recipe's spatial stage", {}, True),
    ("chapter 04's LM", {"lm": "base"}, True),
    ("no place codes", {"place_codes": False}, True),
    ("four words only", {}, False),
    ("canonical on the same scenes", {"canonical_offset": 0}, True),
]


def run(i: int) -> dict:
    name, changes, canonical = ROWS[i]

    def compute() -> dict:
        import torch
        from torch.utils.data import ConcatDataset

        from mllm_scratch.shapeworld import VQADataset
        from mllm_scratch.tokenizer import load_tokenizer
        from mllm_scratch.train import batches, train
        from mllm_scratch.vlm import VLMCollator
        from mllm_scratch.xattn import build_xattn, xattn_datasets, xattn_loss, xattn_param_groups

        tok = load_tokenizer()
        recipe = replace(XAttnRecipe(), **changes)
        model = build_xattn(recipe, tok).set_trainable(xattn=True)
        parts = xattn_datasets(recipe, "spatial")  # [canonical, four words], as the recipe's first stage draws them
        if not canonical:
            parts = parts[1:]
        stream = batches(ConcatDataset(parts), recipe.batch_size, seed=recipe.seed,
                         collate_fn=VLMCollator(tok, num_image_tokens=1))
        config = recipe.train_config(steps=STEPS, log_every=0, progress=False)
        history = train(model, stream, xattn_loss, config, optimizer=torch.optim.AdamW(xattn_param_groups(model, recipe)),
                        batch_size_of=lambda b: b.ids.shape[0])
        model.eval()
        val = VQADataset("val", VAL_QUESTIONS, skills=("spatial",))
        items = [val[k] for k in range(len(val))]
        said = model.generate(tok, torch.stack([x[0] for x in items]), [x[1] for x in items], max_new_tokens=4)
        return {"val_spatial": round(sum(s == x[2] for s, x in zip(said, items)) / len(items), 4),
                "says_yes": round(sum(s == "yes" for s in said) / len(said), 4),
                "answers": dict(Counter(said).most_common(3)),
                "loss": {"first": round(history.loss[0], 4), "at_1000": round(history.loss[history.steps.index(1000)], 4),
                         "last": round(history.loss[-1], 4)}}

    return search_rows.timed_row(i, {"name": name, "changes": changes, "canonical_half": canonical, "steps": STEPS},
                                 compute)


def table(rows: list[dict]) -> str:
    lines = [f"{'row':>3s}  {'run':28s} {'val spatial':>11s} {'says yes':>8s}  loss (first, step 1000, last)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        loss = r["loss"]
        lines.append(f"{r['row']:3d}  {r['name']:28s} {r['val_spatial']:11.2f} {r['says_yes']:8.2f}  "
                     f"{loss['first']:.2f}, {loss['at_1000']:.2f}, {loss['last']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [name for name, _, _ in ROWS], run, RESULTS,
        header=lambda: {"what": "chapter 07's spatial stage with each change taken away (scripts/xattn_spatial_search.py)",
                        "steps": STEPS, "val_questions": VAL_QUESTIONS, "recipe": XAttnRecipe().to_dict()},
        table=table,
        summary=lambda r: f" val spatial {r['val_spatial']:.2f}, says yes {r['says_yes']:.2f}",
    )


if __name__ == "__main__":
    sys.exit(main())
