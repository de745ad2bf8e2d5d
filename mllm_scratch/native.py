"""Images at their native size: does a ViT trained on one canvas still see on canvases it never saw?

Chapter 11's measurement. The task needs both *what* and *where*: each scene holds two
shapes side by side, and the answer is the shape of the one further left (5 classes, chance
0.2). A model trains on 32 x 32 canvases, or on several other sizes (`NativeRecipe.train_canvases`),
never on a test canvas but 32 x 32. At test time the canvas changes (24, 40 and 48 px
squares, a 32 x 64 strip) while the shapes keep their size in pixels, as a photo taken with
a wider lens shows more scene, not bigger objects (`ShapeWorldConfig.canvas`).

Three ways to give the patches their place:
- "rope2d": 2-D rotary positions; any grid works unchanged (Pixtral, Qwen2-VL);
- "learned": a learned table, bicubically interpolated to each grid (ViT, CLIP);
- "sincos": fixed 2-D sin-cos codes, stretched onto the trained grid's range.

`scripts/native_resolution.py` trains each on three seeds and writes
data/results/native_resolution.json; the chapter trains one short run itself.

The second half is M-RoPE on chapter 09's video questions (`VideoGridLM`): each clip's
frames become a (frames, rows, cols) grid of tokens before the question, in a small GPT
whose positions are 1-D RoPE (the token's place in the sequence) or M-RoPE (time, height
and width, Qwen2-VL; or with the pairs interleaved, Qwen3-VL). `scripts/mrope_video.py`
compares them on three seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from torch import nn

from mllm_scratch.gpt import GPT, GPTConfig, next_token_loss
from mllm_scratch.rope import mrope_positions
from mllm_scratch.shapeworld import (
    VIDEO_SKILLS, ShapeWorldConfig, VideoQADataset, generate_scene, relations, render, split_seed, to_tensor,
)
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, batches, train
from mllm_scratch.vit import ViTClassifier, ViTConfig, config_dict, forward_interpolated

TRAIN_CANVAS = (32, 32)
# The canvases the chapter tests, (height, width) in pixels; the shapes are 8 and 12 px on every one.
CANVASES: dict[str, tuple[int, int]] = {
    "24 px": (24, 24),
    "32 px": (32, 32),
    "40 px": (40, 40),
    "48 px": (48, 48),
    "32 x 64": (32, 64),
}
POSITIONS = ("rope2d", "learned", "sincos")


def scene_config(canvas: tuple[int, int]) -> ShapeWorldConfig:
    """Two objects, no text, shapes sized for a 32 px image, on a canvas of (height, width) pixels."""
    return ShapeWorldConfig(min_objects=2, max_objects=2, text_probability=0.0,
                            canvas=None if tuple(canvas) == (32, 32) else tuple(canvas))


def leftmost_scenes(split: str, n: int, canvas: tuple[int, int] = TRAIN_CANVAS,
                    shapes: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes whose two shapes are side by side (one wholly left of the other) -> images (n, 3, H, W), labels (n,).

    The label is the index in `shapes` (default: all five) of the left object's shape. The
    split's seeds are taken in order and scenes whose objects overlap in x are skipped, so
    the same call always gives the same scenes.
    """
    config = scene_config(canvas)
    shapes = tuple(shapes or config.shapes)
    images, labels, index = [], [], 0
    while len(images) < n:
        scene = generate_scene(split_seed(split, index), config, split)
        index += 1
        a, b = scene.objects
        if "left of" in relations(a, b) or "right of" in relations(a, b):
            left = a if "left of" in relations(a, b) else b
            images.append(to_tensor(render(scene)))
            labels.append(shapes.index(left.shape))
    return torch.stack(images), torch.tensor(labels)


@dataclass(frozen=True)
class NativeRecipe:
    """What decides a run of the measurement: data, model, optimisation, seed."""

    train_scenes: int = 20_000
    steps: int = 1_500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    seed: int = 0
    # Canvases to train on: 32 x 32 only, or several (native-resolution training, as NaViT and
    # Pixtral do). A step's batch comes from one canvas, taking them in turn.
    train_canvases: tuple[tuple[int, int], ...] = (TRAIN_CANVAS,)
    rope_base: float = 10_000.0  # 2-D RoPE only: frequencies base ** (-j / pairs), j = 0 .. pairs - 1
    # Two heads of 24 features: 6 pairs per axis for 2-D RoPE, so some pairs turn slowly enough for a 16-patch row.
    vit: ViTConfig = field(default_factory=lambda: ViTConfig(dim=48, depth=3, num_heads=2, pool="mean", num_classes=5))

    def __post_init__(self) -> None:
        if not self.train_canvases:
            raise ValueError("train_canvases must name at least one (height, width) canvas, got ()")
        for name, canvas in CANVASES.items():
            if canvas != TRAIN_CANVAS and canvas in self.train_canvases:
                raise ValueError(f"train_canvases {self.train_canvases} include the test canvas {name}: it would not be unseen")

    def model_config(self, position: str) -> ViTConfig:
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if position == "rope2d":
            return replace(self.vit, pos_embedding=position, rope_base=self.rope_base)
        return replace(self.vit, pos_embedding=position)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def classify(model: ViTClassifier, images: torch.Tensor, squeeze: bool = False) -> torch.Tensor:
    """Logits for images of any canvas: 2-D RoPE as is, absolute positions resized to the images' grid.

    squeeze: with 2-D RoPE, squeeze a grid longer than the trained one onto its range (RoPE's
    position interpolation) instead of extending the positions.
    """
    if squeeze and model.encoder.any_size:
        grid = model.config.grid_size
        return model.head(model.encoder(images, squeeze_to=(grid, grid)).pooled)
    return model.head(forward_interpolated(model.encoder, images).pooled)  # (batch, num_classes)


def training_data(recipe: NativeRecipe) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The recipe's training scenes: train_scenes in all, split evenly over its canvases, one (images, labels) each."""
    per = recipe.train_scenes // len(recipe.train_canvases)
    return [leftmost_scenes("train", per, canvas) for canvas in recipe.train_canvases]


def round_robin(streams: Sequence) -> Any:
    """One batch from each stream in turn, forever: every step's batch has one canvas size."""
    iterators = [iter(s) for s in streams]
    while True:
        for it in iterators:
            yield next(it)


def train_native(position: str, recipe: NativeRecipe | None = None,
                 data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 *, log_every: int = 0, progress: bool = False) -> tuple[ViTClassifier, History]:
    """Train the leftmost-shape classifier with `position`; returns it in eval mode and its History.

    data: `training_data(recipe)`, if already made. Absolute positions are resized to each
    training canvas (`classify`), so every method sees the same canvases.
    """
    recipe = recipe or NativeRecipe()
    config = recipe.model_config(position)
    data = data if data is not None else training_data(recipe)
    if len(data) != len(recipe.train_canvases):
        raise ValueError(f"data holds {len(data)} canvases, the recipe trains on {len(recipe.train_canvases)}")
    torch.manual_seed(recipe.seed)
    model = ViTClassifier(config)
    streams = [batches(torch.utils.data.TensorDataset(*d), recipe.batch_size, seed=recipe.seed + i)
               for i, d in enumerate(data)]
    history = train(
        model,
        round_robin(streams),
        lambda m, batch: F.cross_entropy(classify(m, batch[0]), batch[1]),
        TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                    weight_decay=recipe.weight_decay, log_every=log_every, progress=progress),
    )
    return model.eval(), history


@torch.no_grad()
def accuracy(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250,
             squeeze: bool = False) -> float:
    """Share of images whose left shape `classify` names correctly."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        guess = classify(model, images[i : i + batch_size], squeeze).argmax(-1)
        correct += int((guess == labels[i : i + batch_size]).sum())
    return correct / len(images)


def test_sets(n: int, canvases: dict[str, tuple[int, int]] | None = None, split: str = "test"
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """n held-out scenes per canvas: {name: (images, labels)}."""
    return {name: leftmost_scenes(split, n, canvas) for name, canvas in (canvases or CANVASES).items()}


def accuracy_by_canvas(model: ViTClassifier, sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       squeeze: bool = False) -> dict[str, float]:
    """{canvas name: accuracy} over `test_sets`."""
    return {name: round(accuracy(model, *data, squeeze=squeeze), 4) for name, data in sets.items()}


# ----------------------------------------------------------------------------------
# M-RoPE on video: positions in time, height and width


VIDEO_POSITIONS = ("rope", "mrope", "mrope-interleaved")


@dataclass(frozen=True)
class VideoGridRecipe:
    """What decides a run of the video comparison: the clips, the token grid, the small GPT and its training."""

    frames: int = 8  # sampled evenly from 16-frame clips, as chapter 09 does
    grid: int = 4  # each frame's 8 x 8 patch vectors from chapter 05's tower, averaged 2 x 2 -> 4 x 4 tokens
    motion: bool = False  # each token also carries its change since the previous frame (chapter 09's `with_motion`)
    train_clips: int = 8_000
    test_clips: int = 1_000
    dim: int = 64
    depth: int = 3
    num_heads: int = 4
    steps: int = 2_000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0

    def gpt_config(self, position: str, vocab_size: int) -> GPTConfig:
        """position "rope", "mrope" (Qwen2-VL's sections) or "mrope-interleaved" (Qwen3-VL's pairs in turn)."""
        if position not in VIDEO_POSITIONS:
            raise ValueError(f"position must be one of {VIDEO_POSITIONS}, got {position!r}")
        length = self.frames * self.grid**2 + 32  # the video tokens, then the question and answer
        return GPTConfig(vocab_size=vocab_size, context_length=length, dim=self.dim, depth=self.depth,
                         num_heads=self.num_heads, position="rope" if position == "rope" else "mrope",
                         mrope_interleaved=position == "mrope-interleaved")

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


@torch.no_grad()
def video_grid_features(split: str, n: int, recipe: VideoGridRecipe, tower: nn.Module | None = None,
                        batch_size: int = 64) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """n clips of `split` -> tokens (n, frames * grid * grid, tower dim) in (frame, row, col) order, and their (question, answer, skill).

    The frozen chapter-05 tower encodes every frame; its 8 x 8 patch vectors are averaged
    over 2 x 2 blocks (for grid 4).
    """
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.video import VIDEO_SCENES, sample_frames, with_motion

    tower = tower if tower is not None else pretrained_image_tower()
    data = VideoQADataset(split, n, VIDEO_SCENES, num_frames=16)
    keep = sample_frames(16, recipe.frames)
    feats, qa = [], []
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, n))]
        frames = torch.stack([it[0][keep] for it in items])  # (b, T, 3, H, W)
        b, t = frames.shape[:2]
        patches = tower(frames.flatten(0, 1)).patches  # (b * T, 64, d)
        g = math.isqrt(patches.shape[1])
        x = patches.reshape(b * t, g, g, -1).permute(0, 3, 1, 2)  # (b * T, d, 8, 8)
        x = F.adaptive_avg_pool2d(x, recipe.grid)  # (b * T, d, grid, grid)
        x = x.permute(0, 2, 3, 1).reshape(b, t, recipe.grid**2, -1)  # (b, T, grid * grid, d)
        if recipe.motion:
            x = with_motion(x)  # (b, T, grid * grid, 2d): each token and its change since the previous frame
        feats.append(x.flatten(1, 2))  # (b, T * grid * grid, d or 2d)
        qa += [(it[1], it[2], it[3]) for it in items]
    return torch.cat(feats), qa


class VideoGridLM(nn.Module):
    """Video tokens on a (frames, rows, cols) grid, then the question, in one GPT with 1-D RoPE or M-RoPE.

    position "rope": every token's position is its index in the sequence, so a video token's
    frame, row and column are mixed into one number. "mrope": the video tokens get
    (frame, row, col) on three axes and the text continues after the largest (Qwen2-VL).
    """

    def __init__(self, recipe: VideoGridRecipe, position: str, feature_dim: int, vocab_size: int):
        super().__init__()
        self.recipe, self.position = recipe, position
        self.lm = GPT(recipe.gpt_config(position, vocab_size))
        self.proj = nn.Linear(feature_dim, recipe.dim)  # the connector: tower width -> LM width

    @property
    def video_tokens(self) -> int:
        return self.recipe.frames * self.recipe.grid**2

    def positions(self, text_tokens: int) -> torch.Tensor:
        """(T,) sequence indices for "rope", (3, T) time/height/width indices for "mrope"."""
        r = self.recipe
        if self.position == "rope":
            return torch.arange(self.video_tokens + text_tokens)
        return mrope_positions([(r.frames, r.grid, r.grid), text_tokens])

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """features (b, video_tokens, feature_dim), ids (b, L) -> logits (b, video_tokens + L, vocab)."""
        if features.dim() != 3 or features.shape[1] != self.video_tokens:
            raise ValueError(f"features must have shape (batch, {self.video_tokens}, dim), got {tuple(features.shape)}")
        x = torch.cat([self.proj(features), self.lm.embed(ids)], dim=1)  # (b, video_tokens + L, dim)
        return self.lm(inputs_embeds=x, positions=self.positions(ids.shape[1]).to(x.device))


def _encode_qa(tokenizer: Tokenizer, qa: Sequence[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions and answers -> right-padded ids (n, L) and labels (n, L): the answer's ids and <|endoftext|>, -100 elsewhere."""
    rows = []
    for question, answer, _ in qa:
        head = tokenizer.encode_ordinary(question)
        tail = tokenizer.encode_ordinary(" " + answer) + [tokenizer.eot_id]
        rows.append((head + tail, [-100] * len(head) + tail))
    longest = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels


def _video_loss(model: VideoGridLM, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    features, ids, labels = batch
    logits = model(features, ids)[:, model.video_tokens :]  # (b, L, vocab): the text positions
    return next_token_loss(logits[:, :-1], labels[:, 1:])


def train_video_grid(position: str, recipe: VideoGridRecipe, train_data: tuple[torch.Tensor, list], *,
                     tokenizer: Tokenizer | None = None, log_every: int = 0, progress: bool = False
                     ) -> tuple[VideoGridLM, History]:
    """Train a `VideoGridLM` from scratch on (features, qa) from `video_grid_features`; eval mode on return."""
    tokenizer = tokenizer or load_tokenizer()
    features, qa = train_data
    ids, labels = _encode_qa(tokenizer, qa)
    torch.manual_seed(recipe.seed)
    model = VideoGridLM(recipe, position, features.shape[-1], tokenizer.vocab_size)
    dataset = torch.utils.data.TensorDataset(features, ids, labels)
    history = train(model, batches(dataset, recipe.batch_size, seed=recipe.seed), _video_loss,
                    TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                                log_every=log_every, progress=progress))
    return model.eval(), history


@torch.no_grad()
def video_grid_accuracy(model: VideoGridLM, data: tuple[torch.Tensor, list], tokenizer: Tokenizer | None = None,
                        batch_size: int = 200) -> dict[str, float]:
    """Per skill and overall ('all'): the share of questions whose every answer token (and the end) is the model's top choice."""
    tokenizer = tokenizer or load_tokenizer()
    features, qa = data
    ids, labels = _encode_qa(tokenizer, qa)
    hits = []
    for i in range(0, len(qa), batch_size):
        logits = model(features[i : i + batch_size], ids[i : i + batch_size])[:, model.video_tokens :]
        guess = logits[:, :-1].argmax(-1)  # (b, L - 1): the prediction of each next token
        target = labels[i : i + batch_size, 1:]
        scored = target != -100
        hits += ((guess == target) | ~scored).all(dim=1).tolist()
    out = {}
    for skill in VIDEO_SKILLS:
        own = [h for h, (_, _, s) in zip(hits, qa) if s == skill]
        if own:
            out[skill] = round(sum(own) / len(own), 4)
    out["all"] = round(sum(hits) / len(hits), 4)
    return out


__all__ = [
    "CANVASES",
    "NativeRecipe",
    "VideoGridLM",
    "VideoGridRecipe",
    "POSITIONS",
    "TRAIN_CANVAS",
    "accuracy",
    "accuracy_by_canvas",
    "classify",
    "leftmost_scenes",
    "round_robin",
    "training_data",
    "scene_config",
    "test_sets",
    "train_native",
    "train_video_grid",
    "video_grid_accuracy",
    "video_grid_features",
]
