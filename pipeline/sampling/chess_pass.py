"""The chess refiner: even tiles, composited; then odd tiles, read from that canvas, feathered in.

An odd batch waits only for the even batches whose tiles overlap it (a dependency graph, not a
barrier between passes), and reads the canvas through a region composite of exactly those even
tiles, which is bit-identical to the finished even canvas there. So a tile's result depends only
on the spec and its tile id, never on which worker ran it or when.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipeline.geometry.chess import Tile, TileGrid
from pipeline.geometry.feather import composite_pass
from pipeline.graph.taskgraph import Executor, Task
from pipeline.sampling.conditioning import Hold, PromptEmbeds
from pipeline.sampling.sampler import Denoiser, refine
from pipeline.sampling.schedule import held_steps

Batches = tuple[tuple[Tile, ...], ...]


@dataclass(frozen=True)
class RefineSettings:
    """How each tile is refined."""

    cfg: float
    steps: int
    denoise: float
    sampler: str
    masked_denoise: float = 0.0  # the lower denoise inside the detailer's mask; 0 = none


def crops(canvas: torch.Tensor, tiles: tuple[Tile, ...]) -> torch.Tensor:
    """[B, C, h, w]: the canvas under each tile."""
    return torch.cat([canvas[..., t.y : t.y + t.h, t.x : t.x + t.w] for t in tiles])


def tile_noise(scaffold, tiles: tuple[Tile, ...]) -> torch.Tensor:
    """[B, C, h, w]: each tile's slice of the scaffold, copied 1:1 (works on a read-only shared array)."""
    return torch.from_numpy(np.concatenate([np.array(scaffold[..., t.y : t.y + t.h, t.x : t.x + t.w]) for t in tiles]))


def refine_tiles(
    denoiser: Denoiser,
    cond: PromptEmbeds,
    settings: RefineSettings,
    tiles: tuple[Tile, ...],
    latents: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor | None = None,
    pin: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Refine one batch of tiles; results keyed by tile id, float32 on the CPU.

    `mask` pixels refine at the lower denoise; `pin` pixels stay on their (noised) input at every step,
    so they are context the tile agrees with, never refined again."""
    s = settings
    hold: tuple[Hold, ...] = ()
    if mask is not None and s.masked_denoise and mask.any():
        hold += (Hold(mask, held_steps(s.steps, s.denoise, s.masked_denoise)),)
    if pin is not None and pin.any():
        hold += (Hold(pin, s.steps),)
    out = refine(denoiser, latents, noise, cond, s.cfg, s.steps, s.denoise, s.sampler, hold).float().cpu()
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"tiles {[t.id for t in tiles]} produced NaN/Inf latents on {denoiser.device}")
    return {t.id: out[i : i + 1] for i, t in enumerate(tiles)}


def _overlaps(a: Tile, b: Tile) -> bool:
    return a.y < b.y + b.h and b.y < a.y + a.h and a.x < b.x + b.w and b.x < a.x + a.w


def _merged(done: dict, ids) -> dict[int, torch.Tensor]:
    merged: dict[int, torch.Tensor] = {}
    for i in sorted(ids):
        merged |= done[i]
    return merged


def _boxes(batch: tuple[Tile, ...]) -> tuple:
    return tuple((t.id, t.y, t.x, t.h, t.w) for t in batch)


def pin_mask(grid: TileGrid, tile: Tile) -> torch.Tensor:
    """[1, 1, h, w]: 1 where an even tile covers the (odd) tile, i.e. its overlap bands and corners."""
    pin = torch.zeros(1, 1, tile.h, tile.w)
    for e in grid.even:
        y0, y1 = max(e.y, tile.y), min(e.y + e.h, tile.y + tile.h)
        x0, x1 = max(e.x, tile.x), min(e.x + e.w, tile.x + tile.w)
        if y0 < y1 and x0 < x1:
            pin[..., y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x] = 1.0
    return pin


def _mask_arg(mask, batch) -> tuple:
    return () if mask is None else (crops(mask, batch),)


def _even_args(canvas, batch, shared, mask, done):
    return (batch, crops(canvas, batch), *shared, *_mask_arg(mask, batch))


def _odd_args(canvas, grid, batch, deps, shared, mask, pinned, done):
    even = _merged(done, deps)
    boxes = [composite_pass(canvas, grid, even, "paste", region=(t.y, t.x, t.h, t.w)) for t in batch]
    if not pinned:
        return (batch, torch.cat(boxes), *shared, *_mask_arg(mask, batch))
    pin = torch.cat([pin_mask(grid, t) for t in batch])
    return (batch, torch.cat(boxes), *shared, None if mask is None else crops(mask, batch), pin)


def composite_cores(canvas: torch.Tensor, grid: TileGrid, results: dict[int, torch.Tensor]) -> torch.Tensor:
    """Paste each pinned (odd) tile's free pixels; its pinned overlaps keep the even result under them."""
    canvas = canvas.clone()
    for tile in grid.tiles:
        if tile.id in results:
            box = canvas[..., tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
            box.copy_(torch.where(pin_mask(grid, tile) > 0, box, results[tile.id].to(canvas.dtype)))
    return canvas


def chess_tasks(
    grid: TileGrid,
    even_batches: Batches,
    odd_batches: Batches,
    canvas: torch.Tensor,
    scaffold,
    cond,
    settings,
    mask: torch.Tensor | None = None,
    pinned: bool = False,
) -> list[Task]:
    """Even batches first (no dependencies), then odd batches, each waiting on the even batches under it.

    `mask` ([1, 1, H, W] latent, the detailer's) marks where tiles refine at `settings.masked_denoise`;
    `pinned` holds each odd tile's overlaps on the even result."""
    shared = (scaffold, cond, settings)
    tasks = [
        Task(
            i,
            "refine",
            partial(_even_args, canvas, batch, shared, mask),
            group="even",
            units=len(batch),
            boxes=_boxes(batch),
        )
        for i, batch in enumerate(even_batches)
    ]
    for j, batch in enumerate(odd_batches):
        deps = frozenset(i for i, even in enumerate(even_batches) if any(_overlaps(o, e) for o in batch for e in even))
        args = partial(_odd_args, canvas, grid, batch, deps, shared, mask, pinned)
        tasks.append(Task(len(even_batches) + j, "refine", args, deps, "odd", len(batch), _boxes(batch)))
    return tasks


def chess_refine(
    ex: Executor,
    grid: TileGrid,
    even_batches: Batches,
    odd_batches: Batches,
    canvas: torch.Tensor,
    scaffold,
    cond,
    settings: RefineSettings,
    mask: torch.Tensor | None = None,
    pinned: bool = False,
) -> torch.Tensor:
    """Run both passes through the executor and composite them: even pasted; odd tiles feathered in
    (seed 002), or, `pinned`, their overlaps held on the even result and only their free pixels pasted."""
    tasks = chess_tasks(grid, even_batches, odd_batches, canvas, scaffold, cond, settings, mask, pinned)
    done = ex.run("chess", tasks)
    n_even = len(even_batches)
    even = _merged(done, range(n_even))
    odd = _merged(done, range(n_even, n_even + len(odd_batches)))
    for name, results, batches_ in (("even", even, even_batches), ("odd", odd, odd_batches)):
        expected = {t.id for b in batches_ for t in b}
        if set(results) != expected:
            raise RuntimeError(f"{name} pass returned tiles {sorted(results)}, expected {sorted(expected)}")
    canvas = composite_pass(canvas, grid, even, "paste")
    return composite_cores(canvas, grid, odd) if pinned else composite_pass(canvas, grid, odd, "feather")
