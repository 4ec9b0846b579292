import torch

from farm.executor import LocalExecutor
from pipeline.geometry.chess import fitted_cover_grid
from pipeline.geometry.resize import cover_size, fit_exact
from pipeline.geometry.tiling import run_tiled


def test_tiled_upscale_matches_whole_image_away_from_seams(tiny_worker):
    image = torch.rand(1, 3, 100, 140, generator=torch.Generator().manual_seed(0))
    whole = tiny_worker.upscale_tile(image)
    tiled = run_tiled(LocalExecutor(tiny_worker), "upscale", "upscale_tile", image, 48, 16, 4, 3, fitted=True)
    assert tiled.shape == whole.shape == (1, 3, 400, 560)
    grid = fitted_cover_grid(100, 140, 48, 16)  # the render's upscale tiles
    assert len(grid.tiles) > 4
    # a pixel at least 8 px (twice the net's receptive radius) from the cut edges of every tile that
    # holds it sees the same inputs tiled or whole: identical values there
    far = torch.ones(100, 140, dtype=torch.bool)
    for t in grid.tiles:
        near = torch.zeros(100, 140, dtype=torch.bool)
        near[t.y : t.y + t.h, t.x : t.x + t.w] = True
        near[
            t.y + (8 if t.y else 0) : t.y + t.h - (8 if t.y + t.h < 100 else 0),
            t.x + (8 if t.x else 0) : t.x + t.w - (8 if t.x + t.w < 140 else 0),
        ] = False
        far &= ~near
    assert far.float().mean() > 0.2
    far_up = far.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert (tiled[0][:, far_up] - whole[0][:, far_up]).abs().max() < 1e-5
    # and the blended overlaps stay close to the untiled result
    assert (tiled - whole).abs().mean() < 0.01


def test_fit_exact_keeps_aspect_and_crops_the_centre():
    image = torch.rand(1, 3, 1088, 1920)
    out = fit_exact(image, 2160, 3840)
    assert out.shape == (1, 3, 2160, 3840)
    ch, cw = cover_size(1088, 1920, 2160, 3840)
    assert ch >= 2160 and cw >= 3840 and abs(cw / ch - 1920 / 1088) < 2 / ch
    same = torch.rand(1, 3, 64, 64)
    assert torch.equal(fit_exact(same, 64, 64), same)


def test_tiled_decode_matches_whole_decode_in_tile_interiors(tiny_worker):
    from pipeline.sampling import vae

    latents = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(tiny_worker.model.vae, latents, tiled=False)
    tiled = run_tiled(LocalExecutor(tiny_worker), "decode", "decode_tile", latents, 32, 8, 8, 3)
    assert tiled.shape == whole.shape == (1, 3, 384, 512)
    # the VAE's GroupNorm sees per-tile statistics, so tiles differ slightly from a whole decode
    assert (tiled - whole).abs().mean() < 0.05
