"""The Perceiver and Flamingo's Perceiver Resampler: a fixed number of learned latents summarise a long input.

A video of T frames through a ViT gives T x S patch vectors: the count grows with the
clip, and so would the work of any language model that reads them. Both modules here
turn any number of input vectors into `num_latents` vectors:

    Perceiver (Jaegle et al., 2021)
        latents (L, d) --cross-attend--> inputs (N, d_in)        once: cost O(L * N)
        -> depth x self-attention blocks on the latents         cost O(L^2), not O(N^2)
        -> LayerNorm -> (L, d)

    Perceiver Resampler (Alayrac et al., 2022, Flamingo)
        frame features (T, S, d_media) -> Linear to d (if the widths differ)
        + a learned time embedding per frame (T, 1, d)
        [+ a fixed 2-D sin-cos code of each patch's place (S, d): spatial_pos, not in Flamingo]
        flattened -> media (T * S, d)
        -> depth x [latents attend to concat(media, latents); MLP] -> LayerNorm -> (L, d)

The Perceiver takes a `key_padding_mask` (True = a real input), the resampler a
`frame_mask` (True = a real frame): a clip padded with blank frames gives exactly the
output of the clip without them. The latents start random: identical
latents would ask identical questions, get identical answers and identical gradients,
and stay copies of each other forever. Chapter 09 builds both by hand and proves them
equal to these modules; `mllm_scratch.video` feeds the resampler's output to the
chapter-07 cross-attention decoder and the chapter-06 unified decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm_scratch.attention import MultiHeadAttention
from mllm_scratch.runtime import check_positive_ints
from mllm_scratch.train import no_weight_decay
from mllm_scratch.vit import MLP, TransformerBlock, config_dict, sincos_2d_position_embedding


def _check_shape(config: Any, names: tuple[str, ...]) -> None:
    check_positive_ints(config, *names)
    if config.dim % config.num_heads:
        raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
    if config.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {config.mlp_ratio}")


def _latents(num_latents: int, dim: int) -> nn.Parameter:
    # Random, never constant: equal latents would stay equal under every gradient step (see the module docstring).
    return no_weight_decay(nn.Parameter(torch.randn(num_latents, dim)))  # (L, dim)


# ----------------------------------------------------------------------------------
# The Perceiver: cross-attend once, then think in the small latent space


@dataclass
class PerceiverConfig:
    """Shape of a Perceiver: input width, latent width and count, self-attention depth."""

    input_dim: int = 48
    dim: int = 64
    num_latents: int = 16
    depth: int = 2  # latent self-attention blocks after the cross-attention
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check_shape(self, ("input_dim", "dim", "num_latents", "num_heads"))
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {self.depth!r}")

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


class Perceiver(nn.Module):
    """Perceiver encoder: inputs (batch, N, input_dim) -> latents (batch, num_latents, dim), for any N."""

    def __init__(self, config: PerceiverConfig | None = None):
        super().__init__()
        self.config = c = config or PerceiverConfig()
        self.latents = _latents(c.num_latents, c.dim)
        self.norm_latents = nn.LayerNorm(c.dim)
        self.norm_inputs = nn.LayerNorm(c.input_dim)
        self.cross_attn = MultiHeadAttention(c.dim, c.num_heads, context_dim=c.input_dim)  # queries: latents
        self.norm_mlp = nn.LayerNorm(c.dim)
        self.mlp = MLP(c.dim, int(c.dim * c.mlp_ratio))
        self.blocks = nn.ModuleList(TransformerBlock(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, inputs: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: (batch, N, input_dim); key_padding_mask: (batch, N), True = a real input."""
        c = self.config
        if inputs.dim() != 3 or inputs.shape[-1] != c.input_dim:
            raise ValueError(f"inputs must have shape (batch, N, {c.input_dim}), got {tuple(inputs.shape)}")
        x = self.latents.expand(inputs.shape[0], -1, -1)  # (batch, L, dim)
        x = x + self.cross_attn(self.norm_latents(x), self.norm_inputs(inputs), key_padding_mask=key_padding_mask)
        x = x + self.mlp(self.norm_mlp(x))
        for block in self.blocks:
            x = block(x)  # latents attend to latents: O(L^2), whatever N is
        return self.norm(x)  # (batch, L, dim)


# ----------------------------------------------------------------------------------
# Flamingo's Perceiver Resampler: media from T frames -> num_latents visual tokens


@dataclass
class ResamplerConfig:
    """Shape of a Perceiver Resampler: feature width in, latent width and count, depth, frames it has times for."""

    media_dim: int = 48  # width of the image tower's patch vectors
    dim: int = 64  # width of the latents (and of the output tokens)
    num_latents: int = 16
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_frames: int = 64  # rows of the learned time-embedding table
    # Add a fixed 2-D sin-cos code of each patch's place in its frame (not in Flamingo; see PerceiverResampler).
    spatial_pos: bool = False

    def __post_init__(self) -> None:
        _check_shape(self, ("media_dim", "dim", "num_latents", "depth", "num_heads", "max_frames"))
        if self.spatial_pos and self.dim % 4:
            raise ValueError(f"spatial_pos needs dim divisible by 4 (2-D sin-cos codes), got dim {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


class ResamplerLayer(nn.Module):
    """One resampler layer: latents attend to concat(media, latents), then an MLP; pre-norm, residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)  # cross-attention: queries latents, keys media + latents
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def keys(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """What the latents attend to: normed media, then normed latents -> (batch, M + L, dim)."""
        return torch.cat([self.norm_media(media), self.norm_latents(latents)], dim=1)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """media (batch, M, dim), latents (batch, L, dim), key_padding_mask (batch, M + L) -> latents (batch, L, dim)."""
        x = latents + self.attn(self.norm_latents(latents), self.keys(media, latents), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm_mlp(x))


class PerceiverResampler(nn.Module):
    """Flamingo's resampler: frame features (batch, T, S, media_dim) -> (batch, num_latents, dim), for any T <= max_frames.

    Attention treats its keys as a set: a media token says *when* (the time embedding) but
    *where* only if the image tower's patch vectors still carry it. With spatial_pos=True
    each token also gets the 2-D sin-cos code of its patch (S must be a square grid), so
    latents can compare the same place across frames, which is what motion is.
    """

    def __init__(self, config: ResamplerConfig | None = None):
        super().__init__()
        self.config = c = config or ResamplerConfig()
        self.proj = nn.Identity() if c.media_dim == c.dim else nn.Linear(c.media_dim, c.dim)
        # Unit scale, like the features they are added to: a time signal 50 times weaker than the
        # content would take hundreds of steps to grow before the latents could tell frames apart.
        self.time_emb = no_weight_decay(nn.Parameter(torch.randn(c.max_frames, 1, c.dim)))  # (T_max, 1, dim)
        self.latents = _latents(c.num_latents, c.dim)
        self.layers = nn.ModuleList(ResamplerLayer(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)

    def _check(self, media: torch.Tensor, frame_mask: torch.Tensor | None) -> None:
        c = self.config
        if media.dim() != 4 or media.shape[-1] != c.media_dim:
            raise ValueError(
                f"media must have shape (batch, frames, tokens_per_frame, {c.media_dim}), got {tuple(media.shape)}"
            )
        frames = media.shape[1]
        if not 1 <= frames <= c.max_frames:
            raise ValueError(
                f"a clip of {frames} frames needs {frames} time embeddings, but this resampler has {c.max_frames} "
                f"(max_frames): sample at most {c.max_frames} frames (mllm_scratch.video.sample_frames), "
                f"or build the resampler with max_frames >= {frames}"
            )
        if frame_mask is not None and (frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != tuple(media.shape[:2])):
            raise ValueError(
                f"frame_mask must be boolean of shape (batch, frames) = {tuple(media.shape[:2])}, "
                f"got {frame_mask.dtype} {tuple(frame_mask.shape)}"
            )

    def media_tokens(self, media: torch.Tensor) -> torch.Tensor:
        """Features (batch, T, S, media_dim) -> projected, time-stamped and flattened (batch, T * S, dim)."""
        b, t, s, _ = media.shape
        x = self.proj(media) + self.time_emb[:t]  # (batch, T, S, dim): frame t gets time embedding t
        if self.config.spatial_pos:
            x = x + self.spatial_codes(s).to(x.dtype)  # (S, dim) broadcast over batch and frames
        return x.reshape(b, t * s, self.config.dim)  # (batch, T * S, dim)

    def spatial_codes(self, tokens_per_frame: int) -> torch.Tensor:
        """(S, dim) fixed 2-D sin-cos codes of a square grid of S patches, row-major like the image tower's patches."""
        grid = math.isqrt(tokens_per_frame)
        if grid * grid != tokens_per_frame:
            raise ValueError(f"spatial_pos needs a square grid of patches per frame, got {tokens_per_frame} tokens per frame")
        return sincos_2d_position_embedding(grid, grid, self.config.dim).to(self.latents.device)  # (S, dim)

    def key_padding_mask(self, frame_mask: torch.Tensor | None, tokens_per_frame: int) -> torch.Tensor | None:
        """(batch, T) frame mask -> (batch, T * S + L) key mask over media tokens, then the (always real) latents."""
        if frame_mask is None:
            return None
        media = frame_mask.repeat_interleave(tokens_per_frame, dim=1)  # (batch, T * S)
        latents = torch.ones(frame_mask.shape[0], self.config.num_latents, dtype=torch.bool, device=frame_mask.device)
        return torch.cat([media, latents], dim=1)  # (batch, T * S + L)

    def forward(self, media: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """media: (batch, T, S, media_dim); frame_mask: (batch, T), True = a real frame, False = padding."""
        self._check(media, frame_mask)
        x = self.media_tokens(media)  # (batch, T * S, dim)
        mask = self.key_padding_mask(frame_mask, media.shape[2])
        latents = self.latents.expand(media.shape[0], -1, -1)  # (batch, L, dim)
        for layer in self.layers:
            latents = layer(x, latents, mask)
        return self.norm(latents)  # (batch, L, dim): L does not depend on T or S

    @torch.no_grad()
    def attention_maps(self, media: torch.Tensor, frame_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each layer's attention weights (batch, heads, L, T * S + L), keys = media tokens then latents, for plots."""
        self._check(media, frame_mask)
        x = self.media_tokens(media)
        mask = self.key_padding_mask(frame_mask, media.shape[2])
        latents = self.latents.expand(media.shape[0], -1, -1)
        maps = []
        for layer in self.layers:
            maps.append(layer.attn.attention_weights(layer.norm_latents(latents), layer.keys(x, latents),
                                                     key_padding_mask=mask))
            latents = layer(x, latents, mask)
        return maps


__all__ = [
    "Perceiver",
    "PerceiverConfig",
    "PerceiverResampler",
    "ResamplerConfig",
    "ResamplerLayer",
]
