"""Our sampler against diffusers' own SDXL pipelines, and what steps/denoise mean."""

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from pipeline.geometry.chess import chess_grid
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.sampling.chess_pass import RefineSettings, crops, refine_tiles, tile_noise
from pipeline.sampling.sampler import generate, refine
from pipeline.sampling.schedule import make_scheduler, refine_schedule, schedule_length


def refine_batch(denoiser, cond, settings, tiles, canvas, scaffold):
    return refine_tiles(denoiser, cond, settings, tiles, crops(canvas, tiles), tile_noise(scaffold, tiles))


def _pipe(cls, tiny_model, sampler):
    pipe = cls(**tiny_model.pipe.components)
    pipe.scheduler = make_scheduler(sampler, tiny_model.denoiser.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler"])
def test_whole_canvas_tile_equals_diffusers_img2img(tiny_model, sampler):
    cond = tiny_model.encode_prompt("a red fox", "blurry", cfg=4.0)
    canvas = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(1))
    scaffold = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(2))
    grid = chess_grid(32, 40, 40)  # one tile covering the whole canvas
    assert len(grid.tiles) == 1
    settings = RefineSettings(cfg=4.0, steps=3, denoise=0.5, sampler=sampler)
    ours = refine_batch(tiny_model.denoiser, cond, settings, grid.tiles, canvas, scaffold)[0]

    pipe = _pipe(StableDiffusionXLImg2ImgPipeline, tiny_model, sampler)
    # the pipeline draws its noise from this generator: the same draw as our scaffold above
    theirs = pipe(
        prompt="a red fox",
        negative_prompt="blurry",
        image=canvas,
        strength=0.5,
        num_inference_steps=schedule_length(3, 0.5),
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (1, 4, 32, 40)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - canvas).abs().mean() > 0.01  # it did refine


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler"])
def test_base_generation_equals_diffusers_txt2img_from_pooled_scaffold(tiny_model, sampler):
    cond = tiny_model.encode_prompt("a red fox", "", cfg=5.0)
    native = pool_noise(make_scaffold(11, 4, 128, 128), 4)
    ours = generate(tiny_model.denoiser, native, cond, 5.0, 4, sampler)
    pipe = _pipe(StableDiffusionXLPipeline, tiny_model, sampler)
    theirs = pipe(
        prompt="a red fox",
        negative_prompt="",
        latents=native,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=256,
        width=256,
        output_type="latent",
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_steps_are_the_steps_that_run_and_denoise_picks_the_start_sigma(tiny_model):
    config = tiny_model.denoiser.scheduler_config
    for sampler in ("dpmpp_2m_karras", "euler"):
        scheduler = make_scheduler(sampler, config)
        schedule = refine_schedule(scheduler, steps=6, denoise=0.3)
        assert schedule.length == 20 and len(schedule.timesteps) == 6
        assert schedule.start_sigma == pytest.approx(float(scheduler.sigmas[14]))
        full = refine_schedule(make_scheduler(sampler, config), steps=6, denoise=1.0)
        assert full.start_sigma > schedule.start_sigma
    # the same denoise starts lower under Karras sigmas than under the uniform schedule
    karras = refine_schedule(make_scheduler("dpmpp_2m_karras", config), 6, 0.3).start_sigma
    uniform = refine_schedule(make_scheduler("euler", config), 6, 0.3).start_sigma
    assert karras < uniform


def test_refine_counts_model_calls(tiny_model):
    calls = []
    tiny_model.denoiser.clock = lambda name: _Count(calls)
    try:
        cond = tiny_model.encode_prompt("x", "", cfg=1.0)
        latents = torch.zeros(2, 4, 16, 16)
        refine(tiny_model.denoiser, latents, torch.randn(2, 4, 16, 16), cond, 1.0, 5, 0.4, "euler")
    finally:
        tiny_model.denoiser.clock = None
    assert len(calls) == 5


class _Count:
    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        self.calls.append(1)

    def __exit__(self, *exc):
        return False


def test_bad_steps_or_denoise_are_refused(tiny_model):
    scheduler = make_scheduler("euler", tiny_model.denoiser.scheduler_config)
    for steps, denoise in ((0, 0.5), (4, 0.0), (4, 1.5)):
        with pytest.raises(ValueError):
            refine_schedule(scheduler, steps, denoise)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("ddim_magic", {})


def test_batched_tiles_match_tiles_refined_alone(tiny_model):
    cond = tiny_model.encode_prompt("a red fox", "blurry", cfg=3.0)
    canvas = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(4))
    scaffold = make_scaffold(9, 4, 48, 48)
    grid = chess_grid(48, 48, 16)
    settings = RefineSettings(3.0, 2, 0.5, "dpmpp_2m_karras")
    together = refine_batch(tiny_model.denoiser, cond, settings, grid.even[:4], canvas, scaffold)
    for tile in grid.even[:4]:
        alone = refine_batch(tiny_model.denoiser, cond, settings, (tile,), canvas, scaffold)[tile.id]
        assert (alone - together[tile.id]).abs().max() < 1e-4


def test_a_held_mask_is_a_lower_denoise_there_and_nothing_elsewhere(tiny_model):
    from pipeline.sampling.conditioning import Hold
    from pipeline.sampling.schedule import held_steps

    g = torch.Generator().manual_seed(4)
    latents, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    cond = tiny_model.encode_prompt("a cat", "", 1.0)
    den = tiny_model.denoiser
    plain = refine(den, latents, noise, cond, 1.0, 4, 0.5, "euler")
    zero = refine(den, latents, noise, cond, 1.0, 4, 0.5, "euler", Hold(torch.zeros(2, 1, 16, 16), 2))
    assert torch.equal(zero, plain)
    # held everywhere for held_steps(4, 0.5, 0.25) = 2 steps: the last 2 steps of the same 8-step schedule
    assert held_steps(4, 0.5, 0.25) == 2
    held = refine(den, latents, noise, cond, 1.0, 4, 0.5, "euler", Hold(torch.ones(2, 1, 16, 16), 2))
    lower = refine(den, latents, noise, cond, 1.0, 2, 0.25, "euler")
    assert torch.allclose(held, lower, atol=1e-5)
    # a half mask is neither
    half = torch.zeros(2, 1, 16, 16)
    half[..., :8] = 1
    mixed = refine(den, latents, noise, cond, 1.0, 4, 0.5, "euler", Hold(half, 2))
    assert not torch.equal(mixed, plain) and not torch.equal(mixed, lower)
