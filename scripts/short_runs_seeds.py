#!/usr/bin/env python
"""Do chapters 03 to 07's training runs hold on other seeds? The runs the chapters print and check.

    python scripts/short_runs_seeds.py             # every row (about twenty minutes on one CPU thread)
    python scripts/short_runs_seeds.py --rows 0 3  # some rows only (merged into the results file)

A chapter trains a short run in front of the reader and asserts what it shows. One seed
may be luck, and another CPU's rounding sends the same seed down another path, so each row
here repeats one chapter's short runs with one seed (the new parts' first weights and the
order of the batches), on one thread with deterministic kernels, and records every number
the chapter's assertions test:

- **chapter 06** (seeds 0, 1, 2): `build_vlm(VLMRecipe(seed=s))`; stage 1 for 40 steps, then
  stage 2 for 80, scored on 300 test questions after each; the linear projector's 40 steps of
  stage 1; Fuyu (raw patches, linear projector) for 40 + 80 steps, scored on the same questions.
- **chapter 07** (seeds 0, 1, 2): `build_xattn(XAttnRecipe(seed=s))` trained 200 steps on the mix (no spatial stage); its
  loss, its gates and 300 test questions.
- **chapter 05** (seeds 0, 1, 2): CLIP trained with `CLIPRecipe(seed=s)` (its first weights and
  the order of the batches), with the chapter's zero-shot evaluation every 200 steps; the
  similarity of 12 test pairs, zero-shot accuracy and retrieval; the two small runs (InfoNCE and
  SigLIP's sigmoid loss, batch 8, 300 steps); a linear probe of that CLIP's patch vectors; and
  the dense head's 150-step run on top of it (`TowerRecipe(seed=s)`).
- **chapter 03** (seeds 0, 1, 2): the ViT classifier and the linear classifier on pixels, each
  600 steps with that seed (weights and batches), scored on the 1,000 test images.
- **chapter 04** (seeds 0, 1, 2): the GPT pretrained with `PretrainRecipe(seed=s)`, its
  held-out perplexity against the unigram baseline's.

The results go to data/results/short_runs_seeds.json (with the PyTorch version); chapters 03
to 07 print their rows and check their assertions on every seed in the file.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)


RESULTS = ROOT / "data" / "results" / "short_runs_seeds.json"
SEEDS = (0, 1, 2)
SHORT1, SHORT2 = 40, 80  # chapter 06's shortened stages
SHORT_XATTN = 200  # chapter 07's short run
TEST_QUESTIONS = 300
ROWS: list[tuple[str, int]] = [(chapter, s) for chapter in ("06", "07", "05", "03", "04") for s in SEEDS]


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
    history = train_xattn(model, recipe, tok, steps=SHORT_XATTN, spatial_steps=0, log_every=0, progress=False, device="cpu")
    gates = model.gates()
    return {"xattn": _losses(history), "smallest_attention_gate": round(min(abs(a) for a, _ in gates.values()), 4),
            "vqa_image": round(vqa_accuracy(model.eval(), tok, VQADataset("test", TEST_QUESTIONS))["all"], 4)}


def chapter05(seed: int) -> dict:
    import torch

    from mllm_scratch.clip import (
        CLIP,
        CLIPConfig,
        CLIPRecipe,
        TowerRecipe,
        colour_shape_prompts,
        dense_dataset,
        embed_images,
        embed_texts,
        patch_accuracy,
        pretrain_clip,
        retrieval_chance,
        retrieval_recall,
        retrieval_sets,
        single_object_test_set,
        train_dataset,
        train_tower,
        zero_shot_classifier,
        zero_shot_predict,
    )
    from mllm_scratch.probes import linear_probe
    from mllm_scratch.shapeworld import class_names
    from mllm_scratch.tokenizer import load_tokenizer

    tok = load_tokenizer()
    recipe = replace(CLIPRecipe(), seed=seed)
    train_set = train_dataset(recipe, tok)
    test_images, test_labels = single_object_test_set("test", 500)
    classes, prompts = class_names("colour_shape"), colour_shape_prompts()

    def attribute(pred, labels, part):  # the fraction whose colour (part 0) or shape (part 1) is right
        return sum(classes[p].split()[part] == classes[y].split()[part] for p, y in zip(pred.tolist(), labels.tolist())) / len(labels)

    def zero_shot(m, images=test_images, labels=test_labels):
        pred = zero_shot_predict(m, zero_shot_classifier(m, prompts, tok), images)
        return {"all": (pred == labels).float().mean().item(), "colour": attribute(pred, labels, 0),
                "shape": attribute(pred, labels, 1)}

    torch.manual_seed(seed)
    model, history = pretrain_clip(recipe, tok, dataset=train_set, model=CLIP(recipe.model), evaluate=zero_shot,
                                   eval_every=200, log_every=0, progress=False)
    gallery = retrieval_sets(recipe)
    gal_images, gal_texts, _ = gallery["test"]
    pick = torch.arange(0, 48, 4)  # the chapter's 12 test pairs, all captions distinct
    with torch.no_grad():
        sim = embed_images(model, gal_images[pick]) @ embed_texts(model, [gal_texts[i] for i in pick], tok).T
    comp_images, comp_labels = single_object_test_set("compositional", 500)
    recall = {}
    for split, (images, texts, queries) in gallery.items():  # each recall over its chance level
        r = retrieval_recall(embed_images(model, images), embed_texts(model, texts, tok), queries=queries)
        chance = retrieval_chance(len(texts))
        recall[split] = {k: round(v / chance[int(k.rsplit("@", 1)[1])], 2) for k, v in r.items()}
    small = {}
    for loss in ("infonce", "sigmoid"):
        small_recipe = replace(CLIPRecipe(batch_size=8, steps=300, warmup_steps=15, model=CLIPConfig(loss=loss)), seed=seed)
        m, _ = pretrain_clip(small_recipe, tok, dataset=train_set, log_every=0, progress=False)
        r = retrieval_recall(embed_images(m, gal_images), embed_texts(m, gal_texts, tok))
        small[loss] = {"colour": round(zero_shot(m)["colour"], 4), "R@1 i->t": round(r["image_to_text_R@1"], 4)}
    crowded = TowerRecipe().scene_config()
    probe_train, probe_val = dense_dataset("train", 1000, tok, crowded), dense_dataset("val", 500, tok, crowded)

    def patch_features(data):  # CLIP's patch vectors over objects, and the shape under each
        images, _, labels = data.tensors
        with torch.no_grad():
            feats = model.vision(images).patches
        shape = labels[:, 0].flatten(1)
        return feats[shape > 0], shape[shape > 0] - 1

    clip_probe = linear_probe(*patch_features(probe_train), *patch_features(probe_val))
    tower, tower_history = train_tower(replace(TowerRecipe(), seed=seed), tok, clip=model,
                                       dataset=dense_dataset("train", 4000, tok, crowded), steps=150, warmup_steps=10,
                                       log_every=0, progress=False)
    head = patch_accuracy(tower, probe_val)
    (_, first), (_, last) = history.evals[0], history.evals[-1]
    return {"clip": _losses(history), "first_eval": {k: round(v, 4) for k, v in first.items()},
            "last_eval": {k: round(v, 4) for k, v in last.items()},
            "diagonal": round((sim.argmax(1) == torch.arange(len(pick))).float().mean().item(), 4),
            "zero_shot": {"test": round(zero_shot(model)["all"], 4),
                          "compositional": round(zero_shot(model, comp_images, comp_labels)["all"], 4)},
            "recall_over_chance": recall, "small": small, "clip_patch_probe": round(clip_probe, 4),
            "dense_head": _losses(tower_history), "dense_head_accuracy": {k: round(v, 4) for k, v in head.items()}}


def chapter03(seed: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    from mllm_scratch.shapeworld import ShapeClassificationDataset, class_names
    from mllm_scratch.train import TrainConfig, batches, train
    from mllm_scratch.vit import ViTClassifier, ViTConfig

    def as_tensors(split, size):
        ds = ShapeClassificationDataset(split, size, task="shape")
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images), torch.tensor(labels)

    (train_x, train_y), (test_x, test_y) = as_tensors("train", 4000), as_tensors("test", 1000)
    classes = class_names("shape")
    config = ViTConfig(image_size=32, patch_size=4, dim=48, depth=3, num_heads=4, pos_embedding="learned", pool="cls",
                       num_classes=len(classes))  # the chapter's ViT

    def cross_entropy(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    def fit(model):
        data = batches(TensorDataset(train_x, train_y), 64, seed=seed)
        train(model, data, cross_entropy, TrainConfig(steps=600, lr=3e-3, warmup_steps=30, log_every=0, progress=False),
              device="cpu", batch_size_of=lambda b: len(b[0]))
        with torch.no_grad():
            return (model(test_x).argmax(-1) == test_y).float().mean().item()

    torch.manual_seed(seed)
    vit = ViTClassifier(config)
    torch.manual_seed(seed)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(classes)))
    return {"vit_test": round(fit(vit), 4), "linear_test": round(fit(linear), 4), "chance": round(1 / len(classes), 4)}


def chapter04(seed: int) -> dict:
    from mllm_scratch.gpt import PretrainRecipe, pretrain_gpt, text_datasets
    from mllm_scratch.text import perplexity, unigram_cross_entropy
    from mllm_scratch.tokenizer import load_tokenizer

    tok = load_tokenizer()
    recipe = replace(PretrainRecipe(), seed=seed)
    train_set, val_set = text_datasets(recipe, tok)
    unigram = perplexity(unigram_cross_entropy(train_set.targets, val_set.targets, tok.vocab_size))
    _, history = pretrain_gpt(recipe, tok, log_every=0, progress=False)
    return {"val_perplexity": round(perplexity(history.final_eval["val_loss"]), 4), "unigram_perplexity": round(unigram, 4)}


def run(index: int) -> dict:
    chapter, seed = ROWS[index]
    compute = {"03": chapter03, "04": chapter04, "05": chapter05, "06": chapter06, "07": chapter07}[chapter]
    return search_rows.timed_row(index, {"chapter": chapter, "seed": seed}, lambda: compute(seed))


def table(rows: list[dict]) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: r["row"]):
        rest = {k: v for k, v in r.items() if k not in ("row", "chapter", "seed", "seconds")}
        lines.append(f"chapter {r['chapter']}, seed {r['seed']}: {rest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return search_rows.main(
        argv, __doc__, [f"chapter {c}, seed {s}" for c, s in ROWS], run, RESULTS,
        header=lambda: {"what": "chapters 03 to 07's training runs, one row per seed (scripts/short_runs_seeds.py)",
                        "short1": SHORT1, "short2": SHORT2, "short_xattn": SHORT_XATTN, "test_questions": TEST_QUESTIONS},
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
