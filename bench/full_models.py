"""Full-size random-weight models from the public architecture configs in bench/configs/.

No weights can be downloaded, and random weights time exactly like trained ones: same layers,
same shapes, same kernels. `build_full_sdxl` writes a diffusers folder our loader reads
(`pipeline.loading.models.load_diffusion_model`); `meta_param_counts` builds every network on the meta
device (no memory, no init) to check a config against the published parameter counts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"
SDXL = CONFIGS / "sdxl-base-1.0"
FLUX = CONFIGS / "flux1-dev"

# published parameter counts of the released checkpoints (safetensors headers of the HF repos)
KNOWN_PARAMS = {
    "sdxl-base-1.0/unet": 2_567_463_684,
    "sdxl-base-1.0/vae": 83_653_863,
    "sdxl-base-1.0/text_encoder": 123_060_480,
    "sdxl-base-1.0/text_encoder_2": 694_659_840,
    "flux1-dev/transformer": 11_901_408_320,
    "flux1-dev/vae": 83_819_683,
    "flux1-dev/text_encoder": 123_060_480,
    "flux1-dev/text_encoder_2": 4_762_310_656,
}


def read_config(component: str | Path) -> dict:
    """The JSON config of a component folder, or of 'family/component' under bench/configs/."""
    folder = CONFIGS / component
    name = "scheduler_config.json" if folder.name == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())


def component_class(component: str | Path) -> type:
    """The diffusers or transformers class a config builds, from its own _class_name / architectures."""
    import diffusers
    import transformers

    config = read_config(component)
    if "_class_name" in config:
        return getattr(diffusers, config["_class_name"])
    return getattr(transformers, config["architectures"][0])


def build(component: str | Path, device: torch.device | str = "meta") -> torch.nn.Module:
    """One network from its config with random weights on `device` ('meta': shapes only)."""
    cls = component_class(component)
    config = read_config(component)
    with torch.device(device):
        if "_class_name" in config:
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_param_counts() -> dict[str, int]:
    """Parameter count of every network config, built on the meta device (a second per network)."""
    return {name: param_count(build(name, "meta")) for name in KNOWN_PARAMS}


def build_full_upscaler(path: Path, device: torch.device | str, seed: int = 0) -> Path:
    """A random 4x ESRGAN (RRDBNet, 23 blocks, 64 filters: the 4x-UltraSharp architecture) as .safetensors."""
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    torch.manual_seed(seed)
    with torch.device(device):
        net = RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    save_file({k: v.detach().half().contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
    return path


def build_full_sdxl(
    path: Path, device: torch.device | str, dtype: torch.dtype = torch.float16, configs: Path = SDXL, seed: int = 0
) -> Path:
    """Save an SDXL-architecture diffusers folder with random weights (about 7 GB for SDXL base in fp16).

    Built on `device` (a GPU initialises 3.5B parameters in seconds), saved in `dtype`, from the
    component configs under `configs`. The tokenizers are the tiny byte-level ones: token ids stay
    below the real vocabulary size and prompts are padded to 77 tokens either way, so the text
    encoders do the same work.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from farm.tiny_models import _tiny_tokenizer

    torch.manual_seed(seed)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    parts = {name: build(configs / name, device).to(dtype) for name in names}
    scheduler = EulerDiscreteScheduler.from_config(read_config(configs / "scheduler"))
    tokenizers = dict(tokenizer=_tiny_tokenizer(), tokenizer_2=_tiny_tokenizer())
    pipe = StableDiffusionXLPipeline(**parts, **tokenizers, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def ensure_full_sdxl(root: Path, device: torch.device | str, dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Build (once) and return the full-size SDXL folder and 4x ESRGAN file under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    model, upscaler = root / "sdxl-base-random", root / "esrgan-4x-random.safetensors"
    if not (model / "model_index.json").exists():
        tmp = root / "sdxl-base-random.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_full_sdxl(tmp, device, dtype)
        os.replace(tmp, model)
    if not upscaler.exists():
        tmp = root / "esrgan-4x-random.partial.safetensors"
        build_full_upscaler(tmp, device)
        os.replace(tmp, upscaler)
    return model, upscaler
