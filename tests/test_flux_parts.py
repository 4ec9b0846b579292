"""Flux from ComfyUI's parts: a BFL-layout transformer, the `ae` VAE, CLIP-L and T5 (fp16, fp8, scaled fp8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ldm_layout import flux_to_bfl, vae_to_ldm
from safetensors.torch import save_file

from farm.tiny_models import _tiny_t5_tokenizer
from pipeline.errors import ModelFileError
from pipeline.loading.flux_keys import apply_plan, bfl_plan, flux_transformer_config
from pipeline.loading.flux_parts import FluxParts
from pipeline.loading.model_file import inspect_file
from pipeline.loading.models import load_diffusion_model
from pipeline.loading.single_file_configs import CLIP_VOCAB, clip_tokenizer

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn


def tiny_flux_models(seed: int = 5) -> dict:
    """The four networks of a tiny Flux, built by FLUX.1's rules (128-wide heads, 32 norm groups, CLIP's vocabulary)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    vae = AutoencoderKL(
        sample_size=1024,
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=1,
            num_hidden_layers=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(_tiny_t5_tokenizer()),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        )
    )
    return {"transformer": transformer.eval(), "vae": vae.eval(), "clip": clip.eval(), "t5": t5.eval()}


def scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8: each matrix stored as fp8 of weight/scale with its scale_weight, plus the marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, value in state.items():
        if value.dim() == 2 and key.endswith(".weight") and "embed" not in key and "shared" not in key:
            scale = value.abs().max() / 448.0  # float8_e4m3fn's largest value
            out[key] = (value / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A ComfyUI tree with a tiny Flux in parts, plus fp8 and scaled-fp8 T5 files next to it."""
    root = tmp_path_factory.mktemp("comfy") / "ComfyUI"
    models = tiny_flux_models()
    folders = {name: root / "models" / name for name in ("diffusion_models", "vae", "text_encoders")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    files = {
        "model": folders["diffusion_models"] / "flux1-tiny.safetensors",
        "vae": folders["vae"] / "ae.safetensors",
        "clip_l": folders["text_encoders"] / "clip_l.safetensors",
        "t5": folders["text_encoders"] / "t5xxl_tiny_fp16.safetensors",
        "t5_fp8": root / "t5xxl_tiny_fp8_e4m3fn.safetensors",
        "t5_scaled": root / "t5xxl_tiny_fp8_e4m3fn_scaled.safetensors",
    }
    contiguous = lambda state: {k: v.contiguous() for k, v in state.items()}  # noqa: E731
    bfl = flux_to_bfl(models["transformer"].state_dict())
    save_file(contiguous({"model.diffusion_model." + k: v for k, v in bfl.items()}), str(files["model"]))
    save_file(contiguous(vae_to_ldm(models["vae"].state_dict(), 4)), str(files["vae"]))
    clip_state = models["clip"].state_dict()
    save_file(
        contiguous({f"text_model.{k.removeprefix('text_model.')}": v for k, v in clip_state.items()}),
        str(files["clip_l"]),
    )
    t5_state = {k: v for k, v in models["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(contiguous(t5_state), str(files["t5"]))
    save_file(contiguous({k: v.to(FP8) for k, v in t5_state.items()}), str(files["t5_fp8"]))
    save_file(contiguous(scaled_fp8(t5_state)), str(files["t5_scaled"]))
    tokenizer_dir = root / "comfy" / "text_encoders" / "t5_tokenizer"
    _tiny_t5_tokenizer().save_pretrained(tokenizer_dir)
    return {"root": root, "models": models, "t5_state": t5_state, "tokenizer": tokenizer_dir / "tokenizer.json"} | files


def test_bfl_plan_matches_diffusers_converter_at_flux1_width():
    """At FLUX.1's width (3072), where diffusers' own converter works, ours moves every row the same way."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        full = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    shapes = {k: tuple(v.shape) for k, v in flux_to_bfl(full.state_dict()).items()}
    g = torch.Generator().manual_seed(0)
    thin = {k: torch.randn(s[0], generator=g) for k, s in shapes.items()}  # one column: the mapping is by rows
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(thin))
    ours = apply_plan(thin, bfl_plan(shapes))
    assert ours.keys() == theirs.keys() == full.state_dict().keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    config = flux_transformer_config(shapes)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["axes_dims_rope"]) == (
        24,
        128,
        (16, 56, 56),
    )


def test_parts_are_classified(parts):
    kinds = {name: inspect_file(parts[name]) for name in ("model", "vae", "clip_l", "t5", "t5_fp8", "t5_scaled")}
    assert (kinds["model"].kind, kinds["model"].variant, kinds["model"].prefix) == (
        "flux-transformer",
        "dev",
        "model.diffusion_model.",
    )
    assert (kinds["vae"].kind, kinds["vae"].family) == ("vae", "flux")
    assert kinds["clip_l"].kind == "clip-l" and kinds["t5"].kind == "t5"
    assert kinds["t5_fp8"].quant == "fp8" and kinds["t5_scaled"].quant == "scaled-fp8"


def _load(parts, **change):
    given = dict(
        vae=str(parts["vae"]), clip_l=str(parts["clip_l"]), t5=str(parts["t5"]), t5_tokenizer=str(parts["tokenizer"])
    )
    return load_diffusion_model(parts["model"], CPU, torch.float32, parts=FluxParts(**(given | change))).pipe


def test_parts_load_equal_to_the_networks_they_were_saved_from(parts, no_network):
    pipe = _load(parts)
    models = parts["models"]
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 64, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    inputs = dict(
        hidden_states=latents,
        encoder_hidden_states=text,
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    )
    with torch.no_grad():
        mine = pipe.transformer(**inputs).sample
        theirs = models["transformer"](**inputs).sample
        assert torch.allclose(mine, theirs, atol=1e-5)
        z = torch.randn(1, 16, 8, 8, generator=g)
        assert torch.allclose(pipe.vae.decode(z).sample, models["vae"].decode(z).sample, atol=1e-5)
        ids = clip_tokenizer()("a castle", return_tensors="pt").input_ids
        assert torch.allclose(pipe.text_encoder(ids).pooler_output, models["clip"](ids).pooler_output, atol=1e-5)
        t5_ids = pipe.tokenizer_2("a castle", return_tensors="pt").input_ids
        assert torch.equal(t5_ids, _tiny_t5_tokenizer()("a castle", return_tensors="pt").input_ids)
        assert torch.allclose(pipe.text_encoder_2(t5_ids)[0], models["t5"](t5_ids)[0], atol=1e-5)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("name", ["t5_fp8", "t5_scaled"])
def test_fp8_text_encoders_are_dequantised_on_load(parts, name):
    from safetensors.torch import load_file

    t5 = _load(parts, t5=str(parts[name])).text_encoder_2
    stored = load_file(str(parts[name]))
    loaded = t5.state_dict()
    for key, original in parts["t5_state"].items():
        if name == "t5_fp8":
            expected = original.to(FP8).float()
        elif f"{key[: -len('weight')]}scale_weight" in stored:
            expected = stored[key].float() * stored[key[: -len("weight")] + "scale_weight"].float()
        else:
            expected = original
        assert torch.equal(loaded[key], expected), key
        assert torch.allclose(loaded[key], original, rtol=0.07, atol=1e-3), key  # fp8 keeps ~2 significant digits


def test_comfy_models_folder_finds_every_part(parts, tmp_path, no_network):
    from PIL import Image

    from farm.cli import main

    out = tmp_path / "flux-parts.png"
    args = ["render", "--model", "flux1-tiny.safetensors", "--comfy-models", str(parts["root"] / "models")]
    args += ["--prompt", "a castle", "--workflow", "two-pass", "--base-size", "64x64", "--size", "128x128"]
    args += ["--pixel-upscale", "1", "--tile", "128", "--steps", "1", "--base-steps", "1", "--cfg", "3.5"]
    assert main([*args, "--seed", "4", "--out", str(out), "--quiet"]) == 0
    with Image.open(out) as image:
        assert image.size == (128, 128)


def test_missing_parts_are_named(parts):
    with pytest.raises(ModelFileError, match="--vae"):
        load_diffusion_model(parts["model"], CPU, torch.float32, parts=FluxParts())
    with pytest.raises(ModelFileError, match="no T5 tokenizer.*--t5-tokenizer"):
        _load(parts, t5_tokenizer="", t5=str(parts["t5_fp8"]))


def test_scaled_fp8_without_scales_is_refused(parts, tmp_path):
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(parts["t5_scaled"])).items() if not k.endswith("scale_weight")}
    broken = tmp_path / "t5_scaled_no_scales.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ModelFileError, match=r"t5_scaled_no_scales.safetensors is marked scaled fp8.*no scale_weight"):
        _load(parts, t5=str(broken))


def test_wrong_family_parts_are_refused(parts, tiny_sdxl):
    sdxl_vae = Path(tiny_sdxl) / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(
        ModelFileError, match=r"--vae .*diffusion_pytorch_model.safetensors is an SDXL/SD \(4-channel\) VAE.*16-channel"
    ):
        _load(parts, vae=str(sdxl_vae))
    with pytest.raises(
        ModelFileError, match=r"--t5 .*clip_l.safetensors is a CLIP-L text encoder, not a T5 text encoder"
    ):
        _load(parts, t5=str(parts["clip_l"]))


def test_prepare_resolves_the_parts_and_counts_their_weights(parts):
    from farm.executor import prepare
    from pipeline.budget.memory import count_parameters, part_parameters
    from pipeline.spec import RenderSpec

    spec = RenderSpec(model="flux1-tiny.safetensors", comfy_models=str(parts["root"] / "models"), prompt="x")
    spec = RenderSpec(**(spec.to_dict() | dict(width=256, height=256, tile=128, native=128, steps=1, base_steps=1)))
    plan = prepare(spec)
    resolved = {name: getattr(plan.spec, name) for name in ("model", "vae", "clip_l", "t5", "t5_tokenizer")}
    assert resolved == {name: str(parts[name]) for name in ("model", "vae", "clip_l", "t5")} | {
        "t5_tokenizer": str(parts["tokenizer"])
    }
    files = [parts[name] for name in ("model", "vae", "clip_l", "t5")]
    with_parts = count_parameters(parts["model"]) + part_parameters((plan.spec.vae, plan.spec.clip_l, plan.spec.t5))
    assert with_parts == sum(count_parameters(f) for f in files) > count_parameters(parts["model"])
