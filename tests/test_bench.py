"""The benchmarks run and report what they promise (structure only: timings are never asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from full_models import KNOWN_PARAMS, build_full_sdxl, component_class, meta_param_counts, read_config  # noqa: E402
from seams import seam_ratio  # noqa: E402
from usdu_baseline import processing_size, tile_mask, usdu_refine, usdu_tiles  # noqa: E402

from pipeline.chess_pass import RefineSettings  # noqa: E402


def test_full_size_configs_build_the_published_architectures():
    """Built on the meta device (no memory), each config has the released checkpoint's parameter count."""
    assert meta_param_counts() == KNOWN_PARAMS
    for name in KNOWN_PARAMS:
        cls = component_class(name)
        if hasattr(cls, "extract_init_dict"):  # diffusers: every key is a constructor argument
            _, unused = cls.extract_init_dict(read_config(name))[:2]
            assert not unused, (name, unused)
    assert read_config("sdxl-base-1.0/vae")["force_upcast"] is True


def test_random_weight_folder_loads_through_our_loader(tiny_sdxl, tmp_path):
    """The full-size builder's output is a folder load_diffusion_model reads (shown with the tiny configs)."""
    from pipeline.models import load_diffusion_model

    folder = build_full_sdxl(tmp_path / "random-sdxl", "cpu", torch.float32, configs=tiny_sdxl)
    model = load_diffusion_model(folder, torch.device("cpu"), torch.float32)
    assert model.info.family == "sdxl" and model.info.vae_factor == 8
    assert model.encode_prompt("a lighthouse", "blurry", 3.0).embeds.shape[1] == 77


def test_usdu_grid_matches_ultimate_sd_upscale():
    tiles = usdu_tiles(4096, 4096, 1024, 32)
    assert len(tiles) == 16  # ceil(4096 / 1024)^2, no overlap
    assert all(t.crop[2] == t.crop[3] == 1088 for t in tiles)  # tile + 2 x padding, slid inside the image
    assert all(0 <= t.crop[0] and t.crop[0] + t.crop[2] <= 4096 for t in tiles)
    assert processing_size(1024, 32) == 1056
    chess = usdu_tiles(4096, 4096, 1024, 32, mode="chess")
    assert [t.white for t in chess] == [True] * 8 + [False] * 8
    mask = tile_mask(tiles[5], 8)
    assert mask.shape == (1088, 1088) and mask.max() <= 1 and mask[544, 544] == pytest.approx(1)


def test_usdu_baseline_refines_deterministically(tiny_model):
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    settings = RefineSettings(cfg=3.0, steps=1, denoise=0.5, sampler="euler")
    cond = tiny_model.encode_prompt("a lighthouse", "blurry", 3.0)
    run = [usdu_refine(tiny_model, pixels, cond, settings, seed=3, tile=64, padding=16, mask_blur=2) for _ in range(2)]
    assert run[0].shape == pixels.shape
    assert torch.equal(run[0], run[1])
    assert 0 <= run[0].min() and run[0].max() <= 1
    assert (run[0] - pixels).abs().mean() > 1e-3  # the tiles were refined, not passed through


def test_seam_ratio_sees_a_step_and_not_a_ramp():
    ramp = torch.linspace(0, 1, 64).repeat(1, 3, 64, 1)
    assert seam_ratio(ramp, [], [32]) == pytest.approx(1.0, abs=1e-4)
    step = ramp.clone()
    step[..., 32:] += 0.5
    assert seam_ratio(step, [], [32]) > 10


def test_gpu_render_smoke_prints_every_table(tiny_sdxl, tiny_upscaler, capsys):
    import gpu_render

    figures = gpu_render.main(
        ["--smoke", "--model", str(tiny_sdxl), "--upscaler", str(tiny_upscaler), "--sizes", "256", "--native", "64",
         "--tile", "128", "--fit-overlap", "16", "--usdu-padding", "16", "--steps", "1", "--base-steps", "1",
         "--repeat", "1", "--batch-sweep", "1,2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    for heading in ("### 256 px, chess grid", "### 256 px, fit grid", "### Summary", "### Seams", "### Optimisations"):
        assert heading in out
    assert "| stage | seconds | model calls | model s | isolated model s | UNet TFLOP/s |" in out
    for stage in gpu_render.STAGES:
        assert f"| {stage} |" in out
    chess, fit = figures["renders"]
    assert (chess["grid"], fit["grid"]) == ("chess", "fit")
    assert chess["stages"]["refine"]["calls"]["unet"] == chess["batches"]  # 1 step: one CFG-batched call per batch
    assert chess["isolated_seconds"] > 0 and chess["stages"]["refine"]["unet_tflops"] > 0
    assert (chess["tiles"], fit["tiles"]) == (9, 4)
    assert figures["baselines"][256]["tiles"] == 4
    assert figures["baselines"][256]["calls"] == {"unet": 4, "vae": 8}  # one encode + one decode per tile
    names = [t["name"] for t in figures["optimisations"]]
    assert "SDPA attention (vs eager)" in names and "CFG in one batch" in names
    assert [p["batch"] for p in figures["batch_sweep"]] == [1, 2]


def test_tile_overhead_reports_batch_1_and_4(tiny_sdxl, capsys):
    import tile_overhead

    rows = tile_overhead.main(
        ["--size", "512", "--tile", "128", "--steps", "1", "--repeat", "1", "--model", str(tiny_sdxl)]
    )
    assert [r["batch"] for r in rows] == [1, 4]
    assert [r["batches"] for r in rows] == [25, 7]
    assert "dispatch + slicing + compositing ms/tile" in capsys.readouterr().out
