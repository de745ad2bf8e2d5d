"""Figures the chapters share: an image with its patch grid, a row of images."""

from __future__ import annotations

import torch


def _as_hwc(image: torch.Tensor):
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (channels, height, width) with 1 or 3 channels, got {tuple(image.shape)}")
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, C) for imshow


def show_image(image: torch.Tensor, ax=None, patch_size: int | None = None, title: str | None = None, number: bool = False):
    """Draw a (C, H, W) image in [0, 1]; with `patch_size`, draw the patch grid (and number the patches)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    hwc = _as_hwc(image)
    h, w = hwc.shape[:2]
    ax.imshow(hwc.squeeze(-1) if hwc.shape[-1] == 1 else hwc, cmap="gray", interpolation="nearest", extent=(0, w, h, 0))
    if patch_size:
        for x in range(0, w + 1, patch_size):
            ax.axvline(x, color="white", lw=0.6, alpha=0.8)
        for y in range(0, h + 1, patch_size):
            ax.axhline(y, color="white", lw=0.6, alpha=0.8)
        if number:
            cols = w // patch_size
            for k in range((h // patch_size) * cols):
                r, c = divmod(k, cols)
                ax.text((c + 0.5) * patch_size, (r + 0.5) * patch_size, str(k), color="white",
                        ha="center", va="center", fontsize=7,
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 0.8, "linewidth": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_row(images: list[torch.Tensor], titles: list[str] | None = None, size: float = 1.0):
    """A row of small images, e.g. the patches of one image in sequence order."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size * 1.3), squeeze=False)
    for i, (ax, img) in enumerate(zip(axes[0], images)):
        show_image(img, ax=ax, title=None if titles is None else titles[i])
    fig.tight_layout()
    return fig
