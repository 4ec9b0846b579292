"""What a single .safetensors model file is, read from its header alone (names, shapes, dtypes; no tensor data).

Users hold models the way ComfyUI and A1111 save them: one SDXL checkpoint, or Flux in parts (a
BFL-layout transformer, an `ae` VAE, CLIP-L, T5, often fp8). `classify` names the kind from key
names and a few shapes, the way diffusers' `infer_diffusers_model_type` and ComfyUI's
`model_detection.py` do, so loaders and errors can say what a file is before reading gigabytes.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelFileError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E5M2FNUZ", "F8_E4M3FNUZ")
# prefixes of a whole checkpoint (SGM/LDM) and of ComfyUI's re-packed files, stripped before matching
DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.", "transformer.")
# ComfyUI's marker tensors for v-prediction / zero-terminal-SNR SDXL finetunes (comfy/supported_models.py)
V_PRED_MARKERS = ("v_pred", "edm_vpred.sigma_max")
ZTSNR_MARKER = "ztsnr"
VAE_PROBES = (
    ("ldm", "encoder.down.0.block.0.conv1.weight"),
    ("diffusers", "encoder.down_blocks.0.resnets.0.conv1.weight"),
)


@dataclass(frozen=True)
class FileKind:
    """What one model file holds, in the words a user and a loader need."""

    kind: str  # sdxl, flux-transformer, vae, clip-l, clip-g, t5, sd15, unknown
    family: str = ""  # sdxl, flux or sd15; "" for a text encoder
    variant: str = ""  # sdxl: base or refiner; flux: dev or schnell
    layout: str = ""  # key layout: ldm (SGM/A1111), bfl (Black Forest Labs), diffusers, hf (transformers), openclip
    prefix: str = ""  # prefix in front of the part's keys (e.g. model.diffusion_model.)
    prediction: str = "epsilon"  # epsilon or v_prediction (SDXL marker keys)
    zero_snr: bool = False  # ztsnr marker: rescale betas to zero terminal SNR
    dtype: str = ""  # storage dtype of most tensors (safetensors names: F16, BF16, F8_E4M3, ...)
    quant: str = ""  # "", fp8 or scaled-fp8
    missing_scales: bool = False  # scaled-fp8 marker without any scale_weight tensors

    def describe(self) -> str:
        """A short phrase naming the kind, for messages."""
        words = {
            "sdxl": f"an SDXL {self.variant or 'base'} checkpoint",
            "flux-transformer": f"a Flux {self.variant} transformer ({self.layout} layout)",
            "vae": "a Flux (16-channel) VAE" if self.family == "flux" else "an SDXL/SD (4-channel) VAE",
            "clip-l": "a CLIP-L text encoder",
            "clip-g": "a CLIP-G (OpenCLIP bigG) text encoder",
            "t5": "a T5 text encoder",
            "sd15": "a Stable Diffusion 1.x/2.x checkpoint",
        }
        text = words.get(self.kind, "an unrecognised model")
        if self.prediction == "v_prediction":
            text += " (v-prediction" + (", zero terminal SNR)" if self.zero_snr else ")")
        if self.quant:
            text += f" stored {self.quant}"
        return text


def read_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}, __metadata__: {...}}."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) < 8:
                raise ValueError("shorter than a safetensors header")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header length {size} is not plausible")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(
            f"{path} is not a readable .safetensors file ({err}); re-download it, or convert it to "
            "safetensors (pickled .ckpt/.pt files are not loaded: they can run code)"
        ) from None
    return header


def tensor_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, without the metadata entry."""
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _strip(keys: set[str], prefixes: tuple[str, ...], probe: str) -> str:
    """The prefix (one of `prefixes` or "") under which `probe` is a key."""
    for prefix in ("", *prefixes):
        if prefix + probe in keys:
            return prefix
    return ""


def _has(keys: set[str], prefixes: tuple[str, ...], probe: str) -> bool:
    return any(prefix + probe in keys for prefix in ("", *prefixes))


def _storage(header: dict) -> tuple[str, str, bool]:
    """(most common dtype, quantisation, scales missing) from the tensors' dtypes and ComfyUI's fp8 markers."""
    dtypes = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    dtype = dtypes.most_common(1)[0][0] if dtypes else ""
    keys = header.keys()
    has_scales = any(k.endswith(".scale_weight") for k in keys)
    scaled_marker = "scaled_fp8" in keys or "_quantization_metadata" in header.get("__metadata__", {})
    if has_scales or scaled_marker:
        return dtype, "scaled-fp8", scaled_marker and not has_scales
    if any(d in FP8_DTYPES for d in dtypes):
        return dtype, "fp8", False
    return dtype, "", False


def classify(header: dict) -> FileKind:
    """Name a model file's kind from its safetensors header (key names and a few shapes)."""
    shapes = tensor_shapes(header)
    keys = set(shapes)
    dtype, quant, missing = _storage(header)
    storage = dict(dtype=dtype, quant=quant, missing_scales=missing)

    # Flux transformer: BFL layout (black-forest-labs/flux, ComfyUI) or diffusers' own
    if _has(keys, DIFFUSION_PREFIXES, "double_blocks.0.img_attn.qkv.weight"):
        prefix = _strip(keys, DIFFUSION_PREFIXES, "double_blocks.0.img_attn.qkv.weight")
        variant = "dev" if prefix + "guidance_in.in_layer.weight" in keys else "schnell"
        return FileKind("flux-transformer", "flux", variant, "bfl", prefix, **storage)
    if _has(keys, ("transformer.",), "single_transformer_blocks.0.attn.to_q.weight") and _has(
        keys, ("transformer.",), "x_embedder.weight"
    ):
        prefix = _strip(keys, ("transformer.",), "x_embedder.weight")
        guided = prefix + "time_text_embed.guidance_embedder.linear_1.weight" in keys
        return FileKind("flux-transformer", "flux", "dev" if guided else "schnell", "diffusers", prefix, **storage)

    # SGM/LDM UNet checkpoints: SDXL has the text_time label embedding, SD1.x/2.x does not
    if "model.diffusion_model.input_blocks.0.0.weight" in keys:
        if "model.diffusion_model.label_emb.0.0.weight" not in keys:
            return FileKind("sd15", "sd15", layout="ldm", prefix="model.diffusion_model.", **storage)
        refiner = any(k.startswith("conditioner.embedders.0.model.") for k in keys)
        inpaint = shapes["model.diffusion_model.input_blocks.0.0.weight"][1] == 9
        v_pred = any(m in keys for m in V_PRED_MARKERS)
        zero_snr = ZTSNR_MARKER in keys
        return FileKind(
            "sdxl",
            "sdxl",
            "refiner" if refiner else "inpaint" if inpaint else "base",
            "ldm",
            "model.diffusion_model.",
            prediction="v_prediction" if v_pred or zero_snr else "epsilon",
            zero_snr=zero_snr,
            **storage,
        )

    # VAE alone: original (LDM/`ae`) or diffusers layout; latent channels from the decoder's input conv
    for layout, probe in VAE_PROBES:
        if _has(keys, VAE_PREFIXES, probe):
            prefix = _strip(keys, VAE_PREFIXES, probe)
            latent = shapes.get(prefix + "decoder.conv_in.weight", (0, 4))[1]
            return FileKind("vae", "flux" if latent == 16 else "sdxl", layout=layout, prefix=prefix, **storage)

    # text encoders alone
    if _has(keys, TEXT_PREFIXES, "encoder.block.0.layer.0.SelfAttention.q.weight"):
        prefix = _strip(keys, TEXT_PREFIXES, "encoder.block.0.layer.0.SelfAttention.q.weight")
        return FileKind("t5", layout="hf", prefix=prefix, **storage)
    if _has(keys, TEXT_PREFIXES, "text_model.embeddings.token_embedding.weight"):
        prefix = _strip(keys, TEXT_PREFIXES, "text_model.embeddings.token_embedding.weight")
        width = shapes[prefix + "text_model.embeddings.token_embedding.weight"][1]
        layers = len({k.split(".")[3] for k in keys if k.startswith(prefix + "text_model.encoder.layers.")})
        # CLIP-L is 768 wide with 12 layers; OpenCLIP bigG 1280 wide with 32 (the width decides, as in diffusers)
        big = width == 1280 or layers == 32
        return FileKind("clip-g" if big else "clip-l", layout="hf", prefix=prefix, **storage)
    if "token_embedding.weight" in keys and "transformer.resblocks.0.ln_1.weight" in keys:
        return FileKind("clip-g", layout="openclip", **storage)
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys:
        return FileKind("sd15", "sd15", layout="ldm", **storage)
    return FileKind("unknown", **storage)


def top_prefixes(header: dict, count: int = 4) -> str:
    """The most common leading key components, to show what an unknown file holds."""
    heads = Counter(".".join(k.split(".")[:2]) for k in header if k != "__metadata__")
    return ", ".join(name for name, _ in heads.most_common(count)) or "no tensors"


def inspect_file(path: str | Path) -> FileKind:
    """Classify a .safetensors file by its header; a file that is not safetensors is refused, named."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"model file {path} is not .safetensors; single files must be safetensors (pickled "
            ".ckpt/.pt/.bin files can run code when loaded): convert it, or pass a diffusers folder"
        )
    return classify(read_header(path))
