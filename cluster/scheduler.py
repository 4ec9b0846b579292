"""A pull-based scheduler for task graphs over actors.

Whichever actor is free takes the ready task with the smallest id, so a slow GPU simply takes
fewer tasks. A task is ready when the tasks it waits for are done (no barrier between passes).
Results are keyed by task id and the first result wins, so a retried or duplicated task cannot
change the image. A task whose actor dies is put back and runs on the next free actor.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from cluster.wire import WireTensor, from_wire, to_wire
from pipeline.health import ATTEMPTS, bad_result_error, nonfinite, now, task_row
from pipeline.taskgraph import OnResult, Task, check_graph


class WorkersLost(RuntimeError):
    """Every actor died; `results` holds what was finished."""

    def __init__(self, message: str, results: dict[int, Any]):
        super().__init__(message)
        self.results = results


@dataclass
class Dispatch:
    """One dispatched task, for logs and tests: where it went and what it carried by value."""

    stage: str
    task: int
    actor: int
    refs: tuple  # ObjectRefs among its arguments (shared values travel as these)
    bytes_by_value: int
    seconds: float = 0.0


def payload(args: tuple) -> tuple[tuple, int]:
    """(ObjectRefs among args, bytes of the tensors and arrays passed by value)."""
    refs, size = [], 0
    for arg in args:
        if isinstance(arg, ray.ObjectRef):
            refs.append(arg)
        elif isinstance(arg, WireTensor):
            size += int(arg.array.nbytes)
        elif hasattr(arg, "nbytes"):
            size += int(arg.nbytes)
        elif hasattr(arg, "element_size"):
            size += arg.element_size() * arg.nelement()
    return tuple(refs), size


@dataclass
class PullScheduler:
    """Hands ready tasks to free actors; survives actor deaths while any actor is left."""

    actors: list
    max_failures: int = 3  # deaths of one actor before it is given up (Ray restarts it in between)
    # fault injection: (stage, task id) crashes the actor on the task's first run; (stage, task id, "nan")
    # makes its first result NaN
    faults: set[tuple] = field(default_factory=set)
    record: Callable[[dict], None] | None = None  # receives a ledger row per finished task
    info: dict[int, dict] = field(default_factory=dict)  # actor -> host, device (for the ledger)
    log: list[Dispatch] = field(default_factory=list)
    failures: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    lost: set[int] = field(default_factory=set)
    reviving: dict = field(default_factory=dict)  # probe ref -> actor being restarted (outlives one run)

    def run(
        self,
        stage: str,
        tasks: list[Task],
        on_done: Callable[[Task], None] | None = None,
        on_result: OnResult | None = None,
    ) -> dict[int, Any]:
        check_graph(tasks)
        errors: dict[int, list[str]] = defaultdict(list)  # per task: what went wrong on earlier attempts
        tries: dict[int, int] = defaultdict(int)
        bad: dict[int, list[str]] = defaultdict(list)  # per task: the workers that returned NaN/Inf
        started: dict[int, float] = {}
        by_id = {t.id: t for t in tasks}
        waiting = {t.id: set(t.deps) for t in tasks}
        dependents: dict[int, list[int]] = defaultdict(list)
        for t in tasks:
            for d in t.deps:
                dependents[d].append(t.id)
        ready = [t.id for t in tasks if not t.deps]
        heapq.heapify(ready)
        reviving = self.reviving
        idle = deque(i for i in range(len(self.actors)) if i not in self.lost and i not in reviving.values())
        in_flight: dict[ray.ObjectRef, tuple[int, int, Dispatch, float]] = {}
        args: dict[int, tuple] = {}
        results: dict[int, Any] = {}

        while len(results) < len(tasks):
            while idle and ready:
                tid, actor = heapq.heappop(ready), idle.popleft()
                if tid not in args:
                    args[tid] = to_wire(by_id[tid].args(results))
                crash = "exit" if (stage, tid) in self.faults else "nan" if (stage, tid, "nan") in self.faults else ""
                self.faults.discard((stage, tid))
                self.faults.discard((stage, tid, "nan"))
                ref = self.actors[actor].run.remote(by_id[tid].method, *args[tid], crash=crash)
                tries[tid] += 1
                started.setdefault(tid, now())
                entry = Dispatch(stage, tid, actor, *payload(args[tid]))
                self.log.append(entry)
                in_flight[ref] = (tid, actor, entry, time.perf_counter())
            if not in_flight and not reviving:
                raise WorkersLost(self._lost_message(stage, len(results), len(tasks)), results)
            [ref], _ = ray.wait([*in_flight, *reviving], num_returns=1)
            if ref in reviving:
                actor = reviving.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except RayActorError:
                    self.lost.add(actor)  # Ray gave up restarting it
                continue
            tid, actor, entry, start = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except FloatingPointError as err:  # the worker's own health check (raised in the actor)
                value = err
            except RayActorError:
                errors[tid].append(f"actor {actor} died")
                self.failures[actor] += 1
                if self.failures[actor] >= self.max_failures:
                    self.lost.add(actor)
                else:
                    # Ray restarts it (models reload); a probe that Ray retries returns once it is back
                    reviving[self.actors[actor].info.options(max_task_retries=-1).remote()] = actor
                if tid not in results:
                    heapq.heappush(ready, tid)  # it runs on the next free actor
                continue
            entry.seconds = time.perf_counter() - start
            idle.append(actor)
            if tid in results:
                continue  # a duplicate: the first result stands
            value = value if isinstance(value, FloatingPointError) else from_wire(value)
            if isinstance(value, FloatingPointError) or nonfinite(value):
                errors[tid].append(f"NaN/Inf on actor {actor}")
                bad[tid].append(self._name(actor))
                if len(bad[tid]) >= ATTEMPTS:
                    self._record(stage, by_id[tid], actor, started[tid], tries[tid], "failed", errors[tid])
                    raise bad_result_error(stage, by_id[tid], bad[tid])
                heapq.heappush(ready, tid)  # once more, on the next free actor
                continue
            results[tid] = value
            args.pop(tid, None)
            self._record(
                stage, by_id[tid], actor, started[tid], tries[tid], "retried" if errors[tid] else "ok", errors[tid]
            )
            if on_result:
                on_result(by_id[tid], value)
            if on_done:
                on_done(by_id[tid])
            for child in dependents[tid]:
                waiting[child].discard(tid)
                if not waiting[child]:
                    heapq.heappush(ready, child)
        return results

    def _name(self, actor: int) -> str:
        info = self.info.get(actor, {})
        return f"actor {actor} on {info.get('host', '?')} ({info.get('device', '?')})"

    def _record(self, stage: str, task: Task, actor: int, start: float, attempts: int, outcome: str, errors) -> None:
        if self.record:
            info = self.info.get(actor, {})
            self.record(
                task_row(
                    stage,
                    task,
                    f"actor {actor}",
                    info.get("host", ""),
                    info.get("device", ""),
                    start,
                    now(),
                    attempts,
                    outcome,
                    "; ".join(errors),
                )
            )

    def _lost_message(self, stage: str, done: int, total: int) -> str:
        deaths = ", ".join(f"actor {a}: {self.failures[a]} deaths" for a in sorted(self.lost))
        return (
            f"all {len(self.actors)} workers were lost during {stage} ({deaths}); "
            f"{done} of {total} {stage} tasks had finished"
        )
