"""Dynamic tiling (LLaVA-NeXT's AnyRes, InternVL's grid choice): grids, tiles that round-trip, clear errors."""

import pytest
import torch

from mllm_scratch.tiling import (
    best_grid_anyres,
    best_grid_internvl,
    candidate_grids,
    dynamic_tiles,
    fit_and_pad,
    resize,
    tile,
    tile_tags,
    untile,
)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 3), (3, 1), (2, 3), (4, 2)])
def test_tile_and_untile_round_trip(rows, cols):
    image = torch.rand(3, rows * 32, cols * 32)
    tiles, grid = tile(image, 32)
    assert grid == (rows, cols) and tiles.shape == (rows * cols, 3, 32, 32)
    assert torch.equal(untile(tiles, grid), image)
    # row-major: tile k is the block at row k // cols, column k % cols
    k = rows * cols - 1
    r, c = divmod(k, cols)
    assert torch.equal(tiles[k], image[:, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32])


def test_tile_and_untile_refuse_bad_input():
    with pytest.raises(ValueError, match=r"40 x 64 px does not cut into 32-px tiles"):
        tile(torch.rand(3, 40, 64), 32)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        tile(torch.rand(1, 3, 32, 32), 32)
    with pytest.raises(ValueError, match="tile_size 0 is invalid"):
        tile(torch.rand(3, 32, 32), 0)
    with pytest.raises(ValueError, match="got 5 tiles for a 2 x 3 grid: expected 6"):
        untile(torch.rand(5, 3, 32, 32), (2, 3))


def test_candidate_grids():
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert candidate_grids(4, min_tiles=3) == [(1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="min_tiles 5 is above max_tiles 4"):
        candidate_grids(4, min_tiles=5)
    with pytest.raises(ValueError, match="max_tiles 0 is invalid"):
        candidate_grids(0)


def test_internvl_picks_the_closest_aspect_ratio_and_a_larger_grid_only_with_the_pixels():
    grids = candidate_grids(6)
    assert best_grid_internvl(32, 96, 32, grids) == (1, 3)  # 3:1 wide
    assert best_grid_internvl(100, 48, 32, grids) == (2, 1)  # about 1:2 tall
    assert best_grid_internvl(32, 32, 32, grids) == (1, 1)  # square, too few pixels for 2 x 2
    assert best_grid_internvl(64, 64, 32, grids) == (2, 2)  # square, and enough pixels to fill half of 2 x 2
    with pytest.raises(ValueError, match=r"grid \(0, 2\) is invalid"):
        best_grid_internvl(32, 32, 32, [(0, 2)])
    with pytest.raises(ValueError, match="grids is empty"):
        best_grid_internvl(32, 32, 32, [])


def test_anyres_keeps_the_most_pixels_then_wastes_least():
    grids = candidate_grids(6)
    assert best_grid_anyres(32, 96, 32, grids) == (1, 3)  # fits exactly: nothing wasted
    assert best_grid_anyres(40, 100, 32, grids) == (2, 3)  # (1, 3) would shrink it to 0.8x; (2, 3) keeps 0.96x
    assert best_grid_anyres(16, 16, 32, grids) == (1, 1)  # upscaling keeps no more pixels, so the least waste wins
    with pytest.raises(ValueError, match="height -3 is invalid"):
        best_grid_anyres(-3, 32, 32, grids)


def test_fit_and_pad_centres_the_image_on_a_white_canvas():
    image = torch.zeros(3, 32, 64)  # black, 1:2
    canvas = fit_and_pad(image, (2, 2), 32)  # 64 x 64: scaled to 32 x 64, centred vertically
    assert canvas.shape == (3, 64, 64)
    assert torch.all(canvas[:, 16:48] == 0) and torch.all(canvas[:, :16] == 1) and torch.all(canvas[:, 48:] == 1)


def test_dynamic_tiles_adds_the_thumbnail_last():
    image = torch.rand(3, 40, 100)
    for rule in ("internvl", "anyres"):
        tiles, grid = dynamic_tiles(image, 32, 6, rule=rule)
        assert tiles.shape == (grid[0] * grid[1] + 1, 3, 32, 32)
        assert torch.equal(tiles[-1], resize(image, 32, 32))
    tiles, grid = dynamic_tiles(torch.rand(3, 32, 32), 32, 6)
    assert grid == (1, 1) and tiles.shape == (1, 3, 32, 32)  # one tile is the whole image: no thumbnail
    with pytest.raises(ValueError, match="rule must be 'internvl' or 'anyres', got 'best'"):
        dynamic_tiles(image, 32, 6, rule="best")


def test_tile_tags():
    assert tile_tags((1, 2)) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    assert tile_tags((2, 1), thumbnail=False) == ["<tile_1>", "<tile_2>"]
