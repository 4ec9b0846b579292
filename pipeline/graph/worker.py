"""The tile worker: the models of one device and the units of work a render hands out.

The local executor holds one in-process; on a cluster each GPU actor wraps one. Both run the
same methods on the same inputs, so the image does not depend on where they ran.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.detail.detection import Concept, Detection
from pipeline.errors import UserError
from pipeline.geometry.cells import Cell
from pipeline.geometry.chess import Tile, TileGrid
from pipeline.graph.canvas import blend_cells
from pipeline.graph.taskgraph import run_each
from pipeline.loading.flux_parts import FluxParts
from pipeline.loading.models import inspect_diffusion_model, load_diffusion_model, load_upscaler
from pipeline.sampling import vae
from pipeline.sampling.chess_pass import RefineSettings, refine_tiles, tile_noise
from pipeline.sampling.conditioning import PromptEmbeds
from pipeline.sampling.groupnorm import Core
from pipeline.sampling.sampler import generate, refine
from pipeline.spec import RenderSpec

DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)


def out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying so (CPU allocators and older CUDA paths)."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU (never Ray's GPU ids: they may be fake)."""
    if name not in DEVICES:
        raise UserError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device, family: str = "sdxl") -> torch.dtype:
    """'auto' is fp16 on a GPU (bf16 for Flux, whose activations overflow fp16) and fp32 on the CPU;
    half precision on the CPU is refused."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if family == "flux" and torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("fp16", "bf16") and device.type == "cpu":
        raise UserError(f"precision {precision} needs a GPU; use fp32 (or auto) on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker loads: the spec's model files, precision and device choice."""

    model: str
    upscaler: str
    model_config: str
    precision: str
    device: str = "auto"
    cpu_threads: int = 0  # torch threads on a CPU device; 0 = leave as is
    detector: str = ""  # SAM3 folder, loaded on the first detect call
    lora: str = ""  # LoRA file fused into the model; empty = none
    lora_strength: float = 1.0
    lora_text_strength: float = 1.0
    vae: str = ""  # Flux from parts (see pipeline.loading.flux_parts)
    clip_l: str = ""
    t5: str = ""
    t5_tokenizer: str = ""
    comfy_models: str = ""

    @classmethod
    def from_spec(cls, spec: RenderSpec, device: str = "auto") -> WorkerConfig:
        """The driver's thread count travels with the config: CPU kernels split work by thread count,
        and their sums round differently, so every worker must use the same one."""
        return cls(
            spec.model,
            spec.upscaler,
            spec.model_config,
            spec.precision,
            device,
            torch.get_num_threads(),
            detector=spec.detector,
            lora=spec.lora,
            lora_strength=spec.lora_strength,
            lora_text_strength=spec.lora_text_strength,
            vae=spec.vae,
            clip_l=spec.clip_l,
            t5=spec.t5,
            t5_tokenizer=spec.t5_tokenizer,
            comfy_models=spec.comfy_models,
        )


@dataclass(frozen=True)
class WorkerFacts:
    """What the driver needs to know about the loaded models to cut work into tiles."""

    device: str
    upscale: int  # the upscaler's scale; 0 without one
    decode_tile: int  # latent tile the VAE decodes comfortably (its sample size / factor)
    encode_tile: int  # pixel tile the VAE encodes comfortably (its sample size)
    family: str = "sdxl"  # the diffusion model's family: which sampler loop the driver runs
    scheduler_config: dict | None = None  # the model's scheduler config (the blended sampler's steps)


class TileWorker:
    """Loads the models once; every method is one unit of work with tensors in and out (CPU, float32)."""

    def __init__(self, config: WorkerConfig, clock=None):
        self.config = config
        self.clock = clock
        self.device = pick_device(config.device)
        self.masks: dict = {}  # feather weights of blended tiles, by shape and device (blend_cells)
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        dtype = pick_dtype(config.precision, self.device, inspect_diffusion_model(config.model).family)
        # the small upscaler first, so a bad file fails before the large model loads
        self.upscaler = (
            load_upscaler(config.upscaler, self.device, half=dtype != torch.float32) if config.upscaler else None
        )
        loras = [(config.lora, config.lora_strength, config.lora_text_strength)] if config.lora else []
        parts = FluxParts(config.vae, config.clip_l, config.t5, config.t5_tokenizer, config.comfy_models)
        self.model = load_diffusion_model(
            config.model, self.device, dtype, config=config.model_config or None, loras=loras, parts=parts
        )
        self.model.denoiser.clock = clock.model if clock else None
        self.detector = None  # loaded on first use: most renders never detect
        self.oom_faults = 0  # fault injection: the next N refine batches run out of memory before they start

    def _timed(self, name: str):
        return self.clock.model(name) if self.clock else nullcontext()

    def facts(self) -> WorkerFacts:
        vae_cfg = self.model.vae.config
        return WorkerFacts(
            str(self.device),
            self.upscaler.scale if self.upscaler else 0,
            vae_cfg["sample_size"] // self.model.info.vae_factor,
            vae_cfg["sample_size"],
            self.model.denoiser.family,
            dict(self.model.denoiser.scheduler_config),
        )

    def encode_prompt(self, prompt: str, negative: str, cfg: float, style: str = "comfyui") -> PromptEmbeds:
        """The render's conditioning, prompts written in `style` (comfyui or a1111; see pipeline.text.prompt)."""
        with self._timed("text encoders"):
            cond = self.model.encode_prompt(prompt, negative, cfg, style)
        return cond.map(lambda t: t.float().cpu())

    def base(
        self, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str, vae_tile: int = 0
    ) -> torch.Tensor:
        """txt2img at native size from the pooled scaffold, decoded to pixels (in `vae_tile` px tiles if set)."""
        return self.decode(generate(self.model.denoiser, noise, cond, cfg, steps, sampler), vae_tile)

    def base_latents(
        self, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str
    ) -> torch.Tensor:
        """txt2img from the pooled scaffold, kept as latents (the two-pass workflow upscales them)."""
        return generate(self.model.denoiser, noise, cond, cfg, steps, sampler).float().cpu()

    def decode(self, latents: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Latents -> pixels in the VAE's own tiles, or in `tile` px tiles if set (the base's image)."""
        return vae.decode(self.model.vae, latents, clock=self._clock_fn(), tile=tile)

    def upscale_tile(self, patch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The upscale model on one patch; `dtype` float16 where it lands in a float16 canvas (half the bytes
        on the wire)."""
        param = next(self.upscaler.descriptor.model.parameters())
        with self._timed("upscaler"), torch.no_grad():
            out = self.upscaler.descriptor(patch.float().to(param.device, param.dtype))
        return out.float().clamp(0, 1).to(dtype).cpu()

    def encode(self, pixels: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Pixels -> latents in the VAE's own tiles, or in `tile` px tiles when smaller (0 = the VAE's)."""
        return vae.encode(self.model.vae, pixels, clock=self._clock_fn(), tile=tile)

    def refine(
        self,
        tiles: tuple[Tile, ...],
        latents: torch.Tensor,
        scaffold,
        cond: PromptEmbeds,
        settings: RefineSettings,
        mask: torch.Tensor | None = None,
        pin: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Refine a batch of chess tiles, each with its own slice of the scaffold as noise. A batch that runs out
        of memory runs again once as two halves (each exactly as if the plan had batched it so)."""
        noise = tile_noise(scaffold, tiles)
        try:
            if self.oom_faults:
                self.oom_faults -= 1
                raise torch.OutOfMemoryError(f"injected: out of memory refining tiles {[t.id for t in tiles]}")
            return refine_tiles(self.model.denoiser, cond, settings, tiles, latents, noise, mask, pin)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not out_of_memory(err) or len(tiles) < 2:
                raise
            error = str(err).splitlines()[0]
        # outside the except block: its traceback holds the failed batch's tensors
        half = (len(tiles) + 1) // 2
        log.warning(
            "out of memory refining tiles %s on %s (%s): retrying as batches of %d and %d; a batch's composition "
            "changes its results slightly, so these tiles differ a little from an uninterrupted render",
            [t.id for t in tiles],
            self.device,
            error,
            half,
            len(tiles) - half,
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        done: dict[int, torch.Tensor] = {}
        for part in (slice(0, half), slice(half, None)):
            part_mask = None if mask is None else mask[part]
            part_pin = None if pin is None else pin[part]
            done |= refine_tiles(
                self.model.denoiser, cond, settings, tiles[part], latents[part], noise[part], part_mask, part_pin
            )
        return done

    def predict(
        self, tiles: tuple[Tile, ...], latents: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, cfg: float
    ) -> dict[int, torch.Tensor]:
        """The model's prediction for a batch of tiles of the canvas at timestep t (the blended sampler)."""
        with torch.no_grad():
            out = self.model.denoiser.predict_latents(latents, t, cond, cfg).float().cpu()
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"tiles {[t.id for t in tiles]} produced NaN/Inf predictions on {self.device}")
        return {tile.id: out[i : i + 1] for i, tile in enumerate(tiles)}

    def detect(self, image: torch.Tensor, concepts: tuple[Concept, ...]) -> list[Detection]:
        """Every candidate for the concepts on the base image (the detailer selects among them)."""
        from pipeline.detail.sam3 import Sam3Detector

        if self.detector is None:
            if not self.config.detector:
                raise UserError("the spec lists concepts but no detector: pass --detector PATH (a SAM3 folder)")
            self.detector = Sam3Detector(self.config.detector, self.device)
        with self._timed("detector"):
            return self.detector.detect(image, concepts)

    def detail(
        self, pixels: torch.Tensor, noise: torch.Tensor, cond: PromptEmbeds, settings: RefineSettings
    ) -> torch.Tensor:
        """Refine a batch of native-size crops: encode, refine with their noise, decode (pixels in, pixels out)."""
        latents = vae.encode(self.model.vae, pixels, clock=self._clock_fn(), tiled=False)
        s = settings
        out = refine(self.model.denoiser, latents, noise, cond, s.cfg, s.steps, s.denoise, s.sampler).float()
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"a detail crop batch produced NaN/Inf latents on {self.device}")
        return vae.decode(self.model.vae, out, clock=self._clock_fn(), tiled=False)

    def decode_stats(
        self, latents: torch.Tensor, core: Core, known: dict | None = None, until: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The decoder's GroupNorm moments over one tile's core (a statistics phase of a tiled decode), the
        layers in `known` normalised with those pooled statistics, up to layer `until` if given."""
        return vae.decode_stats(self.model.vae, latents, core, clock=self._clock_fn(), known=known, until=until)

    def decode_tile(
        self, latents: torch.Tensor, stats: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Decode one tile, with the image's pooled GroupNorm statistics when given (else the tile's own); `dtype`
        float16 where it lands in a float16 canvas (half the bytes on the wire and on the driver)."""
        return vae.decode(self.model.vae, latents, clock=self._clock_fn(), tiled=False, stats=stats, dtype=dtype)

    def blend_cells(self, grid: TileGrid, cells: tuple[Cell, ...], dtype: torch.dtype, *values) -> tuple:
        """Composite cells of a tiled stage's canvas from the outputs of the tiles over them, on this device
        (pipeline.graph.canvas.AssembledCanvas: the driver only copies the cells in)."""
        with torch.no_grad():
            out = blend_cells(grid, cells, tuple(v.to(self.device) for v in values), dtype, self.masks)
        return tuple(cell.cpu() for cell in out)

    def each(self, method: str, sizes: tuple[int, ...], *args) -> tuple:
        """`method` once per call, in order: several tiles in one task (pipeline.graph.stream.add_tiled's
        tiles_per_task), each computed as its own task would (pipeline.graph.taskgraph.run_each)."""
        return run_each(self, method, sizes, args)

    def encode_stats(self, pixels: torch.Tensor, core: Core) -> dict[str, torch.Tensor]:
        """The encoder's GroupNorm moments over one tile's core (the first phase of a tiled encode)."""
        return vae.encode_stats(self.model.vae, pixels, core, clock=self._clock_fn())

    def encode_tile(self, pixels: torch.Tensor, stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encode one tile, with the image's pooled GroupNorm statistics when given (else the tile's own)."""
        return vae.encode(self.model.vae, pixels, clock=self._clock_fn(), tiled=False, stats=stats)

    def _clock_fn(self):
        return self.clock.model if self.clock else None
