#!/usr/bin/env python
"""After or before? Appendix A2's short run of the two placements, on three seeds.

    python scripts/placement_seeds.py             # every row (about 4 minutes on one CPU thread)
    python scripts/placement_seeds.py --rows 0 1  # some rows only (merged into the results file)

Each row trains `XAttnRecipe()` with `xattn.ONE_STAGE` (chapter 04's LM, no place codes, one stage) and one seed (the new layers' initial weights and the
order of the batches) for appendix A2's 200 steps, with the gated blocks after each LM
block ("after", the package's default) or before it ("before", Flamingo's order), on one
thread with deterministic kernels, and scores it on the appendix's 600 val questions (100
per skill) with the real image. A2 prints data/results/placement_seeds.json and checks
that its claim holds on every seed in the file.
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

RESULTS = ROOT / "data" / "results" / "placement_seeds.json"
SEEDS = (0, 1, 2)
STEPS = 200
VAL_QUESTIONS = 600
ROWS: list[tuple[str, int]] = [(placement, seed) for seed in SEEDS for placement in ("after", "before")]


def run(index: int) -> dict:
    from mllm_scratch.gpt import pretrained_gpt
    from mllm_scratch.shapeworld import VQADataset
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import vqa_accuracy
    from mllm_scratch.xattn import ONE_STAGE, XAttnRecipe, build_xattn, train_xattn

    placement, seed = ROWS[index]
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    tokenizer = load_tokenizer()
    recipe = replace(XAttnRecipe(), seed=seed, **ONE_STAGE)  # chapter 04's LM, one stage: as these rows were run
    start = time.perf_counter()
    model = build_xattn(recipe, tokenizer, pretrained_gpt(), placement=placement)
    train_xattn(model, recipe, tokenizer, steps=STEPS, log_every=0, progress=False, device="cpu")
    acc = vqa_accuracy(model.eval(), tokenizer, VQADataset("val", VAL_QUESTIONS))
    return {"row": index, "placement": placement, "seed": seed, "val": {k: round(v, 4) for k, v in acc.items()},
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    skills = ("colour", "shape", "count", "spatial", "existence", "all")
    lines = [f"{'seed':>4s} {'placement':10s}" + "".join(f"{s:>10s}" for s in skills)]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['seed']:4d} {r['placement']:10s}" + "".join(f"{r['val'][s]:10.2f}" for s in skills))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{p}, seed {s}" for p, s in ROWS], run, RESULTS,
        header=lambda: {"what": "appendix A2's two placements, one row per seed (scripts/placement_seeds.py)",
                        "steps": STEPS, "val_questions": VAL_QUESTIONS},
        table=table, summary=lambda r: f": all {r['val']['all']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
