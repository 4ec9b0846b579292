"""The farm's worker actor: one per GPU, holding the models of the last few model sets (cluster/farm_pool.py starts
them). The models' libraries are imported in its methods: Ray imports this module in every client that looks a worker
up (`farm down` ends them by handle), and there they are not needed."""

from __future__ import annotations

import gc
import os
import time
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.graph.worker import TileWorker, WorkerConfig


class FarmWorker:
    """A worker actor holding the models of up to `max_models` model sets, as many as fit its device's memory
    by the pre-flight's weight estimates (least recently used goes first).

    Every call names its model set, so renders with different models can share the worker task by task."""

    def __init__(self, max_models: int = 2, memory_bytes: int = 0):
        self.max_models = max(1, max_models)
        self.memory_bytes = memory_bytes  # what the model sets may share; 0 = what the device has (plus theirs)
        self.resident: OrderedDict[WorkerConfig, TileWorker] = OrderedDict()
        self.weights: dict[WorkerConfig, int] = {}  # each resident set's estimated weights
        self.loads: list[dict] = []  # one entry per model load: model, seconds, the render that caused it
        self.evicted: list[str] = []  # the model of each set dropped, in order

    def _models(self, config: WorkerConfig, render_id: int) -> TileWorker:
        from pipeline.budget.memory import sets_to_evict
        from pipeline.budget.preflight import check_worker, worker_memory
        from pipeline.graph.worker import TileWorker

        worker = self.resident.get(config)
        if worker is not None:
            self.resident.move_to_end(config)
            return worker
        new, budget = worker_memory(config)
        sizes = [self.weights[c] for c in self.resident]
        # the device's free memory counts without the resident sets: they hold what dropping them gives back
        budget = replace(budget, available=self.memory_bytes or budget.available + sum(sizes))
        for _ in range(sets_to_evict(sizes, new, budget, self.max_models)):
            old, dropped = self.resident.popitem(last=False)
            self.weights.pop(old)
            self.evicted.append(old.model)
            device = dropped.device
            del dropped
            gc.collect()  # the models' memory is free before the next set loads
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        check_worker(config)  # its own GPU, before loading: a clear error instead of an out-of-memory mid-load
        start = time.perf_counter()
        worker = TileWorker(config)
        self.loads.append({"model": config.model, "seconds": time.perf_counter() - start, "render": render_id})
        self.resident[config] = worker
        self.weights[config] = new
        return worker

    def run(self, config: WorkerConfig, render_id: int, method: str, *args, crash: str = "", held: bool = False):
        """One unit of work on `config`'s models (loaded first if not resident); `crash` and `held` as in run_on."""
        from cluster.actor import run_on

        if crash == "exit":
            os._exit(1)  # before any load: a lost process, not a slow one
        return run_on(self._models(config, render_id), method, args, crash, held)

    def info(self) -> dict:
        from cluster.actor import where

        device = str(next(iter(self.resident.values())).device) if self.resident else ""
        resident = [c.model for c in self.resident]
        return where(device) | {"resident": resident, "loads": list(self.loads), "evicted": list(self.evicted)}
