"""The local executor: the whole plan in this process, on one device (CUDA if present, else CPU)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.checkpoint import Checkpointed, Store
from pipeline.clock import Clock
from pipeline.errors import UserError
from pipeline.health import ATTEMPTS, bad_result_error, nonfinite, now, poison, stage_row, task_row
from pipeline.inputs import load_input_image
from pipeline.models import ModelInfo, inspect_diffusion_model
from pipeline.plan import RenderPlan, make_plan
from pipeline.render import Progress, RenderResult, no_progress, render, task_progress
from pipeline.sam3 import inspect_detector
from pipeline.spec import MAX_SIDE, RenderSpec
from pipeline.taskgraph import OnResult, Task, check_graph
from pipeline.worker import TileWorker, WorkerConfig


def enhance_target(spec: RenderSpec, info: ModelInfo) -> tuple[RenderSpec, list[str]]:
    """The enhance workflow's output size: the input's x pixel_upscale, each side snapped to the nearest
    multiple the model needs (reported, never a silent crop: the upscale resizes to it)."""
    notes: list[str] = []
    image = load_input_image(spec.input, MAX_SIDE // spec.pixel_upscale, notes.append)
    h, w = image.shape[-2:]
    m, x = info.size_multiple, spec.pixel_upscale
    height, width = (max(m, int(side * x / m + 0.5) * m) for side in (h, w))  # nearest multiple, ties up
    size = f"input {w}x{h} px x{x} = {w * x}x{h * x} px"
    if (height, width) != (h * x, w * x):
        change = max(abs(height / (h * x) - 1), abs(width / (w * x) - 1))
        notes.append(
            f"{size}, snapped to {width}x{height} (multiples of {m} px for {info.family.upper()}); "
            f"the upscale resizes to it, changing the aspect ratio by {100 * change:.2f}% at most, nothing cropped"
        )
    else:
        notes.append(size)
    return replace(spec, width=width, height=height).validate(), notes


def prepare(spec: RenderSpec) -> RenderPlan:
    """Check every input that can be checked without loading a model, and plan the render."""
    spec.validate()
    info = inspect_diffusion_model(spec.model)
    notes: list[str] = []
    if spec.workflow == "enhance":
        spec, notes = enhance_target(spec, info)
    if spec.upscaler and not Path(spec.upscaler).expanduser().is_file():
        raise UserError(f"upscaler {spec.upscaler} does not exist; pass a .safetensors or .pth upscaler file")
    if spec.lora and not Path(spec.lora).expanduser().is_file():
        raise UserError(f"lora {spec.lora} does not exist; pass a LoRA .safetensors file")
    if spec.model_config and not Path(spec.model_config).expanduser().is_dir():
        raise UserError(f"model_config {spec.model_config} is not a folder")
    if spec.detector:
        inspect_detector(spec.detector)
    return replace(make_plan(spec, info), notes=tuple(notes))


class LocalExecutor:
    """Runs worker calls and task graphs in this process, tasks in id order, with a progress bar per group.

    `faults` injects bad results for tests: each (stage, task id) entry spoils one result of that task with
    a NaN (list it twice to spoil the retry too)."""

    def __init__(self, worker: TileWorker, progress: Progress = no_progress, faults=(), record=None):
        self.worker = worker
        self.progress = progress
        self.faults = list(faults)
        self.record = record
        self.host = socket.gethostname()

    def share(self, value: Any) -> Any:
        return value

    def call(self, stage: str, method: str, *args: Any) -> Any:
        return self.run(stage, [Task(0, method, lambda done: args, group=stage)])[0]

    def run(self, stage: str, tasks: list[Task], on_result: OnResult | None = None) -> dict[int, Any]:
        check_graph(tasks)
        results: dict[int, Any] = {}
        with task_progress(self.progress, stage, tasks) as done:
            for task in sorted(tasks, key=lambda t: t.id):
                results[task.id] = self._run_task(stage, task, task.args(results))
                if on_result:
                    on_result(task, results[task.id])
                done(task)
        return results

    def _run_task(self, stage: str, task: Task, args: tuple) -> Any:
        """Run one task; a NaN/Inf result is retried once, then stops the render."""
        start, device, errors = now(), str(self.worker.device), []
        for attempt in range(1, ATTEMPTS + 1):
            try:
                value = getattr(self.worker, task.method)(*args)
                if (stage, task.id) in self.faults:
                    self.faults.remove((stage, task.id))
                    value = poison(value)
                if nonfinite(value):
                    raise FloatingPointError("NaN/Inf in the result")
            except FloatingPointError as err:
                errors.append(f"attempt {attempt}: {err}")
                continue
            if self.record:
                outcome = "retried" if errors else "ok"
                self.record(
                    task_row(stage, task, "local", self.host, device, start, now(), attempt, outcome, "; ".join(errors))
                )
            return value
        if self.record:
            self.record(
                task_row(stage, task, "local", self.host, device, start, now(), ATTEMPTS, "failed", "; ".join(errors))
            )
        raise bad_result_error(stage, task, [f"local ({device})"])


@dataclass
class LocalRun:
    plan: RenderPlan
    result: RenderResult
    clock: Clock
    device: str


def run_local(
    plan: RenderPlan,
    device_name: str = "auto",
    progress: Progress = no_progress,
    clock: Clock | None = None,
    log=lambda text: None,
    store: Store | None = None,
    record=None,
    faults=(),
    worker: TileWorker | None = None,
) -> LocalRun:
    """Load the models and run the plan on one device; `store` keeps finished units (resume), `record`
    receives ledger rows. A `worker` already holding the spec's models (a batch) is used as it is."""
    clock = clock or Clock()
    if record:
        clock.on_stage = lambda name, start, end: record(stage_row(name, start, end))
    with clock.stage("load"):
        worker = worker or TileWorker(WorkerConfig.from_spec(plan.spec, device_name), clock=clock)
    ex = LocalExecutor(worker, progress, faults=faults, record=record)
    result = render(plan, Checkpointed(ex, store, log) if store else ex, clock=clock, log=log)
    return LocalRun(plan, result, clock, str(worker.device))
