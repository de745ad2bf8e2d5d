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

The second half is chapter 10's model. `TiledVLM` is chapter 06's `UnifiedVLM` with a
high-resolution path: its 32 px thumbnail goes through chapter 06's tower and projector as
before, then each tile, after a text tag, through a tower taught to read (`ocr`) and a tile
connector (`connectors`, pixel shuffle by default: 16 tokens per tile). `TiledRecipe` and
`train_tiled_vlm` train it from chapter 06's shipped model; `load_tiled_vlm` loads the shipped one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from mllm_scratch.checkpoints import (DEFAULT_DIR, STORED_DTYPE, CheckpointError, load_state_dict_strict, load_verified,
                                     round_to_dtype, save_checkpoint)
from mllm_scratch.connectors import KINDS, connector_tokens, make_connector
from mllm_scratch.gpt import GPT, tokenizer_sha256
from mllm_scratch.ocr import ReadingTowerRecipe
from mllm_scratch.shapeworld import SKILLS, CaptionDataset, ShapeWorldConfig, VQADataset
from mllm_scratch.tokenizer import Tokenizer, load_tokenizer
from mllm_scratch.train import History, TrainConfig, batches, train
from mllm_scratch.vit import ViTConfig, VisionTransformer, config_dict
from mllm_scratch.vlm import PlaceCodes, UnifiedVLM, VLMCollator, VLMConfig, generate_grouped

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


def fit_and_pad(image: torch.Tensor, grid: Grid, tile_size: int, fill: float | Sequence[float] = 1.0) -> torch.Tensor:
    """AnyRes: scale the image (aspect ratio kept) to fit the grid's canvas, centre it, pad with `fill`
    (white; or one value per channel, e.g. ShapeWorld's background)."""
    c, h, w = _check_image(image)
    (rows, cols), = _check_grids([grid])
    _check_size("tile_size", tile_size)
    fill = torch.as_tensor(fill, dtype=torch.float32).reshape(-1, 1, 1)
    if fill.shape[0] not in (1, c):
        raise ValueError(f"fill has {fill.shape[0]} values for an image of {c} channels: "
                         f"expected {'1' if c == 1 else f'1 or {c}'}")
    canvas_h, canvas_w = rows * tile_size, cols * tile_size
    scale = min(canvas_w / w, canvas_h / h)
    new_h, new_w = max(1, min(canvas_h, round(h * scale))), max(1, min(canvas_w, round(w * scale)))
    out = fill.expand(c, canvas_h, canvas_w).clone()
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


def tile_batch(images: torch.Tensor, tile_size: int) -> torch.Tensor:
    """`tile` for a batch: (B, C, rows * t, cols * t) -> (B * rows * cols, C, t, t), each image's tiles in row-major order."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (batch, channels, height, width) tensor, got {shape}")
    b, c, h, w = images.shape
    _check_size("tile_size", tile_size)
    if h % tile_size or w % tile_size:
        raise ValueError(f"images of {h} x {w} px do not cut into {tile_size}-px tiles: expected both sides to be "
                         f"multiples of {tile_size}")
    rows, cols, t = h // tile_size, w // tile_size, tile_size
    return images.reshape(b, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5).reshape(b * rows * cols, c, t, t)


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


# ----------------------------------------------------------------------------------
# The tiled VLM (chapter 10): chapter 06's model, its 32 px thumbnail kept, plus 2 x 2 tiles at full resolution


class TiledVLM(UnifiedVLM):
    """Chapter 06's unified decoder with a high-resolution path (LLaVA-NeXT / InternVL / NVLM-D style).

    An image of `grid` tiles (each `tile_size` px) enters the LM as
        thumbnail: the whole image shrunk to one tile -> chapter 06's tower and projector -> 64 tokens
        then for each tile, in row-major order: its tag (" 1", " 2", ...: text tokens, NVLM's 1-D tags)
            and the tile at full resolution -> the reading tower -> `tile_connector` -> tokens per tile
    The thumbnail comes first, so chapter 06's model sees its image where it always has (NVLM puts it
    last). `prefix()` is the ids this layout gives; `splice` fills its <|image|> slots in order.
    """

    def __init__(self, config: VLMConfig, *, grid: Grid, tile_size: int, tile_encoder: nn.Module, tile_connector: nn.Module,
                 tile_tokens: int, tag_ids: Sequence[Sequence[int]], encoder: nn.Module | None = None, lm: GPT | None = None):
        super().__init__(config, encoder=encoder, lm=lm)
        (rows, cols), = _check_grids([grid])
        if len(tag_ids) != rows * cols:
            raise ValueError(f"got {len(tag_ids)} tile tags for a {rows} x {cols} grid: expected {rows * cols}")
        self.grid, self.tile_size, self.tile_tokens = (rows, cols), _check_size("tile_size", tile_size), tile_tokens
        if tile_size != config.vision.image_size:
            raise ValueError(f"tile_size {tile_size} differs from the thumbnail tower's image_size "
                             f"{config.vision.image_size}: the thumbnail is one tile")
        self.tag_ids = [list(t) for t in tag_ids]
        self.tile_encoder = tile_encoder
        self.tile_connector = tile_connector
        if len(self.prefix()) >= config.lm.context_length:
            raise ValueError(f"{len(self.prefix())} prefix tokens leave no room in the LM's context_length "
                             f"{config.lm.context_length}")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the thumbnail's, then every tile's."""
        return self.config.num_image_tokens + self.grid[0] * self.grid[1] * self.tile_tokens

    def prefix(self) -> list[int]:
        """The ids before the prompt: the thumbnail's <|image|> slots, then each tile's tag and slots."""
        ids = [self.image_id] * self.config.num_image_tokens
        for tag in self.tag_ids:
            ids += tag + [self.image_id] * self.tile_tokens
        return ids

    def thumbnail(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, t, t): the whole image shrunk to one tile (bilinear, antialiased, as `resize`)."""
        t = self.tile_size
        return F.interpolate(images.float(), size=(t, t), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)

    def tiles(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, rows * t, cols * t) -> (B * rows * cols, 3, t, t), each image's tiles in row-major order (`tile`)."""
        h, w = images.shape[-2:]
        (rows, cols), t = self.grid, self.tile_size
        if (h, w) != (rows * t, cols * t):
            raise ValueError(f"images of {h} x {w} px do not fit the model's {rows} x {cols} grid of {t} px tiles: "
                             f"expected {rows * t} x {cols * t} (`fit_and_pad` or `resize` first)")
        return tile_batch(images, t)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_image_tokens, lm_dim): the thumbnail's tokens, then each tile's."""
        b = images.shape[0]
        thumb = super().image_tokens(self.thumbnail(images))  # chapter 06's path: (B, 64, lm_dim)
        features = self.tile_encoder(self.tiles(images))
        features = features.patches if hasattr(features, "patches") else features  # (B * tiles, P, image_dim)
        tiles = self.tile_connector(features)  # (B * tiles, tile_tokens, lm_dim)
        if tiles.dim() != 3 or tiles.shape[1] != self.tile_tokens:
            raise ValueError(f"the tile connector returned {tuple(tiles.shape)}: expected (tiles, {self.tile_tokens}, "
                             f"lm_dim), the {self.tile_tokens} slots per tile of the prefix")
        return torch.cat([thumb, tiles.reshape(b, -1, tiles.shape[-1])], dim=1)

    @torch.no_grad()
    def generate(self, tokenizer: Tokenizer, images: torch.Tensor | None, prompts: Sequence[str],
                 max_new_tokens: int = 8, batch_size: int = 256) -> list[str]:
        """Greedy continuation of `prefix() + prompt` for each (image, prompt), as `UnifiedVLM.generate`."""
        return generate_grouped(self, tokenizer, images, prompts, self.prefix(), max_new_tokens, batch_size)


class PrefixCollator(VLMCollator):
    """`VLMCollator` with any prefix of ids before the prompt (a `TiledVLM`'s `prefix()`), not just <|image|> x N."""

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int]):
        super().__init__(tokenizer, sum(1 for i in prefix if i == tokenizer.image_id))
        self.prefix_ids = list(prefix)

    def prefix(self) -> list[int]:
        return self.prefix_ids


def extend_positions(lm: GPT, context_length: int, copy_from: int) -> GPT:
    """A copy of a GPT with learned positions whose table grows to `context_length`; new rows copy rows copy_from.. .

    `build_tiled_vlm` copies rows 64-127 into rows 128-191: the rows chapter 06's LM read its
    questions and answers at, so the new positions start from trained vectors rather than noise
    (the prompt, after the 132-token prefix, starts at row 132, a copy of row 68; training adapts).
    """
    if lm.config.position != "learned":
        raise ValueError(f"extend_positions is for a learned position table, not {lm.config.position!r}")
    old = lm.config.context_length
    if context_length < old or not 0 <= copy_from <= old - (context_length - old):
        raise ValueError(f"cannot grow {old} positions to {context_length} copying rows from {copy_from}: expected "
                         f"context_length >= {old} and copy_from + {context_length - old} <= {old}")
    new = GPT(replace(lm.config, context_length=context_length))
    state = dict(lm.state_dict())
    table = state["pos_emb.weight"]
    state["pos_emb.weight"] = torch.cat([table, table[copy_from : copy_from + context_length - old]])
    new.load_state_dict(state)
    return new


@dataclass(frozen=True)
class TiledRecipe:
    """Chapter 10's model: chapter 06's shipped VLM, a reading tower, a tile connector, two stages on 64 px scenes."""

    image_size: int = 64  # square scenes: a 2 x 2 grid of 32 px tiles
    tile_connector: str = "pixelshuffle"  # any of connectors.KINDS
    reading_pairs: int = 10_000  # "train" reading questions (scenes of their own)
    qa_pairs: int = 20_000  # "train" questions of the other five skills, spatial ones grounded as in chapter 06
    caption_pairs: int = 4_000  # captions, so that the model keeps captioning (and says what the text says)
    batch_size: int = 32
    reading_steps: int = 6000  # stage 1: reading questions (and, with reading_share < 1, the other skills rehearsed)
    reading_share: float = 0.5  # stage 1's share of reading questions; the rest are the mix's other five skills
    mix_steps: int = 1500  # stage 2: all six skills and captions
    lr: float = 2e-3  # the new tile connector
    reading_lm_lr: float = 3e-4  # the LM (and chapter 06's projector) in stage 1
    lm_lr: float = 3e-4  # ... in stage 2
    tile_tower_lr: float = 1e-4  # the reading tower in stage 1 (0: frozen throughout)
    warmup_steps: int = 50
    seed: int = 0
    reading_tower: ReadingTowerRecipe = field(default_factory=ReadingTowerRecipe)

    def __post_init__(self) -> None:
        if isinstance(self.reading_tower, dict):
            object.__setattr__(self, "reading_tower", ReadingTowerRecipe(**self.reading_tower))
        if self.tile_connector not in KINDS:
            raise ValueError(f"tile_connector {self.tile_connector!r} is unknown: expected one of {KINDS}")
        if self.image_size % self.reading_tower.tile_size:
            raise ValueError(f"image_size {self.image_size} is not a whole number of "
                             f"{self.reading_tower.tile_size} px tiles")
        real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        if not real(self.reading_share) or not 0.0 < self.reading_share <= 1.0:
            raise ValueError(f"reading_share must be a number in (0, 1], got {self.reading_share!r}")
        if not real(self.tile_tower_lr) or self.tile_tower_lr < 0.0:
            raise ValueError(f"tile_tower_lr must be a finite number >= 0 (0 keeps the reading tower frozen), "
                             f"got {self.tile_tower_lr!r}")
        for name in ("reading_steps", "mix_steps", "reading_pairs", "qa_pairs", "caption_pairs", "batch_size"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if self.rehearsed_pairs > self.qa_pairs:
            raise ValueError(f"reading_share {self.reading_share} asks for {self.rehearsed_pairs} rehearsed questions, "
                             f"more than qa_pairs={self.qa_pairs}: raise reading_share or qa_pairs")

    @property
    def rehearsed_pairs(self) -> int:
        """How many of the other skills' questions stage 1 holds beside its `reading_pairs` reading questions."""
        return round(self.reading_pairs * (1.0 - self.reading_share) / self.reading_share)

    @property
    def grid(self) -> Grid:
        n = self.image_size // self.reading_tower.tile_size
        return (n, n)

    def scene_config(self) -> ShapeWorldConfig:
        return ShapeWorldConfig(image_size=self.image_size, max_objects=3)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)


TAG_TEMPLATE = " {}"  # tile k's tag: " 1", " 2", ... (one token each in the book's tokenizer)
READING_OFFSET = 5_000_000  # where the reading questions' scenes start among the train seeds


def tiled_context(base: VLMConfig, grid: Grid, tile_tokens: int, room: int = 60) -> int:
    """The LM context a tiled model needs: its prefix (thumbnail, tags, tiles) and `room` for prompt and answer."""
    return base.num_image_tokens + grid[0] * grid[1] * (1 + tile_tokens) + room


def build_tiled_vlm(recipe: TiledRecipe, base: UnifiedVLM, tile_tower: nn.Module, tokenizer: Tokenizer | None = None) -> TiledVLM:
    """A `TiledVLM` from chapter 06's model `base` (its tower, projector and LM, the LM's positions grown) and a tile tower."""
    tokenizer = tokenizer or load_tokenizer()
    torch.manual_seed(recipe.seed)
    connector, tile_tokens = make_tile_connector(recipe.tile_connector, tile_tower.config, base.config.lm.dim)
    lm = extend_positions(base.lm, tiled_context(base.config, recipe.grid, tile_tokens), base.config.num_image_tokens)
    tags = [tokenizer.encode_ordinary(TAG_TEMPLATE.format(k + 1)) for k in range(recipe.grid[0] * recipe.grid[1])]
    model = TiledVLM(replace(base.config, lm=lm.config), grid=recipe.grid, tile_size=recipe.reading_tower.tile_size,
                     tile_encoder=tile_tower, tile_connector=connector, tile_tokens=tile_tokens, tag_ids=tags,
                     encoder=base.encoder, lm=lm)
    model.projector.load_state_dict(base.projector.state_dict())
    return model


def make_tile_connector(kind: str, vision: ViTConfig, lm_dim: int, factor: int = 2) -> tuple[nn.Module, int]:
    """(connector, tokens per tile): `connectors.make_connector`, a LayerNorm, and learned place codes for the
    connectors whose tokens are a grid of places in the tile (all but "queries": a learned query has no place).

    `factor` sets the budget of the reducing connectors: (side / factor)^2 tokens for a side x side grid
    of patches (pixel shuffle and pooling merge factor x factor blocks, the C-Abstractor pools to that
    grid, and there are that many learned queries)."""
    side = vision.image_size // vision.patch_size
    merges = kind in ("avgpool", "pixelshuffle")  # these need whole factor x factor blocks
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= side or (merges and side % factor):
        raise ValueError(f"factor {factor!r} is invalid: expected a positive int that divides the {side} x {side} "
                         "grid of patches")
    budget = dict(factor=factor, out_grid=side // factor, num_queries=(side // factor) ** 2)
    tokens = connector_tokens(kind, side, **budget)
    parts: list[nn.Module] = [make_connector(kind, vision.dim, lm_dim, **budget), nn.LayerNorm(lm_dim)]
    if kind != "queries":  # a grid of tokens: each also says where in its tile it is
        parts.append(PlaceCodes(math.isqrt(tokens), lm_dim))
    return nn.Sequential(*parts), tokens


# ----------------------------------------------------------------------------------
# The token budget at 32 px: chapter 06's model with a connector in place of its projector


class BudgetVLM(UnifiedVLM):
    """Chapter 06's unified decoder whose projector is a token-reducing connector (`make_tile_connector`).

    The tower still gives one vector per patch (64 at 32 px); the connector turns them into fewer
    image tokens (pixel shuffle, or 2 x 2 average pooling into a 4 x 4 grid: 16, a quarter), so the
    LM's sequence and its FLOPs shrink. Everything else is `UnifiedVLM`: the <|image|> slots,
    `generate`, the stages. `save_vlm` refuses it: VLMConfig does not record the connector."""

    def __init__(self, config: VLMConfig, *, connector: str = "pixelshuffle", factor: int = 2,
                 encoder: nn.Module | None = None, lm: GPT | None = None):
        super().__init__(config, encoder=encoder, lm=lm)
        reducing = tuple(k for k in KINDS if k not in ("linear", "mlp"))  # those two keep one token per patch
        if connector not in reducing:
            raise ValueError(f"connector {connector!r} is invalid: expected one that reduces the tokens, {reducing}")
        if config.encoder != "vit":
            raise ValueError(f"BudgetVLM needs a ViT tower (a grid of patch vectors), got encoder {config.encoder!r}")
        self.connector_kind, self.factor = connector, factor
        self.projector, self._tokens = make_tile_connector(connector, config.vision, config.lm.dim, factor)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the connector's, not the tower's patches."""
        return self._tokens


def build_budget_vlm(base: UnifiedVLM, connector: str = "pixelshuffle", seed: int = 0, factor: int = 2) -> BudgetVLM:
    """A `BudgetVLM` from chapter 06's model `base`: copies of its tower and LM (training leaves `base` as it
    was), and a new connector (initialised from `seed`) in place of its projector, giving 1 / factor^2
    of the tower's patches as image tokens."""
    import copy

    torch.manual_seed(seed)
    return BudgetVLM(base.config, connector=connector, factor=factor, encoder=copy.deepcopy(base.encoder),
                     lm=copy.deepcopy(base.lm))


def train_budget_vlm(recipe: Any = None, connector: str = "pixelshuffle", tokenizer: Tokenizer | None = None, *,
                     factor: int = 2, log_every: int = 500, progress: bool = True,
                     device=None) -> tuple[BudgetVLM, dict[str, History]]:
    """Chapter 06's recipe (default: its shipped one) with `connector` in place of its projector.

    The same start as `vlm.train_vlm(recipe)`: `build_vlm(recipe)` (the recipe's tower and pretrained GPT),
    then `build_budget_vlm` swaps the projector for the connector (1 / factor^2 of the patches as
    tokens: 16 of 64 at the default 2), seeded with `recipe.seed`, and
    every stage of the recipe trains it with chapter 06's `train_stage`. What differs from the model
    `train_vlm(recipe)` trains is the connector: its tokens, and the layers that make them (see
    `make_tile_connector`). Returns the model (eval mode) and each stage's History."""
    from mllm_scratch.vlm import SHIPPED_RECIPE, VLMRecipe, build_vlm, train_stage

    recipe = SHIPPED_RECIPE if recipe is None else recipe
    if not isinstance(recipe, VLMRecipe):
        raise TypeError(f"recipe must be a VLMRecipe (chapter 06's), got {type(recipe).__name__}")
    tokenizer = tokenizer or load_tokenizer()
    model = build_budget_vlm(build_vlm(recipe, tokenizer), connector, seed=recipe.seed, factor=factor)
    histories = {}
    for stage in recipe.stages:
        name = f"stage{stage}" if isinstance(stage, int) else stage
        histories[name] = train_stage(model, recipe, stage, tokenizer, log_every=log_every, progress=progress,
                                      device=device)
    return model.eval(), histories


TILED_STAGES = ("reading", "mix")


def tiled_dataset(recipe: TiledRecipe, stage: str) -> Any:
    """A stage's examples: "reading" (the reading questions, and with `reading_share` < 1 the first
    `recipe.rehearsed_pairs` of stage 2's other-skill questions, the same scenes, rehearsed beside them so
    that stage 1 does not overwrite those skills) or "mix" (all six skills and captions)."""
    if stage not in TILED_STAGES:
        raise ValueError(f"stage must be one of {TILED_STAGES}, got {stage!r}")
    config = recipe.scene_config()
    reading = VQADataset("train", recipe.reading_pairs, config, skills=("reading",), cache=True, offset=READING_OFFSET)
    others = tuple(s for s in SKILLS if s != "reading")
    qa = VQADataset("train", recipe.qa_pairs, config, skills=others, cache=True, grounded=True)  # drawn when read
    if stage == "reading":
        return ConcatDataset([reading, Subset(qa, range(recipe.rehearsed_pairs))]) if recipe.rehearsed_pairs else reading
    return ConcatDataset([qa, reading, CaptionDataset("train", recipe.caption_pairs, config, cache=True)])


def tiled_data(recipe: TiledRecipe, stage: str, tokenizer: Tokenizer, prefix: Sequence[int]):
    """The endless batch stream of a stage (`tiled_dataset`), each example after `prefix`."""
    data = tiled_dataset(recipe, stage)
    seed = recipe.seed + TILED_STAGES.index(stage)
    return batches(data, recipe.batch_size, seed=seed, collate_fn=PrefixCollator(tokenizer, prefix))


def train_tiled_vlm(recipe: TiledRecipe | None = None, tokenizer: Tokenizer | None = None, *, base: UnifiedVLM | None = None,
                    tile_tower: nn.Module | None = None, steps: dict[str, int] | None = None, log_every: int = 500,
                    progress: bool = True) -> tuple[TiledVLM, dict[str, History]]:
    """Chapter 10's recipe: a reading tower (`ocr.train_reading_tower`, unless `tile_tower` is given), then
    `build_tiled_vlm` on chapter 06's shipped model (or `base`), then two stages with chapter 06's tower frozen:
    "reading" (reading questions, the other five skills rehearsed beside them at `1 - reading_share`) and
    "mix" (every skill and captions). The tile connector trains at `lr`, chapter 06's projector and the LM
    at the stage's LM rate, the reading tower at `tile_tower_lr` in stage 1 only (0: frozen throughout).
    The loss is `vlm_loss` with chapter 06's `ColourShapePrior` in both stages (reading answers hold no
    shape word, so it adds nothing to them). `steps` shortens stages (keys: the stage names, and
    "reading_tower"). The model shares `base`'s tower and tunes (or, with `tile_tower_lr=0`, only
    freezes) `tile_tower` in place; the LM is a copy. Returns the model (eval mode, nothing trainable)
    and each stage's History."""
    from mllm_scratch.ocr import train_reading_tower
    from mllm_scratch.vlm import ColourShapePrior, load_vlm, vlm_loss

    recipe = recipe or TiledRecipe()
    tokenizer = tokenizer or load_tokenizer()
    steps = dict(steps or {})
    unknown = set(steps) - {"reading_tower", *TILED_STAGES}
    if unknown:
        raise ValueError(f"steps names unknown stages {sorted(unknown)}: expected 'reading_tower', 'reading' or 'mix'")
    if tile_tower is not None and "reading_tower" in steps:
        raise ValueError("steps['reading_tower'] was given with a tile_tower: the tower is not trained then")
    histories: dict[str, History] = {}
    if tile_tower is None:
        reader, histories["reading_tower"] = train_reading_tower(
            recipe.reading_tower, log_every=log_every, progress=progress,
            **({"steps": steps["reading_tower"]} if "reading_tower" in steps else {}))
        tile_tower = reader.tower
    model = build_tiled_vlm(recipe, base if base is not None else load_vlm(), tile_tower.requires_grad_(False), tokenizer)
    model.set_trainable(encoder=False, projector=True, lm=True)
    model.tile_connector.requires_grad_(True)
    prior = ColourShapePrior(tokenizer, model.lm.config.vocab_size, recipe.scene_config())
    for stage in TILED_STAGES:
        lm_lr = recipe.reading_lm_lr if stage == "reading" else recipe.lm_lr
        n = steps.get(stage, recipe.reading_steps if stage == "reading" else recipe.mix_steps)
        groups = [{"params": list(model.tile_connector.parameters()), "lr": recipe.lr},
                  {"params": list(model.projector.parameters()) + list(model.lm.parameters()), "lr": lm_lr}]
        tune_tower = stage == "reading" and recipe.tile_tower_lr > 0
        model.tile_encoder.requires_grad_(tune_tower)
        if tune_tower:
            groups.append({"params": list(model.tile_encoder.parameters()), "lr": recipe.tile_tower_lr})
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=0.0)
        config = TrainConfig(steps=n, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, n), weight_decay=0.0,
                             min_lr_ratio=0.0, record_every=10, log_every=log_every, progress=progress)
        histories[stage] = train(model, tiled_data(recipe, stage, tokenizer, model.prefix()),
                                 lambda m, b: vlm_loss(m, b, prior), config, optimizer=optimizer,
                                 batch_size_of=lambda b: b.ids.shape[0])
    model.set_trainable(encoder=False, projector=False, lm=False)
    model.tile_connector.requires_grad_(False)
    model.tile_encoder.requires_grad_(False)
    return model.eval(), histories


# ----------------------------------------------------------------------------------
# The shipped tiled model: data/checkpoints/tiled_vlm.pt, built by `scripts/build_checkpoints.py tiled_vlm`

TILED_CHECKPOINT_NAME = "tiled_vlm"
TILED_CHECKPOINT = DEFAULT_DIR / f"{TILED_CHECKPOINT_NAME}.pt"
TILED_EVAL_QUESTIONS = 1000  # per skill and split, in the manifest


def _tiled_config(model: TiledVLM, kind: str) -> dict[str, Any]:
    return {"vlm": model.config.to_dict(), "grid": list(model.grid), "tile_size": model.tile_size,
            "tile_connector": kind, "tile_vision": model.tile_encoder.config.to_dict() if hasattr(
                model.tile_encoder.config, "to_dict") else config_dict(model.tile_encoder.config),
            "tag_ids": model.tag_ids}


def save_tiled_vlm(path: str | Path, model: TiledVLM, kind: str, *, recipe: dict | None = None, metrics: dict | None = None,
                   dtype: torch.dtype = STORED_DTYPE, base_sha256: str | None = None) -> dict:
    """Save a `TiledVLM` (its trained parts; the thumbnail's tower, the shipped one, by checksum) and its manifest.

    `base_sha256`: the sha256 of the chapter-06 checkpoint it was trained from (the shipped one's, recorded
    so that `load_tiled_vlm` can tell when that file has been rebuilt since)."""
    from mllm_scratch.clip import tower_reference

    reference = tower_reference(model.encoder, dtype)
    parts = {"projector": model.projector, "lm": model.lm, "tile_encoder": model.tile_encoder,
             "tile_connector": model.tile_connector}
    stored = nn.ModuleDict(parts if reference else {"encoder": model.encoder, **parts})
    return save_checkpoint(path, stored, _tiled_config(model, kind), name=TILED_CHECKPOINT_NAME, recipe=recipe,
                           metrics=metrics, dtype=dtype,
                           extra={"tokenizer_sha256": tokenizer_sha256(), **reference,
                                  **({"base_vlm_sha256": base_sha256} if base_sha256 else {}),
                                  "loader": "mllm_scratch.tiling.load_tiled_vlm"})


def load_tiled_vlm(path: str | Path | None = None) -> TiledVLM:
    """The tiled VLM that `scripts/build_checkpoints.py tiled_vlm` trains with `TiledRecipe()` (default), or a file
    saved by `save_tiled_vlm`; verified before it is built (sha256, config, recipe, tokenizer); eval mode, CPU."""
    from mllm_scratch.checkpoints import read_manifest
    from mllm_scratch.clip import with_referenced_tower

    saved, state_dict, path, rebuild = load_verified(
        TILED_CHECKPOINT_NAME, path, TILED_CHECKPOINT, expected_config=None, recipe=TiledRecipe().to_dict(),
        recipe_owner="TiledRecipe() in mllm_scratch/tiling.py", tokenizer_sha256=tokenizer_sha256())
    manifest = read_manifest(path, rebuild)
    if path.resolve() == TILED_CHECKPOINT.resolve() and _shipped_vlm_sha256() is None:
        raise CheckpointError(f"checkpoint {path} is built on chapter 06's data/checkpoints/vlm.pt, whose manifest "
                              f"is missing: build it first (python scripts/build_checkpoints.py vlm)")
    if path.resolve() == TILED_CHECKPOINT.resolve() and manifest.get("base_vlm_sha256") != _shipped_vlm_sha256():
        raise CheckpointError(f"checkpoint {path} was trained from another chapter-06 model than the shipped "
                              f"data/checkpoints/vlm.pt (rebuilt since?); rebuild it with: {rebuild}")
    state_dict = with_referenced_tower(state_dict, manifest, path, rebuild)
    try:
        config = VLMConfig(**saved["vlm"])
        vision = ViTConfig(**saved["tile_vision"])
        connector, tokens = make_tile_connector(saved["tile_connector"], vision, config.lm.dim)
        model = TiledVLM(config, grid=tuple(saved["grid"]), tile_size=saved["tile_size"],
                         tile_encoder=VisionTransformer(vision), tile_connector=connector, tile_tokens=tokens,
                         tag_ids=saved["tag_ids"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid tiled-VLM config ({err}); rebuild it with: {rebuild}") from None
    load_state_dict_strict(model, state_dict, path, rebuild)
    model.requires_grad_(False)
    return model.eval()


def _shipped_vlm_sha256() -> str | None:
    """The sha256 the shipped chapter-06 checkpoint's manifest records (None if there is none)."""
    import json

    from mllm_scratch.vlm import DEFAULT_CHECKPOINT

    try:
        return json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def thumbnail_baseline(dataset: Any, size: int = 32) -> Any:
    """`dataset` with every image shrunk to `size` px (as `TiledVLM.thumbnail`): what chapter 06's model sees of it."""

    class _Shrunk(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int):
            image, *rest = dataset[i]
            return (resize(image, size, size), *rest)

    return _Shrunk()


def build_tiled_checkpoint(out: Path) -> dict:
    """Train `TiledRecipe()` and save out/tiled_vlm.pt + .json, with its scores and chapter 06's on the same scenes."""
    model, histories = train_tiled_vlm(TiledRecipe(), load_tokenizer(), progress=False)
    return save_scored_tiled(out, model, {k: h.loss[-1] for k, h in histories.items()},
                             sum(h.seconds for h in histories.values()))


def save_scored_tiled(out: Path, model: TiledVLM, final_losses: dict[str, float], seconds: float) -> dict:
    """Round `TiledRecipe()`'s trained model to float16, score it (and chapter 06's model on the same scenes),
    and save out/tiled_vlm.pt + .json: the second half of `build_tiled_checkpoint`."""
    from mllm_scratch.vlm import grounding_accuracy, load_vlm, vqa_accuracy

    recipe = TiledRecipe()
    tokenizer = load_tokenizer()
    round_to_dtype(model, STORED_DTYPE)  # score the weights the float16 file will hold
    metrics: dict[str, Any] = {f"{k}_loss": round(v, 4) for k, v in final_losses.items()}
    metrics["train_seconds"] = round(seconds, 1)
    metrics["vqa_questions_per_skill"] = TILED_EVAL_QUESTIONS
    base = load_vlm()
    for split in ("test", "compositional"):
        data = VQADataset(split, TILED_EVAL_QUESTIONS * len(SKILLS), recipe.scene_config())
        for key, m, d in (("vqa", model, data), ("chapter06_vqa", base, thumbnail_baseline(data))):
            acc = vqa_accuracy(m, tokenizer, d)
            metrics[f"{split}_{key}"] = {k: round(v, 4) for k, v in acc.items()}
            print(f"tiled_vlm: {split} {key} " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        spatial = VQADataset(split, TILED_EVAL_QUESTIONS, recipe.scene_config(), skills=("spatial",), grounded=True)
        metrics[f"{split}_grounding"] = {k: round(v, 4) for k, v in grounding_accuracy(model, tokenizer, spatial).items()}
    return save_tiled_vlm(Path(out) / f"{TILED_CHECKPOINT_NAME}.pt", model, recipe.tile_connector,
                          recipe=recipe.to_dict(), metrics=metrics, base_sha256=_shipped_vlm_sha256())


__all__ = [
    "BudgetVLM",
    "Grid",
    "PrefixCollator",
    "TILED_CHECKPOINT",
    "TILED_STAGES",
    "TiledRecipe",
    "TiledVLM",
    "best_grid_anyres",
    "best_grid_internvl",
    "build_budget_vlm",
    "build_tiled_checkpoint",
    "build_tiled_vlm",
    "candidate_grids",
    "dynamic_tiles",
    "extend_positions",
    "fit_and_pad",
    "load_tiled_vlm",
    "make_tile_connector",
    "resize",
    "save_scored_tiled",
    "save_tiled_vlm",
    "thumbnail_baseline",
    "tile",
    "tile_batch",
    "tile_tags",
    "tiled_context",
    "tiled_data",
    "tiled_dataset",
    "train_budget_vlm",
    "train_tiled_vlm",
    "untile",
]
