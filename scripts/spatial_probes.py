#!/usr/bin/env python
"""Why do spatial questions stay at chance? Other forms of the question, each trained alone, long runs, the comparison in words, grounded answers.

    python scripts/spatial_probes.py             # every row (five to seven minutes each on one CPU thread, the
                                                 # 3,000-step rows about 15, the 5,000-step ones about 20;
                                                 # about 2.5 hours in all)
    python scripts/spatial_probes.py --rows 0 1  # some rows only (merged into the results file)

Chapter 06's VLM reads colour, shape, count and existence from the book's tower but answers
spatial questions ("is the red circle left of the blue square?") at chance, and the last
row of `tower_search.py` found that even stage 2 on spatial questions alone does not move
it. Each row here changes one thing about the question, to find the step that fails. Every
row trains chapter 06's unified VLM with the book's tower, frozen, and fixed 2-D place codes
on its image tokens (`tower_search.PlaceCodes`, so every image token carries its row and
column): the recipe's stage 1, then 1,200 stage-2 steps on 20,000 questions of the row's
kind only, on one thread with deterministic kernels. It scores 600 *val* questions of the
same kind (never test):

- **canonical**: only "left of" and "above", so that "yes" means the first object is further
  left (or up). The recipe's questions use all four words, each answered "yes" half the time,
  so neither object's place alone predicts the answer, only their combination with the word
  (an XOR). Here one object's place alone does: a first-order signal.
- **which side**: "is the red circle left or right of the blue square?", answered "left" or
  "right" ("above" or "below" for the vertical pairs): the same comparison, without "yes" and
  "no".
- **where**: "where is the red circle?", answered with the column and row (0 to 7) of the
  patch under its centre: one object, no comparison. Can the LM read a place at all?
- **where + spatial**: half "where" questions, half the recipe's spatial questions: does
  learning to read one place help to compare two?
- two **long** rows train 5,000 stage-2 steps (four times the budget) on 60,000 questions of
  one kind: the recipe's spatial questions, and the canonical ones. Is it only a matter of time?
- the **in words** rows (three seeds each) give the LM both places in the question, as text, so that no look-up
  is left: "2 6: is the red circle left of the blue square?" (the column, or the row for
  "above" and "below", of each object's centre, in the question's order). With "left of" and
  "above" only (**in words, canonical**) the answer is one comparison of two digits; with the
  recipe's four words (**in words, four words**) it is that comparison XOR the word. Which of
  the two can the LM learn at all? **in words, canonical first** spends the first 300 of the
  same 1,200 steps on the canonical questions, then the rest on the four words (a curriculum),
  and is scored on the four words.
- **grounded** (1,200 and 3,000 steps): the recipe's spatial question, answered with both
  places first and then yes or no, "2 6 yes" (the same digits as in words), as Shikra and
  Kosmos-2 answer with coordinates. It is scored on its last word, and on the two places.
  Next to it, **where** again on 3,000 steps: does pointing get better with time?

The results go to data/results/spatial_probes.json (with the PyTorch version), which
appendix A1 prints.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)
from tower_search import PlaceCodes  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset  # noqa: E402

from mllm_scratch.runtime import setup_notebook  # noqa: E402
from mllm_scratch.shapeworld import (  # noqa: E402
    SPLIT_SEEDS,
    Rng,
    ShapeWorldConfig,
    VQADataset,
    _OPPOSITE,
    _sample_scene,
    relations,
    render,
    to_tensor,
)

RESULTS = ROOT / "data" / "results" / "spatial_probes.json"
STEPS = 1200
QA_PAIRS = 20_000
VAL_QUESTIONS = 600
KINDS = ("canonical", "which side", "where", "where + spatial")
WORDS_KINDS = ("in words, canonical", "in words, four words")
GROUNDED = "grounded"  # the recipe's question, answered with both places first, then yes or no: "2 6 no"
CURRICULUM = "in words, canonical first"  # CURRICULUM_STEPS on canonical questions, then the rest of the budget on four words
CURRICULUM_STEPS = 300
LONG_STEPS, LONG_QA_PAIRS = 5000, 60_000
# (kind, stage-2 steps, questions, seed); the in-words rows run on three seeds
ROWS: list[tuple[str, int, int, int]] = [(kind, STEPS, QA_PAIRS, 0) for kind in KINDS] + \
    [("spatial", LONG_STEPS, LONG_QA_PAIRS, 0), ("canonical", LONG_STEPS, LONG_QA_PAIRS, 0)] + \
    [(kind, STEPS, QA_PAIRS, seed) for seed in (0, 1, 2) for kind in WORDS_KINDS] + \
    [(CURRICULUM, STEPS, QA_PAIRS, seed) for seed in (0, 1, 2)] + \
    [(GROUNDED, STEPS, QA_PAIRS, 0), (GROUNDED, 3000, LONG_QA_PAIRS, 0), ("where", 3000, LONG_QA_PAIRS, 0)]
_CANONICAL = {"left of": ("left of", "yes"), "right of": ("left of", "no"), "above": ("above", "yes"), "below": ("above", "no")}


class ProbeQuestions(Dataset):
    """(image, question, answer, kind) for one of the probe kinds; scenes from the split's seeds, offset past VQADataset's items."""

    OFFSET = 500_000  # seeds VQADataset never reaches at these sizes

    def __init__(self, kind: str, split: str, size: int) -> None:
        if kind not in ("canonical", "which side", "where", GROUNDED) + WORDS_KINDS:
            raise ValueError(f"kind {kind!r} is invalid: expected 'canonical', 'which side', 'where', {GROUNDED!r} "
                             f"or one of {WORDS_KINDS}")
        self.kind, self.split, self.size, self.config = kind, split, size, ShapeWorldConfig()
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple:
        if i not in self._cache:
            self._cache[i] = self._make(Rng(SPLIT_SEEDS[self.split][0] + self.OFFSET + i))
        return self._cache[i]

    def _make(self, rng: Rng) -> tuple:
        while True:
            scene = _sample_scene(rng, self.config, self.split)
            unique = [o for o in scene.objects if sum(p.name == o.name for p in scene.objects) == 1]
            if len(unique) >= (1 if self.kind == "where" else 2):
                break
        image = to_tensor(render(scene))
        if self.kind == "where":
            o = rng.choice(unique)
            patch = self.config.image_size // 8
            column, row = int((o.x + o.side / 2) // patch), int((o.y + o.side / 2) // patch)
            return image, f"where is the {o.name}?", f"{column} {row}", self.kind
        a, b = rng.sample(unique, 2)
        rel = rng.choice(relations(a, b))
        if self.kind in WORDS_KINDS + (GROUNDED,):
            if self.kind == "in words, canonical":
                word, answer = _CANONICAL[rel]
            elif rng.random() < 0.5:  # the recipe's questions: the word holds ("yes") or its opposite does ("no")
                word, answer = rel, "yes"
            else:
                word, answer = _OPPOSITE[rel], "no"
            patch = self.config.image_size // 8
            axis = (lambda o: o.x) if word in ("left of", "right of") else (lambda o: o.y)
            pa, pb = (int((axis(o) + o.side / 2) // patch) for o in (a, b))
            if self.kind == GROUNDED:
                return image, f"is the {a.name} {word} the {b.name}?", f"{pa} {pb} {answer}", self.kind
            return image, f"{pa} {pb}: is the {a.name} {word} the {b.name}?", answer, self.kind
        if self.kind == "canonical":
            word, answer = _CANONICAL[rel]
            return image, f"is the {a.name} {word} the {b.name}?", answer, self.kind
        pair = "left or right of" if rel in ("left of", "right of") else "above or below"
        return image, f"is the {a.name} {pair} the {b.name}?", rel.split()[0], self.kind


def data_for(kind: str, split: str, size: int) -> Dataset:
    if kind == "spatial":
        return VQADataset(split, size, skills=("spatial",))
    if kind == CURRICULUM:  # its second phase, and its val questions: the four words
        return ProbeQuestions("in words, four words", split, size)
    if kind == "where + spatial":
        return ConcatDataset([ProbeQuestions("where", split, size // 2), VQADataset(split, size // 2, skills=("spatial",))])
    return ProbeQuestions(kind, split, size)


def run(i: int) -> dict:
    from mllm_scratch.clip import pretrained_tower
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.train import batches
    from mllm_scratch.vlm import VLMCollator, VLMRecipe, build_vlm, train_stage

    kind, steps, qa_pairs, seed = ROWS[i]
    setup_notebook(seed=seed, threads=1, deterministic=True, device="cpu")
    tokenizer = load_tokenizer()
    recipe = replace(VLMRecipe(), stage2_steps=steps, qa_pairs=qa_pairs, seed=seed)
    model = build_vlm(recipe, tokenizer, tower=pretrained_tower().vision)
    model.projector = PlaceCodes(model.projector, model.config.vision.grid_size, model.config.lm.dim)
    data = batches(data_for(kind, "train", qa_pairs), recipe.batch_size, seed=recipe.seed + 2,
                   collate_fn=VLMCollator(tokenizer, model.num_image_tokens))
    start = time.perf_counter()
    train_stage(model, recipe, 1, tokenizer, log_every=300, progress=False, device="cpu")
    if kind == CURRICULUM:  # first the comparison alone, then the same budget's rest on the recipe's four words
        first = batches(ProbeQuestions("in words, canonical", "train", qa_pairs), recipe.batch_size, seed=recipe.seed + 3,
                        collate_fn=VLMCollator(tokenizer, model.num_image_tokens))
        train_stage(model, replace(recipe, stage2_steps=CURRICULUM_STEPS), 2, tokenizer, data=first, log_every=300,
                    progress=False, device="cpu")
        recipe = replace(recipe, stage2_steps=steps - CURRICULUM_STEPS)
    train_stage(model, recipe, 2, tokenizer, data=data, log_every=300, progress=False, device="cpu")
    seconds = time.perf_counter() - start
    val = data_for(kind, "val", VAL_QUESTIONS)
    items = [val[j] for j in range(len(val))]
    said = model.eval().generate(tokenizer, torch.stack([it[0] for it in items]), [it[1] for it in items], max_new_tokens=8)
    acc: dict[str, list[bool]] = {}
    for it, s in zip(items, said):
        # a grounded answer is right when its last word is; its places (the first two words) are scored apart
        right = s.split()[-1:] == it[2].split()[-1:] if it[3] == GROUNDED else s == it[2]
        acc.setdefault(it[3], []).append(right)
        if it[3] == GROUNDED:
            acc.setdefault("grounded, places", []).append(s.split()[:2] == it[2].split()[:2])
        if it[3] == "where":  # the column alone: is the horizontal place read, if not to the patch?
            acc.setdefault("where, column", []).append(s.split()[:1] == it[2].split()[:1])
    top = Counter(said).most_common(3)
    name = (kind if steps == STEPS else f"{kind}, {steps:,} steps") + (f", seed {seed}" if seed else "")
    return {"row": i, "name": name, "stage2_steps": steps, "qa_pairs": qa_pairs, "val_questions": VAL_QUESTIONS,
            "val": {k: round(sum(v) / len(v), 4) for k, v in acc.items()}, "most_common_answers": top,
            "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = [f"{'row':18s} accuracy on its own val questions"]
    for r in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{r['name']:18s} " + ", ".join(f"{k} {v:.2f}" for k, v in r["val"].items())
                     + f"   (most common answers: {r['most_common_answers']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{k}, {st} steps" + (f", seed {sd}" if sd else "") for k, st, _, sd in ROWS], run, RESULTS,
        header=lambda: {"what": "spatial questions in other forms, each trained alone (scripts/spatial_probes.py)",
                        "stage2_steps": STEPS, "qa_pairs": QA_PAIRS, "val_questions": VAL_QUESTIONS},
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
