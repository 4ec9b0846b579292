"""Single-file SDXL checkpoints load with no config folder and no network, bit-equal to their folder form."""

from __future__ import annotations

import pytest
import torch
from ldm_layout import sdxl_pipeline_to_checkpoint
from safetensors.torch import save_file

from farm.tiny_models import build_tiny_sdxl
from pipeline.model_file import inspect_file
from pipeline.models import inspect_diffusion_model, load_diffusion_model

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


@pytest.fixture
def no_network(monkeypatch):
    """The hub is unreachable and any attempt to use it fails the test loudly."""
    import diffusers.loaders.single_file as dsf
    import diffusers.utils.hub_utils as dhub
    import huggingface_hub
    import huggingface_hub.utils._http as hf_http

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for module, name in [
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub, "snapshot_download"),
        (dsf, "snapshot_download"),
        (dhub, "hf_hub_download"),
        (dhub, "snapshot_download"),
        (hf_http, "get_session"),
        (hf_http, "http_backoff"),
    ]:
        monkeypatch.setattr(module, name, refuse)


def test_classified_as_sdxl_base(sdxl_pair):
    _, file = sdxl_pair
    kind = inspect_file(file)
    assert (kind.kind, kind.variant, kind.prediction) == ("sdxl", "base", "epsilon")
    info = inspect_diffusion_model(file)
    assert (info.family, info.single_file, info.latent_channels) == ("sdxl", True, 4)


def test_loads_with_no_config_bit_equal_to_the_folder(sdxl_pair, no_network):
    folder, file = sdxl_pair
    single = load_diffusion_model(file, CPU, torch.float32).pipe
    torch.manual_seed(0)  # the folder load must not depend on the hub either
    reference = load_diffusion_model(folder, CPU, torch.float32).pipe
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{name}.{key}"
    for name in ("unet", "vae"):  # the configs read from the header are the folder's, field by field
        assert config_of(getattr(single, name)) == config_of(getattr(reference, name)), name
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
    assert single.scheduler.config.prediction_type == "epsilon"
    assert single.scheduler.config.timestep_spacing == "leading"


def test_v_prediction_markers_set_the_scheduler(sdxl_pair, tmp_path, no_network):
    from safetensors.torch import load_file

    _, file = sdxl_pair
    state = load_file(str(file)) | {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    vpred = tmp_path / "vpred.safetensors"
    save_file(state, str(vpred))
    scheduler = load_diffusion_model(vpred, CPU, torch.float32).pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is True


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
