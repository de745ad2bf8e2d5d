#!/usr/bin/env python
"""Chapter 05's question "does a pretrained text tower help?", on three seeds.

    python scripts/ch05_text_tower.py            # every row (several minutes on one CPU thread)
    python scripts/ch05_text_tower.py --rows 2   # one seed only (merged into the results file)

Each row trains chapter 05's CLIP recipe (`CLIPRecipe(seed=s)`: 600 steps, batches of 64, the
same 20,000 single-object pairs and batch order) with one change: the text tower is chapter 04's
pretrained GPT (`pretrained_gpt()`, its 4 blocks of width 128, all of it trained further), in
place of the 2-block, width-64 tower trained from scratch. It records the chapter's zero-shot
accuracy (30 colour-shape classes) on the test and compositional splits. The runs with the tower
trained from scratch, same seeds, are the "one object" rows of data/results/ch05_shortcut.json.

The results go to data/results/ch05_text_tower.json; chapter 05 prints both and checks its claim
on every seed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)


RESULTS = ROOT / "data" / "results" / "ch05_text_tower.json"
SEEDS = (0, 1, 2)


def row(seed: int) -> dict:
    import torch

    from mllm_scratch.clip import (
        CLIP,
        CLIPConfig,
        CLIPRecipe,
        colour_shape_prompts,
        pretrain_clip,
        single_object_test_set,
        train_dataset,
        zero_shot_accuracy,
        zero_shot_classifier,
        zero_shot_predict,
    )
    from mllm_scratch.gpt import pretrained_gpt
    from mllm_scratch.runtime import count_parameters
    from mllm_scratch.tokenizer import load_tokenizer

    tok = load_tokenizer()
    gpt = pretrained_gpt()
    recipe = replace(CLIPRecipe(), seed=seed, model=CLIPConfig(text=gpt.config))
    torch.manual_seed(seed)
    model = CLIP(recipe.model)
    model.text.load_state_dict(gpt.state_dict())
    model, history = pretrain_clip(recipe, tok, dataset=train_dataset(recipe, tok), model=model, log_every=0, progress=False)
    classifier = zero_shot_classifier(model, colour_shape_prompts(), tok)
    zero_shot, by_skill = {}, {}
    for split in ("test", "compositional"):
        images, labels = single_object_test_set(split, 500)
        zero_shot[split] = round(zero_shot_accuracy(model, classifier, images, labels), 4)
        pred = zero_shot_predict(model, classifier, images)  # class c is colour c // 5, shape c % 5
        by_skill[split] = {"colour": round((pred // 5 == labels // 5).float().mean().item(), 4),
                           "shape": round((pred % 5 == labels % 5).float().mean().item(), 4)}
    return {"text_tower": {"depth": gpt.config.depth, "dim": gpt.config.dim, "parameters": count_parameters(model.text)},
            "zero_shot": zero_shot, "by_skill": by_skill,
            "first_loss": round(history.loss[0], 4), "last_loss": round(history.loss[-1], 4)}


def run(index: int) -> dict:
    seed = SEEDS[index]
    return search_rows.timed_row(index, {"seed": seed}, lambda: row(seed))


def table(rows: list[dict]) -> str:
    return "\n".join(f"seed {r['seed']}: zero-shot test {r['zero_shot']['test']:.3f} (colour {r['by_skill']['test']['colour']:.3f}, "
                     f"shape {r['by_skill']['test']['shape']:.3f}), compositional {r['zero_shot']['compositional']:.3f}"
                     for r in sorted(rows, key=lambda r: r["row"]))


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"pretrained text tower, seed {s}" for s in SEEDS], run, RESULTS,
        header=lambda: {"what": "chapter 05's CLIP with chapter 04's pretrained GPT as its text tower, one row per seed "
                                "(scripts/ch05_text_tower.py)"},
        table=table,
        summary=lambda r: f": zero-shot test {r['zero_shot']['test']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
