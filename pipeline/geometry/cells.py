"""Cells and bands of a tile grid: the canvas cut at every tile edge (cells) or every top and bottom
edge (bands), so each piece lies under a fixed set of tiles.

A piece's value after a composite or a blended step depends only on the tiles over it (the blend is a
per-pixel weighted sum and a scheduler step is elementwise), so a canvas can be finished piece by
piece, as the tiles over each piece arrive, instead of all at once after a barrier.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.geometry.chess import Tile, TileGrid


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

    def shared(self, tile: Tile) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Where cell and tile overlap: (rows, columns) in the cell's coordinates, then in the tile's."""
        y0, y1 = max(self.y, tile.y), min(self.y + self.h, tile.y + tile.h)
        x0, x1 = max(self.x, tile.x), min(self.x + self.w, tile.x + tile.w)
        return (
            (slice(y0 - self.y, y1 - self.y), slice(x0 - self.x, x1 - self.x)),
            (slice(y0 - tile.y, y1 - tile.y), slice(x0 - tile.x, x1 - tile.x)),
        )

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


def grid_bands(grid: TileGrid) -> list[Cell]:
    """The canvas cut at every tile's top and bottom edge: full-width bands, each with the tiles over part of it.
    A band is a coarser unit than a cell: fewer, larger pieces of work for the driver, a little less overlap."""
    ys = _cuts({t.y for t in grid.tiles} | {t.y + t.h for t in grid.tiles})
    return [
        Cell(y0, 0, y1 - y0, grid.canvas_w, tuple(t.id for t in grid.tiles if t.y <= y0 and y1 <= t.y + t.h))
        for y0, y1 in ys
    ]
