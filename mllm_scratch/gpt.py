"""GPT: a decoder-only Transformer language model, the text backbone every VLM in the book starts from.

    ids -> token embedding + learned position embedding
        -> depth x pre-norm causal TransformerBlock (the same block class as the ViT)
        -> final LayerNorm -> linear head -> next-token logits

Mirrors GPT-2 (Radford et al., 2019): with `activation="gelu_tanh"` (GPT-2's GELU
approximation) it is GPT-2 exactly, and appendix A3 loads the released weights into it.
Llama swaps LayerNorm for RMSNorm, GELU for SwiGLU and learned positions for RoPE, and
shares key/value heads between query heads (GQA), but the skeleton is this one.
`position="rope"` replaces the learned position table with rotary embeddings, and
`position="mrope"` with Qwen2-VL's M-RoPE, whose (time, height, width) indices come in
through `positions=` (chapter 11).
Chapter 04 builds it by hand, pretrains it on ShapeWorld descriptions and ships the
weights (`pretrained_gpt()`), so later chapters start from a model that already writes
ShapeWorld English.

Hooks for the multimodal chapters, so that they wrap this model instead of forking it:

- `model.embed(ids)` gives token embeddings, and `model(inputs_embeds=...)` accepts
  embeddings instead of ids: chapter 06 splices projected image features in at
  <|image|> (position embeddings are added inside, for the whole spliced sequence).
- The forward pass is four public steps that a wrapper can call in its own loop:

      x = model.input_states(ids)                       # embeddings + positions
      for i, block in enumerate(model.blocks):          # an nn.ModuleList
          x = block(x, causal=True, ...)                # insert your layers between blocks here
      logits = model.to_logits(x)                       # final norm, then head

  or, without writing the loop, `model.hidden_states(..., after_block=fn)` calls
  `x = fn(i, x)` after block i (chapter 07's gated cross-attention).
- `attn_mask` and `key_padding_mask` (boolean, True = may attend) pass through to
  every block, as `MultiHeadAttention` defines them.
- `caches` (one `KVCache` per block, from `model.new_caches()`) make generation
  incremental: `generate(..., use_cache=True)`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.attention import KVCache
from mllm_scratch.rope import ROPE_BASE, default_mrope_sections, mrope_angles, rope_angles
from mllm_scratch.checkpoints import (
    DEFAULT_DIR,
    CheckpointError,
    load_state_dict_strict,
    load_verified,
)
from mllm_scratch.runtime import check_positive_ints, checked_on_host
from mllm_scratch.shapeworld import TextDataset
from mllm_scratch.text import PackedTextDataset, pack_texts
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer, ranks_to_bytes
from mllm_scratch.train import History, TrainConfig, batches, train
from mllm_scratch.vit import SWITCH, TransformerBlock, check_block_switches, config_dict, repr_without_default_switches

# ----------------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    """Shape of a GPT; the defaults pretrain on ShapeWorld text on one CPU thread in about a minute."""

    vocab_size: int = 512  # the shipped tokenizer's ids: load_tokenizer().vocab_size
    context_length: int = 128  # longest sequence (text plus spliced image tokens) the position table covers
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True  # the output head reuses the token embedding matrix (GPT-2)
    # Switches for released models (appendix A3); the printed config shows them only when set.
    activation: Literal["gelu", "gelu_tanh", "quick_gelu"] = field(default="gelu", metadata=SWITCH)  # GPT-2: "gelu_tanh"
    norm_eps: float = field(default=1e-5, metadata=SWITCH)  # every LayerNorm's epsilon
    # Positions (chapter 11): a learned table added to the embeddings (GPT-2), or rotations of
    # queries and keys: "rope" (Llama) or "mrope" (Qwen2-VL: time, height, width sections).
    position: Literal["learned", "rope", "mrope"] = field(default="learned", metadata=SWITCH)
    rope_base: float = field(default=ROPE_BASE, metadata=SWITCH)
    mrope_sections: tuple[int, int, int] | None = field(default=None, metadata=SWITCH)  # None: Qwen2-VL's split
    mrope_interleaved: bool = field(default=False, metadata=SWITCH)  # pairs dealt to time, height, width in turn (Qwen3-VL)

    def __post_init__(self) -> None:
        check_positive_ints(self, "vocab_size", "context_length", "dim", "depth", "num_heads")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.position not in ("learned", "rope", "mrope"):
            raise ValueError(f"position must be 'learned', 'rope' or 'mrope', got {self.position!r}")
        if self.position != "learned" and (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"position {self.position!r} rotates pairs of features: head_dim {self.dim // self.num_heads} "
                f"(dim {self.dim} / num_heads {self.num_heads}) must be even"
            )
        if self.position != "learned":
            if not self.rope_base > 1:
                raise ValueError(f"rope_base must be a number above 1, got {self.rope_base!r}")
        if self.mrope_interleaved and (self.position != "mrope" or self.mrope_sections is not None):
            raise ValueError("mrope_interleaved needs position 'mrope' and no mrope_sections (it deals the pairs in turn)")
        if self.mrope_sections is not None:
            if self.position != "mrope":
                raise ValueError(f"mrope_sections {self.mrope_sections} needs position 'mrope', got {self.position!r}")
            sections = tuple(self.mrope_sections)
            pairs = self.dim // self.num_heads // 2
            if len(sections) != 3 or any(not isinstance(v, int) or v < 0 for v in sections) or sum(sections) != pairs:
                raise ValueError(
                    f"mrope_sections {self.mrope_sections} must be three non-negative ints (time, height, width) "
                    f"adding up to head_dim / 2 = {pairs}"
                )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_block_switches(self)

    def __repr__(self) -> str:
        return repr_without_default_switches(self)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


class GPT(nn.Module):
    """Decoder-only Transformer: ids (or input embeddings) (batch, T) -> next-token logits (batch, T, vocab_size)."""

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        self.config = config = config or GPTConfig()
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                config.dim, config.num_heads, config.mlp_ratio, config.dropout, config.bias,
                activation=config.activation, norm_eps=config.norm_eps,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight  # one (vocab_size, dim) matrix reads and writes tokens
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each block adds two outputs to the residual stream; keep its variance from growing with depth.
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.depth))

    def new_caches(self) -> list[KVCache]:
        """One empty KV cache per block, for incremental decoding."""
        return [KVCache() for _ in self.blocks]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings only (no positions): (batch, T) -> (batch, T, dim)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (batch, tokens), got {tuple(ids.shape)}")
        if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        # Checked on the CPU only: on a GPU the check would wait for the device at every step.
        if checked_on_host(ids) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in 0..{self.config.vocab_size - 1}, got min {int(ids.min())} and max {int(ids.max())}"
            )
        return self.tok_emb(ids)  # (batch, T, dim)

    def input_states(
        self, ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Step 1 of the forward pass: token (or given) embeddings plus the positions start_pos.. -> (batch, T, dim).

        With rotary positions nothing is added here: `rope(...)` gives the angles the blocks apply.
        """
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of ids (batch, T) and inputs_embeds (batch, T, dim)")
        x = self.embed(ids) if ids is not None else inputs_embeds
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"inputs_embeds must have shape (batch, tokens, {self.config.dim}), got {tuple(x.shape)}")
        t = x.shape[1]
        if start_pos + t > self.config.context_length:
            raise ValueError(
                f"positions {start_pos}..{start_pos + t - 1} exceed context_length {self.config.context_length}: "
                "crop the sequence (generate() slides a window for you)"
            )
        if self.config.position != "learned":
            return self.dropout(x)
        positions = torch.arange(start_pos, start_pos + t, device=x.device)  # (T,)
        return self.dropout(x + self.pos_emb(positions))  # (batch, T, dim)

    def rope(self, num_tokens: int, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """Rotary angles for the blocks, (T, head_dim / 2) or (batch, T, head_dim / 2); None with learned positions.

        positions: "rope": (T,) or (batch, T) token positions; "mrope": (3, T) or (3, batch, T)
        time, height and width indices (`rope.mrope_positions`). Default: start_pos, start_pos + 1, ...
        on every axis, so M-RoPE on text alone is 1-D RoPE.
        """
        c = self.config
        if c.position == "learned":
            if positions is not None:
                raise ValueError("positions= needs position 'rope' or 'mrope'; this GPT has a learned position table")
            return None
        head_dim = c.dim // c.num_heads
        if positions is None:
            positions = torch.arange(start_pos, start_pos + num_tokens, device=self.tok_emb.weight.device)
            if c.position == "mrope":
                positions = positions.expand(3, -1)  # (3, T): text moves along all three axes at once
        if c.position == "rope":
            if positions.dim() not in (1, 2) or positions.shape[-1] != num_tokens:
                raise ValueError(f"RoPE positions must have shape (T,) or (batch, T) with T = {num_tokens}, got {tuple(positions.shape)}")
            return rope_angles(positions, head_dim, c.rope_base)
        if positions.dim() not in (2, 3) or positions.shape[0] != 3 or positions.shape[-1] != num_tokens:
            raise ValueError(
                f"M-RoPE positions must have shape (3, T) or (3, batch, T) with T = {num_tokens} "
                f"(time, height, width per token), got {tuple(positions.shape)}"
            )
        sections = c.mrope_sections or default_mrope_sections(head_dim)
        return mrope_angles(positions, head_dim, sections, c.rope_base, interleaved=c.mrope_interleaved)

    def hidden_states(
        self,
        ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps 1 and 2: the residual stream after the last block, before the final norm -> (batch, T, dim).

        attn_mask: boolean (T, T_keys) or broadcastable to (batch, heads, T, T_keys), True = may attend,
        combined with the causal mask. key_padding_mask: (batch, T_keys), False = padding. With
        caches, T_keys counts the cached positions too. before_block(i, x) -> x runs just before block i
        and after_block(i, x) -> x just after it: the hooks the cross-attention decoders insert their layers with.
        positions: rotary positions of these tokens (see `rope`); only for position "rope" or "mrope".
        """
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one KVCache per block ({len(self.blocks)}), got {len(caches)}")
        start_pos = len(caches[0]) if caches else 0  # new tokens continue where the cache ends
        x = self.input_states(ids, inputs_embeds=inputs_embeds, start_pos=start_pos)  # (batch, T, dim)
        rope = self.rope(x.shape[1], start_pos, positions)  # None for learned positions
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=True, cache=cache, rope=rope)
            if after_block is not None:
                x = after_block(i, x)
        return x  # (batch, T, dim)

    def to_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Step 3: final LayerNorm, then the head -> (batch, T, vocab_size)."""
        return self.head(self.norm(hidden))

    def forward(
        self,
        ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (batch, T, vocab_size): logits[:, t] predicts token t + 1."""
        hidden = self.hidden_states(
            ids, inputs_embeds=inputs_embeds, attn_mask=attn_mask, key_padding_mask=key_padding_mask, caches=caches,
            positions=positions,
        )
        return self.to_logits(hidden)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, T, vocab) against targets (batch, T); ignore_index marks unscored positions."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (batch, T)")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def lm_loss(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The `loss_fn` for `train`: next-token loss of a (inputs, targets) batch."""
    inputs, targets = batch
    return next_token_loss(model(inputs), targets)


@torch.no_grad()
def evaluate_lm(model: GPT, dataset: PackedTextDataset, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per token) over every target of `dataset`; exp() of it is the perplexity."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        inputs = torch.stack([p[0] for p in pairs]).to(device)
        targets = torch.stack([p[1] for p in pairs]).to(device)
        logits = model(inputs)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        count += targets.numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------
# Generation


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits (batch, vocab) -> (batch,): greedy if temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # ties go to the lowest id
    logits = logits.float() / temperature  # < 1 sharpens the distribution, > 1 flattens it
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (batch, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # only the k most likely tokens survive
    probs = torch.softmax(logits, dim=-1)  # (batch, vocab)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (batch,)


@torch.no_grad()
def generate(
    model: GPT,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `ids` ((T,) or (batch, T)) by up to max_new_tokens tokens; returns prompt + new tokens.

    temperature 0 is greedy; otherwise tokens are sampled (from the top_k most likely if
    given), reproducibly when a seeded `generator` (on the model's device) is passed. A row that has produced
    eos_id continues with eos_id (padding); generation stops when every row has.
    With use_cache, each step feeds only the newest token and reuses every earlier
    token's keys and values; past context_length both paths slide a window over the
    last context_length tokens (learned positions cannot shift, so the cache is rebuilt
    each step there). Cached and uncached generation pick the same tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    single = ids.dim() == 1
    out = ids[None] if single else ids  # (batch, T)
    if out.dim() != 2 or out.shape[1] < 1:
        raise ValueError(f"ids must have shape (T,) or (batch, T) with T >= 1, got {tuple(ids.shape)}")
    window = model.config.context_length
    was_training = model.training
    model.eval()
    caches: list[KVCache] | None = None
    finished = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(out[:, -window:])  # the whole (cropped) sequence, every step
        elif caches is not None and len(caches[0]) < window:
            logits = model(out[:, -1:], caches=caches)  # only the newest token: (batch, 1, vocab)
        else:  # first step, or the window is full: (re)fill the caches from the last `window` tokens
            caches = model.new_caches()
            logits = model(out[:, -window:], caches=caches)
        next_id = sample_next(logits[:, -1], temperature, top_k, generator)  # (batch,)
        if eos_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
            finished |= next_id == eos_id
        out = torch.cat([out, next_id[:, None]], dim=1)  # (batch, T + 1)
        if eos_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return out[0] if single else out


# ----------------------------------------------------------------------------------
# Pretraining on ShapeWorld descriptions: the recipe the notebook and the shipped checkpoint share


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained GPT: data, model shape, optimisation and seed."""

    train_texts: int = 20_000  # ShapeWorld "train" descriptions: about 0.42 M tokens, one pass
    val_texts: int = 1_000  # held-out "val" descriptions for perplexity
    batch_size: int = 16  # windows of model.context_length tokens: 2048 tokens a step
    steps: int = 200
    lr: float = 4e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    model: GPTConfig = field(default_factory=GPTConfig)
    # Follow each description with its scene's questions and answers (`TextDataset(questions=True)`):
    # chapter 07's frozen LM must already say "yes" and "no". Stored only when set.
    questions: bool = field(default=False, metadata=SWITCH)

    def train_config(self, **overrides) -> TrainConfig:
        """The `TrainConfig` of this recipe (overrides change only logging and progress)."""
        base = dict(
            steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, record_every=10, log_every=100,
        )
        return TrainConfig(**{**base, **overrides})



def text_datasets(recipe: PretrainRecipe, tokenizer: Tokenizer) -> tuple[PackedTextDataset, PackedTextDataset]:
    """Packed (train, val) language-modelling datasets of ShapeWorld descriptions, windows of context_length."""
    if tokenizer.vocab_size != recipe.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but GPTConfig.vocab_size is {recipe.model.vocab_size}: "
            "set vocab_size=tokenizer.vocab_size"
        )
    out = []
    for split, size in (("train", recipe.train_texts), ("val", recipe.val_texts)):
        texts = TextDataset(split, size, questions=recipe.questions)
        stream = pack_texts([texts[i] for i in range(size)], tokenizer)  # (num_tokens,)
        out.append(PackedTextDataset(stream, recipe.model.context_length))
    return out[0], out[1]


def pretrain_gpt(
    recipe: PretrainRecipe | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    log_every: int = 100,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[GPT, History]:
    """Pretrain a GPT on ShapeWorld descriptions with `recipe`; returns the model (eval mode) and its History.

    Deterministic on one thread: the weights depend only on the recipe (the model is
    initialised from recipe.seed, batches are shuffled by their own seeded generator).
    `scripts/build_checkpoints.py gpt` runs exactly this.
    """
    recipe = recipe or PretrainRecipe()
    tokenizer = tokenizer or load_tokenizer()
    train_set, val_set = text_datasets(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = GPT(recipe.model)
    history = train(
        model,
        batches(train_set, recipe.batch_size, seed=recipe.seed),
        lm_loss,
        recipe.train_config(log_every=log_every, progress=progress),
        evaluate=lambda m: {"val_loss": evaluate_lm(m, val_set)},
        device=device,
        batch_size_of=lambda b: b[0].numel(),  # tokens, so History.examples_per_second is tokens/s
    )
    return model, history


# ----------------------------------------------------------------------------------
# The shipped checkpoint

CHECKPOINT_NAME = "gpt"
DEFAULT_CHECKPOINT = DEFAULT_DIR / f"{CHECKPOINT_NAME}.pt"
# The same GPT pretrained on descriptions followed by their questions and answers, longer (the LM
# that chapter 07 freezes: it must already say "yes" and "no"). Stored in float16.
QA_CHECKPOINT_NAME = "gpt_qa"
QA_RECIPE = PretrainRecipe(train_texts=40_000, steps=1500, questions=True)


def tokenizer_sha256(tokenizer: Tokenizer | None = None) -> str:
    """sha256 of a tokenizer's ranks (default: the shipped one), recorded in the GPT's manifest: new ranks mean new ids."""
    tokenizer = tokenizer or load_tokenizer()
    return hashlib.sha256(ranks_to_bytes(tokenizer.ranks)).hexdigest()  # = ranks_sha256 in the tokenizer's manifest


def pretrained_gpt(path: str | Path | None = None, *, config: GPTConfig | None = None, questions: bool = False) -> GPT:
    """The GPT pretrained by `scripts/build_checkpoints.py gpt` (eval mode, CPU), verified before it is built.

    questions=True: the one pretrained with questions and answers in its text (`QA_RECIPE`,
    `build_checkpoints.py gpt_qa`), which chapter 07 freezes. Checks the file's sha256
    against its manifest, its config against `config` (for the shipped checkpoint: the
    current recipe, so a changed recipe is caught) and the tokenizer it was trained with;
    raises CheckpointError naming the file and the rebuild command otherwise.
    """
    recipe = QA_RECIPE if questions else PretrainRecipe()
    name = QA_CHECKPOINT_NAME if questions else CHECKPOINT_NAME
    if config is None and path is None:
        config = recipe.model
    saved, state_dict, path, rebuild = load_verified(
        name, path, DEFAULT_DIR / f"{name}.pt",
        expected_config=None if config is None else config_dict(config),
        recipe=config_dict(recipe),
        recipe_owner="QA_RECIPE in mllm_scratch/gpt.py" if questions else "PretrainRecipe() in mllm_scratch/gpt.py",
        tokenizer_sha256=tokenizer_sha256(),
    )
    try:
        model = GPT(GPTConfig(**saved))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid GPTConfig ({err}); rebuild it with: {rebuild}") from None
    load_state_dict_strict(model, state_dict, path, rebuild)
    return model.eval()


def pretrained_gpt_qa(path: str | Path | None = None) -> GPT:
    """`pretrained_gpt(path, questions=True)`: the GPT whose pretraining text held questions and answers."""
    return pretrained_gpt(path, questions=True)


__all__ = [
    "DEFAULT_CHECKPOINT",
    "GPT",
    "GPTConfig",
    "PretrainRecipe",
    "QA_RECIPE",
    "evaluate_lm",
    "generate",
    "lm_loss",
    "next_token_loss",
    "pretrain_gpt",
    "pretrained_gpt",
    "pretrained_gpt_qa",
    "sample_next",
    "text_datasets",
]
