"""The render plan: sizes, scale factor, tile grid and batches, decided from the spec alone.

Both executors run the same plan, so what runs (and so the image) never depends on who runs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.chess import Tile, TileGrid, batches, chess_grid, fit_grid
from pipeline.errors import SpecError
from pipeline.models import ModelInfo
from pipeline.schedule import resolve_sampler
from pipeline.spec import RenderSpec

HOST_BYTES_PER_PIXEL = 4 * 3 * 4  # up to four float32 RGB buffers of the target live at once


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def native_factor(latent_h: int, latent_w: int, native_latent: int, multiple: int = 1) -> int:
    """The integer k dividing both latent sides whose base (target / k) is closest in area to native^2,
    among those whose base sides stay multiples of `multiple` latents (2 for Flux's 2x2 patches)."""
    common = math.gcd(latent_h, latent_w)
    area = latent_h * latent_w
    ks = [k for k in divisors(common) if (latent_h // k) % multiple == 0 and (latent_w // k) % multiple == 0]
    return min(ks, key=lambda k: abs(math.log(area / k**2 / native_latent**2)))


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class RenderPlan:
    """What a render will do: every size in pixels and latents, the grid and the fixed batches."""

    spec: RenderSpec
    model: ModelInfo
    k: int  # scaffold pooling factor: target latent / base latent
    latent_h: int
    latent_w: int
    grid: TileGrid
    even_batches: tuple[tuple[Tile, ...], ...]
    odd_batches: tuple[tuple[Tile, ...], ...]

    @property
    def f(self) -> int:
        return self.model.vae_factor

    @property
    def native_latent(self) -> int:
        """The model's native size in latent px (the size every tile and crop is sampled at)."""
        return (self.spec.native or self.model.native_px) // self.f

    @property
    def base_h(self) -> int:
        return self.latent_h // self.k * self.f

    @property
    def base_w(self) -> int:
        return self.latent_w // self.k * self.f

    def describe(self) -> str:
        s, g, f = self.spec, self.grid, self.f
        sy, sx = g.stride
        oy, ox = g.overlap
        tile_calls = (len(self.even_batches) + len(self.odd_batches)) * s.steps
        # Flux's guidance is an input embedding: it never adds a pass
        cfg_note = " (CFG doubles each call's batch)" if s.cfg > 1 and self.model.family == "sdxl" else ""
        network = "transformer" if self.model.family == "flux" else "UNet"
        detail = [
            f"detail layer {c.layer}: {c.name!r} ({c.selection}, up to "
            f"{'all' if c.selection == 'all' else c.max_objects}, threshold {c.threshold}), denoise {c.denoise}, "
            f"crops padded {s.detail_padding:g} per side, refined at {self.native_latent * f} px"
            for c in sorted(s.concepts, key=lambda c: c.layer)
        ]
        grid_name = "chess grid" if s.grid == "chess" else f"fitted grid (overlap >= {s.fit_overlap} px)"
        return "\n".join(
            [
                f"target {s.width}x{s.height} px, latent {self.latent_w}x{self.latent_h}x{self.model.latent_channels}",
                f"base {self.base_w}x{self.base_h} px (scaffold pooled by k={self.k}), {s.base_steps} steps",
                f"{grid_name} {g.cols}x{g.rows} = {len(g.tiles)} tiles of {g.tile_w * f}x{g.tile_h * f} px: "
                f"{len(g.even)} even + {len(g.odd)} odd, stride {sx * f}x{sy * f} px, "
                f"overlap >= {ox * f}x{oy * f} px, work x{g.work_multiplier:.2f}",
                f"batches of {s.tile_batch}: {len(self.even_batches)} even + {len(self.odd_batches)} odd, "
                f"{s.steps} steps at denoise {s.denoise} ({resolve_sampler(s.sampler, self.model.family)}), "
                f"{tile_calls} {network} calls for the tiles{cfg_note}",
                *detail,
            ]
        )


def make_plan(spec: RenderSpec, model: ModelInfo) -> RenderPlan:
    """Turn a validated spec and the model's facts into a plan, or raise SpecError with a fix."""
    f, m = model.vae_factor, model.size_multiple
    why = f"the model's VAE factor {f}" if m == f else f"{m} for {model.family.upper()} (VAE factor {f} x 2x2 patches)"
    for name, value in (("width", spec.width), ("height", spec.height), ("tile", spec.tile), ("native", spec.native)):
        if value % m:
            low, high = value // m * m, value // m * m + m
            raise SpecError(f"{name} {value} must be a multiple of {why}; try {low or high} or {high}")
    resolve_sampler(spec.sampler, model.family)
    needed = spec.width * spec.height * HOST_BYTES_PER_PIXEL
    available = host_memory_bytes()
    if needed > 0.8 * available:
        side = int(math.sqrt(0.8 * available / HOST_BYTES_PER_PIXEL)) // 8 * 8
        raise SpecError(
            f"size {spec.width}x{spec.height} needs about {needed / 2**30:.0f} GiB of host memory for its "
            f"pixel buffers; this machine has {available / 2**30:.0f} GiB. Render at most about {side}x{side} "
            "here, or on a machine with more memory"
        )
    latent_h, latent_w = spec.height // f, spec.width // f
    native_latent = (spec.native or model.native_px) // f
    k = native_factor(latent_h, latent_w, native_latent, m // f)
    base_area = latent_h * latent_w / k**2
    if not 0.4 <= base_area / native_latent**2 <= 2.5:
        ideal = max(1, round(math.sqrt(latent_h * latent_w) / native_latent))
        step = m * ideal
        suggest = f"{round(spec.width / step) * step}x{round(spec.height / step) * step}"
        raise SpecError(
            f"size {spec.width}x{spec.height}: no whole factor k turns it into a base near the model's native "
            f"{native_latent * f} px (its latent {latent_w}x{latent_h} has common divisors "
            f"{divisors(math.gcd(latent_h, latent_w))}); the scaffold pools by whole factors to keep unit "
            f"variance. Try {suggest}"
        )
    if spec.grid == "fit":
        grid = fit_grid(latent_h, latent_w, spec.tile // f, spec.fit_overlap // f)
    else:
        grid = chess_grid(latent_h, latent_w, spec.tile // f)
    return RenderPlan(
        spec,
        model,
        k,
        latent_h,
        latent_w,
        grid,
        tuple(batches(grid.even, spec.tile_batch)),
        tuple(batches(grid.odd, spec.tile_batch)),
    )
