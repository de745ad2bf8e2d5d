"""The hybrid decoder (NVLM-H), and the three methods trained side by side on one budget (chapter 08).

    image (3, H, W) -> image tower (run once) -> per-patch features (N, d_img)
        |-- thumbnail: average-pool the patch grid to g x g -> projector -> g*g tokens
        |   spliced into the sequence at g*g <|image|> slots          (method A's path)
        '-- all N patch features -> projection -> gated cross-attention
            after the LM's blocks; text at or after the first slot reads them (method B's path)

NVLM-H (Dai et al., 2024) puts a low-resolution *thumbnail* of the image in the decoder's
sequence, where self-attention can reason over it together with the text, and feeds the
high-resolution tiles through gated cross-attention, so the sequence stays short however
fine the image. Here the thumbnail is the tower's own patch grid average-pooled to
`thumbnail_grid` x `thumbnail_grid` (16 tokens at the default 4), so the tower runs once;
the full grid (64 tokens at 32 px, 1,024 at 128 px) goes through cross-attention.

`HybridVLM` *is* a `CrossAttentionVLM` (chapter 07: the same gated blocks, the same
`hidden_states` with `inputs_embeds`) plus chapter 06's projector; it forks neither.
With every gate at 0 it is exactly method A fed the 16-token thumbnail
(`thumbnail_vlm` builds that model from the same parts, for the proof).

The second half of the module is the chapter's experiment: `MethodsRecipe`, one shared
budget (same data, same order, same steps and batch, same LM and tower) for method A
("unified"), method B ("cross") and the hybrid ("hybrid"), plus a fourth model on the same
budget, Fuyu ("fuyu": method A with no image tower, each patch's raw pixels straight into
the projector); `build_method`, `train_method`, `evaluate_vqa` (exact match per skill, plus
per-character reading accuracy) and the checkpoints that `python scripts/build_checkpoints.py
methods` (the three) and `methods_fuyu` (Fuyu) write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    STORED_DTYPE,
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    rebuild_command,
    round_to_dtype,
    save_checkpoint,
    state_checksum,
)
from mllm_scratch.gpt import GPT, next_token_loss
from mllm_scratch.runtime import checked_on_host
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History
from mllm_scratch.vit import ViTConfig, config_dict
from mllm_scratch.vlm import (
    IGNORE_INDEX,
    UnifiedVLM,
    VLMConfig,
    VLMRecipe,
    greedy_decode,
    make_projector,
    run_stage,
    stack_dataset,
    vlm_loss,
)
from mllm_scratch.xattn import CrossAttentionVLM, XAttnConfig, xattn_loss

# ----------------------------------------------------------------------------------
# The thumbnail: the patch grid, average-pooled


def pool_patches(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool per-patch features (B, n*n, d) on their square grid to (B, grid*grid, d), row-major."""
    b, n, d = features.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} patch features do not form a square grid")
    if grid < 1 or side % grid:
        raise ValueError(f"thumbnail grid {grid} does not divide the {side} x {side} patch grid")
    x = features.transpose(1, 2).reshape(b, d, side, side)  # (B, d, side, side)
    x = F.avg_pool2d(x, side // grid)  # (B, d, grid, grid): each cell the mean of a (side/grid)^2 block
    return x.reshape(b, d, grid * grid).transpose(1, 2)  # (B, grid*grid, d)


class ThumbnailEncoder(nn.Module):
    """An image tower whose per-patch output is pooled to a grid x grid thumbnail: images -> (B, grid*grid, d)."""

    def __init__(self, tower: nn.Module, grid: int = 4):
        super().__init__()
        self.tower, self.grid = tower, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.tower(images)
        features = features.patches if hasattr(features, "patches") else features  # (B, N, d)
        return pool_patches(features, self.grid)  # (B, grid*grid, d)


# ----------------------------------------------------------------------------------
# The hybrid model


@dataclass
class HybridConfig(XAttnConfig):
    """A cross-attention VLM's shape (media = the full patch grid) plus the thumbnail that goes into the sequence."""

    thumbnail_grid: int = 4  # thumbnail tokens in the sequence: thumbnail_grid ** 2
    projector: Literal["linear", "mlp"] = "mlp"  # chapter 06's connector, for the thumbnail

    def __post_init__(self) -> None:
        super().__post_init__()
        side = int(round(self.media_tokens**0.5))
        if side * side != self.media_tokens:
            raise ValueError(f"media_tokens {self.media_tokens} is not a square patch grid")
        if self.thumbnail_grid < 1 or side % self.thumbnail_grid:
            raise ValueError(f"thumbnail_grid {self.thumbnail_grid} does not divide the {side} x {side} patch grid")
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"projector must be 'linear' or 'mlp', got {self.projector!r}")
        if self.item_dims != 3:
            raise ValueError(f"the hybrid reads one image per sequence (item_dims 3), got item_dims {self.item_dims}")

    @property
    def thumbnail_tokens(self) -> int:
        return self.thumbnail_grid**2


HYBRID_PARTS = ("encoder", "projector", "xattn", "lm")


class HybridVLM(CrossAttentionVLM):
    """NVLM-H: a pooled thumbnail spliced into the sequence (method A) + the full image through gated cross-attention (B)."""

    config: HybridConfig

    def __init__(self, config: HybridConfig, *, encoder: nn.Module | None = None, lm: GPT | None = None):
        super().__init__(config, encoder=encoder, lm=lm)
        self.projector = make_projector(config.projector, config.media_dim, config.lm.dim)

    # method A's names, so that UnifiedVLM.generate's loop serves this model too
    @property
    def image_id(self) -> int:
        return self.config.media_id

    @property
    def num_image_tokens(self) -> int:
        """<|image|> slots per sequence: one per thumbnail token."""
        return self.config.thumbnail_tokens

    def set_trainable(self, *, encoder: bool | None = None, projector: bool | None = None, xattn: bool | None = None,
                      lm: bool | None = None) -> "HybridVLM":
        """Freeze or unfreeze whole parts (None leaves a part as it is); returns self."""
        for name, flag in (("encoder", encoder), ("projector", projector), ("xattn", xattn), ("lm", lm)):
            if flag is not None:
                getattr(self, name).requires_grad_(flag)
        return self

    def trainable(self) -> dict[str, bool]:
        return {name: any(p.requires_grad for p in getattr(self, name).parameters()) for name in HYBRID_PARTS}

    # -- the two paths from one run of the tower

    def image_paths(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (media tokens (B, N, lm_dim) for cross-attention, thumbnail tokens (B, g*g, lm_dim))."""
        if images.dim() != 4:
            raise ValueError(f"images must have shape (batch, 3, H, W), got {tuple(images.shape)}")
        features = self.encoder(images)
        features = features.patches if hasattr(features, "patches") else features  # (B, N, d_img)
        expected = (self.config.media_tokens, self.config.media_dim)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"the encoder returned features of shape {tuple(features.shape)}, expected (batch, *{expected})")
        media = self.xattn["proj"](features)  # (B, N, lm_dim): method B's path
        thumbnail = self.projector(pool_patches(features, self.config.thumbnail_grid))  # (B, g*g, lm_dim): method A's
        return media, thumbnail

    def mask_for(self, ids: torch.Tensor, num_items: int = 1) -> torch.Tensor:
        """(B, T, N): a token at or after the first <|image|> slot sees every full-resolution token; earlier ones none."""
        if num_items != 1:
            raise ValueError(f"the hybrid reads one image per sequence, got num_items {num_items}")
        seen = (ids == self.image_id).cumsum(dim=1) > 0  # (B, T)
        return seen[..., None].expand(-1, -1, self.config.media_tokens)  # (B, T, N)

    def splice(self, ids: torch.Tensor, thumbnail: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, lm_dim) with the thumbnail tokens written over the <|image|> slots, in order."""
        embeds = self.lm.embed(ids)  # (B, T, lm_dim)
        slots = ids == self.image_id  # (B, T)
        per_row = slots.sum(dim=1)
        if checked_on_host(ids) and bool((per_row != self.num_image_tokens).any()):  # no sync on a GPU
            raise ValueError(
                f"each sequence must hold exactly {self.num_image_tokens} <|image|> tokens (one per thumbnail token), "
                f"got {per_row.tolist()} per sequence"
            )
        return embeds.masked_scatter(slots[..., None], thumbnail.to(embeds.dtype))  # (B, T, lm_dim)

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab). images (B, 3, H, W); None = text only (the plain LM)."""
        if images is None:
            if checked_on_host(ids) and bool((ids == self.image_id).any()):
                raise ValueError("ids hold <|image|> tokens but no images were given")
            return self.lm(ids)
        if images.shape[0] != ids.shape[0]:
            raise ValueError(f"got {images.shape[0]} images for {ids.shape[0]} sequences: expected one image per sequence")
        media, thumbnail = self.image_paths(images)
        embeds = self.splice(ids, thumbnail)  # (B, T, lm_dim)
        return self.lm.to_logits(self.hidden_states(None, media, self.mask_for(ids), inputs_embeds=embeds))

    # Generation: method A's loop (prompt grouping, <|image|> x num_image_tokens prefix, EOT
    # handling) with this model's own greedy step below.
    generate = UnifiedVLM.generate

    def _greedy(self, ids: torch.Tensor, images: torch.Tensor | None, steps: int, eot_id: int) -> torch.Tensor:
        caches, media_caches = self.lm.new_caches(), self.new_media_caches()
        media = mask = None
        if images is None:
            embeds = self.lm.embed(ids)
        else:
            media, thumbnail = self.image_paths(images)  # the tower runs once per prompt
            embeds, mask = self.splice(ids, thumbnail), self.mask_for(ids)
        logits = self.lm.to_logits(self.hidden_states(None, media, mask, caches, inputs_embeds=embeds,
                                                      media_caches=media_caches))
        step_mask = None if mask is None else mask[:, -1:]  # a new token sees the image, as the prompt's last did
        return greedy_decode(logits, lambda new: self.lm.to_logits(
            self.hidden_states(new, media, step_mask, caches, media_caches=media_caches)), steps, eot_id)


def hybrid_loss(model: HybridVLM, batch) -> torch.Tensor:
    """The `loss_fn` for `train`: next-token loss on the scored tokens of a `VLMBatch` (thumbnail slots in ids)."""
    logits = model(batch.ids, batch.images)  # (B, T, vocab)
    return next_token_loss(logits[:, :-1], batch.labels[:, 1:], ignore_index=IGNORE_INDEX)


def thumbnail_vlm(model: HybridVLM) -> UnifiedVLM:
    """Method A reading only the thumbnail, built from the hybrid's own tower, projector and LM (shared, not copied).

    With every gate of `model` at 0 the two give the same logits: the proof that the hybrid
    is method A plus a cross-attention path that starts switched off.
    """
    c = model.config
    tower = model.encoder
    patch = tower.config.patch_size if hasattr(tower, "config") else 1
    # The thumbnail is g x g tokens of width media_dim: to VLMConfig it looks like a (g * patch) px image.
    vision = ViTConfig(image_size=c.thumbnail_grid * patch, patch_size=patch, dim=c.media_dim, num_heads=1)
    config = VLMConfig(encoder="vit", vision=vision, lm=c.lm, projector=c.projector, image_id=c.media_id)
    unified = UnifiedVLM(config, encoder=ThumbnailEncoder(tower, c.thumbnail_grid), lm=model.lm)
    unified.projector = model.projector
    return unified


# ----------------------------------------------------------------------------------
# The experiment: three methods, one budget

METHODS = ("unified", "cross", "hybrid")  # NVLM-D, NVLM-X, NVLM-H: the three that every cost table compares
FUYU = "fuyu"  # method A without an image tower (Adept's Fuyu), trained on the same budget
ALL_METHODS = (*METHODS, FUYU)
METHOD_NAMES = {"unified": "A unified (NVLM-D)", "cross": "B cross-attn (NVLM-X)", "hybrid": "H hybrid (NVLM-H)",
                "fuyu": "F Fuyu (no tower)"}


def _check_method(method: str) -> None:
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")


@dataclass(frozen=True)
class MethodsRecipe:
    """One budget for every method: the same data in the same order, steps, batch, rates, LM and tower.

    Stage 1 (alignment, captions): only the new parts train (A and Fuyu: projector; B:
    cross-attention; H: both), the LM and the tower frozen, as LLaVA, Flamingo and NVLM do.
    Stage 2 (questions plus those captions): the new parts, and with `train_encoder` the tower at
    `pretrained_lr` (NVLM keeps its encoder frozen throughout, as the book does; Molmo tunes it); method A and Fuyu also unfreeze
    their LM (chapter 06, LLaVA, NVLM-D), B and H keep it frozen (chapter 07, Flamingo, Llama 3.2
    Vision, NVLM-X, which freezes its LLM in both stages), which leaves them with similar
    numbers of trained parameters (the chapter prints them).
    """

    caption_pairs: int = 4_000
    qa_pairs: int = 20_000
    batch_size: int = 32
    stage1_steps: int = 100
    stage1_lr: float = 3e-3
    stage2_steps: int = 800
    stage2_lr: float = 2e-3  # new parts
    pretrained_lr: float = 1e-3  # A's LM in stage 2 (and the tower, if train_encoder)
    train_encoder: bool = False  # the book's tower stays frozen, as in chapters 06 and 07 (chapter 06's tower search)
    warmup_steps: int = 20
    every: int = 1  # cross-attention after every `every`-th LM block (B and H)
    thumbnail_grid: int = 4  # H: 4 x 4 = 16 thumbnail tokens in the sequence
    seed: int = 0

    def vlm_recipe(self) -> VLMRecipe:
        """Chapter 06's recipe with this budget: `stage_data` draws the batches from it, for every method alike."""
        return VLMRecipe(caption_pairs=self.caption_pairs, qa_pairs=self.qa_pairs, batch_size=self.batch_size,
                         stage1_steps=self.stage1_steps, stage1_lr=self.stage1_lr, stage2_steps=self.stage2_steps,
                         stage2_lr=self.stage2_lr, stage2_lm_lr=self.pretrained_lr, train_encoder=self.train_encoder,
                         warmup_steps=self.warmup_steps, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


def image_slots(model: nn.Module) -> int:
    """How many <|image|> tokens a sequence holds for this model: 64 for A (and Fuyu) at 32 px, 1 for B, 16 for H."""
    if isinstance(model, UnifiedVLM):
        return model.num_image_tokens
    if isinstance(model, HybridVLM):
        return model.num_image_tokens
    if isinstance(model, CrossAttentionVLM):
        return 1
    raise TypeError(f"expected a UnifiedVLM, CrossAttentionVLM or HybridVLM, got {type(model).__name__}")


def method_of(model: nn.Module) -> str:
    """'unified', 'cross', 'hybrid' or 'fuyu' (a UnifiedVLM that reads raw patches)."""
    if isinstance(model, HybridVLM):
        return "hybrid"
    if isinstance(model, CrossAttentionVLM):
        return "cross"
    if isinstance(model, UnifiedVLM):
        return FUYU if model.config.encoder == "patches" else "unified"
    raise TypeError(f"expected a UnifiedVLM, CrossAttentionVLM or HybridVLM, got {type(model).__name__}")


def method_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss of whichever method `model` is (all of them score the same answer tokens)."""
    method = method_of(model)
    return {"unified": vlm_loss, "cross": xattn_loss, "hybrid": hybrid_loss, FUYU: vlm_loss}[method](model, batch)


def make_method(method: str, tower: nn.Module, lm: GPT, *, image_id: int, every: int = 1, thumbnail_grid: int = 4,
                seed: int = 0) -> nn.Module:
    """A fresh model of `method` around the given tower and LM (shared, not copied); new parts seeded.

    Fuyu uses only the tower's shape (image and patch size), not the tower: its "encoder" is
    `PatchEncoder`, the 4 x 4 x 3 = 48 raw pixels of each patch, the same width as the CLIP
    tower's patch vectors, so its projector is method A's, with the same initial weights.
    """
    _check_method(method)
    vision = tower.config
    torch.manual_seed(seed)
    if method in ("unified", FUYU):
        encoder = "vit" if method == "unified" else "patches"
        config = VLMConfig(encoder=encoder, vision=vision, lm=lm.config, projector="mlp", image_id=image_id)
        return UnifiedVLM(config, encoder=tower if method == "unified" else None, lm=lm)
    kw = dict(lm=lm.config, media_dim=vision.dim, media_tokens=vision.num_patches, vision=vision, every=every,
              media_id=image_id)
    if method == "cross":
        return CrossAttentionVLM(XAttnConfig(**kw), encoder=tower, lm=lm)
    return HybridVLM(HybridConfig(**kw, thumbnail_grid=thumbnail_grid), encoder=tower, lm=lm)


def build_method(method: str, recipe: MethodsRecipe | None = None, tokenizer: Tokenizer | None = None) -> nn.Module:
    """A fresh model of `method` from the shipped pretrained parts: chapter 05's tower and chapter 04's GPT."""
    from mllm_scratch.clip import pretrained_image_tower
    from mllm_scratch.gpt import pretrained_gpt

    recipe = recipe or MethodsRecipe()
    tokenizer = tokenizer or load_tokenizer()
    return make_method(method, pretrained_image_tower(), pretrained_gpt(), image_id=tokenizer.image_id,
                       every=recipe.every, thumbnail_grid=recipe.thumbnail_grid, seed=recipe.seed)


def _set_trainable(model: nn.Module, *, encoder: bool, new: bool, lm: bool) -> None:
    model.requires_grad_(False)
    for name in ("projector", "xattn"):
        if hasattr(model, name):
            getattr(model, name).requires_grad_(new)
    model.encoder.requires_grad_(encoder)
    model.lm.requires_grad_(lm)


def _groups(model: nn.Module, new_lr: float, pretrained_lr: float) -> list[dict]:
    groups = []
    for name in ("projector", "xattn", "encoder", "lm"):
        if not hasattr(model, name):
            continue
        lr = new_lr if name in ("projector", "xattn") else pretrained_lr
        decay, no_decay = [], []
        for p in getattr(model, name).parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
        groups += [{"params": g, "lr": lr, "weight_decay": 0.0, "part": name} for g in (decay, no_decay) if g]
    return groups


def trained_parts(method: str, stage: int, recipe: MethodsRecipe) -> dict[str, bool]:
    """Which parts train in a stage: {'encoder', 'new', 'lm'} (new = projector and/or cross-attention)."""
    _check_method(method)
    if stage == 1:
        return {"encoder": False, "new": True, "lm": False}
    return {"encoder": recipe.train_encoder, "new": True, "lm": method in ("unified", FUYU)}  # Fuyu has no tower to train


def train_method(
    model: nn.Module,
    recipe: MethodsRecipe,
    stage: int,
    tokenizer: Tokenizer | None = None,
    *,
    steps: int | None = None,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> History:
    """Train one stage of the shared recipe; the batches are the same examples in the same order for every method."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    tokenizer = tokenizer or load_tokenizer()
    method = method_of(model)
    _set_trainable(model, **trained_parts(method, stage, recipe))
    lr = recipe.stage1_lr if stage == 1 else recipe.stage2_lr
    groups = _groups(model, lr, lr if stage == 1 else recipe.pretrained_lr)
    history = run_stage(model, recipe.vlm_recipe(), stage, groups, method_loss, image_slots(model), tokenizer,
                        steps=steps, log_every=log_every, progress=progress, device=device)
    model.requires_grad_(False)
    return history


def char_accuracy(guess: str, truth: str) -> float:
    """Share of the true string's characters that the guess has at the same position ('a7k' vs 'a7x': 2/3)."""
    return sum(g == t for g, t in zip(guess, truth)) / len(truth)


@torch.no_grad()
def evaluate_vqa(model: nn.Module, tokenizer: Tokenizer, dataset, images: torch.Tensor | None = None) -> dict[str, float]:
    """Exact-match accuracy per skill and 'all', plus 'reading_chars' (per-character reading accuracy).

    `images` replaces the data set's images (for controls); any of the three methods (their
    `generate` share one contract), greedy, at most 4 new tokens.
    """
    own_images, rest = stack_dataset(dataset)
    images = own_images if images is None else images
    predicted = model.generate(tokenizer, images, [r[0] for r in rest], max_new_tokens=4)
    correct: dict[str, list[bool]] = {}
    chars = []
    for (_, answer, skill), guess in zip(rest, predicted):
        correct.setdefault(skill, []).append(guess == answer)
        if skill == "reading":
            chars.append(char_accuracy(guess, answer))
    out = {skill: sum(v) / len(v) for skill, v in correct.items()}
    out["all"] = sum(sum(v) for v in correct.values()) / len(predicted)
    if chars:
        out["reading_chars"] = sum(chars) / len(chars)
    return out


# ----------------------------------------------------------------------------------
# Checkpoints: data/checkpoints/methods_{unified,cross,hybrid,fuyu}.pt

CHECKPOINT_NAME = "methods"


def checkpoint_path(method: str, directory: str | Path | None = None) -> Path:
    _check_method(method)
    return Path(directory or DEFAULT_DIR) / f"{CHECKPOINT_NAME}_{method}.pt"


def build_target(method: str) -> str:
    """The `build_checkpoints.py` target that writes `method`'s file: 'methods' for the three, 'methods_fuyu' for Fuyu."""
    _check_method(method)
    return f"{CHECKPOINT_NAME}_{FUYU}" if method == FUYU else CHECKPOINT_NAME


def _saved_parts(model: nn.Module, method: str) -> nn.Module:
    """What the file holds: the whole model (A, Fuyu: no tower, so projector + LM), or for B and H every part but the
    frozen LM (the shipped GPT, checked by sha256)."""
    if method in ("unified", FUYU):
        return model
    holder = nn.Module()  # the same submodules under the same names, so the keys match the model's
    for name in ("encoder", "projector", "xattn"):
        if hasattr(model, name):
            holder.add_module(name, getattr(model, name))
    return holder


def save_method(path: str | Path, model: nn.Module, *, recipe: dict | None = None, metrics: dict | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Save a trained method's model (for B and H: without the frozen LM, recorded by its sha256); returns the manifest.

    `dtype` float16 halves the file (the book's shipped ones are stored so; see `round_to_dtype`).
    A frozen copy of the shipped image tower is not stored either: the manifest records its checksum.
    """
    from mllm_scratch.clip import tower_reference
    from mllm_scratch.gpt import tokenizer_sha256

    method = method_of(model)
    reference = tower_reference(getattr(model, "encoder", None), dtype)  # the shipped tower, frozen: by reference
    extra = {"method": method, "tokenizer_sha256": tokenizer_sha256(), "lm_sha256": state_checksum(model.lm, shapes=False), **reference,
             "loader": "mllm_scratch.hybrid.load_method", "rebuild": rebuild_command(build_target(method))}
    stored = _saved_parts(model, method)
    if reference:
        stored = nn.ModuleDict({name: module for name, module in stored.named_children() if name != "encoder"})
    return save_checkpoint(path, stored, {"method": method, **model.config.to_dict()},
                           name=Path(path).stem, recipe=recipe, metrics=metrics, extra=extra, dtype=dtype)


def load_method(path: str | Path) -> nn.Module:
    """Load a `save_method` file (B and H around the shipped GPT, checked by sha256); eval mode, CPU, frozen."""
    from mllm_scratch.clip import with_referenced_tower
    from mllm_scratch.gpt import pretrained_gpt, tokenizer_sha256

    path = Path(path)
    rebuild = rebuild_command(build_target(FUYU) if path.stem == checkpoint_path(FUYU).stem else CHECKPOINT_NAME)
    if path.parent.resolve() != DEFAULT_DIR.resolve():
        rebuild += f" --out {path.parent}"
    saved, state_dict, manifest = load_checkpoint(path, rebuild=rebuild)
    state_dict = with_referenced_tower(state_dict, manifest, path, rebuild)
    if path.parent.resolve() == DEFAULT_DIR.resolve() and manifest.get("recipe") != MethodsRecipe().to_dict():
        raise CheckpointError(f"checkpoint {path} was trained with another recipe than MethodsRecipe() in "
                              f"mllm_scratch/hybrid.py (the recipe changed since it was built); rebuild it with: {rebuild}")
    if manifest.get("tokenizer_sha256") != tokenizer_sha256():
        raise CheckpointError(f"checkpoint {path} was trained with another tokenizer; rebuild it with: {rebuild}")
    config = dict(saved)
    method = config.pop("method", None)
    if method not in ALL_METHODS:
        raise CheckpointError(f"checkpoint {path} does not name a method of {ALL_METHODS}; rebuild it with: {rebuild}")
    try:
        if method in ("unified", FUYU):
            model: nn.Module = UnifiedVLM(VLMConfig(**config))
            if (model.config.encoder == "patches") != (method == FUYU):
                raise ValueError(f"encoder {model.config.encoder!r} does not fit method {method!r}")
        else:
            cls, cfg = (CrossAttentionVLM, XAttnConfig) if method == "cross" else (HybridVLM, HybridConfig)
            lm = pretrained_gpt()
            model = cls(cfg(**config), lm=lm)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid {method} config ({err}); rebuild it with: {rebuild}") from None
    if method not in ("unified", FUYU):
        if manifest.get("lm_sha256") != state_checksum(lm, shapes=False):
            raise CheckpointError(f"checkpoint {path} wraps another GPT than the shipped one (lm_sha256 differs); "
                                  f"rebuild it with: {rebuild}")
        state_dict = {**{f"lm.{k}": v for k, v in lm.state_dict().items()}, **state_dict}
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.requires_grad_(False).eval()


def load_methods(path: str | Path | None = None, methods: tuple[str, ...] = METHODS) -> dict[str, nn.Module]:
    """The trained methods (default the three, {'unified', 'cross', 'hybrid'}; `ALL_METHODS` adds 'fuyu') from the
    directory of `path` (default: the shipped ones).

    `path` may be the directory or its `methods.pt` (what `build_checkpoints.py methods --verify` passes).
    """
    directory = DEFAULT_DIR if path is None else Path(path)
    if directory.suffix == ".pt":
        directory = directory.parent
    for method in methods:
        _check_method(method)
    return {method: load_method(checkpoint_path(method, directory)) for method in methods}


def build_checkpoints(out: Path, recipe: MethodsRecipe | None = None, *, test_size: int = 6000,
                      methods: tuple[str, ...] = METHODS) -> dict:
    """Train `methods` (default the three) with `recipe` (default `MethodsRecipe()`), evaluate, save.

    What `build_checkpoints.py methods` runs; `methods_fuyu` runs it with methods=('fuyu',).
    """
    import time

    from mllm_scratch.shapeworld import SKILLS, VQADataset

    recipe = recipe or MethodsRecipe()
    tokenizer = load_tokenizer()
    test = VQADataset("test", test_size)
    manifests = {}
    for method in methods:
        _check_method(method)
        model = build_method(method, recipe, tokenizer)
        start = time.perf_counter()
        histories = {s: train_method(model, recipe, s, tokenizer, log_every=100, progress=False, device="cpu")
                     for s in (1, 2)}
        seconds = time.perf_counter() - start
        model.eval()
        round_to_dtype(_saved_parts(model, method), STORED_DTYPE)  # score the weights the float16 file will hold
        acc = evaluate_vqa(model, tokenizer, test)
        print(f"methods/{method}: {seconds:.0f} s, test " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
        metrics = {"stage1_loss": round(histories[1].loss[-1], 4), "stage2_loss": round(histories[2].loss[-1], 4),
                   "train_seconds": round(seconds, 1),
                   "loss_curves": {f"stage{s}": [round(x, 3) for x in h.loss] for s, h in histories.items()},
                   "trained_parameters": {f"stage{s}": n for s, n in trained_counts(model, recipe).items()},
                   "vqa_questions_per_skill": test_size // len(SKILLS),
                   "test_vqa": {k: round(v, 4) for k, v in acc.items()}}
        manifests[method] = save_method(checkpoint_path(method, out), model, recipe=recipe.to_dict(), metrics=metrics,
                                        dtype=STORED_DTYPE)
    return manifests


def trained_counts(model: nn.Module, recipe: MethodsRecipe) -> dict[int, int]:
    """Parameters trained in stage 1 and stage 2 of the recipe (tied weights counted once)."""
    method = method_of(model)
    out = {}
    for stage in (1, 2):
        parts = trained_parts(method, stage, recipe)
        names = [n for n in ("projector", "xattn") if hasattr(model, n)] if parts["new"] else []
        names += ["encoder"] * parts["encoder"] + ["lm"] * parts["lm"]
        seen = {id(p): p.numel() for n in names for p in getattr(model, n).parameters()}
        out[stage] = sum(seen.values())
    return out


__all__ = [
    "ALL_METHODS",
    "FUYU",
    "HybridConfig",
    "HybridVLM",
    "METHODS",
    "METHOD_NAMES",
    "MethodsRecipe",
    "ThumbnailEncoder",
    "build_checkpoints",
    "build_method",
    "build_target",
    "char_accuracy",
    "checkpoint_path",
    "evaluate_vqa",
    "hybrid_loss",
    "image_slots",
    "load_method",
    "load_methods",
    "make_method",
    "method_loss",
    "method_of",
    "pool_patches",
    "save_method",
    "thumbnail_vlm",
    "train_method",
    "trained_counts",
]
