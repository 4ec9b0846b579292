"""The memory pre-flight on a real device: the plan's estimate against what the device has available now.

The local executor runs it while planning (farm.executor.prepare) and again before loading; a GPU
actor on a cluster runs `check_worker` on its own GPU when it starts. The estimates and the decision
are pure (pipeline/budget/memory.py); this module only reads the device.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.budget.memory import (
    CUDA_OVERHEAD,
    Budget,
    Decision,
    Estimate,
    available_host_bytes,
    decide,
    model_weight_bytes,
    part_parameters,
    plan_estimate,
)
from pipeline.errors import SpecError, UserError
from pipeline.graph.worker import WorkerConfig, pick_device, pick_dtype
from pipeline.loading.models import inspect_diffusion_model
from pipeline.plan import HOST_BYTES_PER_PIXEL, RenderPlan


def device_budget(device: torch.device) -> Budget:
    """What `device` has available now: torch.cuda.mem_get_info on a GPU, MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget(free, f"GPU ({torch.cuda.get_device_name(device)})", CUDA_OVERHEAD)
    return Budget(available_host_bytes(), "host (weights, activations and pixel buffers in RAM)")


def memory_estimate(plan: RenderPlan, device: torch.device) -> tuple[Estimate, Budget]:
    """The plan's needs on `device` and what the device has available now (reads headers, loads nothing)."""
    dtype = pick_dtype(plan.spec.precision, device, plan.model.family)
    budget = device_budget(device)
    estimate = plan_estimate(plan, dtype.itemsize, budget.where, host=device.type != "cuda")
    return estimate, budget


def memory_decision(plan: RenderPlan, device_name: str) -> Decision:
    """The pre-flight on this machine's device: the batch and VAE tile to run with, or SpecError with a fix.
    On a GPU the host must also hold the pixel buffers."""
    device = pick_device(device_name)
    estimate, budget = memory_estimate(plan, device)
    decision = decide(estimate, budget, plan.spec.tile_batch)
    if not decision.refusal and device.type == "cuda":
        host = Estimate(0, (), _buffers(plan), "host")
        decision = replace(decision, refusal=decide(host, Budget(available_host_bytes(), "host"), 1).refusal)
    if decision.refusal:
        raise SpecError(f"{plan.spec.width}x{plan.spec.height}: {decision.refusal}")
    return decision


def _buffers(plan: RenderPlan) -> int:
    return plan.spec.width * plan.spec.height * HOST_BYTES_PER_PIXEL


def memory_report(plan: RenderPlan, device_name: str, cluster: bool = False) -> str:
    """The pre-flight's estimate per stage and its budget, for --dry-run (on a cluster: at half precision,
    which each GPU worker checks against its own free memory when it starts)."""
    if cluster:
        estimate, budget = plan_estimate(plan, 2, "GPU", host=False), None
        head = "memory per GPU worker at half precision (each worker checks its own GPU when it starts):"
    else:
        estimate, budget = memory_estimate(plan, pick_device(device_name))
        head = f"memory on the {budget.where}: {budget.available / 2**30:.2f} GiB available"
    return "\n".join([head] + [f"  {line}" for line in estimate.describe(budget)])


def worker_weight_bytes(config: WorkerConfig, dtype_bytes: int) -> int:
    """A worker's resident weights (the VAE in fp32 where it upcasts, the part files beside a model), from headers."""
    weights = model_weight_bytes(
        inspect_diffusion_model(config.model).path, config.model_config, config.upscaler, dtype_bytes
    )
    return weights + part_parameters((config.vae, config.clip_l, config.t5)) * dtype_bytes


def worker_memory(config: WorkerConfig) -> tuple[int, Budget]:
    """A model set's weights on the worker's device, at the dtype it runs in, and what that device has now."""
    device = pick_device(config.device)
    dtype = pick_dtype(config.precision, device, inspect_diffusion_model(config.model).family)
    return worker_weight_bytes(config, dtype.itemsize), device_budget(device)


def worker_refusal(config: WorkerConfig, dtype_bytes: int, budget: Budget) -> str:
    """Why a worker's weights (the VAE in fp32 where it upcasts) cannot fit `budget`; '' when they fit."""
    return decide(Estimate(worker_weight_bytes(config, dtype_bytes), ()), budget, 1).refusal


def check_worker(config: WorkerConfig) -> None:
    """A GPU worker, before it loads anything: its weights fit its own GPU's free memory, or UserError with the
    numbers. The stages were fitted by the driver's plan; a tile batch that still runs out is split."""
    device = pick_device(config.device)
    if device.type != "cuda":
        return
    dtype = pick_dtype(config.precision, device, inspect_diffusion_model(config.model).family)
    refusal = worker_refusal(config, dtype.itemsize, device_budget(device))
    if refusal:
        raise UserError(f"GPU worker for {config.model}: {refusal}")
