"""Video for a language model: sample frames, encode each one, resample to a fixed number of tokens.

    clip (F frames) -> sample_frames: T evenly spaced frames (a lower frame rate)
                    -> the chapter-05 image tower, frame by frame -> (T, 64, 48) patch vectors
                    -> with_motion: each patch vector and its change since the previous frame (T, 64, 96)
                    -> Perceiver Resampler (time embedding per frame, 2-D place code per patch) -> (num_latents, dim)
                    -> the chapter-07 cross-attention decoder (one <|video|> marker in the text)
                       or the chapter-06 unified decoder (num_latents <|video|> slots spliced)

`VideoEncoder` is the part both decoders share. `VideoCollator` turns VideoQADataset
items into batches for either decoder. Training has two stages (`train_video_model`):
stage 1, `pretrain_resampler`, trains the resampler with a throwaway linear readout on
every question of each clip (`VideoFacts`); stage 2 trains the resampler and the decoder's
new parts on the LM's loss. Chapter 09 shows why each piece is needed: without place
codes a resampler cannot find the direction of motion, and through the frozen LM alone
its training signal is too faint. `video_recipes()` are the chapter's three models (the
video model, its single-frame baseline, the unified variant); `video_accuracy` scores
them per skill, with chance and majority-answer baselines.
Mirrors Flamingo (Alayrac et al., 2022) and the video adapter of Llama 3 (2024).
"""
from __future__ import annotations

import collections
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    STORED_DTYPE,
    CheckpointError,
    load_state_dict_strict,
    load_verified,
    round_to_dtype,
    save_checkpoint,
)
from mllm_scratch.gpt import GPT, next_token_loss
from mllm_scratch.perceiver import PerceiverResampler, ResamplerConfig
from mllm_scratch.shapeworld import VIDEO_SKILLS, ShapeWorldConfig, VideoQADataset
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, batches, run_overrides, train
from mllm_scratch.vit import config_dict
from mllm_scratch.vlm import IGNORE_INDEX, UnifiedVLM, VLMConfig
from mllm_scratch.xattn import CrossAttentionVLM, XAttnConfig, lm_checksum, xattn_loss

# Clips of two or three objects: with one object, "which shape moves?" would need no video.
VIDEO_SCENES = ShapeWorldConfig(min_objects=2, max_objects=3, text_probability=0.0)

# ----------------------------------------------------------------------------------
# Frames


def sample_frames(num_total: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` evenly spaced frames of a clip of `num_total`, first and last included."""
    if not isinstance(num_total, int) or num_total < 1:
        raise ValueError(f"num_total must be a positive int, got {num_total!r}")
    if not isinstance(num_frames, int) or not 1 <= num_frames <= num_total:
        raise ValueError(f"cannot sample {num_frames!r} frames from a clip of {num_total}: expected 1..{num_total}")
    if num_frames == 1:
        return [(num_total - 1) // 2]  # one frame: the middle one
    return [round(i * (num_total - 1) / (num_frames - 1)) for i in range(num_frames)]


class SampledVideoQA(Dataset):
    """A VideoQADataset whose clips are subsampled: (frames (T, 3, H, W), question, answer, skill) with T = `frames`."""

    def __init__(self, dataset: VideoQADataset, frames: int | Sequence[int]):
        self.dataset = dataset
        self.indices = sample_frames(dataset.num_frames, frames) if isinstance(frames, int) else list(frames)
        if not self.indices or not all(0 <= i < dataset.num_frames for i in self.indices):
            raise ValueError(f"frame indices {self.indices} are not all in 0..{dataset.num_frames - 1}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        frames, question, answer, skill = self.dataset[i]
        return frames[self.indices], question, answer, skill  # (T, 3, H, W)


# ----------------------------------------------------------------------------------
# The encoder both decoders share


def with_motion(features: torch.Tensor) -> torch.Tensor:
    """Frame features (n, T, S, d) -> (n, T, S, 2d): each patch vector, then its change since the previous frame.

    Frame 0 has no previous frame: its change is 0. Padding frames come after the real
    ones, so they never change a real frame's vector. The idea is Temporal Segment
    Networks' "RGB difference" stream (Wang et al., 2016), on features instead of pixels.
    """
    previous = torch.cat([features[:, :1], features[:, :-1]], dim=1)  # (n, T, S, d): frame t-1 (frame 0 for t = 0)
    return torch.cat([features, features - previous], dim=-1)  # (n, T, S, 2d)


class VideoEncoder(nn.Module):
    """Clips (n, T, 3, H, W) -> image tower per frame [-> with_motion] -> Perceiver Resampler -> (n, num_latents, dim)."""

    def __init__(self, tower: nn.Module, resampler: PerceiverResampler, motion: bool = False):
        super().__init__()
        self.tower = tower  # any module: images (N, 3, H, W) -> (N, S, d) or a ViTOutput
        self.resampler = resampler
        self.motion = motion  # the resampler's media_dim must then be twice the tower's width

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (n, T, 3, H, W) -> per-frame patch vectors (n, T, S, d); no graph through a frozen tower."""
        if frames.dim() != 5:
            raise ValueError(f"frames must have shape (clips, frames, channels, height, width), got {tuple(frames.shape)}")
        n, t = frames.shape[:2]
        trains = any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            features = self.tower(frames.flatten(0, 1))  # every frame is an image: (n * T, S, d)
        if hasattr(features, "patches"):
            features = features.patches
        return features.reshape(n, t, *features.shape[1:])  # (n, T, S, d)

    def resample(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frame features (n, T, S, d) -> video tokens (n, num_latents, dim)."""
        return self.resampler(with_motion(features) if self.motion else features, frame_mask)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames (n, T, 3, H, W); frame_mask (n, T), True = a real frame -> (n, num_latents, dim)."""
        return self.resample(self.frame_features(frames), frame_mask)


class FeatureEncoder(nn.Module):
    """The video encoder minus its tower: cached frame features (n, T, S, d) -> video tokens, sharing every module."""

    def __init__(self, encoder: VideoEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.resample(features, frame_mask)


# ----------------------------------------------------------------------------------
# Batches: a question about a clip, with one marker (cross-attention) or num_latents slots (unified)


class VideoBatch(NamedTuple):
    """frames (B, T, 3, H, W) as `.images` (so chapter 06/07 loss functions read it), ids, labels, frame_mask (B, T)."""

    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    frame_mask: torch.Tensor


class VideoCollator:
    """Collate (frames, question, answer, skill) items: `media_tokens` x <|video|>, question, " answer", <|endoftext|>.

    media_tokens = 1 for the cross-attention decoder (the marker only says where the clip
    stands), num_latents for the unified decoder (one slot per video token). Clips of
    different lengths are padded with blank frames at the end, marked False in frame_mask.
    """

    def __init__(self, tokenizer: Tokenizer, media_tokens: int = 1, media_id: int | None = None):
        if media_tokens < 1:
            raise ValueError(f"media_tokens must be at least 1, got {media_tokens}")
        self.tokenizer = tokenizer
        self.media_tokens = media_tokens
        self.media_id = tokenizer.video_id if media_id is None else media_id

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one example: labels are the answer ids and <|endoftext|>, -100 elsewhere."""
        tok = self.tokenizer
        head = [self.media_id] * self.media_tokens + tok.encode_ordinary(question)
        tail = tok.encode_ordinary(" " + answer) + [tok.eot_id]
        return head + tail, [IGNORE_INDEX] * len(head) + tail

    def __call__(self, items: Sequence[tuple]) -> VideoBatch:
        if any(len(item) != 4 for item in items):
            raise ValueError("expected (frames, question, answer, skill) items from VideoQADataset")
        pairs = [self.encode(item[1], item[2]) for item in items]
        longest = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(items), longest), self.tokenizer.pad_id, dtype=torch.long)  # right padding
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(pairs):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
        frames, frame_mask = pad_clips([item[0] for item in items])
        return VideoBatch(frames, ids, labels, frame_mask)


def pad_clips(clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (T_i, 3, H, W) -> (B, max T, 3, H, W) padded with zero frames at the end, and frame_mask (B, max T)."""
    longest = max(c.shape[0] for c in clips)
    frames = clips[0].new_zeros((len(clips), longest, *clips[0].shape[1:]))
    mask = torch.zeros(len(clips), longest, dtype=torch.bool)
    for i, clip in enumerate(clips):
        frames[i, : clip.shape[0]] = clip
        mask[i, : clip.shape[0]] = True
    return frames, mask  # (B, T, 3, H, W), (B, T)


# ----------------------------------------------------------------------------------
# The two decoders, fed by the same video encoder


@dataclass
class VideoVLMConfig(VLMConfig):
    """Chapter 06's VLMConfig for clips: the "image tokens" are the resampler's latents, spliced at <|video|>."""

    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.resampler, dict):
            self.resampler = ResamplerConfig(**self.resampler)
        super().__post_init__()

    @property
    def num_image_tokens(self) -> int:
        """Video tokens per clip: one per latent, whatever the number of frames."""
        return self.resampler.num_latents

    @property
    def image_dim(self) -> int:
        """Width of the resampler's output, which the projector reads."""
        return self.resampler.dim


@dataclass(frozen=True)
class VideoRecipe:
    """Everything that determines a trained video QA model: decoder, frames, resampler shape, data, budget, seed."""

    decoder: Literal["xattn", "unified"] = "xattn"  # chapter 07's cross-attention decoder or chapter 06's splice
    source_frames: int = 16  # frames generated per clip
    frames: int = 8  # frames sampled from them (1: the single-frame baseline, the middle frame)
    num_latents: int = 16
    dim: int = 64
    depth: int = 2
    max_frames: int = 64
    spatial_pos: bool = True  # 2-D sin-cos patch codes on the media tokens: where each patch is
    motion: bool = True  # each patch vector also carries its change since the previous frame (`with_motion`)
    train_clips: int = 8_000  # distinct "train" clips, one question each, skills equally common
    batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-3  # resampler and connector (gated blocks or projector)
    gate_lr: float = 1e-2  # the tanh gates of the cross-attention decoder
    warmup_steps: int = 20
    # Stage 1: the resampler alone, with a linear answer readout on its mean token (see `pretrain_resampler`).
    readout_steps: int = 4000
    readout_lr: float = 3e-3
    # Stage 2 also tunes the LM (chapter 06's stage 2; a copy, so other models keep chapter 04's GPT).
    train_lm: bool = False
    lm_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder not in ("xattn", "unified"):
            raise ValueError(f"decoder must be 'xattn' or 'unified', got {self.decoder!r}")
        if not 1 <= self.frames <= min(self.source_frames, self.max_frames):
            raise ValueError(f"frames {self.frames} must be in 1..min(source_frames, max_frames)")

    def resampler_config(self, tower_dim: int = 48) -> ResamplerConfig:
        media_dim = 2 * tower_dim if self.motion else tower_dim
        return ResamplerConfig(media_dim=media_dim, dim=self.dim, num_latents=self.num_latents, depth=self.depth,
                               max_frames=self.max_frames, spatial_pos=self.spatial_pos)

    def train_config(self, **overrides) -> TrainConfig:
        base = dict(steps=self.steps, lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps), weight_decay=0.0,
                    record_every=10, log_every=100)
        return TrainConfig(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    def stage1_key(self) -> tuple:
        """What stage 1 depends on: recipes with equal keys train identical resamplers in stage 1."""
        d = self.to_dict()
        for name in ("decoder", "steps", "lr", "gate_lr", "train_lm", "lm_lr"):  # stage 2 only
            d.pop(name)
        return tuple(sorted(d.items()))


def video_data(split: str, size: int, recipe: VideoRecipe, skills: Sequence[str] | None = None) -> SampledVideoQA:
    """The recipe's clips of `split`: VideoQADataset on VIDEO_SCENES, `source_frames` long, subsampled to `frames`."""
    data = VideoQADataset(split, size, VIDEO_SCENES, num_frames=recipe.source_frames, skills=skills)
    return SampledVideoQA(data, recipe.frames)


def build_video_model(recipe: VideoRecipe, tokenizer: Tokenizer | None = None, *, tower: nn.Module | None = None,
                      lm: GPT | None = None) -> CrossAttentionVLM | UnifiedVLM:
    """A fresh model for `recipe`: chapter 05's tower and chapter 04's GPT (frozen), a new seeded resampler and connector."""
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt

    tokenizer = tokenizer or load_tokenizer()
    tower = tower if tower is not None else pretrained_image_tower()
    lm = lm if lm is not None else pretrained_gpt()
    if recipe.train_lm:
        lm = copy.deepcopy(lm)  # this model tunes its LM: never the object other models share
    res_config = recipe.resampler_config(tower.config.dim)
    torch.manual_seed(recipe.seed)
    encoder = VideoEncoder(tower, PerceiverResampler(res_config), motion=recipe.motion)
    if recipe.decoder == "xattn":
        config = XAttnConfig(lm=lm.config, media_dim=res_config.dim, media_tokens=res_config.num_latents,
                             media_id=tokenizer.video_id, item_dims=4)
        model = CrossAttentionVLM(config, encoder=encoder, lm=lm)
    else:
        config = VideoVLMConfig(vision=tower.config, lm=lm.config, projector="mlp", image_id=tokenizer.video_id,
                                resampler=res_config)
        model = UnifiedVLM(config, encoder=encoder, lm=lm)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Every parameter frozen, eval mode."""
    return model.requires_grad_(False).eval()


def trained_parts(model: CrossAttentionVLM | UnifiedVLM, train_lm: bool = False) -> nn.ModuleDict:
    """What training changes: the resampler and the connector (gated blocks, or projector), and the LM if train_lm."""
    connector = model.xattn if isinstance(model, CrossAttentionVLM) else model.projector
    parts = {"resampler": model.encoder.resampler, "connector": connector}
    if train_lm:
        parts["lm"] = model.lm
    return nn.ModuleDict(parts)


def video_loss(model: nn.Module, batch: VideoBatch) -> torch.Tensor:
    """Next-token loss on the answer tokens, for either decoder (each reads batch.images as the clips)."""
    if isinstance(model, CrossAttentionVLM):
        return xattn_loss(model, batch)
    logits = model(batch.ids, batch.images)  # (B, T, vocab)
    return next_token_loss(logits[:, :-1], batch.labels[:, 1:], ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------
# Stage 1: teach the resampler to see motion through a direct readout


class VideoFacts(Dataset):
    """Clips with every question each one supports: (frames (T, 3, H, W), questions, answers). Stage 1's data.

    Clip i is `generate_clip` of seed i of the split (the clip VideoQADataset item i is
    drawn from), subsampled like `video_data`; one question per skill, where the clip has one.
    """

    def __init__(self, split: str, size: int, recipe: VideoRecipe):
        from mllm_scratch.shapeworld import SPLIT_SEEDS

        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLIT_SEEDS)}")
        self.split, self.size, self.recipe = split, size, recipe
        self.start = SPLIT_SEEDS[split][0]
        self.indices = sample_frames(recipe.source_frames, recipe.frames)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple:
        from mllm_scratch.shapeworld import clip_questions, generate_clip, render_clip, to_tensor

        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} clips")
        seed = self.start + i
        clip = generate_clip(seed, self.recipe.source_frames, VIDEO_SCENES, self.split)
        qas = clip_questions(clip, seed)
        frames = to_tensor(render_clip(clip))[self.indices]  # (T, 3, H, W)
        return frames, [qa.question for qa in qas], [qa.answer for qa in qas]


class AnswerReadout(nn.Module):
    """Stage 1's probe head: the mean video token -> one logit per answer, limited to the answers a question allows."""

    def __init__(self, dim: int, answers: Sequence[str], templates: dict[str, Sequence[str]]):
        super().__init__()
        self.answers = list(answers)
        self.templates = list(templates)
        allowed = torch.zeros(len(self.templates), len(self.answers), dtype=torch.bool)
        for row, options in enumerate(templates.values()):
            for answer in options:
                allowed[row, self.answers.index(answer)] = True
        self.register_buffer("allowed", allowed, persistent=False)  # (templates, answers)
        self.head = nn.Linear(dim, len(self.answers))

    @classmethod
    def for_pairs(cls, dim: int, pairs: Sequence[tuple[str, str]]) -> "AnswerReadout":
        """A readout over every answer in (question, answer) pairs, each question template allowed the answers it had."""
        options: dict[str, set[str]] = collections.defaultdict(set)
        for question, answer in pairs:
            options[_template(question)].add(answer)
        return cls(dim, sorted(set().union(*options.values())), {t: sorted(a) for t, a in sorted(options.items())})

    def targets(self, questions: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(template index, answer index) tensors for a batch of questions and answers."""
        return (torch.tensor([self.templates.index(_template(q)) for q in questions], dtype=torch.long),
                torch.tensor([self.answers.index(a) for a in answers], dtype=torch.long))

    def forward(self, video_tokens: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """video_tokens (B, L, dim), template (B,) -> logits (B, answers), -inf where the question rules an answer out."""
        logits = self.head(video_tokens.mean(dim=1))  # (B, answers)
        return logits.masked_fill(~self.allowed[template], float("-inf"))


class _ReadoutBatch(NamedTuple):
    features: torch.Tensor  # (B, T, S, d)
    frame_mask: torch.Tensor  # (B, T)
    row: torch.Tensor  # (Q,): which clip each question is about
    template: torch.Tensor  # (Q,)
    answer: torch.Tensor  # (Q,)


def pretrain_resampler(encoder: VideoEncoder, facts: "FeatureQA", recipe: VideoRecipe, *,
                       steps: int | None = None, log_every: int = 100, progress: bool = True,
                       device: torch.device | str | None = None) -> tuple[History, AnswerReadout]:
    """Stage 1: train the resampler (and a throwaway `AnswerReadout`) to answer from its mean token; no LM.

    facts: `FeatureQA(VideoFacts(...), encoder)`, every question of each clip. The LM's loss
    reaches the resampler only through the frozen LM and a connector whose gates start at
    0, one question per clip: too faint a signal for the resampler to find motion in the
    budget. A direct readout on all of a clip's questions gives it the signal; stage 2 then
    teaches the decoder to read what the resampler learned. Returns (history, readout).
    """
    torch.manual_seed(recipe.seed + 1)
    readout = AnswerReadout.for_pairs(encoder.resampler.config.dim,
                                      [qa for rest in facts.rest for qa in zip(rest[0], rest[1])])
    parts = nn.ModuleDict({"encoder": FeatureEncoder(encoder), "readout": readout})
    encoder.resampler.requires_grad_(True)
    readout.requires_grad_(True)

    def collate(items: Sequence[tuple]) -> _ReadoutBatch:
        feats, mask = pad_clips([it[0] for it in items])
        row = torch.tensor([r for r, it in enumerate(items) for _ in it[1]], dtype=torch.long)
        template, answer = readout.targets([q for it in items for q in it[1]], [a for it in items for a in it[2]])
        return _ReadoutBatch(feats, mask, row, template, answer)

    def loss_fn(m: nn.Module, batch: _ReadoutBatch) -> torch.Tensor:
        tokens = m["encoder"](batch.features, batch.frame_mask)  # (B, L, dim)
        logits = m["readout"](tokens[batch.row], batch.template)  # (Q, answers)
        return nn.functional.cross_entropy(logits, batch.answer)

    n = recipe.readout_steps if steps is None else steps
    config = recipe.train_config(steps=n, lr=recipe.readout_lr, warmup_steps=min(recipe.warmup_steps, n),
                                 log_every=log_every, progress=progress)
    data = batches(facts, recipe.batch_size, seed=recipe.seed + 1, collate_fn=collate)
    history = train(parts, data, loss_fn, config, device=device, batch_size_of=lambda b: b.features.shape[0])
    encoder.resampler.requires_grad_(False)
    return history, readout.eval()


def train_video_model(
    model: CrossAttentionVLM | UnifiedVLM,
    recipe: VideoRecipe,
    tokenizer: Tokenizer | None = None,
    *,
    steps: int | None = None,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
    cache_features: bool = False,
    readout_steps: int | None = None,
) -> dict[str, History]:
    """Stage 1 (`pretrain_resampler`, `readout_steps`), then stage 2: the resampler and the connector on the LM's loss.

    The image tower and the LM stay frozen. `steps` and `readout_steps` shorten the stages
    (0 readout steps: no stage 1). cache_features: run the frozen tower once per training
    clip and train stage 2 on its features (the same model and batches; faster when many
    steps revisit the clips, but it holds every clip's features in memory). Stage 1 always
    trains on cached features. Returns {"readout": History or None, "decoder": History}.
    """
    tokenizer = tokenizer or load_tokenizer()
    freeze(model)
    dataset: Dataset = video_data("train", recipe.train_clips, recipe)
    readout_history = None
    n_readout = recipe.readout_steps if readout_steps is None else readout_steps
    if n_readout > 0:
        facts = FeatureQA(VideoFacts("train", recipe.train_clips, recipe), model.encoder)
        readout_history, _ = pretrain_resampler(model.encoder, facts, recipe, steps=n_readout,
                                                log_every=log_every, progress=progress, device=device)
    parts = trained_parts(model, recipe.train_lm).requires_grad_(True)
    named = list(parts.named_parameters())
    gates = [p for n, p in named if n.endswith("_gate")]
    lm_params = [p for n, p in named if n.startswith("lm.")]
    rest = [p for n, p in named if not n.endswith("_gate") and not n.startswith("lm.")]
    groups = [{"params": rest, "lr": recipe.lr}] + ([{"params": gates, "lr": recipe.gate_lr}] if gates else []) + \
        ([{"params": lm_params, "lr": recipe.lm_lr}] if lm_params else [])
    overrides = run_overrides(log_every, progress, steps, recipe.warmup_steps)
    config = recipe.train_config(**overrides)
    media_tokens = 1 if recipe.decoder == "xattn" else recipe.num_latents
    collate = VideoCollator(tokenizer, media_tokens)
    trainee: nn.Module = model
    if cache_features:  # the tower is frozen: encode each training clip's frames once, train on the features
        dataset = FeatureQA(dataset, model.encoder)
        trainee = _feature_view(model)
    data = batches(dataset, recipe.batch_size, seed=recipe.seed, collate_fn=collate,
                   device=torch.device(device) if device is not None else None)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    history = train(trainee, data, video_loss, config, optimizer=optimizer, device=device,
                    batch_size_of=lambda b: b.ids.shape[0])
    freeze(model)
    return {"readout": readout_history, "decoder": history}


class FeatureQA(Dataset):
    """Clips replaced by their frozen tower's frame features: (features (T, S, d), question, answer, skill)."""

    def __init__(self, dataset: Dataset, encoder: VideoEncoder, batch_size: int = 64):
        items = [dataset[i] for i in range(len(dataset))]
        feats = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                clips = torch.stack([it[0] for it in items[start : start + batch_size]])  # (b, T, 3, H, W)
                feats.append(encoder.frame_features(clips))  # (b, T, S, d)
        self.features = torch.cat(feats)  # (N, T, S, d)
        self.rest = [tuple(it[1:]) for it in items]

    def __len__(self) -> int:
        return len(self.rest)

    def __getitem__(self, i: int) -> tuple:
        return (self.features[i], *self.rest[i])


def _feature_view(model: CrossAttentionVLM | UnifiedVLM) -> nn.Module:
    """The same model reading frame features instead of frames: it shares every module except the frozen tower."""
    from dataclasses import replace

    resampler, lm = FeatureEncoder(model.encoder), model.lm
    if isinstance(model, CrossAttentionVLM):
        view = CrossAttentionVLM(replace(model.config, item_dims=3), encoder=resampler, lm=lm)
        view.xattn = model.xattn  # the trained blocks themselves, not copies
    else:
        view = UnifiedVLM(model.config, encoder=resampler, lm=lm)
        view.projector = model.projector
    return view


# ----------------------------------------------------------------------------------
# Evaluation: exact-match answers per skill, against chance and the majority answer


def answer_options(question: str) -> int:
    """How many answers a question allows: its chance level is 1 / this."""
    if question.startswith("which way"):
        return 4  # left, right, up, down
    if question == "which shape moves?":
        return 5
    if question.startswith("what colour"):
        return 6
    if question.startswith("which appears first"):
        return 2  # one of the two shapes named
    if question.startswith("how many objects appear"):
        return 3  # zero, one or two (a clip holds at most three objects, one of them there from the start)
    raise ValueError(f"unknown video question {question!r}")


def _per_skill(values: Sequence[float], skills: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for v, s in zip(values, skills):
        groups[s].append(v)
    out = {s: sum(groups[s]) / len(groups[s]) for s in VIDEO_SKILLS if s in groups}
    out["all"] = sum(values) / len(values)
    return out


def chance_accuracy(dataset: Dataset) -> dict[str, float]:
    """Expected accuracy of a uniform guess among each question's allowed answers, per skill and overall."""
    items = [dataset[i] for i in range(len(dataset))]
    return _per_skill([1 / answer_options(it[1]) for it in items], [it[3] for it in items])


def majority_accuracy(train_set: Dataset, test_set: Dataset) -> dict[str, float]:
    """Accuracy of always giving the most common training answer to each question (blind to the video)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(train_set)):
        _, question, answer, _ = train_set[i]
        counts[_template(question)][answer] += 1
    items = [test_set[i] for i in range(len(test_set))]
    hits = [float(counts[_template(q)].most_common(1)[0][0] == a) if counts[_template(q)] else 0.0 for _, q, a, _ in items]
    return _per_skill(hits, [it[3] for it in items])


def _template(question: str) -> str:
    # Questions that name objects share a template; the answer prior is per template.
    for prefix in ("which way", "which appears first"):
        if question.startswith(prefix):
            return prefix
    return question


@torch.no_grad()
def video_accuracy(model: CrossAttentionVLM | UnifiedVLM, tokenizer: Tokenizer, dataset: Dataset,
                   batch_size: int = 200) -> dict[str, float]:
    """Exact-match accuracy of the model's greedy answers, per skill and overall ('all')."""
    hits, skills = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        frames = torch.stack([it[0] for it in items])  # (b, T, 3, H, W)
        answers = model.generate(tokenizer, frames, [it[1] for it in items], max_new_tokens=3)
        hits += [float(guess == it[2]) for guess, it in zip(answers, items)]
        skills += [it[3] for it in items]
    return _per_skill(hits, skills)


# ----------------------------------------------------------------------------------
# The shipped checkpoint: the three models of chapter 09, only the parts training changed

CHECKPOINT_NAME = "video"
DEFAULT_CHECKPOINT = DEFAULT_DIR / f"{CHECKPOINT_NAME}.pt"


def video_recipes() -> dict[str, VideoRecipe]:
    """The chapter's three models: the video model, its single-frame baseline, and the unified-decoder variant."""
    return {
        "video": VideoRecipe(),
        "single_frame": VideoRecipe(frames=1),
        "unified": VideoRecipe(decoder="unified", train_lm=True),  # chapter 06's method A tunes its LM
    }


def _checksums(tower: nn.Module, lm: nn.Module) -> dict[str, str]:
    return {"tower_checksum": lm_checksum(tower), "lm_checksum": lm_checksum(lm)}


# The file stores float16 (checkpoints.STORED_DTYPE): three models' trained parts (one with
# its own LM) fit in half the bytes. `build_checkpoint` rounds the weights to it before
# scoring, so the metrics are the file's.


def round_to_stored(model: nn.Module) -> nn.Module:
    """Round every floating-point parameter and buffer to STORED_DTYPE and back, in place: the model as the file holds it."""
    return round_to_dtype(model, STORED_DTYPE)


def save_video_models(path: str | Path, models: dict[str, nn.Module], recipes: dict[str, VideoRecipe], *,
                      metrics: dict | None = None, name: str = CHECKPOINT_NAME) -> dict:
    """Save the resampler and connector of each model (not the frozen tower or LM), with recipes and checksums."""
    from mllm_scratch.gpt import tokenizer_sha256

    if set(models) != set(recipes):
        raise ValueError(f"models {sorted(models)} and recipes {sorted(recipes)} must have the same names")
    first = next(iter(models.values()))
    parts = nn.ModuleDict({k: trained_parts(m, recipes[k].train_lm) for k, m in models.items()})
    config = {k: r.to_dict() for k, r in recipes.items()}
    return save_checkpoint(path, parts, config, name=name, recipe=config, metrics=metrics, dtype=STORED_DTYPE,
                           extra={**_checksums(first.encoder.tower, first.lm), "tokenizer_sha256": tokenizer_sha256(),
                                  "frozen": "chapter 05's image tower and chapter 04's GPT: not stored here",
                                  "loader": "mllm_scratch.video.load_video_models"})


def load_video_models(path: str | Path | None = None) -> dict[str, CrossAttentionVLM | UnifiedVLM]:
    """The chapter-09 models saved by `save_video_models` (default: the shipped file), verified; eval mode, frozen.

    Refuses (CheckpointError) a file whose sha256, recipes or tokenizer do not match, and a
    tower or LM whose checksum differs from the ones the models were trained on.
    """
    from mllm_scratch.checkpoints import read_manifest
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt, tokenizer_sha256

    recipes = video_recipes()
    saved, state_dict, path, rebuild = load_verified(
        CHECKPOINT_NAME, path, DEFAULT_CHECKPOINT, expected_config=None,
        recipe={k: r.to_dict() for k, r in recipes.items()},
        recipe_owner="video_recipes() in mllm_scratch/video.py", tokenizer_sha256=tokenizer_sha256(),
    )
    try:
        recipes = {k: VideoRecipe(**v) for k, v in saved.items()}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid VideoRecipe ({err}); rebuild it with: {rebuild}") from None
    tower, lm = pretrained_image_tower(), pretrained_gpt()
    manifest = read_manifest(path, rebuild)
    for key, value in _checksums(tower, lm).items():
        if manifest.get(key) != value:
            raise CheckpointError(f"checkpoint {path} was trained on another {key.split('_')[0]} ({key} "
                                  f"{str(manifest.get(key))[:12]}..., this one is {value[:12]}...); rebuild it with: {rebuild}")
    tokenizer = load_tokenizer()
    models = {k: build_video_model(r, tokenizer, tower=tower, lm=lm) for k, r in recipes.items()}
    load_state_dict_strict(nn.ModuleDict({k: trained_parts(m, recipes[k].train_lm) for k, m in models.items()}),
                           state_dict, path, rebuild)
    return {k: freeze(m) for k, m in models.items()}


def build_checkpoint(out: Path, test_clips: int = 800) -> dict:
    """Train the three `video_recipes()` and save out/video.pt + out/video.json (`build_checkpoints.py video`).

    Recipes whose stage 1 is the same (the video model and the unified variant) share it:
    it is trained once and the resampler it gives is the starting point of both stage 2s.
    """
    import copy

    recipes = video_recipes()
    tokenizer = load_tokenizer()
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt

    tower, lm = pretrained_image_tower(), pretrained_gpt()
    models, metrics, stage1 = {}, {}, {}
    for name, recipe in recipes.items():
        model = build_video_model(recipe, tokenizer, tower=tower, lm=lm)
        key = recipe.stage1_key()
        if key not in stage1:
            facts = FeatureQA(VideoFacts("train", recipe.train_clips, recipe), model.encoder)
            readout_history, readout = pretrain_resampler(model.encoder, facts, recipe, log_every=500, progress=False,
                                                          device="cpu")
            probe = readout_accuracy(model.encoder, readout, FeatureQA(VideoFacts("test", test_clips, recipe),
                                                                      model.encoder))
            stage1[key] = (copy.deepcopy(model.encoder.resampler.state_dict()), readout_history, probe)
            print(f"video/{name} stage 1: readout test " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()), flush=True)
        state, readout_history, probe = stage1[key]
        model.encoder.resampler.load_state_dict(state)
        history = train_video_model(model, recipe, tokenizer, log_every=250, progress=False, device="cpu",
                                    cache_features=True, readout_steps=0)["decoder"]
        round_to_stored(trained_parts(model, recipe.train_lm))  # score the weights the file will hold
        acc = video_accuracy(model, tokenizer, video_data("test", test_clips, recipe))
        metrics[name] = {"final_loss": round(history.loss[-1], 4), "train_seconds": round(history.seconds, 1),
                         "loss_history": {"steps": history.steps, "loss": [round(x, 4) for x in history.loss]},
                         "readout_final_loss": round(readout_history.loss[-1], 4),
                         "readout_seconds": round(readout_history.seconds, 1),
                         "readout_history": {"steps": readout_history.steps,
                                             "loss": [round(x, 4) for x in readout_history.loss]},
                         "readout_test": {k: round(v, 4) for k, v in probe.items()},
                         "test": {k: round(v, 4) for k, v in acc.items()}}
        print(f"video/{name}: test " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
        models[name] = model
    return save_video_models(Path(out) / f"{CHECKPOINT_NAME}.pt", models, recipes, metrics=metrics)


# ----------------------------------------------------------------------------------
# Chapter 09's probe: can a resampler find the direction of motion?

PROBE_VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (spatial_pos, motion)
    "Flamingo's resampler": (False, False),
    "+ place codes": (True, False),
    "+ change": (False, True),
    "+ place codes + change": (True, True),
}


def direction_features(tower: nn.Module, split: str, n: int, recipe: VideoRecipe | None = None,
                       frames: Sequence[int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower features of the first `n` direction clips of `split`: ((n, len(frames), S, d), direction labels (n,)).

    `frames` index the recipe's sampled frames (default: the first two, source frames 0 and 2).
    """
    from mllm_scratch.shapeworld import DIRECTIONS

    recipe = recipe or VideoRecipe()
    keep = sample_frames(recipe.source_frames, recipe.frames)
    bad = [f for f in frames if not 0 <= f < len(keep)]
    if n < 1 or bad or not frames:
        raise ValueError(f"need n >= 1 and frames among 0..{len(keep) - 1}, got n={n}, frames={list(frames)}")
    data = SampledVideoQA(VideoQADataset(split, n, VIDEO_SCENES, num_frames=recipe.source_frames,
                                         skills=["direction"]), [keep[f] for f in frames])
    items = [data[i] for i in range(n)]
    clips = torch.stack([it[0] for it in items])  # (n, T, 3, H, W)
    with torch.no_grad():
        feats = tower(clips.flatten(0, 1)).patches  # (n * T, S, d)
    return feats.reshape(n, len(frames), *feats.shape[1:]), torch.tensor([DIRECTIONS.index(it[2]) for it in items])


@torch.enable_grad()
def direction_probe(train_set: tuple[torch.Tensor, torch.Tensor], test_set: tuple[torch.Tensor, torch.Tensor], *,
                    spatial_pos: bool, motion: bool, steps: int = 800, lr: float = 1e-3, batch_size: int = 32,
                    seed: int = 0, eval_every: int | None = None, recipe: VideoRecipe | None = None) -> dict[int, float]:
    """Train a fresh resampler + linear readout of its mean latent on direction labels; test accuracy by step.

    train_set, test_set: `direction_features` outputs. Returns {step: test accuracy} every
    `eval_every` steps (default: only at the end). The resampler has the recipe's shape,
    with or without place codes (`spatial_pos`) and the change channel (`motion`).
    """
    (f_train, y_train), (f_test, y_test) = train_set, test_set
    if steps < 1 or batch_size < 1 or (eval_every is not None and eval_every < 1):
        raise ValueError(f"steps, batch_size and eval_every must be positive, got {steps}, {batch_size}, {eval_every}")
    recipe = recipe or VideoRecipe()
    d = f_train.shape[-1]
    torch.manual_seed(seed)
    config = ResamplerConfig(media_dim=2 * d if motion else d, dim=recipe.dim, num_latents=recipe.num_latents,
                             depth=recipe.depth, spatial_pos=spatial_pos)
    resampler, head = PerceiverResampler(config), nn.Linear(recipe.dim, 4)
    prep = with_motion if motion else (lambda f: f)
    optimizer = torch.optim.AdamW([*resampler.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    every = eval_every or steps
    curve = {}
    for step in range(1, steps + 1):
        i = torch.randint(0, len(y_train), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(head(resampler(prep(f_train[i])).mean(1)), y_train[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                curve[step] = (head(resampler(prep(f_test)).mean(1)).argmax(1) == y_test).float().mean().item()
    return curve


@torch.no_grad()
def readout_accuracy(encoder: VideoEncoder, readout: AnswerReadout, facts: "FeatureQA") -> dict[str, float]:
    """Stage 1's readout scored per skill on `FeatureQA(VideoFacts(...))`: argmax answer among the allowed ones."""
    hits, skills = [], []
    tokens = FeatureEncoder(encoder)(facts.features)  # (N, L, dim)
    for row, (questions, answers) in enumerate(facts.rest):
        template, answer = readout.targets(questions, answers)
        guess = readout(tokens[row].expand(len(questions), -1, -1), template).argmax(-1)
        hits += (guess == answer).float().tolist()
        skills += [question_skill(q) for q in questions]
    return _per_skill(hits, skills)


def question_skill(question: str) -> str:
    """The video skill a question tests."""
    if question.startswith("which way"):
        return "direction"
    if question in ("which shape moves?", "what colour is the moving object?"):
        return "mover"
    if question.startswith("which appears first"):
        return "order"
    if question.startswith("how many objects appear"):
        return "appearing"
    raise ValueError(f"unknown video question {question!r}")


__all__ = [
    "DEFAULT_CHECKPOINT",
    "AnswerReadout",
    "FeatureEncoder",
    "FeatureQA",
    "PROBE_VARIANTS",
    "VIDEO_SCENES",
    "STORED_DTYPE",
    "SampledVideoQA",
    "VideoBatch",
    "VideoCollator",
    "VideoEncoder",
    "VideoFacts",
    "VideoRecipe",
    "VideoVLMConfig",
    "answer_options",
    "build_checkpoint",
    "build_video_model",
    "chance_accuracy",
    "direction_features",
    "direction_probe",
    "freeze",
    "load_video_models",
    "majority_accuracy",
    "pad_clips",
    "pretrain_resampler",
    "question_skill",
    "readout_accuracy",
    "round_to_stored",
    "sample_frames",
    "save_video_models",
    "train_video_model",
    "trained_parts",
    "video_accuracy",
    "video_data",
    "video_loss",
    "video_recipes",
    "with_motion",
]
