#!/usr/bin/env python
"""Do chapters 06 and 07's short training runs hold on other seeds? The runs the chapters print and check.

    python scripts/short_runs_seeds.py             # every row (about ten minutes on one CPU thread)
    python scripts/short_runs_seeds.py --rows 0 3  # some rows only (merged into the results file)

A chapter trains a short run in front of the reader and asserts what it shows. One seed
may be luck, and another CPU's rounding sends the same seed down another path, so each row
here repeats one chapter's short runs with one seed (the new parts' first weights and the
order of the batches), on one thread with deterministic kernels, and records every number
the chapter's assertions test:

- **chapter 06** (seeds 0, 1, 2): `build_vlm(VLMRecipe(seed=s))`; stage 1 for 40 steps, then
  stage 2 for 80, scored on 300 test questions after each; the linear projector's 40 steps of
  stage 1; Fuyu (raw patches, linear projector) for 40 + 80 steps, scored on the same questions.
- **chapter 07** (seeds 0, 1, 2): `build_xattn(XAttnRecipe(seed=s))` trained 200 steps; its
  loss, its gates and 300 test questions.

The results go to data/results/short_runs_seeds.json (with the PyTorch version); chapters 06
and 07 print their rows and check their assertions on every seed in the file.
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

RESULTS = ROOT / "data" / "results" / "short_runs_seeds.json"
SEEDS = (0, 1, 2)
SHORT1, SHORT2 = 40, 80  # chapter 06's shortened stages
SHORT_XATTN = 200  # chapter 07's short run
TEST_QUESTIONS = 300
ROWS: list[tuple[str, int]] = [("06", s) for s in SEEDS] + [("07", s) for s in SEEDS]


def _losses(history) -> dict:
    return {"first_loss": round(history.loss[0], 4), "last_loss": round(history.loss[-1], 4)}


def chapter06(seed: int) -> dict:
    from mllm_scratch.shapeworld import VQADataset
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import VLMRecipe, build_vlm, train_stage, vqa_accuracy

    tok = load_tokenizer()
    test = VQADataset("test", TEST_QUESTIONS)
    recipe = replace(VLMRecipe(), seed=seed)
    vlm = build_vlm(recipe, tok)
    stage1 = _losses(train_stage(vlm, recipe, 1, tok, steps=SHORT1, log_every=0, progress=False, device="cpu"))
    after1 = vqa_accuracy(vlm.eval(), tok, test)["all"]
    train_stage(vlm.train(), recipe, 2, tok, steps=SHORT2, log_every=0, progress=False, device="cpu")
    after2 = vqa_accuracy(vlm.eval(), tok, test)["all"]
    linear_recipe = replace(recipe, projector="linear")
    linear = _losses(train_stage(build_vlm(linear_recipe, tok), linear_recipe, 1, tok, steps=SHORT1, log_every=0,
                                 progress=False, device="cpu"))
    fuyu_recipe = replace(recipe, encoder="patches", projector="linear")
    fuyu = build_vlm(fuyu_recipe, tok)
    for stage, steps in ((1, SHORT1), (2, SHORT2)):
        train_stage(fuyu, fuyu_recipe, stage, tok, steps=steps, log_every=0, progress=False, device="cpu")
    return {"stage1": stage1, "vqa_after_stage1": round(after1, 4), "vqa_after_stage2": round(after2, 4),
            "linear_stage1": linear, "fuyu_vqa": round(vqa_accuracy(fuyu.eval(), tok, test)["all"], 4)}


def chapter07(seed: int) -> dict:
    from mllm_scratch.shapeworld import VQADataset
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import vqa_accuracy
    from mllm_scratch.xattn import XAttnRecipe, build_xattn, train_xattn

    tok = load_tokenizer()
    recipe = replace(XAttnRecipe(), seed=seed)
    model = build_xattn(recipe, tok)
    history = train_xattn(model, recipe, tok, steps=SHORT_XATTN, log_every=0, progress=False, device="cpu")
    gates = model.gates()
    return {"xattn": _losses(history), "smallest_attention_gate": round(min(abs(a) for a, _ in gates.values()), 4),
            "vqa_image": round(vqa_accuracy(model.eval(), tok, VQADataset("test", TEST_QUESTIONS))["all"], 4)}


def run(index: int) -> dict:
    chapter, seed = ROWS[index]
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    start = time.perf_counter()
    result = chapter06(seed) if chapter == "06" else chapter07(seed)
    return {"row": index, "chapter": chapter, "seed": seed, **result, "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: r["row"]):
        rest = {k: v for k, v in r.items() if k not in ("row", "chapter", "seed", "seconds")}
        lines.append(f"chapter {r['chapter']}, seed {r['seed']}: {rest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"chapter {c}, seed {s}" for c, s in ROWS], run, RESULTS,
        header=lambda: {"what": "chapters 06 and 07's short runs, one row per seed (scripts/short_runs_seeds.py)",
                        "short1": SHORT1, "short2": SHORT2, "short_xattn": SHORT_XATTN, "test_questions": TEST_QUESTIONS},
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
