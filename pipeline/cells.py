"""Cells of a tile grid: the canvas cut at every tile edge, so each cell lies under a fixed set of tiles.

A cell's value after a blended step depends only on the predictions of the tiles over it (the blend is
a per-pixel weighted sum and a scheduler step is elementwise), so the canvas can be stepped cell by
cell, as the tiles over each cell finish, instead of all at once after a barrier.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.chess import Tile, TileGrid


@dataclass(frozen=True)
class Cell:
    """A box (latent units) and the ids of the tiles that cover it, in id order."""

    y: int
    x: int
    h: int
    w: int
    tiles: tuple[int, ...]

    @property
    def box(self) -> tuple:
        return (..., slice(self.y, self.y + self.h), slice(self.x, self.x + self.w))

    def within(self, tile: Tile) -> tuple[slice, slice]:
        """The cell's rows and columns in a tile's own coordinates."""
        return slice(self.y - tile.y, self.y - tile.y + self.h), slice(self.x - tile.x, self.x - tile.x + self.w)


def _cuts(edges: set[int]) -> list[tuple[int, int]]:
    ordered = sorted(edges)
    return list(zip(ordered, ordered[1:], strict=False))


def grid_cells(grid: TileGrid) -> list[Cell]:
    """The canvas cut at every tile's edges: disjoint boxes that tile it, each with the tiles covering it."""
    ys = _cuts({t.y for t in grid.tiles} | {t.y + t.h for t in grid.tiles})
    xs = _cuts({t.x for t in grid.tiles} | {t.x + t.w for t in grid.tiles})
    cells = []
    for y0, y1 in ys:
        for x0, x1 in xs:
            over = tuple(t.id for t in grid.tiles if t.y <= y0 and y1 <= t.y + t.h and t.x <= x0 and x1 <= t.x + t.w)
            cells.append(Cell(y0, x0, y1 - y0, x1 - x0, over))
    return cells


def overlaps(a: Tile, b: Tile) -> bool:
    """Whether two tiles share any pixel."""
    return a.y < b.y + b.h and b.y < a.y + a.h and a.x < b.x + b.w and b.x < a.x + a.w


def batch_neighbours(tile_batches: tuple[tuple[Tile, ...], ...]) -> list[frozenset[int]]:
    """For each batch, the batches (itself included) holding a tile that overlaps one of its tiles: the
    batches whose predictions at one step the batch's input at the next step is made from."""
    return [
        frozenset(j for j, other in enumerate(tile_batches) if any(overlaps(a, b) for a in batch for b in other))
        for batch in tile_batches
    ]
