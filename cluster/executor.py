"""The Ray executor: connect, check the cluster, start one actor per GPU, run the plan over them.

The driver holds the plan, the scaffold (put in the object store once) and the canvas; actors do
every model call. It runs the same worker calls and task graphs as the local executor, so the
image is the same for the local executor and for 1, 2 or N actors.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.address import reachable
from cluster.inline import inline_tile_payloads
from pipeline.errors import RenderError, UserError
from pipeline.graph.checkpoint import Checkpointed
from pipeline.graph.clock import Clock
from pipeline.graph.health import stage_row
from pipeline.graph.progress import Progress, no_progress, task_progress
from pipeline.graph.taskgraph import Task
from pipeline.graph.worker import WorkerConfig
from pipeline.plan import RenderPlan
from pipeline.render import RenderResult, render


class ClusterError(RenderError):
    """The cluster lost what the render needs (every worker); names what was lost and what was kept."""


PACKAGES = ("farm", "pipeline", "cluster")  # tilefarm's top-level packages


def shadowing_folders(folder: Path) -> list[str]:
    """Folders in `folder` named like tilefarm's packages that are not them. Ray starts the actors a driver
    creates in the driver's working directory, first on their sys.path, where such a folder hides the
    installed package (a namespace package found first beats an editable install's import hook)."""
    root = Path(__file__).resolve().parents[1]
    return [name for name in PACKAGES if (folder / name).is_dir() and (folder / name).resolve() != root / name]


def check_working_dir(command: str) -> None:
    """Refuse, before Ray starts any actor, to run where a folder would hide tilefarm's packages from them."""
    found = shadowing_folders(Path.cwd())
    if found:
        names = " and ".join(f"`{name}/`" for name in found)
        raise UserError(
            f"{command}: this folder ({Path.cwd()}) holds {names}; Ray runs the actors this command starts in "
            f"this folder, with it first on Python's path, where {'they' if len(found) > 1 else 'it'} would hide "
            f"tilefarm's own package of that name and every task would fail. Run the command from another folder "
            f"(paths on the command line may be absolute) or rename the folder."
        )


def connect(address: str) -> None:
    """Join the cluster at `address`; 'auto' joins a running one (RAY_ADDRESS or local) or starts one here."""
    import ray

    check_working_dir("--cluster")
    if address != "auto":
        reachable(address)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    inline_tile_payloads()
    try:
        if address != "auto":
            ray.init(address=address, log_to_driver=True)
            return
        try:
            ray.init(address="auto", log_to_driver=True)
        except ConnectionError:
            ray.init(include_dashboard=False, log_to_driver=True)
    except RuntimeError as err:
        # Ray refuses a driver whose Ray or Python version differs from the cluster's (patch level included)
        versions = re.findall(r"Ray: (\S+)\s+Python: (\S+)", str(err))
        if not str(err).startswith("Version mismatch") or len(versions) != 2:
            raise
        ray.shutdown()
        (cluster_ray, cluster_python), (our_ray, our_python) = versions
        raise UserError(
            f"--cluster {address}: the Ray cluster at {_cluster_address(address)} runs Ray {cluster_ray} on Python "
            f"{cluster_python}, but tilefarm runs Ray {our_ray} on Python {our_python} ({sys.executable}), and Ray "
            f"needs both the same. {_FROM_OUR_ENV}"
        ) from None


_FROM_OUR_ENV = (
    "Start the cluster from tilefarm's environment: `ray stop` there, then `.venv/bin/ray start --head` on the "
    "head and `.venv/bin/ray start --address HEAD:6379` on each node (same venv path everywhere)"
)


def _cluster_address(address: str) -> str:
    """The GCS address behind `address` ('auto' resolves through RAY_ADDRESS or the local cluster file)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto") or "this machine"
    except Exception:  # a private Ray helper: only ever makes the message less precise
        return os.environ.get("RAY_ADDRESS") or "this machine"


def _node_check():
    """The per-node check; nested so that Ray ships it by value and it also runs on a worker that cannot
    import tilefarm (a cluster started from another Python environment), to say so."""

    def check_node(paths: list[str]) -> dict:
        import importlib
        import platform
        import sys
        from pathlib import Path

        import ray

        try:
            importlib.import_module("cluster.actor")  # what the GPU actors will import there
            import_error = ""
        except Exception as err:  # any failure here is the finding
            import_error = f"{type(err).__name__}: {err}"
        return {
            "host": socket.gethostname(),
            "python": sys.executable,
            "python_version": platform.python_version(),
            "ray_version": ray.__version__,
            "import_error": import_error,
            "missing": [p for p in paths if p and not Path(p).expanduser().exists()],
        }

    return check_node


def _foreign_cluster(node: dict, report: dict) -> UserError:
    """The error for a cluster whose workers cannot import tilefarm: what runs there, and the fix."""
    import platform

    import ray

    return UserError(
        f"the Ray cluster at {ray.get_runtime_context().gcs_address} cannot run tilefarm: on node {report['host']} "
        f"({node['NodeManagerAddress']}) its workers run {report['python']} (Python {report['python_version']}, "
        f"Ray {report['ray_version']}), which cannot import tilefarm ({report['import_error']}); this driver runs "
        f"{sys.executable} (Python {platform.python_version()}, Ray {ray.__version__}). {_FROM_OUR_ENV}"
    )


def gpus_per_worker_for(requested: float | None) -> float:
    """Default: one GPU per actor on a cluster with GPUs, CPU actors on one without."""
    import ray

    if requested is not None:
        return requested
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1.0
    print("tilefarm: the cluster has no GPUs; running CPU workers", file=sys.stderr)
    return 0.0


def preflight(config: WorkerConfig, gpus_per_worker: float) -> None:
    """Before any work: the cluster has the GPUs asked for, and every GPU node imports tilefarm and sees the
    model files."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    total_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker > 0 and total_gpus < gpus_per_worker:
        raise UserError(
            f"the cluster has {total_gpus:g} GPUs but each worker needs {gpus_per_worker:g}; add GPU nodes "
            "(`ray start --address HEAD:6379` on a GPU machine) or pass --gpus-per-worker 0 to run on CPUs"
        )
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("GPU", 0) > 0 or not gpus_per_worker)]
    check = ray.remote(num_cpus=0)(_node_check())
    paths = [config.model, config.upscaler, config.model_config, config.detector, config.lora]
    paths += [config.vae, config.clip_l, config.t5, config.t5_tokenizer, config.comfy_models]
    reports = ray.get(
        [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes
        ]
    )
    for node, report in zip(nodes, reports, strict=True):
        if report["import_error"]:
            raise _foreign_cluster(node, report)
        if report["missing"]:
            raise UserError(
                f"{', '.join(report['missing'])} does not exist on worker node {report['host']} "
                f"({node['NodeManagerAddress']}); every GPU node needs the model files at the same path"
            )


def worker_count(requested: int | None, gpus_per_worker: float) -> int:
    """One actor per GPU (or per GPU fraction) unless capped by --workers."""
    import ray

    if gpus_per_worker <= 0:
        return requested or 1
    fit = int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker)
    return max(1, min(fit, requested) if requested else fit)


class ClusterExecutor:
    """Worker calls and task graphs over Ray actors, with progress per stage and group on the driver."""

    def __init__(
        self,
        actors: list,
        progress: Progress = no_progress,
        faults=None,
        max_failures: int = 3,
        keep_path: Path | None = None,
        lease=None,
    ):
        from cluster.scheduler import PullScheduler

        self.scheduler = PullScheduler(actors, max_failures=max_failures, faults=set(faults or ()), lease=lease)
        self.progress = progress
        self.keep_path = keep_path  # where finished work goes if every worker is lost

    def share(self, value: Any) -> Any:
        import ray

        from cluster.wire import to_wire

        return ray.put(to_wire(value))

    @property
    def record(self):
        return self.scheduler.record

    @record.setter
    def record(self, sink) -> None:
        import ray

        self.scheduler.record = sink
        if sink and not self.scheduler.info:  # who ran what, for the ledger
            infos = ray.get([a.info.options(max_task_retries=-1).remote() for a in self.scheduler.actors])
            self.scheduler.info = dict(enumerate(infos))

    def call(self, stage: str, method: str, *args: Any) -> Any:
        return self.run(stage, [Task(0, method, lambda done: args, group=stage)])[0]

    def run(self, stage: str, tasks: list[Task], on_result=None) -> dict[int, Any]:
        from cluster.scheduler import WorkersLost

        with task_progress(self.progress, stage, tasks) as done:
            try:
                return self.scheduler.run(stage, tasks, on_done=done, on_result=on_result)
            except WorkersLost as lost:
                raise ClusterError(f"{lost}; {self._keep(stage, lost.results)}") from None

    def _keep(self, stage: str, results: dict[int, Any]) -> str:
        """Write the stage's finished results (tensors by task and tile id) for a later resume."""
        if self.keep_path is None or not results:
            return "nothing finished in this stage was kept"
        import ray
        from safetensors.torch import save_file

        tensors = {}
        for task, value in results.items():
            if value is None or isinstance(value, ray.ObjectRef):  # kept by the render itself, or held on a node
                continue
            items = value.items() if isinstance(value, dict) else [("out", value)]
            for key, tensor in items:
                tensors[f"{task}/{key}"] = tensor.contiguous()
        tmp = self.keep_path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"stage": stage})
        os.replace(tmp, self.keep_path)
        return f"the {len(results)} finished {stage} tasks were saved to {self.keep_path}"


@dataclass
class ClusterRun:
    plan: RenderPlan
    result: RenderResult
    clock: Clock
    workers: int
    executor: ClusterExecutor


class ActorPool:
    """Actors started once and used by every render that needs the same models (a batch); started again
    only when a render needs other models and no render is using them. Renders running at the same time
    share one Lease, so each actor holds at most two calls (cluster.scheduler.DEPTH), whichever render they
    belong to."""

    def __init__(
        self,
        address: str = "auto",
        workers: int | None = None,
        gpus_per_worker: float | None = None,
        shared: bool = False,
    ):
        connect(address)
        self.gpus_per_worker = gpus_per_worker_for(gpus_per_worker)
        self.workers = workers
        self.shared = shared  # several renders at once
        self.config: WorkerConfig | None = None
        self.actors: list = []
        self.lease = None
        self.users = 0
        self.changed = threading.Condition()

    @contextmanager
    def using(self, config: WorkerConfig) -> Iterator[list]:
        """The actors for `config`, held for one render; a switch of models waits until no render uses them."""
        from cluster.scheduler import Lease

        with self.changed:
            while config != self.config and self.users:
                self.changed.wait()
            if config != self.config:
                self.close()
                preflight(config, self.gpus_per_worker)
                from cluster.actor import start_actors

                count = worker_count(self.workers, self.gpus_per_worker)
                self.actors = start_actors(config, count, self.gpus_per_worker, max_restarts=3)
                self.lease = Lease(count, shared=self.shared)
                self.config = config
            self.users += 1
        try:
            yield self.actors
        finally:
            with self.changed:
                self.users -= 1
                self.changed.notify_all()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.config, self.lease = [], None, None


def run_cluster(
    plan: RenderPlan,
    address: str = "auto",
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: Progress = no_progress,
    faults=None,
    keep_path: Path | None = None,
    log=lambda text: None,
    store=None,
    record=None,
    pool: ActorPool | None = None,
) -> ClusterRun:
    """Connect, check, start actors and run the plan on them; `store` keeps finished units (resume),
    `record` receives ledger rows. With a `pool` (a batch) its actors are used and left running."""
    own_pool = pool is None
    pool = pool or ActorPool(address, workers, gpus_per_worker)
    clock = Clock()
    if record:
        clock.on_stage = lambda name, start, end: record(stage_row(name, start, end))
    try:
        with ExitStack() as hold:
            with clock.stage("load"):
                actors = hold.enter_context(pool.using(WorkerConfig.from_spec(plan.spec)))
            executor = ClusterExecutor(actors, progress, faults=faults, keep_path=keep_path, lease=pool.lease)
            executor.record = record
            result = render(plan, Checkpointed(executor, store, log) if store else executor, clock=clock, log=log)
    finally:
        if own_pool:
            pool.close()
    return ClusterRun(plan, result, clock, len(actors), executor)
