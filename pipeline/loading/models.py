"""Model loading in one place: diffusion models, upscalers; safe formats, errors a user can act on.

Each loader returns a descriptor that carries what callers need (family, latent channels, VAE
factor, native size, size multiple, scale) so no caller inspects a network. Pickled checkpoints only ever go
through PyTorch's restricted unpickler (weights_only=True): a pickle that holds code is refused.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ModelFileError
from pipeline.loading.model_info import ModelInfo, check_safetensors, require_file
from pipeline.sampling.conditioning import PromptEmbeds
from pipeline.sampling.flux import FluxDenoiser
from pipeline.sampling.sampler import Denoiser

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FLUX_MAX_TOKENS = 512  # T5 tokens per prompt: FluxPipeline's default for FLUX.1-dev
FAMILY_PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


def _single_file_info(path: Path) -> ModelInfo:
    from pipeline.loading.model_file import inspect_file, top_prefixes

    kind = inspect_file(path)
    if kind.kind == "flux-transformer":
        return ModelInfo(path, "flux", 16, 8, 1024, single_file=True, size_multiple=16)
    if kind.kind == "sdxl":
        return ModelInfo(path, "sdxl", 4, 8, 1024, single_file=True)
    if kind.kind == "sd15":
        raise ModelFileError(
            f"model file {path} is {kind.describe()}; tilefarm renders with SDXL and Flux models only: "
            "pass an SDXL checkpoint (e.g. sd_xl_base_1.0.safetensors) or a Flux transformer"
        )
    if kind.kind != "unknown":
        flag = {"vae": "--vae", "clip-l": "--clip-l", "t5": "--t5"}.get(kind.kind)
        hint = f"pass it with {flag} next to a Flux --model" if flag else "it is not a diffusion model"
        raise ModelFileError(f"model file {path} is {kind.describe()}, not an SDXL or Flux checkpoint; {hint}")
    from pipeline.loading.model_file import read_header

    raise ModelFileError(
        f"model file {path} is neither an SDXL nor a Flux checkpoint (its tensors start with "
        f"{top_prefixes(read_header(path))}); pass an SDXL checkpoint, a Flux transformer, or a diffusers folder"
    )


def _read_configs(path: Path, class_name: str, *names: str) -> list[dict]:
    try:
        return [json.loads((path / name / "config.json").read_text()) for name in names]
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"model folder {path} ({class_name}) has unreadable config files ({err})") from None


def inspect_diffusion_model(path: str | Path) -> ModelInfo:
    """Family, latent channels, VAE factor, native size and size multiple of a diffusers folder or single file."""
    path = require_file(Path(path).expanduser(), "model path")
    if path.is_file():
        return _single_file_info(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFileError(
            f"model folder {path} has no model_index.json, so it is not a diffusers pipeline folder; "
            "pass a folder saved with save_pretrained or an SDXL/Flux .safetensors file"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"model folder {path} has an unreadable model_index.json ({err})") from None
    if class_name.startswith("StableDiffusionXL"):
        unet_cfg, vae_cfg = _read_configs(path, class_name, "unet", "vae")
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        return ModelInfo(
            path,
            "sdxl",
            latent_channels=vae_cfg.get("latent_channels", 4),
            vae_factor=vae_factor,
            native_px=unet_cfg["sample_size"] * vae_factor,
            single_file=False,
        )
    if class_name in ("FluxPipeline", "FluxImg2ImgPipeline"):
        transformer_cfg, vae_cfg = _read_configs(path, class_name, "transformer", "vae")
        channels = vae_cfg.get("latent_channels", 16)
        if transformer_cfg.get("in_channels", 64) != 4 * channels:
            raise ModelFileError(
                f"model folder {path}: its Flux transformer takes {transformer_cfg.get('in_channels')} input "
                f"channels, not {4 * channels} (a Fill, Depth or other conditioned variant); this render needs "
                "a text-to-image Flux model such as FLUX.1-dev"
            )
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        # Flux's transformer config has no size; its VAE's sample_size (1024 for FLUX.1) is the trained one
        return ModelInfo(
            path,
            "flux",
            latent_channels=channels,
            vae_factor=vae_factor,
            native_px=vae_cfg.get("sample_size") or 1024,
            single_file=False,
            size_multiple=2 * vae_factor,
        )
    raise ModelFileError(
        f"model folder {path} holds a {class_name or 'unknown'} pipeline; this render needs SDXL "
        "(StableDiffusionXLPipeline) or Flux (FluxPipeline)"
    )


@dataclass
class DiffusionModel:
    """A loaded SDXL or Flux model: the denoiser, the VAE and the prompt encoder, on one device."""

    info: ModelInfo
    pipe: object  # the diffusers pipeline holding the components
    denoiser: Denoiser | FluxDenoiser

    @property
    def vae(self):
        return self.pipe.vae

    def encode_prompt(self, prompt: str, negative: str, cfg: float, style: str = "comfyui") -> PromptEmbeds:
        """Encode the prompts once per render, parsed and chunked by `style` (pipeline.text.prompt)."""
        from pipeline.text.text_encode import encode_flux, encode_sdxl

        if self.info.family == "flux":
            # guidance is embedded, not a second pass: Flux has no negative prompt (see pipeline.sampling.flux)
            return encode_flux(self.pipe, prompt, style, self.denoiser.device, FLUX_MAX_TOKENS)
        return encode_sdxl(self.pipe, prompt, negative, cfg, style, self.denoiser.device)


def _quiet_hf_logs() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _load_pipeline(info: ModelInfo, dtype: torch.dtype, config: str | Path | None, parts=None):
    """The family's diffusers pipeline from a folder, or from a single file plus a config folder."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionXLPipeline

    family_name = FAMILY_PIPELINES[info.family]
    if not info.single_file:
        pipeline_class = FluxPipeline if info.family == "flux" else StableDiffusionXLPipeline
        return pipeline_class.from_pretrained(str(info.path), local_files_only=True, dtype=dtype)
    if config is None and info.family == "sdxl":
        from pipeline.loading.model_file import inspect_file
        from pipeline.loading.single_file import load_sdxl_checkpoint

        return load_sdxl_checkpoint(info.path, inspect_file(info.path), dtype)
    if config is None:
        from pipeline.loading.flux_parts import FluxParts, load_flux_parts
        from pipeline.loading.model_file import inspect_file

        kind = inspect_file(info.path)
        if kind.layout == "bfl":
            return load_flux_parts(info.path, kind, parts or FluxParts(), dtype)
        raise ModelFileError(
            f"single-file checkpoint {info.path} needs --model-config: a diffusers {family_name} folder "
            "with its VAE, text encoders, configs and tokenizers (no downloads happen here)"
        )
    if info.family == "sdxl":
        return StableDiffusionXLPipeline.from_single_file(
            str(info.path), config=str(config), local_files_only=True, dtype=dtype
        )
    # a Flux checkpoint (flux1-dev.safetensors) holds the transformer only; the rest comes from the folder
    transformer = FluxTransformer2DModel.from_single_file(
        str(info.path), config=str(config), subfolder="transformer", local_files_only=True, torch_dtype=dtype
    )
    return FluxPipeline.from_pretrained(str(config), transformer=transformer, local_files_only=True, dtype=dtype)


def load_diffusion_model(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    config: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float, float]] = (),
    parts=None,
) -> DiffusionModel:
    """Load an SDXL or Flux diffusers folder (local files only) or single .safetensors checkpoint.

    A single SDXL checkpoint needs nothing else; a Flux transformer file needs its VAE, CLIP-L and
    T5 files (`parts`, a pipeline.loading.flux_parts.FluxParts). `config`, a diffusers folder with the
    pipeline's configs and tokenizers (and Flux's other components), overrides both. `loras` are
    (file, denoiser strength, text encoder strength), fused into the weights in order.
    """
    from pipeline.loading.lora import apply_lora

    info = inspect_diffusion_model(path)
    _quiet_hf_logs()
    if not info.single_file:
        for weights in sorted(info.path.glob("*/*.safetensors")):
            check_safetensors(weights)
    try:
        pipe = _load_pipeline(info, dtype, config, parts)
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelFileError(f"could not load the {info.family.upper()} model at {info.path}: {err}") from None
    pipe.to(device)
    if dtype != torch.float32 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    for lora_path, model_strength, text_strength in loras:
        apply_lora(pipe, info, lora_path, model_strength, text_strength)
    if info.family == "flux":
        denoiser = FluxDenoiser(pipe.transformer, dict(pipe.scheduler.config), info.vae_factor)
    else:
        pipe.unet.set_attn_processor(_default_attention())
        denoiser = Denoiser(pipe.unet, dict(pipe.scheduler.config), info.vae_factor)
    return DiffusionModel(info, pipe, denoiser)


def _default_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()  # PyTorch SDPA


@dataclass
class Upscaler:
    """A loaded spandrel image-to-image model and what the tiler needs to know about it."""

    path: Path
    descriptor: object  # spandrel.ImageModelDescriptor
    scale: int
    supports_half: bool
    architecture: str


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from a pickle through PyTorch's restricted unpickler only."""
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        check_safetensors(path)
        return load_file(str(path))
    if path.suffix not in PICKLE_SUFFIXES:
        raise ModelFileError(
            f"upscaler {path} has an unknown extension {path.suffix!r}; use .safetensors (or .pth/.pt/.ckpt)"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "forbidden content"
        raise ModelFileError(
            f"upscaler {path} is a pickle that holds more than tensors ({first}); it was not loaded "
            "because unpickling it could run code. Use a .safetensors version of the model"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelFileError(f"upscaler {path} is not a readable PyTorch checkpoint ({err})") from None
    for key in ("params_ema", "params", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]  # common wrappers around the weights
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"upscaler {path} does not hold a state dict of tensors")
    return state


def load_upscaler(path: str | Path, device: torch.device, half: bool = False) -> Upscaler:
    """Load any image-to-image model spandrel detects, in fp16 when asked and the model supports it."""
    import spandrel

    path = require_file(Path(path).expanduser(), "upscaler")
    if path.is_dir():
        raise ModelFileError(f"upscaler {path} is a folder; pass the model file (.safetensors or .pth)")
    state = read_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except spandrel.UnsupportedModelError:
        raise ModelFileError(
            f"upscaler {path} is not an architecture spandrel knows (ESRGAN, Compact, SwinIR, ...); "
            "check that it is an image upscaling model"
        ) from None
    except (KeyError, RuntimeError, ValueError) as err:
        raise ModelFileError(f"upscaler {path} could not be built ({err})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelFileError(f"upscaler {path} is a {descriptor.architecture.name} inpainting model, not an upscaler")
    descriptor.to(device).eval()
    if half and descriptor.supports_half and device.type == "cuda":
        descriptor.half()
    return Upscaler(path, descriptor, descriptor.scale, descriptor.supports_half, descriptor.architecture.name)
