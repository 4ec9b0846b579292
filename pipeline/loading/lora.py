"""LoRA: a low-rank weight delta from a .safetensors file, fused into the model's weights.

diffusers' `load_lora_weights` reads the key layouts in use (diffusers, PEFT, kohya/sd-scripts,
and for Flux also BFL/XLabs) and converts them for the UNet or Flux transformer and the text
encoders; `fuse_lora` adds strength * up @ down * alpha / rank to each targeted weight. We fuse
with one strength for the denoiser and another for the text encoders (ComfyUI's LoraLoader
strength_model / strength_clip), then drop the adapter layers: sampling then runs plain weights
and costs nothing extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ModelFileError
from pipeline.loading.model_info import ModelInfo, check_safetensors, require_file

ADAPTER = "tilefarm_lora"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
DENOISERS = {"sdxl": "unet", "flux": "transformer"}


class _Collect(logging.Handler):
    """Keeps the warnings diffusers logs while it loads an adapter."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _diffusers_warnings() -> Iterator[_Collect]:
    """Collect (not print) what diffusers logs meanwhile: it only *logs* LoRA keys that matched no
    layer, and a LoRA that half fits is the wrong LoRA."""
    log = logging.getLogger("diffusers")
    handler, saved, level = _Collect(), log.handlers[:], log.level
    log.handlers = [handler]
    log.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        log.handlers = saved
        log.setLevel(level)


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()).rstrip(".")
    return text if len(text) <= 300 else text[:300] + " ..."


def apply_lora(pipe, info: ModelInfo, path: str | Path, model_strength: float, text_strength: float) -> None:
    """Fuse the LoRA at `path` into pipe's denoiser (x model_strength) and text encoders (x text_strength)."""
    path = require_file(Path(path).expanduser(), "LoRA")
    if path.suffix != ".safetensors":
        raise ModelFileError(
            f"LoRA {path} is not .safetensors; LoRAs are read from safetensors only (a pickle can run code "
            "when loaded): convert it"
        )
    check_safetensors(path)
    denoiser = DENOISERS[info.family]
    model = f"{info.family.upper()} model {info.path}"
    fix = f"use a LoRA trained for {info.family.upper()}, or leave lora empty"
    try:
        with _diffusers_warnings() as warnings:
            pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, IndexError, AttributeError) as err:
        _drop_adapters(pipe)
        raise ModelFileError(f"LoRA {path} does not fit the {model}: {_short(err)}; {fix}") from None
    unmatched = [m for m in warnings.messages if "unexpected keys" in m]
    loaded = [name for name, adapters in pipe.get_list_adapters().items() if ADAPTER in adapters]
    if unmatched or not loaded:
        _drop_adapters(pipe)
        reason = _short(ValueError(unmatched[0])) if unmatched else "none of its weights name a layer of this model"
        raise ModelFileError(f"LoRA {path} does not fit the {model}: {reason}; {fix}")
    if denoiser in loaded and model_strength:
        pipe.fuse_lora(components=[denoiser], lora_scale=model_strength, adapter_names=[ADAPTER])
    text = [name for name in TEXT_ENCODERS if name in loaded]
    if text and text_strength:
        pipe.fuse_lora(components=text, lora_scale=text_strength, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()  # the fused deltas stay in the weights; the adapter layers go


def _drop_adapters(pipe) -> None:
    """Leave the pipeline as it was before a LoRA that failed to load."""
    try:
        pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, AttributeError):
        pass
