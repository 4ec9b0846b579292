"""LoRA files loaded through our loader and fused into the weights: the arithmetic, and the mismatches."""

import pytest
import torch
from conftest import CLIP_STEMS, lora_delta, make_lora

from pipeline.errors import ModelFileError
from pipeline.loading.models import load_diffusion_model

CPU = torch.device("cpu")
SDXL_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a tiny-UNet layer (64 -> 64)
SDXL_STEM = "lora_unet_" + SDXL_Q.replace(".", "_")
FLUX_PROJ = "transformer_blocks.0.attn.to_out.0"  # kohya: lora_unet_double_blocks_0_img_attn_proj
CLIP_Q = "encoder.layers.0.self_attn.q_proj"


def _weight(module, name: str) -> torch.Tensor:
    return module.get_submodule(name).weight.detach()


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "sdxl-lora.safetensors"
    return make_lora(path, {SDXL_STEM: (64, 64)} | dict.fromkeys(CLIP_STEMS, (32, 32)), rank=4, alpha=2.0, seed=1)


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_sdxl_lora_fuses_base_plus_strength_times_delta(tiny_sdxl, tiny_model, sdxl_lora, strength):
    model = load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(sdxl_lora, strength, 0.0)])
    expected = _weight(tiny_model.pipe.unet, SDXL_Q) + strength * lora_delta(sdxl_lora, SDXL_STEM)
    assert (_weight(model.pipe.unet, SDXL_Q) - expected).abs().max() < 1e-6
    # fused, not attached: the layer is a plain Linear again, so sampling costs nothing extra
    assert type(model.pipe.unet.get_submodule(SDXL_Q)) is torch.nn.Linear
    # text strength 0 leaves every text encoder weight as it was
    for name in ("text_encoder", "text_encoder_2"):
        before, after = getattr(tiny_model.pipe, name).state_dict(), getattr(model.pipe, name).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_text_strength_applies_to_the_text_encoder_alone(tiny_sdxl, tiny_model, sdxl_lora):
    model = load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(sdxl_lora, 0.0, 0.7)])
    assert torch.equal(_weight(model.pipe.unet, SDXL_Q), _weight(tiny_model.pipe.unet, SDXL_Q))
    expected = _weight(tiny_model.pipe.text_encoder, CLIP_Q) + 0.7 * lora_delta(sdxl_lora, CLIP_STEMS[0])
    assert (_weight(model.pipe.text_encoder, CLIP_Q) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_flux_lora_fuses_into_the_transformer(tiny_flux, tiny_flux_model, flux_lora, strength):
    model = load_diffusion_model(tiny_flux, CPU, torch.float32, loras=[(flux_lora, strength, 0.25)])
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    expected = _weight(tiny_flux_model.pipe.transformer, FLUX_PROJ) + strength * lora_delta(flux_lora, stem)
    assert (_weight(model.pipe.transformer, FLUX_PROJ) - expected).abs().max() < 1e-6
    expected = _weight(tiny_flux_model.pipe.text_encoder, CLIP_Q) + 0.25 * lora_delta(flux_lora, CLIP_STEMS[0])
    assert (_weight(model.pipe.text_encoder, CLIP_Q) - expected).abs().max() < 1e-6
    t5_before, t5_after = tiny_flux_model.pipe.text_encoder_2.state_dict(), model.pipe.text_encoder_2.state_dict()
    assert all(torch.equal(t5_before[k], t5_after[k]) for k in t5_before)


def test_sdxl_lora_on_flux_is_refused_naming_file_and_model(tiny_flux, sdxl_lora):
    with pytest.raises(ModelFileError, match="does not fit the FLUX model") as err:
        load_diffusion_model(tiny_flux, CPU, torch.float32, loras=[(sdxl_lora, 1.0, 1.0)])
    assert str(sdxl_lora) in str(err.value) and str(tiny_flux) in str(err.value)


def test_flux_lora_on_sdxl_is_refused(tiny_sdxl, flux_lora):
    with pytest.raises(ModelFileError, match=f"LoRA {flux_lora} does not fit the SDXL model {tiny_sdxl}"):
        load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(flux_lora, 1.0, 1.0)])


def test_lora_with_wrong_shapes_is_refused(tiny_sdxl, tmp_path):
    wrong = make_lora(tmp_path / "sd15.safetensors", {SDXL_STEM: (64, 48)})  # a narrower model's layer
    with pytest.raises(ModelFileError, match="does not fit the SDXL model"):
        load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(wrong, 1.0, 1.0)])


def test_lora_for_layers_this_model_lacks_is_refused(tiny_sdxl, tmp_path):
    stems = {SDXL_STEM: (64, 64), "lora_unet_down_blocks_3_attentions_1_transformer_blocks_9_attn1_to_q": (64, 64)}
    extra = make_lora(tmp_path / "bigger.safetensors", stems)
    with pytest.raises(ModelFileError, match="does not fit the SDXL model"):
        load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(extra, 1.0, 1.0)])


def test_lora_must_be_safetensors(tiny_sdxl, tmp_path):
    pickled = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ModelFileError, match="not .safetensors"):
        load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(pickled, 1.0, 1.0)])
    with pytest.raises(ModelFileError, match="does not exist"):
        load_diffusion_model(tiny_sdxl, CPU, torch.float32, loras=[(tmp_path / "nope.safetensors", 1.0, 1.0)])
