#!/usr/bin/env python
"""Chapter 13's drawing models on three seeds: what the judge says of their drawings, and how well they read.

    python scripts/drawing_seeds.py              # every row (seed 0: the shipped models; the others about 21 minutes each)
    python scripts/drawing_seeds.py --rows 2 3   # some rows only (merged into the results file)

Each row is one drawing model of `imagegen.shipped_recipe(method)` with another seed (seed 0
is the shipped checkpoint, which `build_checkpoints.py draw` trains with this very recipe):

- **emu3**: one tokenizer both ways: the model reads the VQ-VAE's codes and draws them;
- **janus**: it reads through the book's frozen image tower (chapter 05's CLIP ViT) and a
  projector, and draws the codes.

Both train on a drawing of each training scene and a question about every second one. Each row
draws the caption of 1,000 *test* and 1,000 *compositional* scenes (every compositional caption
names a colour-shape pair no training caption has), without guidance and with classifier-free
guidance, and the judge scores every drawing; then it answers one question per skill on 1,000
test scenes. The results go to data/results/drawing_seeds.json, which chapter 13 prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.imagegen import (  # noqa: E402
    EVAL, METHODS, drawing_accuracy, pretrained_drawing_model, reading_accuracy, shipped_recipe, held_out_captions, train_drawing,
)
from mllm_scratch.judge import pretrained_judge  # noqa: E402
from mllm_scratch.vq import pretrained_vqvae  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "drawing_seeds.json"
SEEDS = (0, 1, 2)
ROWS = [(method, seed, None) for seed in SEEDS for method in METHODS]
TEST_SIZE = 1000


def run(i: int) -> dict:
    method, seed, steps = ROWS[i]

    def compute() -> dict:
        from dataclasses import replace

        from mllm_scratch.checkpoints import round_to_dtype
        import torch

        vqvae, judge = pretrained_vqvae(), pretrained_judge()
        if seed == 0 and steps is None:
            model = pretrained_drawing_model(method)
        else:
            model, _ = train_drawing(replace(shipped_recipe(method), seed=seed), vqvae, steps=steps)
            round_to_dtype(model, torch.float16)  # as the shipped one is stored
        drawing = {}
        for split in ("test", "compositional"):
            captions, specs, _, _ = held_out_captions(split, TEST_SIZE)
            for name, guidance in (("plain", 1.0), ("guided", EVAL["guidance"])):
                acc, _ = drawing_accuracy(model, vqvae, judge, captions, specs, guidance=guidance,
                                          temperature=EVAL["temperature"], seed=seed)
                drawing[f"{split} {name}"] = {k: round(v, 4) for k, v in acc.items()}
        reading = {k: round(v, 4) for k, v in reading_accuracy(model, vqvae, "test", TEST_SIZE).items()}
        return {"drawing": drawing, "reading": reading}

    return search_rows.timed_row(i, {"method": method, "seed": seed, "steps": steps or shipped_recipe(method).steps},
                                 compute)


def table(rows: list[dict]) -> str:
    keys = ("test plain", "test guided", "compositional plain", "compositional guided")
    lines = [f"{'method':6s} seed steps " + " ".join(f"{k:>21s}" for k in keys) + "  reading (colour shape count spatial existence)"]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['method']:6s} {r['seed']:4d} {r['steps']:5d} " + " ".join(f"{r['drawing'][k]['colour_shape']:21.3f}" for k in keys)
                     + "  " + " ".join(f"{v:.3f}" for v in r["reading"].values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{m}, seed {s}" + (f", {n} steps" if n else "") for m, s, n in ROWS], run, RESULTS,
        header=lambda: {"what": "chapter 13's drawing models on three seeds (scripts/drawing_seeds.py)",
                        "recipes": {m: shipped_recipe(m).to_dict() for m in METHODS}, "eval": EVAL,
                        "test_size": TEST_SIZE},
        table=table,
        summary=lambda r: " colour+shape " + ", ".join(f"{k} {v['colour_shape']:.2f}" for k, v in r["drawing"].items()),
    )


if __name__ == "__main__":
    sys.exit(main())
