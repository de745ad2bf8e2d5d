#!/usr/bin/env python
"""Chapter 05's shortcut experiment: does a CLIP trained on one- and two-object scenes learn shape?

    python scripts/ch05_shortcut.py             # every row (about six minutes on one CPU thread)
    python scripts/ch05_shortcut.py --rows 1 4  # some rows only (merged into the results file)

Chapter 05 trains its CLIP on scenes of one object. Its section 1 says why: in a batch of
one- and two-object captions, colour and size alone tell almost every caption apart, so
nothing forces the image tower to learn shape. Each row here trains `CLIPRecipe(seed=s)`
exactly as the chapter does (600 steps, batches of 64, 20,000 pairs), on one of two data sets:

- **one object** (the chapter's recipe, the control): `CLIPRecipe(seed=s)`;
- **one or two objects** (the shortcut): the same with `max_objects=2`.

and records, for seeds 0, 1 and 2:

- zero-shot accuracy on 500 single-object test scenes (30 colour-shape classes, the chapter's
  classifier: each class's prompts averaged over the two sizes), split into colour and shape, with
  the colour and shape confusion matrices on the test and compositional splits; and the shape
  accuracy with one prompt per size instead (60 prompts, "a small red circle." ...);
- a linear probe for shape on the tower's pooled [CLS] vector (1,000 train, 500 test scenes of one
  object): is shape in the tower at all, even where the shared space does not use it?
- retrieval recall among 500 distinct two-object test captions, and among the chapter's 52;
- the learned temperature (the clamped scale exp(t)) and the loss every 10 steps;
- how many captions in a training batch differ from an image's own only by the shape words.

The results go to data/results/ch05_shortcut.json; chapter 05 prints them and checks its claims
on every seed.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)


RESULTS = ROOT / "data" / "results" / "ch05_shortcut.json"
SEEDS = (0, 1, 2)
DATA = {"one object": 1, "one or two objects": 2}  # name -> max_objects
ROWS: list[tuple[str, int]] = [(data, s) for s in SEEDS for data in DATA]
GALLERY = 500  # distinct two-object captions for retrieval
BATCHES = 20  # training batches scanned for captions that differ only in shape


def shape_only_rivals(texts: list[str], shapes: tuple[str, ...]) -> float:
    """Per caption, how many *other, different* captions of the batch become identical once the shape words are erased."""
    erase = re.compile(r"\b(" + "|".join(shapes) + r")\b")
    masked = [erase.sub("_", t) for t in texts]
    return sum(sum(m == masked[i] and texts[j] != texts[i] for j, m in enumerate(masked)) for i in range(len(texts))) / len(texts)


def row(data: str, seed: int) -> dict:
    import torch

    from mllm_scratch.clip import (
        CLIPRecipe,
        caption_pairs,
        colour_shape_prompts,
        embed_images,
        embed_texts,
        pretrain_clip,
        retrieval_chance,
        retrieval_recall,
        retrieval_sets,
        single_object_test_set,
        train_dataset,
        zero_shot_classifier,
        zero_shot_predict,
    )
    from mllm_scratch.probes import linear_probe
    from mllm_scratch.shapeworld import COLOURS, SHAPES, ShapeWorldConfig
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.train import batches

    tok = load_tokenizer()
    recipe = replace(CLIPRecipe(), seed=seed, max_objects=DATA[data])
    train_set = train_dataset(recipe, tok)
    test_images, test_labels = single_object_test_set("test", 500)
    comp_images, comp_labels = single_object_test_set("compositional", 500)
    prompts = colour_shape_prompts()  # class c is colour c // 5, shape c % 5

    def zero_shot(m, images=test_images, labels=test_labels):
        return {"all": (zero_shot_predict(m, zero_shot_classifier(m, prompts, tok), images) == labels).float().mean().item()}

    # How much does a batch ask for shape? Captions of the first training batches, decoded.
    stream = batches(train_set, recipe.batch_size, seed=recipe.seed)
    rivals = []
    for _ in range(BATCHES):
        ids = next(stream)[1]
        rivals.append(shape_only_rivals([tok.decode([t for t in r.tolist() if t < tok.eot_id]) for r in ids], SHAPES))

    model, history = pretrain_clip(recipe, tok, dataset=train_set, record_scale=True, log_every=0, progress=False)

    def confusions(images, labels):
        pred = zero_shot_predict(model, zero_shot_classifier(model, prompts, tok), images)
        n_shapes = len(SHAPES)
        colour = torch.zeros(len(COLOURS), len(COLOURS), dtype=torch.long)  # (true, predicted)
        shape = torch.zeros(n_shapes, n_shapes, dtype=torch.long)
        for y, p in zip(labels.tolist(), pred.tolist()):
            colour[y // n_shapes, p // n_shapes] += 1
            shape[y % n_shapes, p % n_shapes] += 1
        # The same 30 classes with one prompt per size instead of their average ("a small red circle." and
        # "a large red circle." are two of 60 prompts; a prediction counts by its colour and shape only).
        per_size = zero_shot_predict(model, zero_shot_classifier(model, [p for group in prompts for p in group], tok), images)
        per_size = per_size // len(prompts[0])
        return {"all": round((pred == labels).float().mean().item(), 4),
                "colour": round(colour.diagonal().sum().item() / len(labels), 4),
                "shape": round(shape.diagonal().sum().item() / len(labels), 4),
                "shape_one_prompt_per_size": round((per_size % n_shapes == labels % n_shapes).float().mean().item(), 4),
                "colour_confusion": colour.tolist(), "shape_confusion": shape.tolist()}

    probe_images, probe_labels = single_object_test_set("train", 1000)
    with torch.no_grad():
        pooled_train, pooled_test = model.vision(probe_images).pooled, model.vision(test_images).pooled
    shape_of = torch.tensor(len(SHAPES))
    probe = linear_probe(pooled_train, probe_labels % shape_of, pooled_test, test_labels % shape_of)

    two = ShapeWorldConfig(min_objects=2, max_objects=2, text_probability=0.0)
    gal_images, gal_texts = caption_pairs("test", GALLERY, two, distinct=True)
    recall = {"two objects": retrieval_recall(embed_images(model, gal_images), embed_texts(model, gal_texts, tok))}
    one_images, one_texts, _ = retrieval_sets(CLIPRecipe())["test"]
    recall["one object"] = retrieval_recall(embed_images(model, one_images), embed_texts(model, one_texts, tok))
    return {
        "max_objects": DATA[data],
        "shape_only_rivals_per_caption": round(sum(rivals) / len(rivals), 3),
        "zero_shot": {"test": confusions(test_images, test_labels), "compositional": confusions(comp_images, comp_labels)},
        "pooled_shape_probe": round(probe, 4),
        "recall": {k: {m: round(v, 4) for m, v in r.items()} for k, r in recall.items()},
        "recall_chance_R@1": {"two objects": retrieval_chance(GALLERY)[1], "one object": retrieval_chance(len(one_texts))[1]},
        "history": {"steps": history.steps, "loss": [round(x, 4) for x in history.loss],
                    "scale": [round(x, 3) for x in history.scale]},
        "init_scale": round(math.exp(recipe.model.init_logit_scale), 3),
        "max_scale": recipe.model.max_logit_scale,
    }


def run(index: int) -> dict:
    data, seed = ROWS[index]
    return search_rows.timed_row(index, {"data": data, "seed": seed}, lambda: row(data, seed))


def table(rows: list[dict]) -> str:
    lines = [f"{'data':20s} {'seed':>4s} {'zero-shot':>9s} {'colour':>6s} {'shape':>6s} {'/size':>6s} {'probe':>6s} "
             f"{'R@1 2-obj i->t':>14s} {'scale':>6s} {'rivals':>6s}"]
    for r in sorted(rows, key=lambda r: r["row"]):
        z = r["zero_shot"]["test"]
        lines.append(f"{r['data']:20s} {r['seed']:4d} {z['all']:9.3f} {z['colour']:6.3f} {z['shape']:6.3f} "
                     f"{z['shape_one_prompt_per_size']:6.3f} {r['pooled_shape_probe']:6.3f} {r['recall']['two objects']['image_to_text_R@1']:14.3f} "
                     f"{r['history']['scale'][-1]:6.1f} {r['shape_only_rivals_per_caption']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"{d}, seed {s}" for d, s in ROWS], run, RESULTS,
        header=lambda: {"what": "chapter 05's CLIP on one-object vs one-or-two-object scenes, one row per seed "
                                "(scripts/ch05_shortcut.py)", "gallery": GALLERY, "batches_scanned": BATCHES},
        table=table,
        summary=lambda r: f": shape {r['zero_shot']['test']['shape']:.3f}, colour {r['zero_shot']['test']['colour']:.3f}",
    )


if __name__ == "__main__":
    sys.exit(main())
