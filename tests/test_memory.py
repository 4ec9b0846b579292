"""The memory pre-flight: exact weights, traced activations, available memory, and what it decides."""

import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.budget.memory import (
    CUDA_OVERHEAD,
    HEADROOM,
    Budget,
    Estimate,
    Stage,
    available_host_bytes,
    component_parameters,
    count_parameters,
    decide,
    model_configs,
    plan_estimate,
    plan_stages,
)
from pipeline.budget.memory_table import Curve, curve
from pipeline.geometry.chess import chess_grid
from pipeline.loading.model_info import ModelInfo
from pipeline.plan import make_plan
from pipeline.sampling.chess_pass import RefineSettings, crops
from pipeline.spec import RenderSpec

ROOT = Path(__file__).resolve().parent.parent
SDXL_CONFIGS = ROOT / "bench/configs/sdxl-base-1.0"
GiB = 2**30


def test_parameters_are_counted_from_the_headers(tiny_sdxl, tiny_model):
    pipe = tiny_model.pipe
    parts = {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    counts = component_parameters(Path(tiny_sdxl))
    assert counts == {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert count_parameters(Path(tiny_sdxl)) == sum(counts.values())


def test_weights_are_counted_at_the_dtype_each_part_runs_in(tiny_sdxl, tiny_upscaler):
    plan = make_plan(
        RenderSpec(model=str(tiny_sdxl), width=512, height=512, tile=256).validate(), _tiny_info(tiny_sdxl)
    )
    counts = component_parameters(Path(tiny_sdxl))
    half = plan_estimate(plan, 2, "GPU", host=False).weights
    # the VAE stays fp32 under half precision (force_upcast): 4 bytes, everything else 2
    assert half == 2 * sum(counts.values()) + 2 * counts["vae"]
    assert plan_estimate(plan, 4, "host", host=True).weights == 4 * sum(counts.values())
    with_upscaler = plan_estimate(replace(plan, spec=replace(plan.spec, upscaler=str(tiny_upscaler))), 4, "", False)
    assert with_upscaler.weights == 4 * (sum(counts.values()) + count_parameters(tiny_upscaler))


def test_host_memory_is_what_the_kernel_says_is_available_not_merely_free():
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(fields["MemAvailable"].split()[0]) * 1024
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    measured = available_host_bytes()
    assert abs(measured - available) < GiB // 4  # the two reads are a moment apart
    assert measured >= free - GiB // 4  # MemAvailable adds the page cache the kernel can drop


# --- the table ---------------------------------------------------------------------------------


def _tiny_info(path) -> ModelInfo:
    return ModelInfo(Path(path), "sdxl", 4, 8, 256, False)


def _sdxl_plan(size: int, batch: int, tile: int = 1024, **fields):
    spec = RenderSpec(model="m", width=size, height=size, tile=tile, tile_batch=batch, cfg=7.0, **fields).validate()
    return make_plan(spec, ModelInfo(SDXL_CONFIGS, "sdxl", 4, 8, 1024, False))


def _stage(stages, name):
    return next(s for s in stages if s.name == name)


def test_the_sdxl_entries_match_the_traced_figures_of_the_research():
    configs = model_configs(SDXL_CONFIGS)
    stages = plan_stages(_sdxl_plan(4096, 1), configs, 2, 4, None)
    # research real_models.md 3.2: SDXL UNet fp16 1024 px 0.15 GiB per item (CFG: 2 items); VAE decode fp32 3.0 GiB
    assert _stage(stages, "refine").activations / GiB == pytest.approx(0.31, rel=0.1)
    assert _stage(stages, "decode").activations / GiB == pytest.approx(3.0, rel=0.1)
    assert _stage(plan_stages(_sdxl_plan(4096, 4), configs, 2, 4, None), "refine").activations / GiB == pytest.approx(
        1.24, rel=0.1
    )
    # a single-file checkpoint (no configs) gets the family's entry; the old flat coefficients charged 1.5 GiB/item
    bare = plan_stages(_sdxl_plan(4096, 1), {}, 2, 4, None)
    assert _stage(bare, "refine").activations == _stage(stages, "refine").activations


def test_flux_has_its_own_entry_not_sdxls():
    flux = json.loads((ROOT / "bench/configs/flux1-dev/transformer/config.json").read_text())
    at_1024 = curve("transformer", flux, "flux", 2)
    assert "flux" in at_1024.source and "scaled" not in at_1024.source
    # research 3.2: FLUX.1-dev bf16 1024 px 0.46 GiB, 2048 px 1.67 GiB (batch 1)
    assert at_1024.at(1024**2) / GiB == pytest.approx(0.46, rel=0.15)
    assert at_1024.at(2048**2) / GiB == pytest.approx(1.67, rel=0.15)


def test_a_fresh_trace_of_the_tiny_models_matches_their_table_entries(tiny_sdxl):
    sys.path.insert(0, str(ROOT / "bench"))
    from memory_table import trace

    configs = model_configs(Path(tiny_sdxl))
    for stage, config, latent, dtype in (
        ("unet", configs["unet"], 64, "fp16"),
        ("vae_decode", configs["vae"], 64, "fp32"),
    ):
        table = curve(stage, config, "sdxl", 2 if dtype == "fp16" else 4)
        assert "tiny-sdxl" in table.source
        assert trace(stage, config, latent, dtype) == pytest.approx(table.at((latent * 8) ** 2), rel=0.03)


def test_an_unknown_architecture_is_scaled_from_its_family_by_width(tiny_sdxl):
    tiny = model_configs(Path(tiny_sdxl))["unet"]
    unknown = tiny | {"cross_attention_dim": 96}  # not in the table: scaled from SDXL's entry
    scaled = curve("unet", unknown, "sdxl", 2)
    assert "scaled by width 32/320" in scaled.source
    own = curve("unet", tiny, "sdxl", 2)
    assert scaled.at(1024**2) == pytest.approx(own.at(1024**2), rel=0.15)


# --- the decision ------------------------------------------------------------------------------

WEIGHTS = 4 * GiB
MP = 2**20  # one 1024 x 1024 tile


def _synthetic(vae_per_px: float = 3000) -> Estimate:
    """4 GiB of weights; a UNet at 1000 B/px per item (CFG: 2 items, batches of 4); a VAE decoder per tile."""
    refine = Stage("refine", "UNet", Curve(1000, 0), MP, items=2, batch=4, knob="batch")
    decode = Stage("decode", "VAE decoder", Curve(vae_per_px, 0), MP, knob="vae tile")
    return Estimate(WEIGHTS, (refine, decode))


def test_a_plan_that_fits_runs_as_planned():
    decision = decide(_synthetic(), Budget(40 * GiB, "GPU (test)"), 4)
    assert (decision.tile_batch, decision.vae_tile, decision.refusal, decision.notes) == (4, 0, "", ())


def test_a_unet_stage_that_does_not_fit_lowers_the_tile_batch():
    # batch 4: 1.2 x (4 + 7.8) = 14.2 GiB; batch 2: 1.2 x (4 + 3.9) = 9.5 GiB
    decision = decide(_synthetic(), Budget(11 * GiB, "GPU (test)"), 4)
    assert (decision.tile_batch, decision.vae_tile, decision.refusal) == (2, 0, "")
    assert "tile batch lowered from 4 to 2" in decision.notes[0]
    assert decide(_synthetic(), Budget(8 * GiB, "GPU (test)"), 4).tile_batch == 1  # 1.2 x (4 + 1.95) = 7.1


def test_a_vae_stage_that_does_not_fit_tiles_smaller():
    # decode at 1024 px: 1.2 x (4 + 11.7) = 18.9 GiB; at 512 px 1.2 x (4 + 2.9) = 8.3 GiB
    decision = decide(_synthetic(vae_per_px=12000), Budget(9 * GiB, "GPU (test)"), 4)
    assert (decision.tile_batch, decision.vae_tile, decision.refusal) == (1, 512, "")
    assert any("VAE tiles of 512 px instead of 1024 px" in n for n in decision.notes)


def test_only_what_cannot_fit_at_batch_1_is_refused_with_the_numbers_and_a_fix():
    weights = decide(_synthetic(), Budget(4 * GiB, "GPU (RTX 3050)"), 4)
    assert "model weights alone" in weights.refusal and "4.80 GiB on the GPU (RTX 3050)" in weights.refusal
    assert "4.00 GiB weights" in weights.refusal and "4.00 GiB available" in weights.refusal
    assert "half precision" in weights.refusal
    one_tile = decide(_synthetic(), Budget(6 * GiB, "GPU (test)"), 4)
    assert "the refine stage" in one_tile.refusal and "--tile" in one_tile.refusal
    assert f"x{HEADROOM} margin" in one_tile.refusal


def test_a_gpu_worker_refuses_weights_its_own_gpu_cannot_hold(tiny_sdxl):
    from pipeline.budget.preflight import worker_refusal
    from pipeline.graph.worker import WorkerConfig

    config = WorkerConfig(str(tiny_sdxl), "", "", "fp16")
    weights = 2 * count_parameters(Path(tiny_sdxl)) + 2 * component_parameters(Path(tiny_sdxl))["vae"]
    assert worker_refusal(config, 2, Budget(GiB, "GPU (test)")) == ""
    refusal = worker_refusal(config, 2, Budget(weights, "GPU (test)"))  # the margin does not fit
    assert "model weights alone" in refusal and f"{weights / GiB:.2f} GiB weights" in refusal


def test_the_need_of_each_stage_grows_with_batch_and_size():
    base = _synthetic().stages[0]
    assert base.with_batch(2).activations * 2 == base.activations
    assert base.with_side(512).activations * 4 == base.activations


# SDXL base 1.0: UNet, CLIP-L, CLIP-G, then the VAE (kept in fp32 under fp16)
SDXL_PARAMS, SDXL_VAE_PARAMS = 2_567_463_684 + 123_060_480 + 694_659_840, 83_653_863


def test_sdxl_8k_on_consumer_cards_tiles_the_vae_before_refusing():
    """The old coefficients refused 8K in batches of 4 on a 16 GB card; traced, it fits, and 12 GiB needs
    only smaller VAE tiles."""
    stages = tuple(plan_stages(_sdxl_plan(8192, 4), model_configs(SDXL_CONFIGS), 2, 4, None))
    estimate = Estimate(2 * SDXL_PARAMS + 4 * SDXL_VAE_PARAMS, stages)

    def on(gib: int):
        return decide(estimate, Budget(gib * GiB, f"GPU ({gib} GiB)", CUDA_OVERHEAD), 4)

    assert (on(16).tile_batch, on(16).vae_tile, on(16).refusal) == (4, 0, "")
    assert (on(12).tile_batch, on(12).vae_tile, on(12).refusal) == (4, 512, "")
    assert "model weights alone" in on(8).refusal and "8.00 GiB available" in on(8).refusal


def test_tile_batch_zero_is_resolved_before_the_render(small_spec):
    from farm.executor import prepare

    plan = prepare(replace(small_spec, tile_batch=0), "cpu")
    assert plan.spec.tile_batch == 4 and len(plan.even_batches) == 4


# --- acceptance on the tiny models -------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 4096])
def test_tiny_renders_that_were_refused_now_pass_the_preflight(size, tiny_sdxl, tiny_upscaler):
    """1024 px as one 1024 px tile, and a 4096 px render: refused before at "27.7 GiB" against 11.2 GiB free."""
    spec = RenderSpec(model=str(tiny_sdxl), upscaler=str(tiny_upscaler), width=size, height=size, tile=1024, cfg=7.0)
    plan = make_plan(spec.validate(), _tiny_info(tiny_sdxl))
    estimate = plan_estimate(plan, 4, "host", host=True)
    refine = _stage(estimate.stages, "refine")
    assert "tiny-sdxl" in refine.curve.source and refine.activations < 0.5 * GiB
    decision = decide(estimate, Budget(int(11.2 * GiB), "host"), spec.tile_batch)
    assert (decision.refusal, decision.tile_batch, decision.vae_tile) == ("", spec.tile_batch, 0)
    assert max(HEADROOM * (estimate.weights + s.activations) for s in estimate.stages) < 2 * GiB


def test_dry_run_prints_the_estimate_per_stage(tiny_sdxl, tmp_path, capsys):
    from farm.cli import main

    args = ["render", "--model", str(tiny_sdxl), "--prompt", "x", "--size", "1024x1024", "--tile", "1024"]
    assert main([*args, "--device", "cpu", "--dry-run", "--out", str(tmp_path / "never.png")]) == 0
    out = capsys.readouterr().out
    assert "memory on the host" in out and "GiB available" in out
    for stage in ("base:", "refine: UNet", "decode: VAE decoder", "encode: VAE encoder"):
        assert stage in out


# --- out of memory during a render -------------------------------------------------------------


def _refine_args(worker):
    canvas = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(1))
    scaffold = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    tiles = chess_grid(24, 24, 8).tiles[:4]
    cond = worker.encode_prompt("a lighthouse", "", 1.0)
    return tiles, crops(canvas, tiles), scaffold, cond, RefineSettings(1.0, 1, 1.0, "euler")


def test_a_batch_that_runs_out_of_memory_is_split_in_halves_once(tiny_worker, caplog):
    tiles, latents, scaffold, cond, settings = _refine_args(tiny_worker)
    first = tiny_worker.refine(tiles[:2], latents[:2], scaffold, cond, settings)
    second = tiny_worker.refine(tiles[2:], latents[2:], scaffold, cond, settings)
    tiny_worker.oom_faults = 1
    with caplog.at_level(logging.WARNING, logger="pipeline.graph.worker"):
        split = tiny_worker.refine(tiles, latents, scaffold, cond, settings)
    assert sorted(split) == [t.id for t in tiles]
    assert all(torch.equal(split[i], (first | second)[i]) for i in split)
    assert "out of memory refining tiles" in caplog.text and "batches of 2 and 2" in caplog.text
    tiny_worker.oom_faults = 1
    with pytest.raises(torch.OutOfMemoryError):  # one tile cannot be split
        tiny_worker.refine(tiles[:1], latents[:1], scaffold, cond, settings)


def test_the_ledger_records_each_tasks_peak_memory_and_survives_an_injected_oom(small_spec, caplog, tmp_path):
    from farm.executor import prepare, run_local
    from farm.ledger import summary
    from farm.rundir import RunDir

    caplog.set_level(logging.WARNING, logger="pipeline.graph.worker")
    spec = replace(small_spec, width=256, height=256, steps=1, base_steps=1, cfg=1.0, upscaler="")
    run_dir = RunDir.create(tmp_path / "run", "oom-run", spec, tmp_path / "out.png")
    plan = prepare(spec, "cpu")
    run = run_local(plan, "cpu", faults=[("chess", 0, "oom")], record=run_dir.add)
    rows = RunDir.open(tmp_path / "run")[0].rows  # through the Parquet file
    assert "| peak memory |" in summary(run_dir) and " GiB |" in summary(run_dir)
    assert run.result.image.shape == (1, 3, 256, 256)
    tasks = [r for r in rows if r["kind"] == "task"]
    assert tasks and all(r["peak_memory"] > 2**20 for r in tasks)
    assert all(r["outcome"] == "ok" for r in tasks)
    assert "out of memory refining tiles [0, 2, 4, 6]" in caplog.text
