"""A seam metric: how much sharper an image changes across tile boundaries than anywhere else.

seam ratio = mean |I(x) - I(x-1)| over the pixel pairs that straddle a tile boundary, divided by
the mean over all neighbouring pairs in the same direction. 1.0: the boundaries look like any
other row or column; a visible seam raises it above 1; blending two textures lowers it below 1.
"""

from __future__ import annotations

import torch

from pipeline.chess import TileGrid


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
