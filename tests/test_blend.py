"""The blended tiled sampler and the pinned chess pass: equal to an untiled refine where one tile covers the
canvas, exact under an oracle denoiser, and free of the chess pass's overlap bands on the tiny models."""

from dataclasses import replace

import pytest
import torch

from farm.executor import LocalExecutor, prepare, run_local
from pipeline.geometry.chess import batches, chess_grid
from pipeline.graph.worker import TileWorker, WorkerConfig
from pipeline.sampling.blend import blend_refine
from pipeline.sampling.chess_pass import RefineSettings, chess_refine, pin_mask
from pipeline.sampling.sampler import refine


class OracleWorker:
    """Predicts exactly the noise (or Flux's velocity) that took the clean canvas to its noised state:
    a perfect denoiser, under which any correct sampler lands back on the clean canvas."""

    device = torch.device("cpu")

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor, family: str):
        self.clean, self.noise, self.family = clean, noise, family

    def predict(self, tiles, latents, t, cond, cfg):
        out = {}
        for i, tile in enumerate(tiles):
            box = (..., slice(tile.y, tile.y + tile.h), slice(tile.x, tile.x + tile.w))
            eps = self.noise[box]
            assert latents[i].shape == eps[0].shape
            out[tile.id] = eps - self.clean[box] if self.family == "flux" else eps.clone()
        return out


def _settings(sampler: str, steps: int = 4, denoise: float = 0.5) -> RefineSettings:
    return RefineSettings(1.0, steps, denoise, sampler)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler"])
def test_a_perfect_denoiser_gives_back_the_clean_canvas(tiny_model, sampler):
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(1, 4, 40, 56, generator=g), torch.randn(1, 4, 40, 56, generator=g)
    grid = chess_grid(40, 56, 16)  # 4 x 5 tiles with interior overlaps
    ex = LocalExecutor(OracleWorker(clean, noise, "sdxl"))
    config = dict(tiny_model.denoiser.scheduler_config)
    out = blend_refine(ex, grid, tuple(batches(grid.tiles, 3)), clean, noise, None, _settings(sampler), "sdxl", config)
    assert torch.allclose(out, clean, atol=1e-4)


def test_a_perfect_flow_denoiser_gives_back_the_clean_canvas(tiny_flux_model):
    g = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(1, 16, 32, 48, generator=g), torch.randn(1, 16, 32, 48, generator=g)
    grid = chess_grid(32, 48, 16)
    ex = LocalExecutor(OracleWorker(clean, noise, "flux"))
    config = dict(tiny_flux_model.denoiser.scheduler_config)
    out = blend_refine(
        ex, grid, tuple(batches(grid.tiles, 4)), clean, noise, None, _settings("flow_euler"), "flux", config
    )
    assert torch.allclose(out, clean, atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler"])
def test_one_tile_over_the_canvas_is_the_untiled_refine(tiny_worker, sampler):
    g = torch.Generator().manual_seed(2)
    canvas, noise = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    cond = tiny_worker.encode_prompt("a lighthouse", "blurry", 3.0)
    settings = replace(_settings(sampler, 3, 0.6), cfg=3.0)
    grid = chess_grid(32, 32, 32)
    assert len(grid.tiles) == 1
    facts = tiny_worker.facts()
    out = blend_refine(
        LocalExecutor(tiny_worker),
        grid,
        ((grid.tiles[0],),),
        canvas,
        noise,
        cond,
        settings,
        "sdxl",
        facts.scheduler_config,
    )
    expected = refine(tiny_worker.model.denoiser, canvas, noise, cond, 3.0, 3, 0.6, sampler).float()
    assert torch.allclose(out, expected, atol=1e-4)


def test_one_tile_over_the_canvas_is_the_untiled_flux_refine(tiny_flux):
    worker = TileWorker(WorkerConfig(str(tiny_flux), "", "", "fp32", "cpu"))
    g = torch.Generator().manual_seed(3)
    canvas, noise = torch.randn(1, 16, 32, 32, generator=g), torch.randn(1, 16, 32, 32, generator=g)
    cond = worker.encode_prompt("a lighthouse", "", 3.5)
    grid = chess_grid(32, 32, 32)
    facts = worker.facts()
    settings = RefineSettings(3.5, 3, 0.6, "flow_euler")
    out = blend_refine(
        LocalExecutor(worker), grid, ((grid.tiles[0],),), canvas, noise, cond, settings, "flux", facts.scheduler_config
    )
    expected = refine(worker.model.denoiser, canvas, noise, cond, 3.5, 3, 0.6, "flow_euler").float()
    assert torch.allclose(out, expected, atol=1e-4)


def test_batches_of_any_size_give_the_same_canvas_bit_for_bit(tiny_worker):
    """Per-tile predictions do not depend on their batch neighbours here (CPU, fp32), and the blend sums in
    tile-id order: the canvas is the same whichever batch a tile ran in."""
    g = torch.Generator().manual_seed(4)
    canvas, noise = torch.randn(1, 4, 40, 40, generator=g), torch.randn(1, 4, 40, 40, generator=g)
    cond = tiny_worker.encode_prompt("a lighthouse", "", 1.0)
    grid = chess_grid(40, 40, 16)
    config = tiny_worker.facts().scheduler_config
    ex = LocalExecutor(tiny_worker)
    outs = [
        blend_refine(
            ex, grid, tuple(batches(grid.tiles, n)), canvas, noise, cond, _settings("euler", 2), "sdxl", config
        )
        for n in (1, 4)
    ]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    again = blend_refine(
        ex, grid, tuple(batches(grid.tiles, 4)), canvas, noise, cond, _settings("euler", 2), "sdxl", config
    )
    assert torch.equal(again, outs[1])


def test_pinned_odd_tiles_hold_their_overlaps_and_change_only_their_free_pixels(tiny_worker):
    g = torch.Generator().manual_seed(5)
    canvas, noise = torch.randn(1, 4, 40, 40, generator=g), torch.randn(1, 4, 40, 40, generator=g)
    cond = tiny_worker.encode_prompt("a lighthouse", "", 1.0)
    grid = chess_grid(40, 40, 16)
    even, odd = tuple(batches(grid.even, 4)), tuple(batches(grid.odd, 4))
    ex = LocalExecutor(tiny_worker)
    settings = _settings("euler", 2)
    pinned = chess_refine(ex, grid, even, odd, canvas, noise.numpy(), cond, settings, pinned=True)
    even_only = chess_refine(ex, grid, even, (), canvas, noise.numpy(), cond, settings)
    covered = torch.zeros(40, 40, dtype=torch.bool)
    for tile in grid.even:
        covered[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] = True
    # every pixel an even tile covers keeps the even result: refined once, never again by an odd tile
    assert torch.equal(pinned[..., covered], even_only[..., covered])
    assert not torch.allclose(pinned[..., ~covered], even_only[..., ~covered])
    # an odd tile's pin mask is exactly the part of it the even tiles cover
    tile = grid.odd[0]
    assert torch.equal(pin_mask(grid, tile)[0, 0] > 0, covered[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])


def band_interior_ratio(canvas: torch.Tensor, grid) -> float:
    """Mean |horizontal step| in the overlap columns over the mean elsewhere (1.0 = no bands)."""
    step = (canvas[..., :, 1:] - canvas[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    band = torch.zeros(step.shape[0], dtype=torch.bool)
    for a, b in zip(grid.xs, grid.xs[1:], strict=False):
        band[b : a + grid.tile_w - 1] = True
    return float(step[band].mean() / step[~band].mean())


def test_blend_leaves_no_bands_where_the_original_chess_pass_does(small_spec):
    """The tiny render's refined latent: overlap columns carry extra texture under seed 002's passes (each
    band refined twice), and none under the blended sampler."""
    ratios = {}
    for mode in ("chess-original", "blend"):
        plan = prepare(replace(small_spec, tiling=mode, steps=3, denoise=0.6))
        ratios[mode] = band_interior_ratio(run_local(plan, "cpu").result.canvas, plan.grid)
    assert ratios["chess-original"] > 1.15
    assert 0.9 < ratios["blend"] < 1.05


def test_the_detailers_mask_is_a_lower_denoise_under_the_blended_sampler(tiny_worker):
    """Held everywhere for held_steps(4, 0.5, 0.25) = 2 steps, a blended refine at denoise 0.5 is the blended
    refine at 0.25 (Euler: the last 2 steps of the same 8-step schedule); a zero mask changes nothing."""
    g = torch.Generator().manual_seed(6)
    canvas, noise = torch.randn(1, 4, 40, 40, generator=g), torch.randn(1, 4, 40, 40, generator=g)
    cond = tiny_worker.encode_prompt("a lighthouse", "", 1.0)
    grid = chess_grid(40, 40, 16)
    tile_batches = tuple(batches(grid.tiles, 4))
    config = tiny_worker.facts().scheduler_config
    ex = LocalExecutor(tiny_worker)

    def run(settings, mask=None):
        return blend_refine(ex, grid, tile_batches, canvas, noise, cond, settings, "sdxl", config, mask)

    masked = replace(_settings("euler", 4, 0.5), masked_denoise=0.25)
    plain = run(_settings("euler", 4, 0.5))
    assert torch.equal(run(masked, torch.zeros(1, 1, 40, 40)), plain)
    assert torch.allclose(run(masked, torch.ones(1, 1, 40, 40)), run(_settings("euler", 2, 0.25)), atol=1e-5)
