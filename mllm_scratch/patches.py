"""Images as tokens: cut an image into patches and project each patch to a vector.

A patch embedding is one linear map applied to every flattened patch. It can be written
as `nn.Linear` on flattened patches or as `nn.Conv2d(kernel_size=stride=patch_size)`;
chapter 01 proves the two equal, and `PatchEmbedding` converts weights between them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PatchOrder = Literal["chw", "hwc"]


def _check_images(images: torch.Tensor, patch_size: int, channels: int | None = None) -> tuple[int, int, int, int]:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if images.dim() != 4:
        raise ValueError(
            f"images must have shape (batch, channels, height, width), got {images.dim()} dims {tuple(images.shape)}"
        )
    b, c, h, w = images.shape
    if channels is not None and c != channels:
        raise ValueError(f"images have {c} channels, expected {channels} (shape is (batch, channels, height, width))")
    if h % patch_size:
        raise ValueError(f"image height {h} is not divisible by patch_size {patch_size}")
    if w % patch_size:
        raise ValueError(f"image width {w} is not divisible by patch_size {patch_size}")
    return b, c, h, w


def num_patches(image_size: int | tuple[int, int], patch_size: int) -> int:
    """How many patches (tokens) an image of this size becomes."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    for name, side in (("height", h), ("width", w)):
        if side % patch_size:
            raise ValueError(f"image {name} {side} is not divisible by patch_size {patch_size}")
    return (h // patch_size) * (w // patch_size)


def patchify(images: torch.Tensor, patch_size: int, order: PatchOrder = "chw") -> torch.Tensor:
    """(batch, C, H, W) -> (batch, num_patches, patch_dim), patches in row-major grid order.

    order="chw" flattens each patch channel first, the order `Conv2d` weights use;
    order="hwc" flattens pixel by pixel (all channels of a pixel together).
    """
    b, c, h, w = _check_images(images, patch_size)
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # (b, c, rows, p, cols, p)
    if order == "chw":
        x = x.permute(0, 2, 4, 1, 3, 5)  # (b, rows, cols, c, p, p)
    elif order == "hwc":
        x = x.permute(0, 2, 4, 3, 5, 1)  # (b, rows, cols, p, p, c)
    else:
        raise ValueError(f"order must be 'chw' or 'hwc', got {order!r}")
    return x.reshape(b, (h // p) * (w // p), c * p * p)  # (b, num_patches, patch_dim)


def unpatchify(
    patches: torch.Tensor,
    patch_size: int,
    image_size: int | tuple[int, int],
    channels: int = 3,
    order: PatchOrder = "chw",
) -> torch.Tensor:
    """Inverse of `patchify`: (batch, num_patches, patch_dim) -> (batch, C, H, W)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    n = num_patches((h, w), patch_size)
    p = patch_size
    if patches.dim() != 3 or patches.shape[1] != n or patches.shape[2] != channels * p * p:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit images of size {h}x{w} with {channels} channels "
            f"and patch_size {p}: expected (batch, {n}, {channels * p * p})"
        )
    b = patches.shape[0]
    if order == "chw":
        x = patches.reshape(b, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    elif order == "hwc":
        x = patches.reshape(b, h // p, w // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        raise ValueError(f"order must be 'chw' or 'hwc', got {order!r}")
    return x.reshape(b, channels, h, w)  # (b, c, rows, p, cols, p) -> (b, c, h, w)


def conv_to_linear(conv: nn.Conv2d) -> nn.Linear:
    """A `Linear` on channel-first flattened patches that computes exactly what `conv` computes."""
    k, s = conv.kernel_size, conv.stride
    if k[0] != k[1] or tuple(s) != tuple(k) or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(
            f"only a patch convolution converts to a Linear: expected square kernel_size == stride, no padding, "
            f"dilation 1, groups 1; got kernel_size={k}, stride={s}, padding={conv.padding}, "
            f"dilation={conv.dilation}, groups={conv.groups}"
        )
    linear = nn.Linear(conv.in_channels * k[0] * k[1], conv.out_channels, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(conv.out_channels, -1))  # (dim, C, P, P) -> (dim, C*P*P)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear.to(conv.weight.device, conv.weight.dtype)


def linear_to_conv(linear: nn.Linear, in_channels: int, patch_size: int) -> nn.Conv2d:
    """A patch `Conv2d` that computes exactly what `linear` computes on channel-first flattened patches."""
    expected = in_channels * patch_size * patch_size
    if linear.in_features != expected:
        raise ValueError(
            f"linear.in_features is {linear.in_features}, expected in_channels * patch_size**2 = "
            f"{in_channels} * {patch_size}**2 = {expected}"
        )
    conv = nn.Conv2d(in_channels, linear.out_features, patch_size, stride=patch_size, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, patch_size, patch_size))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv.to(linear.weight.device, linear.weight.dtype)


class PatchEmbedding(nn.Module):
    """Image -> one vector per patch, computed by a `Linear` on patches or a strided `Conv2d`."""

    def __init__(self, patch_size: int = 4, in_channels: int = 3, dim: int = 64, mode: Literal["conv", "linear"] = "conv"):
        super().__init__()
        if mode not in ("conv", "linear"):
            raise ValueError(f"mode must be 'conv' or 'linear', got {mode!r}")
        for name, value in (("patch_size", patch_size), ("in_channels", in_channels), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.patch_size, self.in_channels, self.dim, self.mode = patch_size, in_channels, dim, mode
        if mode == "conv":
            self.proj: nn.Module = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.patch_size, self.in_channels)
        if self.mode == "conv":
            x = self.proj(images)  # (batch, dim, rows, cols)
            return x.flatten(2).transpose(1, 2)  # (batch, num_patches, dim)
        return self.proj(patchify(images, self.patch_size))  # (batch, num_patches, dim)

    def converted(self, mode: Literal["conv", "linear"]) -> "PatchEmbedding":
        """A copy in the other form (`conv` or `linear`) with the same weights, so the same outputs."""
        out = PatchEmbedding(self.patch_size, self.in_channels, self.dim, mode)
        if mode == self.mode:
            out.load_state_dict(self.state_dict())
        elif mode == "linear":
            out.proj = conv_to_linear(self.proj)  # type: ignore[arg-type]
        else:
            out.proj = linear_to_conv(self.proj, self.in_channels, self.patch_size)  # type: ignore[arg-type]
        return out.to(next(self.parameters()).device)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, patch_size={self.patch_size}"
