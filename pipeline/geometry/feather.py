"""Feather masks and pass compositing (DESIGN rule 3).

Each tile weighs its pixels with a smoothstep ramp across the overlap on its interior edges
(never at the canvas border). A pass composites all its tiles at once from normalised weights
m_i = w_i / max(W, 1), W = sum of w_i, and the canvas keeps 1 - min(W, 1): the weights over any
pixel sum to 1, so tiles that return their input leave the canvas unchanged, and the result
does not depend on the order the tiles finished in.
"""

from __future__ import annotations

import torch

from pipeline.geometry.chess import Tile, TileGrid


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
    region: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Composite one pass of refined tiles ([1, C, h, w] by tile id) into the canvas; return the new canvas.

    mode "paste" (the even pass): wherever a tile has weight it replaces the canvas; tiles that
    overlap each other blend by their ramps. mode "feather" (the odd pass): tiles blend into the
    canvas over their interior overlaps. With `region` (y, x, h, w) only that box is computed and
    returned, bit-identical to the same box of the whole composite: a pixel depends only on the
    tiles over it, added in tile id order either way.
    """
    if mode not in ("paste", "feather"):
        raise ValueError(f"unknown composite mode {mode!r}")
    ry, rx, rh, rw = region or (0, 0, grid.canvas_h, grid.canvas_w)
    base = canvas[..., ry : ry + rh, rx : rx + rw]
    acc = torch.zeros_like(base)
    weight = torch.zeros(rh, rw, dtype=canvas.dtype)
    for tile in grid.tiles:  # grid order = tile id order: a fixed summation order keeps results bit-stable
        if tile.id not in results:
            continue
        y0, y1 = max(tile.y, ry), min(tile.y + tile.h, ry + rh)
        x0, x1 = max(tile.x, rx), min(tile.x + tile.w, rx + rw)
        if y0 >= y1 or x0 >= x1:
            continue
        mask = feather_mask(grid, tile).to(canvas.dtype)[y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        result = results[tile.id].to(canvas.dtype)[..., y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
        acc[..., y0 - ry : y1 - ry, x0 - rx : x1 - rx] += result * mask
        weight[y0 - ry : y1 - ry, x0 - rx : x1 - rx] += mask
    if mode == "paste":
        return torch.where(weight > 0, acc / weight.clamp_min(1e-12), base)
    scale = weight.clamp_min(1.0)
    return base * (1 - weight / scale) + acc / scale
