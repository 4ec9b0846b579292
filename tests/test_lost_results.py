"""A result passed by handle (Task.handle) lives on the node that made it: when that node leaves before the
task reading it has run, the scheduler makes the result again and the reader gets the same value.

One real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a head without workers and two
nodes with one actor each; the node holding the handle's object is removed between the two tasks."""

import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.actor import run_on  # noqa: E402
from cluster.scheduler import PullScheduler  # noqa: E402
from pipeline.geometry.chess import cover_grid  # noqa: E402
from pipeline.geometry.resize import as_pixels  # noqa: E402
from pipeline.graph.canvas import HeldCanvas  # noqa: E402
from pipeline.graph.taskgraph import Task  # noqa: E402


class Maker:
    """A worker whose tiles are made from a seed (the same bytes wherever they run) and read by a reader."""

    def make(self, seed: int) -> torch.Tensor:
        # 3 MB: over Ray's inline limit (cluster.inline.INLINE_BYTES), so it stays in the object store where it is made
        return torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(seed))

    def total(self, *tiles: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.flatten()[:8] for t in tiles])

    def total_of(self, patch) -> torch.Tensor:
        return self.total(as_pixels(patch))


class MakerActor:
    def __init__(self):
        self.worker = Maker()

    def run(self, method: str, *args, crash: str = "", held: bool = False):
        return run_on(self.worker, method, args, crash, held)

    def info(self) -> dict:
        return {"host": "test", "pid": os.getpid(), "device": "cpu"}


@pytest.fixture
def two_nodes():
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    address_file = get_ray_address_file(None)
    had_address = os.path.exists(address_file)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    if not had_address:  # nobody else's `ray.init("auto")` should join it
        os.remove(address_file)
    nodes = [cluster.add_node(num_cpus=1, resources={f"node{i}": 1}) for i in range(2)]
    here = Path(__file__).parent  # the workers import the test's actor by module
    env = {"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}}
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False, runtime_env=env)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _reads(by_patch: bool) -> list[Task]:
    """A tile made and held where it is made, then read: by its handle, or through a Patch of a HeldCanvas (the
    handle inside the argument, fetched by the reading actor)."""
    if not by_patch:
        return [
            Task(0, "make", lambda done: (7,), stage="make", handle=True),
            Task(1, "total", lambda done: (done[0],), deps=frozenset({0}), stage="read"),
        ]
    canvas = HeldCanvas(cover_grid(512, 512, 512, 0), 3, torch.float32)
    canvas.task_of[0] = 0
    return [
        Task(0, "make", lambda done: (7,), stage="make", handle=True),
        Task(
            1,
            "total_of",
            lambda done: (canvas.read((0, 0, 512, 512)).resolved(done),),
            deps=frozenset({0}),
            stage="read",
        ),
    ]


@pytest.mark.parametrize("by_patch", [False, True], ids=["handle", "patch"])
def test_a_result_lost_with_its_node_is_made_again(two_nodes, by_patch):
    cluster, nodes = two_nodes
    cls = ray.remote(MakerActor)
    actors = [cls.options(num_cpus=1, resources={f"node{i}": 0.5}).remote() for i in range(2)]
    ray.get([a.info.remote() for a in actors])
    rows = []
    scheduler = PullScheduler(actors, record=rows.append)
    tasks = _reads(by_patch)

    left = []

    def leave(task: Task) -> None:
        if task.id == 0 and not left:  # the reader is not sent yet: its argument's node leaves first
            left.append(cluster.remove_node(nodes[0]))

    results = scheduler.run("graph", tasks, on_done=leave)
    expected = Maker().total(Maker().make(7))
    assert torch.equal(results[1], expected)
    assert scheduler.log[0].actor == 0  # the first result was made on the node that left
    made = [r for r in rows if r["stage"] == "make"]
    read = [r for r in rows if r["stage"] == "read"]
    assert len(made) == 2  # made, lost, made again
    assert read[-1]["outcome"] == "retried" and "lost" in read[-1]["error"]
