"""The render as one task graph: every tiled stage's tasks wait only for the tiles they read.

    upscale tiles -> encode statistics -> encode tiles -> blended refine steps -> decode tiles

Each tiled stage writes into a canvas that is composited cell by cell (pipeline.geometry.cells) as its tiles
arrive: a cell is blended from the tiles over it, in tile-id order, once all of them are in, so the
canvas is the same whatever order the tiles finish in, and nothing is left to composite after the
last tile. A task of the next stage reads a box of that canvas and waits for exactly the tiles that
cover the box, so on a farm the first refine steps start while the last encode tiles run, and the
first decode tiles while the refine finishes. The driver keeps each canvas once, in a compact form:
pixels in float16 (they come from an image and go into the VAE or into an 8-bit PNG; the workers round
them on their device, so they travel in float16 too), latents in float32, and tile results only until
every cell under them is composited. The decode's canvas is blended on the workers instead
(AssembledCanvas): its tiles stay where they were made, and blocks of finished cells come back. The local
executor runs the same graph: the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from pipeline.geometry.cells import Cell, grid_cells
from pipeline.geometry.chess import Tile, TileGrid
from pipeline.geometry.feather import feather_mask
from pipeline.geometry.resize import PIXELS, Enlarge, source_span
from pipeline.graph.taskgraph import GRAPH_STAGE, Executor, Task
from pipeline.sampling.groupnorm import combine_stats

Box = tuple[int, int, int, int]  # (y, x, h, w)


class Source(Protocol):
    """What a stage reads: a box of a canvas, and the tasks that must be done before the box is final."""

    def read(self, box: Box) -> torch.Tensor: ...

    def deps(self, box: Box) -> frozenset[int]: ...


@dataclass
class Fixed:
    """A canvas finished before the graph runs (the base's latents, the detailer's pixels)."""

    canvas: torch.Tensor

    def read(self, box: Box) -> torch.Tensor:
        y, x, h, w = box
        return self.canvas[..., y : y + h, x : x + w].float().contiguous()

    def deps(self, box: Box) -> frozenset[int]:
        return frozenset()


def meets(piece, box: Box) -> bool:
    """Whether a tile or cell shares a pixel with a (y, x, h, w) box."""
    y, x, h, w = box
    return piece.y < y + h and y < piece.y + piece.h and piece.x < x + w and x < piece.x + piece.w


def _scaled(box: Box, scale: int) -> Box:
    return tuple(v * scale for v in box)  # type: ignore[return-value]


def tile_mask(grid: TileGrid, tile: Tile, cache: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tile's feather weights (pipeline.geometry.feather), made once per shape, set of interior overlaps and
    device, and kept in `cache` (read, never written)."""
    overlaps = (f(tile, axis) for f in (grid.overlap_before, grid.overlap_after) for axis in "yx")
    key = (str(device), tile.h, tile.w, *overlaps)
    if key not in cache:
        cache[key] = feather_mask(grid, tile).to(device)
    return cache[key]


def blend_cell(cell: Cell, tiles: dict[int, Tile], results, out: torch.Tensor | None = None) -> torch.Tensor:
    """A cell's composite sum_i w_i x_i / sum_i w_i over the tiles covering it, with their feather weights w
    (DESIGN rule 3), summed in tile-id order (bit-stable whatever order the tiles arrived in). `results` maps a
    tile id to (its output, its weights); float32 sums, written into `out` (rounded to its dtype) when given."""
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
    if out is None:
        return acc.div_(weight)
    if out.dtype == acc.dtype:
        return torch.div(acc, weight, out=out)  # straight into the canvas
    return out.copy_(acc.div_(weight))  # acc is this composite's own: divided in place, then rounded


def blend_cells(grid: TileGrid, cells: tuple[Cell, ...], values: tuple, dtype: torch.dtype, masks: dict) -> tuple:
    """The composites of `cells` in `dtype`, from the outputs of the tiles over them (`values`, in the order of
    those tiles' ids; on any device): what a TiledCanvas writes into the same cells, bit for bit on the same
    device. `masks` caches the feather weights (tile_mask)."""
    ids = sorted({t for cell in cells for t in cell.tiles})
    tiles = {t.id: t for t in grid.tiles if t.id in ids}
    results = {i: (v, tile_mask(grid, tiles[i], masks, v.device)) for i, v in zip(ids, values, strict=True)}
    return tuple(blend_cell(cell, tiles, results).to(dtype) for cell in cells)


class TiledCanvas:
    """A tiled stage's output [1, C, H, W] in `dtype`, composited cell by cell as its tiles arrive.

    `grid` is in output units. Each cell is sum_i w_i x_i / sum_i w_i over the tiles i covering it, with
    the feather weights w (DESIGN rule 3; the "paste" composite of pipeline.geometry.feather), in tile-id order."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype, on_tile=None):
        self.grid = grid
        self.tiles = {tile.id: tile for tile in grid.tiles}
        self.cells = grid_cells(grid)
        # every pixel is written once, by its cell's composite, before anything reads it: no zeroing (a 16K
        # float32 canvas is 3.2 GB, ~2.5 s of memset on the driver before the first tile), unless tiles leave gaps
        covered = sum(c.h * c.w for c in self.cells if c.tiles) == grid.canvas_h * grid.canvas_w
        make = torch.empty if covered else torch.zeros
        self.canvas = make(1, channels, grid.canvas_h, grid.canvas_w, dtype=dtype)
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


class AssembledCanvas:
    """A tiled stage's output [1, C, H, W] in `dtype` whose tiles are blended on the workers, not on the driver.

    Each tile's output stays where it was made (Task.handle). The canvas's cells are grouped into blocks by the
    last tile over them (the largest id): a block's blend task waits for the tiles over its cells, reads their
    outputs through their handles and returns the cells composited as a TiledCanvas would (blend_cells); the
    driver only copies them in. With ids in row order a block is a rectangle, as large as a tile's stride, under at
    most 4 tiles. The pixels a render keeps (float16) are the same as the driver's composite gives on the same
    device, and the driver holds no tile output and does no float32 arithmetic over the image."""

    def __init__(self, grid: TileGrid, channels: int, dtype: torch.dtype):
        self.grid, self.dtype = grid, dtype
        self.cells = [c for c in grid_cells(grid) if c.tiles]
        covered = sum(c.h * c.w for c in self.cells) == grid.canvas_h * grid.canvas_w
        make = torch.empty if covered else torch.zeros  # every covered pixel is written once before it is read
        self.canvas = make(1, channels, grid.canvas_h, grid.canvas_w, dtype=dtype)
        self.blocks: dict[int, tuple[Cell, ...]] = {}  # last tile id -> its block's cells
        for cell in self.cells:
            self.blocks[max(cell.tiles)] = (*self.blocks.get(max(cell.tiles), ()), cell)
        self.task_of: dict[int, int] = {}  # tile id -> the task that makes it
        self.block_task: dict[int, int] = {}  # last tile id -> its block's blend task

    def add_blend(self, graph: Graph, stage: str, last: int, scale: int) -> None:
        """The blend task of the block whose last tile is `last`, once the tasks of its tiles are in the graph."""
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


@dataclass
class Graph:
    """Tasks of several stages with one id order (stage by stage), and what to do with each result."""

    tasks: list[Task] = field(default_factory=list)
    handlers: dict[int, Any] = field(default_factory=dict)

    def add(
        self,
        stage: str,
        method: str,
        args,
        deps=frozenset(),
        boxes=(),
        units: int = 1,
        keep: bool = False,
        on_result=None,
        group: str = "",
        handle: bool = False,
    ) -> int:
        """Append a task; returns its id. `on_result(value)` receives its result as it is accepted (with `handle`,
        Task.handle: the tasks that read the result get a handle to it)."""
        task_id = len(self.tasks)
        self.tasks.append(
            Task(
                task_id,
                method,
                args,
                frozenset(deps),
                group or stage,
                units,
                boxes,
                keep=keep or handle,
                stage=stage,
                handle=handle,
            )  # fmt: skip
        )
        if on_result:
            self.handlers[task_id] = on_result
        return task_id

    def run(self, ex: Executor) -> dict[int, Any]:
        def accept(task: Task, value: Any) -> None:
            if task.id in self.handlers:
                self.handlers[task.id](value)

        return ex.run(GRAPH_STAGE, self.tasks, on_result=accept)


class Resized:
    """A source enlarged `factor` times (a power of two: pipeline.geometry.resize.doubling_factor) with the
    render's bicubic resize, block by block as boxes are read: each block is resized from its input span
    and a margin, so the canvas equals resize() of the finished source bit for bit, and a task reading a
    box waits only for the source tiles under its blocks (no stage reads the whole image)."""

    def __init__(self, source: Source, size: tuple[int, int], factor: int, channels: int, block: int = 256):
        self.source, self.factor, self.block = source, factor, block
        self.in_h, self.in_w = size
        self.shape = (1, channels, self.in_h * factor, self.in_w * factor)
        self._canvas: torch.Tensor | None = None  # made on the first read: workers that enlarge (Enlarged) need none
        self.ready: set[tuple[int, int]] = set()

    @property
    def canvas(self) -> torch.Tensor:
        """The enlarged image so far, in PIXELS as the upscale canvas: an image the VAE reads."""
        if self._canvas is None:
            self._canvas = torch.zeros(self.shape, dtype=PIXELS)
        return self._canvas

    def _blocks(self, box: Box) -> list[tuple[int, int]]:
        y, x, h, w = box
        b = self.block
        return [(by, bx) for by in range(y // b, -(-(y + h) // b)) for bx in range(x // b, -(-(x + w) // b))]

    def _block_box(self, block: tuple[int, int]) -> Box:
        b = self.block
        y, x = block[0] * b, block[1] * b
        return (y, x, min(b, self.shape[-2] - y), min(b, self.shape[-1] - x))

    def span(self, box: Box) -> Box:
        """The input box a box of the enlargement is made from (pipeline.geometry.resize.source_span)."""
        y, x, h, w = box
        (y0, y1), (x0, x1) = source_span(y, h, self.factor, self.in_h), source_span(x, w, self.factor, self.in_w)
        return (y0, x0, y1 - y0, x1 - x0)

    def request(self, box: Box) -> Enlarge:
        """A box of the enlargement as the input span it is made from, for whoever enlarges it."""
        y0, x0, _, _ = span = self.span(box)
        y, x, h, w = box
        return Enlarge(self.source.read(span), self.factor, y - y0 * self.factor, x - x0 * self.factor, h, w)

    def read(self, box: Box) -> torch.Tensor:
        for block in self._blocks(box):
            if block not in self.ready:
                y, x, h, w = out = self._block_box(block)
                self.canvas[..., y : y + h, x : x + w] = self.request(out).pixels()
                self.ready.add(block)
        y, x, h, w = box
        return self.canvas[..., y : y + h, x : x + w].contiguous()

    def deps(self, box: Box) -> frozenset[int]:
        return frozenset().union(*(self.source.deps(self.span(self._block_box(b))) for b in self._blocks(box)))


class Enlarged:
    """A Resized source read by workers that enlarge their own boxes (pipeline.geometry.resize.Enlarge): a read
    sends the box's input span, a quarter of the pixels at 2x, and the driver resizes nothing. The pixels a
    worker makes are the ones Resized.read would give, bit for bit."""

    def __init__(self, resized: Resized):
        self.resized = resized

    def read(self, box: Box) -> Enlarge:
        return self.resized.request(box)

    def deps(self, box: Box) -> frozenset[int]:
        return self.resized.source.deps(self.resized.span(box))


class SharedReads:
    """A source whose boxes are each read by `readers` tasks (a tile's statistics task, then the tile's own) and
    travel to the workers once: the first read puts the box in the executor's object store (Executor.share;
    the local executor passes it as it is), the others send its handle, and it is let go after the last."""

    def __init__(self, source: Source, share, readers: int = 2):
        self.source, self.share, self.readers = source, share, readers
        self.handles: dict[Box, list] = {}  # box -> [handle, reads so far]

    def read(self, box: Box):
        entry = self.handles.setdefault(box, [None, 0])
        if entry[1] == 0:
            entry[0] = self.share(self.source.read(box))
        entry[1] += 1
        if entry[1] == self.readers:
            del self.handles[box]
        return entry[0]

    def deps(self, box: Box) -> frozenset[int]:
        return self.source.deps(box)


def _read(source: Source, box: Box, extra, done) -> tuple:
    return (source.read(box), *(e(done) if callable(e) else e for e in extra))


def _box(tile: Tile, scale: int = 1) -> Box:
    return _scaled((tile.y, tile.x, tile.h, tile.w), scale)


def _boxes(tile: Tile) -> tuple:
    return ((tile.id, tile.y, tile.x, tile.h, tile.w),)


def add_tiled(
    graph: Graph,
    stage: str,
    method: str,
    source: Source,
    grid: TileGrid,
    scale_in: int,
    scale_out: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    extra=(),
    extra_deps=frozenset(),
    on_workers: bool = False,
) -> TiledCanvas | AssembledCanvas:
    """`method(crop, *extra)` on each tile of `grid` (in units of scale_in source px), its outputs composited
    into a TiledCanvas scale_out x the grid; an `extra` that is callable is given the finished results. With
    `on_workers` the outputs are blended on the workers instead, block by block (AssembledCanvas)."""
    scaled = _scaled_grid(grid, scale_out)
    out = AssembledCanvas(scaled, channels, dtype) if on_workers else TiledCanvas(scaled, channels, dtype)
    for tile in grid.tiles:
        box = _box(tile, scale_in)
        out.task_of[tile.id] = graph.add(
            stage,
            method,
            partial(_read, source, box, extra),
            deps=source.deps(box) | extra_deps,
            boxes=_boxes(tile),
            on_result=None if on_workers else partial(out.add, tile.id),
            handle=on_workers,
        )
        if on_workers and tile.id in out.blocks:  # right after its last tile: blocks are blended as they complete
            out.add_blend(graph, stage, tile.id, scale_out)
    return out


def add_tiled_shared_norm(
    graph: Graph,
    stage: str,
    stats_method: str,
    method: str,
    source: Source,
    grid: TileGrid,
    scale_in: int,
    scale_out: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    share=None,
) -> TiledCanvas:
    """add_tiled with GroupNorm statistics pooled over every tile's core
    (pipeline.geometry.tiling.run_tiled_shared_norm):
    the statistics tasks read the source like the tiles; each tile waits for all of them (the one barrier).
    With `share` (Executor.share) a tile's input travels once for both of its tasks (SharedReads)."""
    from pipeline.geometry.tiling import core_box

    if share is not None:
        source = SharedReads(source, share)

    stats = [
        graph.add(
            f"{stage} stats",
            stats_method,
            partial(_read, source, _box(tile, scale_in), (core_box(grid, tile),)),
            deps=source.deps(_box(tile, scale_in)),
            boxes=_boxes(tile),
            keep=True,  # the tiles read them
        )
        for tile in grid.tiles
    ]
    pooled = Pooled(tuple(stats))
    return add_tiled(
        graph, stage, method, source, grid, scale_in, scale_out, channels, dtype, (pooled,), frozenset(stats)
    )


class LayerStats:
    """Pooled GroupNorm statistics found layer by layer (pipeline.geometry.tiling.run_tiled_exact_norm): each layer's
    from its graph's task results, in task-id order, once; `before(name)` gives every earlier layer's."""

    def __init__(self, layers: list[str]):
        self.layers = layers
        self.tasks: dict[str, tuple[int, ...]] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    def _layer(self, name: str, done: dict[int, Any]) -> torch.Tensor:
        if name not in self.pooled:
            self.pooled[name] = combine_stats([done[i] for i in self.tasks[name]])[name]
        return self.pooled[name]

    def before(self, name: str | None):
        """A callable done -> {layer: pooled} for the layers before `name` (all of them for None)."""
        earlier = self.layers if name is None else self.layers[: self.layers.index(name)]
        return lambda done: {n: self._layer(n, done) for n in earlier}


def add_tiled_exact_norm(
    graph: Graph,
    stage: str,
    stats_method: str,
    method: str,
    source: Source,
    grid: TileGrid,
    scale_in: int,
    scale_out: int,
    channels: int,
    layers: list[str],
    dtype: torch.dtype = torch.float32,
    extra: tuple = (),
    on_workers: bool = False,
) -> TiledCanvas | AssembledCanvas:
    """add_tiled with every GroupNorm layer's statistics pooled over the image layer by layer, as an untiled
    forward has them (pipeline.geometry.tiling.run_tiled_exact_norm): a statistics task per tile and layer, reading
    the tile as soon as it is final and waiting for the previous layer's tasks; each tile waits for the last.
    `method(crop, pooled, *extra)`; `on_workers` as in add_tiled."""
    from pipeline.geometry.tiling import core_box

    stats, previous = LayerStats(layers), frozenset()
    for name in layers:
        ids = tuple(
            graph.add(
                f"{stage} stats",
                stats_method,
                partial(_read, source, _box(tile, scale_in), (core_box(grid, tile), stats.before(name), name)),
                deps=source.deps(_box(tile, scale_in)) | previous,
                boxes=_boxes(tile),
                keep=True,  # the next layer's tasks read them
            )
            for tile in grid.tiles
        )
        stats.tasks[name] = ids
        previous = frozenset(ids)
    extra = (stats.before(None), *extra)
    return add_tiled(
        graph, stage, method, source, grid, scale_in, scale_out, channels, dtype, extra, previous, on_workers
    )


class Pooled:
    """The pooled statistics of the given tasks' results, computed once (in task-id order: bit-stable)."""

    def __init__(self, task_ids: tuple[int, ...]):
        self.task_ids = task_ids
        self.value = None

    def __call__(self, done: dict[int, Any]):
        if self.value is None:
            self.value = combine_stats([done[i] for i in self.task_ids])
        return self.value


def _scaled_grid(grid: TileGrid, scale: int) -> TileGrid:
    from pipeline.geometry.tiling import scaled_grid

    return scaled_grid(grid, scale)
