"""Drawing with a language model: image codes as words (Emu3), and a second encoder for reading (Janus).

Chapter 13. The VQ-VAE (`vq.py`) turns a scene into 4 x 4 codes. Here chapter 04's GPT gets
`codebook_size` new words, one per code, and two markers, <boi> and <eoi>, around an image.
Every sequence has the same layout, so code (r, c) of the grid always sits at the same
position (the job Emu3's RoPE and line-break tokens do at scale):

    [caption, left-padded to CAPTION_SLOT tokens] <boi> 16 codes <eoi> [question answer <eot>]

- Drawing (caption -> image): the loss is on the codes and <eoi>; the drawing is sampled
  code by code, only from the code words, and decoded by the VQ-VAE.
- Reading (image -> answer): the caption slot is empty (all padding), the image sits in its
  place, and the loss is on the answer, as in chapter 06.

Two ways to give the model the image it reads:
- "emu3": the same 16 codes it draws with (one tokenizer for both directions);
- "janus": the book's image tower (chapter 05's CLIP ViT, frozen) through an MLP projector,
  spliced over 16 <|image|> slots as in chapter 06 (its 8 x 8 patch vectors averaged 2 x 2,
  so it reads as many tokens as the codes); drawing still goes through the codes.
  Janus decouples the two encoders because what helps reading (semantic features) and
  what helps drawing (codes that rebuild pixels) differ.

Classifier-free guidance: in training the caption is dropped (the slot left empty) for
`cfg_drop` of the drawings, so the same model also learns to draw without a caption; at
sampling time logits = unconditional + scale * (conditional - unconditional).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.gpt import GPT, GPTConfig, next_token_loss, pretrained_gpt, sample_next, tokenizer_sha256
from mllm_scratch.judge import Spec
from mllm_scratch.shapeworld import (
    COLOURS, SHAPES, SIZES, Rng, caption, questions, relations, words,
)
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, batches, train
from mllm_scratch.vq import SCENES, VQVAE, scene_images

CAPTION_SLOT = 16  # tokens; the longest drawing caption is 15
QA_SLOT = 16  # question + answer + <eot>
TOWER_TOKENS = 16  # janus reads the tower's 8 x 8 patch vectors averaged 2 x 2: as many tokens as the codes
METHODS = ("emu3", "janus")
ORDERS = ("raster", "column")
READ_SKILLS = ("colour", "shape", "count", "spatial", "existence")
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "data" / "checkpoints"
# Every word a drawing caption may use: what the model was taught to draw from.
VOCABULARY = frozenset(COLOURS) | frozenset(SHAPES) | frozenset(SIZES) | {
    "a", "an", "and", "left", "right", "of", "above", "below", ",", "."}


# ----------------------------------------------------------------------------------
# Captions to draw from


def draw_caption(scene, rng: Rng | random.Random | int) -> tuple[str, Spec]:
    """A caption for a scene and what it asks for: the left-to-right listing (`shapeworld.caption`),
    or for two objects, half the time one relation that clearly holds ("a small red circle left of
    a large blue square.")."""
    rng = rng if isinstance(rng, Rng) else Rng(rng)
    objs = scene.objects
    if len(objs) == 2 and rng.random() < 0.5:
        a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        rel = rng.choice(relations(a, b))
        text = f"a {a.size} {a.colour} {a.shape} {rel} a {b.size} {b.colour} {b.shape}."
        return text, Spec((a, b), rel)
    return caption(scene), Spec.of(scene)


def check_prompt(text: str) -> str:
    """A drawing caption, lowercased and with a final full stop; refuses words the model never drew from."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"caption {text!r} is empty: expected e.g. 'a small red circle left of a large blue square.'")
    text = " ".join(text.lower().split())
    if not text.endswith("."):
        text += "."
    unknown = sorted(words(text) - VOCABULARY)
    if unknown:
        raise ValueError(
            f"caption {text!r} uses {', '.join(repr(w) for w in unknown)}, which the drawing model never saw: "
            f"expected sizes {SIZES}, colours {COLOURS}, shapes {SHAPES}, 'and', ',' and the relations "
            "'left of', 'right of', 'above', 'below'")
    return text


# ----------------------------------------------------------------------------------
# Vocabulary and sequence layout


@dataclass(frozen=True)
class Layout:
    """Where the image words go: text ids first, then one id per code, then <boi> and <eoi>."""

    text_vocab: int = 512
    codebook_size: int = 256
    order: str = "raster"  # the order the codes are written in: "raster" (row by row) or "column" (column by column)
    grid: int = 4  # codes per side of an image
    read_tokens: int = 0  # tokens a reading row holds in the image's place (0: the codes, grid * grid)

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r} is unknown: expected one of {ORDERS}")
        if self.grid < 1 or self.read_tokens < 0:
            raise ValueError(f"grid {self.grid} and read_tokens {self.read_tokens}: expected a grid of 1 or more, "
                             "read_tokens 0 (the codes) or more")

    @property
    def num_codes(self) -> int:
        return self.grid * self.grid

    @property
    def image_tokens(self) -> int:
        """How many tokens stand for the image in a reading row."""
        return self.read_tokens or self.num_codes

    @property
    def code_offset(self) -> int:
        return self.text_vocab

    @property
    def boi(self) -> int:
        return self.text_vocab + self.codebook_size

    @property
    def eoi(self) -> int:
        return self.boi + 1

    @property
    def vocab_size(self) -> int:
        return self.eoi + 1

    @property
    def image_start(self) -> int:
        """Position of the first code (after the caption slot and <boi>)."""
        return CAPTION_SLOT + 1

    @property
    def length(self) -> int:
        return CAPTION_SLOT + 2 + max(self.num_codes, self.image_tokens) + QA_SLOT

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, grid, grid) -> ids (B, grid * grid), row by row (or column by column)."""
        g = self.grid
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"codes must have shape (batch, {g}, {g}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in 0..{self.codebook_size - 1}, got {int(codes.min())}..{int(codes.max())}")
        if self.order == "column":
            codes = codes.transpose(1, 2)
        return codes.flatten(1).long() + self.code_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, grid * grid) of code words -> codes (B, grid, grid); refuses any id that is not a code."""
        if ids.dim() != 2 or ids.shape[1] != self.num_codes:
            raise ValueError(f"ids must have shape (batch, {self.num_codes}), got {tuple(ids.shape)}")
        codes = ids.long() - self.code_offset
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bool(bad.any()):
            raise ValueError(f"id {int(ids[bad][0])} is not an image code: expected ids "
                             f"{self.code_offset}..{self.code_offset + self.codebook_size - 1}")
        codes = codes.reshape(-1, self.grid, self.grid)
        return codes.transpose(1, 2) if self.order == "column" else codes


def caption_slot(tokenizer: Tokenizer, text: str | None) -> list[int]:
    """The caption's ids, left-padded to CAPTION_SLOT (None: an empty slot, the unconditional prompt)."""
    ids = [] if text is None else tokenizer.encode(text)
    if len(ids) > CAPTION_SLOT:
        raise ValueError(f"caption {text!r} is {len(ids)} tokens: expected at most {CAPTION_SLOT}")
    return [tokenizer.pad_id] * (CAPTION_SLOT - len(ids)) + ids


def drawing_row(layout: Layout, tokenizer: Tokenizer, text: str | None, codes: torch.Tensor) -> tuple[list[int], list[int]]:
    """(ids, targets) of one drawing: targets are the codes and <eoi>; padded to layout.length."""
    image = layout.codes_to_ids(codes[None])[0].tolist()
    ids = caption_slot(tokenizer, text) + [layout.boi] + image + [layout.eoi]
    targets = [-100] * (CAPTION_SLOT + 1) + image + [layout.eoi]
    pad = layout.length - len(ids)
    # targets are next tokens: targets[t] is the token after ids[t]
    return ids + [tokenizer.pad_id] * pad, (targets[1:] + [-100]) + [-100] * pad


def reading_row(layout: Layout, tokenizer: Tokenizer, image: list[int], question: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, targets) of one question: empty caption slot, the image's ids, the question; targets on the answer."""
    q, a = tokenizer.encode(question), tokenizer.encode(" " + answer) + [tokenizer.eot_id]
    if len(q) + len(a) > QA_SLOT:
        raise ValueError(f"question {question!r} and answer {answer!r} are {len(q) + len(a)} tokens: expected at most {QA_SLOT}")
    ids = caption_slot(tokenizer, None) + [layout.boi] + image + [layout.eoi] + q + a
    targets = [-100] * (len(ids) - len(a)) + a
    pad = layout.length - len(ids)
    return ids + [tokenizer.pad_id] * pad, (targets[1:] + [-100]) + [-100] * pad


# ----------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class DrawConfig:
    method: str = "emu3"
    codebook_size: int = 256
    lm: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=512 + 256 + 2))
    image_dim: int = 48  # the tower's patch vectors (janus)
    order: str = "raster"  # the order the codes are written in (Layout.order)
    grid: int = 4  # codes per side (the VQ-VAE's grid)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown: expected one of {METHODS}")
        layout = self.layout
        if layout.length > self.lm.context_length:
            raise ValueError(f"a sequence is {layout.length} tokens: the GPT's context_length {self.lm.context_length} is too short")

    @property
    def layout(self) -> Layout:
        return Layout(self.lm.vocab_size - self.codebook_size - 2, self.codebook_size, self.order, self.grid,
                      TOWER_TOKENS if self.method == "janus" else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "codebook_size": self.codebook_size, "lm": self.lm.to_dict(),
                "image_dim": self.image_dim, "order": self.order, "grid": self.grid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrawConfig":
        return cls(d["method"], d["codebook_size"], GPTConfig(**d["lm"]), d["image_dim"], d["order"], d["grid"])


class DrawingLM(nn.Module):
    """One GPT that reads and draws image codes; with method "janus", it reads through the image tower instead."""

    def __init__(self, config: DrawConfig | None = None, *, lm: GPT | None = None, tower: nn.Module | None = None):
        super().__init__()
        self.config = config = config or DrawConfig()
        self.lm = lm or GPT(config.lm)
        if self.lm.config != config.lm:
            raise ValueError(f"the LM's config {self.lm.config} differs from DrawConfig.lm {config.lm}")
        self.layout = config.layout
        if config.method == "janus":
            if tower is None:
                raise ValueError("method 'janus' reads through an image tower: pass tower= (e.g. pretrained_image_tower())")
            self.tower = tower.eval().requires_grad_(False)
            d = config.lm.dim
            self.projector = nn.Sequential(nn.Linear(config.image_dim, d), nn.GELU(), nn.Linear(d, d))

    def train(self, mode: bool = True) -> "DrawingLM":
        super().train(mode)
        if self.config.method == "janus":
            self.tower.eval()  # frozen: no dropout, no statistics
        return self

    def embeddings(self, ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; for janus, the projected tower features written over the <|image|> slots of reading rows."""
        x = self.lm.embed(ids)
        if self.config.method != "janus" or images is None:
            return x
        rows = (ids == load_tokenizer().image_id).any(dim=1)  # reading rows hold <|image|> slots
        if bool(rows.any()):
            features = pool_patches(self.tower(images[rows]).patches, self.layout.image_tokens)  # (R, 16, image_dim)
            x = x.clone()
            start = self.layout.image_start
            x[rows, start : start + self.layout.image_tokens] = self.projector(features).to(x.dtype)
        return x

    def forward(self, ids: torch.Tensor, images: torch.Tensor | None = None, caches=None) -> torch.Tensor:
        return self.lm(inputs_embeds=self.embeddings(ids, images), caches=caches)


def pool_patches(patches: torch.Tensor, tokens: int) -> torch.Tensor:
    """Average a square grid of patch vectors (B, N, D) down to `tokens` (a square number) -> (B, tokens, D)."""
    b, n, d = patches.shape
    side, out = round(n ** 0.5), round(tokens ** 0.5)
    if side * side != n or out * out != tokens or side % out:
        raise ValueError(f"cannot pool {n} patches to {tokens} tokens: expected two square numbers, the first a "
                         "multiple of the second per side")
    grid = patches.transpose(1, 2).reshape(b, d, side, side)  # (B, D, side, side)
    return F.avg_pool2d(grid, side // out).flatten(2).transpose(1, 2)  # (B, tokens, D)


def extended_gpt(codebook_size: int, base: GPT | None = None) -> GPT:
    """Chapter 04's GPT with codebook_size + 2 new words (codes, <boi>, <eoi>); the text rows are unchanged."""
    base = base or pretrained_gpt()
    config = replace(base.config, vocab_size=base.config.vocab_size + codebook_size + 2)
    model = GPT(config)
    state = base.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in ("tok_emb.weight", "head.weight"):
                tensor[: base.config.vocab_size] = state[name]
            else:
                tensor.copy_(state[name])
    return model


# ----------------------------------------------------------------------------------
# Data


def reading_image_ids(layout: Layout, method: str, codes: torch.Tensor) -> list[int]:
    """The ids a reading row holds in the image's place: the codes (emu3) or 16 <|image|> slots the tower fills (janus)."""
    return layout.codes_to_ids(codes[None])[0].tolist() if method == "emu3" else [load_tokenizer().image_id] * layout.image_tokens


def make_rows(method: str, layout: Layout, tokenizer: Tokenizer, scenes: Sequence, codes: torch.Tensor, *,
              seed: int, cfg_drop: float = 0.0, task: str = "both", read_every: int = 1) -> dict[str, Any]:
    """Training rows from scenes and their codes: a drawing (task "draw"), a question ("read") or one of each ("both").

    With task "both", only every read_every-th scene gives a question as well (1: every scene).

    Returns {"ids", "targets" (N, L) long, "index" (N,) scene index, "specs" (drawings), "qas" (questions)}.
    """
    rng = Rng(seed)
    ids, targets, index, specs, qas = [], [], [], [], []
    for i, scene in enumerate(scenes):
        if task in ("draw", "both"):
            text, spec = draw_caption(scene, rng)
            row = drawing_row(layout, tokenizer, None if rng.random() < cfg_drop else text, codes[i])
            ids.append(row[0]), targets.append(row[1]), index.append(i), specs.append(spec)
        if task == "read" or (task == "both" and i % read_every == 0):
            qa = rng.choice(questions(scene, rng, READ_SKILLS, SCENES))
            row = reading_row(layout, tokenizer, reading_image_ids(layout, method, codes[i]), qa.question, qa.answer)
            ids.append(row[0]), targets.append(row[1]), index.append(i), qas.append(qa)
    return {"ids": torch.tensor(ids), "targets": torch.tensor(targets), "index": torch.tensor(index),
            "specs": specs, "qas": qas}


def drawing_loss(model: DrawingLM, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, targets, images = batch
    return next_token_loss(model(ids, images), targets)


# ----------------------------------------------------------------------------------
# Drawing


@torch.no_grad()
def draw_codes(model: DrawingLM, captions: Sequence[str | None], *, guidance: float = 1.0, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None, tokenizer: Tokenizer | None = None,
               batch_size: int = 250) -> torch.Tensor:
    """Sample the codes of one drawing per caption (None: unconditional) -> (B, grid, grid).

    Only code words can be sampled. guidance 1 is plain conditional sampling; above 1,
    classifier-free guidance pushes each step's logits away from the unconditional model's.
    temperature 0 is greedy.
    """
    if guidance < 0:
        raise ValueError(f"guidance {guidance} is invalid: expected 0 or more (1 = no guidance)")
    tokenizer = tokenizer or load_tokenizer()
    layout = model.layout
    model.eval()
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        prompt = torch.tensor([caption_slot(tokenizer, c) + [layout.boi] for c in chunk])
        guided = guidance != 1.0
        if guided:  # conditional rows, then the same number of unconditional rows
            prompt = torch.cat([prompt, torch.tensor([caption_slot(tokenizer, None) + [layout.boi]] * len(chunk))])
        caches = model.lm.new_caches()
        logits = model(prompt, caches=caches)[:, -1]
        codes = []
        for step in range(layout.num_codes):
            logits = logits[:, layout.code_offset : layout.code_offset + layout.codebook_size].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            nxt = sample_next(logits, temperature, top_k, generator)  # chapter 04's sampler, over the codes only
            codes.append(nxt)
            if step + 1 < layout.num_codes:
                token = (nxt + layout.code_offset)[:, None]
                logits = model(token.repeat(2, 1) if guided else token, caches=caches)[:, -1]
        out.append(layout.ids_to_codes(torch.stack(codes, 1) + layout.code_offset))
    return torch.cat(out)


def draw(model: DrawingLM, vqvae: VQVAE, captions: Sequence[str], **kwargs) -> torch.Tensor:
    """Captions -> images (B, 3, 32, 32): sampled codes, decoded by the VQ-VAE."""
    return vqvae.decode(draw_codes(model, [check_prompt(c) for c in captions], **kwargs))


# ----------------------------------------------------------------------------------
# Reading


@torch.no_grad()
def answer(model: DrawingLM, image_ids: torch.Tensor, images: torch.Tensor | None, question_list: Sequence[str],
           tokenizer: Tokenizer | None = None, max_tokens: int = 3, batch_size: int = 500) -> list[str]:
    """Greedy answers, one question per image. image_ids (B, image_tokens): what a reading row holds in the image's place
    (`reading_image_ids`); images (B, 3, 32, 32) for janus, None for emu3.

    Questions of one length go through together: one pass over the whole prompt, then one cached step per token.
    """
    tokenizer = tokenizer or load_tokenizer()
    layout = model.layout
    model.eval()
    encoded = [tokenizer.encode(q) for q in question_list]
    answers: list[str] = [""] * len(encoded)
    by_length: dict[int, list[int]] = {}
    for i, q in enumerate(encoded):
        by_length.setdefault(len(q), []).append(i)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            rows = group[s : s + batch_size]
            prompt = torch.tensor([caption_slot(tokenizer, None) + [layout.boi] + image_ids[i].tolist() + [layout.eoi]
                                   + encoded[i] for i in rows])
            caches = model.lm.new_caches()
            logits = model(prompt, images[rows] if images is not None else None, caches=caches)[:, -1]
            got = []
            for step in range(max_tokens):
                nxt = logits[:, : tokenizer.vocab_size].argmax(-1)  # text words only
                got.append(nxt)
                if step + 1 < max_tokens:
                    logits = model(nxt[:, None], caches=caches)[:, -1]
            got = torch.stack(got, 1).tolist()
            for i, ids in zip(rows, got):
                ids = ids[: ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids
                answers[i] = tokenizer.decode(ids).strip()
    return answers


# ----------------------------------------------------------------------------------
# Training: the recipe the chapter and the shipped checkpoints share


@dataclass(frozen=True)
class DrawRecipe:
    """One drawing model: its method, data (a drawing per training scene, a question per read_every-th) and optimisation."""

    method: str = "emu3"
    train_scenes: int = 60_000
    read_every: int = 2  # task "both": a question for every read_every-th scene (2: two drawings to each question)
    batch_size: int = 32
    steps: int = 8000
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    cfg_drop: float = 0.1
    task: str = "both"  # "draw", "read" or "both"
    order: str = "raster"  # the order the codes are written in: "raster" or "column"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown: expected one of {METHODS}")
        if self.task not in ("draw", "read", "both"):
            raise ValueError(f"task {self.task!r} is unknown: expected 'draw', 'read' or 'both'")
        if not 0.0 <= self.cfg_drop < 1.0:
            raise ValueError(f"cfg_drop {self.cfg_drop} is invalid: expected a share in [0, 1)")
        if isinstance(self.read_every, bool) or not isinstance(self.read_every, int) or self.read_every < 1:
            raise ValueError(f"read_every {self.read_every!r} is invalid: expected an int of at least 1 (1: a question per scene)")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_drawing_model(method: str, codebook_size: int, tower: nn.Module | None = None, order: str = "raster",
                        grid: int = 4) -> DrawingLM:
    """Chapter 04's GPT with the image words added; for janus also the book's frozen image tower and a new projector."""
    lm = extended_gpt(codebook_size)
    if method == "janus" and tower is None:
        from mllm_scratch.clip import pretrained_image_tower

        tower = pretrained_image_tower()
    return DrawingLM(DrawConfig(method, codebook_size, lm.config, order=order, grid=grid), lm=lm, tower=tower)


def training_rows(recipe: DrawRecipe, vqvae: VQVAE, tokenizer: Tokenizer | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """(rows, images) for a recipe: its training scenes, tokenized by the VQ-VAE."""
    tokenizer = tokenizer or load_tokenizer()
    images, scenes = scene_images("train", recipe.train_scenes)
    codes = torch.cat([vqvae.encode(images[i : i + 1000]) for i in range(0, len(images), 1000)])
    layout = Layout(tokenizer.vocab_size, vqvae.config.codebook_size, recipe.order, vqvae.config.grid,
                    TOWER_TOKENS if recipe.method == "janus" else 0)
    rows = make_rows(recipe.method, layout, tokenizer, scenes, codes, seed=recipe.seed, cfg_drop=recipe.cfg_drop,
                     task=recipe.task, read_every=recipe.read_every)
    return rows, images


def train_drawing(recipe: DrawRecipe, vqvae: VQVAE, *, steps: int | None = None, data=None, tower: nn.Module | None = None,
                  log_every: int = 0, progress: bool = False) -> tuple[DrawingLM, History]:
    """Train a drawing model on the recipe's mix of drawings and questions; returns it in eval mode and its History."""
    rows, images = data if data is not None else training_rows(recipe, vqvae)
    torch.manual_seed(recipe.seed)
    model = build_drawing_model(recipe.method, vqvae.config.codebook_size, tower, recipe.order, vqvae.config.grid)
    dataset = torch.utils.data.TensorDataset(rows["ids"], rows["targets"], images[rows["index"]])
    n = steps or recipe.steps
    history = train(
        model, batches(dataset, recipe.batch_size, seed=recipe.seed), drawing_loss,
        TrainConfig(steps=n, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, n), weight_decay=recipe.weight_decay,
                    log_every=log_every, progress=progress),
        device="cpu",
    )
    return model.eval(), history


# ----------------------------------------------------------------------------------
# Measurements


def held_out_captions(split: str, n: int, seed: int = 1) -> tuple[list[str], list[Spec], torch.Tensor, list]:
    """n held-out scenes of a split with one drawing caption each: (captions, specs, images, scenes)."""
    images, scenes = scene_images(split, n)
    rng = Rng(seed)
    pairs = [draw_caption(s, rng) for s in scenes]
    return [p[0] for p in pairs], [p[1] for p in pairs], images, scenes


def judged(judge, specs: Sequence[Spec], images: torch.Tensor) -> dict[str, float]:
    """The judge's per-attribute accuracy of images against the specs they were drawn from."""
    from mllm_scratch.judge import accuracy, detect

    return accuracy(specs, detect(judge, images))


def drawing_accuracy(model: DrawingLM, vqvae: VQVAE, judge, captions: Sequence[str], specs: Sequence[Spec], *,
                     guidance: float = 1.0, temperature: float = 1.0, seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """Draw every caption once (seeded sampling) and judge the drawings: (per-attribute accuracy, images)."""
    generator = torch.Generator().manual_seed(seed)
    images = vqvae.decode(draw_codes(model, list(captions), guidance=guidance, temperature=temperature, generator=generator))
    return judged(judge, specs, images), images


def reading_accuracy(model: DrawingLM, vqvae: VQVAE, split: str, n: int, seed: int = 2) -> dict[str, float]:
    """Share of right answers per skill on n held-out scenes (one question per skill the scene supports)."""
    images, scenes = scene_images(split, n)
    codes = torch.cat([vqvae.encode(images[i : i + 1000]) for i in range(0, n, 1000)])
    layout, method, rng = model.layout, model.config.method, Rng(seed)
    qas, idx = [], []
    for i, scene in enumerate(scenes):
        for qa in questions(scene, rng, READ_SKILLS, SCENES):
            qas.append(qa)
            idx.append(i)
    image_ids = torch.tensor([reading_image_ids(layout, method, codes[i]) for i in idx])
    got = answer(model, image_ids, images[idx] if method == "janus" else None, [qa.question for qa in qas])
    out = {}
    for skill in READ_SKILLS:
        hits = [g == qa.answer for g, qa in zip(got, qas) if qa.skill == skill]
        out[skill] = sum(hits) / len(hits)
    return out


# ----------------------------------------------------------------------------------
# Shipped checkpoints: data/checkpoints/draw_emu3.pt and draw_janus.pt


def shipped_recipe(method: str) -> DrawRecipe:
    """The recipe of the shipped drawing model `method` (the chapter trains a short version of it)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown: expected one of {METHODS}")
    return DrawRecipe(method=method)


def checkpoint_path(method: str) -> Path:
    return CHECKPOINT_DIR / f"draw_{method}.pt"


def pretrained_drawing_model(method: str = "emu3", path: str | Path | None = None) -> DrawingLM:
    """The shipped drawing model `method` (eval mode); janus also loads the book's image tower."""
    from mllm_scratch.checkpoints import CheckpointError, load_verified

    recipe = shipped_recipe(method)
    saved, state_dict, path, rebuild = load_verified(
        "draw", path, checkpoint_path(method), expected_config=None, recipe=recipe.to_dict(),
        recipe_owner=f"mllm_scratch.imagegen.shipped_recipe({method!r})", tokenizer_sha256=tokenizer_sha256(),
    )
    try:
        config = DrawConfig.from_dict(saved)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid DrawConfig ({err}); rebuild it with: {rebuild}") from None
    if config.method != method:
        raise CheckpointError(f"checkpoint {path} holds a {config.method} model, not {method}; rebuild it with: {rebuild}")
    tower = None
    if method == "janus":
        from mllm_scratch.clip import pretrained_image_tower

        tower = pretrained_image_tower()
    model = DrawingLM(config, tower=tower)
    # the file stores everything but the tower, which has its own shipped file
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}
    shapes = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {path} does not fit the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, other shapes {shapes[:5]}); rebuild it with: {rebuild}")
    model.load_state_dict(state_dict, strict=False)
    return model.eval()


def build_checkpoint(out: Path, method: str, recipe: DrawRecipe | None = None) -> dict:
    """Train `shipped_recipe(method)` (or `recipe`) and save out/draw_METHOD.pt (float16) with its test metrics."""
    from mllm_scratch.checkpoints import round_to_dtype, save_checkpoint
    from mllm_scratch.judge import pretrained_judge
    from mllm_scratch.vq import pretrained_vqvae

    recipe = recipe or shipped_recipe(method)
    vqvae = pretrained_vqvae()
    model, history = train_drawing(recipe, vqvae, log_every=250)
    judge = pretrained_judge()
    round_to_dtype(model, torch.float16)  # the metrics are those of the weights as stored
    captions, specs, _, _ = held_out_captions("test", 1000)
    # the model's own distribution (no guidance, temperature 1), whatever sampling setting EVAL holds
    plain = drawing_accuracy(model, vqvae, judge, captions, specs, guidance=1.0, temperature=1.0)[0]
    metrics = {"test_drawing_plain_t1": {k: round(v, 4) for k, v in plain.items()},
               "test_reading": {k: round(v, 4) for k, v in reading_accuracy(model, vqvae, "test", 1000).items()},
               "final_train_loss": round(history.loss[-1], 4), "train_seconds": round(history.seconds, 1)}
    print(f"draw_{method}:", metrics)

    class _NoTower(nn.Module):  # what the file stores: the model without the tower
        def __init__(self, m: DrawingLM):
            super().__init__()
            self.lm = m.lm
            if method == "janus":
                self.projector = m.projector

    return save_checkpoint(
        Path(out) / f"draw_{method}.pt", _NoTower(model), model.config.to_dict(), name=f"draw_{method}",
        recipe=recipe.to_dict(), metrics=metrics, dtype=torch.float16,
        extra={"trained_by": f"mllm_scratch.imagegen.train_drawing(shipped_recipe({method!r})) on one CPU thread",
               "tokenizer_sha256": tokenizer_sha256(), "loader": "mllm_scratch.imagegen.pretrained_drawing_model"},
    )


def pretrained_drawing_models(path: str | Path | None = None) -> dict[str, DrawingLM]:
    """Both shipped drawing models, {'emu3', 'janus'}, from the directory of `path` (default: the shipped ones)."""
    directory = CHECKPOINT_DIR if path is None else Path(path)
    if directory.suffix == ".pt":
        directory = directory.parent
    return {m: pretrained_drawing_model(m, directory / f"draw_{m}.pt") for m in METHODS}


# How the chapter samples its drawings: classifier-free guidance and temperature. Chosen on the
# val split (never on test) by scripts/drawing_sampling.py: of its grid, guidance 1.5 at
# temperature 0.3 drew most faithfully there, averaged over the two shipped models.
EVAL = {"guidance": 1.5, "temperature": 0.3}
