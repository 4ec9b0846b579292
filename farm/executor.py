"""The local executor: the whole plan in this process, on one device (CUDA if present, else CPU)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.budget.preflight import memory_decision, memory_report  # noqa: F401  (memory_report: the CLI's)
from pipeline.detail.sam3 import inspect_detector
from pipeline.errors import UserError
from pipeline.graph.checkpoint import Checkpointed, Store
from pipeline.graph.clock import Clock
from pipeline.graph.health import (
    ATTEMPTS,
    bad_result_error,
    nonfinite,
    now,
    peak_memory,
    poison,
    reset_peak_memory,
    stage_row,
    task_row,
)
from pipeline.graph.progress import Progress, no_progress, task_progress
from pipeline.graph.taskgraph import OnResult, Task, check_graph, stage_positions
from pipeline.graph.worker import TileWorker, WorkerConfig, pick_device
from pipeline.inputs import load_input_image
from pipeline.loading.flux_parts import resolve_spec_files
from pipeline.loading.models import ModelInfo, inspect_diffusion_model
from pipeline.plan import RenderPlan, make_plan
from pipeline.render import RenderResult, render
from pipeline.spec import MAX_SIDE, RenderSpec, with_seed


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


def prepare(spec: RenderSpec, device_name: str = "auto", cluster: bool = False) -> RenderPlan:
    """Check every input that can be checked without loading a model, and plan the render. Locally the
    memory pre-flight runs here: a tile batch that does not fit is lowered (0 = the largest that fits), VAE
    tiles are made smaller, and what cannot fit is refused (a cluster's actors check their own GPUs). A random
    seed (-1) is drawn here: the plan's spec is the one to record."""
    spec = with_seed(resolve_spec_files(spec.validate()))
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
    if spec.tile_batch == 0:
        # a CPU gains nothing from larger batches, and a cluster driver cannot see its workers' GPUs
        gpu = not cluster and pick_device(device_name).type == "cuda"
        spec = replace(spec, tile_batch=AUTO_GPU_BATCH if gpu else 4)
    plan = replace(make_plan(spec, info), notes=tuple(notes))
    if cluster:
        return plan
    decision = memory_decision(plan, device_name)
    if decision.tile_batch != spec.tile_batch:
        plan = make_plan(replace(spec, tile_batch=decision.tile_batch), info)
    return replace(plan, vae_tile=decision.vae_tile, notes=tuple(notes) + decision.notes)


AUTO_GPU_BATCH = 8  # tile_batch 0 on a GPU: start here, the pre-flight halves it until it fits


class LocalExecutor:
    """Runs worker calls and task graphs in this process, tasks in id order, with a progress bar per group.

    `faults` injects failures for tests: each (stage, n) entry (the stage's n-th task, pipeline.graph.taskgraph.
    stage_positions) spoils one result of that task with
    a NaN (list it twice to spoil the retry too); a (stage, task id, "oom") entry makes the worker run out of
    memory at the start of that task's tile batch."""

    def __init__(self, worker: TileWorker, progress: Progress = no_progress, faults=(), record=None, prefetch=None):
        self.worker = worker
        self.progress = progress
        self.faults = list(faults)
        self.record = record
        self.host = socket.gethostname()
        # build the next task's inputs (crops, region composites) on the host while the GPU runs this one;
        # on a CPU device both would share the same cores, so it is off there unless asked for
        self.prefetch = worker.device.type == "cuda" if prefetch is None else prefetch

    def share(self, value: Any) -> Any:
        return value

    def call(self, stage: str, method: str, *args: Any) -> Any:
        return self.run(stage, [Task(0, method, lambda done: args, group=stage)])[0]

    def run(self, stage: str, tasks: list[Task], on_result: OnResult | None = None) -> dict[int, Any]:
        check_graph(tasks)
        ordered = sorted(tasks, key=lambda t: t.id)
        places = stage_positions(tasks, stage)
        results: dict[int, Any] = {}
        with task_progress(self.progress, stage, tasks) as done, ThreadPoolExecutor(1) as pool:
            ahead = None  # (task id, future of its arguments)
            for i, task in enumerate(ordered):
                args = ahead[1].result() if ahead and ahead[0] == task.id else task.args(results)
                ahead = None
                following = ordered[i + 1] if i + 1 < len(ordered) else None
                if self.prefetch and following and following.deps <= results.keys():
                    # its inputs depend only on finished results: the same values now as later
                    ahead = (following.id, pool.submit(following.args, dict(results)))
                value = self._run_task(stage, task, args, places[task.id])
                results[task.id] = value if task.keep else None
                if ahead:
                    ahead[1].exception()  # on_result may change what the next task's inputs are read from
                if on_result:
                    on_result(task, value)
                done(task)
        return results

    def _run_task(self, stage: str, task: Task, args: tuple, place: tuple[str, int]) -> Any:
        """Run one task; a NaN/Inf result is retried once, then stops the render."""
        start, device, errors = now(), str(self.worker.device), []
        if (*place, "oom") in self.faults:
            self.faults.remove((*place, "oom"))
            self.worker.oom_faults += 1
        reset_peak_memory(self.worker.device)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                value = getattr(self.worker, task.method)(*args)
                if place in self.faults:
                    self.faults.remove(place)
                    value = poison(value)
                if nonfinite(value):
                    raise FloatingPointError("NaN/Inf in the result")
            except FloatingPointError as err:
                errors.append(f"attempt {attempt}: {err}")
                continue
            if self.record:
                outcome = "retried" if errors else "ok"
                row = task_row(
                    stage, task, "local", self.host, device, start, now(), attempt, outcome, "; ".join(errors)
                )
                self.record(row | {"peak_memory": peak_memory(self.worker.device)})
            return value
        if self.record:
            row = task_row(stage, task, "local", self.host, device, start, now(), ATTEMPTS, "failed", "; ".join(errors))
            self.record(row | {"peak_memory": peak_memory(self.worker.device)})
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
    if worker is None:
        memory_decision(plan, device_name)  # memory may have changed since the plan was made
    clock = clock or Clock()
    if record:
        clock.on_stage = lambda name, start, end: record(stage_row(name, start, end))
    with clock.stage("load"):
        worker = worker or TileWorker(WorkerConfig.from_spec(plan.spec, device_name), clock=clock)
    ex = LocalExecutor(worker, progress, faults=faults, record=record)
    result = render(plan, Checkpointed(ex, store, log) if store else ex, clock=clock, log=log)
    return LocalRun(plan, result, clock, str(worker.device))
