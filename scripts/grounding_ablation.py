#!/usr/bin/env python
"""What a grounded spatial answer must say: both places alone, or each object's name before its place.

    python scripts/grounding_ablation.py              # every row (about 12 minutes each on one CPU thread)
    python scripts/grounding_ablation.py --rows 0 3   # some rows only (merged into the results file)

Each row is the start of chapter 06's shipped recipe (`RECIPE` with the row's seed: stage 1,
then its spatial stage of 3,000 steps on spatial questions alone, place codes, the LM at 3e-4), with
one of two answer forms:

- "places": the two objects' columns (or rows), then the answer: "1 5 yes";
- "names and places": each object's name before its place, as the shipped recipe writes it:
  "red circle 1 blue square 5 yes".

After the spatial stage each row answers 600 val spatial questions (greedy) and records how often
the final yes/no is right, how often both places are right, and how often the two objects' places
come out swapped. The results go to data/results/grounding_ablation.json, which chapter 06 prints.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_rows  # noqa: E402  (scripts/, next to this file)

from mllm_scratch.vlm import SHIPPED_RECIPE  # noqa: E402

# The shipped recipe without stage 2's colour-shape prior (chapter 06, section 12): the rows run stage 1 and the
# spatial stage only, which the prior does not touch, so they hold for the shipped recipe as it is.
RECIPE = replace(SHIPPED_RECIPE, colour_shape_prior=False)

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results" / "grounding_ablation.json"
FORMS = ("places", "names and places")
SEEDS = (0, 1, 2)
ROWS = [(form, seed) for form in FORMS for seed in SEEDS]
VAL_QUESTIONS = 600


class PlacesOnly:
    """A grounded spatial dataset whose answers drop the names: "red circle 1 blue square 5 yes" -> "1 5 yes"."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple:
        image, question, answer, skill = self.data[i]
        words = answer.split()
        return image, question, " ".join([words[2], words[5], words[6]]), skill


def run(i: int) -> dict:
    form, seed = ROWS[i]

    def compute() -> dict:
        import torch
        from torch.utils.data import ConcatDataset

        from mllm_scratch.shapeworld import VQADataset
        from mllm_scratch.tokenizer import load_tokenizer
        from mllm_scratch.train import batches
        from mllm_scratch.vlm import VLMCollator, build_vlm, spatial_datasets, stack_dataset, train_stage

        recipe = replace(RECIPE, seed=seed)
        tokenizer = load_tokenizer()
        model = build_vlm(recipe, tokenizer)
        train_stage(model, recipe, 1, tokenizer, progress=False, log_every=0)
        parts = spatial_datasets(recipe)  # grounded: names and places
        if form == "places":
            parts = [PlacesOnly(p) for p in parts]
        data = batches(ConcatDataset(parts), recipe.batch_size, seed=recipe.seed,  # the spatial stage's own order
                       collate_fn=VLMCollator(tokenizer, model.num_image_tokens))
        history = train_stage(model, recipe, "spatial", tokenizer, data=data, progress=False, log_every=500)
        model.eval()
        val = VQADataset("val", VAL_QUESTIONS, recipe.scene_config(), skills=("spatial",), grounded=True)
        images, rest = stack_dataset(val)
        with torch.no_grad():
            said = model.generate(tokenizer, images, [r[0] for r in rest], max_new_tokens=10)
        hits = {"answer": 0, "both places": 0, "swapped": 0}
        for (_, truth, _), reply in zip(rest, said):
            t, r = truth.split(), reply.split()
            places = (r[0], r[1]) if form == "places" and len(r) == 3 else (r[2], r[5]) if len(r) == 7 else ("", "")
            hits["answer"] += bool(r) and r[-1] == t[-1]
            hits["both places"] += places == (t[2], t[5])
            hits["swapped"] += t[2] != t[5] and places == (t[5], t[2])
        return {"form": form, "val_questions": VAL_QUESTIONS, "spatial_steps": recipe.spatial_steps,
                "val": {k: round(v / len(rest), 4) for k, v in hits.items()},
                "last_loss": round(history.loss[-1], 4), "examples": said[:4]}

    return search_rows.timed_row(i, {"seed": seed}, compute)


def table(rows: list[dict]) -> str:
    lines = [f"{'answer form':18s}{'seed':>5s}{'answer':>8s}{'both places':>13s}{'swapped':>9s}"]
    for r in sorted(rows, key=lambda r: r["row"]):
        v = r["val"]
        lines.append(f"{r['form']:18s}{r['seed']:5d}{v['answer']:8.3f}{v['both places']:13.3f}{v['swapped']:9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{form}, seed {seed}" for form, seed in ROWS], run, RESULTS,
        header=lambda: {"what": "grounded answers with and without the objects' names (scripts/grounding_ablation.py)",
                        "recipe": RECIPE.to_dict(), "val_questions": VAL_QUESTIONS},
        table=table,
        summary=lambda r: f" answer {r['val']['answer']:.3f}, both places {r['val']['both places']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
