"""The header classifier: each kind of file users hold, named from key names and shapes alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import ModelFileError
from pipeline.loading.model_file import classify, inspect_file, read_header


def header(shapes: dict[str, tuple[int, ...]], dtype: str = "F16", **dtypes: str) -> dict:
    """A safetensors header dict (no data) with the given tensor shapes."""
    out = {
        k: {"dtype": dtypes.get(k.replace(".", "_"), dtype), "shape": list(s), "data_offsets": [0, 0]}
        for k, s in shapes.items()
    }
    out["__metadata__"] = {}
    return out


SDXL_BASE = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
}
SDXL_REFINER = {
    "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
}
SD15 = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}
FLUX_BFL = {
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "img_in.weight": (3072, 64),
    "single_blocks.0.linear1.weight": (21504, 3072),
}
FLUX_DIFFUSERS = {
    "x_embedder.weight": (3072, 64),
    "single_transformer_blocks.0.attn.to_q.weight": (3072, 3072),
    "transformer_blocks.0.attn.norm_added_k.weight": (128,),
}
AE = {"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)}
SDXL_VAE = {
    "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
}
CLIP_L = {
    "text_model.embeddings.token_embedding.weight": (49408, 768),
    **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)},
}
CLIP_G = {
    "text_model.embeddings.token_embedding.weight": (49408, 1280),
    "text_projection.weight": (1280, 1280),
    **{f"text_model.encoder.layers.{i}.mlp.fc1.weight": (5120, 1280) for i in range(32)},
}
T5 = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}


@pytest.mark.parametrize(
    ("shapes", "kind", "family", "variant", "layout"),
    [
        (SDXL_BASE, "sdxl", "sdxl", "base", "ldm"),
        (SDXL_REFINER, "sdxl", "sdxl", "refiner", "ldm"),
        (SD15, "sd15", "sd15", "", "ldm"),
        (FLUX_BFL | {"guidance_in.in_layer.weight": (3072, 256)}, "flux-transformer", "flux", "dev", "bfl"),
        (FLUX_BFL, "flux-transformer", "flux", "schnell", "bfl"),
        (
            FLUX_DIFFUSERS | {"time_text_embed.guidance_embedder.linear_1.weight": (3072, 256)},
            "flux-transformer",
            "flux",
            "dev",
            "diffusers",
        ),
        (FLUX_DIFFUSERS, "flux-transformer", "flux", "schnell", "diffusers"),
        (AE, "vae", "flux", "", "ldm"),
        (SDXL_VAE, "vae", "sdxl", "", "diffusers"),
        (CLIP_L, "clip-l", "", "", "hf"),
        (CLIP_G, "clip-g", "", "", "hf"),
        (
            {"token_embedding.weight": (49408, 1280), "transformer.resblocks.0.ln_1.weight": (1280,)},
            "clip-g",
            "",
            "",
            "openclip",
        ),
        (T5, "t5", "", "", "hf"),
        ({"foo.weight": (3, 3)}, "unknown", "", "", ""),
    ],
)
def test_classify_names_each_kind(shapes, kind, family, variant, layout):
    found = classify(header(shapes))
    assert (found.kind, found.family, found.variant, found.layout) == (kind, family, variant, layout)


def test_comfy_prefix_is_found_and_kept():
    """ComfyUI re-packs Flux under model.diffusion_model.; the prefix is reported for the loader to strip."""
    found = classify(header({"model.diffusion_model." + k: s for k, s in FLUX_BFL.items()}))
    assert (found.kind, found.prefix) == ("flux-transformer", "model.diffusion_model.")


@pytest.mark.parametrize(
    ("markers", "prediction", "zero_snr"),
    [
        ({}, "epsilon", False),
        ({"v_pred": ()}, "v_prediction", False),
        ({"edm_vpred.sigma_max": ()}, "v_prediction", False),
        ({"ztsnr": ()}, "v_prediction", True),
    ],
)
def test_sdxl_v_prediction_markers(markers, prediction, zero_snr):
    found = classify(header(SDXL_BASE | markers))
    assert (found.prediction, found.zero_snr) == (prediction, zero_snr)


def test_sdxl_inpaint_is_its_own_variant():
    shapes = SDXL_BASE | {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert classify(header(shapes)).variant == "inpaint"


def test_fp8_and_scaled_fp8():
    plain = classify(header(T5, dtype="F8_E4M3", shared_weight="F16"))
    assert (plain.quant, plain.missing_scales) == ("fp8", False)
    scaled = T5 | {"scaled_fp8": (0,), "encoder.block.0.layer.0.SelfAttention.q.scale_weight": ()}
    found = classify(header(scaled, dtype="F8_E4M3"))
    assert (found.kind, found.quant, found.missing_scales) == ("t5", "scaled-fp8", False)
    lost = classify(header(T5 | {"scaled_fp8": (0,)}, dtype="F8_E4M3"))
    assert (lost.quant, lost.missing_scales) == ("scaled-fp8", True)
    assert classify(header(T5)).quant == ""


def test_read_header_reads_a_real_file_without_its_data(tmp_path):
    path = tmp_path / "t5.safetensors"
    save_file(
        {
            "shared.weight": torch.zeros(8, 4, dtype=torch.float8_e4m3fn),
            "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4, dtype=torch.float16),
        },
        str(path),
    )
    raw = read_header(path)
    assert raw["shared.weight"]["dtype"] == "F8_E4M3" and raw["shared.weight"]["shape"] == [8, 4]
    found = inspect_file(path)
    assert (found.kind, found.quant) == ("t5", "fp8")


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, b"PK\x03\x04 a zip file, not safetensors" * 4])
def test_not_safetensors_is_refused_by_name(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="broken.safetensors is not a readable .safetensors"):
        inspect_file(path)


def test_pickle_suffix_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"model.ckpt is not \.safetensors.*can run code"):
        inspect_file(path)


def test_describe_is_readable():
    assert classify(header(SDXL_BASE | {"ztsnr": ()})).describe() == (
        "an SDXL base checkpoint (v-prediction, zero terminal SNR)"
    )
    assert classify(header(T5, dtype="F8_E4M3")).describe() == "a T5 text encoder stored fp8"
