"""Dynamic high-resolution tiling: an image of any size as a grid of tower-sized tiles plus a thumbnail.

An image tower sees one fixed square (the book's: 32 x 32). A larger or non-square image
either shrinks to it, and small detail such as text is lost, or is cut into tiles of that
size, each encoded on its own, with a downscaled view of the whole image (the thumbnail)
for the global layout. Which grid of tiles? Two rules from real systems:

- **LLaVA-NeXT's AnyRes** (`best_grid_anyres`): among the allowed grids, the one that keeps
  the most of the image's pixels once the image is scaled (aspect ratio kept) to fit the
  grid's canvas; ties go to the grid that wastes the least canvas. The image is then
  resized to fit and padded (`fit_and_pad`).
- **InternVL's dynamic tiling** (`best_grid_internvl`): the grid whose aspect ratio
  (columns / rows) is closest to the image's; on a tie, the larger grid if the image has
  the pixels to fill more than half of it. The image is then stretched to the grid.

`tile` cuts a (C, H, W) image whose sides are multiples of the tile size into
(rows * cols, C, tile, tile) tiles in row-major order, and `untile` puts them back
(the two round-trip exactly). `tile_tags` names each tile for the LM, as NVLM does with
1-D text tags ("<tile_1>" ... "<tile_6>", then "<tile_global_thumbnail>").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]  # (rows, cols)


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value!r} is invalid: expected a positive int")
    return value


def _check_image(image: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (channels, height, width) tensor, got {shape}")
    return tuple(image.shape)  # type: ignore[return-value]


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[Grid]:
    """Every (rows, cols) with min_tiles <= rows * cols <= max_tiles, fewest tiles first (then fewer rows)."""
    _check_size("max_tiles", max_tiles)
    _check_size("min_tiles", min_tiles)
    if min_tiles > max_tiles:
        raise ValueError(f"min_tiles {min_tiles} is above max_tiles {max_tiles}: expected min_tiles <= max_tiles")
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if min_tiles <= r * c <= max_tiles]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def _check_grids(grids: Sequence[Grid]) -> list[Grid]:
    grids = list(grids)
    if not grids:
        raise ValueError("grids is empty: expected at least one (rows, cols)")
    for g in grids:
        if not (isinstance(g, tuple) and len(g) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                               for v in g)):
            raise ValueError(f"grid {g!r} is invalid: expected (rows, cols) of positive ints")
    return grids


def best_grid_anyres(height: int, width: int, tile_size: int, grids: Sequence[Grid]) -> Grid:
    """LLaVA-NeXT's choice: the grid whose canvas keeps the most image pixels after an aspect-preserving fit, then wastes least."""
    _check_size("height", height)
    _check_size("width", width)
    _check_size("tile_size", tile_size)
    best, best_key = None, None
    for rows, cols in _check_grids(grids):
        canvas_h, canvas_w = rows * tile_size, cols * tile_size
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)  # upscaling adds no information
        wasted = canvas_h * canvas_w - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best  # type: ignore[return-value]


def best_grid_internvl(height: int, width: int, tile_size: int, grids: Sequence[Grid]) -> Grid:
    """InternVL's choice: the grid with the closest aspect ratio; on a tie, the later (larger) grid if the image has the pixels."""
    _check_size("height", height)
    _check_size("width", width)
    _check_size("tile_size", tile_size)
    aspect = width / height
    best, best_diff = None, float("inf")
    for rows, cols in _check_grids(grids):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (rows, cols), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * rows * cols:
            best = (rows, cols)
    return best  # type: ignore[return-value]


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) -> (C, height, width), bilinear with antialiasing (area-like when shrinking)."""
    _check_image(image)
    _check_size("height", height)
    _check_size("width", width)
    if tuple(image.shape[1:]) == (height, width):
        return image.clone()
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def fit_and_pad(image: torch.Tensor, grid: Grid, tile_size: int, fill: float = 1.0) -> torch.Tensor:
    """AnyRes: scale the image (aspect ratio kept) to fit the grid's canvas, centre it, pad with `fill` (white)."""
    _, h, w = _check_image(image)
    (rows, cols), = _check_grids([grid])
    _check_size("tile_size", tile_size)
    canvas_h, canvas_w = rows * tile_size, cols * tile_size
    scale = min(canvas_w / w, canvas_h / h)
    new_h, new_w = max(1, min(canvas_h, round(h * scale))), max(1, min(canvas_w, round(w * scale)))
    out = torch.full((image.shape[0], canvas_h, canvas_w), float(fill), dtype=torch.float32)
    top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
    out[:, top : top + new_h, left : left + new_w] = resize(image, new_h, new_w)
    return out


def tile(image: torch.Tensor, tile_size: int) -> tuple[torch.Tensor, Grid]:
    """(C, rows * tile, cols * tile) -> ((rows * cols, C, tile, tile) in row-major order, (rows, cols))."""
    c, h, w = _check_image(image)
    _check_size("tile_size", tile_size)
    if h % tile_size or w % tile_size:
        raise ValueError(f"image of {h} x {w} px does not cut into {tile_size}-px tiles: expected both sides to be "
                         f"multiples of {tile_size} (resize it first: `fit_and_pad` or `resize`)")
    rows, cols = h // tile_size, w // tile_size
    tiles = image.reshape(c, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)  # (rows, cols, C, t, t)
    return tiles.reshape(rows * cols, c, tile_size, tile_size), (rows, cols)


def untile(tiles: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The inverse of `tile`: (rows * cols, C, t, t) tiles in row-major order -> (C, rows * t, cols * t)."""
    (rows, cols), = _check_grids([grid])
    if not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or tiles.shape[-1] != tiles.shape[-2]:
        shape = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
        raise ValueError(f"tiles must be a (count, channels, tile, tile) tensor, got {shape}")
    n, c, t, _ = tiles.shape
    if n != rows * cols:
        raise ValueError(f"got {n} tiles for a {rows} x {cols} grid: expected {rows * cols}")
    return tiles.reshape(rows, cols, c, t, t).permute(2, 0, 3, 1, 4).reshape(c, rows * t, cols * t)


def tile_tags(grid: Grid, thumbnail: bool = True) -> list[str]:
    """NVLM's 1-D tile tags: "<tile_1>" ... "<tile_N>" in row-major order, then "<tile_global_thumbnail>"."""
    (rows, cols), = _check_grids([grid])
    return [f"<tile_{i + 1}>" for i in range(rows * cols)] + (["<tile_global_thumbnail>"] if thumbnail else [])


def dynamic_tiles(image: torch.Tensor, tile_size: int, max_tiles: int, *, rule: str = "internvl",
                  thumbnail: bool = True, min_tiles: int = 1) -> tuple[torch.Tensor, Grid]:
    """The whole pipeline: choose a grid (rule "internvl" or "anyres"), resize, tile, and add the thumbnail last.

    Returns ((tiles + thumbnail, C, tile, tile), (rows, cols)). A one-tile grid gets no
    thumbnail: the tile already is the whole image.
    """
    _, h, w = _check_image(image)
    grids = candidate_grids(max_tiles, min_tiles)
    if rule == "internvl":
        grid = best_grid_internvl(h, w, tile_size, grids)
        canvas = resize(image, grid[0] * tile_size, grid[1] * tile_size)
    elif rule == "anyres":
        grid = best_grid_anyres(h, w, tile_size, grids)
        canvas = fit_and_pad(image, grid, tile_size)
    else:
        raise ValueError(f"rule must be 'internvl' or 'anyres', got {rule!r}")
    tiles, grid = tile(canvas, tile_size)
    if thumbnail and grid != (1, 1):
        tiles = torch.cat([tiles, resize(image, tile_size, tile_size)[None]])
    return tiles, grid


__all__ = [
    "Grid",
    "best_grid_anyres",
    "best_grid_internvl",
    "candidate_grids",
    "dynamic_tiles",
    "fit_and_pad",
    "resize",
    "tile",
    "tile_tags",
    "untile",
]
