#!/usr/bin/env python
"""How chapter 07's recipe was chosen: the cross-attention VLM trained with each variant, scored on val.

    python scripts/xattn_recipe_search.py            # every row (about an hour on one CPU thread)
    python scripts/xattn_recipe_search.py --rows 0 3 # some rows only (merged into the results file)

Each row is `XAttnRecipe()` with a few fields changed, trained by `fit_xattn` on one thread
with fixed seeds and deterministic kernels (as `scripts/build_checkpoints.py` trains), then
scored with `vqa_accuracy` on 600 questions of the *val* split (never test), with real and
with shuffled images. The results go to data/results/xattn_recipe_search.json, which
chapter 07 prints; the file records the PyTorch version that produced them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mllm_scratch.runtime import setup_notebook, versions  # noqa: E402
from mllm_scratch.shapeworld import VQADataset  # noqa: E402
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.vlm import vqa_accuracy  # noqa: E402
from mllm_scratch.xattn import XAttnRecipe, fit_xattn  # noqa: E402

RESULTS = ROOT / "data" / "results" / "xattn_recipe_search.json"
FROZEN = dict(train_encoder=False)
# (name, the fields changed from XAttnRecipe())
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
    recipe = replace(XAttnRecipe(), **changes)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", help=f"row indexes, 0..{len(ROWS) - 1} (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (rows already there are kept)")
    args = parser.parse_args(argv)
    rows = list(range(len(ROWS))) if not args.rows else args.rows
    bad = [r for r in rows if not 0 <= r < len(ROWS)]
    if bad:
        parser.error(f"no row {bad}: expected indexes 0..{len(ROWS) - 1}")
    tokenizer = load_tokenizer()
    val = VQADataset("val", 600)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    results = {r["row"]: r for r in saved["rows"]}
    for i in rows:
        results[i] = run(i, val, tokenizer)
        print(f"row {i} ({ROWS[i][0]}): val {results[i]['val_image']['all']:.2f} in {results[i]['seconds']:.0f} s", flush=True)
        out = {"what": "chapter 07's recipe search: XAttnRecipe() variants scored on VQADataset('val', 600)",
               "command": "python scripts/xattn_recipe_search.py", "torch": versions()["torch"],
               "rows": [results[k] for k in sorted(results)]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)  # atomic: an interrupted run never leaves a half-written file
    print(table(list(results.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
