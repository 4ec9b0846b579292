"""The top-down render of seed 002, stage by stage: plan at the target size, sample at native size.

scaffold -> pooled native noise -> base -> decode -> model upscale -> encode (the canvas)
-> chess refine (even, odd) -> decode -> exact size.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from pipeline import vae
from pipeline.chess_pass import PassContext, RefineSettings, RunPass, chess_refine, sequential_runner
from pipeline.clock import Clock
from pipeline.models import DiffusionModel, Upscaler
from pipeline.plan import RenderPlan
from pipeline.resize import fit_exact, resize
from pipeline.sampler import generate
from pipeline.scaffold import make_scaffold, pool_noise
from pipeline.upscale import upscale_grid, upscale_image

UPSCALE_OVERLAP = 32  # px of input shared by neighbouring upscaler tiles


class Bar:
    """A progress sink: `update(n)` after n units of work."""

    def update(self, n: int = 1) -> None:  # pragma: no cover - a no-op by design
        pass


# progress(stage, total units, unit name) -> a context manager yielding a Bar
Progress = Callable[[str, int, str], AbstractContextManager[Bar]]


def no_progress(stage: str, total: int, unit: str) -> AbstractContextManager[Bar]:
    return nullcontext(Bar())


@dataclass
class Models:
    """The models a render uses, loaded once."""

    diffusion: DiffusionModel
    upscaler: Upscaler | None


@dataclass
class RenderResult:
    """The final image ([1, 3, H, W] in [0, 1], CPU) and the canvas it was decoded from."""

    image: torch.Tensor
    canvas: torch.Tensor


def upscale_to_target(
    plan: RenderPlan, upscaler: Upscaler | None, base: torch.Tensor, progress: Progress, clock: Clock
) -> torch.Tensor:
    """Base pixels -> target pixels: the upscale model (tiled), then an exact resize if its scale differs."""
    target = (plan.spec.height, plan.spec.width)
    if upscaler is None or plan.k == 1:
        return resize(base, *target)
    tiles = len(upscale_grid(base.shape[-2], base.shape[-1], plan.spec.upscale_tile, UPSCALE_OVERLAP).tiles)
    with progress("upscale", tiles, "tile") as bar:
        image = upscale_image(
            upscaler, base, plan.spec.upscale_tile, UPSCALE_OVERLAP, on_tile=bar.update, clock=clock.model
        )
    return resize(image, *target)


def render(
    plan: RenderPlan,
    models: Models,
    progress: Progress = no_progress,
    clock: Clock | None = None,
    run_pass: RunPass | None = None,
) -> RenderResult:
    """Run every stage of the plan in order; chess batches go to `run_pass` (default: this device)."""
    spec, clock = plan.spec, clock or Clock()
    diffusion = models.diffusion
    diffusion.denoiser.clock = clock.model

    with clock.stage("prompt"), progress("prompt", 1, "encode") as bar, clock.model("text encoders"):
        cond = diffusion.encode_prompt(spec.prompt, spec.negative, spec.cfg)
        bar.update()

    with clock.stage("scaffold"):
        scaffold = make_scaffold(spec.seed, plan.model.latent_channels, plan.latent_h, plan.latent_w)
        native_noise = pool_noise(scaffold, plan.k)

    with clock.stage("base"), progress("base", 1, "image") as bar:
        base_latents = generate(diffusion.denoiser, native_noise, cond, spec.cfg, spec.base_steps, spec.sampler)
        base = vae.decode(diffusion.vae, base_latents, clock=clock.model)
        bar.update()

    with clock.stage("upscale"):
        pixels = upscale_to_target(plan, models.upscaler, base, progress, clock)

    with clock.stage("encode"), progress("encode", 1, "canvas") as bar:
        canvas = vae.encode(diffusion.vae, pixels, clock=clock.model)
        bar.update()
    del pixels

    with clock.stage("chess"):
        settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler)
        ctx = PassContext(scaffold, cond, settings)
        run_pass = run_pass or sequential_runner(diffusion.denoiser, progress)
        canvas = chess_refine(canvas, plan.grid, plan.even_batches, plan.odd_batches, ctx, run_pass)

    with clock.stage("decode"), progress("decode", 1, "canvas") as bar:
        image = vae.decode(diffusion.vae, canvas, clock=clock.model)
        bar.update()
    return RenderResult(fit_exact(image, spec.height, spec.width), canvas)
