"""The unified-embedding decoder (method A): image tokens spliced into the text sequence of an unchanged LM.

    image (3, H, W) -> image tower -> per-patch features (N, d_img)
                    -> projector (linear, or LLaVA-1.5's 2-layer MLP) -> N image tokens (N, d_lm)
    "<|image|>" x N + question            -> token embeddings (T, d_lm)
    splice: the N image tokens replace the N <|image|> embeddings
    -> the chapter-04 GPT (`inputs_embeds`) -> next-token logits; loss on answer tokens only

Mirrors LLaVA (Liu et al., 2023; a CLIP tower, a projector, stage 1 projector-only on
captions, stage 2 with the LM unfrozen on instructions, the tower frozen throughout),
NVLM-D (which also keeps its vision encoder frozen in every stage, as this recipe does) and
Molmo (which tunes every part, the encoder included: `VLMRecipe(train_encoder=True)`),
and with `encoder="patches"` Fuyu (Adept, 2023): raw pixel patches, one linear layer, no
image encoder at all. The VLM *composes* an image tower and a `GPT`; it never forks them.
Which parts train is a flag (`set_trainable`), not a rewrite.

Conventions: a batch holds N copies of `<|image|>` per image (the collator expands
them), so the splice is a masked scatter that checks the count; labels are the input
ids with -100 on every position that is not scored (image, prompt, padding).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    STORED_DTYPE,
    CheckpointError,
    load_state_dict_strict,
    load_verified,
    rebuild_command,
    round_to_dtype,
    save_checkpoint,
)
from mllm_scratch.gpt import GPT, GPTConfig, next_token_loss, tokenizer_sha256
from mllm_scratch.patches import patchify
from mllm_scratch.runtime import checked_on_host
from mllm_scratch.shapeworld import (CANONICAL_WORDS, COLOURS, SHAPES, SKILLS, CaptionDataset, DescribedQADataset,
                                    ShapeWorldConfig, VQADataset, final_answer)
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, autocast, batches, run_overrides, train
from mllm_scratch.vit import SWITCH, ViTConfig, VisionTransformer, config_dict

IGNORE_INDEX = -100  # label of a position the loss skips (image, prompt, padding)

# ----------------------------------------------------------------------------------
# The model


@dataclass
class VLMConfig:
    """Shape of a unified VLM: which image tower, which projector, the LM's shape and the <|image|> id."""

    encoder: Literal["vit", "patches"] = "vit"  # "patches": Fuyu, raw pixels straight into the projector
    vision: ViTConfig = field(default_factory=ViTConfig)  # the tower (or, for "patches", just its image/patch size)
    lm: GPTConfig = field(default_factory=GPTConfig)
    projector: Literal["linear", "mlp"] = "mlp"
    image_id: int = 502  # <|image|> of the shipped tokenizer
    # After the projector: a LayerNorm that brings the image tokens to the scale of word embeddings
    # (the trained MLP's outputs are many times longer), then learned 2-D place codes (`PlaceCodes`).
    token_norm: bool = field(default=False, metadata=SWITCH)
    place_codes: bool = field(default=False, metadata=SWITCH)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.lm, dict):
            self.lm = GPTConfig(**self.lm)
        if self.encoder not in ("vit", "patches"):
            raise ValueError(f"encoder must be 'vit' or 'patches', got {self.encoder!r}")
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"projector must be 'linear' or 'mlp', got {self.projector!r}")
        if not 0 <= self.image_id < self.lm.vocab_size:
            raise ValueError(f"image_id {self.image_id} is not a token id of the LM (0..{self.lm.vocab_size - 1})")
        grid = self.vision.image_size // self.vision.patch_size
        if self.place_codes and grid * grid != self.num_image_tokens:
            raise ValueError(f"place_codes need a square grid of image tokens: {self.num_image_tokens} tokens are not "
                             f"the {grid} x {grid} patches of a {self.vision.image_size} px image")
        if self.num_image_tokens >= self.lm.context_length:
            raise ValueError(
                f"{self.num_image_tokens} image tokens leave no room in the LM's context_length {self.lm.context_length}"
            )

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: one per patch."""
        return self.vision.num_patches

    @property
    def image_dim(self) -> int:
        """Width of the per-patch features the projector reads."""
        v = self.vision
        return v.dim if self.encoder == "vit" else v.in_channels * v.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


class PatchEncoder(nn.Module):
    """Fuyu's 'encoder': no parameters, just the raw pixels of each patch, (B, 3, H, W) -> (B, N, 3 * p * p)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)  # (batch, num_patches, 3 * p * p)


class PlaceCodes(nn.Module):
    """Learned 2-D place codes: token r * grid + c of each item gets row[r] + column[c] added (row-major patches)."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.row = nn.Parameter(torch.randn(grid, dim) * 0.5)
        self.column = nn.Parameter(torch.randn(grid, dim) * 0.5)

    def codes(self) -> torch.Tensor:
        """(grid * grid, dim): the code of every place, in the patches' row-major order."""
        return (self.row[:, None, :] + self.column[None, :, :]).flatten(0, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, grid * grid, dim) -> the same with each place's code added."""
        if tokens.shape[-2] != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} tokens per item, got shape {tuple(tokens.shape)}")
        return tokens + self.codes()


def make_projector(kind: str, image_dim: int, lm_dim: int, *, token_norm: bool = False, place_grid: int = 0) -> nn.Module:
    """The connector: 'linear' (LLaVA-1) or 'mlp', Linear-GELU-Linear (LLaVA-1.5).

    token_norm appends a LayerNorm (image tokens at the words' scale); place_grid > 0 then
    appends `PlaceCodes(place_grid, lm_dim)`, so each image token also says which patch it is.
    """
    if kind == "linear":
        layers = [nn.Linear(image_dim, lm_dim)]
    elif kind == "mlp":
        layers = [nn.Linear(image_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    else:
        raise ValueError(f"projector must be 'linear' or 'mlp', got {kind!r}")
    if not token_norm and not place_grid:
        return layers[0] if kind == "linear" else nn.Sequential(*layers)
    if token_norm:
        layers.append(nn.LayerNorm(lm_dim))
    if place_grid:
        layers.append(PlaceCodes(place_grid, lm_dim))
    return nn.Sequential(*layers)


class VLMBatch(NamedTuple):
    """A collated batch: images (B, 3, H, W), ids (B, T) with N <|image|> per row, labels (B, T) with -100 = unscored."""

    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor


PARTS = ("encoder", "projector", "lm")


class UnifiedVLM(nn.Module):
    """Method A: image tower -> projector -> image tokens spliced at <|image|> -> the unchanged GPT."""

    def __init__(self, config: VLMConfig | None = None, *, encoder: nn.Module | None = None, lm: GPT | None = None):
        super().__init__()
        self.config = config = config or VLMConfig()
        if encoder is None:
            encoder = VisionTransformer(config.vision) if config.encoder == "vit" else PatchEncoder(config.vision.patch_size)
        if lm is None:
            lm = GPT(config.lm)
        if lm.config != config.lm:
            raise ValueError(f"the LM's config {lm.config} differs from VLMConfig.lm {config.lm}")
        self.encoder = encoder  # any module: images (B, 3, H, W) -> (B, N, d_img) or a ViTOutput
        grid = config.vision.image_size // config.vision.patch_size if config.place_codes else 0
        self.projector = make_projector(config.projector, config.image_dim, config.lm.dim,
                                        token_norm=config.token_norm, place_grid=grid)
        self.lm = lm

    @property
    def image_id(self) -> int:
        return self.config.image_id

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # -- which parts train: a flag per part (LLaVA stage 1: projector only; stage 2: projector + LM)

    def set_trainable(self, *, encoder: bool | None = None, projector: bool | None = None, lm: bool | None = None) -> "UnifiedVLM":
        """Freeze or unfreeze whole parts (None leaves a part as it is); returns self."""
        for name, flag in (("encoder", encoder), ("projector", projector), ("lm", lm)):
            if flag is not None:
                getattr(self, name).requires_grad_(flag)
        return self

    def trainable(self) -> dict[str, bool]:
        """Which parts have any trainable parameter (a parameterless Fuyu encoder counts as frozen)."""
        return {name: any(p.requires_grad for p in getattr(self, name).parameters()) for name in PARTS}

    # -- forward

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> image tokens (B, N, lm_dim) in the LM's embedding space."""
        features = self.encoder(images)
        if hasattr(features, "patches"):  # a ViTOutput: keep the per-patch vectors, drop the pooled one
            features = features.patches
        n = self.config.num_image_tokens  # the tower's patches (a subclass may add tokens of its own)
        if features.dim() != 3 or features.shape[1:] != (n, self.config.image_dim):
            raise ValueError(
                f"the image tower returned features of shape {tuple(features.shape)}, "
                f"expected (batch, {n}, {self.config.image_dim})"
            )
        return self.projector(features)  # (batch, num_image_tokens, lm_dim)

    def splice(self, ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, lm_dim) with the image tokens written over the <|image|> positions."""
        embeds = self.lm.embed(ids)  # (batch, T, lm_dim)
        slots = ids == self.image_id  # (batch, T)
        per_row = slots.sum(dim=1)  # (batch,)
        if images is None:
            if checked_on_host(ids) and bool(slots.any()):
                raise ValueError("ids hold <|image|> tokens but no images were given")
            return embeds
        if images.shape[0] != ids.shape[0]:
            raise ValueError(f"got {images.shape[0]} images for {ids.shape[0]} sequences: expected one image per sequence")
        n = self.num_image_tokens
        if checked_on_host(ids) and bool((per_row != n).any()):  # no host-device sync on a GPU
            raise ValueError(
                f"each sequence must hold exactly {n} <|image|> tokens (one per image patch), "
                f"got {per_row.tolist()} per sequence"
            )
        tokens = self.image_tokens(images).to(embeds.dtype)  # (batch, n, lm_dim)
        if tokens.shape[1] != n:  # masked_scatter would take other images' tokens without a word
            raise ValueError(f"the image path gave {tokens.shape[1]} tokens per image, but {n} <|image|> slots hold one")
        # Row by row, slot k takes image token k: masked_scatter fills the True positions in order.
        return embeds.masked_scatter(slots[..., None], tokens)  # (batch, T, lm_dim)

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of the spliced sequence."""
        return self.lm(inputs_embeds=self.splice(ids, images))

    @torch.no_grad()
    def generate(
        self,
        tokenizer: Tokenizer,
        images: torch.Tensor | None,
        prompts: Sequence[str],
        max_new_tokens: int = 8,
        batch_size: int = 256,
    ) -> list[str]:
        """Greedy continuation of `<|image|> x N + prompt` for each (image, prompt); images None = text only.

        Rows are grouped by prompt length, so a batch needs no padding; each group decodes
        with the GPT's KV caches, stopping at <|endoftext|>. Returns the decoded new text, stripped.
        """
        prefix = [self.image_id] * self.num_image_tokens
        return generate_grouped(self, tokenizer, images, prompts, prefix, max_new_tokens, batch_size)

    def _greedy(self, ids: torch.Tensor, images: torch.Tensor | None, steps: int, eot_id: int) -> torch.Tensor:
        caches = self.lm.new_caches()
        with autocast(ids.device):
            logits = self.lm(inputs_embeds=self.splice(ids, images), caches=caches)  # the prompt, once

        def step(new: torch.Tensor) -> torch.Tensor:
            with autocast(ids.device):
                return self.lm(new, caches=caches)  # only the new token: (b, 1, vocab)

        return greedy_decode(logits, step, steps, eot_id)


def greedy_decode(logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], steps: int, eot_id: int) -> torch.Tensor:
    """The greedy loop every VLM shares: (b, new <= steps) token ids, given the prompt's logits (b, T, vocab).

    `step(ids (b, 1))` feeds one new token per row through the model (its KV caches hold the
    rest) and returns its logits (b, 1, vocab). A row that has said <|endoftext|> keeps saying
    it; the loop stops when every row has.
    """
    chosen = []
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(steps):
        next_id = logits[:, -1].argmax(dim=-1)  # (b,)
        next_id = torch.where(finished, torch.full_like(next_id, eot_id), next_id)
        chosen.append(next_id)
        finished |= next_id == eot_id
        if bool(finished.all()) or i == steps - 1:
            break
        logits = step(next_id[:, None])
    return torch.stack(chosen, dim=1)  # (b, new)


def generate_grouped(
    model: nn.Module,
    tokenizer: Tokenizer,
    media: torch.Tensor | None,
    prompts: Sequence[str],
    prefix: list[int],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """`prefix + prompt` continued greedily for each (media item, prompt) by `model._greedy`; media None = text only.

    What every VLM's `generate` does around its own greedy step: prompts are grouped by
    length (a batch then needs no padding), cut into batches, decoded, and each row's text
    is read up to its <|endoftext|>. Without media the prefix is left out.
    """
    if media is not None and len(media) != len(prompts):
        raise ValueError(f"got {len(media)} images for {len(prompts)} prompts: expected one image per prompt")
    context = model.config.lm.context_length
    device = next(model.lm.parameters()).device
    prefix = prefix if media is not None else []
    encoded = [prefix + tokenizer.encode_ordinary(p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    for length, members in sorted(groups.items()):
        if length == 0:
            raise ValueError("an empty prompt without an image has nothing to continue: give a prompt or an image")
        budget = min(max_new_tokens, context - length)
        if budget < 1:
            raise ValueError(f"a prompt of {length} tokens leaves no room in context_length {context}")
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in rows], device=device)  # (b, length)
            items = None if media is None else media[rows].to(device)
            new = model._greedy(ids, items, budget, tokenizer.eot_id)  # (b, <= budget)
            for i, row in zip(rows, new.tolist()):
                row = row[: row.index(tokenizer.eot_id)] if tokenizer.eot_id in row else row
                out[i] = tokenizer.decode(row).strip()
    model.train(was_training)
    return out


def vlm_loss(model: UnifiedVLM, batch: VLMBatch, prior: ColourShapePrior | None = None) -> torch.Tensor:
    """The `loss_fn` for `train`: next-token loss on the scored (answer / caption) tokens only.

    With a `prior` (a `ColourShapePrior`), its bias is added to the logits first: the model and the
    bias expert as a product of experts (stage 2 of a recipe with `colour_shape_prior`).
    """
    logits = model(batch.ids, batch.images)[:, :-1]  # (B, T-1, vocab): position t predicts t + 1
    if prior is not None:
        logits = logits + prior.bias(batch.ids, batch.labels).to(logits.dtype)
    return next_token_loss(logits, batch.labels[:, 1:], ignore_index=IGNORE_INDEX)


class ColourShapePrior:
    """A fixed "bias expert" for stage 2's loss: the training pairs' log p(shape | colour) (a product of experts).

    ShapeWorld's train split shows each colour in four of the five shapes (`ShapeWorldConfig.train_pairs`):
    no training image has a green circle, so a model can lower its loss by learning "green, so not a
    circle" instead of looking. Adding that prior to the logits while training (Clark et al., 2019, the
    "bias product") explains it away: the loss no longer rewards the model for learning it, and at test,
    where the bias is dropped, the model answers from what it sees.

    The row of colour c holds, on each shape word s, log(p(s | c) * number of shapes), with p(s | c) = 1/4
    for c's training shapes and `floor` for its held-out one (+0.22 and -5.3), and 0 on every other token.
    `bias(ids, labels)` gives each scored position that row where the position's token is a colour word (a
    caption's or a grounded answer's "green square"), or where it is the "?" of "what shape is the green
    object?" (the answer's position), and zeros elsewhere. Only counts of the *training* pairs are used.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, config: ShapeWorldConfig | None = None,
                 floor: float = 1e-3):
        if not 0 < floor < 1:
            raise ValueError(f"floor must be a probability in (0, 1), got {floor!r}")
        config = config or ShapeWorldConfig()

        def word(w: str) -> int:
            ids = tokenizer.encode_ordinary(" " + w)
            if len(ids) != 1 or not 0 <= ids[0] < vocab_size:
                raise ValueError(f"the word {w!r} must be one token of a {vocab_size}-token vocabulary, got ids {ids}")
            return ids[0]

        pairs = set(config.train_pairs())
        self.rows = torch.zeros(len(COLOURS) + 1, vocab_size)  # row 0: no bias
        self.row_of = torch.zeros(vocab_size, dtype=torch.long)  # token -> its colour's row (0: not a colour word)
        for row, colour in enumerate(COLOURS, start=1):
            seen = [s for s in SHAPES if (colour, s) in pairs]
            for shape in SHAPES:
                p = 1 / len(seen) if shape in seen else floor
                self.rows[row, word(shape)] = torch.log(torch.tensor(p * len(SHAPES)))
            self.row_of[word(colour)] = row
        self.question_mark, self.object_word = tokenizer.encode_ordinary("?")[0], word("object")

    def keys(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1): the row of `rows` each prediction gets (position t predicts token t + 1; 0: none)."""
        row_of = self.row_of.to(ids.device)
        now, scored = ids[:, :-1], labels[:, 1:] != IGNORE_INDEX
        key = row_of[now]  # a colour word: the next token is biased by its row
        # the answer to "what shape is the <colour> object?": "?" now, "object" before it, the colour before that
        asked = (now[:, 2:] == self.question_mark) & (now[:, 1:-1] == self.object_word)
        key[:, 2:] = torch.where(asked, row_of[now[:, :-2]], key[:, 2:])
        return torch.where(scored, key, torch.zeros_like(key))

    def bias(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1, vocab): the bias to add to the logits of positions 0 .. T-2."""
        return self.rows.to(ids.device)[self.keys(ids, labels)]


# ----------------------------------------------------------------------------------
# Data: prompt + target -> ids and labels


class VLMCollator:
    """Collate ShapeWorld items into a `VLMBatch`: N <|image|>, then prompt, then target + <|endoftext|>, right-padded.

    Items are (image, caption) from `CaptionDataset` (no prompt; the caption is the target)
    or (image, question, answer, skill) from `VQADataset` (target " answer"). No space
    follows the image tokens: a question starts a line in the corpus the tokenizer learned.
    """

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens

    def prefix(self) -> list[int]:
        """The ids before the prompt: <|image|> x N (a subclass may lay the image out otherwise)."""
        return [self.tokenizer.image_id] * self.num_image_tokens

    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one example: labels copy the target ids and <|endoftext|>, -100 elsewhere."""
        tok = self.tokenizer
        head = self.prefix() + tok.encode_ordinary(prompt)
        tail = tok.encode_ordinary(target) + [tok.eot_id]
        return head + tail, [IGNORE_INDEX] * len(head) + tail

    def __call__(self, items: Sequence[tuple]) -> VLMBatch:
        pairs = []
        for item in items:
            if len(item) == 2:  # (image, caption)
                pairs.append(self.encode("", item[1]))
            elif len(item) == 4:  # (image, question, answer, skill)
                pairs.append(self.encode(item[1], " " + item[2]))
            else:
                raise ValueError(f"expected (image, caption) or (image, question, answer, skill) items, got {len(item)} fields")
        longest = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), longest), self.tokenizer.pad_id, dtype=torch.long)  # right padding
        labels = torch.full((len(pairs), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(pairs):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
        images = torch.stack([item[0] for item in items])  # (B, 3, H, W)
        return VLMBatch(images, ids, labels)


# ----------------------------------------------------------------------------------
# Training in two stages (LLaVA): stage 1 aligns the projector on captions, stage 2 tunes projector + LM on QA


@dataclass(frozen=True)
class VLMRecipe:
    """Everything that determines a trained unified VLM: parts, data, both stages' budgets and rates, seed."""

    encoder: Literal["clip", "vit", "patches"] = "clip"  # clip: the book's pretrained tower (chapter 05); vit: random; patches: Fuyu
    projector: Literal["linear", "mlp"] = "mlp"
    caption_pairs: int = 4_000  # stage 1 data: ShapeWorld "train" captions
    qa_pairs: int = 60_000  # stage 2 data: "train" questions, skills equally common, plus the stage-1 captions
    batch_size: int = 32
    stage1_steps: int = 150
    stage1_lr: float = 3e-3  # the projector, from scratch
    stage2_steps: int = 6000
    stage2_lr: float = 2e-3  # the projector (for Fuyu: the only thing that sees pixels)
    stage2_lm_lr: float = 1e-3  # the pretrained LM (and the encoder, if train_encoder): lower, not to forget
    train_encoder: bool = False  # True: stage 2 tunes the tower too, at stage2_lm_lr, as Molmo does; LLaVA and NVLM keep it frozen
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    # The spatial switches (off, as in the shipped recipe: LLaVA's two stages; `train-vlm --spatial-steps`):
    # the LM: "base", chapter 04's GPT, or "qa", the one pretrained with questions in its text (chapter 07's).
    lm: Literal["base", "qa"] = field(default="base", metadata=SWITCH)
    # VLMConfig.token_norm and .place_codes: a LayerNorm, then 2-D place codes, after the projector.
    place_codes: bool = field(default=False, metadata=SWITCH)
    # A stage between 1 and 2 on spatial questions only (qa_pairs in "left of"/"above", qa_pairs with
    # all four words), at stage 2's rates: time for the LM to learn to compare two objects' places.
    spatial_steps: int = field(default=0, metadata=SWITCH)
    # Grounded spatial answers in every stage's questions: "red circle 1 blue square 5 yes" (each
    # object's column or row, then the answer; `shapeworld.questions(grounded=True)`).
    grounded: bool = field(default=False, metadata=SWITCH)
    # Text-only colour and shape questions in stage 2's mix, about scenes described and never drawn, with
    # objects of every (colour, shape) pair (`shapeworld.DescribedQADataset`): the words "green circle" occur,
    # although no image shows one. Off in the shipped recipe: on three seeds it did not lift the unseen
    # pairs (appendix A1, section 6; scripts/text_questions_seeds.py).
    text_questions: int = field(default=0, metadata=SWITCH)
    # A product of experts in stage 2's loss (`ColourShapePrior`): the training data's log p(shape | colour) is
    # added to the logits wherever a shape word follows a colour word or answers "what shape is the green object?",
    # and dropped at test. The bias explains "green is never a circle", so the model need not learn it
    # (chapter 06, section 12; on in the shipped recipe).
    colour_shape_prior: bool = field(default=False, metadata=SWITCH)

    def __post_init__(self) -> None:
        if self.lm not in ("base", "qa"):
            raise ValueError(f"lm must be 'base' or 'qa', got {self.lm!r}")
        for name in ("place_codes", "grounded", "train_encoder", "colour_shape_prior"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, least in (("stage1_steps", 1), ("spatial_steps", 0), ("stage2_steps", 1), ("text_questions", 0)):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < least:
                raise ValueError(f"{name} must be an int >= {least}, got {n!r}")

    @property
    def stages(self) -> tuple[int | str, ...]:
        """The stages `train_vlm` runs, in order: 1, then "spatial" if spatial_steps, then 2."""
        return (1, "spatial", 2) if self.spatial_steps else (1, 2)

    def scene_config(self) -> ShapeWorldConfig:
        return ShapeWorldConfig()

    def train_config(self, stage: int | str, **overrides) -> TrainConfig:
        """The stage's `TrainConfig` (overrides change logging and progress, or the budget for a short run)."""
        check_stage(stage)
        steps = {1: self.stage1_steps, "spatial": self.spatial_steps, 2: self.stage2_steps}[stage]
        lr = self.stage1_lr if stage == 1 else self.stage2_lr
        base = dict(steps=steps, lr=lr, warmup_steps=min(self.warmup_steps, steps), weight_decay=self.weight_decay,
                    record_every=10, log_every=100)
        return TrainConfig(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


STAGES = (1, "spatial", 2)

# The shipped checkpoint's recipe (data/checkpoints/vlm.pt; the command line's "book" preset): LLaVA's
# two stages of VLMRecipe(), plus what chapter 06's section 11 shows spatial questions need: place codes
# on the image tokens, grounded spatial answers, a spatial stage, and the LM tuned at 3e-4; and section 12's
# product of experts against the colour-shape prior of the training pairs.
SHIPPED_CHANGES: dict[str, Any] = dict(place_codes=True, grounded=True, spatial_steps=3000, stage2_lm_lr=3e-4,
                                       colour_shape_prior=True)
SHIPPED_RECIPE = VLMRecipe(**SHIPPED_CHANGES)


def check_stage(stage: Any) -> None:
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def image_tower(kind: str, seed: int = 0) -> tuple[nn.Module | None, ViTConfig]:
    """The recipe's image tower and its ViTConfig: the book's tower (chapter 05), a random ViT, or none (Fuyu)."""
    if kind == "clip":
        from mllm_scratch.clip import pretrained_image_tower

        tower = pretrained_image_tower()
        return tower, tower.config
    config = ViTConfig()
    if kind == "vit":
        torch.manual_seed(seed)
        return VisionTransformer(config), config
    if kind == "patches":
        return None, config
    raise ValueError(f"encoder must be 'clip', 'vit' or 'patches', got {kind!r}")


def build_vlm(recipe: VLMRecipe, tokenizer: Tokenizer | None = None, lm: GPT | None = None,
              tower: VisionTransformer | None = None) -> UnifiedVLM:
    """A fresh VLM for `recipe`: its image tower (or `tower`), a new projector (seeded) and the recipe's pretrained GPT (or `lm`)."""
    from mllm_scratch.gpt import pretrained_gpt

    tokenizer = tokenizer or load_tokenizer()
    if tower is not None and recipe.encoder == "patches":
        raise ValueError("a Fuyu recipe (encoder='patches') has no image tower: leave tower=None")
    tower, vision = (tower, tower.config) if tower is not None else image_tower(recipe.encoder, recipe.seed)
    lm = lm if lm is not None else pretrained_gpt(questions=recipe.lm == "qa")
    config = VLMConfig(
        encoder="patches" if recipe.encoder == "patches" else "vit", vision=vision, lm=lm.config,
        projector=recipe.projector, image_id=tokenizer.image_id,
        token_norm=recipe.place_codes, place_codes=recipe.place_codes,
    )
    torch.manual_seed(recipe.seed)
    return UnifiedVLM(config, encoder=tower, lm=lm)


def param_groups(model: UnifiedVLM, lr: float, pretrained_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: the projector at `lr`, the pretrained parts (LM, encoder) at `pretrained_lr`; frozen ones left out."""
    groups = []
    for name in PARTS:
        rate = lr if name == "projector" else pretrained_lr
        decay, no_decay = [], []
        for p in getattr(model, name).parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
        groups += [{"params": decay, "lr": rate, "weight_decay": weight_decay, "part": name},
                   {"params": no_decay, "lr": rate, "weight_decay": 0.0, "part": name}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters: unfreeze something before training")
    return groups


# Where the canonical spatial questions' scenes start among the train seeds: scenes of their own.
CANONICAL_OFFSET = 1_000_000
# Where stage 2's described scenes (text_questions) start among the train seeds.
DESCRIBED_OFFSET = 2_000_000


def spatial_datasets(recipe: VLMRecipe) -> list[VQADataset]:
    """The spatial stage's data: qa_pairs questions in "left of"/"above" only, then qa_pairs with all four words.

    With only the canonical words, "yes" follows from one object's place; the four words' mix
    ("right of" is "left of" reversed) needs the comparison itself. Chapter 07's spatial stage is the same.
    """
    return spatial_question_sets(recipe.qa_pairs, recipe.scene_config(), grounded=recipe.grounded)


def spatial_question_sets(n: int, config: ShapeWorldConfig, offset: int = CANONICAL_OFFSET,
                          grounded: bool = False) -> list[VQADataset]:
    """[n "train" spatial questions in "left of"/"above" only, on scenes from train seed `offset` on; n with all
    four words]: the spatial stage's data, for chapter 06's recipe and chapter 07's (`xattn_datasets`) alike.
    grounded: answers that say where both objects are first (`shapeworld.questions`)."""
    return [VQADataset("train", n, config, skills=("spatial",), cache=True, spatial_words=CANONICAL_WORDS, offset=offset,
                       grounded=grounded),
            VQADataset("train", n, config, skills=("spatial",), cache=True, grounded=grounded)]


def stage_data(recipe: VLMRecipe, stage: int | str, tokenizer: Tokenizer, num_image_tokens: int, device=None, *,
               micro_batches: int = 1, shard: tuple[int, int] | None = None):
    """The stage's endless batch stream: captions for stage 1, spatial questions for "spatial", questions and those captions for stage 2.

    `recipe.batch_size` is the global batch; `micro_batches` and `shard` cut it as `batches` does.
    """
    check_stage(stage)
    captions = CaptionDataset("train", recipe.caption_pairs, recipe.scene_config(), cache=True)
    if stage == 1:
        data = captions
    elif stage == "spatial":  # "left of"/"above" questions on scenes of their own, then all four words
        data = ConcatDataset(spatial_datasets(recipe))
    else:  # questions, plus the captions again so the model keeps captioning (LLaVA's stage-2 mix)
        qa = VQADataset("train", recipe.qa_pairs, recipe.scene_config(), cache=True, grounded=recipe.grounded)
        data = [qa, captions]
        if recipe.text_questions:  # described scenes of their own, past the image datasets' train seeds
            data.append(DescribedQADataset("train", recipe.text_questions, recipe.scene_config(), cache=True,
                                           offset=DESCRIBED_OFFSET))
        data = ConcatDataset(data)
    collate = VLMCollator(tokenizer, num_image_tokens)
    seed = recipe.seed + (stage if isinstance(stage, int) else 0)
    return batches(data, recipe.batch_size, seed=seed, collate_fn=collate, device=device,
                   micro_batches=micro_batches, shard=shard)


def train_stage(
    model: UnifiedVLM,
    recipe: VLMRecipe,
    stage: int | str,
    tokenizer: Tokenizer | None = None,
    *,
    steps: int | None = None,
    data: Iterable[VLMBatch] | None = None,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    grad_accum_steps: int = 1,
    parallel: Any = None,
) -> History:
    """Stage 1: projector only, on captions. Stage 2: projector + LM (+ tower if recipe.train_encoder; lower rate), on QA.

    Stage "spatial" (recipe.spatial_steps > 0; between 1 and 2) trains what stage 2 trains, at its rates,
    on spatial questions only (`spatial_datasets`).

    `steps` shortens a run; `data`, a stream of batches, replaces the stage's own (`stage_data`)
    for an experiment on other data with the same parts, rates and schedule. `checkpoint` and
    `resume` are `train`'s: the stage saves its state there and can continue from it.
    `grad_accum_steps` and `parallel` (a `distributed.Parallel`) split each global batch of
    `recipe.batch_size` into micro-batches and over the ranks, as `train` and `batches` do.
    """
    check_stage(stage)
    if stage == "spatial" and steps is None and recipe.spatial_steps == 0:
        raise ValueError("the recipe has spatial_steps=0, so it has no spatial stage: set spatial_steps, or pass steps=")
    tokenizer = tokenizer or load_tokenizer()
    if stage == 1:
        model.set_trainable(encoder=False, projector=True, lm=False)
        groups = param_groups(model, recipe.stage1_lr, recipe.stage1_lr, recipe.weight_decay)
    else:
        model.set_trainable(encoder=recipe.train_encoder, projector=True, lm=True)
        groups = param_groups(model, recipe.stage2_lr, recipe.stage2_lm_lr, recipe.weight_decay)
    loss_fn = vlm_loss
    if stage == 2 and recipe.colour_shape_prior:  # the product of experts, in stage 2 only; dropped at test
        prior = ColourShapePrior(tokenizer, model.lm.config.vocab_size, recipe.scene_config())
        loss_fn = lambda m, b: vlm_loss(m, b, prior)  # noqa: E731
    history = run_stage(model, recipe, stage, groups, loss_fn, model.num_image_tokens, tokenizer,
                        steps=steps, data=data, log_every=log_every, progress=progress, device=device,
                        checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
                        grad_accum_steps=grad_accum_steps, parallel=parallel)
    model.set_trainable(encoder=False, projector=False, lm=False)
    return history


def run_stage(
    model: nn.Module,
    recipe: VLMRecipe,
    stage: int | str,
    groups: list[dict],
    loss_fn: Callable[[nn.Module, VLMBatch], torch.Tensor],
    num_image_tokens: int,
    tokenizer: Tokenizer,
    *,
    steps: int | None = None,
    data: Iterable[VLMBatch] | None = None,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    grad_accum_steps: int = 1,
    parallel: Any = None,
) -> History:
    """One stage's run, once the caller has chosen what trains (`groups`): the stage's data, schedule and AdamW.

    Chapter 06's `train_stage` and chapter 08's `train_method` both end here, so every method
    sees the same batches in the same order. `data` replaces the stage's own batch stream.
    """
    config = recipe.train_config(stage, **run_overrides(log_every, progress, steps, recipe.warmup_steps),
                                 checkpoint_every=checkpoint_every, grad_accum_steps=grad_accum_steps)
    dev = torch.device(device) if device is not None else None
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    if data is None:
        shard = parallel.shard if parallel is not None else None
        data = stage_data(recipe, stage, tokenizer, num_image_tokens, dev, micro_batches=grad_accum_steps, shard=shard)
    run = {"recipe": recipe.to_dict(), "stage": stage} if checkpoint is not None else None
    return train(model, data, loss_fn, config, optimizer=optimizer, device=device, batch_size_of=lambda b: b.ids.shape[0],
                 checkpoint=checkpoint, resume=resume, run=run, parallel=parallel)


def train_vlm(
    recipe: VLMRecipe | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[UnifiedVLM, dict[str, History]]:
    """Build the recipe's VLM and train its stages; returns the model (eval mode) and each stage's History ("stage1", "spatial", "stage2")."""
    recipe = recipe or VLMRecipe()
    tokenizer = tokenizer or load_tokenizer()
    model = build_vlm(recipe, tokenizer)
    histories = {}
    for stage in recipe.stages:
        histories[f"stage{stage}" if isinstance(stage, int) else stage] = train_stage(model, recipe, stage, tokenizer, log_every=log_every,
                                                 progress=progress, device=device)
    return model.eval(), histories


# ----------------------------------------------------------------------------------
# Evaluation: exact-match answers by skill, captions by attribute, with and without the image

_OBJECT = re.compile(r"(small|large) (\w+) (\w+)")
_TEXT = re.compile(r"the text says (\w+)")


def _images_for(mode: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    if mode == "image":
        return images
    if mode == "none":
        return None
    if mode == "shuffled":  # every question gets another scene's image: a derangement by rolling a permutation
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        return images[perm.roll(1)][torch.argsort(perm)]
    raise ValueError(f"image mode must be 'image', 'none' or 'shuffled', got {mode!r}")


def stack_dataset(dataset) -> tuple[torch.Tensor, list[tuple]]:
    """All items of a ShapeWorld dataset: images stacked (N, 3, H, W) and the rest of each item."""
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it[0] for it in items]), [tuple(it[1:]) for it in items]


# Tokens a reply may take: the longest grounded answer ("purple diamond 6 yellow triangle 2 yes") is 7, and <|endoftext|>.
ANSWER_TOKENS = 10


@torch.no_grad()
def vqa_accuracy(model: UnifiedVLM, tokenizer: Tokenizer, dataset: VQADataset, mode: str = "image") -> dict[str, float]:
    """Exact-match answer accuracy per skill and overall ('all'); mode 'image', 'none' (text only) or 'shuffled'.

    A grounded spatial reply ("red circle 1 blue square 5 yes") is scored by its final yes/no
    (`final_answer`), against the dataset's answer in either form; `grounding_accuracy` scores the places.
    """
    images, rest = stack_dataset(dataset)
    questions = [r[0] for r in rest]
    predicted = model.generate(tokenizer, _images_for(mode, images), questions, max_new_tokens=ANSWER_TOKENS)
    correct: dict[str, list[bool]] = {}
    for (question, answer, skill), guess in zip(rest, predicted):
        correct.setdefault(skill, []).append(final_answer(guess) == final_answer(answer))
    out = {skill: sum(v) / len(v) for skill, v in correct.items()}
    out["all"] = sum(sum(v) for v in correct.values()) / len(predicted)
    return out


def parse_caption(text: str) -> tuple[list[tuple[str, str, str]], str | None]:
    """A caption's objects as (size, colour, shape), left to right, and its text (or None)."""
    match = _TEXT.search(text)
    return _OBJECT.findall(text), match.group(1) if match else None


def caption_scores(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Exact match, and per attribute: object count, and size / colour / shape of the i-th object, and the text."""
    hits = {"exact": 0, "count": 0, "size": 0, "colour": 0, "shape": 0, "text": 0}
    objects = texts = 0
    for pred, true in zip(predicted, truth):
        (p_objs, p_text), (t_objs, t_text) = parse_caption(pred), parse_caption(true)
        hits["exact"] += pred == true
        hits["count"] += len(p_objs) == len(t_objs)
        for i, (size, colour, shape) in enumerate(t_objs):
            guess = p_objs[i] if i < len(p_objs) else ("", "", "")
            hits["size"] += guess[0] == size
            hits["colour"] += guess[1] == colour
            hits["shape"] += guess[2] == shape
        objects += len(t_objs)
        if t_text is not None:
            texts += 1
            hits["text"] += p_text == t_text
    n = len(truth)
    return {"exact": hits["exact"] / n, "count": hits["count"] / n, "size": hits["size"] / objects,
            "colour": hits["colour"] / objects, "shape": hits["shape"] / objects,
            "text": hits["text"] / texts if texts else float("nan")}


@torch.no_grad()
def caption_accuracy(model: UnifiedVLM, tokenizer: Tokenizer, dataset: CaptionDataset, mode: str = "image") -> dict[str, float]:
    """`caption_scores` of the model's greedy captions of a CaptionDataset."""
    images, rest = stack_dataset(dataset)
    predicted = model.generate(tokenizer, _images_for(mode, images), [""] * len(rest) if mode != "none" else ["a"] * len(rest),
                               max_new_tokens=32)
    if mode == "none":  # a text-only LM needs a first token to continue from: we give it the caption's first word
        predicted = ["a " + p for p in predicted]
    return caption_scores(predicted, [r[0] for r in rest])


# ----------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_NAME = "vlm"
@torch.no_grad()
def grounding_accuracy(model: UnifiedVLM, tokenizer: Tokenizer, dataset: VQADataset) -> dict[str, float]:
    """For a grounded dataset's spatial questions: how often the reply names both places right, each place
    ("first", "second"), places swapped between the two objects, and the final yes/no."""
    if not getattr(dataset, "grounded", False) or "spatial" not in dataset.skills:
        raise ValueError("grounding_accuracy needs a VQADataset with grounded=True that asks spatial questions")
    images, rest = stack_dataset(dataset)
    keep = [i for i, r in enumerate(rest) if r[2] == "spatial"]
    said = model.generate(tokenizer, images[keep], [rest[i][0] for i in keep], max_new_tokens=ANSWER_TOKENS)
    hits = {"both": 0, "first": 0, "second": 0, "swapped": 0, "answer": 0}
    for i, guess in zip(keep, said):
        truth, reply = rest[i][1].split(), guess.split() + [""] * 7
        hits["first"] += reply[2] == truth[2]
        hits["second"] += reply[5] == truth[5]
        hits["both"] += reply[2] == truth[2] and reply[5] == truth[5]
        hits["swapped"] += truth[2] != truth[5] and reply[2] == truth[5] and reply[5] == truth[2]
        hits["answer"] += final_answer(guess) == truth[-1]
    return {k: v / len(keep) for k, v in hits.items()}


EVAL_QUESTIONS_PER_SKILL = 1000  # the manifest's test and compositional scores: 1,000 questions per skill
DEFAULT_CHECKPOINT = DEFAULT_DIR / f"{CHECKPOINT_NAME}.pt"


def save_vlm(path: str | Path, model: UnifiedVLM, *, recipe: dict | None = None, metrics: dict | None = None,
             name: str = CHECKPOINT_NAME, tokenizer: Tokenizer | None = None, dtype: torch.dtype = torch.float32,
             loader: str = "mllm_scratch.vlm.load_vlm", extra: dict | None = None) -> dict:
    """Save a VLM (state dict + VLMConfig) and its manifest atomically; returns the manifest.

    `loader` names the function that loads the file (chapter 12's chat model has its own), and
    `extra` adds manifest fields of the caller's.

    The manifest records the sha256 of the tokenizer the model was trained with (default:
    the shipped one): token ids mean nothing without it, and `load_vlm` refuses a mismatch.
    `dtype` float16 halves the file (the book's shipped one is stored so; see `round_to_dtype`).
    An image tower equal to the shipped one (kept frozen) is not stored again: the manifest
    records its checksum, and `load_vlm` takes it from the tower's own checkpoint.
    """
    from mllm_scratch.clip import tower_reference

    if type(model) is not UnifiedVLM:  # a subclass has parts or a layout VLMConfig does not record
        raise ValueError(f"save_vlm saves a UnifiedVLM, got a {type(model).__name__}: load_vlm could not rebuild it "
                         "from its VLMConfig")
    reference = tower_reference(model.encoder, dtype)  # the shipped tower, frozen: its checksum, not its weights
    stored = nn.ModuleDict({"projector": model.projector, "lm": model.lm}) if reference else model
    return save_checkpoint(path, stored, model.config.to_dict(), name=name, recipe=recipe, metrics=metrics, dtype=dtype,
                           extra={"tokenizer_sha256": tokenizer_sha256(tokenizer), **reference, **(extra or {}),
                                  "loader": loader})


def load_vlm(path: str | Path | None = None) -> UnifiedVLM:
    """Load a VLM saved by `save_vlm` (default: the shipped one), verified before it is built; eval mode, CPU.

    Goes through `checkpoints.load_verified`, like `pretrained_gpt` and `pretrained_clip`: the
    file's sha256 and config against its manifest, the tokenizer it was trained with, and for
    the shipped file the recipe (a changed `VLMRecipe()` means a stale checkpoint). Raises
    CheckpointError naming the file and the command that rebuilds it.
    """
    from mllm_scratch.checkpoints import read_manifest

    own = path is not None and Path(path).resolve() != DEFAULT_CHECKPOINT.resolve()
    # A checkpoint of the reader's own comes from the command line, not from the book's build script.
    book_rebuild = f"{rebuild_command(CHECKPOINT_NAME)} --out {Path(path).parent}" if own else ""
    own_rebuild = f"python -m mllm_scratch train-vlm --out {path}" if own else ""
    try:
        saved, state_dict, path, rebuild = load_verified(
            CHECKPOINT_NAME, path, DEFAULT_CHECKPOINT, expected_config=None,
            recipe=SHIPPED_RECIPE.to_dict(), recipe_owner="SHIPPED_RECIPE in mllm_scratch/vlm.py",
            tokenizer_sha256=tokenizer_sha256(),
        )
    except CheckpointError as err:
        if not own:
            raise
        raise CheckpointError(str(err).replace(book_rebuild, own_rebuild)) from None
    rebuild = own_rebuild or rebuild
    return unified_from_checkpoint(saved, state_dict, path, rebuild, read_manifest(path, rebuild))


def unified_from_checkpoint(saved: dict, state_dict: dict, path: Path, rebuild: str, manifest: dict) -> UnifiedVLM:
    """The `UnifiedVLM` a verified checkpoint holds (`load_vlm`'s and `chat.load_chat_vlm`'s last step): its
    VLMConfig, the referenced tower put back, the weights loaded strictly; frozen, eval mode."""
    from mllm_scratch.clip import with_referenced_tower

    state_dict = with_referenced_tower(state_dict, manifest, path, rebuild)
    try:
        config = VLMConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid VLMConfig ({err}); rebuild it with: {rebuild}") from None
    model = UnifiedVLM(config)
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.set_trainable(encoder=False, projector=False, lm=False).eval()


def loss_curve(history: History, every: int = 100) -> list[list[float]]:
    """[[step, loss], ...] every `every` steps (the loss averaged over the record_every steps before it): what manifests keep."""
    return [[s, round(v, 4)] for s, v in zip(history.steps, history.loss) if s % every == 0]


def build_checkpoint(out: Path) -> dict:
    """Train `SHIPPED_RECIPE` and save it as out/vlm.pt + out/vlm.json (what `build_checkpoints.py vlm` calls)."""
    recipe = SHIPPED_RECIPE
    tokenizer = load_tokenizer()
    model, histories = train_vlm(recipe, tokenizer, log_every=100, progress=False, device="cpu")
    round_to_dtype(model, STORED_DTYPE)  # score the weights the float16 file will hold
    metrics: dict[str, Any] = {f"{k}_loss": round(h.loss[-1], 4) for k, h in histories.items()}
    metrics["train_seconds"] = round(sum(h.seconds for h in histories.values()), 1)
    if "spatial" in histories:  # the spatial stage's learning curve: flat at the coin flip, then a drop
        metrics["spatial_loss_curve"] = loss_curve(histories["spatial"])
    metrics["vqa_questions_per_skill"] = EVAL_QUESTIONS_PER_SKILL
    for split in ("test", "compositional"):
        data = VQADataset(split, EVAL_QUESTIONS_PER_SKILL * len(SKILLS), recipe.scene_config())  # skills take turns
        acc = vqa_accuracy(model, tokenizer, data)
        metrics[f"{split}_vqa"] = {k: round(v, 4) for k, v in acc.items()}
        print(f"vlm: {split} VQA " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        if recipe.grounded:  # where the model says the two objects are, on 1,000 spatial questions of the split
            spatial = VQADataset(split, EVAL_QUESTIONS_PER_SKILL, recipe.scene_config(), skills=("spatial",), grounded=True)
            metrics[f"{split}_grounding"] = {k: round(v, 4) for k, v in grounding_accuracy(model, tokenizer, spatial).items()}
            print(f"vlm: {split} grounding " + ", ".join(f"{k} {v:.3f}" for k, v in metrics[f"{split}_grounding"].items()))
    return save_vlm(Path(out) / f"{CHECKPOINT_NAME}.pt", model, recipe=recipe.to_dict(), metrics=metrics, dtype=STORED_DTYPE)


__all__ = [
    "ANSWER_TOKENS",
    "DEFAULT_CHECKPOINT",
    "SHIPPED_RECIPE",
    "IGNORE_INDEX",
    "PatchEncoder",
    "PlaceCodes",
    "UnifiedVLM",
    "VLMBatch",
    "VLMCollator",
    "VLMConfig",
    "VLMRecipe",
    "build_checkpoint",
    "build_vlm",
    "caption_accuracy",
    "caption_scores",
    "grounding_accuracy",
    "image_tower",
    "load_vlm",
    "loss_curve",
    "make_projector",
    "param_groups",
    "parse_caption",
    "save_vlm",
    "spatial_datasets",
    "spatial_question_sets",
    "stage_data",
    "train_stage",
    "train_vlm",
    "vlm_loss",
    "vqa_accuracy",
]
