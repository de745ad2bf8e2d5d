"""Real images in, tensors out: any file Pillow can open, and the photograph matplotlib ships."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as a float tensor (3, H, W) in [0, 1], resized (bicubic) to `size` if given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # greyscale, palette and RGBA files all become 3 channels
            if size is not None:
                w, h = (size, size) if isinstance(size, int) else (size[1], size[0])
                if w < 1 or h < 1:
                    raise ValueError(f"size must be positive, got {size!r}")
                img = img.resize((w, h), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8).copy()
    except UnidentifiedImageError as exc:
        raise ValueError(f"{str(path)!r} is not an image file Pillow can read ({exc})") from None
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def sample_photo_path() -> Path:
    """Path of the photograph in matplotlib's sample data (Grace Hopper), available offline."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"matplotlib's sample photo is missing at {path}; reinstall matplotlib")
    return path


def sample_photo(size: int | tuple[int, int] | None = 224) -> torch.Tensor:
    """The sample photograph as a (3, H, W) tensor in [0, 1]."""
    return load_image(sample_photo_path(), size)
