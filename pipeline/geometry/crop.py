"""Detail crops: where a detection is refined, its noise, and the mask it is composited through.

Fixes three faults of the reference detailer (research: Luna Semantic Detailer): crops at a canvas
edge were truncated and then stretched to a square; noise for small crops was bilinearly
upsampled (std ~0.3 at 512 px); full-frame masks were resized without being cropped to the box.
Here a crop is a square of side native*k or native/k latent pixels (an integer factor, DESIGN
rule 1), shifted inside the canvas, never stretched; its noise keeps unit variance both ways;
its mask is sampled at the crop's own pixel centres.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.detail.detection import Detection
from pipeline.geometry.feather import smoothstep_ramp
from pipeline.geometry.scaffold import pool_noise

MAX_ENLARGE = 4  # a crop is refined at most 4x enlarged (a 256 px region at 1024 px native)
MIN_SIDE = 8  # latent px: below this a crop carries too little context to refine


@dataclass(frozen=True)
class Crop:
    """A square box on the latent canvas, refined at the model's native size."""

    id: int
    y: int
    x: int
    side: int  # latent px
    factor: int  # side = native * factor, or native / factor when enlarged
    enlarged: bool  # True when the crop is smaller than native and is enlarged to it


def crop_sides(native: int, limit: int) -> list[tuple[int, int, bool]]:
    """Every allowed (side, factor, enlarged) up to `limit`, smallest first: native/k, native, native*k."""
    small = [(native // k, k, True) for k in range(MAX_ENLARGE, 1, -1) if native % k == 0 and native // k >= MIN_SIDE]
    large = [(native * k, k, False) for k in range(1, limit // native + 1)]
    return [s for s in small + large if s[0] <= limit]


def place(center: float, side: int, extent: int) -> int:
    """Origin of a box of `side` centred on `center`, shifted (not truncated) to lie inside [0, extent)."""
    return min(max(round(center - side / 2), 0), extent - side)


def crop_for(detection: Detection, crop_id: int, latent_h: int, latent_w: int, native: int, padding: float) -> Crop:
    """The crop refining a detection: the box's longer side plus `padding` of it on each side, on the next
    allowed size up (the largest that fits the canvas when none is big enough), centred and shifted inside."""
    x0, y0, x1, y1 = detection.box
    wanted = max((x1 - x0) * latent_w, (y1 - y0) * latent_h) * (1 + 2 * padding)
    sides = crop_sides(native, min(latent_h, latent_w))
    if not sides:
        raise ValueError(f"no crop side fits a {latent_w}x{latent_h} latent canvas at native {native}")
    side, factor, enlarged = next((s for s in sides if s[0] >= wanted), sides[-1])
    cx, cy = (x0 + x1) / 2 * latent_w, (y0 + y1) / 2 * latent_h
    return Crop(crop_id, place(cy, side, latent_h), place(cx, side, latent_w), side, factor, enlarged)


def crop_seed(seed: int, crop: Crop) -> int:
    """A seed for a crop's extra noise that depends only on the render seed and the crop's box."""
    digest = hashlib.sha256(f"{seed}:{crop.y}:{crop.x}:{crop.side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def upsample_noise(parent: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """DESIGN rule 1's consistent upsampling: child = parent/k + (z - block mean of z), z ~ N(0, 1).

    Each child value has variance 1/k^2 + (1 - 1/k^2) = 1, blocks are uncorrelated with each other,
    and pooling the child by k (times k) gives back the parent exactly.
    """
    *lead, h, w = parent.shape
    z = torch.randn((*lead, h * k, w * k), generator=generator, dtype=parent.dtype)
    block_mean = F.avg_pool2d(z.reshape(-1, 1, h * k, w * k), k).reshape(*lead, h, w)
    up = lambda t: t.repeat_interleave(k, -2).repeat_interleave(k, -1)  # noqa: E731
    return up(parent / k) + z - up(block_mean)


def crop_noise(scaffold: torch.Tensor, crop: Crop, seed: int) -> torch.Tensor:
    """[1, C, native, native] unit noise for a crop: its scaffold slice pooled x k, or upsampled consistently."""
    piece = torch.as_tensor(scaffold[..., crop.y : crop.y + crop.side, crop.x : crop.x + crop.side]).clone()
    if crop.enlarged:
        return upsample_noise(piece, crop.factor, torch.Generator().manual_seed(crop_seed(seed, crop)))
    return pool_noise(piece, crop.factor)


def crop_mask(mask: torch.Tensor, crop: Crop, f: int, canvas_px: tuple[int, int]) -> torch.Tensor:
    """[1, 1, S, S] the detection mask (over the whole detection image) sampled at the crop's pixel centres.

    The detection image and the canvas span the same picture, so a canvas pixel centre p maps to
    the normalised coordinate 2p/size - 1 on either (grid_sample, align_corners=False).
    """
    height, width = canvas_px
    side = crop.side * f
    ys = (crop.y * f + torch.arange(side, dtype=torch.float32) + 0.5) * 2 / height - 1
    xs = (crop.x * f + torch.arange(side, dtype=torch.float32) + 0.5) * 2 / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    return F.grid_sample(mask.float()[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 square around each pixel (edges replicated), from running sums: O(1) per
    pixel whatever the radius (a pooling window of 2r+1 costs (2r+1)^2, ~10^11 operations on an 8K crop).
    Sums run in float64 so that a window of zeros gives exactly 0 after the difference."""
    k = 2 * radius + 1
    out = x.double()
    for dim in (-1, -2):
        pad = [0, 0, 0, 0]
        pad[0 if dim == -1 else 2] = pad[1 if dim == -1 else 3] = radius
        padded = F.pad(out, pad, mode="replicate")
        sums = torch.cumsum(F.pad(padded, (1, 0) if dim == -1 else (0, 0, 1, 0)), dim=dim)
        n = sums.shape[dim]
        out = (sums.narrow(dim, k, n - k) - sums.narrow(dim, 0, n - k)) / k
    return out.float()


def _settle(x: torch.Tensor) -> torch.Tensor:
    """Snap rounding residue of the running sums to exact 0 and 1."""
    return torch.where(x < 1e-6, 0.0, torch.where(x > 1 - 1e-6, 1.0, x))


def feather_radius(side_px: int) -> int:
    """The mask feather width: 1/32 of the crop side, so dilation + blur + border ramp stay in the padding."""
    return max(1, side_px // 32)


def feather_detection(mask: torch.Tensor, crop: Crop, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Soften a crop's mask: dilate its support by r, box-blur by r, smoothstep, then ramp to ~0 at interior
    crop edges.

    The object itself keeps weight 1 (the blur of the dilated mask is 1 up to its edge); the ramp
    lies outside it. Edges on the canvas border get no ramp (DESIGN rule 3).
    """
    side = mask.shape[-1]
    radius = feather_radius(side)
    grown = (box_mean(mask, radius) > 1e-6).float()  # the mask's support, dilated by r
    soft = _settle(box_mean(grown, radius))
    soft = soft * soft * (3 - 2 * soft)
    ramp = smoothstep_ramp(radius)
    height, width = latent_hw
    edges = torch.ones(side, side)
    if crop.y > 0:
        edges[:radius] *= ramp[:, None]
    if crop.y + crop.side < height:
        edges[-radius:] *= ramp.flip(0)[:, None]
    if crop.x > 0:
        edges[:, :radius] *= ramp[None, :]
    if crop.x + crop.side < width:
        edges[:, -radius:] *= ramp.flip(0)[None, :]
    return soft * edges


def composite_crop(canvas: torch.Tensor, refined: torch.Tensor, mask: torch.Tensor, crop: Crop, f: int) -> None:
    """Blend refined pixels into the canvas in place through `mask`; where the mask is 0 nothing changes."""
    y, x, side = crop.y * f, crop.x * f, crop.side * f
    box = canvas[..., y : y + side, x : x + side]
    box.copy_(torch.where(mask > 0, box + mask * (refined - box), box))
