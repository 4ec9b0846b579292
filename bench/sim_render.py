"""A simulated farm worker for whole renders: the TileWorker methods a render calls, with no model.

Each call sleeps for its FLOP-derived cost (bench/flops.py `task_seconds` at a stated throughput)
and returns tensors of the shapes and dtype the real worker returns (zeros, or its input crops).
`SimActor` wraps it as `cluster.actor.GpuWorker` wraps a TileWorker, so every argument and result
travels through the real transport (cluster/wire.py); Ray imports it by module path (bench/ on the
actors' PYTHONPATH, as bench/scaling.py sets it).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from flops import DEFAULT_TFLOPS, load_table, task_seconds  # noqa: E402
from full_models import read_config  # noqa: E402

from cluster.actor import run_on  # noqa: E402
from pipeline.geometry.chess import Tile  # noqa: E402
from pipeline.graph.taskgraph import run_each  # noqa: E402
from pipeline.graph.worker import WorkerFacts  # noqa: E402
from pipeline.loading.models import ModelInfo  # noqa: E402
from pipeline.sampling.chess_pass import RefineSettings  # noqa: E402
from pipeline.sampling.sampler import PromptEmbeds  # noqa: E402

SCALE = 4  # the simulated upscaler: 4x ESRGAN
VAE_FACTOR = 8
SDXL = ModelInfo(Path("simulated-sdxl"), "sdxl", latent_channels=4, vae_factor=8, native_px=1024, single_file=False)


def _stats(batch: int) -> dict[str, torch.Tensor]:
    """One layer of GroupNorm moments (count 1, mean 0, M2 0) for 32 groups: what pipeline.sampling.groupnorm pools."""
    return {"sim": torch.stack([torch.ones(batch, 32), torch.zeros(batch, 32), torch.zeros(batch, 32)]).double()}


class SimTileWorker:
    """The TileWorker methods a render calls, each a sleep of its simulated cost on a `tflops` device."""

    def __init__(self, tflops: float = DEFAULT_TFLOPS, table: dict | None = None):
        self.tflops = tflops
        self.table = table or load_table()
        self.busy = 0.0  # simulated seconds slept
        self.device = torch.device("cpu")  # where its tensors live (the local executor reads it)

    def _cost(self, method: str, shape: tuple[int, ...], steps: int = 1, cfg: bool = True) -> None:
        seconds = task_seconds(method, tuple(shape), self.tflops, self.table, steps, cfg)
        if seconds > 0:
            time.sleep(seconds)
            self.busy += seconds

    def facts(self) -> WorkerFacts:
        scheduler = read_config("sdxl-base-1.0/scheduler")
        return WorkerFacts("simulated", SCALE, 1024 // VAE_FACTOR, 1024, "sdxl", scheduler)

    def encode_prompt(self, prompt: str, negative: str, cfg: float, style: str = "comfyui") -> PromptEmbeds:
        self._cost("encode_prompt", (), cfg=cfg > 1)
        embeds, pooled = torch.zeros(1, 77, 2048), torch.zeros(1, 1280)
        negatives = (embeds.clone(), pooled.clone()) if cfg > 1 else (None, None)
        return PromptEmbeds(embeds, pooled, *negatives)

    def base(self, noise, cond, cfg: float, steps: int, sampler: str, vae_tile: int = 0) -> torch.Tensor:
        self._cost("base", noise.shape, steps, cfg > 1)
        b, _, h, w = noise.shape
        return torch.zeros(b, 3, h * VAE_FACTOR, w * VAE_FACTOR)

    def base_latents(self, noise, cond, cfg: float, steps: int, sampler: str) -> torch.Tensor:
        self._cost("base_latents", noise.shape, steps, cfg > 1)
        return torch.zeros_like(noise)

    def decode(self, latents: torch.Tensor, tile: int = 0) -> torch.Tensor:
        return self.decode_tile(latents)  # the same decoder work and shape

    def upscale_tile(self, patch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._cost("upscale_tile", patch.shape)
        b, c, h, w = patch.shape
        return torch.zeros(b, c, h * SCALE, w * SCALE, dtype=dtype)

    def encode(self, pixels: torch.Tensor, tile: int = 0) -> torch.Tensor:
        self._cost("encode", pixels.shape)
        b, _, h, w = pixels.shape
        return torch.zeros(b, SDXL.latent_channels, h // VAE_FACTOR, w // VAE_FACTOR)

    def encode_stats(self, pixels: torch.Tensor, core) -> dict[str, torch.Tensor]:
        self._cost("encode_stats", pixels.shape)
        return _stats(pixels.shape[0])

    def encode_tile(self, pixels: torch.Tensor, stats=None) -> torch.Tensor:
        self._cost("encode_tile", pixels.shape)
        b, _, h, w = pixels.shape
        return torch.zeros(b, SDXL.latent_channels, h // VAE_FACTOR, w // VAE_FACTOR)

    def refine(
        self, tiles: tuple[Tile, ...], latents, scaffold, cond, settings: RefineSettings, mask=None, pin=None
    ) -> dict[int, torch.Tensor]:
        self._cost("refine", latents.shape, settings.steps, settings.cfg > 1)
        return {t.id: latents[i : i + 1] for i, t in enumerate(tiles)}

    def predict(self, tiles: tuple[Tile, ...], latents, t, cond, cfg: float) -> dict[int, torch.Tensor]:
        self._cost("predict", latents.shape, 1, cfg > 1)
        return {tile.id: torch.zeros_like(latents[i : i + 1]) for i, tile in enumerate(tiles)}

    def detect(self, image, concepts) -> list:
        return []

    def detail(self, pixels: torch.Tensor, noise, cond, settings: RefineSettings) -> torch.Tensor:
        self._cost("detail", pixels.shape, settings.steps, settings.cfg > 1)
        return pixels.clone()

    def blend_cells(self, grid, cells, dtype: torch.dtype, *values) -> tuple:
        """The blended cells' shapes. On a GPU a block's blend is a few elementwise passes over its tiles (4 x 6 MB
        of float16 at 8K): microseconds of memory traffic, so no simulated time; its inputs and output travel."""
        return tuple(torch.zeros(*values[0].shape[:2], cell.h, cell.w, dtype=dtype) for cell in cells)

    def each(self, method: str, sizes: tuple[int, ...], *args) -> tuple:
        return run_each(self, method, sizes, args)

    def decode_stats(self, latents: torch.Tensor, core, known=None, until=None) -> dict[str, torch.Tensor]:
        self._cost("decode_stats", latents.shape)
        return _stats(latents.shape[0])

    def decode_tile(self, latents: torch.Tensor, stats=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._cost("decode_tile", latents.shape)
        b, _, h, w = latents.shape
        return torch.zeros(b, 3, h * VAE_FACTOR, w * VAE_FACTOR, dtype=dtype)


class SimActor:
    """A Ray actor around a SimTileWorker, called as the scheduler calls cluster.actor.GpuWorker."""

    def __init__(self, tflops: float = DEFAULT_TFLOPS, table: dict | None = None):
        self.worker = SimTileWorker(tflops, table)

    def run(self, method: str, *args, crash: str = "", held: bool = False):
        return run_on(self.worker, method, args, crash, held)

    def set_throughput(self, tflops: float) -> None:
        self.worker.tflops = tflops

    def take_busy(self) -> float:
        """Simulated seconds slept since the last call."""
        busy, self.worker.busy = self.worker.busy, 0.0
        return busy

    def info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": f"simulated {self.worker.tflops:g} TFLOP/s"}
