"""Single-file SDXL checkpoints load with no config folder and no network, bit-equal to their folder form."""

from __future__ import annotations

import pytest
import torch
from conftest import block_hub
from ldm_layout import sdxl_pipeline_to_checkpoint
from safetensors.torch import save_file

from farm.tiny_models import build_tiny_sdxl
from pipeline.loading.model_file import inspect_file
from pipeline.loading.models import inspect_diffusion_model, load_diffusion_model

CPU = torch.device("cpu")


def config_of(model) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


def realign(*pipes) -> None:
    """Give every weight a fresh allocation: CPU GEMM results differ in the last bits with the weights'
    address alignment, and safetensors leaves tensors at whatever offset the file put them."""
    for pipe in pipes:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for param in getattr(pipe, name).parameters():
                param.data = param.data.clone()


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """(the tiny SDXL folder built by the release's rules, the same weights as one SGM-layout .safetensors)."""
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("single-file")
    folder = build_tiny_sdxl(root / "tiny-sdxl", seed=3, release_rules=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    file = root / "tinyXL.safetensors"
    save_file(sdxl_pipeline_to_checkpoint(pipe), str(file))
    return folder, file


def test_classified_as_sdxl_base(sdxl_pair):
    _, file = sdxl_pair
    kind = inspect_file(file)
    assert (kind.kind, kind.variant, kind.prediction) == ("sdxl", "base", "epsilon")
    info = inspect_diffusion_model(file)
    assert (info.family, info.single_file, info.latent_channels) == ("sdxl", True, 4)


@pytest.fixture(scope="module")
def loaded(sdxl_pair):
    """(the single file loaded with no config and the hub unreachable, its folder form loaded the usual way)."""
    folder, file = sdxl_pair
    with pytest.MonkeyPatch.context() as patch:
        block_hub(patch)
        single = load_diffusion_model(file, CPU, torch.float32).pipe
        reference = load_diffusion_model(folder, CPU, torch.float32).pipe
    return single, reference


def test_loads_with_no_config_bit_equal_to_the_folder(loaded):
    single, reference = loaded
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{name}.{key}"
    for name in ("unet", "vae"):  # the configs read from the header are the folder's, field by field
        assert config_of(getattr(single, name)) == config_of(getattr(reference, name)), name
    assert single.scheduler.config.prediction_type == "epsilon"
    assert single.scheduler.config.timestep_spacing == "leading"


def test_single_file_computes_what_the_folder_computes(loaded):
    single, reference = loaded
    realign(single, reference)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        a = single.unet(latents, 500, text, added_cond_kwargs=added).sample
        b = reference.unet(latents, 500, text, added_cond_kwargs=added).sample
        assert torch.equal(a, b)
        assert torch.equal(single.vae.decode(latents).sample, reference.vae.decode(latents).sample)
        embeds = single.encode_prompt("a lighthouse, at dawn", do_classifier_free_guidance=True, negative_prompt="fog")
        expected = reference.encode_prompt(
            "a lighthouse, at dawn", do_classifier_free_guidance=True, negative_prompt="fog"
        )
    for mine, theirs in zip(embeds, expected, strict=True):
        assert torch.equal(mine, theirs)


def test_v_prediction_markers_set_the_scheduler(sdxl_pair, tmp_path, no_network):
    from safetensors.torch import load_file

    _, file = sdxl_pair
    state = load_file(str(file)) | {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    vpred = tmp_path / "vpred.safetensors"
    save_file(state, str(vpred))
    scheduler = load_diffusion_model(vpred, CPU, torch.float32).pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True
    from pipeline.sampling.schedule import make_scheduler

    for sampler in ("dpmpp_2m_karras", "euler"):  # the render's own samplers keep both
        mine = make_scheduler(sampler, dict(scheduler.config))
        assert mine.config.prediction_type == "v_prediction" and float(mine.alphas_cumprod[-1]) < 1e-6


def test_cli_renders_from_the_single_file_offline(sdxl_pair, tmp_path, no_network):
    from PIL import Image

    from farm.cli import main

    _, file = sdxl_pair
    out = tmp_path / "single.png"
    args = ["render", "--model", str(file), "--prompt", "a castle", "--workflow", "two-pass", "--seed", "2"]
    args += ["--base-size", "64x64", "--size", "128x128", "--pixel-upscale", "1", "--tile", "128"]
    args += ["--steps", "1", "--base-steps", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    with Image.open(out) as image:
        assert image.size == (128, 128)


def test_full_size_sdxl_header_gives_the_released_configs():
    """SDXL's released sizes, built on the meta device and renamed to the checkpoint layout, read back exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm_layout import clip_g_to_openclip, unet_to_ldm, vae_to_ldm
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from pipeline.loading.single_file_configs import clip_config, sdxl_unet_config, vae_config

    released_unet = dict(
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20],
        cross_attention_dim=2048,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        layers_per_block=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        sample_size=128,
    )
    released_vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)
    released_vae |= dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    released_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
    released_g |= dict(projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**released_unet)
        vae = AutoencoderKL(**released_vae)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**released_g))
    up_attention = [t.startswith("CrossAttn") for t in released_unet["up_block_types"]]
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}  # noqa: E731
    unet_shapes = shapes(unet_to_ldm(unet.state_dict(), 2, up_attention))
    assert sdxl_unet_config(unet_shapes, pooled_dim=1280) | released_unet == sdxl_unet_config(unet_shapes, 1280)
    vae_found = vae_config(shapes(vae_to_ldm(vae.state_dict(), 4)), "sdxl")
    assert vae_found | released_vae == vae_found and vae_found["scaling_factor"] == 0.13025
    g_found = clip_config(shapes(clip_g_to_openclip(clip_g.state_dict())), "openclip", big=True)
    assert g_found | released_g == g_found
