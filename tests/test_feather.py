import pytest
import torch

from pipeline.geometry.chess import chess_grid
from pipeline.geometry.feather import composite_pass, coverage, feather_mask


def _weights(grid, tiles, mode):
    """Per-pixel weights that composite_pass gives the old canvas and each tile (it is linear in both)."""
    shape = (1, 1, grid.canvas_h, grid.canvas_w)
    zeros = {t.id: torch.zeros(1, 1, t.h, t.w) for t in tiles}
    background = composite_pass(torch.ones(shape), grid, zeros, mode)[0, 0]
    tile_weights = []
    for t in tiles:
        one_hot = zeros | {t.id: torch.ones(1, 1, t.h, t.w)}
        tile_weights.append(composite_pass(torch.zeros(shape), grid, one_hot, mode)[0, 0])
    return background, tile_weights


@pytest.mark.parametrize("size", [(64, 64), (40, 96), (512, 512)])
@pytest.mark.parametrize("parity,mode", [("even", "paste"), ("odd", "feather")])
def test_weights_sum_to_one_everywhere(size, parity, mode):
    grid = chess_grid(*size, 16 if size[0] < 512 else 128)
    tiles = getattr(grid, parity)
    background, tile_weights = _weights(grid, tiles, mode)
    total = background + sum(tile_weights)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    assert all((w >= 0).all() for w in tile_weights) and (background >= 0).all()


@pytest.mark.parametrize("parity,mode", [("even", "paste"), ("odd", "feather")])
def test_tiles_returned_unchanged_leave_the_canvas_unchanged(parity, mode):
    grid = chess_grid(96, 160, 32)
    canvas = torch.randn(1, 4, 96, 160) * 3
    results = {t.id: canvas[..., t.y : t.y + t.h, t.x : t.x + t.w].clone() for t in getattr(grid, parity)}
    out = composite_pass(canvas, grid, results, mode)
    assert (out - canvas).abs().max().item() < 1e-6


def test_odd_blending_never_touches_the_canvas_border():
    grid = chess_grid(160, 160, 32)
    for tile in grid.odd:
        mask = feather_mask(grid, tile)
        top = grid.overlap_before(tile, "y") or grid.overlap_after(tile, "y")
        left = grid.overlap_before(tile, "x") or grid.overlap_after(tile, "x")
        if tile.y == 0:  # no ramp runs towards the top border: the border row weighs like the rows below it
            assert torch.equal(mask[0], mask[top])
        if tile.y + tile.h == grid.canvas_h:
            assert torch.equal(mask[-1], mask[-1 - top])
        if tile.x == 0:
            assert torch.equal(mask[:, 0], mask[:, left])
        if tile.x + tile.w == grid.canvas_w:
            assert torch.equal(mask[:, -1], mask[:, -1 - left])
    # a refined odd tile on the border lands at full weight on the border pixels it alone covers
    canvas = torch.zeros(1, 1, 160, 160)
    results = {t.id: torch.ones(1, 1, t.h, t.w) for t in grid.odd}
    out = composite_pass(canvas, grid, results, "feather")
    top_odd = next(t for t in grid.odd if t.y == 0)
    middle = top_odd.x + top_odd.w // 2
    assert out[0, 0, 0, middle] == 1.0


def test_interior_edges_are_feathered():
    grid = chess_grid(160, 160, 32)
    tile = next(t for t in grid.odd if t.y > 0 and t.x > 0 and t.y + t.h < 160 and t.x + t.w < 160)
    mask = feather_mask(grid, tile)
    assert mask[0, tile.w // 2] < 0.05 and mask[tile.h // 2, 0] < 0.05
    assert mask[tile.h // 2, tile.w // 2] == 1.0


def test_pass_result_does_not_depend_on_result_order():
    grid = chess_grid(96, 96, 32)
    canvas = torch.randn(1, 4, 96, 96)
    results = {t.id: torch.randn(1, 4, t.h, t.w) for t in grid.odd}
    shuffled = dict(reversed(list(results.items())))
    in_order = composite_pass(canvas, grid, results, "feather")
    assert torch.equal(in_order, composite_pass(canvas, grid, shuffled, "feather"))


def test_even_pass_replaces_what_its_tiles_cover():
    grid = chess_grid(96, 96, 32)
    canvas = torch.zeros(1, 1, 96, 96)
    results = {t.id: torch.full((1, 1, t.h, t.w), 5.0) for t in grid.even}
    out = composite_pass(canvas, grid, results, "paste")
    covered = coverage(grid, grid.even) > 0
    assert torch.allclose(out[0, 0][covered], torch.tensor(5.0))
    assert (out[0, 0][~covered] == 0).all()


@pytest.mark.parametrize("mode,parity", [("paste", "even"), ("feather", "odd")])
def test_region_composite_is_bit_identical_to_the_whole(mode, parity):
    grid = chess_grid(96, 160, 32)
    canvas = torch.randn(1, 4, 96, 160)
    results = {t.id: torch.randn(1, 4, t.h, t.w) for t in getattr(grid, parity)}
    whole = composite_pass(canvas, grid, results, mode)
    for tile in grid.tiles:
        box = (tile.y, tile.x, tile.h, tile.w)
        part = composite_pass(canvas, grid, results, mode, region=box)
        assert torch.equal(part, whole[..., tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])
