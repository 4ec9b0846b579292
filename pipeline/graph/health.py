"""Health of task results and the ledger rows that record each task: one place for both executors.

A result holding NaN or Inf is never composited: the task runs once more (on any worker), and a
second bad result stops the render with an error naming the tiles, the stage and the worker.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch

from pipeline.errors import RenderError
from pipeline.graph.taskgraph import Task
from pipeline.graph.tree import leaves

ATTEMPTS = 2  # a bad result is retried once


def tensors(value: Any) -> list[torch.Tensor]:
    """Every torch tensor inside tuples, lists, dicts and dataclasses."""
    return [v for v in leaves(value) if isinstance(v, torch.Tensor)]


def nonfinite(value: Any) -> bool:
    """True when any tensor in the result holds NaN or Inf."""
    return any(t.is_floating_point() and _nonfinite(t) for t in tensors(value))


def _nonfinite(t: torch.Tensor) -> bool:
    # the smallest and the largest value are NaN when any value is, and -Inf or Inf when any value is: one read
    # with no arithmetic that finite values could overflow (isfinite().all() is 25x dearer on a CPU tile, and
    # a float32 sum of a float16 tile 5x)
    if not t.numel():
        return False
    low, high = torch.aminmax(t)
    return not (torch.isfinite(low) and torch.isfinite(high))


def poison(value: Any) -> Any:
    """Fault injection: the same result with NaN in its first tensor (as an fp16 overflow would leave)."""
    for t in tensors(value):
        if t.is_floating_point():
            t.view(-1)[0] = float("nan")
            break
    return value


def describe_task(stage: str, task: Task) -> str:
    """'chess task 14 (tiles 3, 5)' for messages."""
    what = f" ({task.group}: tiles {', '.join(str(b[0]) for b in task.boxes)})" if task.boxes else ""
    return f"{task.stage or stage} task {task.id}{what}"


def bad_result_error(stage: str, task: Task, workers: list[str]) -> RenderError:
    """The error when a task's result was NaN/Inf on every attempt."""
    return RenderError(
        f"{describe_task(stage, task)} produced NaN/Inf on {ATTEMPTS} attempts (on {', '.join(workers)}); the "
        "render stopped before compositing it. With fp16 try --precision bf16 or fp32; the finished stages "
        "are kept in the run folder for --resume"
    )


def task_row(
    stage: str,
    task: Task,
    worker: str,
    host: str,
    device: str,
    start: float,
    end: float,
    attempts: int,
    outcome: str,
    error: str = "",
) -> dict:
    """One ledger row: a task (tile batch, crop batch, model call) and how it went."""
    return {
        "kind": "task",
        "stage": task.stage or stage,
        "pass": task.group,
        "task": task.id,
        "tiles": [b[0] for b in task.boxes],
        "boxes": [list(b[1:]) for b in task.boxes],
        "worker": worker,
        "host": host,
        "device": device,
        "start": start,
        "end": end,
        "attempts": attempts,
        "outcome": outcome,
        "error": error,
        "peak_memory": None,  # bytes; measured where the executor can (peak_memory)
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a task's peak anew (CUDA only: a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: torch.cuda.max_memory_allocated since the last reset on a GPU; on the CPU the process's
    peak resident set since it started (getrusage ru_maxrss, in KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stage_row(stage: str, start: float, end: float, kind: str = "stage") -> dict:
    """One ledger row for a whole stage (or the whole render): what the driver saw, wall clock."""
    return {
        "kind": kind,
        "stage": stage,
        "pass": "",
        "task": -1,
        "tiles": [],
        "boxes": [],
        "worker": "driver",
        "host": socket.gethostname(),
        "device": "",
        "start": start,
        "end": end,
        "attempts": 1,
        "outcome": "ok",
        "error": "",
        "peak_memory": None,
    }


def now() -> float:
    return time.time()
