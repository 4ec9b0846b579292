"""Canvases of a tiled stage, finished cell by cell as their tiles arrive: composited on the driver
(TiledCanvas) or blended on the workers block by block (AssembledCanvas), with the same arithmetic
(blend_cell: the feathered weighted mean of DESIGN rule 3, summed in tile-id order).
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from functools import partial

import torch

from pipeline.geometry.cells import Cell, grid_cells
from pipeline.geometry.chess import Tile, TileGrid
from pipeline.geometry.feather import feather_mask
from pipeline.geometry.resize import IMAGE, PIXELS, eight_bit

Box = tuple[int, int, int, int]  # (y, x, h, w)


def meets(piece, box: Box) -> bool:
    """Whether a tile or cell shares a pixel with a (y, x, h, w) box."""
    y, x, h, w = box
    return piece.y < y + h and y < piece.y + piece.h and piece.x < x + w and x < piece.x + piece.w


def tile_mask(grid: TileGrid, tile: Tile, cache: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tile's feather weights (pipeline.geometry.feather), made once per shape, set of interior overlaps and
    device, and kept in `cache` (read, never written)."""
    overlaps = (f(tile, axis) for f in (grid.overlap_before, grid.overlap_after) for axis in "yx")
    key = (str(device), tile.h, tile.w, *overlaps)
    if key not in cache:
        cache[key] = feather_mask(grid, tile).to(device)
    return cache[key]


def blend_cell(cell: Cell, tiles: dict[int, Tile], results, out: torch.Tensor) -> torch.Tensor:
    """A cell's composite sum_i w_i x_i / sum_i w_i over the tiles covering it, with their feather weights w
    (DESIGN rule 3), summed in tile-id order (bit-stable whatever order the tiles arrived in), written into `out`
    (rounded to its dtype). `results` maps a tile id to (its output, its weights); the sums are float32."""
    if len(cell.tiles) == 1:
        (tile_id,) = cell.tiles
        rows, cols = cell.within(tiles[tile_id])
        value, mask = results[tile_id]
        if bool(mask[rows, cols].eq(1).all()):  # x * 1 / 1 == x: the same bits, without a float32 pass
            return out.copy_(value[..., rows, cols])
    acc = weight = None
    for tile_id in cell.tiles:
        rows, cols = cell.within(tiles[tile_id])
        value, mask = results[tile_id]
        term = value[..., rows, cols].float() * mask[rows, cols]
        if acc is None:  # 0 + x == x: the first tile starts the sums, as zeros would
            acc, weight = term, mask[rows, cols].clone()
        else:
            acc += term
            weight += mask[rows, cols]
    if out.dtype == acc.dtype:
        return torch.div(acc, weight, out=out)  # straight into the canvas
    return out.copy_(acc.div_(weight))  # acc is this composite's own: divided in place, then rounded


def blend_cells(grid: TileGrid, cells: tuple[Cell, ...], values: tuple, dtype: torch.dtype, masks: dict) -> tuple:
    """The composites of `cells` in `dtype`, from the outputs of the tiles over them (`values`, in the order of
    those tiles' ids; on any device): what a TiledCanvas writes into the same cells, bit for bit on the same
    device. In IMAGE (8-bit levels) each cell is composited in PIXELS and then converted (eight_bit): the levels a
    float16 canvas gives when the image is written. `masks` caches the feather weights (tile_mask)."""
    ids = sorted({t for cell in cells for t in cell.tiles})
    tiles = {t.id: t for t in grid.tiles if t.id in ids}
    results = {i: (v, tile_mask(grid, tiles[i], masks, v.device)) for i, v in zip(ids, values, strict=True)}
    shape, device = values[0].shape[:-2], values[0].device
    blended = PIXELS if dtype == IMAGE else dtype
    out = tuple(
        blend_cell(cell, tiles, results, out=torch.empty(*shape, cell.h, cell.w, dtype=blended, device=device))
        for cell in cells
    )
    return tuple(eight_bit(c) for c in out) if dtype == IMAGE else out


class Blank:
    """A canvas's zeros, written ahead of need with the machine's idle time: the kernel maps a new tensor's pages
    on their first write, and an 8K float16 image (402 MB, ~100k pages) first written by a decode's blocks after
    the last refine step cost the driver 0.7-1.3 s of CPU there (bench/scaling.py --whole-render, 16 simulated
    actors on 2 cores). A thread at the lowest CPU priority writes them in chunks while the driver waits on
    earlier stages (torch's zero_ lets go of the GIL); whoever needs the tensor first writes what is left."""

    CHUNK = 1 << 21  # bytes: what a reader may wait for the thread to finish

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.tensor = torch.empty(shape, dtype=dtype)
        flat, step = self.tensor.view(-1), max(1, self.CHUNK // self.tensor.element_size())
        self.chunks = iter([flat[i : i + step] for i in range(0, flat.numel(), step)])
        self.lock = threading.Lock()
        # not a daemon: Python ends a daemon thread inside torch's C++ at exit, which aborts the process; this one
        # stops at its next chunk once the main thread has ended
        self.thread = threading.Thread(target=self._zero, args=(True,), name="canvas zeros")
        self.thread.start()

    def _zero(self, idle: bool) -> None:
        if idle and hasattr(os, "SCHED_IDLE"):  # Linux: this thread only, and only on a core nothing else wants
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError:  # a sandbox that forbids it: the zeros are written at the normal priority
                pass
        while not idle or threading.main_thread().is_alive():
            with self.lock:
                chunk = next(self.chunks, None)
            if chunk is None:
                return
            chunk.zero_()

    def ready(self) -> torch.Tensor:
        """The tensor, its zeros written."""
        if self.thread.is_alive():
            self._zero(idle=False)
            self.thread.join()
        return self.tensor


class TiledCanvas:
    """A tiled stage's output [1, C, H, W] in `dtype`, composited cell by cell as its tiles arrive.

    `grid` is in output units. Each cell is sum_i w_i x_i / sum_i w_i over the tiles i covering it, with
    the feather weights w (DESIGN rule 3; the "paste" composite of pipeline.geometry.feather), in tile-id order."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype, on_tile=None):
        self.grid = grid
        self.tiles = {tile.id: tile for tile in grid.tiles}
        self.cells = grid_cells(grid)
        self.blank = Blank((1, channels, grid.canvas_h, grid.canvas_w), dtype)  # zeros where tiles leave gaps
        self.under: dict[int, list[int]] = {tile.id: [] for tile in grid.tiles}
        for i, cell in enumerate(self.cells):
            for tile_id in cell.tiles:
                self.under[tile_id].append(i)
        self.task_of: dict[int, int] = {}  # tile id -> the task that makes it
        self.results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # tile id -> (result, feather weights)
        self.pending: dict[int, int] = {}  # tile id -> cells under it still to composite
        self.arrived: set[int] = set()
        self.masks: dict[tuple, torch.Tensor] = {}
        self.on_tile = on_tile  # called with each tile id once its cells that can be are composited

    @property
    def canvas(self) -> torch.Tensor:
        return self.blank.ready()

    def add(self, tile_id: int, value: torch.Tensor) -> None:
        """Take one tile's output and composite every cell it completes."""
        self.results[tile_id] = (value, self._mask(self.tiles[tile_id]))
        self.pending[tile_id] = len(self.under[tile_id])
        self.arrived.add(tile_id)
        for i in self.under[tile_id]:
            if all(t in self.arrived for t in self.cells[i].tiles):
                self._composite(self.cells[i])
        if self.on_tile:
            self.on_tile(tile_id)

    def _mask(self, tile: Tile) -> torch.Tensor:
        return tile_mask(self.grid, tile, self.masks)

    def _composite(self, cell: Cell) -> None:
        blend_cell(cell, self.tiles, self.results, out=self.canvas[cell.box])
        for tile_id in cell.tiles:
            self.pending[tile_id] -= 1
            if not self.pending[tile_id]:  # the last cell under the tile: its result is dropped
                del self.results[tile_id], self.pending[tile_id]

    def read(self, box: Box) -> torch.Tensor:
        """A box of the canvas in its own dtype (float16 pixels travel to the next stage's tasks as they are)."""
        y, x, h, w = box
        return self.canvas[..., y : y + h, x : x + w].contiguous()

    def deps(self, box: Box) -> frozenset[int]:
        return frozenset(self.task_of[t.id] for t in self.grid.tiles if meets(t, box))

    def tiles_over(self, box: Box) -> set[int]:
        return {t.id for t in self.grid.tiles if meets(t, box)}


# feather weights of the tiles Patches are composited from, by device, shape and interior overlaps (tile_mask): a worker
# reads many boxes of the same few tile shapes; bounded, since a farm renders many sizes
_PATCH_MASKS: dict = {}
_PATCH_MASKS_MAX = 64


class Patch:
    """A box of a tiled stage's canvas, sent as the outputs of the tiles over it and composited where it is read:
    the canvas's cells clipped to the box, each blended from those tiles as a TiledCanvas blends it (blend_cell,
    elementwise: a clipped cell has the same bits as the whole one). On a cluster its `values` are object store
    handles until the reading actor fetches them (cluster.actor.run_on); the driver never holds the pixels."""

    __slots__ = ("grid", "box", "cells", "channels", "dtype", "ids", "tasks", "values")

    def __init__(self, grid: TileGrid, box: Box, cells: tuple[Cell, ...], channels: int, dtype: torch.dtype,
                 ids: tuple[int, ...], tasks: tuple[int, ...], values: tuple = ()):  # fmt: skip
        self.grid, self.box, self.cells, self.channels, self.dtype = grid, box, cells, channels, dtype
        self.ids, self.tasks, self.values = ids, tasks, values  # tile ids, the tasks that made them, their outputs

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the pixels it stands for."""
        return (1, self.channels, self.box[2], self.box[3])

    def with_values(self, values: tuple) -> Patch:
        return Patch(self.grid, self.box, self.cells, self.channels, self.dtype, self.ids, self.tasks, tuple(values))

    def resolved(self, done: dict) -> Patch:
        """The patch with its tiles' outputs (or handles to them) from the graph's finished tasks."""
        return self.with_values(done[t] for t in self.tasks)

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The box composited on `device` in the canvas's dtype (zeros where no tile lies, as a canvas's gaps). Only
        the part of each tile inside the box goes to the device (an 8K upscale tile is 13 MB, its part a few)."""
        y, x, h, w = self.box
        if len(_PATCH_MASKS) > _PATCH_MASKS_MAX:
            _PATCH_MASKS.clear()
        tiles, results = {}, {}
        for tile, value in zip((self.grid.tiles[i] for i in self.ids), self.values, strict=True):  # tiles by id
            part = clip(Cell(tile.y, tile.x, tile.h, tile.w, ()), self.box)
            rows, cols = part.within(tile)
            mask = tile_mask(self.grid, tile, _PATCH_MASKS, device)[rows, cols]
            tiles[tile.id] = replace(tile, y=part.y, x=part.x, h=part.h, w=part.w)  # the part, as a tile of its own
            results[tile.id] = (value[..., rows, cols].to(device), mask)
        out = torch.zeros(*self.shape, dtype=self.dtype, device=device)
        for c in self.cells:
            blend_cell(c, tiles, results, out[..., c.y - y : c.y - y + c.h, c.x - x : c.x - x + c.w])
        return out


def clip(cell: Cell, box: Box) -> Cell | None:
    """The part of a cell inside a (y, x, h, w) box, with the same tiles; None where they do not meet."""
    y, x, h, w = box
    y0, y1 = max(cell.y, y), min(cell.y + cell.h, y + h)
    x0, x1 = max(cell.x, x), min(cell.x + cell.w, x + w)
    return Cell(y0, x0, y1 - y0, x1 - x0, cell.tiles) if y0 < y1 and x0 < x1 else None


class HeldCanvas:
    """A tiled stage's output [1, C, H, W] in `dtype` that is never composited on the driver: each tile's output
    stays where it was made (Task.handle), and a read is a Patch of the box, which the task reading it composites
    on its own device from the outputs of the tiles over the box. Where a TiledCanvas would take each tile's pixels
    to the driver, composite them there and send the next stage's boxes out again (at 8K, 100 MB of upscaled pixels
    in and 190 MB of encode inputs out), the driver only passes handles on."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype):
        self.grid, self.channels, self.dtype = grid, channels, dtype
        self.cells = [c for c in grid_cells(grid) if c.tiles]
        self.task_of: dict[int, int] = {}  # tile id -> the task that makes it

    def read(self, box: Box) -> Patch:
        """The box as a Patch whose values are still to be taken from the finished tasks (Patch.resolved)."""
        cells = tuple(c for c in (clip(cell, box) for cell in self.cells) if c is not None)
        ids = tuple(sorted({t for cell in cells for t in cell.tiles}))
        return Patch(self.grid, box, cells, self.channels, self.dtype, ids, tuple(self.task_of[i] for i in ids))

    def deps(self, box: Box) -> frozenset[int]:
        return frozenset(self.task_of[t.id] for t in self.grid.tiles if meets(t, box))


# tiles per side of the square whose cells one blend task composites (AssembledCanvas): at 8K, 36 tasks instead of 121,
# which took 0.3-0.4 s off the render's tail on 16 simulated actors (BENCHMARKS.md "Eighth round")
BLEND_GROUP = 2


def group_end(grid: TileGrid, tile: Tile, group: int) -> int:
    """The id of the last tile (the bottom right one) of the `group` x `group` square of the grid that holds `tile`."""
    row = min(tile.row - tile.row % group + group, grid.rows) - 1
    return row * grid.cols + min(tile.col - tile.col % group + group, grid.cols) - 1


class AssembledCanvas:
    """A tiled stage's output [1, C, H, W] in `dtype` whose tiles are blended on the workers, not on the driver.

    Each tile's output stays where it was made (Task.handle). The canvas's cells are grouped into blocks by the
    square of `group` x `group` tiles that holds the last tile over them (the largest id): a block's blend task
    waits for the tiles over its cells, reads their outputs through their handles and returns the cells
    composited as a TiledCanvas would (blend_cells); the driver only copies them in. With ids in row order a block
    is a rectangle, `group` tile strides a side, under at most (group + 1)^2 tiles. The pixels a render keeps
    (float16, or their 8-bit levels) are the same as the driver's composite gives on the same device, and the
    driver holds no tile output and does no float32 arithmetic over the image."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype, group: int = BLEND_GROUP):
        self.grid, self.dtype = grid, dtype
        self.cells = [c for c in grid_cells(grid) if c.tiles]
        self.blank = Blank((1, channels, grid.canvas_h, grid.canvas_w), dtype)  # zeros where tiles leave gaps
        self.blocks: dict[int, tuple[Cell, ...]] = {}  # its group's last tile id -> a block's cells
        tiles = grid.tiles
        for cell in self.cells:
            last = group_end(grid, tiles[max(cell.tiles)], group)
            self.blocks[last] = (*self.blocks.get(last, ()), cell)
        self.task_of: dict[int, int] = {}  # tile id -> the task that makes it
        self.block_task: dict[int, int] = {}  # last tile id -> its block's blend task

    @property
    def canvas(self) -> torch.Tensor:
        return self.blank.ready()

    def add_blend(self, graph, stage: str, last: int, scale: int) -> None:
        """The blend task of the block whose last tile is `last`, once the tasks of its tiles are in the graph (a
        pipeline.graph.stream.Graph, which builds on this module)."""
        cells = self.blocks[last]
        tiles = sorted({t for cell in cells for t in cell.tiles})
        y0, x0 = min(c.y for c in cells), min(c.x for c in cells)
        y1, x1 = max(c.y + c.h for c in cells), max(c.x + c.w for c in cells)
        box = (last, y0 // scale, x0 // scale, -(-(y1 - y0) // scale), -(-(x1 - x0) // scale))
        self.block_task[last] = graph.add(
            f"{stage} blend",
            "blend_cells",
            partial(_blend_args, self.grid, cells, self.dtype, tuple(self.task_of[t] for t in tiles)),
            deps=frozenset(self.task_of[t] for t in tiles),
            boxes=(box,),
            units=0,  # the stage's bar counts its tiles
            on_result=partial(self.add_block, last),
        )

    def add_block(self, last: int, values: tuple) -> None:
        """Copy a block's composited cells into the canvas."""
        for cell, value in zip(self.blocks[last], values, strict=True):
            self.canvas[cell.box].copy_(value)

    def read(self, box: Box) -> torch.Tensor:
        y, x, h, w = box
        return self.canvas[..., y : y + h, x : x + w].contiguous()

    def deps(self, box: Box) -> frozenset[int]:
        return frozenset(self.block_task[k] for k, cells in self.blocks.items() if any(meets(c, box) for c in cells))


def _blend_args(grid: TileGrid, cells: tuple, dtype: torch.dtype, tasks: tuple[int, ...], done) -> tuple:
    return (grid, cells, dtype, *(done[t] for t in tasks))  # handles at the top level: Ray resolves them
