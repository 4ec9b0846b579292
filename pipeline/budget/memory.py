"""Memory pre-flight: what each stage of a render needs on its device, and what to do when it does not fit.

need = HEADROOM x (weights + the stage's activations) + overhead, per stage (research real_models.md
5d). Weights are exact: the parameters in the safetensors headers at the dtype each part runs in
(the VAE in fp32 where it upcasts). Activations come from the traced table (pipeline/budget/memory_table.py)
at the stage's size and batch. The budget is the device's memory available now: MemAvailable on
the host (free memory plus the page cache the kernel can drop; MemFree alone can be half of it just
after weights were read), torch.cuda.mem_get_info on a GPU.

Decisions (decide): a UNet/transformer stage that does not fit lowers the tile batch, down to 1;
a VAE stage tiles smaller; only what cannot fit at batch 1 and the smallest VAE tile (the weights,
the base image, one tile) is refused, with the numbers and a fix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.budget.memory_table import Curve, curve
from pipeline.errors import ModelFileError

HEADROOM = 1.2  # traced peaks miss allocator fragmentation and workspaces: 8-14% below measured (research 3.3)
CUDA_OVERHEAD = 3 * 2**28  # 0.75 GiB: CUDA context, cuBLAS/cuDNN workspaces, outside the allocator
MIN_VAE_TILE = 256  # px: smaller decode tiles are mostly overlap
GiB = 2**30


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def size(n: float) -> str:
    """GiB, or MiB below a tenth of one (tiny models)."""
    return gib(n) if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def available_host_bytes() -> int:
    """Host memory a render can still take: MemAvailable from /proc/meminfo (Linux >= 3.14), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# --- weights -----------------------------------------------------------------------------------

VAE_PREFIXES = ("first_stage_model.", "vae.")  # a single file's VAE (SGM and diffusers layouts)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*/*.safetensors")) + sorted(path.glob("*.safetensors"))
    # diffusers loads `name.safetensors`, not a `name.fp16.safetensors` variant saved beside it
    return [f for f in files if not (Path(f.stem).suffix and (f.parent / f"{Path(f.stem).stem}.safetensors").exists())]


def _shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a .safetensors header (no tensor is read); an unreadable file fails here, named."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ModelFileError(
            f"{file} is not a readable .safetensors file ({err}); re-download or re-export it"
        ) from None


def component_parameters(path: Path) -> dict[str, int]:
    """Parameters per component (a folder's subfolder, or 'vae' / 'model' in a single file), from the headers."""
    counts: dict[str, int] = {}
    for file in _files(path):
        for key, shape in _shapes(file).items():
            if file == path:
                part = "vae" if key.startswith(VAE_PREFIXES) else "model"
            else:
                part = file.parent.name if file.parent != path else "model"
            counts[part] = counts.get(part, 0) + math.prod(shape)
    return counts


def count_parameters(path: Path) -> int:
    """Parameters in every .safetensors file of a model (folder or single file), from the headers only."""
    return sum(component_parameters(path).values())


def weight_bytes(parameters: dict[str, int], dtype_bytes: int, vae_bytes: int) -> int:
    """Resident weights: every component at the model's dtype, the VAE at its own (fp32 when it upcasts)."""
    return sum(n * (vae_bytes if part == "vae" else dtype_bytes) for part, n in parameters.items())


# --- stages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """The peak of one stage: `batch` calls' worth of items of `px` pixels on one curve, plus fixed bytes.

    knob: what the decision may change when it does not fit: "batch" (the tile batch), "vae tile"
    (the side of a VAE tile), or "" (nothing: it fits or the render is refused)."""

    name: str
    network: str
    curve: Curve
    px: int
    items: int = 1  # items per tile (2 with CFG on SDXL: diffusers concatenates uncond and cond)
    batch: int = 1
    fixed: int = 0  # bytes besides the network's activations (e.g. the whole canvas on the device)
    knob: str = ""

    @property
    def activations(self) -> int:
        return self.curve.at(self.px) * self.items * self.batch + self.fixed

    @property
    def side(self) -> int:
        return math.isqrt(self.px)

    def with_batch(self, batch: int) -> Stage:
        return replace(self, batch=batch)

    def with_side(self, side: int) -> Stage:
        return replace(self, px=side * side)

    def describe(self) -> str:
        cfg = f" x{self.items} (CFG)" if self.items > 1 else ""
        what = f"{self.batch} x " if self.batch > 1 else ""
        extra = f" (with {size(self.fixed)} for the whole canvas)" if self.fixed else ""
        return (
            f"{self.name}: {self.network}, {what}{self.side} px{cfg}: {size(self.activations)} activations{extra} "
            f"[{self.curve.source}]"
        )


@dataclass(frozen=True)
class Estimate:
    """What one worker needs: its weights, each stage's activation peak, and the host's pixel buffers
    (counted only where the device is the host)."""

    weights: int
    stages: tuple[Stage, ...]
    host_buffers: int = 0
    where: str = ""  # "GPU (NVIDIA H200)" or "host": for messages

    def describe(self, budget: Budget | None = None) -> list[str]:
        """One line for the weights, one per stage (with what it needs on `budget`'s device when given)."""
        buffers = f", pixel buffers {size(self.host_buffers)}" if self.host_buffers else ""
        lines = [f"weights {size(self.weights)}{buffers}"]
        for stage in self.stages:
            fits = ""
            if budget:
                n = need(self, stage, budget)
                fits = f" -> needs {gib(n)}: {'fits' if n <= budget.available else 'does not fit'}"
            lines.append(stage.describe() + fits)
        return lines


@dataclass(frozen=True)
class Budget:
    """Memory available on the device that runs the stages, and what the runtime takes outside the tensors."""

    available: int
    where: str
    overhead: int = 0


@dataclass(frozen=True)
class Decision:
    """The pre-flight's outcome: the tile batch and VAE tile side (0 = unchanged) to run with, or a refusal."""

    tile_batch: int
    vae_tile: int = 0
    refusal: str = ""
    notes: tuple[str, ...] = ()


def need(estimate: Estimate, stage: Stage | None, budget: Budget) -> int:
    """Bytes a stage needs on its device: margin x (weights + activations) + pixel buffers + overhead."""
    activations = stage.activations if stage else 0
    return int(HEADROOM * (estimate.weights + activations)) + estimate.host_buffers + budget.overhead


def _refusal(estimate: Estimate, stage: Stage | None, budget: Budget, fix: str) -> str:
    what = f"the {stage.name} stage ({stage.describe()})" if stage else "the model weights alone"
    parts = f"{gib(estimate.weights)} weights"
    if stage:
        parts += f" + {gib(stage.activations)} activations"
    parts += f", x{HEADROOM} margin"
    if estimate.host_buffers:
        parts += f", + {gib(estimate.host_buffers)} pixel buffers"
    if budget.overhead:
        parts += f", + {gib(budget.overhead)} runtime overhead"
    return (
        f"{what} needs about {gib(need(estimate, stage, budget))} on the {budget.where} ({parts}); it has "
        f"{gib(budget.available)} available. {fix}"
    )


def decide(estimate: Estimate, budget: Budget, tile_batch: int) -> Decision:
    """Fit every stage into the budget: lower the tile batch (never below 1), halve VAE tiles (never below
    MIN_VAE_TILE); refuse only what cannot fit at batch 1 and the smallest tile (research 5d)."""

    def fits(stage: Stage | None) -> bool:
        return need(estimate, stage, budget) <= budget.available

    if not fits(None):
        return Decision(tile_batch, refusal=_refusal(estimate, None, budget, WEIGHTS_FIX))
    batch, vae_tile, notes = tile_batch, 0, []
    for stage in estimate.stages:
        if stage.knob == "batch":
            b = min(batch, stage.batch)
            while b > 1 and not fits(stage.with_batch(b)):
                b //= 2
            if not fits(stage.with_batch(b)):
                fix = "Use a smaller --tile, half precision, or a device with more memory"
                return Decision(tile_batch, refusal=_refusal(estimate, stage.with_batch(1), budget, fix))
            if b < stage.batch and b < batch:
                notes.append(
                    f"tile batch lowered from {tile_batch} to {b}: {stage.name} at {stage.batch} needs "
                    f"{gib(need(estimate, stage, budget))}, the {budget.where} has {gib(budget.available)}"
                )
                batch = b
        elif stage.knob == "vae tile":
            side = min(vae_tile or stage.side, stage.side)
            while side > MIN_VAE_TILE and not fits(stage.with_side(side)):
                side //= 2
            if not fits(stage.with_side(side)):
                fix = f"VAE tiles are already {side} px, the smallest; use a device with more memory"
                return Decision(tile_batch, refusal=_refusal(estimate, stage.with_side(side), budget, fix))
            if side < stage.side:
                notes.append(
                    f"VAE tiles of {side} px instead of {stage.side} px: the {stage.name} stage needs "
                    f"{gib(need(estimate, stage, budget))}, the {budget.where} has {gib(budget.available)}"
                )
                vae_tile = side
        elif not fits(stage):
            fix = STAGE_FIX.get(stage.name.split()[0], "Use a device with more memory")
            return Decision(tile_batch, refusal=_refusal(estimate, stage, budget, fix))
    return Decision(batch, vae_tile, notes=tuple(notes))


def sets_to_evict(resident: list[int], new: int, budget: Budget, max_sets: int) -> int:
    """How many of the resident model sets (weights in bytes, least recently used first) a worker drops before
    loading one of `new` bytes: at most `max_sets` stay with it, and their weights fit `budget` with the
    pre-flight's margin (need, research real_models.md 5d). `budget` is what the sets may share: the device's
    available memory plus what the resident sets hold. All go when `new` alone does not fit."""
    drop = max(0, len(resident) + 1 - max(1, max_sets))
    while drop < len(resident) and need(Estimate(sum(resident[drop:]) + new, ()), None, budget) > budget.available:
        drop += 1
    return drop


WEIGHTS_FIX = (
    "Use half precision (--precision fp16 or bf16, on a GPU), a device with more memory, or --cluster with "
    "GPUs that hold the model"
)
STAGE_FIX = {
    "upscale": "Use a smaller --upscale-tile, or a device with more memory",
    "base": "Use a smaller --native size, or a device with more memory",
}


# --- the stages of a plan ----------------------------------------------------------------------


def model_configs(model_path: Path, model_config: str = "") -> dict[str, dict]:
    """The denoiser's and VAE's config.json (keys 'unet' / 'transformer', 'vae') of a diffusers folder, or of
    the config folder given with a single file; empty for a bare single file (its family's defaults apply)."""
    root = Path(model_config).expanduser() if model_config else model_path
    if root.is_file():
        return {}
    found = {}
    for part in ("unet", "transformer", "vae"):
        file = root / part / "config.json"
        if file.is_file():
            found[part] = json.loads(file.read_text())
    return found


def upscaler_config(path: Path) -> dict:
    """An upscaler's architecture and width from its safetensors header: Compact (SRVGG) or, by default, ESRGAN."""
    if path.suffix != ".safetensors":
        return {"arch": "ESRGAN", "num_filters": 64, "scale": 4}  # a pickle cannot be read without loading it
    header = _shapes(path)
    keys, shapes = list(header), list(header.values())
    first = next((s[0] for s in shapes if len(s) == 4 and s[1] == 3), 64)  # the first conv: RGB in, width out
    if any("rdb" in k.lower() for k in keys):
        return {"arch": "ESRGAN", "num_filters": first, "scale": 4}
    return {"arch": "Compact", "num_feat": first, "scale": 4}


def plan_stages(plan, configs: dict[str, dict], dtype_bytes: int, vae_bytes: int, upscaler: dict | None) -> list[Stage]:
    """Every stage of a render plan with its activation peak, in the order they run (a RenderPlan in)."""
    s, f, family = plan.spec, plan.f, plan.model.family
    part = "transformer" if family == "flux" else "unet"
    net = curve(part, configs.get(part), family, dtype_bytes)
    vae_cfg = configs.get("vae")
    decode, encode = (curve(st, vae_cfg, family, vae_bytes) for st in ("vae_decode", "vae_encode"))
    items = 2 if s.cfg > 1 and family == "sdxl" else 1
    name = "transformer" if family == "flux" else "UNet"
    vae_side = (vae_cfg or {}).get("sample_size") or plan.model.native_px
    vae_side = vae_side[0] if isinstance(vae_side, (list, tuple)) else vae_side
    native = plan.native_latent * f
    stages = []
    if s.workflow != "enhance":
        # the base's guidance branches are tasks of a batch of one (pipeline.sampling.guidance)
        stages.append(Stage("base", name, net, plan.base_h * plan.base_w, 1))
        if s.workflow == "top-down":
            side = min(plan.base_h, plan.base_w, vae_side)  # diffusers tiles a base larger than its sample size
            stages.append(Stage("base decode", "VAE decoder", decode, side * side, knob="vae tile"))
    if upscaler and (s.workflow != "two-pass" or s.pixel_upscale > 1):
        up = curve("upscaler", upscaler, "esrgan-4x" if upscaler["arch"] == "ESRGAN" else "compact-4x", dtype_bytes)
        stages.append(Stage("upscale", f"upscaler ({upscaler['arch']})", up, s.upscale_tile**2))
    batch = max(len(b) for b in plan.even_batches + plan.odd_batches)
    if s.concepts:
        stages += [
            Stage("detail encode", "VAE encoder", encode, native * native, 1, s.tile_batch, knob="batch"),
            Stage("detail", name, net, native * native, items, s.tile_batch, knob="batch"),
            Stage("detail decode", "VAE decoder", decode, native * native, 1, s.tile_batch, knob="batch"),
        ]
    ch, cw = plan.canvas_px
    if s.workflow != "two-pass":
        # the whole canvas goes to the device; diffusers' tiled encode keeps every tile's latent moments
        canvas = ch * cw * 3 * vae_bytes + 2 * ch * cw // (f * f) * 2 * plan.model.latent_channels * vae_bytes
        stages.append(Stage("encode", "VAE encoder", encode, min(vae_side, ch, cw) ** 2, fixed=canvas, knob="vae tile"))
    tile_px = plan.grid.tile_h * plan.grid.tile_w * f * f
    stages.append(Stage("refine", name, net, tile_px, items, batch, knob="batch"))
    stages.append(Stage("decode", "VAE decoder", decode, min(vae_side, ch, cw) ** 2, knob="vae tile"))
    return stages


def vae_dtype_bytes(configs: dict[str, dict], dtype_bytes: int) -> int:
    """models.load_diffusion_model keeps a force_upcast VAE (SDXL's, Flux's) in fp32 under half precision."""
    return 4 if configs.get("vae", {}).get("force_upcast", True) else dtype_bytes


def model_weight_bytes(model: Path, model_config: str, upscaler: str, dtype_bytes: int) -> int:
    """Resident weights of a worker: the diffusion model's components and the upscaler, at the dtypes they run in."""
    weights = weight_bytes(
        component_parameters(model), dtype_bytes, vae_dtype_bytes(model_configs(model, model_config), dtype_bytes)
    )
    if upscaler:
        path = Path(upscaler).expanduser()
        weights += count_parameters(path) * dtype_bytes if path.suffix == ".safetensors" else path.stat().st_size
    return weights


def part_parameters(parts: tuple[str, ...]) -> int:
    """Parameters of the part files beside a model (Flux's VAE and text encoders from ComfyUI), from headers."""
    return sum(count_parameters(Path(p).expanduser()) for p in parts if p)


def plan_estimate(plan, dtype_bytes: int, where: str, host: bool) -> Estimate:
    """A plan's estimate on one device at the model's dtype: weights from the headers, stages from the table;
    the pixel buffers when the device is the host (`host`)."""
    from pipeline.plan import HOST_BYTES_PER_PIXEL

    s = plan.spec
    model = Path(plan.model.path)
    configs = model_configs(model, s.model_config)
    upscaler = upscaler_config(Path(s.upscaler).expanduser()) if s.upscaler else None
    stages = plan_stages(plan, configs, dtype_bytes, vae_dtype_bytes(configs, dtype_bytes), upscaler)
    buffers = s.width * s.height * HOST_BYTES_PER_PIXEL if host else 0
    weights = model_weight_bytes(model, s.model_config, s.upscaler, dtype_bytes)
    weights += part_parameters((s.vae, s.clip_l, s.t5)) * dtype_bytes
    return Estimate(weights, tuple(stages), buffers, where)
