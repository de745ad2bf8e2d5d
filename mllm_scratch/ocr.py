"""Teaching an image tower to read: a dense head that names the character under each patch.

The book's tower (chapter 05) learned, per 4 px patch, the colour and shape of the object
there; nothing ever asked it what a glyph is, and no VLM built on it reads (chapters 06-08:
0.00). Real towers learn text from their data (CLIP and SigLIP from web images full of it;
InternViT, Qwen-VL and PaLI add OCR tasks in pretraining). Here the same idea at toy scale:
a copy of the book's tower and a linear head are trained so that each patch names the
character drawn there (or "none"), on tiles cut from scenes with text.

    char_map(scene)            (H, W) ints: 0 off the text, 1 + the character's index in TEXT_ALPHABET on it
    patch_char_labels(scene)   (H / p, W / p): the character covering most of each patch (>= min_pixels of it)
    ocr_dataset(...)           32 px tiles that show some text, with their patch labels
    train_reading_tower(...)   the copy of the tower + head, trained on them (`ReadingTowerRecipe`)
    char_accuracy(...)         how often the head names the character of a patch that shows one
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mllm_scratch.shapeworld import (
    SPLIT_SEEDS,
    TEXT_ALPHABET,
    Scene,
    ShapeWorldConfig,
    _GLYPH_H,
    _GLYPH_W,
    _check_split,
    generate_scene,
    render,
    to_tensor,
)
from mllm_scratch.train import History, TrainConfig, batches, train
from mllm_scratch.vit import VisionTransformer, config_dict

CHAR_CLASSES = len(TEXT_ALPHABET) + 1  # "no character" and the 33 of TEXT_ALPHABET


def char_map(scene: Scene) -> np.ndarray:
    """(H, W) int64: 0 off the text; on the ink cell of character k of the string, 1 + its index in TEXT_ALPHABET.

    A glyph's cell is the font's 6 x 8 cell (some glyphs ink all six columns, so the cells of a
    string tile its box with no gap), scaled as the renderer scales it.
    """
    if not isinstance(scene, Scene):
        raise ValueError(f"expected a shapeworld.Scene, got {type(scene).__name__}")
    out = np.zeros((scene.height, scene.width), dtype=np.int64)
    if scene.text is None:
        return out
    x0, y0, x1, y1 = scene.text_box
    scale = (y1 - y0) // _GLYPH_H
    for k, char in enumerate(scene.text):
        left = x0 + k * _GLYPH_W * scale
        out[y0:y1, left : min(left + _GLYPH_W * scale, x1)] = TEXT_ALPHABET.index(char) + 1
    return out


def patch_char_labels(scene: Scene, patch_size: int = 4, min_pixels: int | None = None) -> np.ndarray:
    """(H / p, W / p) int64: the character whose cell covers most of each p x p patch, if it covers at least
    `min_pixels` of it (default: a quarter of the patch), else 0."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size {patch_size!r} is invalid: expected a positive int")
    if scene.height % patch_size or scene.width % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the {scene.height} x {scene.width} px canvas: "
                         f"expected a divisor of both sides")
    least = patch_size * patch_size // 4 if min_pixels is None else min_pixels
    chars = char_map(scene)
    rows, cols = scene.height // patch_size, scene.width // patch_size
    onehot = np.eye(CHAR_CLASSES, dtype=np.int64)[chars]  # (H, W, K)
    counts = onehot.reshape(rows, patch_size, cols, patch_size, CHAR_CLASSES).sum(axis=(1, 3))  # (rows, cols, K)
    counts[..., 0] = 0  # background never wins
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= max(1, least), best, 0)


@dataclass(frozen=True)
class ReadingTowerRecipe:
    """A copy of the book's tower taught to name the character under each patch of a tile."""

    scenes: int = 12_000  # "train" scenes with text (every one has some), cut into tiles; tiles with no text are dropped
    image_size: int = 64  # the scenes' size: text is drawn at the font's own size (a 6 x 8 px cell per character)
    tile_size: int = 32  # the tower's input
    steps: int = 4000
    batch_size: int = 64  # tiles
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    offset: int = 3_000_000  # where the scenes start among the train seeds: scenes of their own

    def __post_init__(self) -> None:
        for name in ("scenes", "image_size", "tile_size", "steps", "batch_size"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if self.image_size % self.tile_size:
            raise ValueError(f"tile_size {self.tile_size} does not divide image_size {self.image_size}")

    def scene_config(self) -> ShapeWorldConfig:
        return ShapeWorldConfig(image_size=self.image_size, max_objects=3, text_probability=1.0)

    def train_config(self, **overrides) -> TrainConfig:
        base = dict(steps=self.steps, lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps), weight_decay=0.0, grad_clip=None,
                    record_every=10, log_every=500)
        return TrainConfig(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def _tiles(images: torch.Tensor, labels: torch.Tensor, tile: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images and (N, H/p, W/p) labels -> (N * tiles, 3, t, t) and (N * tiles, (t/p)^2), row-major tiles."""
    from mllm_scratch.tiling import tile_batch  # (tiling imports this module)

    n, _, h, w = images.shape
    rows, cols, g = h // tile, w // tile, tile // patch
    labs = labels.reshape(n, rows, g, cols, g).permute(0, 1, 3, 2, 4).reshape(-1, g * g)  # each tile's patch labels
    return tile_batch(images, tile), labs


def ocr_dataset(split: str, size: int, recipe: ReadingTowerRecipe | None = None, patch_size: int = 4,
                offset: int | None = None) -> TensorDataset:
    """(tile (3, t, t), patch labels (P,)) for the tiles of `size` scenes of `split` that show any text."""
    _check_split(split)
    recipe = recipe or ReadingTowerRecipe()
    config = recipe.scene_config()
    start = SPLIT_SEEDS[split][0] + (recipe.offset if offset is None and split == "train" else offset or 0)
    scenes = [generate_scene(start + i, config, split) for i in range(size)]
    images = torch.stack([to_tensor(render(s)) for s in scenes])
    labels = torch.from_numpy(np.stack([patch_char_labels(s, patch_size) for s in scenes]))
    tiles, labs = _tiles(images, labels, recipe.tile_size, patch_size)
    keep = (labs > 0).any(dim=1)
    return TensorDataset(tiles[keep], labs[keep])


class ReadingTower(nn.Module):
    """A ViT and a linear head per patch: (B, 3, t, t) -> (B, P, CHAR_CLASSES) logits."""

    def __init__(self, tower: VisionTransformer):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.dim, CHAR_CLASSES)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(tiles).patches)


def char_loss(model: ReadingTower, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every patch's character (background included: the head must also say 'none')."""
    tiles, labels = batch
    logits = model(tiles)
    return F.cross_entropy(logits.reshape(-1, CHAR_CLASSES), labels.reshape(-1))


def train_reading_tower(recipe: ReadingTowerRecipe | None = None, tower: VisionTransformer | None = None, *,
                        frozen: bool = False, dataset: TensorDataset | None = None, log_every: int = 500,
                        progress: bool = True, device: torch.device | str | None = None,
                        **overrides) -> tuple[ReadingTower, History]:
    """Train a copy of `tower` (default: the book's, `clip.pretrained_image_tower()`) and a fresh head; eval mode.

    frozen=True trains the head alone on the copy's fixed features: a linear probe of what the tower
    already sees, the control for what tuning it teaches.
    """
    from mllm_scratch.clip import pretrained_image_tower

    if not isinstance(frozen, bool):
        raise ValueError(f"frozen must be True or False, got {frozen!r}")
    recipe = recipe or ReadingTowerRecipe()
    tower = copy.deepcopy(tower if tower is not None else pretrained_image_tower())
    if tower.config.image_size != recipe.tile_size:
        raise ValueError(f"the tower takes {tower.config.image_size} px images, the recipe cuts {recipe.tile_size} px tiles")
    dataset = dataset if dataset is not None else ocr_dataset("train", recipe.scenes, recipe, tower.config.patch_size)
    torch.manual_seed(recipe.seed)
    model = ReadingTower(tower.requires_grad_(not frozen))
    history = train(model, batches(dataset, recipe.batch_size, seed=recipe.seed), char_loss,
                    recipe.train_config(log_every=log_every, progress=progress, **overrides),
                    device=device, batch_size_of=lambda b: len(b[0]))
    return model.eval(), history


@torch.no_grad()
def char_accuracy(model: ReadingTower, dataset: TensorDataset, batch_size: int = 512) -> float:
    """Share of the patches that show a character whose character the head names (chance 1/33)."""
    hits = total = 0
    for start in range(0, len(dataset), batch_size):
        tiles, labels = dataset[start : start + batch_size]
        on_text = labels > 0
        hits += int((model(tiles).argmax(-1) == labels)[on_text].sum())
        total += int(on_text.sum())
    if total == 0:
        raise ValueError("the dataset has no patch that shows a character")
    return hits / total


__all__ = [
    "CHAR_CLASSES",
    "ReadingTower",
    "ReadingTowerRecipe",
    "char_accuracy",
    "char_loss",
    "char_map",
    "ocr_dataset",
    "patch_char_labels",
    "train_reading_tower",
]
