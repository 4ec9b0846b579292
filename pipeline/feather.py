"""Feather masks and pass compositing (DESIGN rule 3).

Each tile weighs its pixels with a smoothstep ramp across the overlap on its interior edges
(never at the canvas border). A pass composites all its tiles at once from normalised weights
m_i = w_i / max(W, 1), W = sum of w_i, and the canvas keeps 1 - min(W, 1): the weights over any
pixel sum to 1, so tiles that return their input leave the canvas unchanged, and the result
does not depend on the order the tiles finished in.
"""

from __future__ import annotations

import torch

from pipeline.chess import Tile, TileGrid


def smoothstep_ramp(n: int) -> torch.Tensor:
    """t^2 (3 - 2t) sampled at pixel centres t = (i + 0.5) / n: rises from ~0 to ~1, never reaching either."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return t * t * (3 - 2 * t)


def feather_mask(grid: TileGrid, tile: Tile) -> torch.Tensor:
    """[h, w] weights of one tile: 1 inside, smoothstep over the overlap on interior edges only."""
    mask = torch.ones(tile.h, tile.w)
    top, bottom = grid.overlap_before(tile, "y"), grid.overlap_after(tile, "y")
    left, right = grid.overlap_before(tile, "x"), grid.overlap_after(tile, "x")
    if top:
        mask[:top] *= smoothstep_ramp(top)[:, None]
    if bottom:
        mask[-bottom:] *= smoothstep_ramp(bottom).flip(0)[:, None]
    if left:
        mask[:, :left] *= smoothstep_ramp(left)[None, :]
    if right:
        mask[:, -right:] *= smoothstep_ramp(right).flip(0)[None, :]
    return mask


def coverage(grid: TileGrid, tiles: tuple[Tile, ...]) -> torch.Tensor:
    """[H, W] sum of the feather weights of `tiles` over the canvas."""
    total = torch.zeros(grid.canvas_h, grid.canvas_w)
    for tile in tiles:
        total[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] += feather_mask(grid, tile)
    return total


def composite_pass(
    canvas: torch.Tensor,
    grid: TileGrid,
    results: dict[int, torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """Composite one pass of refined tiles ([C, h, w] or [1, C, h, w] by tile id) into a new canvas.

    mode "paste" (the even pass): wherever a tile has weight it replaces the canvas; tiles that
    overlap each other blend by their ramps. mode "feather" (the odd pass): tiles blend into the
    canvas over their interior overlaps.
    """
    if mode not in ("paste", "feather"):
        raise ValueError(f"unknown composite mode {mode!r}")
    tiles = tuple(t for t in grid.tiles if t.id in results)
    acc = torch.zeros_like(canvas)
    weight = torch.zeros(grid.canvas_h, grid.canvas_w, dtype=canvas.dtype)
    for tile in tiles:  # grid order = tile id order: a fixed summation order keeps results bit-stable
        mask = feather_mask(grid, tile).to(canvas.dtype)
        box = (..., slice(tile.y, tile.y + tile.h), slice(tile.x, tile.x + tile.w))
        acc[box] += results[tile.id].reshape(acc[box].shape).to(canvas.dtype) * mask
        weight[box[1:]] += mask
    if mode == "paste":
        covered = weight > 0
        return torch.where(covered, acc / weight.clamp_min(1e-12), canvas)
    scale = weight.clamp_min(1.0)
    return canvas * (1 - weight / scale) + acc / scale
