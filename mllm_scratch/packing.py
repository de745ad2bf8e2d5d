"""Packing: images of different sizes in one sequence, each attending only to itself (NaViT, Pixtral).

A batch of images at their native sizes has a different number of patches per image.
Padding every image's sequence to the longest wastes tokens; packing concatenates the
sequences instead and stops attention at the image boundaries with a block-diagonal mask:

    image 0 (2 x 3 patches) | image 1 (4 x 4 patches) | ...   -> one sequence of 6 + 16 + ... tokens
    mask[i, j] = segment[i] == segment[j]                     -> an image sees only itself

`pack_patches` records, for every token of the packed sequence, which image it belongs to
and its row and column in that image (for 2-D RoPE); `VisionTransformer.forward_packed` uses
it. `costs.packing_costs` counts what padding and packing spend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class PackedPatches(NamedTuple):
    """Where each token of a packed sequence comes from; every field has one entry per token (total,)."""

    segment: torch.Tensor  # long: index of the image the token belongs to
    rows: torch.Tensor  # long: the token's patch row in its image (0 for a [CLS] token)
    cols: torch.Tensor  # long: the token's patch column
    is_prefix: torch.Tensor  # bool: a [CLS] token, which has no place in the image
    spans: tuple[tuple[int, int], ...]  # (start, stop) of each image's tokens in the sequence

    def attention_mask(self) -> torch.Tensor:
        """(total, total) bool, True where query and key belong to the same image: block-diagonal."""
        return self.segment[:, None] == self.segment[None, :]


def image_grid(image: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of patches of one image (C, H, W); H and W must be positive multiples of patch_size."""
    if image.dim() != 3:
        raise ValueError(f"each image must have shape (channels, height, width), got {tuple(image.shape)}")
    h, w = image.shape[1:]
    if h == 0 or w == 0 or h % patch_size or w % patch_size:
        raise ValueError(f"image height {h} and width {w} must be positive multiples of patch_size {patch_size}")
    return h // patch_size, w // patch_size


def pack_patches(images: Sequence[torch.Tensor], patch_size: int, num_prefix: int = 0) -> PackedPatches:
    """The packing plan for images (each (C, H, W), sizes may differ): num_prefix [CLS] tokens, then row-major patches, per image."""
    if len(images) == 0:
        raise ValueError("pack_patches needs at least one image, got none")
    segment, rows, cols, prefix, spans, start = [], [], [], [], [], 0
    for i, image in enumerate(images):
        gh, gw = image_grid(image, patch_size)
        n = num_prefix + gh * gw
        segment.append(torch.full((n,), i))
        rows.append(torch.cat([torch.zeros(num_prefix, dtype=torch.long), torch.arange(gh).repeat_interleave(gw)]))
        cols.append(torch.cat([torch.zeros(num_prefix, dtype=torch.long), torch.arange(gw).repeat(gh)]))
        prefix.append(torch.arange(n) < num_prefix)
        spans.append((start, start + n))
        start += n
    return PackedPatches(torch.cat(segment), torch.cat(rows), torch.cat(cols), torch.cat(prefix), tuple(spans))


__all__ = ["PackedPatches", "image_grid", "pack_patches"]
