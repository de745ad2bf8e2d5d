"""The Vision Transformer (ViT): an image becomes a sequence of patch vectors, refined by a stack of blocks.

Patch embedding (chapter 01) -> [CLS] token and position embeddings (learned or 2-D
sin-cos) -> pre-norm Transformer blocks (bidirectional self-attention + MLP, residuals)
-> final LayerNorm. The encoder returns one feature vector per patch, which the VLM
chapters feed to a language model, and a pooled vector ([CLS] or the mean of the
patches), which a classification head or CLIP uses. Mirrors ViT (Dosovitskiy et al.,
2020) and CLIP's image tower. `TransformerBlock` is also the block of chapter 04's GPT,
called there with `causal=True`.

A few config switches express the released towers exactly (appendix A3 loads their
weights); their defaults are the book's tiny ViT: `activation` (CLIP's QuickGELU,
SigLIP's tanh GELU), `norm_eps`, `embed_norm` (CLIP's LayerNorm before the first block),
`patch_bias` (CLIP's patch convolution has none) and `pool="map"` (SigLIP's attention
pooling head).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.attention import KVCache, MultiHeadAttention
from mllm_scratch.checkpoints import atomic_write, config_differences
from mllm_scratch.packing import pack_patches
from mllm_scratch.patches import PatchEmbedding
from mllm_scratch.rope import ROPE_BASE, rope_2d_angles
from mllm_scratch.runtime import check_positive_ints
from mllm_scratch.train import no_weight_decay


SWITCH = {"switch": True}  # field metadata: an architecture switch whose default is the book's model


def repr_without_default_switches(config: object) -> str:
    """A config dataclass's repr without the switches that hold their defaults, so a book config prints as it always has."""
    shown = (
        f"{f.name}={getattr(config, f.name)!r}"
        for f in fields(config)  # type: ignore[arg-type]
        if not (f.metadata.get("switch") and getattr(config, f.name) == f.default)
    )
    return f"{type(config).__name__}({', '.join(shown)})"


def config_dict(config: Any) -> dict[str, Any]:
    """`dataclasses.asdict` without the switches that hold their defaults, at any depth.

    What manifests and saved configs store: a book config is stored as it was before the
    switches existed, so a checkpoint built then still matches today's recipe exactly, and a
    loader fills a missing switch with its default.
    """
    out = asdict(config)

    def prune(obj: Any, d: dict[str, Any]) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("switch") and value == f.default:
                del d[f.name]
            elif is_dataclass(value) and not isinstance(value, type):
                prune(value, d[f.name])

    prune(config, out)
    return out


@dataclass
class ViTConfig:
    """Shape of a ViT; the defaults are chapter 03's tiny ViT for 32 px ShapeWorld images, trained on one CPU thread."""

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 48
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pos_embedding: Literal["learned", "sincos", "rope2d"] = "learned"  # "rope2d": 2-D rotary, any image size
    pool: Literal["cls", "mean", "map"] = "cls"  # "map": a learned query attends over the patches (SigLIP)
    num_classes: int | None = None  # set it to give `ViTClassifier` its head
    # Switches for the released towers (appendix A3); the printed config shows them only when set.
    activation: Literal["gelu", "gelu_tanh", "quick_gelu"] = field(default="gelu", metadata=SWITCH)  # `activation_layer`
    norm_eps: float = field(default=1e-5, metadata=SWITCH)  # every LayerNorm's epsilon (SigLIP uses 1e-6)
    embed_norm: bool = field(default=False, metadata=SWITCH)  # a LayerNorm before the first block (CLIP's ln_pre)
    patch_bias: bool = field(default=True, metadata=SWITCH)  # False: the patch projection has no bias (CLIP)
    rope_base: float = field(default=ROPE_BASE, metadata=SWITCH)  # 2-D RoPE's slowest wavelength scale (chapter 11)

    def __post_init__(self) -> None:
        check_positive_ints(self, "image_size", "patch_size", "in_channels", "dim", "depth", "num_heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embedding not in ("learned", "sincos", "rope2d"):
            raise ValueError(f"pos_embedding must be 'learned', 'sincos' or 'rope2d', got {self.pos_embedding!r}")
        if self.pos_embedding == "sincos" and self.dim % 4:
            raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got dim {self.dim}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 1:
            raise ValueError(f"rope_base must be a number above 1, got {self.rope_base!r}")
        if self.pos_embedding == "rope2d" and (self.dim // self.num_heads) % 4:
            raise ValueError(
                f"2-D RoPE rotates pairs for the row and for the column: head_dim {self.dim // self.num_heads} "
                f"(dim {self.dim} / num_heads {self.num_heads}) must be divisible by 4"
            )
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'map', got {self.pool!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"num_classes must be None or an int of at least 2, got {self.num_classes!r}")
        check_block_switches(self)

    def __repr__(self) -> str:
        return repr_without_default_switches(self)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the cheap GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(name: str) -> nn.Module:
    """The MLP's nonlinearity: "gelu" (exact), "gelu_tanh" (GPT-2's and SigLIP's tanh approximation) or "quick_gelu" (CLIP)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def check_block_switches(config: Any) -> None:
    """Validate the `activation` and `norm_eps` fields a ViTConfig and a GPTConfig share."""
    activation, eps = config.activation, config.norm_eps
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"norm_eps must be a number in (0, 1), got {eps!r}")


class MLP(nn.Module):
    """The position-wise feed-forward network of a Transformer block: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = True, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = activation_layer(activation)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))  # (batch, tokens, dim)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)); bidirectional or causal."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, dropout=dropout, bias=bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout, bias, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim); masks and rotary angles as in `MultiHeadAttention`."""
        h = self.attn(
            self.norm1(x), attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal, cache=cache, rope=rope
        )
        x = x + self.dropout(h)
        return x + self.mlp(self.norm2(x))  # (batch, tokens, dim)


def sincos_1d_position_embedding(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(n,) positions -> (n, dim): [sin(p * w_i), cos(p * w_i)] for dim/2 frequencies w_i = temperature^(-i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even dim, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (n, dim)


def sincos_2d_position_embedding(
    grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0, trained_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed position codes, row-major: first half encodes the row, second half the column.

    Row r and column c are the positions, 0 .. grid - 1. With `trained_grid=(h, w)` they are
    stretched onto a smaller grid's range instead, (r + 0.5) * h / grid_h - 0.5 (as bilinear
    interpolation maps pixel centres), so a model trained on an h x w grid sees no position
    beyond those it was trained on.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got dim {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # (grid_h * grid_w,): 0 0 0 1 1 1 ...
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # 0 1 2 0 1 2 ...
    if trained_grid is not None:
        rows = (rows + 0.5) * trained_grid[0] / grid_h - 0.5
        cols = (cols + 0.5) * trained_grid[1] / grid_w - 0.5
    return torch.cat(
        [sincos_1d_position_embedding(rows, dim // 2, temperature), sincos_1d_position_embedding(cols, dim // 2, temperature)],
        dim=1,
    )  # (num_patches, dim)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, new_grid: int | tuple[int, int], num_prefix: int = 1, mode: str = "bicubic"
) -> torch.Tensor:
    """Resize a learned position table (1, prefix + g * g, dim) to (1, prefix + rows * cols, dim).

    new_grid is rows = cols, or (rows, cols) for a canvas that is not square. The patch rows
    are laid back on their g x g grid, resized like an image (`mode`: "bicubic" or
    "bilinear", as `F.interpolate`) and flattened again; the prefix rows ([CLS]) are kept.
    This is how a ViT is fine-tuned at a higher resolution than it was trained at (ViT, CLIP).
    """
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    prefix, grid_rows = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = math.isqrt(grid_rows.shape[1])
    if old * old != grid_rows.shape[1]:
        raise ValueError(f"{grid_rows.shape[1]} position rows after {num_prefix} prefix rows do not form a square grid")
    g = grid_rows.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, dim, old, old)
    g = F.interpolate(g, size=(rows, cols), mode=mode, align_corners=False)  # (1, dim, rows, cols)
    return torch.cat([prefix, g.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def forward_interpolated(model: VisionTransformer, images: torch.Tensor, mode: str = "bicubic") -> ViTOutput:
    """Run a ViT with absolute positions on images of another size (height and width multiples of the patch).

    Learned positions are resized to the images' grid (`interpolate_pos_embed`); sin-cos codes
    are recomputed on it, stretched onto the trained grid's range. The weights are not changed:
    this is what a fixed-size ViT can do, without fine-tuning, with an image it was not trained on.
    """
    if model.any_size:
        return model(images)  # 2-D RoPE needs no resizing
    if images.dim() != 4:
        raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
    model._check(images, any_size=True)
    grid = model._grid(images)
    if model.config.pos_embedding == "learned":
        table = interpolate_pos_embed(model.pos_embed, grid, model.num_prefix, mode)
    else:
        g = model.config.grid_size
        codes = sincos_2d_position_embedding(*grid, model.config.dim, trained_grid=(g, g))
        table = torch.cat([torch.zeros(model.num_prefix, model.config.dim), codes])[None].to(images.device)
    return model(images, pos_embed=table)


class AttentionPool(nn.Module):
    """Multi-head attention pooling (MAP): a learned query attends over the patch vectors, then a residual MLP (SigLIP).

    probe (1, 1, dim) -> attention over x -> h;  h + MLP(LayerNorm(h)) -> (batch, dim)
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, activation: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        self.probe = no_weight_decay(nn.Parameter(torch.randn(1, 1, dim) * 0.02))
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.probe.expand(x.shape[0], -1, -1), x)  # (batch, 1, dim): one query reads every patch
        return (h + self.mlp(self.norm(h)))[:, 0]  # (batch, dim)


class ViTOutput(NamedTuple):
    """What the encoder returns: one vector per patch and one per image."""

    patches: torch.Tensor  # (batch, num_patches, dim), after the final norm
    pooled: torch.Tensor  # (batch, dim): the [CLS] token, the mean of the patch vectors, or their attention pool


class VisionTransformer(nn.Module):
    """ViT encoder: images (batch, C, H, W) -> `ViTOutput(patches, pooled)`."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = config = config or ViTConfig()
        self.patch_embed = PatchEmbedding(config.patch_size, config.in_channels, config.dim)
        if not config.patch_bias:
            self.patch_embed.proj.register_parameter("bias", None)  # CLIP's patch convolution has no bias
        self.num_prefix = 1 if config.pool == "cls" else 0  # tokens before the patches
        if config.pool == "cls":
            self.cls_token = no_weight_decay(nn.Parameter(torch.randn(1, 1, config.dim) * 0.02))
        if config.pos_embedding == "learned":
            self.pos_embed = no_weight_decay(
                nn.Parameter(torch.randn(1, self.num_prefix + config.num_patches, config.dim) * 0.02)
            )
        elif config.pos_embedding == "rope2d":
            self.pos_embed = None  # positions rotate queries and keys inside every block instead
        else:
            table = sincos_2d_position_embedding(config.grid_size, config.grid_size, config.dim)
            table = torch.cat([torch.zeros(self.num_prefix, config.dim), table])  # [CLS] has no position
            self.register_buffer("pos_embed", table[None], persistent=False)  # (1, prefix + num_patches, dim)
        self.dropout = nn.Dropout(config.dropout)
        switches = dict(activation=config.activation, norm_eps=config.norm_eps)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.num_heads, config.mlp_ratio, config.dropout, **switches)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        if config.embed_norm:
            self.embed_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        if config.pool == "map":
            self.attn_pool = AttentionPool(config.dim, config.num_heads, config.mlp_ratio, **switches)
        # Which token may attend to which, (tokens, tokens) bool, True = may attend; None (the default):
        # every token sees every token. A subclass sets it to restrict attention (e.g. to neighbouring patches).
        self.register_buffer("attn_mask", None, persistent=False)

    @property
    def any_size(self) -> bool:
        """True when images of any height and width (multiples of the patch size) may go in: 2-D RoPE."""
        return self.config.pos_embedding == "rope2d"

    def _check(self, images: torch.Tensor, any_size: bool = False) -> None:
        c = self.config
        if (any_size or self.any_size) and images.dim() == 4 and images.shape[1] == c.in_channels:
            h, w = images.shape[2:]
            if h % c.patch_size or w % c.patch_size or h == 0 or w == 0:
                raise ValueError(
                    f"image height {h} and width {w} must be positive multiples of patch_size {c.patch_size}"
                )
            return
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (batch, {c.in_channels}, {c.image_size}, {c.image_size}) for this ViT "
                f"(in_channels {c.in_channels}, image_size {c.image_size}), got {tuple(images.shape)}"
            )

    def embed(self, images: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> the token sequence the first block sees: ([CLS] +) patches, plus positions (then `embed_norm`).

        pos_embed: a position table (1, prefix + patches, dim) to add instead of the model's own,
        e.g. `interpolate_pos_embed` of it for images of another size (`forward_interpolated`).
        """
        self._check(images, any_size=pos_embed is not None)
        x = self.patch_embed(images)  # (batch, num_patches, dim)
        if self.num_prefix:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (batch, 1 + num_patches, dim)
        if pos_embed is None:
            pos_embed = self.pos_embed
        if pos_embed is not None:  # 2-D RoPE adds nothing here
            if pos_embed.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"pos_embed covers {pos_embed.shape[-2]} tokens of width {pos_embed.shape[-1]}, "
                    f"the images give {x.shape[1]} tokens of width {x.shape[2]}"
                )
            x = x + pos_embed
        x = self.dropout(x)
        return self.embed_norm(x) if self.config.embed_norm else x

    def rope_angles(self, grid_h: int, grid_w: int, squeeze_to: tuple[int, int] | None = None) -> torch.Tensor | None:
        """2-D rotary angles (prefix + grid_h * grid_w, head_dim / 2) of a row-major grid; None without 2-D RoPE.

        [CLS] gets angle 0 (no rotation): it sits at no place in the image. squeeze_to=(rows, cols):
        an axis longer than that is squeezed, position * rows / grid_h (RoPE's position
        interpolation, Chen et al., 2023), so its offsets stay about as long as a trained grid's.
        """
        if not self.any_size:
            return None
        head_dim = self.config.dim // self.config.num_heads
        rows = torch.arange(grid_h).repeat_interleave(grid_w).double()  # (grid_h * grid_w,): 0 0 0 1 1 1 ...
        cols = torch.arange(grid_w).repeat(grid_h).double()  # 0 1 2 0 1 2 ...
        if squeeze_to is not None:
            rows = rows * min(1.0, squeeze_to[0] / grid_h)
            cols = cols * min(1.0, squeeze_to[1] / grid_w)
        angles = rope_2d_angles(rows, cols, head_dim, self.config.rope_base)  # (grid_h * grid_w, head_dim / 2)
        prefix = torch.zeros(self.num_prefix, head_dim // 2)
        return torch.cat([prefix, angles]).to(self.patch_embed.proj.weight.device)

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return images.shape[-2] // p, images.shape[-1] // p

    def encode_tokens(
        self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The blocks and the final norm over an embedded sequence (batch, tokens, dim) -> (batch, tokens, dim)."""
        mask = self.attn_mask if attn_mask is None else attn_mask
        for block in self.blocks:
            x = block(x, attn_mask=mask, rope=rope)  # bidirectional: every patch sees every patch (unless a mask says not)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> ViTOutput:
        patches = x[:, self.num_prefix :]  # (batch, num_patches, dim)
        if self.num_prefix:
            pooled = x[:, 0]  # (batch, dim)
        else:
            pooled = self.attn_pool(patches) if self.config.pool == "map" else patches.mean(dim=1)  # (batch, dim)
        return ViTOutput(patches, pooled)

    def forward(
        self, images: torch.Tensor, *, pos_embed: torch.Tensor | None = None, squeeze_to: tuple[int, int] | None = None
    ) -> ViTOutput:
        """images (batch, C, H, W) -> ViTOutput. pos_embed: a position table for this call (see `embed`);
        squeeze_to: with 2-D RoPE, squeeze longer axes onto a (rows, cols) grid's range (see `rope_angles`)."""
        x = self.embed(images, pos_embed)  # (batch, prefix + num_patches, dim)
        return self._pool(self.encode_tokens(x, self.rope_angles(*self._grid(images), squeeze_to)))

    def forward_packed(self, images: list[torch.Tensor]) -> list[ViTOutput]:
        """Encode images of different sizes (each (C, H, W)) in ONE sequence, then split it: NaViT / Pixtral packing.

        The patches of all images are concatenated (with a [CLS] per image if pool="cls"),
        each token keeps its own image's 2-D RoPE angles, and a block-diagonal mask lets a
        token attend only to tokens of its own image, so each result equals `self(image[None])`.
        Returns one `ViTOutput` per image, each with batch size 1.
        """
        if not self.any_size:
            raise ValueError(
                f"packing needs images of any size, i.e. pos_embedding 'rope2d'; this ViT has {self.config.pos_embedding!r}"
            )
        if self.attn_mask is not None:
            raise ValueError("forward_packed cannot combine the packing mask with this ViT's own attn_mask")
        packed = pack_patches(images, self.config.patch_size, self.num_prefix)  # checks each is (C, H, W)
        tokens = []
        for image in images:  # embed each image's patches ([CLS] first): a per-token step, so packing changes nothing
            tokens.append(self.embed(image[None]))  # (1, prefix + patches_i, dim)
        x = torch.cat(tokens, dim=1)  # (1, total, dim)
        head_dim = self.config.dim // self.config.num_heads
        rope = rope_2d_angles(packed.rows, packed.cols, head_dim, self.config.rope_base)  # (total, head_dim / 2)
        rope = rope.masked_fill(packed.is_prefix[:, None], 0.0).to(x.device)  # [CLS] tokens are not rotated
        x = self.encode_tokens(x, rope, attn_mask=packed.attention_mask().to(x.device))  # (1, total, dim)
        return [self._pool(x[:, a:b]) for a, b in packed.spans]

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention weights of every block, each (batch, heads, tokens, tokens), for plots."""
        x = self.embed(images)
        rope = self.rope_angles(*self._grid(images))
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x), attn_mask=self.attn_mask, rope=rope))
            x = block(x, attn_mask=self.attn_mask, rope=rope)
        return maps


class ViTClassifier(nn.Module):
    """A ViT encoder plus a linear head on the pooled vector: images -> class logits."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.num_classes is None:
            raise ValueError("ViTClassifier needs config.num_classes (an int of at least 2), got None")
        self.config = config
        self.encoder = VisionTransformer(config)
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).pooled)  # (batch, num_classes)


def resize_vit(model: nn.Module, image_size: int, mode: str = "bicubic", sincos: str = "extend") -> nn.Module:
    """A copy of a `VisionTransformer` or `ViTClassifier` for another image size: same weights, positions resized.

    Learned positions are interpolated over the patch grid (`interpolate_pos_embed`, `mode`).
    Sin-cos positions are recomputed for the new grid: `sincos="extend"` uses positions
    0 .. new_grid - 1 (the codes go on past the trained grid), `"stretch"` squeezes them onto
    the trained grid's range, as interpolating a learned table does.
    """
    if type(model) not in (VisionTransformer, ViTClassifier):
        raise TypeError(f"resize_vit resizes a VisionTransformer or a ViTClassifier, got {type(model).__name__}")
    if sincos not in ("extend", "stretch"):
        raise ValueError(f"sincos must be 'extend' or 'stretch', got {sincos!r}")
    encoder = model.encoder if isinstance(model, ViTClassifier) else model
    if encoder.attn_mask is not None:
        raise ValueError("resize_vit cannot resize a ViT whose attn_mask is set: the mask is tied to the old grid")
    new = type(model)(replace(model.config, image_size=image_size))
    new_encoder = new.encoder if isinstance(new, ViTClassifier) else new
    state = model.state_dict()
    key = ("encoder." if isinstance(model, ViTClassifier) else "") + "pos_embed"
    if model.config.pos_embedding == "learned":
        state[key] = interpolate_pos_embed(state[key], new.config.grid_size, encoder.num_prefix, mode)
    elif model.config.pos_embedding == "sincos" and sincos == "stretch":
        old_grid = model.config.grid_size
        table = sincos_2d_position_embedding(
            new.config.grid_size, new.config.grid_size, new.config.dim, trained_grid=(old_grid, old_grid)
        )
        new_encoder.pos_embed = torch.cat([torch.zeros(encoder.num_prefix, new.config.dim), table])[None]
    new.load_state_dict(state)
    return new.to(next(model.parameters()).device).train(model.training)


class ConvNetClassifier(nn.Module):
    """A small CNN baseline: 3 x 3 convolutions with ReLU and 2 x 2 max-pooling, a global average, a linear head.

    A convolution looks only at neighbouring pixels and applies the same filter everywhere:
    the locality and translation equivariance a ViT must learn from data. Any image size
    divisible by 2 ** (len(channels) - 1) works, since the average pools whatever grid is left.
    """

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (32, 64, 128), in_channels: int = 3):
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one convolution, got ()")
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(in_channels, c, kernel_size=3, padding=1), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))  # halves the height and width
            in_channels = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (batch, channels[-1], H / 2 ** (len(channels) - 1), W / ...)
        return self.head(x.mean(dim=(2, 3)))  # global average pool -> (batch, num_classes)


# ----------------------------------------------------------------------------------
# Saving a ViT you trained: a state dict plus the config as a plain dict, loaded with
# weights_only=True. (The book's shipped, manifest-checked checkpoints are in checkpoints.py.)

_MODELS: dict[str, type[nn.Module]] = {"VisionTransformer": VisionTransformer, "ViTClassifier": ViTClassifier}


def save_vit(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a `VisionTransformer` or `ViTClassifier` with its config; atomic, so a crash never leaves half a file."""
    name = type(model).__name__
    if name not in _MODELS:
        raise TypeError(f"save_vit saves one of {sorted(_MODELS)}, got {name}")
    state = {"model": name, "config": config_dict(model.config), "state_dict": model.state_dict()}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_vit(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a `save_vit` file into `model` (its config must match) or into a new model built from the saved config."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    known = {f.name for f in fields(ViTConfig)}
    saved = ViTConfig(**{k: v for k, v in state["config"].items() if k in known})
    if model is None:
        model = _MODELS[state["model"]](saved)
    else:
        if type(model).__name__ != state["model"]:
            raise ValueError(f"{path} holds a {state['model']}, not a {type(model).__name__}")
        diff = config_differences(asdict(saved), asdict(model.config))
        if diff:
            raise ValueError(f"{path} was saved with a different ViTConfig: " + "; ".join(diff))
    device = next(model.parameters()).device
    model.load_state_dict(state["state_dict"])
    return model.to(device)


__all__ = [
    "ACTIVATIONS",
    "AttentionPool",
    "ConvNetClassifier",
    "MLP",
    "QuickGELU",
    "TransformerBlock",
    "ViTClassifier",
    "ViTConfig",
    "ViTOutput",
    "VisionTransformer",
    "activation_layer",
    "forward_interpolated",
    "interpolate_pos_embed",
    "load_vit",
    "repr_without_default_switches",
    "resize_vit",
    "save_vit",
    "sincos_1d_position_embedding",
    "sincos_2d_position_embedding",
]
