"""Connectors: how an image's patch vectors become the LM's image tokens, and how many of them.

Every connector maps the tower's (batch, grid * grid, image_dim) patch vectors (row-major,
as the ViT returns them) to (batch, tokens, lm_dim). They differ in how many tokens come
out, which sets the length of the LM's sequence and so its cost:

| kind | tokens (8 x 8 grid) | what it does | used by |
|---|---|---|---|
| "linear", "mlp" | 64 | one token per patch (`vlm.make_projector`) | LLaVA, LLaVA-1.5 |
| "avgpool" | 64 / f^2 | average each f x f block of patches, then an MLP | Idefics2 ablation, MM1 |
| "pixelshuffle" | 64 / f^2 | concatenate each f x f block (space-to-depth), then an MLP | InternVL, Idefics3, nanoVLM |
| "cabstractor" | out_grid^2 | convolutions, adaptive pooling, convolutions: local context kept | Honeybee, MM1 |
| "queries" | num_queries | learnable queries cross-attend to all patches | BLIP-2 Q-Former, MiniCPM-V |

`pixel_shuffle` and `pixel_unshuffle` are the token-grid rearrangement by itself (no
weights); they round-trip exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from mllm_scratch.attention import MultiHeadAttention
from mllm_scratch.vit import sincos_2d_position_embedding

ConnectorKind = Literal["linear", "mlp", "avgpool", "pixelshuffle", "cabstractor", "queries"]
KINDS: tuple[str, ...] = ("linear", "mlp", "avgpool", "pixelshuffle", "cabstractor", "queries")


def grid_of(tokens: int) -> int:
    """The side of a square grid of `tokens` patches (ValueError if it is not a square)."""
    side = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
    if side * side != tokens:
        raise ValueError(f"{tokens!r} patch vectors do not form a square grid: expected a square number such as 64")
    return side


def _check_patches(x: torch.Tensor, factor: int) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"patch vectors must be (batch, tokens, dim), got {shape}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor {factor!r} is invalid: expected a positive int")
    b, n, d = x.shape
    side = grid_of(n)
    if side % factor:
        raise ValueError(f"a {side} x {side} grid does not split into {factor} x {factor} blocks: "
                         f"expected a factor that divides {side}")
    return b, side, d


def pixel_shuffle(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Space-to-depth on the patch grid: (B, g*g, D) -> (B, (g/f)^2, f*f*D).

    Output token (i, j) (row-major) is the concatenation of the f x f block of patches
    whose top-left is (i*f, j*f), in row-major order within the block.
    """
    b, side, d = _check_patches(x, factor)
    s = side // factor
    x = x.reshape(b, s, factor, s, factor, d).permute(0, 1, 3, 2, 4, 5)  # (B, s, s, f, f, D)
    return x.reshape(b, s * s, factor * factor * d)


def pixel_unshuffle(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The inverse of `pixel_shuffle`: (B, s*s, f*f*D) -> (B, (s*f)^2, D)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"tokens must be (batch, tokens, dim), got {shape}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or x.shape[-1] % (factor * factor):
        raise ValueError(f"factor {factor!r} is invalid for tokens of width {x.shape[-1]}: "
                         f"expected a positive int whose square divides the width")
    b, n, fd = x.shape
    s, d = grid_of(n), fd // (factor * factor)
    x = x.reshape(b, s, s, factor, factor, d).permute(0, 1, 3, 2, 4, 5)  # (B, s, f, s, f, D)
    return x.reshape(b, s * factor * s * factor, d)


def _mlp(in_dim: int, lm_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))


class PoolConnector(nn.Module):
    """Average each factor x factor block of patches, then a 2-layer MLP: factor^2 times fewer tokens."""

    def __init__(self, image_dim: int, lm_dim: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.pool = nn.AvgPool2d(factor)
        self.mlp = _mlp(image_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, side, d = _check_patches(x, self.factor)
        grid = x.transpose(1, 2).reshape(b, d, side, side)  # (B, D, g, g)
        pooled = self.pool(grid).flatten(2).transpose(1, 2)  # (B, (g/f)^2, D)
        return self.mlp(pooled)


class PixelShuffleConnector(nn.Module):
    """`pixel_shuffle`, then LayerNorm and a 2-layer MLP (InternVL's connector): factor^2 times fewer, wider tokens."""

    def __init__(self, image_dim: int, lm_dim: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.norm = nn.LayerNorm(image_dim * factor * factor)
        self.mlp = _mlp(image_dim * factor * factor, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pixel_shuffle(x, self.factor)))


class _ConvBlock(nn.Module):
    """A residual 3x3 convolution with GroupNorm(1) (a LayerNorm over channels and places) and GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm = nn.GroupNorm(1, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.conv(x)))


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor at toy scale: conv blocks, adaptive average pooling to out_grid, conv blocks, a linear.

    The convolutions mix each patch with its neighbours before pooling, so a pooled token
    keeps local context (where things are) that plain averaging blurs.
    """

    def __init__(self, image_dim: int, lm_dim: int, out_grid: int = 4, depth: int = 1):
        super().__init__()
        if isinstance(out_grid, bool) or not isinstance(out_grid, int) or out_grid < 1:
            raise ValueError(f"out_grid {out_grid!r} is invalid: expected a positive int")
        self.out_grid = out_grid
        self.inp = nn.Linear(image_dim, lm_dim)
        self.before = nn.Sequential(*[_ConvBlock(lm_dim) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(out_grid)
        self.after = nn.Sequential(*[_ConvBlock(lm_dim) for _ in range(depth)])
        self.out = nn.Linear(lm_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, side, _ = _check_patches(x, 1)
        if side < self.out_grid:
            raise ValueError(f"a {side} x {side} grid cannot pool to {self.out_grid} x {self.out_grid}: "
                             f"expected out_grid <= {side}")
        h = self.inp(x).transpose(1, 2).reshape(b, -1, side, side)  # (B, lm_dim, g, g)
        h = self.after(self.pool(self.before(h)))  # (B, lm_dim, out, out)
        return self.out(h.flatten(2).transpose(1, 2))  # (B, out^2, lm_dim)


class QueryConnector(nn.Module):
    """Learnable queries that cross-attend to the projected patches (BLIP-2's Q-Former, MiniCPM-V's resampler, one layer).

    Attention treats the patches as a set, so each patch gets a fixed 2-D sin-cos code of its
    place first: without it the queries could not tell where anything is.
    """

    def __init__(self, image_dim: int, lm_dim: int, num_queries: int = 16, num_heads: int = 4):
        super().__init__()
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries {num_queries!r} is invalid: expected a positive int")
        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.inp = nn.Sequential(nn.Linear(image_dim, lm_dim), nn.LayerNorm(lm_dim))
        self.norm_q = nn.LayerNorm(lm_dim)
        self.attn = MultiHeadAttention(lm_dim, num_heads)
        self.mlp = _mlp(lm_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, side, _ = _check_patches(x, 1)
        places = sincos_2d_position_embedding(side, side, self.queries.shape[-1]).to(x.dtype)  # (g*g, lm_dim)
        keys = self.inp(x) + places  # (B, g*g, lm_dim)
        q = self.queries.expand(b, -1, -1)
        q = q + self.attn(self.norm_q(q), keys)
        return self.norm(q + self.mlp(q))


def make_connector(kind: str, image_dim: int, lm_dim: int, *, factor: int = 2, out_grid: int = 4,
                   num_queries: int = 16) -> nn.Module:
    """A connector by name (see the module's table): (B, grid^2, image_dim) -> (B, tokens, lm_dim)."""
    if kind in ("linear", "mlp"):
        from mllm_scratch.vlm import make_projector

        return make_projector(kind, image_dim, lm_dim)
    if kind == "avgpool":
        return PoolConnector(image_dim, lm_dim, factor)
    if kind == "pixelshuffle":
        return PixelShuffleConnector(image_dim, lm_dim, factor)
    if kind == "cabstractor":
        return CAbstractor(image_dim, lm_dim, out_grid)
    if kind == "queries":
        return QueryConnector(image_dim, lm_dim, num_queries)
    raise ValueError(f"connector kind {kind!r} is unknown: expected one of {KINDS}")


def connector_tokens(kind: str, grid: int, *, factor: int = 2, out_grid: int = 4, num_queries: int = 16) -> int:
    """How many image tokens a connector gives for a grid x grid patch grid (what sets the LM's sequence length)."""
    if kind in ("linear", "mlp"):
        return grid * grid
    if kind in ("avgpool", "pixelshuffle"):
        if grid % factor:
            raise ValueError(f"a {grid} x {grid} grid does not split into {factor} x {factor} blocks: "
                             f"expected a factor that divides {grid}")
        return (grid // factor) ** 2
    if kind == "cabstractor":
        return out_grid * out_grid
    if kind == "queries":
        return num_queries
    raise ValueError(f"connector kind {kind!r} is unknown: expected one of {KINDS}")


__all__ = [
    "CAbstractor",
    "KINDS",
    "PixelShuffleConnector",
    "PoolConnector",
    "QueryConnector",
    "connector_tokens",
    "grid_of",
    "make_connector",
    "pixel_shuffle",
    "pixel_unshuffle",
]
