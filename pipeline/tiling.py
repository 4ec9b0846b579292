"""Image-space tiling for whole-image models (upscaler, VAE decoder): cut, run each tile, blend back.

Tiles overlap; outputs are blended with the chess passes' normalised feather weights on the
scaled grid, so an overlap never shows a seam and memory per call is bounded by one tile.
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.chess import TileGrid, cover_grid
from pipeline.feather import composite_pass
from pipeline.taskgraph import Executor, Task


def scaled_grid(grid: TileGrid, scale: int) -> TileGrid:
    """The same tiling in output units (scale x input)."""
    return TileGrid(
        grid.canvas_h * scale,
        grid.canvas_w * scale,
        grid.tile_h * scale,
        grid.tile_w * scale,
        tuple(y * scale for y in grid.ys),
        tuple(x * scale for x in grid.xs),
    )


def _crop(source: torch.Tensor, tile, done) -> tuple[torch.Tensor]:
    return (source[..., tile.y : tile.y + tile.h, tile.x : tile.x + tile.w].contiguous(),)


def run_tiled(
    ex: Executor, stage: str, method: str, source: torch.Tensor, tile: int, overlap: int, scale: int, channels: int
) -> torch.Tensor:
    """Run `method` on overlapping tiles of `source` [1, C, H, W] and blend its outputs into [1, channels, sH, sW]."""
    grid = cover_grid(source.shape[-2], source.shape[-1], tile, overlap)
    tasks = [
        Task(t.id, method, partial(_crop, source, t), group=stage, boxes=((t.id, t.y, t.x, t.h, t.w),))
        for t in grid.tiles
    ]
    results = ex.run(stage, tasks)
    out_grid = scaled_grid(grid, scale)
    canvas = torch.zeros(1, channels, out_grid.canvas_h, out_grid.canvas_w)
    return composite_pass(canvas, out_grid, results, mode="paste")
