"""Real images in, tensors out: any file Pillow can open, the photograph matplotlib ships, and clips as GIFs or frames.

Reading resizes to the model's size: bicubic in general, but an exact block average when the
file is a whole-number multiple of that size, so a ShapeWorld scene saved upscaled (nearest
neighbour, as `save_image` does) reads back as exactly the pixels the models were trained on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

# What a folder of frames may hold (other files, such as notes, are ignored).
FRAME_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _resized(img, size: int | tuple[int, int] | None):
    """A PIL image resized to `size` (int: square; (H, W)): block average for whole-number factors, else bicubic."""
    from PIL import Image

    if size is None:
        return img
    h, w = (size, size) if isinstance(size, int) else size
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    if (img.width, img.height) == (w, h):
        return img
    if img.width % w == 0 and img.height % h == 0:  # e.g. a 256 px upscale of a 32 px scene: undo it exactly
        return img.reduce((img.width // w, img.height // h))
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _to_tensor(img) -> torch.Tensor:
    array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()  # greyscale, palette, RGBA: all 3 channels
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as a float tensor (3, H, W) in [0, 1], resized to `size` (int or (H, W)) if given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return _to_tensor(_resized(img.convert("RGB"), size))
    except UnidentifiedImageError as exc:
        raise ValueError(f"{str(path)!r} is not an image file Pillow can read ({exc})") from None


def _upscaled(pixels: np.ndarray, size: int | None):
    """uint8 (H, W, 3) -> a PIL image, enlarged with nearest neighbour to `size` px wide (None: as it is)."""
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels of dtype {pixels.dtype} and shape {pixels.shape}: expected uint8 (H, W, 3)")
    img = Image.fromarray(pixels)
    if size is None or size == img.width:
        return img
    if size < img.width:
        raise ValueError(f"size {size} is smaller than the image ({img.width} px): expected at least {img.width}")
    return img.resize((size, size * img.height // img.width), Image.Resampling.NEAREST)


def save_image(pixels: np.ndarray, path: str | os.PathLike, size: int | None = None) -> Path:
    """Write uint8 pixels (H, W, 3) to an image file (PNG, ...), enlarged with nearest neighbour to `size` px wide."""
    path = Path(path)
    _upscaled(pixels, size).save(path)
    return path


def save_gif(frames: np.ndarray, path: str | os.PathLike, size: int | None = None, ms_per_frame: int = 200) -> Path:
    """Write a clip (T, H, W, 3) uint8 as a looping animated GIF, lossless when it has at most 256 colours.

    One palette, built from the clip's own colours, serves every frame, so no colour is
    approximated (ShapeWorld clips use a few dozen). Pillow merges a frame identical to the
    one before into a frame shown twice as long; `load_frames` counts it twice again.
    """
    from PIL import Image

    if frames.ndim != 4 or len(frames) < 1:
        raise ValueError(f"frames of shape {frames.shape}: expected (T, H, W, 3) with T >= 1")
    colours, index = np.unique(frames.reshape(-1, 3), axis=0, return_inverse=True)  # (C, 3), (T * H * W,)
    if len(colours) > 256:
        raise ValueError(f"the clip has {len(colours)} colours: a GIF holds at most 256")
    palette = colours.astype(np.uint8).flatten().tolist()
    index = index.reshape(frames.shape[:3]).astype(np.uint8)  # (T, H, W) palette indices
    images = []
    for t in range(len(frames)):
        img = Image.fromarray(index[t])  # mode "L"; putpalette makes it "P"
        img.putpalette(palette)
        images.append(img if size is None else img.resize((size, size * img.height // img.width), Image.Resampling.NEAREST))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0, optimize=False)
    return path


def save_frames(frames: np.ndarray, folder: str | os.PathLike, size: int | None = None) -> list[Path]:
    """Write a clip (T, H, W, 3) uint8 as frame_00.png, frame_01.png, ... in `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(frames) - 1)))
    return [save_image(frame, folder / f"frame_{t:0{width}d}.png", size) for t, frame in enumerate(frames)]


def _natural_key(path: Path) -> list:
    """Sort key under which frame_2.png comes before frame_10.png."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name.lower())]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder of frames (by suffix, hidden files skipped), in natural order of their names."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in FRAME_SUFFIXES]
    return sorted(files, key=_natural_key)


def load_frames(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read a clip as frames (T, 3, H, W) in [0, 1]: an animated GIF (or any multi-frame image) or a folder of images.

    Each frame is resized like `load_image`. A GIF frame shown k times as long as the
    shortest one counts k times, so a clip keeps its timing (GIF writers merge repeated frames).
    Raises FileNotFoundError for a missing path and ValueError for an empty folder or an
    unreadable frame, naming the file.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip {str(path)!r} does not exist: expected an animated GIF or a folder of frames")
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no frames: expected image files ({', '.join(FRAME_SUFFIXES)})")
        frames = []
        for file in files:
            try:
                frames.append(load_image(file, size))
            except (ValueError, OSError) as exc:
                raise ValueError(f"frame {str(file)!r} cannot be read: {exc}") from None
        if len({tuple(f.shape) for f in frames}) > 1:
            raise ValueError(f"the frames in {str(path)!r} differ in size: give a size to resize them, "
                             f"or frames of one size")
        return torch.stack(frames)  # (T, 3, H, W)
    try:
        with Image.open(path) as img:
            shown = [(_to_tensor(_resized(frame.convert("RGB"), size)), frame.info.get("duration", 0) or 0)
                     for frame in ImageSequence.Iterator(img)]
    except UnidentifiedImageError as exc:
        raise ValueError(f"{str(path)!r} is not an image file Pillow can read ({exc})") from None
    except OSError as exc:  # a truncated or corrupt file
        raise ValueError(f"{str(path)!r} cannot be read: {exc}") from None
    shortest = min((ms for _, ms in shown if ms > 0), default=0)
    frames = []
    for frame, ms in shown:
        frames += [frame] * (max(1, round(ms / shortest)) if shortest else 1)
    return torch.stack(frames)  # (T, 3, H, W)


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


__all__ = ["FRAME_SUFFIXES", "frame_files", "load_frames", "load_image", "sample_photo", "sample_photo_path",
           "save_frames", "save_gif", "save_image"]
