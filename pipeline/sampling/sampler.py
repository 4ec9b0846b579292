"""The tile sampler: diffusers' SDXL UNet and schedulers, driven with our own noise.

diffusers' pipelines draw their own noise; a tile render needs each tile's noise to be its slice
of the one scaffold, and many tiles in one batch. The loop below is the one of diffusers'
StableDiffusionXL(Img2Img)Pipeline, with the noise supplied (tests check they agree to 1e-4).

`generate` and `refine` take any denoiser (this SDXL one, or pipeline.sampling.flux.FluxDenoiser): each
denoiser class runs its own family's loop on the same 4-D latents, so callers never branch on it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from pipeline.sampling.conditioning import Hold, PromptEmbeds, holds
from pipeline.sampling.schedule import make_scheduler, refine_schedule, resolve_sampler

if TYPE_CHECKING:
    from pipeline.sampling.flux import FluxDenoiser


def guided(negative: torch.Tensor, text: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance: eps_neg + cfg (eps_text - eps_neg) (Ho & Salimans 2022, eq. 6)."""
    return negative + cfg * (text - negative)


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
        return guided(*out.chunk(2), cfg)

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
