"""The render plan: sizes, scale factor, tile grid and batches, decided from the spec alone.

Both executors run the same plan, so what runs (and so the image) never depends on who runs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.errors import SpecError
from pipeline.geometry.chess import Tile, TileGrid, batches, chess_grid, fit_grid
from pipeline.geometry.resize import describe_fit
from pipeline.loading.model_info import ModelInfo
from pipeline.sampling.schedule import resolve_sampler
from pipeline.spec import RenderSpec

HOST_BYTES_PER_PIXEL = 4 * 3 * 4  # up to four float32 RGB buffers of the target live at once
LATENT_UPSCALE = 2  # two-pass: the latent is enlarged 2x (nearest-exact, ComfyUI's Upscale Latent default)


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
    """What a render will do: every size in pixels and latents, the grid and the fixed batches.

    The canvas (latent_h x latent_w) is the latent the chess refiner works on: the target's in the
    top-down and enhance workflows, 2x the base in the two-pass workflow. The scaffold has its size."""

    spec: RenderSpec
    model: ModelInfo
    k: int  # scaffold pooling factor: canvas latent / base latent (1 in enhance: no base)
    latent_h: int
    latent_w: int
    grid: TileGrid
    even_batches: tuple[tuple[Tile, ...], ...]
    odd_batches: tuple[tuple[Tile, ...], ...]
    notes: tuple[str, ...] = ()  # decisions made while planning (e.g. an input size snapped), shown by describe
    vae_tile: int = 0  # px side of VAE encode/decode tiles when the memory pre-flight made them smaller; 0 = the VAE's

    @property
    def f(self) -> int:
        return self.model.vae_factor

    @property
    def blend_batches(self) -> tuple[tuple[Tile, ...], ...]:
        """The blended sampler's fixed batches: every tile, in id order."""
        return tuple(batches(self.grid.tiles, self.spec.tile_batch))

    @property
    def tile_batch_count(self) -> int:
        """Sampler calls per step of the refine: every tile once, in the mode's batches."""
        if self.spec.tiling == "blend":
            return len(self.blend_batches)
        return len(self.even_batches) + len(self.odd_batches)

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

    @property
    def canvas_px(self) -> tuple[int, int]:
        """(height, width) of the refined canvas in px."""
        return self.latent_h * self.f, self.latent_w * self.f

    @property
    def network(self) -> str:
        return "transformer" if self.model.family == "flux" else "UNet"

    @property
    def pixel_upscaled(self) -> tuple[int, int]:
        """Two-pass: (height, width) after the pixel upscale (the decoded canvas when it is off)."""
        h, w = self.canvas_px
        return h * self.spec.pixel_upscale, w * self.spec.pixel_upscale

    def model_calls(self) -> tuple[int, int]:
        """(base sampler calls, tile sampler calls): one per step and batch; CFG doubles a call's batch."""
        base = 0 if self.spec.workflow == "enhance" else self.spec.base_steps
        return base, self.tile_batch_count * self.spec.steps

    def _batch_text(self) -> str:
        if self.spec.tiling == "blend":
            return f"{len(self.blend_batches)} per step"
        return f"{len(self.even_batches)} even + {len(self.odd_batches)} odd"

    def describe(self) -> str:
        """The plan as text: stages, sizes, tiles, steps and estimated model calls."""
        s, g, f = self.spec, self.grid, self.f
        sy, sx = g.stride
        oy, ox = g.overlap
        base_calls, tile_calls = self.model_calls()
        # Flux's guidance is an input embedding: it never adds a pass
        cfg_note = " (CFG doubles each call's batch)" if s.cfg > 1 and self.model.family == "sdxl" else ""
        sampler = resolve_sampler(s.sampler, self.model.family)
        ch, cw = self.canvas_px
        lines = [f"{s.workflow} workflow: output {s.width}x{s.height} px, {self.model.family.upper()} model"]
        lines += self.notes
        if s.workflow == "top-down":
            lines.append(f"target latent {self.latent_w}x{self.latent_h}x{self.model.latent_channels}")
        if s.workflow != "enhance":
            lines.append(
                f"base {self.base_w}x{self.base_h} px (scaffold pooled by k={self.k}), {s.base_steps} steps "
                f"at CFG {s.base_cfg or s.cfg} ({sampler})"
            )
        if s.workflow == "two-pass":
            lines.append(
                f"latent upscale {LATENT_UPSCALE}x (nearest-exact) -> {cw}x{ch} px "
                f"(latent {self.latent_w}x{self.latent_h}x{self.model.latent_channels})"
            )
        if s.workflow == "enhance":
            tiles = f"tiles of at most {s.upscale_tile} px, 32 px overlap"
            how = f"the upscale model in {tiles}" if s.upscaler else "bicubic"
            lines.append(
                f"upscale x{s.pixel_upscale} ({how}) -> {cw}x{ch} px, "
                f"encode -> latent {self.latent_w}x{self.latent_h}x{self.model.latent_channels}"
            )
        grid_name = "chess grid" if s.grid == "chess" else f"fitted grid (overlap >= {s.fit_overlap} px)"
        lines += [
            f"{grid_name} {g.cols}x{g.rows} = {len(g.tiles)} tiles of {g.tile_w * f}x{g.tile_h * f} px: "
            f"{len(g.even)} even + {len(g.odd)} odd, stride {sx * f}x{sy * f} px, "
            f"overlap >= {ox * f}x{oy * f} px, work x{g.work_multiplier:.2f}",
            f"batches of {s.tile_batch}: {self._batch_text()}, "
            f"{s.steps} steps at denoise {s.denoise}, CFG {s.cfg} ({sampler})",
            f"tiling {s.tiling}: {TILING_WHY[s.tiling]}",
        ]
        lines += [
            f"detail layer {c.layer}: {c.name!r} ({c.selection}, up to "
            f"{'all' if c.selection == 'all' else c.max_objects}, threshold {c.threshold}), denoise {c.denoise}, "
            f"crops padded {s.detail_padding:g} per side, refined at {self.native_latent * f} px"
            for c in sorted(s.concepts, key=lambda c: c.layer)
        ]
        norm = (
            "GroupNorm statistics per tile"
            if s.decode_norm == "tile"
            else "the image's GroupNorm statistics, layer by layer"
        )
        lines.append(f"decode {cw}x{ch} px in tiles ({norm})")
        if s.workflow == "two-pass":
            ph, pw = self.pixel_upscaled
            if s.pixel_upscale == 1:
                lines.append("pixel upscale off (x1): the diffusion result is exported")
            else:
                how = f"the upscale model in tiles of at most {s.upscale_tile} px" if s.upscaler else "bicubic"
                lines.append(f"pixel upscale x{s.pixel_upscale} ({how}) -> {pw}x{ph} px")
            lines.append(f"exact size: {describe_fit(ph, pw, s.height, s.width)}")
        total = f"{base_calls} base + {tile_calls} tile" if base_calls else f"{tile_calls} tile"
        lines.append(f"estimated {self.network} calls: {total} = {base_calls + tile_calls}{cfg_note}")
        return "\n".join(lines)


TILING_WHY = {
    "blend": "every step, each tile predicts from the same canvas and one sampler steps the whole canvas on the "
    "blended predictions: every pixel refined once, no seams (the default: the seam bench's best at the same work)",
    "chess": "even tiles, then odd tiles whose overlaps stay pinned to the even result (re-noised each step): "
    "every pixel refined once, one barrier between the passes",
    "chess-original": "seed 002's passes: odd tiles refine their overlaps again and are feathered in "
    "(for comparison: overlap bands show, see BENCHMARKS.md)",
}


def _check_multiple(model: ModelInfo, values: tuple[tuple[str, int], ...]) -> None:
    f, m = model.vae_factor, model.size_multiple
    why = f"the model's VAE factor {f}" if m == f else f"{m} for {model.family.upper()} (VAE factor {f} x 2x2 patches)"
    for name, value in values:
        if value % m:
            low, high = value // m * m, value // m * m + m
            raise SpecError(f"{name} {value} must be a multiple of {why}; try {low or high} or {high}")


def _check_host_memory(height: int, width: int) -> None:
    needed = width * height * HOST_BYTES_PER_PIXEL
    available = host_memory_bytes()
    if needed > 0.8 * available:
        side = int(math.sqrt(0.8 * available / HOST_BYTES_PER_PIXEL)) // 8 * 8
        raise SpecError(
            f"size {width}x{height} needs about {needed / 2**30:.0f} GiB of host memory for its "
            f"pixel buffers; this machine has {available / 2**30:.0f} GiB. Render at most about {side}x{side} "
            "here, or on a machine with more memory"
        )


def _plan(spec: RenderSpec, model: ModelInfo, k: int, latent_h: int, latent_w: int) -> RenderPlan:
    f = model.vae_factor
    if spec.grid == "fit":
        grid = fit_grid(latent_h, latent_w, spec.tile // f, spec.fit_overlap // f)
    else:
        grid = chess_grid(latent_h, latent_w, spec.tile // f)
    even, odd = batches(grid.even, spec.tile_batch), batches(grid.odd, spec.tile_batch)
    return RenderPlan(spec, model, k, latent_h, latent_w, grid, tuple(even), tuple(odd))


def make_plan(spec: RenderSpec, model: ModelInfo) -> RenderPlan:
    """Turn a validated spec and the model's facts into a plan, or raise SpecError with a fix."""
    sizes = (("width", spec.width), ("height", spec.height), ("tile", spec.tile), ("native", spec.native))
    _check_multiple(model, sizes)
    resolve_sampler(spec.sampler, model.family)
    f = model.vae_factor
    if spec.workflow == "two-pass":
        return _two_pass_plan(spec, model)
    _check_host_memory(spec.height, spec.width)
    if spec.workflow == "enhance":  # no base: the canvas is the upscaled input's
        return _plan(spec, model, 1, spec.height // f, spec.width // f)
    return _top_down_plan(spec, model)


def _two_pass_plan(spec: RenderSpec, model: ModelInfo) -> RenderPlan:
    """Base at the spec's base size; the canvas (and the scaffold) is the 2x latent it is upscaled to."""
    _check_multiple(model, (("base width", spec.base_width), ("base height", spec.base_height)))
    f = model.vae_factor
    latent_h, latent_w = spec.base_height // f * LATENT_UPSCALE, spec.base_width // f * LATENT_UPSCALE
    plan = _plan(spec, model, LATENT_UPSCALE, latent_h, latent_w)
    ph, pw = plan.pixel_upscaled
    _check_host_memory(max(ph, spec.height), max(pw, spec.width))
    return plan


def _top_down_plan(spec: RenderSpec, model: ModelInfo) -> RenderPlan:
    """Seed 002: the canvas is the target's latent; the base is target / k for the k nearest native."""
    f, m = model.vae_factor, model.size_multiple
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
    return _plan(spec, model, k, latent_h, latent_w)
