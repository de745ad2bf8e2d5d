#!/usr/bin/env python
"""How chapter 07's recipe was chosen: the cross-attention VLM trained with each variant, scored on val.

    python scripts/xattn_recipe_search.py            # every row (about an hour on one CPU thread)
    python scripts/xattn_recipe_search.py --rows 0 3 # some rows only (merged into the results file)

Each row is the recipe of the time (`THEN`: `XAttnRecipe()` with `xattn.ONE_STAGE`, the tower trained, 1,500 steps) with a few fields changed, trained by `fit_xattn` on one thread
with fixed seeds and deterministic kernels (as `scripts/build_checkpoints.py` trains), then
scored with `vqa_accuracy` on 600 questions of the *val* split (never test), with real and
with shuffled images. The results go to data/results/xattn_recipe_search.json, which
appendix A2 (chapters/A2_cross_attention_recipe_search.ipynb) prints; the file records the PyTorch version that produced them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)
from mllm_scratch.runtime import setup_notebook  # noqa: E402
from mllm_scratch.shapeworld import VQADataset  # noqa: E402
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.vlm import vqa_accuracy  # noqa: E402
from mllm_scratch.xattn import ONE_STAGE, XAttnRecipe, fit_xattn  # noqa: E402

RESULTS = ROOT / "data" / "results" / "xattn_recipe_search.json"
FROZEN = dict(train_encoder=False)
# The recipe of the time: XAttnRecipe() with ONE_STAGE (chapter 04's LM, one stage), the tower trained, 1,500 steps
THEN = replace(XAttnRecipe(), **ONE_STAGE, train_encoder=True, steps=1500)
# (name, the fields changed from THEN)
ROWS: list[tuple[str, dict]] = [
    ("Flamingo-style (tower frozen)", dict(steps=600, **FROZEN)),
    ("same, lr 3e-3", dict(steps=600, lr=3e-3, **FROZEN)),
    ("fewer blocks, every=2", dict(steps=600, every=2, **FROZEN)),
    ("Llama 3.2-style (tower trained)", dict(steps=600)),
    ("same, faster rates", dict(steps=600, encoder_lr=1e-3, lr=2e-3)),
    ("Flamingo-style, full budget", dict(steps=1500, **FROZEN)),
    ("the recipe: XAttnRecipe()", dict()),
    ("longer", dict(steps=2500)),
]


def run(index: int, val: VQADataset, tokenizer) -> dict:
    name, changes = ROWS[index]
    recipe = replace(THEN, **changes)
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    start = time.perf_counter()
    model, _ = fit_xattn(recipe, tokenizer, log_every=0, progress=False)
    image = vqa_accuracy(model, tokenizer, val, mode="image")
    shuffled = vqa_accuracy(model, tokenizer, val, mode="shuffled")
    return {"row": index, "name": name, "changes": changes, "steps": recipe.steps, "every": recipe.every,
            "train_encoder": recipe.train_encoder, "lr": recipe.lr, "encoder_lr": recipe.encoder_lr,
            "val_image": image, "val_shuffled": shuffled, "seconds": round(time.perf_counter() - start, 1)}


def table(results: list[dict]) -> str:
    head = f"{'row':>3}  {'run':34s} {'steps':>5} {'blocks':>6} {'tower':>14}  {'image':>5} {'shuffled':>8}  colour"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: r["row"]):
        tower = f"trained {r['encoder_lr']:.0e}" if r["train_encoder"] else "frozen"
        blocks = 4 // r["every"]
        lines.append(f"{r['row']:>3}  {r['name']:34s} {r['steps']:>5} {blocks:>6} {tower:>14}  "
                     f"{r['val_image']['all']:5.2f} {r['val_shuffled']['all']:8.2f}  {r['val_image']['colour']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    tokenizer = load_tokenizer()
    val = VQADataset("val", 600)
    header = lambda: {"what": "chapter 07's recipe search: XAttnRecipe() variants scored on VQADataset('val', 600)",  # noqa: E731
                      "command": "python scripts/xattn_recipe_search.py"}
    return search_rows.main(argv, __doc__, [name for name, _ in ROWS], lambda i: run(i, val, tokenizer), RESULTS, header,
                            table, summary=lambda r: f": val {r['val_image']['all']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
