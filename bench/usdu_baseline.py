"""A per-tile baseline the way ComfyUI's Ultimate SD Upscale (USDU, ssitu v1.7.1) refines an image.

Tiles one at a time, in USDU's order (linear, or chess: white tiles first): each tile's rectangle
grown by `padding` is cropped in pixels, resized to the processing size round8(tile + padding)
(force_uniform_tiles), VAE-encoded alone, refined with the same seed's noise for every tile
(USDU issue #44), decoded alone, resized back, quantised to 8 bits (USDU pastes PIL images) and
pasted through a Gaussian-blurred tile mask; the next tile sees the updated image.

It calls the same model code as the farm (our Denoiser and `refine`, our VAE scaling), so a
speed ratio measures the tiling, not the model. It is a kind baseline: it pastes inside the
crop only, where USDU builds and blurs full-canvas RGBA images per tile on the CPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.geometry.resize import resize
from pipeline.sampling.chess_pass import RefineSettings
from pipeline.sampling.conditioning import PromptEmbeds
from pipeline.sampling.sampler import refine
from pipeline.sampling.vae import decode, to_model_latents


@dataclass(frozen=True)
class UsduTile:
    """One USDU tile: its rectangle (px) and the padded crop around it, both (y, x, h, w)."""

    index: int
    rect: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]
    white: bool  # chess colour: white tiles run first


def _axis_crop(start: int, size: int, padding: int, length: int) -> tuple[int, int]:
    """Grow [start, start+size) by padding and slide it inside [0, length) keeping its size (uniform tiles)."""
    want = min(size + 2 * padding, length)
    lo = max(0, min(start - padding, length - want))
    return lo, want


def usdu_tiles(height: int, width: int, tile: int, padding: int, mode: str = "linear") -> list[UsduTile]:
    """USDU's grid: ceil(H / tile) x ceil(W / tile) non-overlapping tiles, in its processing order."""
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    tiles = []
    for r in range(rows):
        for c in range(cols):
            y, x = r * tile, c * tile
            h, w = min(tile, height - y), min(tile, width - x)
            cy, ch = _axis_crop(y, h, padding, height)
            cx, cw = _axis_crop(x, w, padding, width)
            tiles.append(UsduTile(r * cols + c, (y, x, h, w), (cy, cx, ch, cw), (r + c) % 2 == 0))
    if mode == "chess":
        return [t for t in tiles if t.white] + [t for t in tiles if not t.white]
    if mode != "linear":
        raise ValueError(f"USDU mode {mode!r}: choose linear or chess")
    return tiles


def processing_size(tile: int, padding: int, factor: int = 8) -> int:
    """USDU's uniform processing size: the tile plus its padding, rounded up to the VAE factor."""
    return (tile + padding + factor - 1) // factor * factor


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a [H, W] mask with std `sigma` (PIL's GaussianBlur(radius) is this std)."""
    if sigma <= 0:
        return mask
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = F.pad(mask[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    return F.conv2d(x, taps.view(1, 1, -1, 1))[0, 0]


def tile_mask(tile: UsduTile, blur: float) -> torch.Tensor:
    """[ch, cw] paste weights over the crop: the tile rectangle, blurred (USDU's mask_blur)."""
    (y, x, h, w), (cy, cx, ch, cw) = tile.rect, tile.crop
    mask = torch.zeros(ch, cw)
    mask[y - cy : y - cy + h, x - cx : x - cx + w] = 1
    return gaussian_blur(mask, blur).clamp(0, 1)  # the normalised taps may sum to 1 + 1 ulp


@torch.no_grad()
def encode_untiled(vae, pixels: torch.Tensor, clock=None) -> torch.Tensor:
    """One VAE encode of a crop, as ComfyUI's VAEEncode (no tiling): pixels in [0, 1] -> model latents."""
    vae.disable_tiling()
    param = next(vae.parameters())
    with clock("vae") if clock else nullcontext():
        z = vae.encode((pixels * 2 - 1).to(param.device, param.dtype)).latent_dist.mode()
    return to_model_latents(z.float(), vae.config).cpu()


def same_seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """USDU's noise: one seed for every tile, so every tile of a size gets the same field."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def usdu_refine(
    model,
    pixels: torch.Tensor,
    cond: PromptEmbeds,
    settings: RefineSettings,
    seed: int,
    tile: int = 1024,
    padding: int = 32,
    mask_blur: float = 8,
    mode: str = "linear",
    clock=None,
) -> torch.Tensor:
    """Refine [1, 3, H, W] pixels in [0, 1] tile by tile as USDU does; returns the new image (CPU float32)."""
    vae, denoiser = model.vae, model.denoiser
    factor = model.info.vae_factor
    timed = clock.model if clock else None
    image = pixels.float().clone()
    s = settings
    for t in usdu_tiles(image.shape[-2], image.shape[-1], tile, padding, mode):
        cy, cx, ch, cw = t.crop
        crop = image[..., cy : cy + ch, cx : cx + cw]
        # a crop of tile + 2 padding is processed at round8(tile + padding), as force_uniform_tiles does
        ph, pw = processing_size(ch - padding, 0, factor), processing_size(cw - padding, 0, factor)
        latents = encode_untiled(vae, resize(crop, ph, pw), timed)
        noise = same_seed_noise(seed, tuple(latents.shape))
        latents = refine(denoiser, latents, noise, cond, s.cfg, s.steps, s.denoise, s.sampler).float().cpu()
        out = resize(decode(vae, latents, clock=timed, tiled=False), ch, cw)
        out = (out * 255).round() / 255  # USDU pastes 8-bit PIL images
        mask = tile_mask(t, mask_blur)
        image[..., cy : cy + ch, cx : cx + cw] = crop * (1 - mask) + out * mask
    return image


def usdu_boundaries(height: int, width: int, tile: int) -> tuple[list[int], list[int]]:
    """Interior tile edges (px) of USDU's grid, rows then columns: where its seams can show."""
    return list(range(tile, height, tile)), list(range(tile, width, tile))
