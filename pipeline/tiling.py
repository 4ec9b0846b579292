"""Image-space tiling for whole-image models (upscaler, VAE): cut, run each tile, blend back.

Tiles overlap; outputs are blended with the chess passes' normalised feather weights on the
scaled grid, so an overlap never shows a seam and memory per call is bounded by one tile.

Networks with GroupNorm (the VAE) run in two task graphs with one barrier between them
(run_tiled_shared_norm): every tile records its GroupNorm moments over its core, the driver pools
them in tile-id order, and every tile runs again with the pooled statistics (pipeline.groupnorm).
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.chess import Tile, TileGrid, cover_grid
from pipeline.feather import composite_pass
from pipeline.groupnorm import Core, combine_stats
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


def _crop(source: torch.Tensor, tile, done, scale: int = 1, extra: tuple = ()) -> tuple:
    y, x, h, w = (v * scale for v in (tile.y, tile.x, tile.h, tile.w))
    return (source[..., y : y + h, x : x + w].contiguous(), *extra)


def core_bounds(origins: tuple[int, ...], size: int, length: int, i: int) -> tuple[int, int]:
    """[start, end) of tile i's core along one axis: overlaps split at their middle, so cores partition it."""
    start = 0 if i == 0 else (origins[i - 1] + size + origins[i]) // 2
    end = length if i == len(origins) - 1 else (origins[i] + size + origins[i + 1]) // 2
    return start, end


def core_box(grid: TileGrid, tile: Tile) -> Core:
    """The tile's core as fractions of the tile (top, bottom, left, right)."""
    top, bottom = core_bounds(grid.ys, grid.tile_h, grid.canvas_h, tile.row)
    left, right = core_bounds(grid.xs, grid.tile_w, grid.canvas_w, tile.col)
    return ((top - tile.y) / tile.h, (bottom - tile.y) / tile.h, (left - tile.x) / tile.w, (right - tile.x) / tile.w)


def _grid(stage: str, source: torch.Tensor, tile: int, overlap: int, scale_in: int) -> TileGrid:
    h, w = source.shape[-2:]
    if h % scale_in or w % scale_in:
        raise ValueError(f"{stage}: {w}x{h} is not a multiple of {scale_in}")
    return cover_grid(h // scale_in, w // scale_in, tile, overlap)


def _boxes(t: Tile) -> tuple:
    return ((t.id, t.y, t.x, t.h, t.w),)


def _blend(grid: TileGrid, results: dict[int, torch.Tensor], scale: int, channels: int) -> torch.Tensor:
    out_grid = scaled_grid(grid, scale)
    canvas = torch.zeros(1, channels, out_grid.canvas_h, out_grid.canvas_w)
    return composite_pass(canvas, out_grid, results, mode="paste")


def run_tiled(
    ex: Executor,
    stage: str,
    method: str,
    source: torch.Tensor,
    tile: int,
    overlap: int,
    scale: int,
    channels: int,
    scale_in: int = 1,
) -> torch.Tensor:
    """Run `method` on overlapping tiles of `source` [1, C, H, W] and blend its outputs into
    [1, channels, H / scale_in * scale, ...]; the grid is laid in units of scale_in source pixels."""
    grid = _grid(stage, source, tile, overlap, scale_in)
    tasks = [
        Task(t.id, method, partial(_crop, source, t, scale=scale_in), group=stage, boxes=_boxes(t)) for t in grid.tiles
    ]
    return _blend(grid, ex.run(stage, tasks), scale, channels)


def run_tiled_shared_norm(
    ex: Executor,
    stage: str,
    stats_method: str,
    method: str,
    source: torch.Tensor,
    tile: int,
    overlap: int,
    scale_in: int,
    scale_out: int,
    channels: int,
) -> torch.Tensor:
    """Run `method` over overlapping tiles of `source` with GroupNorm statistics shared by all tiles.

    The grid is laid in units of scale_in source pixels (the VAE factor for an encode, 1 for a decode),
    so every core edge falls on a whole pixel of every layer. Graph `"{stage} stats"` runs
    `stats_method(crop, core)` per tile; graph `stage` runs `method(crop, pooled)` and its outputs
    are blended into [1, channels, H / scale_in * scale_out, ...]."""
    grid = _grid(stage, source, tile, overlap, scale_in)
    stats_stage = f"{stage} stats"
    stats_tasks = [
        Task(
            t.id,
            stats_method,
            partial(_crop, source, t, scale=scale_in, extra=(core_box(grid, t),)),
            group=stats_stage,
            boxes=_boxes(t),
        )
        for t in grid.tiles
    ]
    recorded = ex.run(stats_stage, stats_tasks)
    pooled = combine_stats([recorded[t.id] for t in grid.tiles])  # tile-id order: bit-stable on any executor
    tasks = [
        Task(t.id, method, partial(_crop, source, t, scale=scale_in, extra=(pooled,)), group=stage, boxes=_boxes(t))
        for t in grid.tiles
    ]
    return _blend(grid, ex.run(stage, tasks), scale_out, channels)
