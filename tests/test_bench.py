"""The benchmarks run and report what they promise (structure only: timings are never asserted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from full_models import KNOWN_PARAMS, build_full_sdxl, component_class, meta_param_counts, read_config  # noqa: E402
from seam_metrics import (  # noqa: E402
    abutting_masks,
    band_core_error,
    band_core_ratio,
    edge_distance,
    error_map,
    error_profile,
    even_odd_ratio,
    grid_masks,
    texture_cv,
)
from seams import grid_boundaries, seam_ratio  # noqa: E402
from usdu_baseline import processing_size, tile_mask, usdu_refine, usdu_tiles  # noqa: E402

from pipeline.geometry.chess import chess_grid  # noqa: E402
from pipeline.sampling.chess_pass import RefineSettings  # noqa: E402
from pipeline.spec import TILINGS  # noqa: E402


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
    from pipeline.loading.models import load_diffusion_model

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


def smooth_noise(channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """[1, C, size, size] white noise blurred by a 3x3 box: statistically the same everywhere."""
    noise = torch.randn(1, channels, size + 2, size + 2, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(noise, 3, stride=1)


def test_seam_masks_split_a_chess_grid_into_bands_and_cores():
    grid = chess_grid(96, 96, 24)  # 5 x 5 tiles, stride 18, overlap 6
    masks = grid_masks(grid)
    assert torch.equal(masks.band | masks.core, torch.ones(96, 96, dtype=torch.bool))
    assert not (masks.band & masks.core).any()
    assert torch.equal(masks.even | masks.odd, masks.core) and not (masks.even & masks.odd).any()
    assert masks.band[:, 18:24].all() and not masks.band[30:36, 30:36].any()  # a column overlap; a core
    assert masks.even[0, 0] and masks.odd[0, 30] and masks.even[30, 30]
    assert edge_distance(8, [3]).tolist() == [2, 1, 0, 0, 1, 2, 3, 4]
    assert masks.distance[0, 17] == 0 and masks.distance[0, 18] == 0 and masks.distance[0, 8] == 9
    usdu = abutting_masks(64, 64, 32, 4)
    assert usdu.band[:, 28:36].all() and usdu.core[:28, :28].all() and usdu.even[0, 0] and usdu.odd[0, 40]


def test_band_core_ratio_sees_a_step_at_a_tile_edge_and_not_smooth_noise():
    grid = chess_grid(96, 96, 24)
    masks = grid_masks(grid)
    noise = smooth_noise(4, 96)
    assert band_core_ratio(noise, masks) == pytest.approx(1.0, abs=0.05)
    stepped = noise.clone()
    rows, cols = grid_boundaries(grid, 1)
    for row, col in zip(rows, cols, strict=True):  # a brightness step at every tile edge, as pasted tiles make
        stepped[..., row:, :] += 2 * noise.std()
        stepped[..., :, col:] += 2 * noise.std()
    assert band_core_ratio(stepped, masks) > 1.2
    one = noise.clone()
    one[..., :, 45:] += 2 * noise.std()  # the same step in a core (x 45 is 9 px from any edge) is no seam
    assert band_core_ratio(one, masks) < 1
    pixels = masks.upsample(8)
    assert pixels.band.shape == (768, 768) and pixels.distance[0, 18 * 8] == 0


def test_even_odd_ratio_sees_texture_that_differs_by_tile_parity():
    masks = grid_masks(chess_grid(96, 96, 24))
    noise = smooth_noise(4, 96, seed=1)
    assert even_odd_ratio(noise, masks) == pytest.approx(1.0, abs=0.05)
    louder = noise * (1 + 0.5 * masks.even)  # even tiles' cores refined "harder"
    assert even_odd_ratio(louder, masks) > 1.3


def test_texture_cv_sees_uneven_texture():
    noise = smooth_noise(3, 256)
    even = texture_cv(noise, 64)
    assert even < 0.05
    uneven = noise.clone()
    uneven[..., :128] *= 2  # half the image twice as textured
    assert texture_cv(uneven, 64) > 0.3 > 6 * even


def test_error_profile_bins_error_by_distance_to_a_tile_edge():
    masks = grid_masks(chess_grid(96, 96, 24))
    reference = smooth_noise(4, 96)
    tiled = reference + (masks.distance < 2) * 0.5  # wrong next to the edges only
    error = error_map(tiled, reference)
    assert error.shape == (96, 96)
    profile = error_profile(error, masks.distance, bins=(0, 2, 4))
    assert profile == pytest.approx([1.0, 0.0, 0.0])  # 0.5 on each of 4 channels: L2 = 1
    assert band_core_error(error, masks) > 1.2


def test_seams_bench_smoke_prints_every_mode_and_writes_the_strip(tiny_sdxl, tiny_upscaler, tmp_path, capsys):
    import seams

    results = seams.main(
        ["--geometries", "128x128/64", "--steps", "1", "--model", str(tiny_sdxl), "--upscaler", str(tiny_upscaler),
         "--out-dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    result = results["128x128-t64"]
    names = [row.name for row in result["rows"]]
    assert names == ["start", "reference", *TILINGS, "usdu"]
    for name in names:
        assert f"| {name} |" in out
    assert "| reference: untiled decode |" in out and "| blend: tiled decode (decode_canvas) |" in out
    ran = {row.name: row for row in result["rows"] if row.name in TILINGS}
    assert ran.keys() == set(TILINGS) and all(row.band_core_lat > 0 and row.work > 1 for row in ran.values())
    # each mode refines in its own way (the blended refine is a graph, not a chess stage)
    assert len({(row.band_core_lat, row.cv_lat) for row in ran.values()}) == len(TILINGS)
    reference = result["rows"][1]
    assert reference.work == 1.0 and reference.band_core_px > 0
    assert result["png"].exists() and result["png"].stat().st_size > 1000


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


def test_png_write_bench_compares_the_writers_on_the_same_pixels(capsys):
    import png_write

    png_write.main(["--sizes", "300", "--threads", "1,3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300 |")]
    assert [r.split(" | ")[1] for r in rows] == [
        "to 8 bits, whole image at once",
        "to 8 bits, in bands (to_rgb8)",
        "8-bit image to rows, in bands (to_rgb8)",
        "PNG, Pillow",
        "PNG, farm/png.py, 1 thread(s)",
        "PNG, farm/png.py, 3 thread(s)",
    ]
    assert all(r.endswith("| True |") for r in rows)  # the same pixels, and every file reads back as them


def test_inline_payloads_bench_times_each_size_at_each_limit(capsys):
    import inline_payloads

    inline_payloads.main(["--sizes", "64,1024", "--calls", "3"])
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 64 |") or line.startswith("| 1024 |")
    ]
    assert [(r[0], r[1]) for r in rows] == [
        ("| 64", "100 KiB (inline)"),
        ("| 64", "768 KiB (inline)"),
        ("| 64", "8192 KiB (inline)"),
        ("| 1024", "100 KiB (object store)"),
        ("| 1024", "768 KiB (object store)"),
        ("| 1024", "8192 KiB (inline)"),
    ]
    assert all(float(v.strip(" |")) > 0 for r in rows for v in r[2:])


def test_tile_overhead_reports_batch_1_and_4(tiny_sdxl, capsys):
    import tile_overhead

    rows = tile_overhead.main(
        ["--size", "512", "--tile", "128", "--steps", "1", "--repeat", "1", "--model", str(tiny_sdxl)]
    )
    assert [r["batch"] for r in rows] == [1, 4]
    assert [r["batches"] for r in rows] == [25, 7]
    assert "dispatch + slicing + compositing ms/tile" in capsys.readouterr().out


def test_flop_table_prices_every_worker_method():
    """The cached FLOP table (bench/configs/flops.json) gives every method the render calls a positive cost."""
    import flops

    table = flops.load_table()
    assert flops.fit_quadratic([1, 2, 3], [6, 11, 18]) == pytest.approx([3, 2, 1])  # 3 + 2n + n^2
    for key in ("unet", "vae_encoder", "vae_decoder", "upscaler_4x"):
        assert all(f > 0 for f in table[key]["flops"]) and abs(table[key]["check"]["error"]) < 1e-3, key
    assert table["unet_tile_128_cfg"] == pytest.approx(2 * flops.evaluate(table["unet"]["coeffs"], 128 * 128))
    # the cache is the architecture's count: ESRGAN is all convolutions, so FLOPs per input pixel are exact
    net = flops.build_upscaler()
    per_pixel = table["upscaler_4x"]["coeffs"][1]
    assert flops.counted(lambda: net(flops.meta(1, 3, 16, 16))) == pytest.approx(per_pixel * 256)
    latents, pixels = (1, 4, 128, 128), (1, 3, 1024, 1024)
    shapes = {"encode_prompt": (), "base": latents, "base_latents": latents, "refine": latents, "predict": latents,
              "upscale_tile": (1, 3, 512, 512), "encode": pixels, "encode_stats": pixels, "encode_tile": pixels,
              "detail": pixels, "decode": latents, "decode_stats": latents, "decode_tile": latents}  # fmt: skip
    for method, shape in shapes.items():
        assert flops.task_flops(method, shape, table, steps=2) > 0, method
    tile = flops.task_seconds("refine", (2, 4, 128, 128), 400, table, steps=20)
    assert tile == pytest.approx(2 * 20 * table["unet_tile_128_cfg"] / 400e12)
    assert flops.task_seconds("refine", latents, float("inf"), table) == 0
    with pytest.raises(ValueError, match="no FLOP model"):
        flops.task_flops("unknown", latents, table)


def test_whole_render_scaling_reports_every_actor_count(tmp_path, capsys):
    """The real render, executor and transport over simulated actors: a table row per actor count."""
    import scaling

    figures = scaling.main(
        ["--whole-render", "--sizes", "2048", "--actors", "1,2", "--steps", "1", "--base-steps", "1", "--tflops",
         "1e5", "--timeline-dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "| actors | wall s | speedup | speedup / N | Karp-Flatt e |" in out
    assert "| UNet per tile-step: 128x128 latents (1024 px), batch 2 (CFG pair) |" in out
    assert "dispatch overhead (1 actor, zero cost" in out and "Definitions:" in out
    assert "| actors | wall s | driver | actors | Ray | other | machine busy | busy in front |" in out
    results = figures["sizes"][2048]["results"]
    assert [m.actors for m in results] == [1, 2]
    for m in results:
        assert f"\n| {m.actors} | {m.wall:.2f} |" in out
        stages = {r["stage"] for r in m.tasks}
        assert {"base", "upscale", "encode", "blend", "decode"} <= stages
        assert {r["worker"] for r in m.tasks} == {f"actor {i}" for i in range(m.actors)}
        assert m.device_seconds > 0 and m.peak_rss > 0
        assert m.cpu["driver"] > 0 and m.cpu["actors"] > 0  # the actors unpack arguments and pack results
        assert set(m.phase_busy) == {"front", "refine", "tail"}
    plan = figures["sizes"][2048]["plan"]
    assert sum(r["stage"] == "blend" for r in results[0].tasks) == len(plan.grid.tiles)  # 1 step, batches of 1


def test_serial_fraction_measures():
    """Karp-Flatt, the Amdahl fit and the partly-idle sweep on walls and ledger rows with known answers."""
    from whole_render import amdahl_fit, busy_below, karp_flatt

    walls = {n: 100 * (0.1 + 0.9 / n) for n in (1, 2, 4, 8, 16)}  # Amdahl's law with s = 0.1
    assert amdahl_fit(walls) == pytest.approx(0.1)
    assert karp_flatt(walls[1] / walls[8], 8) == pytest.approx(0.1)
    assert karp_flatt(1.0, 1) is None and karp_flatt(2.0, 2) == pytest.approx(0)
    rows = [{"start": 0.0, "end": 2.0}, {"start": 1.0, "end": 3.0}]
    assert busy_below(rows, 2, 0.0, 4.0) == pytest.approx(3.0)  # both busy only in [1, 2]
    assert busy_below(rows, 1, 0.0, 4.0) == pytest.approx(1.0)  # none busy in [3, 4]


def test_busy_share_of_the_cores_per_render_phase():
    """The CPU sampler's busy share between samples, and a render's phases from its ledger rows."""
    from whole_render import CpuSampler, render_phases

    cores = os.cpu_count() or 1
    sampler = CpuSampler()
    busy = [{"driver": 0.0}, {"driver": 0.25 * cores, "actors": 0.25 * cores}, {"driver": 0.5 * cores, "actors": cores}]
    sampler.samples = list(zip((0.0, 1.0, 2.0), busy, strict=True))  # half the cores busy, then all
    assert sampler.busy(0.0, 1.0) == pytest.approx(0.5) and sampler.busy(1.0, 2.0) == pytest.approx(1.0)
    assert sampler.busy(0.5, 1.5) == pytest.approx(0.75)  # from the samples around the span
    assert sampler.busy(-1.0, 1.0) is None and sampler.busy(1.0, 3.0) is None
    assert sampler.total() == pytest.approx({"driver": 0.5 * cores, "actors": cores})
    rows = [
        {"stage": "base", "start": 0.0, "end": 2.0},
        {"stage": "encode", "start": 2.0, "end": 3.5},
        {"stage": "blend", "start": 3.0, "end": 5.0},
        {"stage": "blend", "start": 4.0, "end": 6.0},
        {"stage": "decode", "start": 5.5, "end": 7.0},
    ]
    assert render_phases(rows, 8.0) == {"front": (2.0, 3.0), "refine": (3.0, 6.0), "tail": (6.0, 8.0)}
    assert render_phases(rows[:2], 8.0) == {}
    chess = [rows[0], {"stage": "chess", "start": 2.5, "end": 4.0}]  # the chess passes' ledger stage
    assert render_phases(chess, 5.0) == {"front": (2.0, 2.5), "refine": (2.5, 4.0), "tail": (4.0, 5.0)}
