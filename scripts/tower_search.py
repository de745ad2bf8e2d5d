#!/usr/bin/env python
"""Which image tower lets chapter 06's VLM see shape and place? The side-by-side runs chapter 06 prints.

    python scripts/tower_search.py             # every row (six to ten minutes each, under an hour on one CPU thread)
    python scripts/tower_search.py --rows 2 3  # some rows only (merged into the results file)

Every row trains chapter 06's unified VLM on one budget, on one thread with fixed seeds and
deterministic kernels: the recipe's stage 1, then stage 2 cut to 1,200 steps on the
recipe's question mix (20,000 questions plus the captions), and scores 1,200 *val*
questions (200 per skill; never test). The rows differ only in the image tower and in
whether stage 2 tunes it:

- **clip**: chapter 05's CLIP tower (`pretrained_clip().vision`), the tower before this search;
- **dense**: the book's tower (`pretrained_tower().vision`): the same CLIP architecture trained from scratch
  on crowded scenes with a dense head that names the shape and colour under every patch;
- **tuned** rows train the tower in stage 2 at the LM's rate (as Molmo does); **frozen** rows
  keep it as it is (as LLaVA and NVLM do);
- **place codes** adds a fixed 2-D sin-cos code of each patch's row and column to its image
  token, so the LM need not learn place from its own 1-D positions;
- the last row trains stage 2 on spatial questions only (20,000 of them, no captions) and
  scores 1,200 spatial val questions: can the LM learn relations at all when nothing else competes?

The results go to data/results/tower_search.json (with the PyTorch version), which chapter
06 prints and checks against the shipped towers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mllm_scratch.clip import pretrained_clip, pretrained_tower  # noqa: E402
from mllm_scratch.runtime import setup_notebook  # noqa: E402
from mllm_scratch.shapeworld import VQADataset  # noqa: E402
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.vit import sincos_2d_position_embedding  # noqa: E402
from mllm_scratch.train import batches  # noqa: E402
from mllm_scratch.vlm import VLMCollator, VLMRecipe, build_vlm, train_stage, vqa_accuracy  # noqa: E402

RESULTS = ROOT / "data" / "results" / "tower_search.json"
STEPS = 1200  # stage-2 steps of every row
QA_PAIRS = 20_000
VAL_QUESTIONS = 1200

ROWS = [
    dict(tower="clip", tuned=True, place=False),
    dict(tower="clip", tuned=False, place=False),
    dict(tower="dense", tuned=True, place=False),
    dict(tower="dense", tuned=False, place=False),
    dict(tower="dense", tuned=False, place=True),
    dict(tower="dense", tuned=False, place=True, skills=("spatial",)),
]


def row_name(row: dict) -> str:
    return (f"{row['tower']} tower, {'tuned' if row['tuned'] else 'frozen'}" + (", place codes" if row["place"] else "")
            + (f", {'+'.join(row['skills'])} only" if row.get("skills") else ""))


class PlaceCodes(nn.Module):
    """The projector, then a fixed 2-D sin-cos code of each patch's (row, column) added to its image token."""

    def __init__(self, projector: nn.Module, grid: int, dim: int):
        super().__init__()
        self.projector = projector
        self.register_buffer("codes", sincos_2d_position_embedding(grid, grid, dim)[None], persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features) + self.codes  # (batch, num_patches, lm_dim)


def recipe_of(row: dict) -> VLMRecipe:
    return replace(VLMRecipe(), stage2_steps=STEPS, qa_pairs=QA_PAIRS, train_encoder=row["tuned"])


def run(i: int) -> dict:
    row = ROWS[i]
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    tokenizer = load_tokenizer()
    recipe = recipe_of(row)
    tower = (pretrained_clip() if row["tower"] == "clip" else pretrained_tower()).vision
    model = build_vlm(recipe, tokenizer, tower=tower)
    if row["place"]:
        model.projector = PlaceCodes(model.projector, model.config.vision.grid_size, model.config.lm.dim)
    data = None
    if row.get("skills"):  # stage 2 on these skills' questions only (no captions)
        data = batches(VQADataset("train", QA_PAIRS, recipe.scene_config(), skills=row["skills"], cache=True), recipe.batch_size,
                       seed=recipe.seed + 2, collate_fn=VLMCollator(tokenizer, model.num_image_tokens))
    start = time.perf_counter()
    train_stage(model, recipe, 1, tokenizer, log_every=300, progress=False, device="cpu")
    train_stage(model, recipe, 2, tokenizer, data=data, log_every=300, progress=False, device="cpu")
    seconds = time.perf_counter() - start
    acc = vqa_accuracy(model.eval(), tokenizer, VQADataset("val", VAL_QUESTIONS, skills=row.get("skills")))
    return {"row": i, "name": row_name(row), **row, "recipe": recipe.to_dict(), "val_questions": VAL_QUESTIONS,
            "val": {k: round(v, 4) for k, v in acc.items()}, "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    skills = ("colour", "shape", "count", "spatial", "existence", "all")
    lines = [f"{'row':48s}" + "".join(f"{s:>10s}" for s in skills)]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['name']:48s}" + "".join(f"{r['val'][s]:10.2f}" if s in r["val"] else f"{'-':>10s}" for s in skills))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [row_name(r) for r in ROWS], run, RESULTS,
        header=lambda: {"stage2_steps": STEPS, "qa_pairs": QA_PAIRS, "val_questions": VAL_QUESTIONS},
        table=table, summary=lambda r: f": all {r['val']['all']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
