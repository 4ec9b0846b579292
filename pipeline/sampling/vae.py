"""VAE encode and decode between pixels in [0, 1] and model latents (scaled as the UNet expects).

Latents are the distribution's mean (the mode), so encoding is deterministic. A render encodes and
decodes large images in tiles over the workers (pipeline.geometry.tiling): each tile first records its
GroupNorm statistics (`*_stats`; for the decode layer by layer, `known` and `until`), then runs with
the image's pooled ones (`stats=`), so every tile normalises alike (pipeline.sampling.groupnorm). Attention
in the VAE's mid-block still sees one tile only.
diffusers' own tiling (`tiled=True`, per-tile GroupNorm) remains for whole-image calls.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from pipeline.geometry.resize import as_pixels
from pipeline.sampling.groupnorm import Core, StopForward, apply_stats, record_stats


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


def _tiling(vae, tiled: bool, stats) -> None:
    if tiled and stats is not None:
        raise ValueError("shared GroupNorm statistics apply to one tile: pass tiled=False")
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


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


def _normalising(vae, stats: dict[str, torch.Tensor] | None):
    return nullcontext() if stats is None else apply_stats(vae, stats)


def _pixels_in(vae, pixels) -> torch.Tensor:
    param = next(vae.parameters())
    # a box of an enlargement (Enlarge) is enlarged here, a box of a held canvas (Patch) composited, on the VAE's device
    pixels = as_pixels(pixels, param.device)
    return (pixels.float() * 2 - 1).to(param.device, param.dtype)  # float16 pixels (a graph's canvas) exactly


def _latents_in(vae, latents: torch.Tensor) -> torch.Tensor:
    param = next(vae.parameters())
    return from_model_latents(latents.float(), vae.config).to(param.device, param.dtype)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, clock=None, tiled: bool = True, stats=None, tile: int = 0) -> torch.Tensor:
    """[B, 3, H, W] pixels in [0, 1] -> [B, C, H/f, W/f] model latents (float32, CPU); with `stats`
    (pooled by pipeline.sampling.groupnorm.combine_stats) every GroupNorm normalises with those; diffusers' own
    tiles (tiled=True) are the VAE's sample size, or `tile` px when smaller (the memory pre-flight's)."""
    _tiling(vae, tiled, stats)
    x = _pixels_in(vae, pixels)
    with tile_size(vae, tile), clock("vae") if clock else nullcontext(), _normalising(vae, stats):
        z = vae.encode(x).latent_dist.mode()
    return to_model_latents(z.float(), vae.config).cpu()


@torch.no_grad()
def decode(
    vae, latents: torch.Tensor, clock=None, tiled: bool = True, stats=None, tile: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """[B, C, h, w] model latents -> [B, 3, h*f, w*f] pixels in [0, 1] (`dtype`, rounded on the device; CPU);
    `stats` as for encode."""
    _tiling(vae, tiled, stats)
    z = _latents_in(vae, latents)
    with tile_size(vae, tile), clock("vae") if clock else nullcontext(), _normalising(vae, stats):
        x = vae.decode(z, return_dict=False)[0]
    return ((x.float() + 1) / 2).clamp(0, 1).to(dtype).cpu()


def _cpu(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.cpu() for name, t in stats.items()}


@torch.no_grad()
def encode_stats(vae, pixels: torch.Tensor, core: Core, clock=None) -> dict[str, torch.Tensor]:
    """The encoder's GroupNorm moments over the tile's core (pipeline.sampling.groupnorm.record_stats), by layer."""
    _tiling(vae, False, None)
    x = _pixels_in(vae, pixels)
    with clock("vae") if clock else nullcontext(), record_stats(vae, core) as stats:
        vae.encode(x)
    return _cpu(stats)


@torch.no_grad()
def decode_stats(
    vae, latents: torch.Tensor, core: Core, clock=None, known=None, until: str | None = None
) -> dict[str, torch.Tensor]:
    """The decoder's GroupNorm moments over the tile's core (pipeline.sampling.groupnorm.record_stats), by layer:
    layers in `known` normalise with those pooled statistics; with `until`, only up to that layer."""
    _tiling(vae, False, None)
    z = _latents_in(vae, latents)
    with clock("vae") if clock else nullcontext(), record_stats(vae, core, known, until) as stats:
        try:
            vae.decode(z, return_dict=False)
        except StopForward:
            pass
    return _cpu(stats)
