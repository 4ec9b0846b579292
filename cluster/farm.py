"""The warm farm: a long-lived controller and worker actors that keep models loaded across renders.

One farm per Ray cluster, in the namespace `tilefarm`: a detached, named, restartable controller
owns the queue (SQLite on its node, cluster/queue.py) and runs up to `max_running` renders at once,
each with the same render() and ClusterExecutor a `--cluster` render uses, over one shared set of
detached worker actors (one per GPU) and one shared Lease, so each worker runs one task at a time
whichever render it belongs to (cluster/farm_pool.py starts the workers, and more when GPUs join the cluster;
Ray starts a dead one again). A worker keeps the models of the last few model sets resident
(LRU), so only a render with new models loads anything. The PNG is written on the controller's node
with the same save_png a local render uses; clients fetch its bytes (cluster/farm_client.py).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.farm_pool import WorkerPool
from cluster.queue import CANCELED, DONE, FAILED, QUEUED, RUNNING, RenderQueue, expire_results, expired_message
from pipeline.errors import RenderError, UserError
from pipeline.graph.progress import Bar

if TYPE_CHECKING:
    from pipeline.graph.worker import WorkerConfig

POLL_S = 0.2  # how often the dispatcher looks for queued renders when nothing woke it
RESULT_TTL_H = 24.0  # hours a finished render's PNG is kept (farm up --result-ttl)
SWEEP_S = 60.0  # how often the dispatcher deletes expired PNGs


class Canceled(Exception):
    """A render was stopped at a task boundary (cancel, or a farm going down)."""


class _Run:
    """`handle.run` as one render sees it: its calls carry the render's model set; a stopped render dispatches
    nothing more (the actor the scheduler just took goes back to the lease first)."""

    def __init__(self, handle, index: int, config: WorkerConfig, render_id: int, lease, stop: threading.Event, **kw):
        self.handle, self.index, self.config, self.render_id = handle, index, config, render_id
        self.lease, self.stop, self.call_options = lease, stop, kw

    def options(self, **options) -> _Run:
        """The same call with Ray's call options (num_returns=2 for a result held where it is made: run_on)."""
        return _Run(self.handle, self.index, self.config, self.render_id, self.lease, self.stop, **options)

    def remote(self, method: str, *args, crash: str = "", held: bool = False):
        if self.stop.is_set():
            self.lease.give(self.index)
            raise Canceled
        run = self.handle.run.options(**self.call_options) if self.call_options else self.handle.run
        return run.remote(self.config, self.render_id, method, *args, crash=crash, held=held)


class BoundWorker:
    """A farm worker bound to one render: what PullScheduler calls (`run.remote`, `info.options(...)`)."""

    def __init__(self, handle, index: int, config: WorkerConfig, render_id: int, lease, stop: threading.Event):
        self.run = _Run(handle, index, config, render_id, lease, stop)
        self.info = handle.info


class _Counter(Bar):
    def __init__(self, cell: list):
        self.cell = cell

    def update(self, n: int = 1) -> None:
        self.cell[0] += n


class Running:
    """A render in flight: its stop flag, why it was stopped, and its progress per stage."""

    def __init__(self, priority: int = 0, render_id: int = 0):
        self.priority, self.render_id = priority, render_id  # the id ranks equals by submit order in the lease
        self.stop = threading.Event()
        self.reason = ""
        self.progress: dict[str, list[int]] = {}  # stage -> [done, total]

    @contextmanager
    def sink(self, stage: str, total: int, unit: str):
        cell = self.progress.setdefault(stage, [0, 0])
        cell[1] += total
        yield _Counter(cell)


class Controller(WorkerPool):
    """The farm's controller actor: queue, dispatcher, render threads, worker actors."""

    def __init__(
        self,
        state_dir: str,
        workers: int | None,
        gpus_per_worker: float | None,
        max_running: int = 2,
        max_models: int = 2,
        result_ttl_h: float = RESULT_TTL_H,
    ):
        from cluster.executor import gpus_per_worker_for, worker_count
        from cluster.farm_lease import PriorityLease

        self.result_ttl_s = result_ttl_h * 3600  # 0: images are kept until removed by hand

        self.state_dir = Path(state_dir)
        self.results = self.state_dir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.queue = RenderQueue(self.state_dir / "queue.sqlite")
        self.queue.requeue_running()  # cut short by a controller restart: they run again from their start
        self.resumed = self.queue.queued()
        self.gpus = gpus_per_worker_for(gpus_per_worker)
        self.max_running = max(1, max_running)
        count = self.start_workers(worker_count(workers, self.gpus), workers, max_models)
        self.lease = PriorityLease(count)
        self.running: dict[int, Running] = {}
        self.draining = False
        self.wake = threading.Condition()
        threading.Thread(target=self._dispatch, name="farm-dispatch", daemon=True).start()
        threading.Thread(target=self.watch, name="farm-grow", daemon=True).start()

    def ready(self) -> dict:
        return {
            "workers": len(self.workers),
            "gpus_per_worker": self.gpus,
            "state_dir": str(self.state_dir),
            "max_running": self.max_running,
            "resumed": self.resumed,
            "pid": os.getpid(),
        }

    def idle_workers(self) -> int:
        """Workers no render holds (all of them when nothing runs)."""
        with self.lease.lock:
            return len(self.lease.idle)

    # --- the clients' calls -------------------------------------------------------------------------------

    def submit(self, spec: dict, options: dict, priority: int = 0) -> int:
        if self.draining:
            raise UserError("the farm is going down and takes no new renders; run `farm up` again")
        render_id = self.queue.add(spec, options, priority)
        with self.wake:
            self.wake.notify_all()
        return render_id

    def status(self, render_id: int) -> dict | None:
        record = self.queue.get(render_id)
        if record is not None:
            live = self.running.get(render_id)
            if live:
                record["progress"] = {k: list(v) for k, v in live.progress.items()}
            else:  # ended: how far it got, so a render done between two polls still shows its tiles
                record["progress"] = (record.get("stats") or {}).get("progress", {})
        return record

    def list(self, limit: int = 50) -> list[dict]:
        return self.queue.list(limit)

    def cancel(self, render_id: int) -> str | None:
        """Queued: canceled now; running: stopped at its next task boundary. Returns the state it was in."""
        record = self.queue.get(render_id)
        if record is None:
            return None
        if record["state"] == QUEUED:
            self.queue.update(render_id, state=CANCELED, finished=time.time())
        live = self.running.get(render_id)
        if live is not None:
            live.reason = CANCELED
            live.stop.set()
        return record["state"]

    def prio(self, render_id: int, priority: int) -> str | None:
        record = self.queue.get(render_id)
        if record is None:
            return None
        self.queue.update(render_id, priority=priority)
        if render_id in self.running:
            self.running[render_id].priority = priority  # its next request for a worker counts with it
        with self.wake:
            self.wake.notify_all()
        return record["state"]

    def image(self, render_id: int) -> bytes | None:
        record = self.queue.get(render_id)
        if record is None or record["state"] != DONE:
            return None
        if record["expired"]:
            raise UserError(expired_message(record))
        return Path(record["result"]).read_bytes()

    def drain(self, timeout: float = 60.0) -> list[int]:
        """No new work; running renders stop at their next task boundary and are queued again. Returns them."""
        self.draining = True
        stopped = list(self.running)
        for live in list(self.running.values()):
            live.reason = QUEUED
            live.stop.set()
        end = time.monotonic() + timeout
        with self.wake:
            while self.running and time.monotonic() < end:
                self.wake.wait(0.1)
        return stopped

    # --- the controller's own threads ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        swept = 0.0
        while True:
            if time.time() - swept >= SWEEP_S:
                swept = time.time()
                try:
                    expire_results(self.queue, self.result_ttl_s, swept)
                except OSError:  # a PNG that cannot be deleted: the next sweep tries again; the queue goes on
                    traceback.print_exc()
            with self.wake:
                record = None if self.draining else self.queue.next_queued()
                if record is not None and len(self.running) >= self.max_running:
                    # full: only a render that outranks every running one starts now (it takes the workers
                    # first at their next task), so it waits one task, not a whole render
                    if record["priority"] <= max(r.priority for r in self.running.values()):
                        record = None
                if record is None:
                    self.wake.wait(POLL_S)
                    continue
                self.running[record["id"]] = Running(record["priority"], record["id"])
                self.queue.update(record["id"], state=RUNNING, started=time.time())
            threading.Thread(target=self._render, args=(record,), name=f"render-{record['id']}", daemon=True).start()

    def _render(self, record: dict) -> None:
        render_id, live = record["id"], self.running[record["id"]]
        try:
            stats = self._run(record, live)
            self.queue.update(render_id, state=DONE, finished=time.time(), result=stats.pop("result"), stats=stats)
        except Canceled:
            state = live.reason or CANCELED
            if state == QUEUED:  # the farm went down: it runs again, from its start, when the farm is up
                self.queue.update(render_id, state=QUEUED, started=None)
            else:  # how far it got, for `farm status`
                progress = {k: list(v) for k, v in live.progress.items()}
                self.queue.update(render_id, state=state, finished=time.time(), stats={"progress": progress})
        except (UserError, RenderError) as err:
            self.queue.update(render_id, state=FAILED, finished=time.time(), error=str(err))
        except Exception as err:  # a bug: the render fails, the farm keeps serving
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            self.queue.update(render_id, state=FAILED, finished=time.time(), error=f"internal error: {detail}")
            traceback.print_exc()
        finally:
            with self.wake:
                self.running.pop(render_id, None)
                self.wake.notify_all()

    def _run(self, record: dict, live: Running) -> dict:
        import torch

        from cluster.executor import ClusterExecutor, preflight
        from farm.executor import prepare
        from farm.output import save_png
        from pipeline.graph.clock import Clock
        from pipeline.graph.worker import WorkerConfig
        from pipeline.render import render
        from pipeline.spec import RenderSpec

        render_id, options = record["id"], record["options"]
        plan = prepare(RenderSpec.from_dict(record["spec"], f"render {render_id}"), "cpu", cluster=True)
        # the client's thread count: CPU kernels sum in an order that depends on it (see WorkerConfig.from_spec)
        threads = int(options.get("cpu_threads") or torch.get_num_threads())
        torch.set_num_threads(threads)
        config = replace(WorkerConfig.from_spec(plan.spec), cpu_threads=threads)
        preflight(config, self.gpus)
        self.lease.local.owner = live
        actors = [BoundWorker(h, i, config, render_id, self.lease, live.stop) for i, h in enumerate(self.workers)]
        executor = ClusterExecutor(actors, live.sink, lease=self.lease)
        clock = Clock()
        result = render(plan, executor, clock=clock)
        if live.stop.is_set():
            raise Canceled  # stopped after its last dispatch: what finished is not this render's image
        path = self.results / f"{render_id}.png"
        save_png(result.image, plan, path, bool(options.get("metadata", True)))
        loads = [e for info in self.worker_infos() for e in info["loads"] if e["render"] == render_id]
        used = sorted({d.actor for d in executor.scheduler.log})
        return {
            "result": str(path),
            "stages": dict(clock.stages),
            "load_seconds": sum(e["seconds"] for e in loads),
            "loads": len(loads),
            "workers": used,
            "progress": {k: list(v) for k, v in live.progress.items()},  # each task counted once: done == total
        }
