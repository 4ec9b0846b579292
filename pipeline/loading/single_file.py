"""Loading single model files with no config folder: an SDXL checkpoint, or Flux from ComfyUI's parts.

Configs come from the header shapes (pipeline.loading.single_file_configs), the key layout conversions
from diffusers' own converters (SDXL) or ours (Flux's BFL layout, pipeline.loading.flux_keys), and every
network is one of diffusers'/transformers' real classes loaded strictly: a tensor the layout does
not expect, or one it expects and the file lacks, is an error that names the file. Nothing here
touches the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import ModelFileError
from pipeline.loading.model_file import FileKind
from pipeline.loading.single_file_configs import (
    CLIP_VOCAB,
    SDXL_SCHEDULER,
    clip_config,
    clip_tokenizer,
    sdxl_unet_config,
    vae_config,
)

SCALE_SUFFIXES = (".scale_weight", ".scale_input")
SDXL_PARTS = {  # SGM checkpoint prefixes of the networks a render needs
    "model.diffusion_model.": "UNet",
    "first_stage_model.": "VAE",
    "conditioner.embedders.0.transformer.": "CLIP-L text encoder",
    "conditioner.embedders.1.model.": "OpenCLIP bigG text encoder",
}


def part(state: dict, prefix: str) -> dict:
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def shapes_of(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def dequantise(state: dict[str, torch.Tensor], path: Path, kind: FileKind) -> dict[str, torch.Tensor]:
    """Undo ComfyUI's scaled fp8: weight = fp8 weight x scale_weight (comfy/utils.py convert_old_quants)."""
    if kind.missing_scales:
        raise ModelFileError(
            f"{path} is marked scaled fp8 (a 'scaled_fp8' tensor) but holds no scale_weight tensors, so its "
            "weights cannot be restored; use the file's fp16/bf16 or plain fp8 version, or re-download it"
        )
    if kind.quant != "scaled-fp8":
        return state
    out = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith(SCALE_SUFFIXES):
            continue
        scale = state.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            scale = scale.float()
            value = value.float() * (scale.reshape(-1, *[1] * (value.dim() - 1)) if scale.numel() > 1 else scale)
        out[key] = value
    return out


def read_tensors(path: Path, kind: FileKind) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU), scaled fp8 restored; a damaged file fails here, named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ModelFileError(f"{path} could not be read ({err}); re-download it") from None
    return dequantise(state, path, kind)


def build(factory, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str, path: Path):
    """A real network from `factory`, every parameter taken from `state` (tensors it has no place for,
    such as CLIP's position_ids or text_projection in a CLIP-L file, are left out)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, then assigned: no second copy
        model = factory()
    expected = set(model.state_dict())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in expected}
    missing = sorted(expected - set(state))
    if missing:
        raise ModelFileError(
            f"{path}: its {what} lacks {len(missing)} tensors the layout read from its header needs "
            f"(e.g. {', '.join(missing[:3])}); the file is damaged or a variant tilefarm does not know"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{path}: its {what} does not fit the layout read from its header ({first})") from None
    return model.eval()


def clip_l_model(state: dict, dtype: torch.dtype, path: Path):
    """CLIPTextModel from HF-layout keys (`text_model.*`), sized from their shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    config = CLIPTextConfig(**clip_config(shapes_of(state), "hf", big=False))
    _check_vocab(config.vocab_size, path, "CLIP-L")
    # CLIPTextModel has no text_model. level in transformers >= 5.6 (real files keep it)
    if not any(k.startswith("text_model.") for k in on_meta(lambda: CLIPTextModel(config)).state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return build(lambda: CLIPTextModel(config), state, dtype, "CLIP-L text encoder", path)


def _check_vocab(vocab: int, path: Path, what: str) -> None:
    if vocab != CLIP_VOCAB:
        raise ModelFileError(
            f"{path}: its {what} has a {vocab}-token vocabulary, not CLIP's {CLIP_VOCAB}, so the bundled CLIP "
            "tokenizer cannot drive it; pass a diffusers folder with its own tokenizer (--model-config)"
        )


def load_sdxl_checkpoint(path: Path, kind: FileKind, dtype: torch.dtype):
    """StableDiffusionXLPipeline from one SGM/A1111 SDXL checkpoint (UNet, VAE, CLIP-L, OpenCLIP bigG)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if kind.variant != "base":
        raise ModelFileError(
            f"{path} is {kind.describe()}; tilefarm renders with SDXL base models (and finetunes of them), "
            "not the refiner or the 9-channel inpainting model"
        )
    state = read_tensors(path, kind)
    shapes = shapes_of(state)
    for prefix, what in SDXL_PARTS.items():
        if not any(k.startswith(prefix) for k in shapes):
            raise ModelFileError(
                f"{path} looks like an SDXL checkpoint but holds no {what} (no {prefix}* tensors); pass a full "
                "checkpoint (UNet, VAE and both text encoders), or a diffusers folder"
            )
    g_prefix = "conditioner.embedders.1.model."
    g_config = CLIPTextConfig(**clip_config(shapes_of(part(state, g_prefix)), "openclip", big=True))
    _check_vocab(g_config.vocab_size, path, "OpenCLIP bigG")
    g_state = convert_open_clip_checkpoint(on_meta(lambda: CLIPTextModelWithProjection(g_config)), state, g_prefix)
    text_encoder_2 = build(lambda: CLIPTextModelWithProjection(g_config), g_state, dtype, "OpenCLIP text encoder", path)
    text_encoder = clip_l_model(part(state, "conditioner.embedders.0.transformer."), dtype, path)

    unet_config = sdxl_unet_config(part(shapes, "model.diffusion_model."), g_config.projection_dim)
    unet_state = convert_ldm_unet_checkpoint(state, dict(on_meta(lambda: UNet2DConditionModel(**unet_config)).config))
    unet = build(lambda: UNet2DConditionModel(**unet_config), unet_state, dtype, "UNet", path)

    vae_cfg = vae_config(part(shapes, "first_stage_model."), "sdxl")
    vae_state = convert_ldm_vae_checkpoint(state, dict(on_meta(lambda: AutoencoderKL(**vae_cfg)).config))
    vae = build(lambda: AutoencoderKL(**vae_cfg), vae_state, dtype, "VAE", path)

    scheduler_config = dict(SDXL_SCHEDULER)
    if kind.prediction == "v_prediction":
        scheduler_config.update(prediction_type="v_prediction", rescale_betas_zero_snr=kind.zero_snr)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!" (id 0), as ComfyUI does
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def on_meta(factory):
    """A network with its parameters on the meta device: its config and key names, no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()
