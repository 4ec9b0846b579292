"""The fitted grid: tiles sized to the canvas with a minimum overlap, a lighter alternative to the chess rule."""

import pytest

from pipeline.errors import SpecError
from pipeline.geometry.chess import chess_grid, fit_grid
from pipeline.geometry.feather import coverage
from pipeline.spec import RenderSpec

F = 8  # SDXL's VAE factor: px per latent


def test_4k_fits_4x4_tiles_of_1120_px_with_work_x1_2():
    grid = fit_grid(4096 // F, 4096 // F, 1024 // F, 128 // F)
    assert (grid.rows, grid.cols) == (4, 4)
    assert (grid.tile_h * F, grid.tile_w * F) == (1120, 1120)
    assert grid.overlap == (128 // F, 128 // F)
    assert grid.work_multiplier == pytest.approx(16 * 1120**2 / 4096**2)
    assert round(grid.work_multiplier, 2) == 1.20
    assert grid.work_multiplier < chess_grid(4096 // F, 4096 // F, 1024 // F).work_multiplier  # 1.56


@pytest.mark.parametrize("size", [(4096, 4096), (2160, 3840), (8192, 8192), (4096, 6144), (1200, 1024)])
def test_tiles_cover_the_canvas_with_the_minimum_overlap_and_end_on_the_edge(size):
    h, w = size[0] // F, size[1] // F
    grid = fit_grid(h, w, 1024 // F, 128 // F)
    assert grid.ys[0] == 0 and grid.xs[0] == 0
    assert grid.ys[-1] + grid.tile_h == h and grid.xs[-1] + grid.tile_w == w  # last tile flush with the edge
    for origins, size_, length in ((grid.ys, grid.tile_h, h), (grid.xs, grid.tile_w, w)):
        if len(origins) > 1:
            assert min(a + size_ - b for a, b in zip(origins, origins[1:], strict=False)) >= 128 // F
        assert size_ % 4 == 0 or size_ == length
    assert (coverage(grid, grid.tiles) > 0).all()


def test_even_and_odd_tiles_form_a_checkerboard():
    grid = fit_grid(512, 512, 128, 16)
    for tile in grid.tiles:
        assert tile.parity == ("even" if (tile.row + tile.col) % 2 == 0 else "odd")
    assert len(grid.even) == 8 and len(grid.odd) == 8
    # no two even tiles share an edge: side neighbours always differ in parity
    for a in grid.even:
        for b in grid.even:
            assert abs(a.row - b.row) + abs(a.col - b.col) != 1


def test_a_tile_as_large_as_the_canvas_gives_one_tile():
    grid = fit_grid(128, 256, 128, 16)
    assert grid.rows == 1 and grid.tile_h == 128


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="fit overlap"):
        fit_grid(512, 512, 128, 128)


def test_spec_selects_the_grid_and_checks_the_overlap(tiny_sdxl):
    from pipeline.loading.models import inspect_diffusion_model
    from pipeline.plan import make_plan

    spec = RenderSpec(model=str(tiny_sdxl), width=4096, height=4096, grid="fit", fit_overlap=128)
    plan = make_plan(spec.validate(), inspect_diffusion_model(tiny_sdxl))
    assert (plan.grid.rows, plan.grid.cols, plan.grid.tile_h * F) == (4, 4, 1120)
    text = plan.describe()
    assert "fitted grid" in text and "16 tiles of 1120x1120 px" in text and "work x1.20" in text
    with pytest.raises(SpecError, match="grid 'diagonal'"):
        RenderSpec(model="m", grid="diagonal").validate()
    with pytest.raises(SpecError, match="fit_overlap 100"):
        RenderSpec(model="m", grid="fit", fit_overlap=100).validate()
    RenderSpec(model="m", width=512, height=512, tile=128, fit_overlap=128).validate()  # ignored by the chess grid


def test_cli_flags_set_the_grid(tiny_sdxl, tmp_path):
    from farm.cli import _spec_for_render, build_parser

    argv = [
        "render",
        "--model",
        str(tiny_sdxl),
        "--grid",
        "fit",
        "--fit-overlap",
        "64",
        "--out",
        str(tmp_path / "a.png"),
    ]
    spec, _, _ = _spec_for_render(build_parser().parse_args(argv))
    assert (spec.grid, spec.fit_overlap) == ("fit", 64)
