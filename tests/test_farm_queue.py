"""The warm farm's scheduling and housekeeping without a running farm: fair share between renders of equal
priority, the worker's memory-bounded model LRU, result expiry."""

import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from cluster.farm import PriorityLease  # noqa: E402


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
