"""The local executor: the whole plan in this process, on one device (CUDA if present, else CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.clock import Clock
from pipeline.errors import UserError
from pipeline.models import inspect_diffusion_model
from pipeline.plan import RenderPlan, make_plan
from pipeline.render import Progress, RenderResult, no_progress, render, task_progress
from pipeline.spec import RenderSpec
from pipeline.taskgraph import Task, check_graph
from pipeline.worker import TileWorker, WorkerConfig


def prepare(spec: RenderSpec) -> RenderPlan:
    """Check every input that can be checked without loading a model, and plan the render."""
    spec.validate()
    info = inspect_diffusion_model(spec.model)
    if spec.upscaler and not Path(spec.upscaler).expanduser().is_file():
        raise UserError(f"upscaler {spec.upscaler} does not exist; pass a .safetensors or .pth upscaler file")
    if spec.lora and not Path(spec.lora).expanduser().is_file():
        raise UserError(f"lora {spec.lora} does not exist; pass a LoRA .safetensors file")
    if spec.model_config and not Path(spec.model_config).expanduser().is_dir():
        raise UserError(f"model_config {spec.model_config} is not a folder")
    return make_plan(spec, info)


class LocalExecutor:
    """Runs worker calls and task graphs in this process, tasks in id order, with a progress bar per group."""

    def __init__(self, worker: TileWorker, progress: Progress = no_progress):
        self.worker = worker
        self.progress = progress

    def share(self, value: Any) -> Any:
        return value

    def call(self, stage: str, method: str, *args: Any) -> Any:
        with self.progress(stage, 1, "call") as bar:
            result = getattr(self.worker, method)(*args)
            bar.update()
        return result

    def run(self, stage: str, tasks: list[Task]) -> dict[int, Any]:
        check_graph(tasks)
        results: dict[int, Any] = {}
        with task_progress(self.progress, stage, tasks) as done:
            for task in sorted(tasks, key=lambda t: t.id):
                results[task.id] = getattr(self.worker, task.method)(*task.args(results))
                done(task)
        return results


@dataclass
class LocalRun:
    plan: RenderPlan
    result: RenderResult
    clock: Clock
    device: str


def run_local(
    plan: RenderPlan, device_name: str = "auto", progress: Progress = no_progress, clock: Clock | None = None
) -> LocalRun:
    """Load the models and run the plan on one device."""
    clock = clock or Clock()
    with clock.stage("load"):
        worker = TileWorker(WorkerConfig.from_spec(plan.spec, device_name), clock=clock)
    result = render(plan, LocalExecutor(worker, progress), clock=clock)
    return LocalRun(plan, result, clock, str(worker.device))
