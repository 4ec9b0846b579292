"""The blended tiled sampler: one sampler over the whole canvas, tile predictions blended at every step.

Every step, every tile is denoised from the same canvas state; the model's predictions are averaged
with each tile's feather weights (smoothstep over interior overlaps, falling to ~0 at interior tile
edges where zero padding spoils a prediction, 1 at the canvas border), and one scheduler step runs
on the whole canvas. This is the fusion of MultiDiffusion (Bar-Tal et al. 2023, eq. 5) with Mixture
of Diffusers' tapered weights and one global sampler (Barbero Jimenez 2023): every pixel follows one
trajectory, so no overlap band is refined twice, and multistep samplers (DPM++ 2M) keep their exact
history because the scheduler, not a tile, owns it.

The driver holds the canvas and the scheduler; workers only predict. Batches are fixed by the plan
and predictions are summed in tile-id order, so the image is the same for any executor and any
number of workers. Each step is one task graph, so a stopped render resumes from its stored steps:
replaying their predictions through the scheduler rebuilds its state exactly.
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.chess import Tile, TileGrid
from pipeline.chess_pass import Batches, RefineSettings, crops
from pipeline.feather import coverage, feather_mask
from pipeline.flux import flow_sigmas, shift_mu
from pipeline.progress import stage_bar
from pipeline.schedule import held_steps, make_scheduler, refine_schedule, resolve_sampler, schedule_length
from pipeline.taskgraph import Executor, Task


def blend_weights(grid: TileGrid) -> dict[int, torch.Tensor]:
    """Each tile's share w_i / sum_j w_j of every pixel it covers (feather weights, DESIGN rule 3): the
    shares over any pixel sum to 1, and one tile covering the canvas has share 1 everywhere."""
    total = coverage(grid, grid.tiles)
    return {
        tile.id: feather_mask(grid, tile) / total[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
        for tile in grid.tiles
    }


def blend_predictions(
    grid: TileGrid, shares: dict[int, torch.Tensor], predictions: dict[int, torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """sum_i share_i * pred_i over the canvas (MultiDiffusion eq. 5), summed in tile-id order."""
    out = torch.zeros_like(like)
    for tile in grid.tiles:  # grid order = tile id order: a fixed summation order keeps results bit-stable
        box = out[..., tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
        box.addcmul_(predictions[tile.id].to(out.dtype), shares[tile.id])
    return out


def start_scheduler(family: str, sampler: str, scheduler_config: dict, grid: TileGrid, settings: RefineSettings):
    """A fresh scheduler set to the refine's steps, as each tile's own refine would set it (pipeline.sampler,
    pipeline.flux): Flux's shift is the tile's, so one tile covering the canvas is exactly today's refine."""
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


def _predict_args(x_in: torch.Tensor, batch: tuple[Tile, ...], t, cond, cfg: float, done) -> tuple:
    return (batch, crops(x_in, batch), t, cond, cfg)


def step_tasks(x_in: torch.Tensor, tile_batches: Batches, t: torch.Tensor, cond, cfg: float) -> list[Task]:
    """One step's graph: a prediction task per fixed batch of tiles, all reading the same model input."""
    return [
        Task(
            i,
            "predict",
            partial(_predict_args, x_in, batch, t, cond, cfg),
            group="blend",
            units=0,  # progress is counted by the stage's own bar, over all steps
            boxes=tuple((tile.id, tile.y, tile.x, tile.h, tile.w) for tile in batch),
        )
        for i, batch in enumerate(tile_batches)
    ]


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

    `mask` ([1, 1, H, W], the detailer's) holds masked pixels on their noised input for the first steps,
    a lower denoise there (pipeline.sampler.Hold, Differential Diffusion)."""
    s = settings
    scheduler, timesteps = start_scheduler(family, s.sampler, scheduler_config, grid, s)
    clean = canvas.float()
    noise = scaffold.float()
    latents = noised(family, scheduler, clean, noise, timesteps[0])
    held = held_steps(s.steps, s.denoise, s.masked_denoise) if mask is not None and s.masked_denoise else -1
    tiles = sum(len(b) for b in tile_batches)
    shares = blend_weights(grid)
    with stage_bar(ex, "refine blend", len(timesteps) * tiles) as bar:
        for i, t in enumerate(timesteps):
            if i <= held:
                latents = torch.lerp(latents, noised(family, scheduler, clean, noise, t), mask)
            x_in = scheduler.scale_model_input(latents, t) if family != "flux" else latents
            tasks = step_tasks(x_in, tile_batches, t, cond, s.cfg)
            done = ex.run("blend", tasks, on_result=lambda task, _: bar.tick(len(task.boxes)))
            bar.until((i + 1) * tiles)
            predictions: dict[int, torch.Tensor] = {}
            for i_batch in sorted(done):
                predictions |= done[i_batch]
            if set(predictions) != {tile.id for b in tile_batches for tile in b}:
                raise RuntimeError(f"blend step {i + 1} returned tiles {sorted(predictions)}")
            blended = blend_predictions(grid, shares, predictions, latents)
            latents = scheduler.step(blended, t, latents, return_dict=False)[0]
    return latents.float()
