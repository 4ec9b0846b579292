"""Shared fixtures: tiny random-weight models built once per test session with the real classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from farm.tiny_models import build_tiny_sam3, build_tiny_sdxl, build_tiny_upscaler


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_dir) -> Path:
    return build_tiny_sdxl(tiny_dir / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_upscaler(tiny_dir) -> Path:
    return build_tiny_upscaler(tiny_dir / "compact-4x.safetensors", scale=4)


@pytest.fixture(scope="session")
def tiny_sam3(tiny_dir) -> Path:
    return build_tiny_sam3(tiny_dir / "tiny-sam3")


@pytest.fixture(scope="session")
def tiny_model(tiny_sdxl):
    """The tiny SDXL loaded through our loader, fp32 on the CPU."""
    from pipeline.models import load_diffusion_model

    return load_diffusion_model(tiny_sdxl, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_worker(tiny_sdxl, tiny_upscaler):
    """A TileWorker holding the tiny models, on the CPU."""
    from pipeline.worker import TileWorker, WorkerConfig

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
    )


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
