"""Image-space tiling for whole-image models (upscaler, VAE): cut, run each tile, blend back.

Tiles overlap; outputs are blended with the chess passes' normalised feather weights on the
scaled grid, so an overlap never shows a seam and memory per call is bounded by one tile.

Networks with GroupNorm (the VAE) normalise every tile with statistics pooled over the image
(pipeline.sampling.groupnorm): every tile records its GroupNorm moments over its core, the driver pools them
in tile-id order, and every tile runs again with the pooled statistics. run_tiled_shared_norm does
it with one barrier (the encode); run_tiled_exact_norm with one barrier per GroupNorm layer, so each
layer's statistics are those of an untiled forward (the decode).
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.geometry.chess import Tile, TileGrid, cover_grid, fitted_cover_grid
from pipeline.geometry.feather import composite_pass
from pipeline.graph.taskgraph import Executor, Task
from pipeline.sampling.groupnorm import Core, combine_stats


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


def _grid(stage: str, source: torch.Tensor, tile: int, overlap: int, scale_in: int, fitted: bool = False) -> TileGrid:
    h, w = source.shape[-2:]
    if h % scale_in or w % scale_in:
        raise ValueError(f"{stage}: {w}x{h} is not a multiple of {scale_in}")
    return (fitted_cover_grid if fitted else cover_grid)(h // scale_in, w // scale_in, tile, overlap)


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
    fitted: bool = False,
) -> torch.Tensor:
    """Run `method` on overlapping tiles of `source` [1, C, H, W] and blend its outputs into
    [1, channels, H / scale_in * scale, ...]; the grid is laid in units of scale_in source pixels, its tiles
    shrunk to fit where `fitted` (pipeline.geometry.chess.fitted_cover_grid)."""
    grid = _grid(stage, source, tile, overlap, scale_in, fitted)
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


def _stats_graph(ex, stage: str, method: str, source, grid: TileGrid, scale_in: int, extra: tuple) -> dict:
    """One statistics graph: every tile's recorded moments, pooled in tile-id order (bit-stable on any executor)."""
    tasks = [
        Task(
            t.id,
            method,
            partial(_crop, source, t, scale=scale_in, extra=(core_box(grid, t), *extra)),
            group=stage,
            boxes=_boxes(t),
        )
        for t in grid.tiles
    ]
    recorded = ex.run(stage, tasks)
    return combine_stats([recorded[t.id] for t in grid.tiles])


def run_tiled_exact_norm(
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
    """Run `method` over overlapping tiles of `source` with every GroupNorm layer's statistics pooled
    over the image layer by layer, as an untiled forward computes them.

    A layer's input depends on the statistics of the layers before it, so they are found in order:
    graph k (`"{stage} stats"`) runs `stats_method(crop, core, known, until)` per tile, normalising
    layers 0..k-1 with the pooled statistics found so far and stopping at layer k, whose pooled moments
    are then exact. The layers are named by one `stats_method` call on a 2x2-unit corner crop. Then
    graph `stage` runs `method(crop, statistics)` and its outputs are blended as run_tiled_shared_norm's.
    Tiles still see only their own pixels (zero padding at their borders, attention within the tile)."""
    grid = _grid(stage, source, tile, overlap, scale_in)
    stats_stage = f"{stage} stats"
    probe = source[..., : 2 * scale_in, : 2 * scale_in].contiguous()
    layers = list(ex.call(stats_stage, stats_method, probe, (0.0, 1.0, 0.0, 1.0)))
    known: dict[str, torch.Tensor] = {}
    for name in layers:
        known[name] = _stats_graph(ex, stats_stage, stats_method, source, grid, scale_in, (dict(known), name))[name]
    tasks = [
        Task(t.id, method, partial(_crop, source, t, scale=scale_in, extra=(known,)), group=stage, boxes=_boxes(t))
        for t in grid.tiles
    ]
    return _blend(grid, ex.run(stage, tasks), scale_out, channels)
