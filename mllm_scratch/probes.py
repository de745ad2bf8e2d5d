"""Linear probes: can an object's shape be read from frozen patch features? (chapter 06's diagnosis)

    features(images) -> (n, num_patches, d) patch vectors (raw pixels, a tower, a tuned tower)
    object_windows   -> per object: the size x size patch vectors from the patch under its
                        top-left corner ("arrangement", flattened) and their mean, and its shape
    linear_probe     -> accuracy of a linear classifier trained on one split, scored on another

A probe that reads shape from the *mean* says every patch of the object knows the shape; one
that needs the *arrangement* says the shape is only in how the patches sit together. Probing
one-object scenes and crowded (1-3 object) scenes separates "the tower sees shape" from
"the tower sees shape when other objects are around".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllm_scratch.shapeworld import (
    SHAPES,
    ShapeWorldConfig,
    generate_scene,
    render,
    split_seed,
    to_tensor,
)


def object_windows(
    split: str,
    n: int,
    features: Callable[[torch.Tensor], torch.Tensor],
    config: ShapeWorldConfig | None = None,
    size: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every object of the first `n` scenes of `split`: (arrangement (m, size*size*d), mean (m, d), shape labels (m,)).

    `features` maps images (n, 3, H, W) to patch vectors (n, g*g, d) on a square g x g grid.
    A window starts at the patch holding the object's top-left pixel and is zero-padded past
    the image's edge, so a large object (3/8 of the image) always fits when size covers it.
    """
    config = config or ShapeWorldConfig()
    if n < 1 or size < 1:
        raise ValueError(f"n and size must be at least 1, got n={n}, size={size}")
    scenes = [generate_scene(split_seed(split, i), config, split) for i in range(n)]
    images = torch.stack([to_tensor(render(s)) for s in scenes])
    with torch.no_grad():
        feats = features(images)
    grid = round(feats.shape[1] ** 0.5)
    if feats.dim() != 3 or feats.shape[0] != n or grid * grid != feats.shape[1]:
        raise ValueError(f"features must return (n={n}, g*g, d) patch vectors on a square grid, got {tuple(feats.shape)}")
    patch = config.image_size // grid
    padded = F.pad(feats.reshape(n, grid, grid, -1), (0, 0, 0, size, 0, size))  # (n, g + size, g + size, d)
    windows, labels = [], []
    for k, scene in enumerate(scenes):
        for obj in scene.objects:
            row, col = obj.y // patch, obj.x // patch
            windows.append(padded[k, row : row + size, col : col + size])
            labels.append(SHAPES.index(obj.shape))
    stacked = torch.stack(windows)  # (m, size, size, d)
    return stacked.flatten(1), stacked.mean((1, 2)), torch.tensor(labels)


@torch.enable_grad()
def linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
    num_classes: int = len(SHAPES), steps: int = 300, lr: float = 1e-2, seed: int = 0,
) -> float:
    """Validation accuracy of a linear classifier (Adam, full batch) on standardised features."""
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
        raise ValueError(f"features and labels differ in length: train {len(x_train)} vs {len(y_train)}, "
                         f"val {len(x_val)} vs {len(y_val)}")
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5  # the statistics of the training split only
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.copy_((torch.rand(probe.weight.shape, generator=generator) - 0.5) * 2 / x_train.shape[1] ** 0.5)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe((x_train - mu) / sd), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe((x_val - mu) / sd).argmax(1) == y_val).float().mean().item()


def shape_probe(
    features: Callable[[torch.Tensor], torch.Tensor],
    config: ShapeWorldConfig | None = None,
    n_train: int = 1000,
    n_val: int = 300,
) -> dict[str, float]:
    """Shape accuracy of linear probes on `features`, trained on "train" scenes and scored on "val": mean and arrangement."""
    (w_tr, m_tr, y_tr), (w_va, m_va, y_va) = (object_windows(s, n, features, config) for s, n in (("train", n_train), ("val", n_val)))
    return {"mean": linear_probe(m_tr, y_tr, m_va, y_va), "arrangement": linear_probe(w_tr, y_tr, w_va, y_va)}


__all__ = ["linear_probe", "object_windows", "shape_probe"]
