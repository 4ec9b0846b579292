"""What a diffusion model is (its descriptor), and the checks every loader runs on a model file.

Shared by the model loader (pipeline.loading.models) and the LoRA loader (pipeline.loading.lora), which imports
nothing of the loader: the loader calls it, not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelFileError


@dataclass(frozen=True)
class ModelInfo:
    """What a diffusion model is, read from its config files without loading weights."""

    path: Path
    family: str  # "sdxl" or "flux"
    latent_channels: int
    vae_factor: int
    native_px: int
    single_file: bool
    size_multiple: int = 8  # sides in px must be multiples of this: the VAE factor, x2 for Flux's 2x2 patches


def require_file(path: Path, what: str) -> Path:
    """`path` if it exists, else a ModelFileError naming `what` it should have been."""
    if not path.exists():
        raise ModelFileError(f"{what} {path} does not exist; check the path (it must be reachable from this machine)")
    return path


def check_safetensors(file: Path) -> list[str]:
    """Parse a .safetensors header and return its keys: a truncated or foreign file fails here, named."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelFileError(
            f"{file} is not a readable .safetensors file ({err}); re-download or re-export it"
        ) from None
