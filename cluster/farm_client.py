"""Starting, stopping and talking to the warm farm (cluster/farm.py) from any machine of the Ray cluster."""

from __future__ import annotations

import os
import time

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.address import reachable
from cluster.farm import RESULT_TTL_H, Controller
from cluster.farm_names import CONTROLLER, NAMESPACE
from cluster.inline import actor_env, inline_tile_payloads
from pipeline.errors import UserError

GONE_TIMEOUT_S = 30.0  # how long `farm down` waits for Ray to report the killed actors gone
RESTART_WAIT_S = 120.0  # how long a client waits for a restarting controller


def join(address: str, flag: str = "--address") -> None:
    """Join a running Ray cluster (given with `flag`); never start one (a farm started inside this process would
    end with it)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    inline_tile_payloads()
    if address != "auto":
        reachable(address, flag)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except ConnectionError as err:
        raise UserError(
            f"Ray cluster {address}: could not join it ({str(err).splitlines()[0]}); start one with "
            "`ray start --head`, give the head's HOST:PORT, and with Ray's token auth on (the default) run with "
            "RAY_AUTH_MODE=token"
        ) from None


def controller(address: str, flag: str = "--address"):
    """The farm's controller actor; a clear error when no farm is up."""
    join(address, flag)
    try:
        return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
    except ValueError:
        raise UserError(f"no farm is up on the Ray cluster at {address}; start one with `farm up`") from None


def call(method, *args):
    """A controller call; a UserError raised there is raised here with its own message, no traceback. While
    Ray restarts the controller (its process died) the call is tried again, for RESTART_WAIT_S at most."""
    end = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(method.remote(*args))
        except RayTaskError as err:
            if isinstance(err.cause, UserError):
                raise UserError(str(err.cause)) from None
            raise
        except RayActorError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def up(
    address: str,
    state_dir: str,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    max_running: int = 2,
    max_models: int = 2,
    result_ttl_h: float = RESULT_TTL_H,
) -> dict:
    """Start the farm (the controller on this node, where its queue file lives) or report the running one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.executor import check_working_dir

    check_working_dir("farm up")  # the farm's actors run in this folder
    join(address)
    try:
        existing = ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        return call(existing.ready) | {"already": True}
    except ValueError:
        pass
    from cluster.executor import preflight
    from pipeline.graph.worker import WorkerConfig

    preflight(WorkerConfig("", "", "", "auto"), 0)  # every node imports tilefarm: a foreign cluster is refused here
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = (
        ray.remote(Controller)
        .options(
            name=CONTROLLER,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,  # a restarted controller reads its queue back and resumes
            max_concurrency=16,  # clients' calls are served while renders run in its threads
            num_cpus=0,
            scheduling_strategy=here,
            runtime_env=actor_env(),  # it sends the renders' calls: tile payloads inline, as a driver does
        )
        .remote(state_dir, workers, gpus_per_worker, max_running, max_models, result_ttl_h)
    )
    return call(handle.ready) | {"already": False}


def farm_actors() -> list[str]:
    """Names of the live actors in the farm's namespace."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def down(address: str, timeout: float = 60.0) -> list[int]:
    """Drain (running renders stop at a task boundary and are queued again), then end every farm actor.
    Returns the ids of the renders put back in the queue."""
    join(address)
    requeued: list[int] = []
    try:  # first: while it drains the controller refuses new renders (the HTTP API answers 503)
        requeued = call(ray.get_actor(CONTROLLER, namespace=NAMESPACE).drain, timeout)
    except ValueError:
        pass  # no controller: workers of a farm whose controller was killed are still ended below
    try:
        from cluster.farm_api import stop_api
    except ImportError:  # no Ray Serve here: no API was started from this environment
        pass
    else:
        stop_api()
    for name in farm_actors():
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # gone meanwhile
    end = time.monotonic() + GONE_TIMEOUT_S
    while farm_actors() and time.monotonic() < end:
        time.sleep(0.1)
    left = farm_actors()
    if left:
        raise UserError(f"farm down: Ray still reports {', '.join(left)} alive after {GONE_TIMEOUT_S:g} s")
    return requeued


def start_api(host: str, port: int, api_key: str, roots: list[str]) -> str:
    """The HTTP API (Ray Serve) in front of the running farm; returns its URL."""
    try:
        from cluster.farm_api import start_api as start
    except ImportError as err:
        raise UserError(f"the HTTP API needs Ray Serve ({err}); install it with `pip install 'ray[serve]'`") from None
    return start(host, port, api_key, roots)
