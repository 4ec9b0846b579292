"""The blended tiled sampler: one sampler over the whole canvas, tile predictions blended at every step.

Every step, every tile is denoised from the same canvas state; the model's predictions are averaged
with each tile's feather weights (smoothstep over interior overlaps, falling to ~0 at interior tile
edges where zero padding spoils a prediction, 1 at the canvas border), and one scheduler step runs
on the whole canvas. This is the fusion of MultiDiffusion (Bar-Tal et al. 2023, eq. 5) with Mixture
of Diffusers' tapered weights and one global sampler (Barbero Jimenez 2023): every pixel follows one
trajectory, so no overlap band is refined twice, and multistep samplers (DPM++ 2M) keep their exact
history because the scheduler, not a tile, owns it.

The driver holds the canvas and the scheduler state; workers only predict. Batches are fixed by the
plan and predictions are summed in tile-id order, so the image is the same for any executor and any
number of workers. All steps form one task graph in which a batch's next step waits only for the
batches overlapping it, and the canvas is stepped band by band as their predictions arrive
(pipeline.geometry.cells): no barrier per step, and the driver's work overlaps the workers'. A stopped render
resumes from its stored predictions: replaying them through the cells rebuilds the state exactly.
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from pipeline.geometry.cells import grid_bands
from pipeline.geometry.chess import Tile, TileGrid
from pipeline.geometry.feather import coverage, feather_mask
from pipeline.graph.canvas import meets
from pipeline.graph.progress import stage_bar
from pipeline.graph.stream import Fixed, Graph, Source
from pipeline.graph.taskgraph import Executor
from pipeline.sampling.chess_pass import Batches, RefineSettings, crops
from pipeline.sampling.flux import flow_sigmas, shift_mu
from pipeline.sampling.schedule import held_steps, make_scheduler, refine_schedule, resolve_sampler, schedule_length


def blend_weights(grid: TileGrid) -> dict[int, torch.Tensor]:
    """Each tile's share w_i / sum_j w_j of every pixel it covers (feather weights, DESIGN rule 3): the
    shares over any pixel sum to 1, and one tile covering the canvas has share 1 everywhere."""
    total = coverage(grid, grid.tiles)
    return {
        tile.id: feather_mask(grid, tile) / total[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
        for tile in grid.tiles
    }


def start_scheduler(family: str, sampler: str, scheduler_config: dict, grid: TileGrid, settings: RefineSettings):
    """A fresh scheduler set to the refine's steps, as each tile's own refine would set it (pipeline.sampling.sampler,
    pipeline.sampling.flux): Flux's shift is the tile's, so one tile covering the canvas is exactly today's refine."""
    scheduler = make_scheduler(resolve_sampler(sampler, family), scheduler_config)
    if family == "flux":
        length = schedule_length(settings.steps, settings.denoise)
        mu = shift_mu(grid.tile_h, grid.tile_w, scheduler_config)
        schedule = refine_schedule(scheduler, settings.steps, settings.denoise, sigmas=flow_sigmas(length), mu=mu)
    else:
        schedule = refine_schedule(scheduler, settings.steps, settings.denoise)
    return scheduler, schedule.timesteps


def noised(family: str, scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latents at timestep t's noise level: add_noise (SDXL) or the flow interpolation (Flux)."""
    if family == "flux":
        return scheduler.scale_noise(clean, t.reshape(1), noise)
    return scheduler.add_noise(clean, noise, t.reshape(1))


class CanvasStepper:
    """The canvas and its sampler state, stepped band by band (pipeline.geometry.cells.grid_bands) as predictions
    arrive.

    Each band owns a copy of the scheduler (its multistep history is the band's own, as the whole-canvas
    scheduler's would be: the step is elementwise), its slice of the canvas, and the model input for its
    next step. A band starts (is noised to the first timestep) once its source latents are final, and takes
    step k as soon as every tile over it has predicted step k; a tile's input at step k is read from the
    bands under it. (Bands, not cells: at 8K a step is ~17 scheduler calls instead of ~290, which measured
    3x less driver time per step.) Predictions are dropped once every band under them has used them, so the driver holds
    about one step of them, not the whole render's."""

    def __init__(self, grid: TileGrid, family: str, scheduler, timesteps, source: Source, noise, mask, held: int):
        self.family, self.timesteps, self.held = family, timesteps, held
        self.source, self.noise, self.mask = source, noise, mask
        self.scheduler = scheduler
        self.shares = blend_weights(grid)
        self.tiles = {tile.id: tile for tile in grid.tiles}
        self.cells = grid_bands(grid)
        self.under = {tile.id: [] for tile in grid.tiles}  # tile id -> indices of the cells it covers
        for i, cell in enumerate(self.cells):
            for tile_id in cell.tiles:
                self.under[tile_id].append(i)
        self.clean = torch.zeros(1, noise.shape[1], grid.canvas_h, grid.canvas_w)
        self.latents = torch.zeros_like(self.clean)
        self.x_in = torch.zeros_like(self.clean)  # every cell's model input for its next step
        self.schedulers: list = [None] * len(self.cells)
        self.steps_done = [0] * len(self.cells)
        self.predictions: dict[tuple[int, int], torch.Tensor] = {}  # (step, tile id) -> prediction
        self.unused: dict[tuple[int, int], int] = {}  # (step, tile id) -> cells still to use it
        self.task_of: dict[tuple[int, int], int] = {}  # (step, batch) -> task id, for what reads the result
        self.batch_tiles: list[tuple[Tile, ...]] = []
        # a source still being made (pipeline.graph.canvas.TiledCanvas) starts each cell when its tiles are in
        self.waiting: dict[int, set[int]] = {}
        if hasattr(source, "tiles_over"):
            source.on_tile = self._source_tile
            self.waiting = {i: source.tiles_over(_cell_box(c)) for i, c in enumerate(self.cells)}
        else:
            for i in range(len(self.cells)):
                self._start(i)

    def _source_tile(self, tile_id: int) -> None:
        for i, tiles in list(self.waiting.items()):
            tiles.discard(tile_id)
            if not tiles:
                del self.waiting[i]
                self._start(i)

    def _start(self, i: int) -> None:
        """Cell i noised to the first timestep from its final source latents."""
        box, scheduler = self.cells[i].box, copy.deepcopy(self.scheduler)
        self.clean[box] = self.source.read(_cell_box(self.cells[i]))
        self.latents[box] = noised(self.family, scheduler, self.clean[box], self.noise[box].float(), self.timesteps[0])
        self.schedulers[i] = scheduler
        self._prepare(i)

    def _prepare(self, i: int) -> None:
        """Cell i's model input for its next step (with the detailer's hold, as pipeline.sampling.sampler.Hold)."""
        cell, scheduler, k = self.cells[i], self.schedulers[i], self.steps_done[i]
        if k == len(self.timesteps):
            return
        t, box = self.timesteps[k], cell.box
        latents = self.latents[box]
        if k <= self.held:
            target = noised(self.family, scheduler, self.clean[box], self.noise[box].float(), t)
            latents = torch.lerp(latents, target, self.mask[box])
            self.latents[box] = latents
        self.x_in[box] = latents if self.family == "flux" else scheduler.scale_model_input(latents, t)

    def inputs(self, batch: tuple[Tile, ...]) -> torch.Tensor:
        """The batch's model inputs [B, C, h, w] at the step its cells are at."""
        return crops(self.x_in, batch)

    def add(self, step: int, predictions: dict[int, torch.Tensor]) -> None:
        """Take one task's predictions at `step` and step every cell they complete."""
        for tile_id, prediction in predictions.items():
            self.predictions[step, tile_id] = prediction
            self.unused[step, tile_id] = len(self.under[tile_id])
        for tile_id in predictions:
            for i in self.under[tile_id]:
                self._advance(i)

    def _advance(self, i: int) -> None:
        cell = self.cells[i]
        while self.steps_done[i] < len(self.timesteps) and all(
            (self.steps_done[i], t) in self.predictions for t in cell.tiles
        ):
            k = self.steps_done[i]
            blended = torch.zeros(1, self.latents.shape[1], cell.h, cell.w, dtype=self.latents.dtype)
            for tile_id in cell.tiles:  # tile-id order: a fixed summation order keeps results bit-stable
                (rows, cols), (tile_rows, tile_cols) = cell.shared(self.tiles[tile_id])
                prediction = self.predictions[k, tile_id][..., tile_rows, tile_cols].to(blended.dtype)
                blended[..., rows, cols].addcmul_(prediction, self.shares[tile_id][tile_rows, tile_cols])
                self.unused[k, tile_id] -= 1
                if not self.unused[k, tile_id]:
                    del self.predictions[k, tile_id], self.unused[k, tile_id]
            box, t = cell.box, self.timesteps[k]
            self.latents[box] = self.schedulers[i].step(blended, t, self.latents[box], return_dict=False)[0]
            self.steps_done[i] = k + 1
            self._prepare(i)

    def neighbours(self) -> list[frozenset[int]]:
        """For each batch, the batches whose predictions at one step its input at the next is made from: those
        with a tile over a band under one of its tiles."""
        batch_of = {tile.id: b for b, batch in enumerate(self.batch_tiles) for tile in batch}
        return [
            frozenset(batch_of[t] for tile in batch for i in self.under[tile.id] for t in self.cells[i].tiles)
            for batch in self.batch_tiles
        ]

    def finished(self) -> bool:
        return all(k == len(self.timesteps) for k in self.steps_done)

    # the refined canvas as a source for the next stage (pipeline.graph.stream.Source)
    def read(self, box) -> torch.Tensor:
        y, x, h, w = box
        return self.latents[..., y : y + h, x : x + w].float().contiguous()

    def deps(self, box) -> frozenset[int]:
        """The last step's tasks with a tile over a band that meets `box`: once they are in, the box is final
        (a band takes its last step when every tile over it, anywhere along it, has predicted)."""
        last = len(self.timesteps) - 1
        tiles = {t for cell in self.cells if meets(cell, box) for t in cell.tiles}
        return frozenset(
            self.task_of[last, b] for b, batch in enumerate(self.batch_tiles) if any(t.id in tiles for t in batch)
        )


def _cell_box(cell) -> tuple[int, int, int, int]:
    return (cell.y, cell.x, cell.h, cell.w)


def _predict_args(stepper: CanvasStepper, batch: tuple[Tile, ...], t, cond, cfg: float, done) -> tuple:
    return (batch, stepper.inputs(batch), t, cond, cfg)


class _Take:
    """Receives one blend task's predictions: checks the tiles, steps the cells, ticks the bar."""

    def __init__(self, stepper: CanvasStepper, step: int, batch: tuple[Tile, ...], bar: list):
        self.stepper, self.step, self.batch, self.bar = stepper, step, batch, bar

    def __call__(self, predictions: dict[int, torch.Tensor]) -> None:
        if set(predictions) != {tile.id for tile in self.batch}:
            raise RuntimeError(f"blend step {self.step + 1} returned tiles {sorted(predictions)}")
        self.stepper.add(self.step, predictions)
        if self.bar:
            self.bar[0].tick(len(self.batch))


def add_blend(
    graph: Graph,
    grid: TileGrid,
    tile_batches: Batches,
    source: Source,
    scaffold: torch.Tensor,
    cond,
    settings: RefineSettings,
    family: str,
    scheduler_config: dict,
    mask: torch.Tensor | None = None,
    bar: list | None = None,
) -> CanvasStepper:
    """The blended refine's tasks, added to `graph`: every step's prediction tasks, a task per fixed batch and
    step, waiting only for the previous step's batches whose tiles overlap its own (pipeline.geometry.cells), and at
    step 0 for the source tasks under its tiles. No barrier between steps: a region steps on while another
    is still predicting. Returns the stepper, whose latents are the refined canvas once the graph has run.

    `mask` ([1, 1, H, W], the detailer's) holds masked pixels on their noised input for the first steps,
    a lower denoise there (pipeline.sampling.sampler.Hold, Differential Diffusion). `bar`, a list that will hold a
    StageBar while the graph runs, is ticked per tile-step."""
    s = settings
    scheduler, timesteps = start_scheduler(family, s.sampler, scheduler_config, grid, s)
    held = held_steps(s.steps, s.denoise, s.masked_denoise) if mask is not None and s.masked_denoise else -1
    stepper = CanvasStepper(grid, family, scheduler, timesteps, source, scaffold, mask, held)
    stepper.batch_tiles = list(tile_batches)
    neighbours = stepper.neighbours()
    bar = bar if bar is not None else []
    for k, t in enumerate(timesteps):
        for b, batch in enumerate(tile_batches):
            if k:
                deps = frozenset(stepper.task_of[k - 1, j] for j in neighbours[b])
            else:  # the source tiles under every band it reads: a band starts once all of them are in
                bands = {i for tile in batch for i in stepper.under[tile.id]}
                deps = frozenset().union(*(source.deps(_cell_box(stepper.cells[i])) for i in bands))
            stepper.task_of[k, b] = graph.add(
                "blend",
                "predict",
                partial(_predict_args, stepper, batch, t, cond, s.cfg),
                deps=deps,
                boxes=tuple((tile.id, tile.y, tile.x, tile.h, tile.w) for tile in batch),
                units=0,  # progress is counted by the stage's own bar, over all steps
                on_result=_Take(stepper, k, batch, bar),
            )
    return stepper


def blend_refine(
    ex: Executor,
    grid: TileGrid,
    tile_batches: Batches,
    canvas: torch.Tensor,
    scaffold: torch.Tensor,
    cond,
    settings: RefineSettings,
    family: str,
    scheduler_config: dict,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """img2img over the canvas [1, C, H, W] with blended tile predictions; `scaffold` is the canvas noise.
    All steps run as one task graph (add_blend)."""
    graph, bar = Graph(), []
    stepper = add_blend(
        graph, grid, tile_batches, Fixed(canvas), scaffold, cond, settings, family, scheduler_config, mask, bar
    )
    tiles = sum(len(b) for b in tile_batches)
    with stage_bar(ex, "refine blend", len(stepper.timesteps) * tiles) as stage:
        bar.append(stage)
        graph.run(ex)
    if not stepper.finished():
        raise RuntimeError("blend: the canvas did not take every step")
    return stepper.latents.float()
