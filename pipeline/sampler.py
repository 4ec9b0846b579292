"""The tile sampler: diffusers' SDXL UNet and schedulers, driven with our own noise.

diffusers' pipelines draw their own noise; a tile render needs each tile's noise to be its slice
of the one scaffold, and many tiles in one batch. The loop below is the one of diffusers'
StableDiffusionXL(Img2Img)Pipeline, with the noise supplied (tests check they agree to 1e-4).

`generate` and `refine` take any denoiser (this SDXL one, or pipeline.flux.FluxDenoiser): each
denoiser class runs its own family's loop on the same 4-D latents, so callers never branch on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from pipeline.schedule import make_scheduler, refine_schedule, resolve_sampler

if TYPE_CHECKING:
    from pipeline.flux import FluxDenoiser


def repeat_tokens(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, D] repeated along the tokens to `length` (a multiple of T): cross-attention over k copies of
    every key gives exactly the same output, so this equals running it unrepeated (ComfyUI comfy/conds.py
    CONDCrossAttn.concat batches conds of different lengths this way)."""
    return embeds if embeds.shape[1] == length else embeds.repeat(1, length // embeds.shape[1], 1)


@dataclass
class PromptEmbeds:
    """Text conditioning for one render, computed once: token and pooled embeddings (SDXL: CLIPs; Flux: T5, CLIP)."""

    embeds: torch.Tensor  # [1, T, D]; SDXL: T = 77 x chunks
    pooled: torch.Tensor  # [1, P]
    negative_embeds: torch.Tensor | None  # None when CFG is off; else as long as embeds
    negative_pooled: torch.Tensor | None
    notes: tuple[str, ...] = ()  # what encoding found (token counts, warnings), for the render's log

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeds:
        """The same conditioning with `fn` applied to each tensor."""
        return PromptEmbeds(
            *(
                None if t is None else fn(t)
                for t in (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled)
            ),
            self.notes,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptEmbeds:
        """The same embeddings on the sampling device and dtype."""
        return self.map(lambda t: t.to(device, dtype))

    @staticmethod
    def stack(items: list[PromptEmbeds]) -> PromptEmbeds:
        """One batch of per-item conditionings (e.g. a different prompt per crop), in order. Token sequences
        of different lengths are repeated to a common multiple, which leaves each item's result unchanged
        (repeat_tokens)."""
        length = math.lcm(*(t.shape[1] for e in items for t in (e.embeds, e.negative_embeds) if t is not None))
        items = [e.map(lambda t: repeat_tokens(t, length) if t.ndim == 3 else t) for e in items]
        first = items[0]
        return PromptEmbeds(
            *(
                None if getattr(first, k) is None else torch.cat([getattr(e, k) for e in items])
                for k in ("embeds", "pooled", "negative_embeds", "negative_pooled")
            )
        )

    def for_batch(self, batch: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeds, pooled) for `batch` items; with CFG the negatives come first, as in diffusers."""
        embeds, pooled = self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1)
        if not cfg:
            return embeds, pooled
        neg = self.negative_embeds.expand(batch, -1, -1)
        neg_pooled = self.negative_pooled.expand(batch, -1)
        return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])


def sdxl_time_ids(height_px: int, width_px: int) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size (Podell et al. 2023, 2.2)."""
    return torch.tensor([height_px, width_px, 0, 0, height_px, width_px], dtype=torch.float32)


@dataclass
class Denoiser:
    """An SDXL UNet with what a sampling loop needs around it."""

    unet: torch.nn.Module
    scheduler_config: dict
    vae_factor: int
    clock: Callable[[str], object] | None = None  # clock("unet") -> context manager timing a forward
    family: ClassVar[str] = "sdxl"

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def conditioning(self, cond: PromptEmbeds, latents: torch.Tensor, cfg: float) -> tuple[torch.Tensor, ...]:
        """(token embeds, pooled, time ids) for a batch of latents, on the device: built once per sampler call."""
        batch, _, h, w = latents.shape
        embeds, pooled = cond.to(self.device, self.dtype).for_batch(batch, cfg > 1.0)
        time_ids = sdxl_time_ids(h * self.vae_factor, w * self.vae_factor)
        return embeds, pooled, time_ids.to(self.device, self.dtype).repeat(embeds.shape[0], 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: tuple, cfg: float) -> torch.Tensor:
        """Noise prediction for a batch x at timestep t, with classifier-free guidance when cfg > 1."""
        use_cfg = cfg > 1.0
        embeds, pooled, time_ids = conditioning
        model_in = torch.cat([x, x]) if use_cfg else x
        with self.clock("unet") if self.clock else nullcontext():
            out = self.unet(
                model_in,
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )[0]
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg * (text - uncond)

    def predict_latents(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, cfg: float) -> torch.Tensor:
        """One prediction for a batch of scaled model inputs [B, C, h, w] (the blended sampler's unit)."""
        x = x.to(self.device, self.dtype)
        return self.predict(x, t.to(self.device), self.conditioning(cond, x, cfg), cfg)

    def _run(
        self, scheduler, timesteps, latents, cond: PromptEmbeds, cfg: float, hold: tuple[Hold, ...] = ()
    ) -> torch.Tensor:
        """The sampling loop of diffusers' SDXL pipelines: scale input, predict, step."""
        conditioning = self.conditioning(cond, latents, cfg)  # once per call, not per step
        for i, t in enumerate(timesteps):
            for h in holds(hold):
                if i <= h.steps:
                    # add_noise reads the scheduler's current step index: the noised input at this step's sigma
                    latents = torch.lerp(latents, scheduler.add_noise(h.original, h.noise, t.reshape(1)), h.mask)
            x = scheduler.scale_model_input(latents, t)
            noise_pred = self.predict(x, t, conditioning, cfg)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    def generate(self, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str) -> torch.Tensor:
        """txt2img from unit noise: x_T = noise * init_noise_sigma, as StableDiffusionXLPipeline."""
        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        return self._run(scheduler, scheduler.timesteps, latents, cond, cfg)

    def refine(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        cond: PromptEmbeds,
        cfg: float,
        steps: int,
        denoise: float,
        sampler: str,
        hold: Hold | tuple[Hold, ...] | None = None,
    ) -> torch.Tensor:
        """img2img: add_noise at the start timestep, then the last `steps` steps (StableDiffusionXLImg2ImgPipeline).

        With `hold`, masked pixels start `hold.steps` steps later (see Hold)."""
        scheduler = make_scheduler(sampler, self.scheduler_config)
        timesteps = refine_schedule(scheduler, steps, denoise, device=self.device).timesteps
        original = latents.to(self.device, self.dtype)
        noise = noise.to(self.device, self.dtype)
        latents = scheduler.add_noise(original, noise, timesteps[:1])
        hold = tuple(Hold(h.mask.to(self.device, self.dtype), h.steps, original, noise) for h in holds(hold))
        return self._run(scheduler, timesteps, latents, cond, cfg, hold)


@dataclass(frozen=True)
class Hold:
    """Masked pixels stay on the noised input for the first `steps` steps, so they start later: a lower
    denoise there (per-pixel strength as in Differential Diffusion, Levin & Fried 2023)."""

    mask: torch.Tensor  # [B, 1, h, w] in [0, 1]; 1 = held the full `steps`
    steps: int
    original: torch.Tensor | None = None  # the clean latents (set by refine)
    noise: torch.Tensor | None = None


def holds(hold: Hold | tuple[Hold, ...] | None) -> tuple[Hold, ...]:
    """Every hold of a refine (the detailer's lower denoise, the chess pass's pinned overlaps), in order."""
    if hold is None:
        return ()
    return hold if isinstance(hold, tuple) else (hold,)


@torch.no_grad()
def generate(
    denoiser: Denoiser | FluxDenoiser, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str
) -> torch.Tensor:
    """txt2img from given unit noise [B, C, h, w] with the denoiser's own family loop."""
    return denoiser.generate(noise, cond, cfg, steps, resolve_sampler(sampler, denoiser.family))


@torch.no_grad()
def refine(
    denoiser: Denoiser | FluxDenoiser,
    latents: torch.Tensor,
    noise: torch.Tensor,
    cond: PromptEmbeds,
    cfg: float,
    steps: int,
    denoise: float,
    sampler: str,
    hold: Hold | tuple[Hold, ...] | None = None,
) -> torch.Tensor:
    """img2img on a batch of latent tiles with their own noise: run `steps` steps from sigmas[N - steps].

    With `hold`, masked pixels start `hold.steps` steps later (see Hold)."""
    sampler = resolve_sampler(sampler, denoiser.family)
    return denoiser.refine(latents, noise, cond, cfg, steps, denoise, sampler, hold)
