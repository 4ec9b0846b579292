"""The noise scaffold: one seeded N(0,1) field at the target latent size, shared by every stage.

DESIGN rule 1: noise keeps unit variance at every scale. Area-pooling k x k i.i.d. N(0,1)
values gives std 1/k, so pooled noise is multiplied by k. Noise is never bilinearly resized.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def generator_seed(seed: int) -> int:
    """The seed handed to torch's CPU generator: the seed itself below 2^32, else 32 bits of its SHA-256.

    torch's CPU generator is an mt19937 seeded from the low 32 bits only (at::mt19937), so seeds that
    differ above bit 32 would draw the same noise; hashing a larger seed makes every bit count.
    """
    if not 0 <= seed < 2**64:  # the generator would wrap -1 to 2^64 - 1 silently; a random seed is drawn before
        raise ValueError(f"scaffold seed {seed}: must be in [0, 2^64); draw a random one with spec.with_seed first")
    if seed < 2**32:
        return seed
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little")


def make_scaffold(seed: int, channels: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """Draw the [1, C, H, W] float32 scaffold on the CPU generator, so every device sees the same field."""
    generator = torch.Generator(device="cpu").manual_seed(generator_seed(seed))
    return torch.randn((1, channels, latent_h, latent_w), generator=generator, dtype=torch.float32)


def pool_noise(noise: torch.Tensor, k: int) -> torch.Tensor:
    """Area-pool by an integer k and multiply by k: the mean of k^2 unit normals has std 1/k."""
    if k < 1 or noise.shape[-2] % k or noise.shape[-1] % k:
        raise ValueError(f"pool factor {k} must divide the noise size {tuple(noise.shape[-2:])}")
    if k == 1:
        return noise.clone()
    return F.avg_pool2d(noise, kernel_size=k) * k


def noise_slice(scaffold: torch.Tensor, y: int, x: int, h: int, w: int) -> torch.Tensor:
    """The scaffold's noise under a latent box, copied 1:1 (overlapping tiles share identical noise)."""
    if y < 0 or x < 0 or y + h > scaffold.shape[-2] or x + w > scaffold.shape[-1]:
        raise ValueError(f"box y={y} x={x} h={h} w={w} leaves the scaffold {tuple(scaffold.shape[-2:])}")
    return scaffold[..., y : y + h, x : x + w].clone()
