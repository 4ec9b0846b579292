"""Checkpoints: an executor wrapper that stores every accepted result and replays stored ones.

A render is a fixed sequence of executor calls and task graphs (the plan decides it), so the n-th
run of a stage and a task id name the same unit of work in every run of the same spec. Stored
units are not run again: a stopped render resumes from its last finished tile batch, and since
stored results are the exact tensors, the image equals an uninterrupted render's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Protocol

from pipeline.graph.taskgraph import Executor, OnResult, Task

CACHED_CALLS = ("base", "detect")  # single calls worth keeping: model work with a stage output
# pixel-space tile stages are recomputed instead: at 8K their tiles hold several GB of float32 pixels,
# and the upscaler and the VAE decoder are quick next to the diffusion stages. The decode's GroupNorm
# statistics and the blends of its tiles go with it; the encode's latent tiles and statistics are small and kept.
RECOMPUTED_GRAPHS = ("upscale", "decode stats", "decode", "decode blend")


class Store(Protocol):
    """Where units of work are kept: `load` returns None for a unit not stored yet."""

    def load(self, key: str) -> Any | None: ...

    def save(self, key: str, value: Any) -> None: ...


def _with_stored(stored: dict[int, Any], args, done: dict[int, Any]) -> tuple:
    return args(stored | done)


class Checkpointed:
    """An Executor that saves each accepted result to `store` and skips units the store already holds."""

    def __init__(self, inner: Executor, store: Store, log=lambda text: None):
        self.inner = inner
        self.store = store
        self.log = log
        self.runs: Counter[str] = Counter()
        self.replayed = 0  # units taken from the store

    @property
    def record(self):
        return self.inner.record

    @record.setter
    def record(self, sink) -> None:
        self.inner.record = sink

    @property
    def progress(self):
        return getattr(self.inner, "progress", None)

    def share(self, value: Any) -> Any:
        return self.inner.share(value)

    def _key(self, stage: str) -> str:
        self.runs[stage] += 1
        return f"{stage}.{self.runs[stage]}"

    def call(self, stage: str, method: str, *args: Any) -> Any:
        if stage not in CACHED_CALLS:
            return self.inner.call(stage, method, *args)
        key = self._key(stage)
        value = self.store.load(key)
        if value is not None:
            self.replayed += 1
            return value
        value = self.inner.call(stage, method, *args)
        self.store.save(key, value)
        return value

    def run(self, stage: str, tasks: list[Task], on_result: OnResult | None = None) -> dict[int, Any]:
        key = self._key(stage)
        if stage in RECOMPUTED_GRAPHS:
            return self.inner.run(stage, tasks, on_result)
        stored = {}
        for task in tasks:
            if (task.stage or stage) in RECOMPUTED_GRAPHS:
                continue
            value = self.store.load(f"{key}.{task.id}")
            if value is not None:
                stored[task.id] = value
        if stored:
            self.replayed += len(stored)
            self.log(f"{stage}: {len(stored)} of {len(tasks)} task(s) taken from the run folder")
        for task in sorted(tasks, key=lambda t: t.id):  # the caller sees stored results as if they had run
            if task.id in stored:
                if on_result:
                    on_result(task, stored[task.id])
                if not task.keep:
                    stored[task.id] = None
        needed = _still_needed(stage, tasks, stored.keys())
        todo = [
            replace(t, deps=t.deps - stored.keys(), args=lambda done, t=t: _with_stored(stored, t.args, done))
            for t in tasks
            if t.id in needed
        ]

        def keep(task: Task, value: Any) -> None:
            if (task.stage or stage) not in RECOMPUTED_GRAPHS:
                self.store.save(f"{key}.{task.id}", value)
            if on_result:
                on_result(task, value)

        return stored | (self.inner.run(stage, todo, on_result=keep) if todo else {})


def _still_needed(stage: str, tasks: list[Task], stored) -> set[int]:
    """The tasks a resumed graph runs: every unstored task whose result is kept or that nothing reads (the
    graph's output), and the recomputed tasks (pixel stages, never stored) that one of those reads from."""
    read = {d for t in tasks for d in t.deps}
    by_id = {t.id: t for t in tasks}
    todo = [
        t.id for t in tasks if t.id not in stored and ((t.stage or stage) not in RECOMPUTED_GRAPHS or t.id not in read)
    ]
    needed: set[int] = set()
    while todo:
        task_id = todo.pop()
        if task_id not in needed:
            needed.add(task_id)
            todo.extend(d for d in by_id[task_id].deps if d not in stored)
    return needed
