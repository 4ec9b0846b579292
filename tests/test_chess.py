import torch

from pipeline.geometry.chess import batches, chess_grid, cover_grid, fitted_cover_grid


def test_seed_002_table_4096_with_1024_tiles():
    f = 8
    grid = chess_grid(4096 // f, 4096 // f, 1024 // f)
    assert (grid.rows, grid.cols) == (5, 5)
    assert len(grid.tiles) == 25
    assert len(grid.even) == 13 and len(grid.odd) == 12
    assert tuple(s * f for s in grid.stride) == (768, 768)
    assert tuple(o * f for o in grid.overlap) == (256, 256)
    assert grid.work_multiplier == 25 * 1024**2 / 4096**2  # 1.5625
    assert [t.x * f for t in grid.tiles[:5]] == [0, 768, 1536, 2304, 3072]
    assert {(t.row, t.col) for t in grid.even} >= {(0, 0), (0, 2), (0, 4), (1, 1), (1, 3)}
    assert all((t.row + t.col) % 2 == 1 for t in grid.odd)


def _covered(grid):
    cover = torch.zeros(grid.canvas_h, grid.canvas_w, dtype=torch.int32)
    for t in grid.tiles:
        assert t.y >= 0 and t.x >= 0 and t.y + t.h <= grid.canvas_h and t.x + t.w <= grid.canvas_w
        cover[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    return cover


def test_uhd_grid_covers_every_pixel_per_axis():
    grid = chess_grid(2160 // 8, 3840 // 8, 1024 // 8)
    assert (grid.rows, grid.cols) == (3, 5)  # round(270/128)+1, round(480/128)+1
    assert _covered(grid).min() >= 1
    assert grid.ys[-1] + grid.tile_h == 270 and grid.xs[-1] + grid.tile_w == 480  # last tile on the edge
    assert grid.overlap[0] > 0 and grid.overlap[1] > 0


def test_8k_and_16k_grids_follow_the_same_rule():
    for side, n in ((8192, 9), (16384, 17)):
        grid = chess_grid(side // 8, side // 8, 128)
        assert (grid.rows, grid.cols) == (n, n)
        assert _covered(grid).min() >= 1


def test_tile_as_large_as_an_axis_gives_one_tile_on_it():
    grid = chess_grid(128, 512, 128)
    assert grid.rows == 1 and grid.cols == 5
    assert grid.overlap[0] == 0


def test_batches_are_fixed_by_tile_id():
    grid = chess_grid(512, 512, 128)
    even = batches(grid.even, 4)
    assert [len(b) for b in even] == [4, 4, 4, 1]
    assert [t.id for b in even for t in b] == sorted(t.id for t in grid.even)
    assert batches(tuple(reversed(grid.even)), 4) == even


def test_cover_grid_keeps_minimum_overlap():
    grid = cover_grid(300, 200, 64, 8)
    assert _covered(grid).min() >= 1
    assert min(grid.overlap) >= 8


def test_fitted_cover_grid_shrinks_its_tiles_to_the_canvas():
    """The upscaler's tiles: as many as cover_grid's, no larger than asked, overlapping by little more than asked."""
    for h, w, tile, overlap in ((1024, 1024, 512, 32), (1024, 1536, 512, 32), (100, 140, 48, 16), (300, 200, 64, 8)):
        fitted, plain = fitted_cover_grid(h, w, tile, overlap), cover_grid(h, w, tile, overlap)
        assert len(fitted.tiles) == len(plain.tiles) and max(fitted.tile_h, fitted.tile_w) <= tile
        assert _covered(fitted).min() >= 1 and min(fitted.overlap) >= overlap
        assert sum(t.h * t.w for t in fitted.tiles) <= sum(t.h * t.w for t in plain.tiles)
    grid = fitted_cover_grid(1024, 1024, 512, 32)
    assert (grid.tile_h, grid.ys) == (364, (0, 330, 660))  # 3 tiles 34 px apart, not 512 px ones 256 px apart
    assert fitted_cover_grid(512, 400, 512, 32).tiles == cover_grid(512, 400, 512, 32).tiles  # one tile
