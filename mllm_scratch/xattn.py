"""The cross-attention decoder (method B): a frozen LM that reads images through gated cross-attention.

    media item (an image (3, H, W), or a clip (F, 3, H, W)) -> encoder -> (media_tokens, media_dim)
                                                           -> projection -> (media_tokens, lm_dim)
    text "<|image|>what colour is ..." -> the chapter-04 GPT, unchanged and frozen; beside every
    `every`-th block a GatedCrossAttentionBlock lets the text read the media:
        x = x + tanh(attn_gate) * cross_attention(norm(x), media)   (queries: text, keys/values: media)
        x = x + tanh(mlp_gate)  * mlp(norm(x))

Mirrors Flamingo (Alayrac et al., 2022: gated XATTN-DENSE layers, tanh gates initialised
at 0, media masks so each token sees only the latest preceding image), Llama 3.2 Vision
(cross-attention layers every fourth block of a frozen Llama 3.1) and NVLM-X (Dai et al.,
2024: the LLM frozen in both of its training stages). The image is not in the sequence: one
marker token says where it stands, so the sequence stays short however many tokens the image has.

Placement (`XAttnConfig.placement`): Flamingo runs each gated block *before* its LM block (the
gated block's output is the LM block's input), and so does torchtune's Llama 3.2 Vision
(`FusionLayer`, fusion_first=True). "after" (the default, what the shipped checkpoints were
trained with) runs it right after the LM block instead. The gated blocks sit at the same indices
(`XAttnConfig.layers`) either way: with every=1 the two differ only at the ends (Flamingo's first
gated block reads the raw embeddings; with "after" the last one feeds the final norm directly).

Training (`XAttnRecipe`, `build_xattn`, `train_xattn`): one stage on chapter 06's captions and
questions with one <|image|> marker per image, the LM frozen, the gates at their own higher rate,
the tower optionally trained at a low rate (Llama 3.2); the gates' tanh is recorded as it goes
(`gate_history`). Checkpoints (`save_xattn` / `load_xattn`) hold only `xattn`, and the tower
when it trained; the manifest records the checksums of the frozen LM (and of the shipped tower,
when it is not stored), and loading verifies them.

Two guarantees the chapter proves: with every gate at 0 the model *is* the LM (bit for bit),
and a token with no image before it gets exactly zero update (no NaN, no bias leaking through).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from mllm_scratch.attention import KVCache, MultiHeadAttention
from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    STORED_DTYPE,
    CheckpointError,
    load_state_dict_strict,
    load_verified,
    round_to_dtype,
    save_checkpoint,
    state_checksum,
)
from mllm_scratch.gpt import GPT, GPTConfig, next_token_loss
from mllm_scratch.runtime import checked_on_host
from mllm_scratch.shapeworld import CANONICAL_WORDS, SKILLS, CaptionDataset, ShapeWorldConfig, VQADataset
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, autocast, batches, run_overrides, train
from mllm_scratch.vit import MLP, SWITCH, ViTConfig, VisionTransformer, config_dict
from mllm_scratch.vlm import PlaceCodes, generate_grouped, greedy_decode, spatial_question_sets

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------
# Media masks: which media tokens each text token may attend to


def media_index(ids: torch.Tensor, media_id: int) -> torch.Tensor:
    """(B, T) index of the latest media marker at or before each token (0-based), -1 before the first one."""
    if ids.dim() != 2:
        raise ValueError(f"ids must have shape (batch, tokens), got {tuple(ids.shape)}")
    return (ids == media_id).long().cumsum(dim=1) - 1  # (B, T)


def media_mask(
    ids: torch.Tensor,
    media_id: int,
    tokens_per_item: int,
    num_items: int,
    attend: Literal["latest", "all"] = "latest",
) -> torch.Tensor:
    """(B, T, num_items * tokens_per_item) boolean mask, True = this text token may attend to this media token.

    'latest' (Flamingo): a token sees only the item whose marker most recently precedes it
    (or is itself). 'all': it sees every item whose marker came earlier. Tokens before the
    first marker see nothing: their rows are all False.
    """
    if attend not in ("latest", "all"):
        raise ValueError(f"attend must be 'latest' or 'all', got {attend!r}")
    latest = media_index(ids, media_id)  # (B, T)
    # The most markers any row holds; read on the CPU only (on a GPU it would be a host-device sync).
    markers = int(latest[:, -1].max()) + 1 if latest.numel() and checked_on_host(ids) else 0
    if markers > num_items:
        raise ValueError(f"a sequence holds {markers} media markers but only {num_items} media items were given")
    item_of_key = torch.arange(num_items, device=ids.device).repeat_interleave(tokens_per_item)  # (M,)
    if attend == "latest":
        return latest[..., None] == item_of_key  # (B, T, M); -1 matches no item
    return item_of_key <= latest[..., None]  # (B, T, M)


# ----------------------------------------------------------------------------------
# The model


@dataclass
class XAttnConfig:
    """Shape of a cross-attention VLM: the LM, the media it reads, and where the gated blocks go."""

    lm: GPTConfig
    media_dim: int  # width of the encoder's per-token output
    media_tokens: int  # tokens per media item (64 for a 32 px image through the chapter-05 tower)
    vision: ViTConfig | None = None  # if set and no encoder is given, the encoder is VisionTransformer(vision)
    every: int = 1  # a gated cross-attention block beside every `every`-th LM block
    num_heads: int = 4
    mlp_ratio: float = 4.0
    media_id: int = 502  # the marker token: <|image|> (use <|video|> for clips)
    attend: Literal["latest", "all"] = "latest"
    item_dims: int = 3  # dims of one media item: 3 for an image (3, H, W), 4 for a clip (F, 3, H, W)
    # where a gated block runs relative to LM block i: right after it, or right before it (Flamingo,
    # torchtune's Llama 3.2 Vision). Configs saved without this field load as "after".
    placement: Literal["after", "before"] = "after"
    # Learned 2-D place codes (a row's plus a column's) added to the projected media tokens of
    # each item: the tower's patch vectors barely know where they are. Stored only when set.
    place_codes: bool = field(default=False, metadata=SWITCH)

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):
            self.lm = GPTConfig(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if not 1 <= self.every <= self.lm.depth:
            raise ValueError(f"every must be between 1 and the LM's depth {self.lm.depth}, got {self.every}")
        if self.attend not in ("latest", "all"):
            raise ValueError(f"attend must be 'latest' or 'all', got {self.attend!r}")
        if self.lm.dim % self.num_heads:
            raise ValueError(f"the LM's dim {self.lm.dim} is not divisible by num_heads {self.num_heads}")
        if self.media_dim < 1 or self.media_tokens < 1:
            raise ValueError(f"media_dim and media_tokens must be positive, got {self.media_dim} and {self.media_tokens}")
        if not 0 <= self.media_id < self.lm.vocab_size:
            raise ValueError(f"media_id {self.media_id} is not a token id of the LM (0..{self.lm.vocab_size - 1})")
        if self.item_dims < 1:
            raise ValueError(f"item_dims must be positive, got {self.item_dims}")
        if self.placement not in ("after", "before"):
            raise ValueError(f"placement must be 'after' or 'before', got {self.placement!r}")
        if self.place_codes and round(self.media_tokens ** 0.5) ** 2 != self.media_tokens:
            raise ValueError(f"place_codes need a square grid of media tokens per item, got media_tokens {self.media_tokens}")

    @property
    def layers(self) -> list[int]:
        """The LM blocks beside which a gated cross-attention block runs (after or before them: `placement`)."""
        return [i for i in range(self.lm.depth) if (i + 1) % self.every == 0]

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: cross-attention then an MLP, each behind a tanh gate that starts at 0."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)  # keys/values come from the projected media, also `dim` wide
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, dim) text; media: (B, M, dim); mask: (B, T, M), True = may attend -> (B, T, dim).

        cache: an empty `KVCache` keeps the media's keys and values; a filled one is reused
        (generation: the media do not change from one new token to the next).
        """
        sees = mask.any(dim=-1, keepdim=True).to(x.dtype)  # (B, T, 1): 0 for a token with no media before it
        h = self.attn(self.norm1(x), media, attn_mask=mask[:, None], cache=cache)  # (B, T, dim)
        # A row with no key gives zeros from attention, but out_proj's bias and the MLP would still
        # add something: multiplying by `sees` makes the update exactly zero there.
        x = x + torch.tanh(self.attn_gate) * h * sees
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.norm2(x)) * sees  # (B, T, dim)

    def gates(self) -> tuple[float, float]:
        """(tanh(attn_gate), tanh(mlp_gate)): how much of each branch reaches the LM."""
        return float(torch.tanh(self.attn_gate.detach())), float(torch.tanh(self.mlp_gate.detach()))


PARTS = ("encoder", "xattn", "lm")


class CrossAttentionVLM(nn.Module):
    """Method B: a frozen GPT with gated cross-attention blocks that read projected media features."""

    def __init__(self, config: XAttnConfig, *, encoder: nn.Module | None = None, lm: GPT | None = None):
        super().__init__()
        self.config = config
        if encoder is None:
            if config.vision is None:
                raise ValueError("give an encoder module, or XAttnConfig.vision to build a VisionTransformer")
            encoder = VisionTransformer(config.vision)
        lm = lm if lm is not None else GPT(config.lm)
        if lm.config != config.lm:
            raise ValueError(f"the LM's config {lm.config} differs from XAttnConfig.lm {config.lm}")
        self.encoder = encoder
        self.lm = lm  # wrapped, not forked: its modules and state-dict keys are the chapter-04 GPT's
        dim = config.lm.dim
        # "xattn" holds everything new: the media projection and the gated blocks.
        self.xattn = nn.ModuleDict({
            "proj": nn.Sequential(nn.Linear(config.media_dim, dim), nn.LayerNorm(dim)),
            "blocks": nn.ModuleDict({str(i): GatedCrossAttentionBlock(dim, config.num_heads, config.mlp_ratio)
                                     for i in config.layers}),
        })
        if config.place_codes:  # made last, so the other new weights are the same with or without it
            self.xattn["place"] = PlaceCodes(round(config.media_tokens ** 0.5), dim)

    @property
    def media_id(self) -> int:
        return self.config.media_id

    @property
    def blocks(self) -> nn.ModuleDict:
        """The gated blocks, keyed by the index of the LM block they follow."""
        return self.xattn["blocks"]

    def gates(self) -> dict[int, tuple[float, float]]:
        """{LM block index: (tanh(attn_gate), tanh(mlp_gate))}."""
        return {int(i): block.gates() for i, block in self.blocks.items()}

    def set_trainable(self, *, encoder: bool | None = None, xattn: bool | None = None, lm: bool | None = None) -> "CrossAttentionVLM":
        """Freeze or unfreeze whole parts (None leaves a part as it is); returns self."""
        for name, flag in (("encoder", encoder), ("xattn", xattn), ("lm", lm)):
            if flag is not None:
                getattr(self, name).requires_grad_(flag)
        return self

    def trainable(self) -> dict[str, bool]:
        return {name: any(p.requires_grad for p in getattr(self, name).parameters()) for name in PARTS}

    # -- forward

    def _as_items(self, media: torch.Tensor) -> torch.Tensor:
        d = self.config.item_dims
        if media.dim() == d + 1:  # (B, *item): one item per sequence
            media = media.unsqueeze(1)
        if media.dim() != d + 2:
            raise ValueError(
                f"media must have shape (batch, items, *item) or (batch, *item) with {d}-dim items, got {tuple(media.shape)}"
            )
        return media  # (B, M, *item)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Media (B, M, *item) or (B, *item) -> projected media tokens (B, M * media_tokens, lm_dim)."""
        media = self._as_items(media)
        b, m = media.shape[:2]
        features = self.encoder(media.flatten(0, 1))  # (B * M, media_tokens, media_dim)
        if hasattr(features, "patches"):  # a ViTOutput: keep the per-patch vectors
            features = features.patches
        expected = (self.config.media_tokens, self.config.media_dim)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"the encoder returned features of shape {tuple(features.shape)}, expected (items, *{expected})")
        tokens = self.xattn["proj"](features)  # (B * M, media_tokens, lm_dim)
        if "place" in self.xattn:
            tokens = self.xattn["place"](tokens)
        return tokens.reshape(b, m * self.config.media_tokens, -1)  # (B, M * media_tokens, lm_dim)

    def mask_for(self, ids: torch.Tensor, num_items: int) -> torch.Tensor:
        """The media mask (B, T, num_items * media_tokens) of these ids (see `media_mask`)."""
        return media_mask(ids, self.media_id, self.config.media_tokens, num_items, self.config.attend)

    def new_media_caches(self) -> dict[str, KVCache]:
        """One empty cache per gated block, for the media's keys and values during generation."""
        return {key: KVCache() for key in self.blocks}

    def hidden_states(
        self,
        ids: torch.Tensor | None,
        media_tokens: torch.Tensor | None,
        mask: torch.Tensor | None,
        caches=None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        media_caches: dict[str, KVCache] | None = None,
    ) -> torch.Tensor:
        """The LM's residual stream with the gated blocks run after (or before) their LM blocks -> (B, T, lm_dim).

        media_tokens (B, M, lm_dim) from `encode_media`; mask (B, T, M) from `mask_for`, or any
        mask of that shape (a hybrid model passes its own). inputs_embeds replaces ids, as in `GPT`.
        caches: the LM's KV caches; media_caches (`new_media_caches()`): each gated block's keys
        and values of the media, computed on the first call and reused after it.
        """
        if media_tokens is None:
            return self.lm.hidden_states(ids, inputs_embeds=inputs_embeds, caches=caches)
        if mask is None or mask.shape[-1] != media_tokens.shape[1]:
            raise ValueError(f"mask must have shape (batch, tokens, {media_tokens.shape[1]}), got "
                             f"{None if mask is None else tuple(mask.shape)}")
        blocks = self.blocks

        def gated(i: int, x: torch.Tensor) -> torch.Tensor:
            key = str(i)
            if key not in blocks:
                return x
            return blocks[key](x, media_tokens.to(x.dtype), mask, None if media_caches is None else media_caches[key])

        # GPT's own hooks: x = gated(i, x) right after LM block i, or (Flamingo) right before it
        hook = "after_block" if self.config.placement == "after" else "before_block"
        return self.lm.hidden_states(ids, inputs_embeds=inputs_embeds, caches=caches, **{hook: gated})

    def forward(self, ids: torch.Tensor, media: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab). media: (B, M, *item) or (B, *item); None = text only (the plain LM)."""
        markers = ids == self.media_id
        if media is None:
            if checked_on_host(ids) and bool(markers.any()):
                raise ValueError("ids hold media marker tokens but no media were given")
            return self.lm(ids)
        media = self._as_items(media)
        if media.shape[0] != ids.shape[0]:
            raise ValueError(f"got media for {media.shape[0]} sequences and ids for {ids.shape[0]}")
        count = int(markers.sum(dim=1).max()) if ids.numel() and checked_on_host(ids) else 0  # no sync on a GPU
        if count > media.shape[1]:
            raise ValueError(f"a sequence holds {count} media markers but only {media.shape[1]} media items per sequence were given")
        tokens = self.encode_media(media)  # (B, M * media_tokens, lm_dim)
        mask = self.mask_for(ids, media.shape[1])  # (B, T, M * media_tokens)
        return self.lm.to_logits(self.hidden_states(ids, tokens, mask))

    @torch.no_grad()
    def generate(
        self,
        tokenizer: Tokenizer,
        media: torch.Tensor | None,
        prompts: Sequence[str],
        max_new_tokens: int = 8,
        batch_size: int = 256,
    ) -> list[str]:
        """Greedy continuation of `marker + prompt` for each (media item, prompt); media None = text only.

        The same contract as `UnifiedVLM.generate`, so chapter 06's `vqa_accuracy` and
        `caption_accuracy` evaluate this model too. The media are encoded once per batch; the
        LM decodes with its KV caches, and new tokens keep seeing the prompt's latest item.
        """
        return generate_grouped(self, tokenizer, media, prompts, [self.media_id], max_new_tokens, batch_size)

    def _greedy(self, ids: torch.Tensor, media: torch.Tensor | None, steps: int, eot_id: int) -> torch.Tensor:
        caches, media_caches = self.lm.new_caches(), self.new_media_caches()
        tokens = mask = None
        with autocast(ids.device):
            if media is not None:
                media = self._as_items(media)
                tokens = self.encode_media(media)
                mask = self.mask_for(ids, media.shape[1])  # (b, length, M)
            logits = self.lm.to_logits(self.hidden_states(ids, tokens, mask, caches, media_caches=media_caches))
        step_mask = None if mask is None else mask[:, -1:]  # new tokens see what the prompt's last token saw

        def step(new: torch.Tensor) -> torch.Tensor:
            with autocast(ids.device):
                return self.lm.to_logits(self.hidden_states(new, tokens, step_mask, caches, media_caches=media_caches))

        return greedy_decode(logits, step, steps, eot_id)


def xattn_loss(model: CrossAttentionVLM, batch) -> torch.Tensor:
    """The `loss_fn` for `train`: next-token loss on scored tokens of a batch with .images (media), .ids, .labels."""
    logits = model(batch.ids, batch.images)  # (B, T, vocab)
    return next_token_loss(logits[:, :-1], batch.labels[:, 1:], ignore_index=IGNORE_INDEX)


def lm_checksum(lm: nn.Module) -> str:
    """A sha256 over the LM's state dict (names, shapes and bytes): equal before and after training = untouched."""
    return state_checksum(lm)


# ----------------------------------------------------------------------------------
# Training: one stage, the LM frozen (Flamingo); the image tower optionally trained too (Llama 3.2)


@dataclass(frozen=True)
class XAttnRecipe:
    """Everything that determines a trained cross-attention VLM: parts, data, budget, rates, seed."""

    encoder: Literal["clip", "vit"] = "clip"  # clip: chapter 05's pretrained tower; vit: a random ViT
    every: int = 1  # a gated block after every `every`-th of the LM's blocks
    attend: Literal["latest", "all"] = "latest"
    caption_pairs: int = 4_000  # ShapeWorld "train" captions (chapter 06's stage-1 data) ...
    qa_pairs: int = 60_000  # ... mixed with "train" questions, skills equally common (chapter 06's stage 2)
    batch_size: int = 32
    steps: int = 5000  # on the mix, after spatial_steps
    # The frozen LM: "qa", pretrained with questions and answers in its text (`pretrained_gpt_qa`),
    # so "yes" and "no" are words it already says; "base": chapter 04's GPT (descriptions only).
    lm: Literal["base", "qa"] = "qa"
    place_codes: bool = True  # XAttnConfig.place_codes
    reading: bool = False  # reading questions in the mix too (no model learns to read at 32 px)
    # Spatial questions asked with "left of" and "above" only, in the mix (`CANONICAL_WORDS`): "yes"
    # then follows from one object's place, a signal the four words' XOR does not give.
    canonical_pairs: int = 12_000
    # Where the canonical questions' scenes start among the train seeds: 1,000,000 gives them scenes
    # of their own; 0 asks them about the very scenes (and object pairs) of the four-word questions.
    canonical_offset: int = 1_000_000
    # A first stage on spatial questions only, `qa_pairs` canonical ones and `qa_pairs` with all
    # four words, before `steps` on the mix: the comparison is learned here.
    spatial_steps: int = 4000
    lr: float = 1e-3  # the new parts: media projection and gated blocks
    gate_lr: float = 1e-2  # the tanh gates: a higher rate lets them open in tens of steps, not hundreds
    train_encoder: bool = False  # Flamingo keeps the image encoder frozen; Llama 3.2 Vision trains it (at a low rate)
    encoder_lr: float = 3e-4  # the pretrained tower, when it trains
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0

    def scene_config(self) -> ShapeWorldConfig:
        return ShapeWorldConfig()

    def train_config(self, **overrides) -> TrainConfig:
        """The `TrainConfig` of this recipe (overrides change logging and progress, or the budget for a short run)."""
        base = dict(steps=self.steps, lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps),
                    weight_decay=self.weight_decay, record_every=10, log_every=100)
        return TrainConfig(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


# The recipe's fields as they were before the spatial work: chapter 04's LM, no place codes,
# reading in the mix and one stage. Appendix A2's runs were made so (`replace(XAttnRecipe(), **ONE_STAGE)`).
ONE_STAGE: dict[str, Any] = dict(lm="base", place_codes=False, reading=True, canonical_pairs=0, spatial_steps=0)


def build_xattn(recipe: XAttnRecipe | None = None, tokenizer: Tokenizer | None = None, lm: GPT | None = None,
                *, placement: Literal["after", "before"] = "after", tower: nn.Module | None = None) -> CrossAttentionVLM:
    """A fresh cross-attention VLM for `recipe`: its image tower (or `tower`), new gated blocks (seeded), the recipe's GPT (`recipe_lm`), frozen.

    placement: run each gated block after its LM block (the book's default) or before it (Flamingo);
    the new weights are the same either way (same seed, same names), only the order differs.
    """
    from mllm_scratch.vlm import image_tower

    recipe = recipe or XAttnRecipe()
    tokenizer = tokenizer or load_tokenizer()
    if recipe.encoder not in ("clip", "vit"):
        raise ValueError(f"encoder must be 'clip' or 'vit', got {recipe.encoder!r}")
    tower, vision = (tower, tower.config) if tower is not None else image_tower(recipe.encoder, recipe.seed)
    lm = lm if lm is not None else recipe_lm(recipe)
    config = XAttnConfig(lm=lm.config, media_dim=vision.dim, media_tokens=vision.num_patches, vision=vision,
                         every=recipe.every, attend=recipe.attend, media_id=tokenizer.image_id, placement=placement,
                         place_codes=recipe.place_codes)
    torch.manual_seed(recipe.seed)
    model = CrossAttentionVLM(config, encoder=tower, lm=lm)
    return model.set_trainable(encoder=False, xattn=False, lm=False)


def recipe_lm(recipe: XAttnRecipe | str) -> GPT:
    """The shipped GPT a recipe (or its `lm` name) freezes: `pretrained_gpt_qa()` for "qa", chapter 04's `pretrained_gpt()` for "base"."""
    from mllm_scratch.gpt import pretrained_gpt

    name = recipe if isinstance(recipe, str) else recipe.lm
    if name not in ("base", "qa"):
        raise ValueError(f"lm must be 'base' or 'qa', got {name!r}")
    return pretrained_gpt(questions=name == "qa")


def xattn_param_groups(model: CrossAttentionVLM, recipe: XAttnRecipe) -> list[dict]:
    """AdamW groups: gates at gate_lr, the rest of xattn at lr, the tower at encoder_lr; frozen parameters left out."""
    groups = {"gates": [], "xattn": [], "xattn_no_decay": [], "encoder": [], "encoder_no_decay": []}
    for name, p in model.xattn.named_parameters():
        if p.requires_grad:
            key = "gates" if name.endswith("_gate") else ("xattn_no_decay" if p.dim() < 2 else "xattn")
            groups[key].append(p)
    for p in model.encoder.parameters():
        if p.requires_grad:
            groups["encoder_no_decay" if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else "encoder"].append(p)
    if any(p.requires_grad for p in model.lm.parameters()):
        raise ValueError("the LM must stay frozen in method B: call model.set_trainable(lm=False)")
    rates = {"gates": (recipe.gate_lr, 0.0), "xattn": (recipe.lr, recipe.weight_decay), "xattn_no_decay": (recipe.lr, 0.0),
             "encoder": (recipe.encoder_lr, recipe.weight_decay), "encoder_no_decay": (recipe.encoder_lr, 0.0)}
    out = [{"params": ps, "lr": rates[k][0], "weight_decay": rates[k][1], "part": k} for k, ps in groups.items() if ps]
    if not out:
        raise ValueError("the model has no trainable parameters: unfreeze xattn (or the encoder) before training")
    return out


STAGES = ("spatial", "mix")


def xattn_datasets(recipe: XAttnRecipe, stage: str = "mix") -> list[Dataset]:
    """The datasets a stage draws from (`xattn_data` batches them).

    "mix": chapter 06's questions (reading left out unless recipe.reading), then
    recipe.canonical_pairs spatial questions in "left of" / "above" only (if any), then captions.
    "spatial": qa_pairs canonical spatial questions, then qa_pairs with all four words. The
    canonical questions' scenes start at train seed recipe.canonical_offset.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    config = recipe.scene_config()
    canonical = lambda n: VQADataset("train", n, config, skills=("spatial",), cache=True,  # noqa: E731
                                     spatial_words=CANONICAL_WORDS, offset=recipe.canonical_offset)
    if stage == "spatial":
        return spatial_question_sets(recipe.qa_pairs, config, recipe.canonical_offset)
    skills = SKILLS if recipe.reading else tuple(s for s in SKILLS if s != "reading")
    parts: list[Dataset] = [VQADataset("train", recipe.qa_pairs, config, skills=skills, cache=True)]
    if recipe.canonical_pairs:
        parts.append(canonical(recipe.canonical_pairs))
    parts.append(CaptionDataset("train", recipe.caption_pairs, config, cache=True))
    return parts


def xattn_data(recipe: XAttnRecipe, tokenizer: Tokenizer, device=None, stage: str = "mix"):
    """The endless batch stream of a stage (`xattn_datasets`), with ONE <|image|> marker per image."""
    from mllm_scratch.vlm import VLMCollator

    parts = xattn_datasets(recipe, stage)
    collate = VLMCollator(tokenizer, num_image_tokens=1)  # the marker says where the image stands; it is not in the sequence
    return batches(ConcatDataset(parts), recipe.batch_size, seed=recipe.seed, collate_fn=collate, device=device)


def gates_as_metrics(model: CrossAttentionVLM) -> dict[str, float]:
    """{"attn0": tanh(attn_gate) of the block after LM block 0, "mlp0": ..., ...}: what `train_xattn` records."""
    out = {}
    for i, (attn, mlp) in model.gates().items():
        out[f"attn{i}"], out[f"mlp{i}"] = attn, mlp
    return out


def gate_history(history: History) -> dict[str, tuple[list[int], list[float]]]:
    """{"attn0": (steps, tanh(gate) values), ...} from a `train_xattn` History (step 0 included)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for step, metrics in history.evals:
        for key, value in metrics.items():
            if key.startswith(("attn", "mlp")):
                steps, values = out.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return out


def train_xattn(
    model: CrossAttentionVLM,
    recipe: XAttnRecipe | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    steps: int | None = None,
    spatial_steps: int | None = None,
    gate_every: int = 10,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> History:
    """Train the gated blocks and projection (and the tower if recipe.train_encoder) with the LM frozen.

    Two stages, each with a fresh optimizer and its own schedule: `spatial_steps` on spatial
    questions only (none when 0), then `steps` on the mix (`xattn_data`); the arguments shorten
    either (default: the recipe's). The History runs over both; the gates' tanh values are
    recorded every `gate_every` steps in History.evals (read them with `gate_history`).
    """
    recipe = recipe or XAttnRecipe()
    tokenizer = tokenizer or load_tokenizer()
    if gate_every < 1:
        raise ValueError(f"gate_every must be at least 1, got {gate_every}")
    budgets = {"spatial": recipe.spatial_steps if spatial_steps is None else spatial_steps,
               "mix": recipe.steps if steps is None else steps}
    for stage, n in budgets.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (stage == "mix" and n < 1):
            raise ValueError(f"{stage} steps must be an int >= {int(stage == 'mix')}, got {n!r}")
    model.set_trainable(encoder=recipe.train_encoder, xattn=True, lm=False)
    dev = torch.device(device) if device is not None else None
    gates: list[tuple[int, dict[str, float]]] = []
    done = 0

    def loss_and_gates(m: CrossAttentionVLM, batch) -> torch.Tensor:
        nonlocal done  # `train` calls this once per step, before the step's update: `done` steps so far
        if done % gate_every == 0:
            gates.append((done, gates_as_metrics(m)))
        done += 1
        return xattn_loss(m, batch)

    history = History()
    for stage, n in budgets.items():
        if n == 0:
            continue
        config = recipe.train_config(**run_overrides(log_every, progress, n, recipe.warmup_steps))
        optimizer = torch.optim.AdamW(xattn_param_groups(model, recipe), lr=config.lr)
        offset = done
        part = train(model, xattn_data(recipe, tokenizer, dev, stage), loss_and_gates, config, optimizer=optimizer,
                     device=device, batch_size_of=lambda b: b.ids.shape[0])
        history.steps += [offset + s for s in part.steps]
        history.loss += part.loss
        history.seconds += part.seconds
        history.examples += part.examples
    history.evals = gates + [(done, gates_as_metrics(model))]  # the gates' tanh, as (step, values)
    model.set_trainable(encoder=False, xattn=False, lm=False)
    return history


def fit_xattn(
    recipe: XAttnRecipe | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[CrossAttentionVLM, History]:
    """Build the recipe's model and train it; returns the model (eval mode, all frozen) and its History."""
    recipe = recipe or XAttnRecipe()
    tokenizer = tokenizer or load_tokenizer()
    model = build_xattn(recipe, tokenizer)
    history = train_xattn(model, recipe, tokenizer, log_every=log_every, progress=progress, device=device)
    return model.eval(), history


# ----------------------------------------------------------------------------------
# Checkpoints: only what training changed (tower + xattn); the frozen LM is chapter 04's, verified by checksum

CHECKPOINT_NAME = "xattn"
DEFAULT_CHECKPOINT = DEFAULT_DIR / f"{CHECKPOINT_NAME}.pt"


def _trained_parts(model: CrossAttentionVLM) -> nn.Module:
    """A view of the model without the LM: its state-dict keys are the model's own ("encoder.*", "xattn.*")."""
    return nn.ModuleDict({"encoder": model.encoder, "xattn": model.xattn})


def save_xattn(path: str | Path, model: CrossAttentionVLM, *, recipe: dict | None = None, metrics: dict | None = None,
               name: str = CHECKPOINT_NAME, dtype: torch.dtype = torch.float32) -> dict:
    """Save the tower and the xattn weights (not the frozen LM) with the config, the LM's checksum and the tokenizer's.

    `dtype` float16 halves the file (the book's shipped one is stored so; see `round_to_dtype`).
    A tower equal to the shipped one (frozen) is not stored again: the manifest records its checksum.
    """
    from mllm_scratch.clip import tower_reference
    from mllm_scratch.gpt import tokenizer_sha256

    if model.config.vision is None:
        raise ValueError("save_xattn needs XAttnConfig.vision (a VisionTransformer encoder) to rebuild the encoder")
    reference = tower_reference(model.encoder, dtype)  # the shipped tower, frozen: its checksum, not its weights
    stored = nn.ModuleDict({"xattn": model.xattn}) if reference else _trained_parts(model)
    return save_checkpoint(path, stored, model.config.to_dict(), name=name, recipe=recipe, metrics=metrics,
                           dtype=dtype, extra={"lm_checksum": lm_checksum(model.lm), "tokenizer_sha256": tokenizer_sha256(),
                                  **reference, "lm": "the recipe's shipped GPT (xattn.recipe_lm), frozen: not stored here",
                                  "loader": "mllm_scratch.xattn.load_xattn"})


def load_xattn(path: str | Path | None = None, lm: GPT | None = None) -> CrossAttentionVLM:
    """Load a model saved by `save_xattn` (default: the shipped one) onto its recipe's frozen GPT; eval mode, all frozen.

    Refuses (CheckpointError) a file whose sha256, config, recipe (for the shipped file) or
    tokenizer does not match, and an LM whose checksum differs from the one it was trained on.
    """
    from mllm_scratch.checkpoints import read_manifest
    from mllm_scratch.clip import with_referenced_tower
    from mllm_scratch.gpt import tokenizer_sha256

    saved, state_dict, path, rebuild = load_verified(
        CHECKPOINT_NAME, path, DEFAULT_CHECKPOINT, expected_config=None, recipe=XAttnRecipe().to_dict(),
        recipe_owner="XAttnRecipe() in mllm_scratch/xattn.py", tokenizer_sha256=tokenizer_sha256(),
    )
    try:
        config = XAttnConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid XAttnConfig ({err}); rebuild it with: {rebuild}") from None
    if config.vision is None:
        raise CheckpointError(f"checkpoint {path} has no vision config to rebuild its encoder; rebuild it with: {rebuild}")
    manifest = read_manifest(path, rebuild)
    state_dict = with_referenced_tower(state_dict, manifest, path, rebuild)
    if lm is None:  # files saved before XAttnRecipe.lm existed froze chapter 04's GPT
        lm = recipe_lm((manifest.get("recipe") or {}).get("lm", "base"))
    expected = manifest.get("lm_checksum")
    if expected != lm_checksum(lm):
        raise CheckpointError(f"checkpoint {path} was trained on another LM (lm_checksum {str(expected)[:12]}..., "
                              f"this one is {lm_checksum(lm)[:12]}...); rebuild it with: {rebuild}")
    model = CrossAttentionVLM(config, encoder=VisionTransformer(config.vision), lm=lm)
    load_state_dict_strict(_trained_parts(model), state_dict, path, rebuild)
    return model.set_trainable(encoder=False, xattn=False, lm=False).eval()


def build_checkpoint(out: Path, recipe: XAttnRecipe | None = None) -> dict:
    """Train `XAttnRecipe()` (or `recipe`) and save out/xattn.pt + out/xattn.json (what `build_checkpoints.py xattn` calls)."""
    from mllm_scratch.shapeworld import SKILLS
    from mllm_scratch.vlm import EVAL_QUESTIONS_PER_SKILL, vqa_accuracy

    recipe = recipe or XAttnRecipe()
    tokenizer = load_tokenizer()
    model, history = fit_xattn(recipe, tokenizer, log_every=100, progress=False, device="cpu")
    round_to_dtype(_trained_parts(model), STORED_DTYPE)  # score the weights the float16 file will hold
    metrics: dict[str, Any] = {"final_loss": round(history.loss[-1], 4), "train_seconds": round(history.seconds, 1),
                               "gates": {k: round(v, 4) for k, v in gates_as_metrics(model).items()},
                               "loss_history": {"steps": history.steps, "loss": [round(v, 4) for v in history.loss]}}
    # tanh(gate) every 50 steps, for the chapter's plot of the full run
    metrics["gate_history"] = {k: {"steps": st[::5], "values": [round(v, 4) for v in vals[::5]]}
                               for k, (st, vals) in gate_history(history).items()}
    metrics["vqa_questions_per_skill"] = EVAL_QUESTIONS_PER_SKILL
    for split in ("test", "compositional"):
        data = VQADataset(split, EVAL_QUESTIONS_PER_SKILL * len(SKILLS), recipe.scene_config())  # skills take turns
        acc = vqa_accuracy(model, tokenizer, data)
        metrics[f"{split}_vqa"] = {k: round(v, 4) for k, v in acc.items()}
        print(f"xattn: {split} VQA " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return save_xattn(Path(out) / f"{CHECKPOINT_NAME}.pt", model, recipe=recipe.to_dict(), metrics=metrics,
                      dtype=STORED_DTYPE)


__all__ = [
    "DEFAULT_CHECKPOINT",
    "ONE_STAGE",
    "CrossAttentionVLM",
    "PlaceCodes",
    "GatedCrossAttentionBlock",
    "XAttnConfig",
    "XAttnRecipe",
    "build_checkpoint",
    "build_xattn",
    "fit_xattn",
    "gate_history",
    "gates_as_metrics",
    "lm_checksum",
    "load_xattn",
    "media_index",
    "recipe_lm",
    "media_mask",
    "save_xattn",
    "train_xattn",
    "xattn_data",
    "xattn_datasets",
    "xattn_loss",
    "xattn_param_groups",
]
