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
(AssembledCanvas): its tiles stay where they were made, and blocks of finished cells come back (in 8 bits
where they are the final image). The upscale's canvas is not made at all where only the encode reads it
(HeldCanvas): its tiles stay where they were made, and each encode task composites the box it reads from them.
The local executor runs the same graph: the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from pipeline.geometry.chess import Tile, TileGrid
from pipeline.geometry.resize import PIXELS, Enlarge, source_span
from pipeline.graph.canvas import AssembledCanvas, Box, HeldCanvas, Patch, TiledCanvas
from pipeline.graph.taskgraph import GRAPH_STAGE, Executor, Task
from pipeline.graph.tree import leaves, walk
from pipeline.sampling.groupnorm import combine_stats


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


def _scaled(box: Box, scale: int) -> Box:
    return tuple(v * scale for v in box)  # type: ignore[return-value]


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
    the local executor passes it as it is), the others send its handle, and it is let go after the last. A read
    that is a Patch (of a HeldCanvas) is only handles already, and goes as it is."""

    def __init__(self, source: Source, share, readers: int = 2):
        self.source, self.share, self.readers = source, share, readers
        self.handles: dict[Box, list] = {}  # box -> [handle, reads so far]

    def read(self, box: Box):
        entry = self.handles.get(box)
        if entry is None:
            value = self.source.read(box)
            if any(isinstance(v, Patch) for v in leaves(value)):  # resolved from the finished tasks as it is sent
                return value
            entry = self.handles[box] = [self.share(value), 0]
        entry[1] += 1
        if entry[1] == self.readers:
            del self.handles[box]
        return entry[0]

    def deps(self, box: Box) -> frozenset[int]:
        return self.source.deps(box)


def _resolve(value, done):
    """A read with the outputs its Patches stand for (handles on a cluster) taken from the finished tasks."""
    return walk(value, lambda v: v.resolved(done) if isinstance(v, Patch) else v)


def _read(source: Source, box: Box, extra, done) -> tuple:
    return (_resolve(source.read(box), done), *(e(done) if callable(e) else e for e in extra))


def _read_each(method: str, source: Source, reads: tuple, done) -> tuple:
    calls = [_read(source, box, extra, done) for box, extra in reads]
    return (method, tuple(len(c) for c in calls), *(arg for c in calls for arg in c))


def _call(method: str, source: Source, reads: tuple, each: bool) -> tuple[str, Any]:
    """A task's (method, arguments) for its tiles' (box, extra) reads: `method` on one tile, or with `each` the
    worker's `each` over them (TileWorker.each: one task for several tiles, each computed as its own task)."""
    if each:
        return "each", partial(_read_each, method, source, reads)
    ((box, extra),) = reads
    return method, partial(_read, source, box, extra)


def _chunks(tiles: tuple[Tile, ...], size: int) -> list[tuple[Tile, ...]]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def _add_chunk(graph: Graph, stage: str, method: str, source: Source, chunk, scale_in: int, extras, each: bool,
               deps=frozenset(), **kw) -> int:  # fmt: skip
    """One task for the tiles of `chunk` (`each`: through the worker's `each`), each tile's box read from `source`
    with its own extra arguments (`extras`, per tile), waiting for what the boxes read and `deps`; returns its id."""
    boxes = [_box(tile, scale_in) for tile in chunk]
    return graph.add(
        stage,
        *_call(method, source, tuple(zip(boxes, extras, strict=True)), each),
        deps=frozenset().union(*(source.deps(box) for box in boxes)) | deps,
        boxes=tuple(b for tile in chunk for b in _boxes(tile)),
        units=len(chunk),
        **kw,
    )


def _add_each(canvas: TiledCanvas, tile_ids: tuple[int, ...], values: tuple) -> None:
    for tile_id, value in zip(tile_ids, values, strict=True):
        canvas.add(tile_id, value)


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
    tiles_per_task: int = 1,
    held: bool = False,
) -> TiledCanvas | AssembledCanvas | HeldCanvas:
    """`method(crop, *extra)` on each tile of `grid` (in units of scale_in source px), its outputs composited
    into a TiledCanvas scale_out x the grid; an `extra` that is callable is given the finished results. With
    `on_workers` the outputs are blended on the workers instead, block by block (AssembledCanvas); with `held`
    they are never blended into a canvas: each task that reads a box composites it (HeldCanvas). With
    `tiles_per_task` > 1 (neither) a task runs that many tiles, in id order, through the worker's `each`."""
    each = tiles_per_task > 1
    if each and (on_workers or held):  # their readers take each tile's output by its own handle
        raise ValueError("tiles blended on the workers go one to a task")
    scaled = _scaled_grid(grid, scale_out)
    if held:
        out = HeldCanvas(scaled, channels, dtype)
    else:
        out = AssembledCanvas(scaled, channels, dtype) if on_workers else TiledCanvas(scaled, channels, dtype)
    handle = on_workers or held  # the outputs stay where they are made; the tasks that read them get handles
    for chunk in _chunks(grid.tiles, tiles_per_task):
        ids = tuple(tile.id for tile in chunk)
        task = _add_chunk(
            graph, stage, method, source, chunk, scale_in, [extra] * len(chunk), each, deps=extra_deps,
            on_result=partial(_add_each, out, ids) if each else None if handle else partial(out.add, ids[0]),
            handle=handle,
        )  # fmt: skip
        out.task_of.update(dict.fromkeys(ids, task))
        # right after its group's last tile: blocks blend as they complete
        if isinstance(out, AssembledCanvas) and ids[0] in out.blocks:
            out.add_blend(graph, stage, ids[0], scale_out)
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
    tiles_per_task: int = 1,
) -> TiledCanvas:
    """add_tiled with GroupNorm statistics pooled over every tile's core
    (pipeline.geometry.tiling.run_tiled_shared_norm):
    the statistics tasks read the source like the tiles; each tile waits for all of them (the one barrier).
    With `share` (Executor.share) a tile's input travels once for both of its tasks (SharedReads). With
    `tiles_per_task` > 1 both kinds of task take that many tiles (add_tiled)."""
    from pipeline.geometry.tiling import core_box

    if share is not None:
        source = SharedReads(source, share)

    each = tiles_per_task > 1
    stats = [
        _add_chunk(
            graph,
            f"{stage} stats",
            stats_method,
            source,
            chunk,
            scale_in,
            [(core_box(grid, t),) for t in chunk],
            each,
            keep=True,  # the tiles read them
        )  # fmt: skip
        for chunk in _chunks(grid.tiles, tiles_per_task)
    ]
    pooled = Pooled(tuple(stats), each)
    return add_tiled(
        graph, stage, method, source, grid, scale_in, scale_out, channels, dtype, (pooled,), frozenset(stats),
        tiles_per_task=tiles_per_task,
    )  # fmt: skip


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
    """The pooled statistics of the given tasks' results, computed once (in tile-id order: bit-stable); with
    `each` every task returned a tuple of its tiles' statistics."""

    def __init__(self, task_ids: tuple[int, ...], each: bool = False):
        self.task_ids, self.each = task_ids, each
        self.value = None

    def __call__(self, done: dict[int, Any]):
        if self.value is None:
            tiles = [s for i in self.task_ids for s in (done[i] if self.each else (done[i],))]
            self.value = combine_stats(tiles)
        return self.value


def _scaled_grid(grid: TileGrid, scale: int) -> TileGrid:
    from pipeline.geometry.tiling import scaled_grid

    return scaled_grid(grid, scale)
