"""A pull-based scheduler for task graphs over actors.

Whichever actor is free takes the ready task with the smallest id, so a slow GPU simply takes
fewer tasks. A task is ready when the tasks it waits for are done (no barrier between passes).
Results are keyed by task id and the first result wins, so a retried or duplicated task cannot
change the image. A task whose actor dies is put back and runs on the next free actor. A result held
where it was made (Task.handle) reaches the tasks that read it as an object reference, never through
the driver; if its node leaves before they have read it, the task that made it runs again.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError

from cluster.wire import WireTensor, from_wire, to_wire
from pipeline.graph.canvas import Patch
from pipeline.graph.health import ATTEMPTS, bad_result_error, now, task_row
from pipeline.graph.taskgraph import OnResult, Task, check_graph, stage_positions
from pipeline.graph.tree import leaves

FAULT_MODES = ("nan", "slow")  # fault injection beyond a crash: cluster.wire.reply


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
    fault: str = ""  # the fault injected into this call, if any


def payload(args: tuple) -> tuple[tuple, int]:
    """(ObjectRefs among args, bytes of the tensors and arrays passed by value)."""
    refs, size = [], 0
    for arg in leaves(args):  # tensors inside dataclasses too (an Enlarge's span)
        if isinstance(arg, ray.ObjectRef):
            refs.append(arg)
        elif isinstance(arg, Patch):  # the handles of the tiles it is composited from (fetched by the actor)
            refs.extend(arg.values)
        elif isinstance(arg, WireTensor):
            size += int(arg.array.nbytes)
        elif hasattr(arg, "nbytes"):
            size += int(arg.nbytes)
        elif hasattr(arg, "element_size"):
            size += arg.element_size() * arg.nelement()
    return tuple(refs), size


DEPTH = 2  # calls queued on each actor: the next task's arguments travel while the current one runs


class Lease:
    """Which actors have a free slot, are restarting or lost: shared by every render on the same actors (a batch
    with several renders in flight). Each actor has `depth` slots: with 2, its next task is sent while it runs
    one, so it does not stand idle while its result comes back and the driver picks the next (the actor runs
    its calls one at a time, in order)."""

    def __init__(self, count: int, shared: bool = False, depth: int = DEPTH):
        self.count = count
        self.shared = shared  # other renders take and give actors too: never block on our own calls alone
        self.depth = depth
        self.lock = threading.Lock()
        self.idle = deque(a for _ in range(depth) for a in range(count))  # one slot per actor before the second
        self.failures: dict[int, int] = defaultdict(int)
        self.lost: set[int] = set()
        self.reviving: dict = {}  # probe ref -> actor being restarted (outlives one run and one render)
        self.back_at: dict[int, float] = {}  # actor -> when it last came back from a restart

    def take(self) -> int | None:
        """A free slot, on an actor with nothing in flight where there is one: a call queued behind another waits
        for it, and behind a straggler for as long as the straggler takes."""
        with self.lock:
            if not self.idle:
                return None
            free = Counter(self.idle)  # in queue order: ties go to the slot freed first
            actor = max(free, key=free.get)
            self.idle.remove(actor)
            return actor

    def give(self, actor: int) -> None:
        with self.lock:
            if actor not in self.lost and actor not in self.reviving.values():  # a revived actor gets fresh slots
                self.idle.append(actor)

    def died(self, actor: int, probe, max_failures: int, sent: float = math.inf) -> None:
        """An actor's process died: Ray restarts it; `probe()` returns once it is back (or fails for good). A
        call `sent` (time.perf_counter) before it last came back died with its previous process: no new death."""
        with self.lock:
            if actor in self.lost or actor in self.reviving.values() or sent < self.back_at.get(actor, -math.inf):
                return
            self.idle = deque(a for a in self.idle if a != actor)
            self.failures[actor] += 1
            if self.failures[actor] >= max_failures:
                self.lost.add(actor)
            else:
                self.reviving[probe()] = actor

    def probes(self) -> list:
        with self.lock:
            return list(self.reviving)

    def revived(self, ref) -> None:
        """A probe finished: the actor is back in the pool, or lost when Ray gave up restarting it."""
        with self.lock:
            actor = self.reviving.pop(ref, None)
        if actor is None:
            return  # another render's loop took care of it
        try:
            ray.get(ref)
            with self.lock:
                self.back_at[actor] = time.perf_counter()
                self.idle.extend([actor] * self.depth)
        except RayActorError:
            with self.lock:
                self.lost.add(actor)

    def alive(self) -> bool:
        with self.lock:
            return len(self.lost) < self.count


@dataclass
class PullScheduler:
    """Hands ready tasks to free actors; survives actor deaths while any actor is left."""

    actors: list
    max_failures: int = 3  # deaths of one actor before it is given up (Ray restarts it in between)
    # fault injection: (stage, n) crashes the actor on the first run of the stage's n-th task (pipeline.graph.taskgraph.
    # stage_positions); (stage, n, "nan") makes its first result NaN; (stage, n, "slow") makes it a straggler
    faults: set[tuple] = field(default_factory=set)
    record: Callable[[dict], None] | None = None  # receives a ledger row per finished task
    info: dict[int, dict] = field(default_factory=dict)  # actor -> host, device (for the ledger)
    log: list[Dispatch] = field(default_factory=list)
    lease: Lease | None = None  # shared with other renders on the same actors; None = these actors are ours

    def __post_init__(self) -> None:
        self.lease = self.lease or Lease(len(self.actors))

    @property
    def failures(self) -> dict[int, int]:
        return self.lease.failures

    @property
    def lost(self) -> set[int]:
        return self.lease.lost

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
        free_at: dict[int, float] = {}  # actor -> when its last result came in
        by_id = {t.id: t for t in tasks}
        places = stage_positions(tasks, stage)
        waiting = {t.id: set(t.deps) for t in tasks}
        dependents: dict[int, list[int]] = defaultdict(list)
        for t in tasks:
            for d in t.deps:
                dependents[d].append(t.id)
        ready = [t.id for t in tasks if not t.deps]
        heapq.heapify(ready)
        lease = self.lease
        in_flight: dict[ray.ObjectRef, tuple[int, int, Dispatch, float]] = {}
        args: dict[int, tuple] = {}
        held: dict[ray.ObjectRef, ray.ObjectRef] = {}  # a call's first return -> its result (Task.handle)
        results: dict[int, Any] = {}
        arrived: deque = deque()  # calls whose results (or probes) are in, not yet taken
        total = len(tasks)
        try:

            def dispatch() -> None:
                """Hand ready tasks to free actors, smallest id first."""
                while ready:
                    actor = lease.take()
                    if actor is None:
                        break
                    tid = heapq.heappop(ready)
                    if tid not in args:
                        args[tid] = to_wire(by_id[tid].args(results))
                    place = places[tid]  # faults name a task by its stage and place in it
                    crash = next((m for m in FAULT_MODES if (*place, m) in self.faults), "")
                    crash = "exit" if place in self.faults else crash
                    self.faults -= {place, *((*place, m) for m in FAULT_MODES)}
                    call = self.actors[actor].run
                    if by_id[tid].handle:  # two returns: that it succeeded, and its result, which stays where it is
                        ref, held[ref] = call.options(num_returns=2).remote(
                            by_id[tid].method, *args[tid], crash=crash, held=True
                        )
                    else:
                        ref = call.remote(by_id[tid].method, *args[tid], crash=crash)
                    tries[tid] += 1
                    started.setdefault(tid, now())
                    entry = Dispatch(place[0], tid, actor, *payload(args[tid]), fault=crash)
                    self.log.append(entry)
                    in_flight[ref] = (tid, actor, entry, time.perf_counter())

            while len(results) < total:
                dispatch()
                if not in_flight and not lease.alive():
                    raise WorkersLost(self._lost_message(stage, len(results), total), results)
                if not arrived:
                    waitable = [*in_flight, *lease.probes()]
                    if not waitable:  # every live actor is busy with another render
                        time.sleep(0.01)
                        continue
                    # every result already in, with one call: when the driver falls behind, they queue up
                    arrived.extend(ray.wait(waitable, num_returns=len(waitable), timeout=0)[0])
                    if not arrived:
                        # with other renders on the same actors, wake up now and then to take an actor they gave back
                        arrived.extend(ray.wait(waitable, num_returns=1, timeout=0.02 if lease.shared else None)[0])
                    if not arrived:
                        continue
                ref = arrived.popleft()
                if ref not in in_flight:
                    lease.revived(ref)
                    continue
                tid, actor, entry, start = in_flight.pop(ref)
                kept = held.pop(ref, None)
                try:
                    value = ray.get(ref)
                except FloatingPointError as err:  # the worker's own health check (raised in the actor)
                    value = err
                except ObjectLostError as err:  # a result it reads by handle went with its node: make it again
                    lease.give(actor)
                    args.pop(tid, None)
                    lost = [d for d in by_id[tid].deps if by_id[d].handle and results.get(d) is not None]
                    if not lost:
                        raise
                    errors[tid].append(f"the results of tasks {lost} were lost ({type(err).__name__}); made again")
                    running = {t for t, *_ in in_flight.values()}
                    for d in lost:
                        del results[d]
                        for child in dependents[d]:
                            if child not in results and child not in running:
                                waiting[child].add(d)
                        heapq.heappush(ready, d)
                    ready[:] = [t for t in ready if not waiting[t]]
                    heapq.heapify(ready)
                    continue
                except RayActorError:
                    errors[tid].append(f"actor {actor} died")
                    if entry.fault in FAULT_MODES:  # a call queued behind the one that killed its actor: the fault
                        self.faults.add((*places[tid], entry.fault))  # meant for its result goes to the next try
                    # Ray restarts it (models reload); a probe that Ray retries returns once it is back
                    probe = self.actors[actor].info.options(max_task_retries=-1).remote
                    lease.died(actor, probe, self.max_failures, sent=start)
                    if tid not in results:
                        heapq.heappush(ready, tid)  # it runs on the next free actor
                    continue
                entry.seconds = time.perf_counter() - start
                lease.give(actor)
                # a call queued behind another (Lease.depth) starts when the actor is free of that one
                begun = started[tid] if tries[tid] > 1 else max(started[tid], free_at.get(actor, 0.0))
                free_at[actor] = now()
                if tid in results:
                    continue  # a duplicate: the first result stands
                task = by_id[tid]
                if task.handle and not isinstance(value, FloatingPointError):
                    value = kept  # the result stays where it was made: its readers get the reference (Task.handle)
                elif not isinstance(value, FloatingPointError):
                    # a result only the graph's handlers read (keep=False) is used in place: no copy on the driver
                    value = from_wire(value, copy=task.keep)
                if isinstance(value, FloatingPointError):  # the actor checked its result (cluster.wire.reply)
                    errors[tid].append(f"NaN/Inf on actor {actor}")
                    bad[tid].append(self._name(actor))
                    if len(bad[tid]) >= ATTEMPTS:
                        self._record(stage, by_id[tid], actor, begun, tries[tid], "failed", errors[tid])
                        raise bad_result_error(stage, by_id[tid], bad[tid])
                    heapq.heappush(ready, tid)  # once more, on the next free actor
                    continue
                results[tid] = value if task.keep else None
                for d in task.deps:  # a handle whose readers are all done lets its object go
                    if by_id[d].handle and all(c in results for c in dependents[d]):
                        results[d] = None
                # the freed actor takes its next task before the driver works on this result (on_result may be
                # slow: composites, canvas steps); tasks it makes ready wait for the next free actor
                dispatch()
                args.pop(tid, None)
                self._record(
                    stage, by_id[tid], actor, begun, tries[tid], "retried" if errors[tid] else "ok", errors[tid]
                )
                if on_result:
                    on_result(by_id[tid], value)
                if on_done:
                    on_done(by_id[tid])
                running = {t for t, *_ in in_flight.values()}
                for child in dependents[tid]:
                    waiting[child].discard(tid)
                    if not waiting[child] and child not in results and child not in running:  # (a task made again)
                        heapq.heappush(ready, child)
            return results
        finally:
            for _, actor, _, _ in in_flight.values():  # a failed run still frees its actors for other renders
                lease.give(actor)

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
