"""VAE encode and decode between pixels in [0, 1] and model latents (scaled as the UNet expects).

diffusers' own tiling (`enable_tiling`) keeps an 8K image within memory; latents are the
distribution's mean (the mode), so encoding is deterministic.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def to_model_latents(z: torch.Tensor, config) -> torch.Tensor:
    """VAE latents -> model space: (z - shift) * scaling, or (z - mean) * scaling / std where the VAE has them."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        return (z - mean) * config["scaling_factor"] / std
    return (z - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


def from_model_latents(x: torch.Tensor, config) -> torch.Tensor:
    """Model space -> VAE latents: the inverse of to_model_latents."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std / config["scaling_factor"] + mean
    return x / config["scaling_factor"] + (config.get("shift_factor") or 0.0)


@contextmanager
def tile_size(vae, tile: int):
    """diffusers' tiles at `tile` px while inside, when smaller than the VAE's own (its sample size)."""
    sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
    if tile and tile < sizes[0]:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile * sizes[1] // sizes[0]
    try:
        yield
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = sizes


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, clock=None, tiled: bool = True, tile: int = 0) -> torch.Tensor:
    """[B, 3, H, W] pixels in [0, 1] -> [B, C, H/f, W/f] model latents (float32, CPU); diffusers' tiles are
    the VAE's sample size, or `tile` px when smaller (what the memory pre-flight chose)."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    param = next(vae.parameters())
    x = (pixels * 2 - 1).to(param.device, param.dtype)
    with tile_size(vae, tile), clock("vae") if clock else nullcontext():
        z = vae.encode(x).latent_dist.mode()
    return to_model_latents(z.float(), vae.config).cpu()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, clock=None, tiled: bool = True, tile: int = 0) -> torch.Tensor:
    """[B, C, h, w] model latents -> [B, 3, h*f, w*f] pixels in [0, 1] (float32, CPU); tiled as encode is."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    param = next(vae.parameters())
    z = from_model_latents(latents.float(), vae.config).to(param.device, param.dtype)
    with tile_size(vae, tile), clock("vae") if clock else nullcontext():
        x = vae.decode(z, return_dict=False)[0]
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()
