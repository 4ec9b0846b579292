"""Shared fixtures: tiny random-weight models built once per test session with the real classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from farm.tiny_models import build_tiny_flux, build_tiny_sam3, build_tiny_sdxl, build_tiny_upscaler


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory):
    """Run folders go to a test folder (TILEFARM_STATE_DIR), never to the user's ~/.local/state."""
    path = tmp_path_factory.mktemp("state")
    before = os.environ.get("TILEFARM_STATE_DIR")
    os.environ["TILEFARM_STATE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("TILEFARM_STATE_DIR", None)
    else:
        os.environ["TILEFARM_STATE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_dir) -> Path:
    return build_tiny_sdxl(tiny_dir / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tiny_dir) -> Path:
    return build_tiny_flux(tiny_dir / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_flux_model(tiny_flux):
    """The tiny Flux loaded through our loader, fp32 on the CPU."""
    from pipeline.loading.models import load_diffusion_model

    return load_diffusion_model(tiny_flux, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_upscaler(tiny_dir) -> Path:
    return build_tiny_upscaler(tiny_dir / "compact-4x.safetensors", scale=4)


@pytest.fixture(scope="session")
def tiny_sam3(tiny_dir) -> Path:
    return build_tiny_sam3(tiny_dir / "tiny-sam3")


@pytest.fixture(scope="session")
def tiny_model(tiny_sdxl):
    """The tiny SDXL loaded through our loader, fp32 on the CPU."""
    from pipeline.loading.models import load_diffusion_model

    return load_diffusion_model(tiny_sdxl, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_worker(tiny_sdxl, tiny_upscaler):
    """A TileWorker holding the tiny models, on the CPU."""
    from pipeline.graph.worker import TileWorker, WorkerConfig

    return TileWorker(WorkerConfig(str(tiny_sdxl), str(tiny_upscaler), "", "fp32", "cpu"))


@pytest.fixture(scope="session")
def small_spec(tiny_sdxl, tiny_upscaler):
    """A 512 px top-down render from a 128 px base (k = 4): 5 x 5 chess tiles of 128 px."""
    from pipeline.spec import RenderSpec

    return RenderSpec(
        model=str(tiny_sdxl),
        upscaler=str(tiny_upscaler),
        prompt="a lighthouse at dawn",
        negative="blurry",
        width=512,
        height=512,
        seed=7,
        steps=2,
        base_steps=3,
        cfg=3.0,
        denoise=0.5,
        tile=128,
        tile_batch=4,
        native=128,
        upscale_tile=64,
        tiling="chess",  # the chess passes' machinery (even/odd batches, dependencies); blend has its own tests
    )


def make_lora(path: Path, shapes: dict[str, tuple[int, int]], rank: int = 2, alpha: float = 1.0, seed: int = 0) -> Path:
    """A kohya-style LoRA file: for each key stem, lora_down [rank, in], lora_up [out, rank] and its alpha."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for stem, (out_dim, in_dim) in shapes.items():
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def lora_delta(path: Path, stem: str) -> torch.Tensor:
    """The weight delta at strength 1 that a kohya LoRA file holds for one layer: up @ down * alpha / rank."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    down, up = t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"]
    return up @ down * t[f"{stem}.alpha"].item() / down.shape[0]


# the text encoder's first attention layer, as kohya names it for CLIP-L (lora_te1_)
CLIP_STEMS = [f"lora_te1_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]


@pytest.fixture(scope="session")
def flux_lora(tiny_dir) -> Path:
    """A kohya-format Flux LoRA for the tiny transformer (a double block's image projection) and its CLIP."""
    shapes = {"lora_unet_double_blocks_0_img_attn_proj": (32, 32), "lora_unet_single_blocks_0_linear2": (32, 160)}
    return make_lora(tiny_dir / "flux-lora.safetensors", shapes | dict.fromkeys(CLIP_STEMS, (32, 32)), alpha=1.0)


class _RunsCode:
    """A pickle payload that creates a file if it is ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(tmp_path) -> tuple[Path, Path]:
    """(a .pth whose pickle runs code, the file that code would create)."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"params": _RunsCode(marker)}, evil)
    return evil, marker


def block_hub(monkeypatch) -> None:
    """The hub is unreachable and any attempt to use it fails the test loudly."""
    import diffusers.loaders.single_file as dsf
    import diffusers.utils.hub_utils as dhub
    import huggingface_hub
    import huggingface_hub.utils._http as hf_http

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for module, name in [
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub, "snapshot_download"),
        (dsf, "snapshot_download"),
        (dhub, "hf_hub_download"),
        (dhub, "snapshot_download"),
        (hf_http, "get_session"),
        (hf_http, "http_backoff"),
    ]:
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def no_network(monkeypatch):
    block_hub(monkeypatch)
