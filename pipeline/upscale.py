"""Pixel upscale with a spandrel model, tiled so an 8K output fits: tiles in, blended tiles out.

spandrel runs a model on one image; it has no tiler. Input tiles overlap; their upscaled outputs
are blended with the same normalised feather weights as the chess passes, so overlaps never show.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from pipeline.chess import TileGrid, cover_grid
from pipeline.feather import composite_pass


def upscale_grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """Input-space tiles for the upscaler: the fewest tiles of `tile` px with at least `overlap` px shared."""
    return cover_grid(height, width, tile, overlap)


def scaled_grid(grid: TileGrid, scale: int) -> TileGrid:
    """The same tiling in output pixels."""
    return TileGrid(
        grid.canvas_h * scale,
        grid.canvas_w * scale,
        grid.tile_h * scale,
        grid.tile_w * scale,
        tuple(y * scale for y in grid.ys),
        tuple(x * scale for x in grid.xs),
    )


@torch.no_grad()
def upscale_image(
    upscaler,
    image: torch.Tensor,
    tile: int = 512,
    overlap: int = 32,
    on_tile: Callable[[], None] | None = None,
    clock=None,
) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1] -> [1, 3, sH, sW] on the CPU; GPU memory is bounded by one tile."""
    descriptor, scale = upscaler.descriptor, upscaler.scale
    param = next(descriptor.model.parameters())
    grid = upscale_grid(image.shape[-2], image.shape[-1], tile, overlap)
    out_grid = scaled_grid(grid, scale)
    results: dict[int, torch.Tensor] = {}
    for t in grid.tiles:
        patch = image[..., t.y : t.y + t.h, t.x : t.x + t.w].to(param.device, param.dtype)
        with clock("upscaler") if clock else nullcontext():
            results[t.id] = descriptor(patch).float().clamp(0, 1).cpu()
        if on_tile:
            on_tile()
    canvas = torch.zeros(1, image.shape[1], out_grid.canvas_h, out_grid.canvas_w)
    return composite_pass(canvas, out_grid, results, mode="paste")
