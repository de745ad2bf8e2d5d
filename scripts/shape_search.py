#!/usr/bin/env python
"""Why chapter 06's VLM misses shapes in crowded scenes: the side-by-side runs appendix A1 prints.

    python scripts/shape_search.py             # every row (about 70 minutes on one CPU thread)
    python scripts/shape_search.py --rows 2 3  # some rows only (merged into the results file)

Two kinds of row, each on one thread with fixed seeds and deterministic kernels:

- **VLM rows** train chapter 06's unified VLM: the recipe's stage 1, then stage 2 shortened
  to 600 steps (unless the row says otherwise) on some data (the recipe's crowded question
  mix, or shape questions only, about one-object or crowded scenes), and score 600 *val*
  questions (never test) plus 150 one-object shape and colour questions. Some rows swap
  the image tower for one of the towers below.
- **Tower rows** train chapter 05's CLIP on other scenes, or with another image tower, and
  ask whether the tower now sees shape: zero-shot colour-shape accuracy on one-object test
  scenes (each class scored by the mean of its two size prompts, as chapter 05 does, and by
  the better of the two), and linear shape probes (`mllm_scratch.probes`) on one-object and
  on crowded (1-3 object) val scenes.

`LocalViT` is the one tower that is not the package's: the same ViT, but a patch attends
only to the 3 x 3 patches around it (no [CLS]; the pooled vector is the mean of the patch
vectors), so a patch vector depends on the pixels within `depth` patches of it and on
nothing further away: a sliding neighbourhood, as in Neighborhood Attention (Hassani et
al., 2023), where Swin and ViTDet use fixed windows.

The results go to data/results/shape_search.json (with the PyTorch version), which
appendix A1 (chapters/A1_image_tower_diagnosis.ipynb) prints and checks against the current recipes.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import search_rows  # noqa: E402  (scripts/, next to this file)

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from mllm_scratch.clip import (  # noqa: E402
    CLIP,
    CLIPRecipe,
    clip_loss,
    colour_shape_prompts,
    evaluate_clip,
    pretrain_clip,
    pretrained_clip,
    single_object_test_set,
    tokenize_captions,
    zero_shot_classifier,
    zero_shot_predict,
)
from mllm_scratch.probes import shape_probe  # noqa: E402
from mllm_scratch.runtime import setup_notebook  # noqa: E402
from mllm_scratch.shapeworld import SHAPES, SPLIT_SEEDS, Rng, ShapeWorldConfig, VQADataset, _sample_scene, caption, render, to_tensor  # noqa: E402
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.train import batches, train  # noqa: E402
from mllm_scratch.vit import VisionTransformer  # noqa: E402
from mllm_scratch.vlm import VLMCollator, VLMRecipe, build_vlm, train_stage, vqa_accuracy  # noqa: E402

RESULTS = ROOT / "data" / "results" / "shape_search.json"
STEPS = 600  # a VLM row's stage-2 phases are this long unless the row says "steps"
TOWER_STEPS = 1500  # CLIP steps of a tower a VLM row swaps in, unless the row says "tower_steps"
ONE = ShapeWorldConfig(max_objects=1, text_probability=0.0)  # one object, no text
CROWDED = ShapeWorldConfig(text_probability=0.0)  # 1-3 objects, no text


class LocalViT(VisionTransformer):
    """The package's ViT with neighbourhood attention (each patch sees the (2 * window + 1)^2 patches around it) and mean pooling."""

    def __init__(self, config, window: int = 1):
        super().__init__(replace(config, pool="mean"))  # no [CLS]: the image vector is the mean of the patch vectors
        g = self.config.grid_size
        row, col = torch.arange(g * g) // g, torch.arange(g * g) % g
        self.attn_mask = ((row[:, None] - row[None]).abs() <= window) & ((col[:, None] - col[None]).abs() <= window)


_CLIPS: dict[tuple[str, int], CLIP] = {}


def one_object_clip(tower: str, steps: int, tokenizer) -> CLIP:
    """Chapter 05's recipe (one-object scenes) for `steps`, with its own ViT ("global") or LocalViT ("local").

    Trained once per process; callers that may change it get a copy (`copy.deepcopy`).
    """
    if tower not in ("global", "local"):
        raise ValueError(f"tower must be 'global' or 'local', got {tower!r}")
    if (tower, steps) not in _CLIPS:
        recipe = CLIPRecipe(steps=steps)
        torch.manual_seed(recipe.seed)
        model = CLIP(recipe.model)
        if tower == "local":
            model.vision = LocalViT(recipe.model.vision)
        _CLIPS[tower, steps], _ = pretrain_clip(recipe, tokenizer, model=model, log_every=0, progress=False, device="cpu")
    return _CLIPS[tower, steps]


# (name, kind, settings). VLM phases: "mix" = the recipe's stage-2 data; "one-shape" / "shape" =
# shape questions only, about one-object / crowded scenes. A VLM row's "tower" ("local" or "global")
# swaps in the image tower of one_object_clip(tower, tower_steps).
ROWS: list[tuple[str, str, dict]] = [
    ("VLM: the recipe (tower tuned), stage 2 shortened", "vlm", dict(phases=["mix"], train_encoder=True)),
    ("VLM: tower frozen", "vlm", dict(phases=["mix"], train_encoder=False)),
    ("VLM: only shape questions, one-object scenes", "vlm", dict(phases=["one-shape"], train_encoder=False)),
    ("VLM: that, then the recipe's crowded mix", "vlm", dict(phases=["one-shape", "mix"], train_encoder=False)),
    ("tower: chapter 05's CLIP (shipped)", "tower", dict(train=None)),
    ("tower: CLIP trained on crowded scenes", "tower", dict(train="crowded", steps=600)),
    ("tower: CLIP on crowded minimal pairs", "tower", dict(train="twins", steps=1000)),
    ("tower: CLIP with LocalViT, one-object scenes", "tower", dict(train="local", steps=1500)),
    ("VLM: only shape questions, crowded scenes", "vlm", dict(phases=["shape"], train_encoder=False)),
    ("VLM: LocalViT tower, only shape questions, crowded", "vlm", dict(phases=["shape"], train_encoder=False, tower="local")),
    ("VLM: LocalViT tower, the recipe's crowded mix", "vlm", dict(phases=["mix"], train_encoder=False, tower="local")),
    ("VLM: LocalViT tower, the mix, full 1,800 steps", "vlm", dict(phases=["mix"], train_encoder=False, tower="local", steps=1800)),
    ("tower: chapter 05's CLIP, 1,500 steps", "tower", dict(train="global", steps=1500)),
    ("tower: CLIP with LocalViT, 600 steps", "tower", dict(train="local", steps=600)),
    ("VLM: 1,500-step chapter-05 tower, only shape questions, crowded", "vlm",
     dict(phases=["shape"], train_encoder=False, tower="global")),
]
PHASES = ("mix", "one-shape", "shape")


def stage2_phase(model, recipe: VLMRecipe, phase: str, tokenizer, steps: int = STEPS) -> None:
    """One stage-2 phase: the recipe's data ("mix") or shape questions only, with the recipe's parts, rates and schedule."""
    if phase not in PHASES:
        raise ValueError(f"unknown stage-2 phase {phase!r}: expected one of {PHASES}")
    data = None  # the recipe's own stage-2 stream
    if phase != "mix":
        questions = VQADataset("train", recipe.qa_pairs, ONE if phase == "one-shape" else CROWDED, skills=["shape"], cache=True)
        data = batches(questions, recipe.batch_size, seed=recipe.seed + 2, collate_fn=VLMCollator(tokenizer, model.num_image_tokens))
    train_stage(model, recipe, 2, tokenizer, steps=steps, data=data, log_every=0, progress=False, device="cpu")


def run_vlm(settings: dict, tokenizer) -> dict:
    steps = settings.get("steps", STEPS)
    recipe = replace(VLMRecipe(), stage2_steps=steps, train_encoder=settings["train_encoder"])
    model = build_vlm(recipe, tokenizer)
    if "tower" in settings:  # swap in another tower of the same width (the projector fits); a copy, never the cached one
        model.encoder = copy.deepcopy(one_object_clip(settings["tower"], settings.get("tower_steps", TOWER_STEPS), tokenizer).vision)
    train_stage(model, recipe, 1, tokenizer, log_every=0, progress=False, device="cpu")
    for phase in settings["phases"]:
        stage2_phase(model, recipe, phase, tokenizer, steps)
    model.eval()
    one = {s: vqa_accuracy(model, tokenizer, VQADataset("val", 150, ONE, skills=[s]))[s] for s in ("colour", "shape")}
    return {"recipe": recipe.to_dict(), "val": vqa_accuracy(model, tokenizer, VQADataset("val", 600)), "val_one_object": one}


def twin_pairs(n: int, tokenizer, seed: int = 1) -> TensorDataset:
    """n crowded "train" scenes, each with a twin that differs in one object's shape: (images (n, 2, 3, H, W), ids (n, 2, T))."""
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(n):
        scene = _sample_scene(Rng(SPLIT_SEEDS["train"][0] + i), CROWDED, "train")
        objects = list(scene.objects)
        k = rng.randrange(len(objects))
        taken = {(o.colour, o.shape) for o in objects}
        options = [s for s in SHAPES if (objects[k].colour, s) not in taken and (objects[k].colour, s) not in CROWDED.held_out]
        objects[k] = replace(objects[k], shape=rng.choice(options))
        twin = replace(scene, objects=tuple(objects))
        images.append(torch.stack([to_tensor(render(scene)), to_tensor(render(twin))]))
        texts += [caption(scene), caption(twin)]
    ids = tokenize_captions(texts, tokenizer, CLIPRecipe().model.text.context_length)
    return TensorDataset(torch.stack(images), ids.reshape(n, 2, -1))


def run_tower(settings: dict, tokenizer) -> dict:
    out: dict = {}
    if settings["train"] is None:
        model = pretrained_clip()
    elif settings["train"] == "crowded":
        recipe = CLIPRecipe(max_objects=3, steps=settings["steps"])
        model, _ = pretrain_clip(recipe, tokenizer, log_every=0, progress=False, device="cpu")
        out["recipe"] = recipe.to_dict()
    elif settings["train"] == "twins":  # a batch of 32 pairs is 64 images, each with its hard negative in the same batch
        recipe = CLIPRecipe(max_objects=3, steps=settings["steps"], train_pairs=10_000)
        torch.manual_seed(recipe.seed)
        model = CLIP(recipe.model)
        train(model, batches(twin_pairs(recipe.train_pairs, tokenizer), recipe.batch_size // 2, seed=recipe.seed),
              lambda m, b: clip_loss(m(b[0].flatten(0, 1), b[1].flatten(0, 1))), recipe.train_config(log_every=0, progress=False),
              device="cpu", batch_size_of=lambda b: 2 * len(b[0]))
        out["recipe"] = {**recipe.to_dict(), "data": "10,000 crowded scenes and their one-shape-changed twins"}
    elif settings["train"] in ("global", "local"):
        model = one_object_clip(settings["train"], settings["steps"], tokenizer)
        out["recipe"] = CLIPRecipe(steps=settings["steps"]).to_dict()
        if settings["train"] == "local":
            out["recipe"]["model"]["vision"]["pool"] = "mean"
            out["recipe"]["tower"] = "LocalViT(window=1)"
    else:
        raise ValueError(f"unknown tower training {settings['train']!r}: expected None, 'crowded', 'twins', 'global' or 'local'")
    model.eval()
    out["test_zero_shot_acc"] = evaluate_clip(model, tokenizer, CLIPRecipe())["test_zero_shot_acc"]
    images, labels = single_object_test_set("test", 500)
    per_size = zero_shot_classifier(model, [p for pair in colour_shape_prompts() for p in pair], tokenizer)  # (60, D)
    best = zero_shot_predict(model, per_size, images) // 2  # the class of the best-matching prompt
    out["test_zero_shot_best_prompt"] = round((best == labels).float().mean().item(), 4)
    features = lambda images: model.vision(images).patches  # noqa: E731
    out["probe_one_object"] = shape_probe(features, ONE)
    out["probe_crowded"] = shape_probe(features, CROWDED)
    return out


def run(index: int, tokenizer) -> dict:
    name, kind, settings = ROWS[index]
    setup_notebook(seed=0, threads=1, deterministic=True, device="cpu")
    start = time.perf_counter()
    result = (run_vlm if kind == "vlm" else run_tower)(settings, tokenizer)
    return {"row": index, "name": name, "kind": kind, "settings": settings, **result,
            "seconds": round(time.perf_counter() - start, 1)}


def table(results: list[dict]) -> str:
    lines = []
    vlm = [r for r in results if r["kind"] == "vlm"]
    if vlm:
        head = f"{'row':>3}  {'VLM run (600 stage-2 steps per phase unless said)':60s} {'shape':>6} {'colour':>6} {'count':>6}  {'one-object shape':>16}"
        lines += [head, "-" * len(head)]
        lines += [f"{r['row']:>3}  {r['name'][5:]:60s} {r['val']['shape']:6.2f} {r['val']['colour']:6.2f} {r['val']['count']:6.2f}  "
                  f"{r['val_one_object']['shape']:16.2f}" for r in sorted(vlm, key=lambda r: r["row"])]
    towers = [r for r in results if r["kind"] == "tower"]
    if towers:
        head = f"{'row':>3}  {'image tower':60s} {'zero-shot: mean':>15} {'best prompt':>11}  {'probe: one object':>17}  {'crowded':>7}"
        lines += ["", head, "-" * len(head)]
        lines += [f"{r['row']:>3}  {r['name'][7:]:60s} {r['test_zero_shot_acc']:15.2f} {r['test_zero_shot_best_prompt']:11.2f}  "
                  f"{r['probe_one_object']['arrangement']:17.2f}  {r['probe_crowded']['arrangement']:7.2f}"
                  for r in sorted(towers, key=lambda r: r["row"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    tokenizer = load_tokenizer()
    header = lambda: {"what": "chapter 06's shape diagnosis: VLM runs scored on val, image towers probed for shape",  # noqa: E731
                      "command": "python scripts/shape_search.py",
                      "vlm_recipe": VLMRecipe().to_dict(), "clip_recipe": CLIPRecipe().to_dict()}
    return search_rows.main(argv, __doc__, [name for name, _, _ in ROWS], lambda i: run(i, tokenizer), RESULTS, header, table)


if __name__ == "__main__":
    sys.exit(main())
