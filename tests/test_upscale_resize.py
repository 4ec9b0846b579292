import torch

from pipeline.models import load_upscaler
from pipeline.resize import cover_size, fit_exact
from pipeline.upscale import upscale_grid, upscale_image


def test_tiled_upscale_matches_whole_image_away_from_seams(tiny_upscaler):
    up = load_upscaler(tiny_upscaler, torch.device("cpu"))
    image = torch.rand(1, 3, 100, 140, generator=torch.Generator().manual_seed(0))
    whole = up.descriptor(image).clamp(0, 1)
    tiled = upscale_image(up, image, tile=48, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 400, 560)
    grid = upscale_grid(100, 140, 48, 16)
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
