"""Rotary position embeddings (RoPE): positions as rotations of queries and keys, in one, two or three axes.

RoPE (Su et al., 2021) adds nothing to the token vectors. It rotates each pair of a query's
or key's features by an angle proportional to the token's position, pair j at frequency
base ** (-2j / head_dim). A rotation by m * w and one by n * w leave the dot product depending
on (m - n) * w only, so attention scores see relative offsets, and a sequence or an image
longer than any seen in training still gets valid positions. Llama, Qwen and Pixtral use it.

    rope_angles(positions, head_dim)             1-D: the text of a GPT
    rope_2d_angles(rows, cols, head_dim)         2-D: half the pairs follow the row, half the column
                                                 (Pixtral, Qwen2-VL's vision tower)
    mrope_angles(positions_thw, head_dim, ...)   M-RoPE: sections of the pairs follow time, height
                                                 and width (Qwen2-VL's language model)
    apply_rope(x, angles)                        rotate queries or keys (batch, heads, tokens, head_dim)

Pairs are the two halves of the head dimension, feature i with feature i + head_dim / 2
(GPT-NeoX, Llama and Qwen in `transformers`); RoFormer pairs neighbours, 2i with 2i + 1.
The two differ by a fixed permutation of the features, applied alike to queries and keys,
so attention scores are the same (chapter 11 proves it).
`mrope_positions` builds Qwen2-VL's (time, height, width) indices for a sequence of text,
images and video frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROPE_BASE = 10_000.0


def check_head_dim(head_dim: int, multiple: int = 2) -> None:
    """RoPE rotates pairs of features (2-D RoPE: pairs for the row and for the column), so head_dim must split evenly."""
    if not isinstance(head_dim, int) or head_dim < multiple or head_dim % multiple:
        what = "pairs of features" if multiple == 2 else "pairs for the row and for the column"
        raise ValueError(f"RoPE rotates {what}: head_dim must be a positive multiple of {multiple}, got {head_dim}")


def rope_frequencies(num_pairs: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(num_pairs,) angular frequencies base ** (-j / num_pairs): pair 0 turns fastest, the last slowest."""
    return base ** (-torch.arange(num_pairs, dtype=torch.float64) / num_pairs)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """Positions (..., T) -> rotation angles (..., T, head_dim / 2): angle of pair j = position * frequency j."""
    check_head_dim(head_dim)
    freqs = rope_frequencies(head_dim // 2, base)  # (head_dim / 2,), float64
    if positions.device.type == "mps":  # Apple's MPS has no float64: compute on the CPU, then move
        return rope_angles(positions.detach().cpu(), head_dim, base).to(positions.device)
    angles = positions.to(torch.float64)[..., None] * freqs.to(positions.device)  # float64: exact for long sequences
    return angles.float()  # (..., T, head_dim / 2)


def rope_2d_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """Row and column (..., T) -> angles (..., T, head_dim / 2): the first half of the pairs turn with the row, the second with the column.

    Each axis gets the full range of frequencies over its head_dim / 4 pairs, as in Pixtral and
    Qwen2-VL's vision tower, so the column is resolved as finely as the row.
    """
    check_head_dim(head_dim, 4)
    if rows.shape != cols.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must have the same shape")
    half = rope_angles(torch.stack([rows, cols]), head_dim // 2, base)  # (2, ..., T, head_dim / 4)
    return torch.cat([half[0], half[1]], dim=-1)  # (..., T, head_dim / 2)


def default_mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """Qwen2-VL's split of the head_dim / 2 pairs into time, height and width: a quarter, then three eighths each."""
    check_head_dim(head_dim)
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return t, h, pairs - t - h


def mrope_angles(
    positions: torch.Tensor,
    head_dim: int,
    sections: Sequence[int] | None = None,
    base: float = ROPE_BASE,
    interleaved: bool = False,
) -> torch.Tensor:
    """Time, height and width positions (3, ..., T) -> angles (..., T, head_dim / 2) (M-RoPE, Qwen2-VL).

    The pairs keep the 1-D frequencies; the first sections[0] pairs turn with the time index,
    the next sections[1] with the height, the last sections[2] with the width. So time gets the
    fastest pairs and width the slowest. interleaved=True deals the pairs out in turn instead
    (time, height, width, time, ...; Qwen3-VL's interleaved M-RoPE), so every axis gets fast and
    slow pairs; `sections` is then ignored. Where the three indices are equal (text) either is
    `rope_angles` exactly.
    """
    check_head_dim(head_dim)
    sections = tuple(default_mrope_sections(head_dim) if sections is None else sections)
    if len(sections) != 3 or any(not isinstance(s, int) or s < 0 for s in sections) or sum(sections) != head_dim // 2:
        raise ValueError(
            f"sections {sections} must be three non-negative ints (time, height, width) that add up to "
            f"head_dim / 2 = {head_dim // 2}"
        )
    if positions.dim() < 2 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must have shape (3, ..., tokens): time, height, width; got {tuple(positions.shape)}")
    angles = rope_angles(positions, head_dim, base)  # (3, ..., T, head_dim / 2): every pair, for each axis
    if interleaved:
        axis = torch.arange(head_dim // 2) % 3  # (head_dim / 2,): pair j turns with axis j mod 3
    else:
        axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))  # (head_dim / 2,): which axis turns pair j
    return torch.stack([angles[a, ..., j] for j, a in enumerate(axis.tolist())], dim=-1)  # (..., T, head_dim / 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a quarter turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (batch, heads, T, head_dim) by angles (T, head_dim / 2) or (batch, T, head_dim / 2).

    Pair (x_i, x_{i + head_dim/2}) turns by angle i: x cos + rotate_half(x) sin. Computed in
    float32 and returned in x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects (batch, heads, tokens, head_dim), got {tuple(x.shape)}")
    t, d = x.shape[2], x.shape[3]
    if d % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim must be even, got {d}")
    if angles.dim() not in (2, 3) or angles.shape[-2:] != (t, d // 2) or (angles.dim() == 3 and angles.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"RoPE angles must have shape ({t}, {d // 2}) or (batch, {t}, {d // 2}) for {t} tokens of head_dim {d}, "
            f"got {tuple(angles.shape)}: one angle per token and pair"
        )
    if angles.dim() == 3:
        angles = angles[:, None]  # (batch, 1, T, head_dim / 2): the same rotation in every head
    angles = torch.cat([angles, angles], dim=-1).to(x.device)  # (..., T, head_dim): pair i and i + d/2 share an angle
    xf = x.float()
    return (xf * angles.cos() + rotate_half(xf) * angles.sin()).to(x.dtype)


def mrope_positions(segments: Sequence[int | tuple[int, int] | tuple[int, int, int]], start: int = 0) -> torch.Tensor:
    """Qwen2-VL's (time, height, width) indices for a sequence of parts -> (3, total tokens) long.

    Each part is an int (that many text tokens), (rows, cols) (an image's grid of tokens) or
    (frames, rows, cols) (a video: time advances by one per frame). Text tokens take equal
    indices, counting on; an image's tokens share the time index where it starts and add their
    row and column to it; the next part starts after the largest index used so far.
    """
    out, nxt = [], start
    for part in segments:
        if isinstance(part, int) and not isinstance(part, bool):
            if part < 0:
                raise ValueError(f"a text part must be a token count >= 0, got {part}")
            idx = torch.arange(nxt, nxt + part)
            out.append(torch.stack([idx, idx, idx]))  # (3, part): text moves along the diagonal
            nxt += part
            continue
        if not isinstance(part, tuple) or len(part) not in (2, 3) or not all(isinstance(v, int) and v > 0 for v in part):
            raise ValueError(f"a part must be an int (text tokens), (rows, cols) or (frames, rows, cols) of positive ints, got {part!r}")
        frames, rows, cols = (1, *part) if len(part) == 2 else part
        t = torch.arange(frames).repeat_interleave(rows * cols)  # (frames * rows * cols,): frame of each token
        h = torch.arange(rows).repeat_interleave(cols).repeat(frames)
        w = torch.arange(cols).repeat(rows * frames)
        out.append(torch.stack([t, h, w]) + nxt)  # (3, frames * rows * cols)
        nxt += max(frames, rows, cols)
    if not out:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(out, dim=1)


__all__ = [
    "ROPE_BASE",
    "apply_rope",
    "check_head_dim",
    "default_mrope_sections",
    "mrope_angles",
    "mrope_positions",
    "rope_2d_angles",
    "rope_angles",
    "rope_frequencies",
    "rotate_half",
]
