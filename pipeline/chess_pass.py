"""The chess refiner: even tiles, composited; then odd tiles, read from that canvas, feathered in.

A tile's result depends only on (canvas after the previous pass, scaffold, settings, tile),
never on which worker ran it or which tiles shared its batch's neighbours in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.chess import Tile, TileGrid
from pipeline.feather import composite_pass
from pipeline.sampler import Denoiser, PromptEmbeds, refine
from pipeline.scaffold import noise_slice

PASSES = (("even", "paste"), ("odd", "feather"))


@dataclass(frozen=True)
class RefineSettings:
    """How each tile is refined."""

    cfg: float
    steps: int
    denoise: float
    sampler: str


def tile_inputs(
    batch: tuple[Tile, ...], canvas: torch.Tensor, scaffold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch's latent crops and their scaffold noise slices: two [B, C, h, w] tensors."""
    latents = torch.cat([canvas[..., t.y : t.y + t.h, t.x : t.x + t.w] for t in batch])
    noise = torch.cat([noise_slice(scaffold, t.y, t.x, t.h, t.w) for t in batch])
    return latents, noise


def refine_batch(
    denoiser: Denoiser,
    cond: PromptEmbeds,
    settings: RefineSettings,
    batch: tuple[Tile, ...],
    canvas: torch.Tensor,
    scaffold: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """Refine one batch of tiles; results keyed by tile id, float32 on the CPU."""
    latents, noise = tile_inputs(batch, canvas, scaffold)
    out = refine(denoiser, latents, noise, cond, settings.cfg, settings.steps, settings.denoise, settings.sampler)
    out = out.float().cpu()
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"tiles {[t.id for t in batch]} produced NaN/Inf latents")
    return {t.id: out[i : i + 1] for i, t in enumerate(batch)}


@dataclass
class PassContext:
    """What every tile of a render shares: the scaffold, the prompt embeddings, the settings."""

    scaffold: torch.Tensor
    cond: PromptEmbeds
    settings: RefineSettings


Batches = tuple[tuple[Tile, ...], ...]
# run_pass(pass name, its batches, the canvas to read, context) -> every tile's result, by id
RunPass = Callable[[str, Batches, torch.Tensor, PassContext], dict[int, torch.Tensor]]


def sequential_runner(denoiser: Denoiser, progress) -> RunPass:
    """Run a pass's batches one after another on one device (the local executor)."""

    def run_pass(name: str, pass_batches: Batches, canvas: torch.Tensor, ctx: PassContext):
        results: dict[int, torch.Tensor] = {}
        with progress(f"chess {name}", sum(len(b) for b in pass_batches), "tile") as bar:
            for batch in pass_batches:
                results |= refine_batch(denoiser, ctx.cond, ctx.settings, batch, canvas, ctx.scaffold)
                bar.update(len(batch))
        return results

    return run_pass


def chess_refine(
    canvas: torch.Tensor,
    grid: TileGrid,
    even_batches: Batches,
    odd_batches: Batches,
    ctx: PassContext,
    run_pass: RunPass,
) -> torch.Tensor:
    """Both passes; the odd pass reads the canvas as the even pass left it."""
    for (name, mode), pass_batches in zip(PASSES, (even_batches, odd_batches), strict=True):
        results = run_pass(name, pass_batches, canvas, ctx)
        expected = {t.id for b in pass_batches for t in b}
        if set(results) != expected:
            raise RuntimeError(f"{name} pass returned tiles {sorted(results)}, expected {sorted(expected)}")
        canvas = composite_pass(canvas, grid, results, mode)
    return canvas
