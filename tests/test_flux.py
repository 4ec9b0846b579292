"""Flux: our sampler against diffusers' own Flux pipelines, loading, the /16 rule and renders end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline
from PIL import Image

from farm.cli import main
from farm.executor import prepare, run_local
from farm.tiny_models import ensure_tiny_flux
from pipeline.errors import ModelFileError, SpecError
from pipeline.geometry.chess import chess_grid
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.loading.models import inspect_diffusion_model, load_diffusion_model
from pipeline.plan import make_plan
from pipeline.sampling import vae
from pipeline.sampling.chess_pass import RefineSettings, crops, refine_tiles, tile_noise
from pipeline.sampling.flux import FluxDenoiser, pack, unpack
from pipeline.sampling.sampler import generate, refine
from pipeline.sampling.schedule import schedule_length
from pipeline.spec import RenderSpec

CPU = torch.device("cpu")


def _pipe(cls, model):
    pipe = cls(**model.pipe.components)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.denoiser.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pack_and_unpack_are_inverse_2x2_patches():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(tokens[0, 0], x[0, :, :2, :2].reshape(-1))  # token 0 is the top-left patch
    assert torch.equal(unpack(tokens, 6, 10), x)


def test_base_generation_equals_diffusers_flux_txt2img_from_pooled_scaffold(tiny_flux_model):
    model = tiny_flux_model
    cond = model.encode_prompt("a red fox", "", cfg=2.2)
    native = pool_noise(make_scaffold(11, 16, 64, 64), 2)  # 32x32 latents = 256 px
    ours = generate(model.denoiser, native, cond, 2.2, 3, "flow_euler")
    theirs = _pipe(FluxPipeline, model)(
        prompt="a red fox",
        latents=pack(native),
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=2.2,
        output_type="latent",
    ).images
    assert ours.shape == (1, 16, 32, 32)
    assert (pack(ours) - theirs).abs().max().item() <= 1e-4
    # decoding undoes Flux's VAE shift and scale as FluxPipeline does: z = x / scaling + shift
    pixels = _pipe(FluxPipeline, model)(
        prompt="a red fox",
        latents=pack(native),
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=2.2,
        output_type="pt",
    ).images
    assert (vae.decode(model.vae, ours, tiled=False) - pixels).abs().max().item() <= 1e-4


def test_whole_canvas_tile_equals_diffusers_flux_img2img(tiny_flux_model):
    model = tiny_flux_model
    cond = model.encode_prompt("a red fox", "", cfg=2.2)
    canvas = torch.randn(1, 16, 24, 32, generator=torch.Generator().manual_seed(1))
    scaffold = torch.randn(1, 16, 24, 32, generator=torch.Generator().manual_seed(2))
    grid = chess_grid(24, 32, 32)
    assert len(grid.tiles) == 1
    settings = RefineSettings(cfg=2.2, steps=3, denoise=0.5, sampler="auto")
    tiles = grid.tiles
    ours = refine_tiles(model.denoiser, cond, settings, tiles, crops(canvas, tiles), tile_noise(scaffold, tiles))[0]

    # the pipeline draws its noise from this generator: the same draw as our scaffold above
    theirs = _pipe(FluxImg2ImgPipeline, model)(
        prompt="a red fox",
        image=canvas,
        strength=0.5,
        num_inference_steps=schedule_length(3, 0.5),
        guidance_scale=2.2,
        generator=torch.Generator().manual_seed(2),
        height=24 * 8,
        width=32 * 8,
        output_type="latent",
    ).images
    assert (pack(ours) - theirs).abs().max().item() <= 1e-4
    assert (ours - canvas).abs().mean() > 0.01  # it did refine


def test_guidance_changes_the_result_and_costs_no_extra_call(tiny_flux_model):
    den = tiny_flux_model.denoiser
    cond = tiny_flux_model.encode_prompt("x", "ignored", cfg=3.0)
    assert cond.negative_embeds is None  # guidance is embedded: no negative pass
    latents, noise = torch.zeros(2, 16, 8, 8), torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    den.clock = lambda name: _Count(calls)
    try:
        low = refine(den, latents, noise, cond, 1.0, 4, 0.5, "auto")
        high = refine(den, latents, noise, cond, 4.0, 4, 0.5, "flow_euler")
    finally:
        den.clock = None
    assert len(calls) == 8
    assert (low - high).abs().max() > 1e-4


class _Count:
    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        self.calls.append(1)

    def __exit__(self, *exc):
        return False


def test_batched_flux_tiles_match_tiles_refined_alone(tiny_flux_model):
    cond = tiny_flux_model.encode_prompt("a red fox", "", cfg=2.0)
    canvas = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(4))
    scaffold = make_scaffold(9, 16, 32, 32)
    grid = chess_grid(32, 32, 16)
    settings = RefineSettings(2.0, 2, 0.5, "flow_euler")

    def run(tiles):
        return refine_tiles(
            tiny_flux_model.denoiser, cond, settings, tiles, crops(canvas, tiles), tile_noise(scaffold, tiles)
        )

    together = run(grid.even[:3])
    for tile in grid.even[:3]:
        assert (run((tile,))[tile.id] - together[tile.id]).abs().max() < 1e-4


def test_a_sampler_of_the_other_family_is_refused(tiny_flux_model, tiny_model):
    cond = tiny_flux_model.encode_prompt("x", "", cfg=1.0)
    with pytest.raises(SpecError, match="'euler' is a SDXL sampler.*flow_euler"):
        generate(tiny_flux_model.denoiser, torch.randn(1, 16, 8, 8), cond, 1.0, 1, "euler")
    with pytest.raises(SpecError, match="'flow_euler' is a FLUX sampler.*dpmpp_2m_karras"):
        generate(tiny_model.denoiser, torch.randn(1, 4, 8, 8), cond, 1.0, 1, "flow_euler")


def test_inspect_reads_flux_facts(tiny_flux, tiny_flux_model):
    info = inspect_diffusion_model(tiny_flux)
    assert (info.family, info.latent_channels, info.vae_factor, info.size_multiple) == ("flux", 16, 8, 16)
    assert info.native_px == 256  # the tiny VAE's sample_size
    assert isinstance(tiny_flux_model.denoiser, FluxDenoiser)
    assert tiny_flux_model.vae.config.shift_factor == pytest.approx(0.1159)


def test_flux_single_file_loads_with_a_config_folder(tiny_flux, tiny_flux_model, tmp_path):
    from safetensors.torch import save_file

    single = tmp_path / "flux-transformer.safetensors"
    state = tiny_flux_model.pipe.transformer.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    info = inspect_diffusion_model(single)
    assert (info.family, info.single_file, info.size_multiple) == ("flux", True, 16)
    with pytest.raises(ModelFileError, match="--model-config.*FluxPipeline"):
        load_diffusion_model(single, CPU, torch.float32)
    loaded = load_diffusion_model(single, CPU, torch.float32, config=tiny_flux)
    for name, value in loaded.pipe.transformer.state_dict().items():
        assert torch.equal(value, state[name])


def test_tiny_flux_is_built_once_and_cached(tmp_path):
    model = ensure_tiny_flux(tmp_path)
    built = (model / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_flux(tmp_path) == model and (model / "model_index.json").stat().st_mtime_ns == built
    assert inspect_diffusion_model(model).family == "flux"


def test_flux_fill_style_folder_is_refused(tiny_flux, tmp_path):
    copy = shutil.copytree(tiny_flux, tmp_path / "fill")
    cfg_file = copy / "transformer" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"in_channels": 384}))
    with pytest.raises(ModelFileError, match="384 input channels"):
        inspect_diffusion_model(copy)


@pytest.fixture(scope="module")
def flux_spec(tiny_flux, tiny_upscaler):
    """A 512 px Flux top-down render from a 256 px base (k = 2): 3 x 3 chess tiles of 256 px."""
    return RenderSpec(
        model=str(tiny_flux),
        upscaler=str(tiny_upscaler),
        prompt="a lighthouse at dawn",
        width=512,
        height=512,
        seed=7,
        steps=2,
        base_steps=2,
        cfg=2.2,
        denoise=0.3,
        tile=256,
        upscale_tile=128,
    )


def test_flux_sizes_must_be_multiples_of_16(flux_spec, tiny_flux):
    info = inspect_diffusion_model(tiny_flux)
    for change, name in (({"width": 520}, "width 520"), ({"tile": 200}, "tile 200"), ({"native": 264}, "native")):
        spec = RenderSpec(**(flux_spec.to_dict() | change)).validate()
        with pytest.raises(SpecError, match=f"{name}.* multiple of 16 for FLUX.*try"):
            make_plan(spec, info)
    with pytest.raises(SpecError, match="try 512 or 528"):
        make_plan(RenderSpec(**(flux_spec.to_dict() | {"width": 520})), info)


def test_flux_base_keeps_whole_patches():
    from pipeline.plan import native_factor

    # 1088 px = 136 latents: k = 8 would give 17-latent sides, which 2x2 patches cannot tile
    assert native_factor(136, 136, 17) == 8
    k = native_factor(136, 136, 17, multiple=2)
    assert k == 4 and (136 // k) % 2 == 0


def test_flux_render_is_deterministic_and_sized(flux_spec):
    plan = prepare(flux_spec)
    assert plan.k == 2 and plan.model.family == "flux"
    assert "flow_euler" in plan.describe() and "transformer calls" in plan.describe()
    first = run_local(plan)
    assert first.result.canvas.shape == (1, 16, 64, 64)
    assert first.result.image.shape == (1, 3, 512, 512)
    second = run_local(prepare(flux_spec))
    assert torch.equal(first.result.image, second.result.image)


def test_cli_renders_flux_with_a_lora(tiny_flux, flux_lora, tmp_path):
    out = tmp_path / "flux.png"
    args = ["render", "--model", str(tiny_flux), "--prompt", "a castle", "--size", "512x256", "--seed", "3"]
    args += ["--steps", "1", "--base-steps", "2", "--cfg", "2.2", "--denoise", "0.3", "--tile", "256"]
    args += ["--lora", str(flux_lora), "--lora-strength", "0.5", "--lora-text-strength", "0.5"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    with Image.open(out) as image:
        assert image.size == (512, 256)
        spec = json.loads(image.info["tilefarm"])["spec"]
        pixels = np.asarray(image.convert("RGB"))
    assert spec["lora"] == str(flux_lora) and spec["lora_strength"] == 0.5 and spec["sampler"] == "auto"
    assert pixels.std() > 1
