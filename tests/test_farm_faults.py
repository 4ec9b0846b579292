"""The warm farm when workers fail: a worker process killed mid-render, a node removed mid-render and one added.

One real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head without GPUs and two nodes
with a fake GPU each), one farm on it for the module; tests run in file order. Every render must give the bytes
of a local render of the same spec, with each task counted once."""

import os
import signal
import time
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")

from farm_helpers import WAIT_S, controller, render_locally, submit, wait_for  # noqa: E402

from cluster import farm_client  # noqa: E402
from farm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    address_file = get_ray_address_file(None)
    had_address = os.path.exists(address_file)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    if not had_address:  # Cluster publishes its address for `ray.init("auto")`: nobody else's Ray should join it
        os.remove(address_file)
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, namespace="tilefarm", log_to_driver=False, configure_logging=False)
    yield cluster, nodes
    try:
        farm_client.down("auto")  # a failed test leaves no detached actors behind
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def spec(small_spec):
    """A 256 px render from a 64 px base, one tile per task: 25 chess tiles, enough to fail something mid-way."""
    return replace(small_spec, width=256, height=256, native=64, tile=64, tile_batch=1, steps=1, base_steps=1, cfg=1.0)


@pytest.fixture(scope="module")
def local_png(spec, tmp_path_factory):
    return render_locally(spec, tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def farm(cluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("farm-state")
    assert main(["up", "--state-dir", str(state), "--max-running", "1"]) == 0
    return state


def wait_mid_render(render_id: int) -> dict:
    """Returns once a stage of many tasks is under way and has several left (the moment to break something)."""
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        record = farm_client.call(controller().status, render_id)
        assert record["state"] in ("queued", "running"), record
        if any(total >= 8 and 1 <= done <= total - 6 for done, total in record["progress"].values()):
            return record["progress"]
        time.sleep(0.02)
    raise AssertionError(f"render {render_id} never got mid-way")


def assert_each_task_counted_once(record: dict) -> None:
    assert record["state"] == "done", record["error"]
    progress = record["stats"]["progress"]
    assert progress and all(done == total for done, total in progress.values()), progress


def test_a_worker_killed_mid_render_is_restarted_and_the_render_gives_the_local_image(farm, spec, local_png):
    infos = farm_client.call(controller().worker_infos)
    assert len(infos) == 2 and len({i["node"] for i in infos}) == 2  # one worker per GPU, one GPU per node
    render_id = submit(spec)
    at_kill = wait_mid_render(render_id)
    os.kill(infos[0]["pid"], signal.SIGKILL)
    record = wait_for(render_id)
    assert_each_task_counted_once(record)
    assert farm_client.call(controller().image, render_id) == local_png
    health = farm_client.call(controller().worker_health)
    assert health["failures"] == {0: 1} and health["lost"] == []  # one death noticed, once; worker 0 not given up
    end = time.monotonic() + WAIT_S
    while "down" in (after := farm_client.call(controller().worker_infos))[0]:  # restarting: answers at once
        assert time.monotonic() < end, "worker 0 was not started again"
        time.sleep(0.2)
    assert after[0]["pid"] != infos[0]["pid"] and after[1]["pid"] == infos[1]["pid"]  # Ray started it again
    assert all(e["render"] == render_id for e in after[0]["loads"])  # it loads again only if it came back in time
    assert sum(done for done, _ in record["stats"]["progress"].values()) > sum(d for d, _ in at_kill.values())


def test_a_node_removed_mid_render_then_a_node_added_gets_workers_again(cluster, farm, spec, local_png):
    ray_cluster, nodes = cluster
    infos = farm_client.call(controller().worker_infos)
    by_id = {n.node_id: n for n in nodes}
    render_id = submit(spec)
    wait_mid_render(render_id)
    ray_cluster.remove_node(by_id[infos[1]["node"]])  # worker 1's node leaves, its GPU with it
    record = wait_for(render_id)
    assert_each_task_counted_once(record)
    assert farm_client.call(controller().image, render_id) == local_png  # finished on worker 0 alone
    health = farm_client.call(controller().worker_health)
    assert health["failures"].get(1) == 1 and health["reviving"] == [1]  # waiting for a GPU to come back

    new = ray_cluster.add_node(num_cpus=1, num_gpus=2)  # a node comes back, with one GPU more than the one that left
    end = time.monotonic() + WAIT_S
    while farm_client.call(controller().ready)["workers"] < 3:  # the controller starts a worker for the new GPU
        assert time.monotonic() < end, "no worker was started for the new GPU"
        time.sleep(0.5)
    infos = farm_client.call(controller().worker_infos)
    assert [i["node"] for i in infos].count(new.node_id) == 2  # worker 1 started again there, and worker 2
    record = wait_for(submit(spec))
    assert_each_task_counted_once(record)
    assert record["stats"]["workers"] == [0, 1, 2]  # every worker, the old, the restarted and the new, took tiles
    assert farm_client.call(controller().image, record["id"]) == local_png
