"""An independent judge of drawings: a small detector trained on real ShapeWorld scenes.

A generator must not grade itself. The judge is a convolutional network that never sees a
generated image in training: it learns, from rendered scenes, to find each object's centre
on the 8 x 8 grid of 4 px cells and to name its colour, shape and size. Its heads are
separate (colour, shape and size each have their own), and it trains on scenes in which
every colour-shape pair may appear, so it can recognise the compositional split's held-out
pairs that the generators never saw (the held-out rule binds the models it judges, not the
instrument).

`score(spec, objects)` compares what the judge found with what a caption asked for, per
attribute: colour, shape, colour and shape together, size, count and position (the caption's
left-to-right order, or its stated relation).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.shapeworld import (
    COLOURS, SHAPES, SIZES, ShapeObject, ShapeWorldConfig, generate_scene, render, split_seed, to_tensor,
)
from mllm_scratch.train import History, TrainConfig, batches, train

CHECKPOINT_NAME = "judge"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "checkpoints" / f"{CHECKPOINT_NAME}.pt"
CELL = 4  # px per grid cell: a 32 px image has 8 x 8 cells
ATTRIBUTES = ("colour", "shape", "colour_shape", "size", "count", "position")
SCENES = ShapeWorldConfig(text_probability=0.0)
SNAPPED = ShapeWorldConfig(text_probability=0.0, snap=CELL)


@dataclass(frozen=True)
class Found:
    """One object the judge found: its attributes and the centre of its grid cell in pixels."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float



class Judge(nn.Module):
    """Images (B, 3, 32, 32) -> per-cell logits: objectness (B, 8, 8), colour (B, 8, 8, 6), shape (.., 5), size (.., 2)."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.width = width
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),  # 32 -> 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 16 -> 8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Conv2d(2 * w, 1 + len(COLOURS) + len(SHAPES) + len(SIZES), 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"the judge reads images of shape (batch, 3, 32, 32), got {tuple(images.shape)}")
        out = self.head(self.trunk(images)).permute(0, 2, 3, 1)  # (B, 8, 8, 14)
        c, s = len(COLOURS), len(SHAPES)
        return {"object": out[..., 0], "colour": out[..., 1 : 1 + c], "shape": out[..., 1 + c : 1 + c + s],
                "size": out[..., 1 + c + s :]}


def cell_targets(scenes: Sequence) -> dict[str, torch.Tensor]:
    """Per-cell targets: which cell holds each object's centre, and its colour, shape and size indices (-100 elsewhere)."""
    n = len(scenes)
    obj = torch.zeros(n, 8, 8)
    labels = {k: torch.full((n, 8, 8), -100, dtype=torch.long) for k in ("colour", "shape", "size")}
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            r, c = int((o.y + o.side / 2) // CELL), int((o.x + o.side / 2) // CELL)
            obj[i, r, c] = 1.0
            labels["colour"][i, r, c] = COLOURS.index(o.colour)
            labels["shape"][i, r, c] = SHAPES.index(o.shape)
            labels["size"][i, r, c] = SIZES.index(o.size)
    return {"object": obj, **labels}


def judge_loss(model: Judge, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    images, obj, colour, shape, size = batch
    out = model(images)
    return (F.binary_cross_entropy_with_logits(out["object"], obj)
            + sum(F.cross_entropy(out[k].reshape(-1, out[k].shape[-1]), t.flatten())
                  for k, t in (("colour", colour), ("shape", shape), ("size", size))))


@torch.no_grad()
def detect(model: Judge, images: torch.Tensor, threshold: float = 0.5, batch_size: int = 500) -> list[list[Found]]:
    """The objects in each image, left to right: cells whose objectness passes `threshold`."""
    model.eval()
    found: list[list[Found]] = []
    for i in range(0, len(images), batch_size):
        out = model(images[i : i + batch_size].float())
        hit = out["object"].sigmoid() > threshold
        colour, shape, size = (out[k].argmax(-1) for k in ("colour", "shape", "size"))
        for b in range(hit.shape[0]):
            objs = [Found(COLOURS[colour[b, r, c]], SHAPES[shape[b, r, c]], SIZES[size[b, r, c]],
                          (c + 0.5) * CELL, (r + 0.5) * CELL)
                    for r, c in hit[b].nonzero().tolist()]
            found.append(sorted(objs, key=lambda o: (o.cx, o.cy)))
    return found


# ----------------------------------------------------------------------------------
# Scoring a drawing against what its caption asked for


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: its objects in caption order, and a relation between the two if it states one."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # "left of", "right of", "above" or "below", from objects[0] to objects[1]

    @classmethod
    def of(cls, scene, relation: str | None = None, order: Sequence[int] | None = None) -> "Spec":
        objs = tuple(scene.objects[i] for i in order) if order is not None else tuple(
            sorted(scene.objects, key=lambda o: (o.x + o.side / 2, o.y + o.side / 2)))
        return cls(objs, relation)


def holds(relation: str, a, b) -> bool:
    """Does `relation` hold from a to b, read at the judge's 4 px cell resolution? A relation ShapeWorld states
    holds clearly (the boxes are apart on that axis), so the two centres are at least 8 px, two cells, apart."""
    if relation == "left of":
        return a.cx < b.cx
    if relation == "right of":
        return a.cx > b.cx
    if relation == "above":
        return a.cy < b.cy
    if relation == "below":
        return a.cy > b.cy
    raise ValueError(f"relation {relation!r} is unknown: expected 'left of', 'right of', 'above' or 'below'")


def score(spec: Spec, found: Sequence[Found]) -> dict[str, bool | None]:
    """Per attribute, did the drawing give what the caption asked? position is None for a one-object caption."""
    want, got = spec.objects, list(found)
    same = lambda key: Counter(map(key, want)) == Counter(map(key, got))  # noqa: E731
    out: dict[str, bool | None] = {
        "colour": same(lambda o: o.colour),
        "shape": same(lambda o: o.shape),
        "colour_shape": same(lambda o: (o.colour, o.shape)),
        "size": same(lambda o: (o.colour, o.shape, o.size)),
        "count": len(want) == len(got),
        "position": None,
    }
    if len(want) >= 2:
        by_name = {(o.colour, o.shape): o for o in got}
        matched = [by_name.get((o.colour, o.shape)) for o in want]
        if any(m is None for m in matched) or len(by_name) != len(got):
            out["position"] = False
        elif spec.relation is not None:
            out["position"] = holds(spec.relation, matched[0], matched[1])
        else:  # a listing caption names its objects left to right (by centre: two stacked objects may share a column)
            out["position"] = all(a.cx <= b.cx for a, b in zip(matched, matched[1:]))
    return out


def accuracy(specs: Sequence[Spec], found: Sequence[Sequence[Found]]) -> dict[str, float]:
    """Share of drawings right on each attribute (position over captions with two or more objects), plus 'all'."""
    if len(specs) != len(found):
        raise ValueError(f"{len(specs)} captions but {len(found)} judged images: expected one image per caption")
    rows = [score(s, f) for s, f in zip(specs, found)]
    out = {}
    for k in ATTRIBUTES:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    out["all"] = sum(all(v for v in r.values() if v is not None) for r in rows) / len(rows)
    return out


# ----------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class JudgeRecipe:
    width: int = 48
    train_scenes: int = 20_000
    batch_size: int = 64
    steps: int = 2000
    lr: float = 2e-3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def judge_scenes(split: str, n: int) -> tuple[torch.Tensor, list]:
    """n scenes from the split's seeds in which any colour-shape pair may appear: (images, scene graphs).

    The first half are placed anywhere (as chapter 05 draws them), the second half snapped to 4 px
    (as chapter 13 draws them, where a shape may touch the canvas's edge).
    """
    half = n // 2
    scenes = [generate_scene(split_seed(split, i), SCENES if i < half else SNAPPED, None) for i in range(n)]
    return torch.stack([to_tensor(render(s)) for s in scenes]), scenes


def train_judge(recipe: JudgeRecipe | None = None, *, log_every: int = 0, progress: bool = False) -> tuple[Judge, History]:
    recipe = recipe or JudgeRecipe()
    images, scenes = judge_scenes("train", recipe.train_scenes)
    t = cell_targets(scenes)
    torch.manual_seed(recipe.seed)
    model = Judge(recipe.width)
    data = torch.utils.data.TensorDataset(images, t["object"], t["colour"], t["shape"], t["size"])
    history = train(model, batches(data, recipe.batch_size, seed=recipe.seed), judge_loss,
                    TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=50, weight_decay=0.0,
                                log_every=log_every, progress=progress), device="cpu")
    return model.eval(), history


def pretrained_judge(path: str | Path | None = None) -> Judge:
    """The shipped judge (eval mode), verified against its manifest and recipe."""
    from mllm_scratch.checkpoints import load_state_dict_strict, load_verified
    from mllm_scratch.gpt import tokenizer_sha256

    recipe = JudgeRecipe()
    saved, state_dict, path, rebuild = load_verified(
        CHECKPOINT_NAME, path, DEFAULT_PATH, expected_config={"width": recipe.width}, recipe=recipe.to_dict(),
        recipe_owner="mllm_scratch.judge.JudgeRecipe()", tokenizer_sha256=tokenizer_sha256(),
    )
    model = Judge(saved["width"])
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.eval()


def build_checkpoint(out: Path) -> dict:
    from mllm_scratch.checkpoints import save_checkpoint
    from mllm_scratch.gpt import tokenizer_sha256

    recipe = JudgeRecipe()
    model, history = train_judge(recipe, log_every=500)
    images, scenes = judge_scenes("test", 1000)
    metrics = {k: round(v, 4) for k, v in accuracy([Spec.of(s) for s in scenes], detect(model, images)).items()}
    metrics["train_seconds"] = round(history.seconds, 1)
    print("judge:", metrics)
    return save_checkpoint(
        Path(out) / f"{CHECKPOINT_NAME}.pt", model, {"width": recipe.width}, name=CHECKPOINT_NAME,
        recipe=recipe.to_dict(), metrics=metrics, dtype=torch.float16,
        extra={"trained_by": "mllm_scratch.judge.train_judge(JudgeRecipe()) on one CPU thread",
               "tokenizer_sha256": tokenizer_sha256(), "loader": "mllm_scratch.judge.pretrained_judge"},
    )
