"""Seam metrics: does a tiled refine (or decode) leave the tile grid visible? Weight-independent measures.

The protocol is research/seams.md section 12: against an untiled reference of the same canvas,
texture unevenness (CV of block gradient energy), gradient energy in the grid's overlap bands vs
tile cores, even- vs odd-tile cores, and the error to the reference by distance to a tile edge.
All functions here are pure over tensors; bench/seams.py runs the renders and prints them.

seam ratio (the older single number) = mean |I(x) - I(x-1)| over the pixel pairs that straddle a
tile boundary, divided by the mean over all neighbouring pairs in the same direction. 1.0: the
boundaries look like any other row or column; a visible seam raises it above 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.geometry.chess import TileGrid

DISTANCE_BINS = (0, 2, 4, 8, 16, 32)  # latent px from the nearest tile edge: [0, 2), [2, 4), ..., [32, inf)


def grid_boundaries(grid: TileGrid, factor: int) -> tuple[list[int], list[int]]:
    """Interior tile edges of a latent grid in px (rows, columns): every origin and every end inside the canvas."""

    def edges(origins: tuple[int, ...], size: int, length: int) -> list[int]:
        cuts = {o for o in origins if o > 0} | {o + size for o in origins if o + size < length}
        return sorted(c * factor for c in cuts)

    return edges(grid.ys, grid.tile_h, grid.canvas_h), edges(grid.xs, grid.tile_w, grid.canvas_w)


def seam_ratio(image: torch.Tensor, rows: list[int], cols: list[int]) -> float:
    """Mean absolute step across the given boundaries over the mean step in the same direction ([.., H, W])."""
    image = image.float()
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs()  # dy[..., i, :] straddles rows i and i + 1
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs()
    at_rows = dy[..., [r - 1 for r in rows], :]
    at_cols = dx[..., :, [c - 1 for c in cols]]
    # what those pairs would sum to if boundaries were like any other row / column
    expected = at_rows.numel() * dy.mean() + at_cols.numel() * dx.mean()
    if at_rows.numel() + at_cols.numel() == 0:
        return 1.0
    return float((at_rows.sum() + at_cols.sum()) / expected.clamp_min(1e-12))


# --- where the seams can be: masks over a canvas (latent px unless upsampled) ---


@dataclass(frozen=True)
class SeamMasks:
    """[H, W] maps of one tiling: overlap bands, tile cores (split by the owning tile's parity), edge distance."""

    band: torch.Tensor  # bool: covered by two or more tiles
    core: torch.Tensor  # bool: covered by exactly one tile
    even: torch.Tensor  # bool: core of an even tile
    odd: torch.Tensor  # bool: core of an odd tile
    distance: torch.Tensor  # float: px to the nearest interior tile edge (inf without one)

    def crop(self, y: int, x: int, h: int, w: int) -> SeamMasks:
        """The same maps over the box (y, x, h, w)."""
        return SeamMasks(*(m[y : y + h, x : x + w] for m in vars(self).values()))

    def upsample(self, factor: int) -> SeamMasks:
        """Latent maps -> pixel maps (each latent px becomes factor x factor px; distances in latent px kept)."""
        up = [m.repeat_interleave(factor, 0).repeat_interleave(factor, 1) for m in vars(self).values()]
        return SeamMasks(*up)


def edge_distance(length: int, edges: list[int]) -> torch.Tensor:
    """[length] px from each position to the nearest edge (an edge at c lies between c - 1 and c; both are 0)."""
    pos = torch.arange(length, dtype=torch.float32)
    if not edges:
        return torch.full((length,), math.inf)
    cuts = torch.tensor(edges, dtype=torch.float32)
    after = pos[:, None] - cuts[None, :]  # >= 0 on the far side of the edge
    return torch.where(after >= 0, after, -after - 1).min(1).values


def grid_masks(grid: TileGrid) -> SeamMasks:
    """Bands (coverage >= 2), cores (coverage 1, split by Tile.parity) and edge distance of a tile grid."""
    even = torch.zeros(grid.canvas_h, grid.canvas_w, dtype=torch.int32)
    odd = torch.zeros_like(even)
    for t in grid.tiles:
        (even if t.parity == "even" else odd)[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    cover = even + odd
    rows, cols = grid_boundaries(grid, 1)
    dist = torch.minimum(
        edge_distance(grid.canvas_h, rows)[:, None].expand(grid.canvas_h, grid.canvas_w),
        edge_distance(grid.canvas_w, cols)[None, :].expand(grid.canvas_h, grid.canvas_w),
    )
    core = cover == 1
    return SeamMasks(cover >= 2, core, core & (even == 1), core & (odd == 1), dist)


def abutting_masks(height: int, width: int, tile: int, band: int) -> SeamMasks:
    """Masks of a grid of abutting tiles (Ultimate SD Upscale): bands within `band` px of an interior edge."""
    rows, cols = list(range(tile, height, tile)), list(range(tile, width, tile))
    dist = torch.minimum(edge_distance(height, rows)[:, None], edge_distance(width, cols)[None, :])
    r = torch.arange(height)[:, None] // tile
    c = torch.arange(width)[None, :] // tile
    core = dist >= band
    even = (r + c) % 2 == 0
    return SeamMasks(dist < band, core, core & even, core & ~even, dist)


# --- the measures ---


def region_step_mean(image: torch.Tensor, mask: torch.Tensor, touch: bool) -> float:
    """Mean |neighbour step| (both axes, averaged over channels) over the pairs with either px in `mask` (touch)
    or both px in it; a step right on a tile edge has one px on each side, so bands take it by touching."""
    x = image.float().reshape(-1, *image.shape[-2:])
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(0)
    dy = (x[:, 1:, :] - x[:, :-1, :]).abs().mean(0)
    join = torch.logical_or if touch else torch.logical_and
    mx, my = join(mask[:, :-1], mask[:, 1:]), join(mask[:-1], mask[1:])
    count = int(mx.sum() + my.sum())
    return float((dx[mx].sum() + dy[my].sum()) / count) if count else math.nan


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` where `mask` is set; NaN for an empty mask."""
    return float(values[mask].mean()) if mask.any() else math.nan


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is NaN."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def band_core_ratio(image: torch.Tensor, masks: SeamMasks) -> float:
    """Gradient energy in the overlap bands over that in tile cores (research/seams.md 12; seam-free ~ 1)."""
    return ratio(region_step_mean(image, masks.band, True), region_step_mean(image, masks.core, False))


def even_odd_ratio(image: torch.Tensor, masks: SeamMasks) -> float:
    """Gradient energy in even-tile cores over odd-tile cores (DESIGN rule 6: the same texture, ~ 1)."""
    return ratio(region_step_mean(image, masks.even, False), region_step_mean(image, masks.odd, False))


def texture_cv(image: torch.Tensor, block: int) -> float:
    """Coefficient of variation (std / mean) over block x block blocks of the mean |horizontal step|."""
    x = image.float().reshape(-1, *image.shape[-2:])
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(0)
    dx = torch.cat([dx, dx[:, -1:]], 1)  # W - 1 steps: repeat the last so the last block of a side counts
    means = F.avg_pool2d(dx[None, None], block).flatten()  # a partial block at a far edge is dropped
    return float(means.std() / means.mean()) if means.numel() > 1 else math.nan


def error_map(tiled: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[H, W] per-pixel L2 norm over channels of tiled - reference (research/seams.md 12, metric 1)."""
    return (tiled.float() - reference.float()).reshape(-1, *tiled.shape[-2:]).norm(dim=0)


def error_profile(error: torch.Tensor, distance: torch.Tensor, bins=DISTANCE_BINS) -> list[float]:
    """Mean error per distance-to-tile-edge bin [bins[i], bins[i+1]) (the last bin is open); NaN if empty."""
    edges = list(bins) + [math.inf]
    return [masked_mean(error, (distance >= lo) & (distance < hi)) for lo, hi in zip(edges, edges[1:], strict=False)]


def band_core_error(error: torch.Tensor, masks: SeamMasks) -> float:
    """Mean error in overlap bands over mean error in tile cores (research/seams.md 12, rho; seam-free ~ 1)."""
    return ratio(masked_mean(error, masks.band), masked_mean(error, masks.core))
