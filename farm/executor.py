"""The local executor: the whole plan in this process, on one device (CUDA if present, else CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.clock import Clock
from pipeline.errors import UserError
from pipeline.models import inspect_diffusion_model, load_diffusion_model, load_upscaler
from pipeline.plan import RenderPlan, make_plan
from pipeline.render import Models, Progress, RenderResult, no_progress, render
from pipeline.spec import RenderSpec

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU."""
    if name not in DEVICES:
        raise UserError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on a GPU and fp32 on the CPU; half precision on the CPU is refused."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision in ("fp16", "bf16") and device.type == "cpu":
        raise UserError(f"precision {precision} needs a GPU; use fp32 (or auto) on the CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def prepare(spec: RenderSpec) -> RenderPlan:
    """Check every input that can be checked without loading a model, and plan the render."""
    spec.validate()
    info = inspect_diffusion_model(spec.model)
    if spec.upscaler and not Path(spec.upscaler).expanduser().is_file():
        raise UserError(f"upscaler {spec.upscaler} does not exist; pass a .safetensors or .pth upscaler file")
    if spec.model_config and not Path(spec.model_config).expanduser().is_dir():
        raise UserError(f"model_config {spec.model_config} is not a folder")
    return make_plan(spec, info)


def load_models(plan: RenderPlan, device: torch.device, dtype: torch.dtype) -> Models:
    """The small upscaler first, so a bad file fails before the large model loads."""
    spec = plan.spec
    upscaler = load_upscaler(spec.upscaler, device, half=dtype != torch.float32) if spec.upscaler else None
    diffusion = load_diffusion_model(spec.model, device, dtype, config=spec.model_config or None)
    return Models(diffusion, upscaler)


@dataclass
class LocalRun:
    plan: RenderPlan
    result: RenderResult
    clock: Clock
    device: torch.device


def run_local(
    plan: RenderPlan, device_name: str = "auto", progress: Progress = no_progress, clock: Clock | None = None
) -> LocalRun:
    """Load the models and run the plan on one device."""
    device = pick_device(device_name)
    dtype = pick_dtype(plan.spec.precision, device)
    clock = clock or Clock()
    with clock.stage("load"):
        models = load_models(plan, device, dtype)
    result = render(plan, models, progress=progress, clock=clock)
    return LocalRun(plan, result, clock, device)
