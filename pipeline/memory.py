"""Memory pre-flight: estimate host and GPU memory a render needs from its plan and the model files,
and refuse, with the numbers and a fix, what cannot fit, before any model is loaded.

Weights are counted exactly from the safetensors headers (no tensor is read). Activation peaks
are per-pixel coefficients: generous estimates for SDXL with PyTorch SDPA (half-precision UNet,
fp32-upcast VAE decoder), not yet calibrated on a GPU (bench/gpu_render.py prints the measured
peak to compare). Erring high is deliberate: an out-of-memory halfway through an 8K render is
what this check exists to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import SpecError
from pipeline.plan import HOST_BYTES_PER_PIXEL, RenderPlan

UNET_BYTES_PER_LATENT_PX = 96 * 1024  # per batch item (CFG doubles the items) at half precision
VAE_BYTES_PER_PX = 3400  # fp32 VAE decoder peak per output pixel of one decode tile
HEADROOM = 1.15  # allocator fragmentation and CUDA context


def count_parameters(path: Path) -> int:
    """Parameters in every .safetensors file of a model (folder or single file), from the headers only."""
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*/*.safetensors")) + sorted(path.glob("*.safetensors"))
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                n = 1
                for d in handle.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a worker needs: weights, the largest activation peak, and their sum with headroom."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return int((self.weights + self.activations) * HEADROOM)


def worker_estimate(plan: RenderPlan, dtype_bytes: int, params: int, decode_tile_px: int = 1024) -> MemoryEstimate:
    """What one worker holds at its peak: all weights, plus the larger of a UNet tile batch and a VAE decode tile."""
    s, f = plan.spec, plan.f
    items = s.tile_batch * (2 if s.cfg > 1 and plan.model.family == "sdxl" else 1)
    tile_px = (s.tile // f) ** 2
    unet = UNET_BYTES_PER_LATENT_PX * tile_px * items * dtype_bytes // 2
    vae = VAE_BYTES_PER_PX * decode_tile_px**2
    return MemoryEstimate(params * dtype_bytes, max(unet, vae))


def host_bytes(plan: RenderPlan) -> int:
    """The driver's pixel buffers at the target size (several float32 RGB canvases live at once)."""
    return plan.spec.width * plan.spec.height * HOST_BYTES_PER_PIXEL


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(plan: RenderPlan, need: MemoryEstimate, available: int, where: str) -> None:
    """Refuse a render whose estimate exceeds what `where` has free, with the numbers and what to change."""
    if need.total <= available:
        return
    s = plan.spec
    fixes = []
    if s.tile_batch > 1:
        fixes.append(f"--tile-batch {max(1, s.tile_batch // 2)}")
    if s.precision in ("fp32", "auto") and "GPU" in where:
        fixes.append("--precision fp16 (or bf16)")
    fixes.append("a device with more memory, or --cluster to spread tiles over several GPUs")
    raise SpecError(
        f"{s.width}x{s.height} with tiles of {s.tile} px in batches of {s.tile_batch} needs about "
        f"{gib(need.total)} on the {where} ({gib(need.weights)} weights + {gib(need.activations)} for the largest "
        f"step, with headroom); it has {gib(available)} free. Try {', or '.join(fixes)}"
    )


AUTO_BATCHES = (8, 4, 2, 1)


def auto_tile_batch(plan: RenderPlan, dtype_bytes: int, params: int, free: int) -> int:
    """The largest tile batch (of 8, 4, 2, 1) whose estimate fits `free` bytes; 1 when none does."""
    for batch in AUTO_BATCHES:
        trial = replace(plan, spec=replace(plan.spec, tile_batch=batch))
        if worker_estimate(trial, dtype_bytes, params).total <= free:
            return batch
    return 1
