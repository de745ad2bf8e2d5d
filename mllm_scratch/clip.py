"""CLIP: an image tower and a text tower trained to agree, with a contrastive loss, in one shared space.

    images (N, 3, H, W) -> ViT -> pooled [CLS] (N, vision.dim) -> Linear -> L2-normalise -> (N, embed_dim)
    captions (N, T)     -> GPT blocks -> hidden state at <|endoftext|> (N, text.dim) -> Linear -> L2-normalise
    logits (N, N) = exp(t) * image_embeddings @ text_embeddings.T      t: a learnable log scale

The symmetric InfoNCE loss (`clip_loss`) asks each image to pick its own caption out of
the batch and each caption its own image: cross-entropy over the rows of the logit
matrix and over its columns, both with the diagonal as the target. Chance is ln(N).
SigLIP's sigmoid loss (`siglip_loss`) instead scores every (image, caption) pair as an
independent yes/no question, with a learnable bias. Mirrors CLIP (Radford et al., 2021),
OpenCLIP and SigLIP (Zhai et al., 2023); chapter 05 builds it by hand.

The text tower is the package GPT (chapter 04) used as an encoder: causal attention means
the <|endoftext|> token is the only one that has read the whole caption, and padding after
it can never change it, so no padding mask is needed.

`pretrained_clip()` loads the CLIP that `python scripts/build_checkpoints.py clip` trains
with `CLIPRecipe()` (exactly the recipe of the chapter); `pretrained_image_tower()` gives
its ViT, whose per-patch features the VLM chapters feed to a language model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    CheckpointError,
    load_state_dict_strict,
    load_verified,
)
from mllm_scratch.gpt import GPT, GPTConfig, tokenizer_sha256
from mllm_scratch.shapeworld import COLOURS, SHAPES
from mllm_scratch.train import History, TrainConfig, batches, no_weight_decay, train
from mllm_scratch.vit import ViTConfig, VisionTransformer, config_dict

LOSSES = ("infonce", "sigmoid")
# Classes of the dense head, per patch: no object or one of the 5 shapes; no object or one of the 6 colours.
DENSE_CLASSES: tuple[int, int] = (len(SHAPES) + 1, len(COLOURS) + 1)

# ----------------------------------------------------------------------------------
# The model


def _vision_default() -> ViTConfig:
    return ViTConfig(image_size=32, patch_size=4, dim=48, depth=3, num_heads=4, pool="cls")


def _text_default() -> GPTConfig:
    # Captions are at most 10 tokens plus <|endoftext|>; a narrow, shallow tower is enough for them.
    return GPTConfig(vocab_size=512, context_length=32, dim=64, depth=2, num_heads=4)


@dataclass
class CLIPConfig:
    """Shape of a CLIP: its two towers, the shared embedding width and the temperature (and SigLIP bias)."""

    vision: ViTConfig = field(default_factory=_vision_default)
    text: GPTConfig = field(default_factory=_text_default)
    embed_dim: int = 64
    eot_id: int = 500  # <|endoftext|> of the shipped tokenizer: the text tower pools there
    loss: Literal["infonce", "sigmoid"] = "infonce"  # which loss the logits are made for
    init_logit_scale: float | None = None  # None: log(1/0.07) for InfoNCE (CLIP), log(10) for sigmoid (SigLIP)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped here (CLIP)
    init_logit_bias: float = -10.0  # SigLIP only: starts every pair at "probably not a match"
    dense_weight: float = 0.0  # > 0: a dense head names what each patch shows; its loss is added with this weight

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = GPTConfig(**self.text)
        if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if not 0 <= self.eot_id < self.text.vocab_size:
            raise ValueError(f"eot_id {self.eot_id} is not a token id of the text tower (vocab_size {self.text.vocab_size})")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.max_logit_scale <= 0:
            raise ValueError(f"max_logit_scale must be positive, got {self.max_logit_scale}")
        if not isinstance(self.dense_weight, (int, float)) or isinstance(self.dense_weight, bool) or self.dense_weight < 0:
            raise ValueError(f"dense_weight must be a number >= 0, got {self.dense_weight!r}")
        if self.init_logit_scale is None:
            self.init_logit_scale = math.log(1 / 0.07) if self.loss == "infonce" else math.log(10.0)
        if math.exp(self.init_logit_scale) > self.max_logit_scale:
            raise ValueError(
                f"init_logit_scale {self.init_logit_scale} starts above the clamp: exp() of it must be <= {self.max_logit_scale}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (what the checkpoint stores)."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CLIPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields {unknown}: expected some of {sorted(known)}")
        return cls(**data)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each row to unit length, so a dot product is a cosine similarity."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class CLIP(nn.Module):
    """Two towers and a learnable temperature: (images, caption ids) -> (N_images, N_texts) logits."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPConfig()
        self.vision = VisionTransformer(config.vision)
        self.text = GPT(config.text)
        self.image_proj = nn.Linear(config.vision.dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text.dim, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=config.vision.dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=config.text.dim**-0.5)
        # The temperature is learned as a log scale (always positive, multiplicative steps);
        # decaying it towards 0 would mean "towards scale 1", which nobody wants.
        self.logit_scale = no_weight_decay(nn.Parameter(torch.tensor(float(config.init_logit_scale))))
        if config.loss == "sigmoid":
            self.logit_bias = no_weight_decay(nn.Parameter(torch.tensor(float(config.init_logit_bias))))
        if config.dense_weight > 0:  # one linear map per patch vector: shape logits, then colour logits
            self.patch_head = nn.Linear(config.vision.dim, sum(DENSE_CLASSES))

    @property
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at max_logit_scale: the 1/temperature that multiplies the cosines."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log scale in place (CLIP does it every step; here every forward), so Adam cannot push it past the cap."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (N, C, H, W) -> embeddings (N, embed_dim), unit length unless normalize=False."""
        pooled = self.vision(images).pooled  # (N, vision.dim): the [CLS] token
        emb = self.image_proj(pooled)  # (N, embed_dim)
        return l2_normalize(emb) if normalize else emb

    def patch_logits(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense head on patch vectors (N, P, vision.dim) -> shape logits (N, P, 6), colour logits (N, P, 7)."""
        if not hasattr(self, "patch_head"):
            raise ValueError("this CLIP has no dense head: build it with CLIPConfig(dense_weight > 0)")
        logits = self.patch_head(patches)  # (N, P, 13)
        return logits[..., : DENSE_CLASSES[0]], logits[..., DENSE_CLASSES[0] :]

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the first <|endoftext|> in each row of ids (N, T) -> (N,); a row without one is an error."""
        is_eot = ids == self.config.eot_id  # (N, T)
        has = is_eot.any(dim=1)
        if ids.device.type == "cpu" and not bool(has.all()):
            bad = int((~has).nonzero()[0])
            raise ValueError(
                f"caption {bad} has no <|endoftext|> (id {self.config.eot_id}): the text tower pools there; "
                "tokenize with mllm_scratch.clip.tokenize_captions"
            )
        return is_eot.int().argmax(dim=1)  # (N,): argmax returns the first maximum

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Caption ids (N, T), each ending in <|endoftext|> then padding -> embeddings (N, embed_dim)."""
        hidden = self.text.hidden_states(ids)  # (N, T, text.dim), causal: padding after eot never reaches it
        hidden = self.text.norm(hidden)  # the GPT's final LayerNorm, as before its head
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), self.eot_positions(ids)]  # (N, text.dim)
        emb = self.text_proj(pooled)  # (N, embed_dim)
        return l2_normalize(emb) if normalize else emb

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (N_images, N_texts), plus the bias for a sigmoid-loss CLIP."""
        self.clamp_logit_scale_()
        logits = self.logit_scale.exp() * image_emb @ text_emb.T  # (N_images, N_texts)
        if self.config.loss == "sigmoid":
            logits = logits + self.logit_bias
        return logits

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (N_images, N_texts); its transpose is logits_per_text."""
        return self.logits(self.encode_image(images), self.encode_text(ids))


def _check_square(logits: torch.Tensor, name: str) -> int:
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"{name} needs a square (N, N) logit matrix of N matching pairs, got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < 2:
        raise ValueError(
            f"{name} needs a batch of at least 2 pairs, got {n}: with one pair there are no negatives "
            "(a 1x1 InfoNCE matrix gives loss 0 whatever the embeddings)"
        )
    return n


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on logits (N, N) whose diagonal holds the matching pairs: mean of image->text and text->image CE."""
    n = _check_square(logits, "clip_loss")
    targets = torch.arange(n, device=logits.device)  # pair i matches pair i
    logits = logits.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP: every entry of logits (N, N) is a binary match/no-match decision; summed over pairs, averaged over N."""
    n = _check_square(logits, "siglip_loss")
    labels = 2 * torch.eye(n, device=logits.device) - 1  # +1 on the diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits.float()).sum() / n


def dense_loss(model: CLIP, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the dense head on patch vectors (N, P, d) against `patch_labels` (N, 2, rows, cols), both heads averaged."""
    if labels.dim() != 4 or labels.shape[1] != 2 or labels.shape[2] * labels.shape[3] != patches.shape[1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not fit {patches.shape[1]} patches: "
            "expected (N, 2, rows, cols) from shapeworld.patch_labels"
        )
    shape_logits, colour_logits = model.patch_logits(patches)  # (N, P, 6), (N, P, 7)
    labels = labels.flatten(2)  # (N, 2, P), patches in row-major order like the ViT's
    return (F.cross_entropy(shape_logits.flatten(0, 1).float(), labels[:, 0].flatten())
            + F.cross_entropy(colour_logits.flatten(0, 1).float(), labels[:, 1].flatten())) / 2


def batch_loss(model: CLIP, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The `loss_fn` for `train`: the loss the model's config names, on an (images, ids) batch.

    An (images, ids, patch labels) batch adds the dense head's loss times `config.dense_weight`.
    """
    images, ids, *dense = batch
    features = model.vision(images)  # one pass of the tower serves both losses
    logits = model.logits(l2_normalize(model.image_proj(features.pooled)), model.encode_text(ids))
    loss = clip_loss(logits) if model.config.loss == "infonce" else siglip_loss(logits)
    if dense:
        loss = loss + model.config.dense_weight * dense_loss(model, features.patches, dense[0])
    return loss


# ----------------------------------------------------------------------------------
# Data: ShapeWorld image-caption pairs


def tokenize_captions(texts: Sequence[str], tokenizer, context_length: int | None = None) -> torch.Tensor:
    """Captions -> ids (N, T): each caption's tokens, <|endoftext|>, then <|pad|> up to the longest."""
    if not len(texts):
        raise ValueError("texts is empty: expected at least one caption")
    rows = [ids + [tokenizer.eot_id] for ids in tokenizer.encode_batch(list(texts))]
    longest = max(len(r) for r in rows)
    if context_length is not None and longest > context_length:
        raise ValueError(f"a caption is {longest} tokens with <|endoftext|>, longer than context_length {context_length}")
    out = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def caption_pairs(split: str, size: int, config=None, *, distinct: bool = False):
    """(images (N, 3, H, W), captions) from ShapeWorld's CaptionDataset; distinct=True keeps the first N unique captions."""
    from mllm_scratch.shapeworld import CaptionDataset

    data = CaptionDataset(split, size if not distinct else min(100 * size, 100_000), config)
    images, texts, seen = [], [], set()
    for i in range(len(data)):
        image, text = data[i]
        if distinct and text in seen:
            continue
        seen.add(text)
        images.append(image)
        texts.append(text)
        if len(texts) == size:
            break
    if len(texts) < size:
        raise ValueError(f"only {len(texts)} distinct captions found in split {split!r}, fewer than size {size}")
    return torch.stack(images), texts


def _train_config(recipe, overrides: dict[str, Any]) -> TrainConfig:
    """A recipe's (`CLIPRecipe`, `TowerRecipe`) optimisation fields as a `TrainConfig`, with `overrides` applied."""
    base = dict(
        steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps, min_lr_ratio=recipe.min_lr_ratio,
        weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip, record_every=10, log_every=100,
    )
    return TrainConfig(**{**base, **overrides})


@dataclass(frozen=True)
class CLIPRecipe:
    """Everything that determines the chapter's (and the shipped) CLIP: data, model, optimisation, seed."""

    train_pairs: int = 20_000  # ShapeWorld "train" scenes of one object, no rendered text (chapter 05 says why)
    min_objects: int = 1
    max_objects: int = 1
    batch_size: int = 64
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 25
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    model: CLIPConfig = field(default_factory=CLIPConfig)

    def scene_config(self):
        """The ShapeWorldConfig of the training (and evaluation) scenes."""
        from mllm_scratch.shapeworld import ShapeWorldConfig

        return ShapeWorldConfig(min_objects=self.min_objects, max_objects=self.max_objects, text_probability=0.0)

    def train_config(self, **overrides) -> TrainConfig:
        """The `TrainConfig` of this recipe (overrides change only logging and progress, or the budget for a sidebar)."""
        return _train_config(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)



@dataclass
class CLIPHistory(History):
    """A `History` plus the temperature: `scale[i]` is the clamped scale exp(t) after step `steps[i]` (`record_scale=True`)."""

    scale: list[float] = field(default_factory=list)


def train_dataset(recipe: CLIPRecipe, tokenizer) -> TensorDataset:
    """The recipe's training pairs as a TensorDataset of (images (3, H, W), ids (T,))."""
    if tokenizer.eot_id != recipe.model.eot_id or tokenizer.vocab_size != recipe.model.text.vocab_size:
        raise ValueError(
            f"the tokenizer (eot_id {tokenizer.eot_id}, vocab_size {tokenizer.vocab_size}) does not match the CLIPConfig "
            f"(eot_id {recipe.model.eot_id}, vocab_size {recipe.model.text.vocab_size})"
        )
    images, texts = caption_pairs("train", recipe.train_pairs, recipe.scene_config())
    ids = tokenize_captions(texts, tokenizer, recipe.model.text.context_length)  # (N, T)
    return TensorDataset(images, ids)


def pretrain_clip(
    recipe: CLIPRecipe | None = None,
    tokenizer=None,
    *,
    dataset: TensorDataset | None = None,
    model: CLIP | None = None,
    evaluate=None,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
    record_scale: bool = False,
    **overrides,
) -> tuple[CLIP, History]:
    """Train a CLIP with `recipe` on ShapeWorld pairs; returns the model (eval mode) and its History.

    Deterministic on one thread: the weights depend only on the recipe (the model is
    initialised from recipe.seed unless `model` is given; batches are shuffled by their own
    seeded generator). `scripts/build_checkpoints.py clip` runs exactly `pretrain_clip(CLIPRecipe())`.
    `record_scale=True` returns a `CLIPHistory` that also holds the temperature at every
    recorded step; reading it changes nothing in training (the same weights, bit for bit).
    """
    from mllm_scratch.tokenizer import load_tokenizer

    recipe = recipe or CLIPRecipe()
    tokenizer = tokenizer or load_tokenizer()
    dataset = dataset if dataset is not None else train_dataset(recipe, tokenizer)
    if model is None:
        torch.manual_seed(recipe.seed)
        model = CLIP(recipe.model)
    before_step: list[torch.Tensor] = []  # the scale each step's logits used, kept on the device (no host sync per step)

    def loss_fn(m: CLIP, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = batch_loss(m, batch)
        if record_scale:
            before_step.append(m.scale.detach())  # read after the forward pass clamped it
        return loss

    history = train(
        model,
        batches(dataset, recipe.batch_size, seed=recipe.seed),
        loss_fn,
        recipe.train_config(log_every=log_every, progress=progress, **overrides),
        evaluate=evaluate,
        device=device,
        batch_size_of=lambda b: len(b[0]),
    )
    if record_scale:
        # The scale after step k is the one step k + 1 used; after the last step, the model's own.
        after_step = torch.stack(before_step[1:] + [model.scale.detach()]).tolist()
        history = CLIPHistory(**{f.name: getattr(history, f.name) for f in fields(history)},
                              scale=[after_step[k - 1] for k in history.steps])
    return model, history


# ----------------------------------------------------------------------------------
# Using it: zero-shot classification and retrieval


@torch.no_grad()
def embed_images(model: CLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit image embeddings (N, embed_dim), computed in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def embed_texts(model: CLIP, texts: Sequence[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings (N, embed_dim) of captions or prompts, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenize_captions(texts, tokenizer, model.config.text.context_length)
    out = torch.cat([model.encode_text(ids[i : i + batch_size].to(device)) for i in range(0, len(ids), batch_size)])
    model.train(was_training)
    return out


@torch.no_grad()
def zero_shot_classifier(model: CLIP, prompts: Sequence[str] | Sequence[Sequence[str]], tokenizer) -> torch.Tensor:
    """One unit vector per class (num_classes, embed_dim) from its prompt, or the mean of its prompts (CLIP's prompt ensembling)."""
    if not len(prompts):
        raise ValueError("prompts is empty: expected one prompt (or a list of prompts) per class")
    per_class = [[p] if isinstance(p, str) else list(p) for p in prompts]
    if any(not group for group in per_class):
        raise ValueError("every class needs at least one prompt, got an empty list")
    flat = [p for group in per_class for p in group]
    emb = embed_texts(model, flat, tokenizer)  # (num_prompts, embed_dim)
    out, start = [], 0
    for group in per_class:
        out.append(l2_normalize(emb[start : start + len(group)].mean(dim=0)))  # average on the sphere, re-normalise
        start += len(group)
    return torch.stack(out)  # (num_classes, embed_dim)


@torch.no_grad()
def zero_shot_predict(model: CLIP, classifier: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Class index (N,) of each image: the class embedding with the highest cosine similarity."""
    return (embed_images(model, images) @ classifier.to(images.device).T).argmax(dim=1)


def zero_shot_accuracy(model: CLIP, classifier: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose zero-shot prediction equals their label."""
    return float((zero_shot_predict(model, classifier, images).cpu() == labels.cpu()).float().mean())


def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5), queries: torch.Tensor | None = None
) -> dict[str, float]:
    """Recall@k both ways for N matching pairs (row i of each is pair i): is the partner among the k most similar?

    `queries` (indices) scores only those pairs as queries; every pair stays a candidate.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must both be (N, dim)")
    sims = image_emb.float() @ text_emb.float().T  # (N images, N texts)
    n = sims.shape[0]
    target = torch.arange(n, device=sims.device)
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank of the partner = how many other candidates score at least as high. Ties count
        # against the partner, so a collapsed model (all embeddings equal) scores 0, not 1.
        at_least = s >= s[target, target][:, None]  # (N, N), the partner itself included
        rank = at_least.sum(dim=1) - 1  # (N,)
        if queries is not None:
            rank = rank[queries]
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


def retrieval_chance(n: int, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of a random ranking of n candidates with one right answer: k / n."""
    return {k: min(k, n) / n for k in ks}


# ----------------------------------------------------------------------------------
# The shipped checkpoint

CHECKPOINT_NAME = "clip"
DEFAULT_CHECKPOINT = DEFAULT_DIR / f"{CHECKPOINT_NAME}.pt"


def pretrained_clip(path: str | Path | None = None, *, config: CLIPConfig | None = None) -> CLIP:
    """The CLIP trained by `scripts/build_checkpoints.py clip` (eval mode, CPU), verified before it is built.

    Checks the file's sha256 against its manifest, its config against `config` (for the
    shipped checkpoint: `CLIPRecipe().model`, so a changed recipe is caught), the recipe
    and the tokenizer; raises CheckpointError naming the file and the rebuild command otherwise.
    """
    recipe = CLIPRecipe()
    if config is None and path is None:
        config = recipe.model
    return _load_clip(CHECKPOINT_NAME, path, DEFAULT_CHECKPOINT, config, recipe.to_dict(), "CLIPRecipe()")


def _load_clip(name: str, path, default: Path, config: CLIPConfig | None, recipe: dict, owner: str) -> CLIP:
    """A CLIP checkpoint (`path`, default `default`) verified by `load_verified` and built; eval mode, CPU."""
    saved, state_dict, path, rebuild = load_verified(
        name, path, default, expected_config=None if config is None else config.to_dict(),
        recipe=recipe, recipe_owner=f"{owner} in mllm_scratch/clip.py", tokenizer_sha256=tokenizer_sha256(),
    )
    try:
        model = CLIP(CLIPConfig.from_dict(saved))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid CLIPConfig ({err}); rebuild it with: {rebuild}") from None
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.eval()


def pretrained_image_tower(path: str | Path | None = None) -> VisionTransformer:
    """The book's image tower (eval mode): the ViT of the shipped tower checkpoint (`TowerRecipe`), or of the CLIP file `path`.

    Images -> ViTOutput(patches (N, 64, 48), pooled (N, 48)); chapters 06-09 feed its patch vectors to a language model.
    """
    return (pretrained_tower() if path is None else pretrained_clip(path)).vision.eval()


# A VLM that keeps the book's tower frozen need not store it again: its file records the
# tower's checksum instead (TOWER_REFERENCE), and loading takes the tower from tower.pt,
# rounded to the file's dtype, so the loaded model holds the very weights it was scored with.
TOWER_REFERENCE = "shipped_tower_checksum"


def tower_reference(encoder: nn.Module | None, dtype: torch.dtype) -> dict[str, str]:
    """{TOWER_REFERENCE: checksum} if `encoder` is the shipped tower as a `dtype` file holds it, else {} (store it).

    A tower that trained (Molmo's recipe, `train_encoder=True`), a random ViT or none at all
    (Fuyu) is not the shipped one, and its file keeps its own weights.
    """
    from mllm_scratch.xattn import lm_checksum

    if not isinstance(encoder, VisionTransformer) or encoder.config != TowerRecipe().model_config().vision:
        return {}
    try:
        shipped = pretrained_image_tower()
    except CheckpointError:  # no shipped tower to refer to: the file keeps its own
        return {}
    ours, theirs = encoder.state_dict(), shipped.state_dict()
    if ours.keys() != theirs.keys() or any(
        ours[k].shape != theirs[k].shape or not torch.equal(ours[k].detach().cpu().to(dtype), theirs[k].to(dtype))
        for k in theirs
    ):
        return {}
    return {TOWER_REFERENCE: lm_checksum(shipped)}


def with_referenced_tower(state_dict: dict[str, torch.Tensor], manifest: dict[str, Any], path: str | Path,
                          rebuild: str, prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """`state_dict` with the shipped tower's weights under `prefix` if the manifest references the tower (else as is).

    The tower comes from `pretrained_image_tower()`, checked against the recorded checksum
    (CheckpointError naming the file and its rebuild command otherwise) and rounded to the
    file's `stored_as` dtype, as the VLM was when it was scored.
    """
    from mllm_scratch.xattn import lm_checksum

    expected = manifest.get(TOWER_REFERENCE)
    if expected is None:
        return state_dict
    if any(k.startswith(prefix) for k in state_dict):
        raise CheckpointError(f"checkpoint {path} both stores a tower and references the shipped one; "
                              f"rebuild it with: {rebuild}")
    tower = pretrained_image_tower()
    if lm_checksum(tower) != expected:
        raise CheckpointError(f"checkpoint {path} was trained on another image tower ({TOWER_REFERENCE} "
                              f"{str(expected)[:12]}..., the shipped tower's is {lm_checksum(tower)[:12]}...); "
                              f"rebuild it with: {rebuild}")
    dtype = getattr(torch, str(manifest.get("stored_as", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"checkpoint {path}'s manifest names no floating-point dtype (stored_as "
                              f"{manifest.get('stored_as')!r}); rebuild it with: {rebuild}")
    return {**state_dict, **{prefix + k: v.to(dtype) for k, v in tower.state_dict().items()}}


def build_checkpoint(out: Path) -> dict:
    """Train `CLIPRecipe()` and save it as out/clip.pt + out/clip.json (what `build_checkpoints.py clip` calls)."""
    from mllm_scratch.checkpoints import save_checkpoint
    from mllm_scratch.tokenizer import load_tokenizer

    recipe = CLIPRecipe()
    tokenizer = load_tokenizer()
    model, history = pretrain_clip(recipe, tokenizer, log_every=100, progress=False, device="cpu")
    metrics = evaluate_clip(model, tokenizer, recipe)
    metrics.update(final_train_loss=round(history.loss[-1], 4), train_seconds=round(history.seconds, 1))
    print("clip:", metrics)
    return save_checkpoint(
        Path(out) / f"{CHECKPOINT_NAME}.pt",
        model,
        recipe.model.to_dict(),
        name=CHECKPOINT_NAME,
        recipe=recipe.to_dict(),
        metrics=metrics,
        extra={
            "trained_by": "mllm_scratch.clip.pretrain_clip(CLIPRecipe()) on one CPU thread, deterministic",
            "tokenizer_sha256": tokenizer_sha256(),
            "loader": "mllm_scratch.clip.pretrained_clip",
        },
    )


# ----------------------------------------------------------------------------------
# The book's image tower: chapter 05's CLIP, trained on crowded scenes with a dense head beside InfoNCE


@dataclass(frozen=True)
class TowerRecipe:
    """Chapter 05's CLIP, trained from scratch on crowded scenes with InfoNCE plus a dense head that names what each patch shows.

    The contrastive loss only asks the pooled vector to tell captions apart; nothing asks a
    patch vector what it covers, and the VLMs read patch vectors. The dense head (a linear
    map per patch to the shape and colour of the object there, from `shapeworld.patch_labels`)
    asks exactly that, as the dense objectives beside the contrastive one in SigLIP 2 do.
    """

    train_pairs: int = 20_000  # ShapeWorld "train" scenes as the VLMs see them: 1-3 objects, rendered text 30% of the time
    batch_size: int = 64
    steps: int = 3000
    lr: float = 3e-3
    warmup_steps: int = 25
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dense_weight: float = 10.0  # the dense loss would otherwise be a small share of the clipped gradient
    seed: int = 0

    def scene_config(self):
        """The ShapeWorldConfig of the training scenes: the VLMs' scenes."""
        from mllm_scratch.shapeworld import ShapeWorldConfig

        return ShapeWorldConfig()

    def model_config(self) -> CLIPConfig:
        """Chapter 05's CLIPConfig with the dense head switched on."""
        return replace(CLIPRecipe().model, dense_weight=self.dense_weight)

    def train_config(self, **overrides) -> TrainConfig:
        """The `TrainConfig` of this recipe (overrides change logging and progress, or the budget for a short run)."""
        return _train_config(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def dense_dataset(split: str, size: int, tokenizer, config=None, patch_size: int = 4) -> TensorDataset:
    """(images (3, H, W), caption ids (T,), patch labels (2, rows, cols)) of `size` scenes of `split`."""
    from mllm_scratch.shapeworld import CaptionDataset, ShapeWorldConfig, patch_labels

    data = CaptionDataset(split, size, config or ShapeWorldConfig())
    images, texts = zip(*(data[i] for i in range(size)))
    labels = torch.from_numpy(np.stack([patch_labels(data.scene(i), patch_size, data.config) for i in range(size)]))
    return TensorDataset(torch.stack(images), tokenize_captions(texts, tokenizer, CLIPRecipe().model.text.context_length), labels)


def tower_from_clip(clip: CLIP, dense_weight: float) -> CLIP:
    """A copy of `clip` with a fresh dense head (seeded by the caller), ready for `TowerRecipe` training."""
    model = CLIP(replace(clip.config, dense_weight=dense_weight))
    missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
    if unexpected or set(missing) != {"patch_head.weight", "patch_head.bias"}:
        raise ValueError(f"the CLIP does not fit: missing {missing}, unexpected {unexpected}")
    return model


def train_tower(recipe: TowerRecipe | None = None, tokenizer=None, *, clip: CLIP | None = None, dataset: TensorDataset | None = None,
                log_every: int = 100, progress: bool = True, device: torch.device | str | None = None,
                **overrides) -> tuple[CLIP, History]:
    """Train the book's tower on `TowerRecipe` scenes: a new CLIP with a dense head (seeded), or `clip` with a fresh head."""
    from mllm_scratch.tokenizer import load_tokenizer

    recipe = recipe or TowerRecipe()
    tokenizer = tokenizer or load_tokenizer()
    dataset = dataset if dataset is not None else dense_dataset("train", recipe.train_pairs, tokenizer, recipe.scene_config())
    torch.manual_seed(recipe.seed)
    model = CLIP(recipe.model_config()) if clip is None else tower_from_clip(clip, recipe.dense_weight)
    history = train(model, batches(dataset, recipe.batch_size, seed=recipe.seed), batch_loss,
                    recipe.train_config(log_every=log_every, progress=progress, **overrides),
                    device=device, batch_size_of=lambda b: len(b[0]))
    return model.eval(), history


@torch.no_grad()
def patch_accuracy(model: CLIP, dataset: TensorDataset, batch_size: int = 256) -> dict[str, float]:
    """The dense head's accuracy on the patches that show an object: shape and colour (chance 1/5 and 1/6)."""
    hits = {"shape": 0, "colour": 0}
    total = 0
    for start in range(0, len(dataset), batch_size):
        images, _, labels = dataset[start : start + batch_size]
        shape_logits, colour_logits = model.patch_logits(model.vision(images).patches)
        labels = labels.flatten(2)  # (n, 2, P)
        on_object = labels[:, 0] > 0
        hits["shape"] += int((shape_logits.argmax(-1) == labels[:, 0])[on_object].sum())
        hits["colour"] += int((colour_logits.argmax(-1) == labels[:, 1])[on_object].sum())
        total += int(on_object.sum())
    return {k: v / total for k, v in hits.items()}


TOWER_CHECKPOINT_NAME = "tower"
TOWER_CHECKPOINT = DEFAULT_DIR / f"{TOWER_CHECKPOINT_NAME}.pt"


def pretrained_tower(path: str | Path | None = None) -> CLIP:
    """The CLIP with a dense head that `scripts/build_checkpoints.py tower` trains with `TowerRecipe()` (eval mode, CPU)."""
    recipe = TowerRecipe()
    config = recipe.model_config() if path is None else None
    return _load_clip(TOWER_CHECKPOINT_NAME, path, TOWER_CHECKPOINT, config, recipe.to_dict(), "TowerRecipe()")


def build_tower_checkpoint(out: Path) -> dict:
    """Train `TowerRecipe()` and save out/tower.pt + out/tower.json (what `build_checkpoints.py tower` calls)."""
    from mllm_scratch.checkpoints import save_checkpoint
    from mllm_scratch.tokenizer import load_tokenizer

    recipe = TowerRecipe()
    tokenizer = load_tokenizer()
    model, history = train_tower(recipe, tokenizer, log_every=100, progress=False, device="cpu")
    test = dense_dataset("test", 1000, tokenizer, recipe.scene_config())
    metrics = {f"test_patch_{k}_acc": round(v, 4) for k, v in patch_accuracy(model, test).items()}
    metrics.update(evaluate_clip(model, tokenizer))
    metrics.update(final_train_loss=round(history.loss[-1], 4), train_seconds=round(history.seconds, 1))
    print("tower:", metrics)
    return save_checkpoint(
        Path(out) / f"{TOWER_CHECKPOINT_NAME}.pt", model, model.config.to_dict(), name=TOWER_CHECKPOINT_NAME,
        recipe=recipe.to_dict(), metrics=metrics,
        extra={
            "trained_by": "mllm_scratch.clip.train_tower(TowerRecipe()) on one CPU thread, deterministic",
            "tokenizer_sha256": tokenizer_sha256(),
            "loader": "mllm_scratch.clip.pretrained_tower",
        },
    )


def colour_shape_prompts(config=None) -> list[list[str]]:
    """Per colour-shape class ("red circle", ...): its prompts in ShapeWorld's caption words, one per size."""
    from mllm_scratch.shapeworld import SIZES, class_names

    return [[f"a {size} {name}." for size in SIZES] for name in class_names("colour_shape", config)]


def single_object_test_set(split: str, size: int):
    """(images, colour-shape labels) of single-object scenes of `split` (no rendered text)."""
    from mllm_scratch.shapeworld import ShapeClassificationDataset, ShapeWorldConfig

    data = ShapeClassificationDataset(split, size, ShapeWorldConfig(max_objects=1, text_probability=0.0), task="colour_shape")
    images, labels = zip(*(data[i] for i in range(size)))
    return torch.stack(images), torch.tensor(labels)


def retrieval_sets(recipe: CLIPRecipe | None = None) -> dict[str, tuple[torch.Tensor, list[str], torch.Tensor]]:
    """Retrieval galleries with one image per distinct caption: "test" (every trained caption, from the
    test split) and "compositional" (those plus the held-out ones, queried with the held-out ones only).
    Returns {name: (images, captions, query indices)}."""
    recipe = recipe or CLIPRecipe()
    config = recipe.scene_config()
    n_test = 2 * len(config.train_pairs())  # every trained (colour, shape) in both sizes
    n_held = 2 * len(config.held_out)
    test_images, test_texts = caption_pairs("test", n_test, config, distinct=True)
    held_images, held_texts = caption_pairs("compositional", n_held, config, distinct=True)
    return {
        "test": (test_images, test_texts, torch.arange(n_test)),
        "compositional": (
            torch.cat([test_images, held_images]), test_texts + held_texts, torch.arange(n_test, n_test + n_held)
        ),
    }


def evaluate_clip(model: CLIP, tokenizer, recipe: CLIPRecipe | None = None, size: int = 500) -> dict[str, float]:
    """Zero-shot colour-shape accuracy (30 classes) and retrieval recall@1/@5, on the test and compositional splits."""
    classifier = zero_shot_classifier(model, colour_shape_prompts(), tokenizer)
    out: dict[str, float] = {}
    for split in ("test", "compositional"):
        images, labels = single_object_test_set(split, size)
        out[f"{split}_zero_shot_acc"] = round(zero_shot_accuracy(model, classifier, images, labels), 4)
    for split, (images, texts, queries) in retrieval_sets(recipe).items():
        recall = retrieval_recall(embed_images(model, images), embed_texts(model, texts, tokenizer), queries=queries)
        out.update({f"{split}_{k}": round(v, 4) for k, v in recall.items()})
    return out


__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPHistory",
    "CLIPRecipe",
    "DEFAULT_CHECKPOINT",
    "DENSE_CLASSES",
    "TOWER_CHECKPOINT",
    "TOWER_REFERENCE",
    "TowerRecipe",
    "batch_loss",
    "dense_dataset",
    "dense_loss",
    "caption_pairs",
    "clip_loss",
    "colour_shape_prompts",
    "embed_images",
    "embed_texts",
    "evaluate_clip",
    "patch_accuracy",
    "pretrained_tower",
    "l2_normalize",
    "pretrain_clip",
    "pretrained_clip",
    "pretrained_image_tower",
    "retrieval_chance",
    "retrieval_recall",
    "retrieval_sets",
    "siglip_loss",
    "single_object_test_set",
    "tokenize_captions",
    "tower_from_clip",
    "tower_reference",
    "train_dataset",
    "train_tower",
    "with_referenced_tower",
    "zero_shot_accuracy",
    "zero_shot_classifier",
    "zero_shot_predict",
]
