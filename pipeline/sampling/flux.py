"""Flux tile sampling with our own noise: diffusers' FluxTransformer2DModel and flow-matching Euler.

The canvas, the tiles and the scaffold stay 4-D latents [B, 16, h, w], as for SDXL. Flux's
transformer reads a sequence of 2x2 latent patches with (0, row, col) position ids, so the
denoiser packs on the way in and unpacks on the way out, and in between runs the loop of
diffusers' FluxPipeline / FluxImg2ImgPipeline with the noise supplied (tests check they agree to
1e-4). Hence h and w must be even: sizes are multiples of 16 px.

`cfg` is Flux's guidance: the guidance-distilled models (FLUX.1-dev, Krea) take it as an input
embedding instead of running a second, unconditional pass, so a step costs one transformer call
and the negative prompt is not used. Models without a guidance embedding (schnell) ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from pipeline.sampling.conditioning import PromptEmbeds, holds
from pipeline.sampling.schedule import make_scheduler, refine_schedule, schedule_length


def flow_sigmas(length: int) -> np.ndarray:
    """The unshifted sigmas 1 .. 1/N that FluxPipeline.__call__ hands to the scheduler."""
    return np.linspace(1.0, 1 / length, length)


def shift_mu(latent_h: int, latent_w: int, scheduler_config: dict) -> float:
    """The schedule's shift for an image of (h/2)(w/2) tokens: FluxPipeline's calculate_shift."""
    return calculate_shift(
        (latent_h // 2) * (latent_w // 2),
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


# diffusers keeps the (un)packing and position ids as private static methods of FluxPipeline; every
# Flux pipeline calls these same three, so reusing them is the way to agree with it exactly.
def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w]: the inverse of pack (FluxPipeline._unpack_latents)."""
    return FluxPipeline._unpack_latents(tokens, latent_h, latent_w, vae_scale_factor=1)


def image_ids(latent_h: int, latent_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] rotary position ids (0, row, col) of the tokens (FluxPipeline._prepare_latent_image_ids)."""
    return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)


@dataclass(frozen=True)
class FluxConditioning:
    """What every transformer call of one sampler call shares, built once on the device."""

    embeds: torch.Tensor  # [B, T, D] T5 tokens
    pooled: torch.Tensor  # [B, P] CLIP pooled
    text_ids: torch.Tensor  # [T, 3] zeros
    img_ids: torch.Tensor  # [(h/2)(w/2), 3]
    guidance: torch.Tensor | None  # [B] or None without a guidance embedding


@dataclass
class FluxDenoiser:
    """A Flux transformer with what a sampling loop over 4-D latents needs around it."""

    transformer: torch.nn.Module
    scheduler_config: dict
    vae_factor: int
    clock: Callable[[str], object] | None = None  # clock("transformer") -> context manager timing a forward
    family: ClassVar[str] = "flux"

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def conditioning(self, cond: PromptEmbeds, latents: torch.Tensor, cfg: float) -> FluxConditioning:
        """Text tokens, pooled vector, position ids and guidance for a batch of 4-D latents."""
        batch, _, h, w = latents.shape
        cond = cond.to(self.device, self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([batch], cfg, device=self.device, dtype=torch.float32)
        return FluxConditioning(
            cond.embeds.expand(batch, -1, -1),
            cond.pooled.expand(batch, -1),
            torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype),
            image_ids(h, w, self.device, self.dtype),
            guidance,
        )

    def predict(self, tokens: torch.Tensor, t: torch.Tensor, c: FluxConditioning) -> torch.Tensor:
        """Velocity for packed latents at scheduler timestep t (the transformer takes t / 1000)."""
        timestep = t.expand(tokens.shape[0]).to(tokens.dtype) / 1000
        with self.clock("transformer") if self.clock else nullcontext():
            return self.transformer(
                hidden_states=tokens,
                timestep=timestep,
                guidance=c.guidance,
                pooled_projections=c.pooled,
                encoder_hidden_states=c.embeds,
                txt_ids=c.text_ids,
                img_ids=c.img_ids,
                return_dict=False,
            )[0]

    def predict_latents(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, cfg: float) -> torch.Tensor:
        """The velocity for a batch of 4-D latents [B, C, h, w], unpacked (the blended sampler's unit)."""
        _, _, h, w = x.shape
        x = x.to(self.device, self.dtype)
        return unpack(self.predict(pack(x), t.to(self.device), self.conditioning(cond, x, cfg)), h, w)

    def _run(self, scheduler, timesteps, latents: torch.Tensor, c: FluxConditioning, hold=()) -> torch.Tensor:
        """FluxPipeline's loop on packed latents: predict the velocity, Euler step (held pixels as in
        pipeline.sampling.conditioning.Hold, with packed mask, input and noise)."""
        for i, t in enumerate(timesteps):
            for h in hold:
                if i <= h.steps:
                    held = scheduler.scale_noise(h.original, t.reshape(1), h.noise)  # at this step's sigma
                    latents = torch.lerp(latents, held, h.mask)
            latents = scheduler.step(self.predict(latents, t, c), t, latents, return_dict=False)[0]
        return latents

    def generate(self, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str) -> torch.Tensor:
        """txt2img from unit noise: x_1 = noise (flow matching starts at pure noise), as FluxPipeline."""
        _, _, h, w = noise.shape
        scheduler = make_scheduler(sampler, self.scheduler_config)
        mu = shift_mu(h, w, self.scheduler_config)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=flow_sigmas(steps), mu=mu)
        scheduler.set_begin_index(0)
        latents = noise.to(self.device, self.dtype)
        c = self.conditioning(cond, latents, cfg)
        return unpack(self._run(scheduler, timesteps, pack(latents), c), h, w)

    def refine(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        cond: PromptEmbeds,
        cfg: float,
        steps: int,
        denoise: float,
        sampler: str,
        hold=None,
    ) -> torch.Tensor:
        """img2img: x = sigma * noise + (1 - sigma) * latents at the start sigma (scale_noise), then the
        last `steps` steps of a round(steps / denoise) schedule, as FluxImg2ImgPipeline."""
        _, _, h, w = latents.shape
        scheduler = make_scheduler(sampler, self.scheduler_config)
        length = schedule_length(steps, denoise)
        mu = shift_mu(h, w, self.scheduler_config)
        schedule = refine_schedule(scheduler, steps, denoise, self.device, sigmas=flow_sigmas(length), mu=mu)
        latents = latents.to(self.device, self.dtype)
        noise = noise.to(self.device, self.dtype)
        original = latents
        latents = scheduler.scale_noise(latents, schedule.timesteps[:1], noise)
        c = self.conditioning(cond, latents, cfg)
        packed = pack(original), pack(noise)
        hold = tuple(
            replace(
                h,
                mask=pack(h.mask.to(self.device, self.dtype).expand_as(original)),
                original=packed[0],
                noise=packed[1],
            )
            for h in holds(hold)
        )
        return unpack(self._run(scheduler, schedule.timesteps, pack(latents), c, hold), h, w)
