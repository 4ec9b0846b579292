"""The GPU actor: one TileWorker per GPU (or GPU fraction), models loaded once in __init__."""

from __future__ import annotations

import os
import socket

import ray

from cluster.inline import actor_env
from cluster.wire import from_wire, reply
from pipeline.graph.canvas import Patch
from pipeline.graph.tree import walk
from pipeline.graph.worker import TileWorker, WorkerConfig


class GpuWorker:
    """Ray actor around a TileWorker; the device comes from torch, never from Ray's (possibly fake) GPU ids."""

    def __init__(self, config: WorkerConfig):
        from pipeline.budget.preflight import check_worker

        check_worker(config)  # its own GPU, before loading: a clear error instead of an out-of-memory mid-load
        self.worker = TileWorker(config)

    def run(self, method: str, *args, crash: str = "", held: bool = False):
        return run_on(self.worker, method, args, crash, held)

    def info(self) -> dict:
        return where(str(self.worker.device))


READ_ONLY = frozenset({"blend_cells"})  # worker methods that never write into their arguments


def run_on(worker: TileWorker, method: str, args: tuple, crash: str = "", held: bool = False):
    """One unit of work on a worker, as an actor runs it: arguments off the wire, the result checked and back on
    it. `crash` is fault injection: "exit" kills the process as a lost GPU or node would; "nan" and "slow" as in
    cluster.wire.reply. `held`: the result is kept where it was made (Task.handle) and the call returns two values
    (Ray's num_returns=2): True, which tells the driver the call succeeded, and the result, which it never fetches."""
    if crash == "exit":
        os._exit(1)
    # a method that only reads its inputs takes Ray's zero-copy views of the object store as they are
    value = reply(getattr(worker, method)(*from_wire(fetch_patches(args), copy=method not in READ_ONLY)), crash)
    return (True, value) if held else value


def fetch_patches(args: tuple) -> tuple:
    """The arguments with each Patch's tile outputs fetched through their handles (Ray resolves only the handles
    that are arguments themselves); a lost one raises ObjectLostError, and the driver makes it again. They are
    only read (Patch.pixels), so Ray's zero-copy views of the object store are used as they are."""
    return walk(
        args, lambda v: v.with_values(from_wire(ray.get(list(v.values)), copy=False)) if isinstance(v, Patch) else v
    )


def where(device: str) -> dict:
    """The actor's node, host, process and device, for the ledger and for health checks."""
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(), "device": device}


def start_actors(config: WorkerConfig, count: int, gpus: float, max_restarts: int) -> list:
    """Start `count` actors with `gpus` GPUs each; a killed actor is restarted (its models reload)."""
    options = dict(num_gpus=gpus, num_cpus=0 if gpus else 1, max_restarts=max_restarts, runtime_env=actor_env())
    cls = ray.remote(GpuWorker).options(**options)
    return [cls.remote(config) for _ in range(count)]
