"""Work as a graph of tasks: what each executor runs, so the plan (not the executor) decides the image.

A task names a worker method, the tasks it waits for, and how to build its arguments from their
results. Ids order the graph (a task only waits for smaller ids), so running tasks in id order is
always valid; a parallel executor may run any task whose dependencies are done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Protocol


@dataclass(frozen=True)
class Task:
    """One unit of work for any worker."""

    id: int
    method: str  # a TileWorker method
    args: Callable[[dict[int, Any]], tuple]  # results of finished tasks -> the method's arguments
    deps: frozenset[int] = frozenset()
    group: str = ""  # progress is reported per group (e.g. "even", "odd")
    units: int = 1  # progress units (tiles) this task completes
    boxes: tuple[tuple[int, int, int, int, int], ...] = ()  # (tile id, y, x, h, w) of its tiles, for the ledger
    # False: the result goes to on_result only and run() returns None for it (the caller keeps what it
    # needs; no task's args may read it): a long graph then does not hold every result until its end
    keep: bool = True
    stage: str = ""  # in a graph of several stages (pipeline.graph.stream): the task's own, for the ledger and progress
    # True: the result stays where it was made and the tasks that read it get a handle to it (on a cluster, the
    # object store's reference: the driver never fetches it); on_result receives that handle. Implies keep
    handle: bool = False


def check_graph(tasks: list[Task]) -> None:
    """Ids are unique and every dependency is an earlier task."""
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    known = set(ids)
    for task in tasks:
        if any(d >= task.id or d not in known for d in task.deps):
            raise ValueError(f"task {task.id} depends on {sorted(task.deps)}: dependencies must be earlier tasks")


def run_each(worker: Any, method: str, sizes: tuple[int, ...], args: tuple) -> tuple:
    """A worker's `each`: `method` once per call, in order (several tiles in one task); the calls' arguments come
    one after another in `args`, `sizes` long each (flat: an executor resolves handles among a call's own arguments
    only, as Ray does)."""
    return tuple(getattr(worker, method)(*args[end - n : end]) for n, end in zip(sizes, accumulate(sizes), strict=True))


GRAPH_STAGE = "render"  # the stage name a graph of several stages runs under (pipeline.graph.stream)


def stage_positions(tasks: list[Task], stage: str) -> dict[int, tuple[str, int]]:
    """Task id -> (its stage, its place among that stage's tasks in id order): how faults injected by tests
    name a task, the same in a graph of one stage (where the place is the id) and in a graph of several."""
    seen: dict[str, int] = {}
    out = {}
    for task in sorted(tasks, key=lambda t: t.id):
        name = task.stage or stage
        out[task.id] = (name, seen.get(name, 0))
        seen[name] = seen.get(name, 0) + 1
    return out


# on_result(task, value): called as each task's result is accepted (checkpoints hook in here)
OnResult = Callable[[Task, Any], None]


class Executor(Protocol):
    """Runs worker methods: one call, or a task graph; `share` turns a large value into a cheap handle.

    `record`, when set, receives one ledger row (pipeline.graph.health.task_row) per finished task."""

    record: Callable[[dict], None] | None

    def share(self, value: Any) -> Any: ...

    def call(self, stage: str, method: str, *args: Any) -> Any: ...

    def run(self, stage: str, tasks: list[Task], on_result: OnResult | None = None) -> dict[int, Any]: ...
