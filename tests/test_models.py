"""Model loading through our loaders: real files, real formats, and the ways they go wrong."""

import json
import shutil

import pytest
import torch

from farm.tiny_models import build_tiny_upscaler
from pipeline.errors import ModelFileError
from pipeline.loading.models import inspect_diffusion_model, load_diffusion_model, load_upscaler, read_state_dict

CPU = torch.device("cpu")


def test_inspect_reads_facts_without_weights(tiny_sdxl):
    info = inspect_diffusion_model(tiny_sdxl)
    assert (info.family, info.latent_channels, info.vae_factor, info.native_px) == ("sdxl", 4, 8, 256)
    assert not info.single_file


def test_diffusers_folder_loads_with_components(tiny_model):
    assert tiny_model.info.family == "sdxl"
    assert tiny_model.denoiser.vae_factor == 8
    cond = tiny_model.encode_prompt("a fox", "", cfg=5.0)
    assert cond.embeds.shape == cond.negative_embeds.shape
    assert cond.embeds.shape[-1] == tiny_model.pipe.unet.config.cross_attention_dim


def test_upscaler_from_safetensors(tiny_upscaler):
    up = load_upscaler(tiny_upscaler, CPU)
    assert up.scale == 4 and up.architecture
    out = up.descriptor(torch.rand(1, 3, 16, 24))
    assert out.shape == (1, 3, 64, 96)


def test_upscaler_from_plain_pth_goes_through_restricted_unpickler(tiny_upscaler, tmp_path):
    from safetensors.torch import load_file

    pth = tmp_path / "compact.pth"
    torch.save({"params": load_file(str(tiny_upscaler))}, pth)
    up = load_upscaler(pth, CPU)
    assert up.scale == 4


def test_pickle_holding_code_is_refused_and_never_run(evil_pickle):
    evil, marker = evil_pickle
    with pytest.raises(ModelFileError, match="could run code") as err:
        load_upscaler(evil, CPU)
    assert str(evil) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a model at all", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'])
def test_corrupt_safetensors_upscaler_is_named(tmp_path, content):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a readable .safetensors") as err:
        load_upscaler(bad, CPU)
    assert str(bad) in str(err.value)


def test_truncated_weights_inside_a_model_folder_are_named(tiny_sdxl, tmp_path):
    copy = shutil.copytree(tiny_sdxl, tmp_path / "model")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError) as err:
        load_diffusion_model(copy, CPU, torch.float32)
    assert str(weights) in str(err.value)


def test_missing_and_wrong_model_paths(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        inspect_diffusion_model(tmp_path / "nope")
    with pytest.raises(ModelFileError, match="no model_index.json"):
        inspect_diffusion_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelFileError, match="StableDiffusion3Pipeline.*SDXL.*Flux"):
        inspect_diffusion_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelFileError, match="FluxPipeline.*unreadable config"):
        inspect_diffusion_model(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="safetensors"):
        inspect_diffusion_model(ckpt)


def test_single_file_checkpoint_without_its_vae_is_named(tmp_path):
    from safetensors.torch import save_file

    # the family is read from the tensor names: SGM-layout UNet keys with a text_time embedding make it SDXL
    single = tmp_path / "sdxl.safetensors"
    unet = {"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "label_emb.0.0.weight": torch.zeros(8, 8)}
    save_file({"model.diffusion_model." + k: v for k, v in unet.items()}, str(single))
    info = inspect_diffusion_model(single)
    assert info.single_file and (info.family, info.size_multiple) == ("sdxl", 8)
    with pytest.raises(ModelFileError, match="sdxl.safetensors looks like an SDXL checkpoint but holds no VAE"):
        load_diffusion_model(single, CPU, torch.float32)


def test_a_safetensors_that_is_no_diffusion_model_is_named(tiny_upscaler):
    with pytest.raises(ModelFileError, match="neither an SDXL nor a Flux checkpoint") as err:
        inspect_diffusion_model(tiny_upscaler)
    assert str(tiny_upscaler) in str(err.value)


def test_unknown_upscaler_architecture(tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(3, 3)}, str(odd))
    with pytest.raises(ModelFileError, match="not an architecture spandrel knows"):
        load_upscaler(odd, CPU)


def test_state_dict_reader_rejects_unknown_extensions(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown extension"):
        read_state_dict(f)


def test_two_x_upscaler(tmp_path):
    up = load_upscaler(build_tiny_upscaler(tmp_path / "c2.safetensors", scale=2), CPU)
    assert up.scale == 2
