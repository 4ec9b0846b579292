"""The farm's workers: one detached worker actor per GPU, on every node, and more when GPUs join the cluster.

Ray starts a worker again (max_restarts=-1) when its process dies, and when its node leaves, as soon as a GPU is
free for it: on a node that comes back, or any other. A node that brings more GPUs than the farm has workers for
(a new node, or one back with more GPUs) gets new workers from the controller, which looks for free GPUs every
GROW_S seconds (WorkerPool.grow). A controller is a WorkerPool: it owns `workers`, `lease`, `running`, `wake`.

The worker actor itself is cluster/farm_worker.py, imported where a worker starts: Ray imports the controller's
module wherever a client looks the controller up (`farm status`), and it loads no model libraries there.
"""

from __future__ import annotations

import time
import traceback

import ray
from ray.exceptions import RayActorError

from cluster.farm_names import NAMESPACE
from cluster.inline import actor_env

WORKER_PREFIX = "worker-"

GROW_S = 2.0  # how often the controller looks for GPUs that joined the cluster
PING_S = 10.0  # how long a worker may take to answer before it counts as not there
JOIN_S = 120.0  # how long a worker started for a joined GPU may take to start before it is given up


class WorkerPool:
    """The controller's workers: started, listed, and grown when the cluster gains GPUs."""

    def start_workers(self, count: int, requested: int | None, max_models: int) -> int:
        """Start (or find again, after a controller restart) `count` workers; returns `count`."""
        self.max_models = max_models
        self.requested = requested  # a cap on the workers, or None: one per GPU, whenever GPUs join
        self.workers = [self._worker(i) for i in range(count)]
        self.joining: list = []  # workers started for GPUs that joined, not yet handed to renders
        self.joining_since = 0.0
        return count

    def worker_infos(self) -> list[dict]:
        """Each worker's info; one that Ray is starting again (its process or node died) answers with an error at
        once, and is listed with `down` set and nothing loaded, so a render's end never waits on it or fails."""
        infos = []
        for ref in [w.info.remote() for w in self.workers]:
            try:
                infos.append(ray.get(ref))
            except RayActorError as err:
                infos.append({"node": "", "host": "", "pid": 0, "device": "", "resident": [], "loads": []})
                infos[-1]["down"] = type(err).__name__
        return infos

    def worker_health(self) -> dict:
        """What the shared lease knows of worker deaths: deaths per worker, workers given up, workers restarting."""
        with self.lease.lock:
            return {
                "failures": {int(k): v for k, v in self.lease.failures.items()},
                "lost": sorted(self.lease.lost),
                "reviving": sorted(self.lease.reviving.values()),
            }

    # --- workers: one per GPU, on every node --------------------------------------------------------------

    def _worker(self, index: int):
        """The detached worker actor `worker-<index>`: found again by name after a controller restart; Ray starts
        it again (its models reload) when its process or node dies, as soon as a GPU is free for it."""
        from cluster.farm_worker import FarmWorker

        return (
            ray.remote(FarmWorker)
            .options(
                name=f"{WORKER_PREFIX}{index}",
                namespace=NAMESPACE,
                lifetime="detached",  # a restarted controller finds its workers, models still loaded
                get_if_exists=True,
                max_restarts=-1,
                num_gpus=self.gpus,
                num_cpus=0 if self.gpus else 1,
                scheduling_strategy="SPREAD",  # with fewer workers than GPUs, over as many nodes as can be
                runtime_env=actor_env(),
            )
            .remote(self.max_models)
        )

    def watch(self) -> None:
        while True:
            time.sleep(GROW_S)
            try:
                self.grow()
            except Exception:  # a bug here must not end the thread: the farm keeps its workers
                traceback.print_exc()

    def grow(self) -> int:
        """Workers for GPUs the cluster gained since the farm started (a node joined, or came back with more GPUs
        than it had): started, and handed to renders once they answer while no render runs (a running render
        knows only the workers it started with). Returns how many joined."""
        from cluster.executor import worker_count

        if self.gpus <= 0 or self.draining:
            return 0
        if not self.joining:
            missing = worker_count(self.requested, self.gpus) - len(self.workers)
            if missing <= 0 or self.running or not self._all_answer():
                return 0  # a worker Ray is starting again takes a returning GPU first: start none meanwhile
            free = int(ray.available_resources().get("GPU", 0) / self.gpus + 1e-9)  # GPUs no one else holds
            first = len(self.workers)
            self.joining = [self._worker(i) for i in range(first, first + min(missing, free))]
            self.joining_since = time.monotonic()
            if not self.joining:
                return 0
        ready, _ = ray.wait([w.info.remote() for w in self.joining], num_returns=len(self.joining), timeout=PING_S)
        if len(ready) < len(self.joining):
            if time.monotonic() - self.joining_since > JOIN_S:  # its GPU went to someone else: none waits on it
                for handle in self.joining:
                    ray.kill(handle, no_restart=True)
                self.joining = []
            return 0
        with self.wake:
            if self.running:
                return 0  # added after the running renders end
            first = len(self.workers)
            self.workers += self.joining
            with self.lease.lock:
                self.lease.count = len(self.workers)
                self.lease.idle.extend(range(first, len(self.workers)))
            joined, self.joining = len(self.joining), []
        return joined

    def _all_answer(self) -> bool:
        refs = [w.info.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PING_S)
        if len(ready) < len(refs):
            return False
        try:
            ray.get(ready)
        except RayActorError:  # restarting, or its node is gone
            return False
        return True
