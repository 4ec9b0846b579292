"""The warm farm's scheduling and housekeeping without a running farm: fair share between renders of equal
priority, the worker's memory-bounded model LRU, result expiry."""

import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from cluster.farm_lease import PriorityLease  # noqa: E402


def taker(lease: PriorityLease):
    """`take` as the render `owner`'s own thread calls it (the lease knows a render by its thread's owner)."""

    def take_as(owner) -> int | None:
        got = []

        def run():
            lease.local.owner = owner
            got.append(lease.take())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return got[0]

    return take_as


def test_a_free_worker_goes_to_the_render_of_higher_priority_that_asks_for_one():
    lease = PriorityLease(1, want_s=600.0)  # a busy machine's thread switches never outlast a request
    low, high = SimpleNamespace(priority=0), SimpleNamespace(priority=5)
    take_as = taker(lease)  # each render runs in its own thread
    assert take_as(low) == 0
    assert take_as(high) is None  # none free: the high one now waits for a worker
    lease.give(0)
    assert take_as(low) is None  # the worker the low render gave back goes to the high one ...
    assert take_as(high) == 0
    lease.give(0)
    assert take_as(low) == 0  # ... which, holding what it asked for, no longer stands in the way
    lease.give(0)
    assert take_as(high) == 0 and take_as(low) is None
    lease.give(0)
    lease.want_s = 0.0  # a render that stopped asking (it finished, or is in its base) holds nothing up
    assert take_as(low) == 0


def test_a_free_worker_goes_to_the_render_of_equal_priority_holding_the_fewest():
    lease = PriorityLease(4, want_s=600.0)  # a busy machine's thread switches never outlast a request
    take_as = taker(lease)
    a, b = SimpleNamespace(priority=0, render_id=1), SimpleNamespace(priority=0, render_id=2)
    assert [take_as(a), take_as(a), take_as(a)] == [0, 1, 2]  # alone, the first render takes what it asks for
    assert take_as(b) == 3
    assert lease.held == {id(a): 3, id(b): 1}
    assert take_as(a) is None and take_as(b) is None  # none free: both wait
    lease.give(0)
    assert take_as(a) is None  # the worker `a` gave back goes to `b`, which holds fewer ...
    assert take_as(b) == 0
    assert lease.held == {id(a): 2, id(b): 2}
    lease.give(3)  # given back by another thread (a probe of a restarted worker): still counted as b's
    assert lease.held == {id(a): 2, id(b): 1}


def test_between_renders_of_equal_priority_holding_as_many_the_earlier_submitted_goes_first():
    lease = PriorityLease(3, want_s=600.0)
    take_as = taker(lease)
    a, b, c = (SimpleNamespace(priority=0, render_id=i) for i in (1, 2, 3))
    assert [take_as(b), take_as(a), take_as(c)] == [0, 1, 2]
    assert take_as(b) is None and take_as(a) is None
    lease.give(2)  # c's: a and b hold one each
    assert take_as(b) is None and take_as(a) == 2


def test_priority_comes_before_fair_share_and_a_dead_worker_is_nobodys():
    lease = PriorityLease(2, want_s=600.0)
    take_as = taker(lease)
    low, high = SimpleNamespace(priority=0, render_id=1), SimpleNamespace(priority=5, render_id=2)
    assert take_as(high) == 0 and take_as(high) == 1
    assert take_as(low) is None
    lease.give(0)
    assert take_as(high) == 0  # holding both, the higher priority still goes first
    lease.died(1, lambda: "probe", max_failures=3)
    assert lease.held == {id(high): 1} and lease.probes() == ["probe"]
    lease.want_s = 0.0  # a render that stopped asking holds nothing up
    lease.give(0)
    assert take_as(low) == 0 and lease.held == {id(low): 1}


GiB = 2**30


def test_the_least_recently_used_model_sets_go_until_the_weights_fit_the_budget():
    from pipeline.budget.memory import HEADROOM, Budget, sets_to_evict

    def budget(gib: float, overhead: float = 0) -> Budget:
        return Budget(int(gib * GiB), "GPU (test)", int(overhead * GiB))

    sizes = [4 * GiB, 3 * GiB, 2 * GiB]  # oldest first
    assert sets_to_evict(sizes, 3 * GiB, budget(100), 4) == 0  # 12 GiB x 1.2 fits 100
    assert sets_to_evict(sizes, 3 * GiB, budget(12), 4) == 1  # 14.4 does not fit 12; without the 4: 9.6 does
    assert sets_to_evict(sizes, 3 * GiB, budget(12, overhead=3), 4) == 2  # 9.6 + 3 > 12; 6 + 3 fits
    assert sets_to_evict(sizes, 3 * GiB, budget(3 * HEADROOM), 4) == 3  # room for the new set alone
    assert sets_to_evict(sizes, 20 * GiB, budget(12), 4) == 3  # not even alone: all go (the pre-flight refuses)
    assert sets_to_evict(sizes, 1, budget(100), 2) == 2  # the count still bounds them: one stays with the new
    assert sets_to_evict([], 20 * GiB, budget(1), 1) == 0


def test_a_farm_worker_keeps_the_model_sets_that_fit_its_memory(tiny_sdxl, tiny_upscaler):
    from cluster.farm_worker import FarmWorker
    from pipeline.budget.memory import HEADROOM
    from pipeline.budget.preflight import worker_memory
    from pipeline.graph.worker import WorkerConfig

    with_upscaler = WorkerConfig(str(tiny_sdxl), str(tiny_upscaler), "", "fp32", "cpu")
    without = WorkerConfig(str(tiny_sdxl), "", "", "fp32", "cpu")
    (a, _), (b, _) = worker_memory(with_upscaler), worker_memory(without)
    assert a > b > 0
    worker = FarmWorker(max_models=2, memory_bytes=int(HEADROOM * (a + b)) - 1)  # room for either, not both
    first = worker._models(with_upscaler, render_id=1)
    assert worker._models(with_upscaler, render_id=2) is first and len(worker.loads) == 1  # resident: no load
    worker._models(without, render_id=3)
    assert list(worker.resident) == [without] and worker.evicted == [str(tiny_sdxl)]
    worker.memory_bytes = int(HEADROOM * (a + b))  # room for both: the count (2) is the bound again
    worker._models(with_upscaler, render_id=4)
    assert list(worker.resident) == [without, with_upscaler] and len(worker.loads) == 3
    assert worker.weights == {without: b, with_upscaler: a}
    device = FarmWorker(max_models=2)  # the budget is the host's available RAM, as the pre-flight's on a CPU
    device._models(with_upscaler, 5)
    device._models(without, 6)
    assert list(device.resident) == [with_upscaler, without] and device.evicted == []


def test_results_older_than_the_ttl_are_deleted_and_their_renders_marked_expired(tmp_path):
    import sqlite3

    from cluster.queue import SCHEMA, RenderQueue, expire_results

    old_schema = SCHEMA.replace(",  -- seconds per stage", "  -- seconds per stage").split("    expired REAL")[0]
    assert "expired" not in old_schema
    sqlite3.connect(tmp_path / "queue.sqlite").executescript(old_schema + ")")  # a queue from before expiry
    queue = RenderQueue(tmp_path / "queue.sqlite")
    hour, pngs = 3600.0, [tmp_path / f"{i}.png" for i in range(3)]
    ids = [queue.add({"prompt": str(i)}, {}) for i in range(4)]
    for render_id, png, finished in zip(ids[:3], pngs, (1000.0, 1000.0 + hour, 0.0), strict=True):
        png.write_bytes(b"png")
        queue.update(render_id, state="done", finished=finished, result=str(png))
    queue.update(ids[2], state="failed", result="")  # no image: nothing to expire
    queue.update(ids[3], state="running")
    assert expire_results(queue, 0, now=1e12) == []  # a TTL of 0 keeps every image
    assert expire_results(queue, hour, now=1000.0 + hour) == []  # not older than the TTL yet
    assert expire_results(queue, hour, now=1000.0 + hour + 1) == [ids[0]]
    assert [p.exists() for p in pngs] == [False, True, True]
    first = queue.get(ids[0])
    assert first["state"] == "done" and first["result"] == "" and first["expired"] == 1000.0 + hour + 1
    assert queue.get(ids[1])["expired"] is None
    assert expire_results(queue, hour, now=1e12) == [ids[1]]  # the next sweep takes the next one, once
    assert expire_results(queue, hour, now=1e12) == [] and not pngs[1].exists()


def test_a_negative_result_ttl_is_refused(capsys):
    from farm.cli import main

    assert main(["up", "--result-ttl", "-1"]) == 2
    assert "--result-ttl -1: must be 0" in capsys.readouterr().err


def test_a_render_lease_queues_two_calls_per_actor_and_counts_a_death_once():
    from cluster.scheduler import Lease

    lease = Lease(3, depth=2)
    assert [lease.take() for _ in range(7)] == [0, 1, 2, 0, 1, 2, None]  # every actor once before any twice
    lease.give(2)
    lease.died(1, lambda: "probe", max_failures=3)
    lease.died(1, lambda: "another probe", max_failures=3)  # the call queued behind the first died with it
    assert lease.failures[1] == 1 and lease.probes() == ["probe"]
    lease.give(1)  # a result from before the death: no slot until the actor is back
    assert [lease.take(), lease.take()] == [2, None]
    lease.back_at[0] = 10.0
    lease.died(0, lambda: "late", max_failures=3, sent=9.0)  # a call sent before its restart: no new death
    assert lease.failures[0] == 0 and lease.probes() == ["probe"]


def test_a_render_lease_sends_a_call_to_an_actor_with_nothing_in_flight_first():
    from cluster.scheduler import Lease

    lease = Lease(3, depth=2)
    assert [lease.take() for _ in range(3)] == [0, 1, 2]  # one call on each
    lease.give(1)  # actor 1 is done: nothing in flight there, one call on 0 and on 2
    assert lease.take() == 1  # not queued behind actor 0's call, which may be a straggler's
    assert [lease.take() for _ in range(4)] == [0, 2, 1, None]
