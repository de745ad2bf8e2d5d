"""Multi-head attention: one module for self-attention, causal attention and cross-attention.

The ViT (bidirectional self-attention), the GPT (causal self-attention with a KV cache),
the cross-attention decoder (text queries, image keys/values) and the Perceiver (latent
queries, media keys/values) all use `MultiHeadAttention`. Chapter 02 builds attention by
hand and proves it equal to this module, which calls `F.scaled_dot_product_attention`.

Masks follow one convention everywhere: boolean, True means "may attend".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.rope import apply_rope


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention written out: softmax(q k^T / sqrt(d)) v, with masked scores set to -inf.

    q: (..., Tq, d), k and v: (..., Tk, d), mask: broadcastable to (..., Tq, Tk), True = attend.
    Rows with no allowed key come out as zeros (not NaN). Kept for teaching and for tests.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a fully masked row is all -inf: softmax gives NaN
    return weights @ v  # (..., Tq, d)


def causal_mask(num_queries: int, num_keys: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True on and below the diagonal, aligned so the last query sees every key.

    With a KV cache the queries are the newest `num_queries` of `num_keys` positions, so
    query i sits at absolute position num_keys - num_queries + i.
    """
    num_keys = num_queries if num_keys is None else num_keys
    if num_keys < num_queries:
        raise ValueError(f"a causal mask needs at least as many keys as queries, got {num_queries} queries and {num_keys} keys")
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=num_keys - num_queries)


class KVCache:
    """Keys and values of the tokens already processed by one attention layer, for fast generation."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (batch, heads, cached_len, head_dim)
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; return all of them."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention if `context` is None, cross-attention over `context` otherwise."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}: each head needs dim // num_heads features")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        context_dim = dim if context_dim is None else context_dim
        self.dim, self.num_heads, self.head_dim, self.context_dim = dim, num_heads, dim // num_heads, context_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, dim, bias=bias)
        self.v_proj = nn.Linear(context_dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)

    def _queries_keys(
        self, x: torch.Tensor, source: torch.Tensor, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self._split_heads(self.q_proj(x))  # (b, heads, Tq, head_dim)
        k = self._split_heads(self.k_proj(source))  # (b, heads, Tk, head_dim)
        if rope is not None:  # rotate by position (chapter 11); the values are not rotated
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (batch, Tq, dim); context: (batch, Tk, context_dim) or None (then keys come from x).

        attn_mask: boolean, broadcastable to (batch, heads, Tq, Tk), True = may attend.
        key_padding_mask: (batch, Tk), True = a real key, False = padding.
        causal: each query sees only keys at its own position or earlier.
        cache: a `KVCache`. In self-attention it receives this call's keys/values and returns
        every position's so far. In cross-attention the context does not grow: an empty cache
        stores the context's keys/values, and a filled one is used instead of recomputing them
        (`context` is then only checked for shape), so a decoder projects its media once.
        rope: rotary angles (Tq, head_dim / 2) or (batch, Tq, head_dim / 2) of this call's tokens
        (`mllm_scratch.rope`); queries and keys are rotated before keys enter the cache. Self-attention only.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        source = x if context is None else context
        if context is not None:
            if context.dim() != 3 or context.shape[-1] != self.context_dim or context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"context must have shape ({x.shape[0]}, tokens, {self.context_dim}), got {tuple(context.shape)}"
                )
            if causal:
                raise ValueError("causal applies to self-attention only; cross-attention keys are not positions in x")
            if rope is not None:
                raise ValueError("rope applies to self-attention only: cross-attention keys have no positions in x")
        if context is not None and cache is not None and cache.k is not None:
            q = self._split_heads(self.q_proj(x))  # the context's keys and values are already in the cache
            k, v = cache.k, cache.v
        else:
            q, k = self._queries_keys(x, source, rope)  # (b, heads, Tq, head_dim), (b, heads, Tk, head_dim)
            v = self._split_heads(self.v_proj(source))
            if cache is not None:
                k, v = cache.append(k, v)  # self-attention: keys now cover every position so far
        tq, tk = q.shape[2], k.shape[2]

        dropout_p = self.dropout if self.training else 0.0
        if causal and tq == tk and attn_mask is None and key_padding_mask is None:
            # A square causal mask alone: the kernel's own causal path skips the masked half.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            mask = self._combine_masks(attn_mask, key_padding_mask, causal, x.shape[0], tq, tk, x.device)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                # A query with no key to attend to (text before any image, a padded row) must
                # give zeros, not NaN: let it attend everywhere, then zero its output.
                has_key = mask.any(dim=-1, keepdim=True)  # (b|1, heads|1, Tq, 1)
                safe = mask | ~has_key
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, dropout_p=dropout_p)
                out = out * has_key
        out = out.transpose(1, 2).reshape(x.shape[0], tq, self.dim)  # (b, Tq, dim)
        return self.out_proj(out)

    @torch.no_grad()
    def attention_weights(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The softmax weights `forward` uses, (batch, heads, Tq, Tk), for plots; fully masked rows are zeros."""
        if context is not None and rope is not None:
            raise ValueError("rope applies to self-attention only: cross-attention keys have no positions in x")
        q, k = self._queries_keys(x, x if context is None else context, rope)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (b, heads, Tq, Tk)
        mask = self._combine_masks(attn_mask, key_padding_mask, causal, x.shape[0], q.shape[2], k.shape[2], x.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    @staticmethod
    def _combine_masks(
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        batch: int,
        tq: int,
        tk: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        mask = None
        if causal and tq > 1:  # a single new query may see every cached key
            mask = causal_mask(tq, tk, device)  # (Tq, Tk)
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be boolean (True = may attend), got dtype {attn_mask.dtype}")
            if attn_mask.shape[-2:] != (tq, tk):
                raise ValueError(f"attn_mask's last two dims must be (queries, keys) = ({tq}, {tk}), got {tuple(attn_mask.shape)}")
            mask = attn_mask if mask is None else mask & attn_mask
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, tk):
                raise ValueError(
                    f"key_padding_mask must be boolean of shape (batch, keys) = ({batch}, {tk}), "
                    f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            pad = key_padding_mask[:, None, None, :]  # (b, 1, 1, Tk)
            mask = pad if mask is None else mask & pad
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        return mask
