"""The farm's lease: workers shared by the renders running at once, handed out by priority, then fair share.

A render's loop asks the lease for a free worker before each task (cluster.scheduler.PullScheduler), so
a render that outranks the others takes the next worker that comes free, and renders of equal priority
share the workers evenly; pre-emption happens only at task boundaries.
"""

from __future__ import annotations

import math
import threading
import time

from cluster.scheduler import Lease

WANT_S = 0.1  # a render that asked for a worker this recently still wants one (its loop asks every 0.02 s)


class PriorityLease(Lease):
    """The workers shared by the running renders, handed out by priority, then fair share, then submit time:
    while a render that ranks higher is asking for a worker, a free one goes to it. Among renders of equal
    priority the one holding the fewest workers now ranks higher (max-min fairness, research warm_farm.md §4),
    ties to the earlier submitted (lower render id). A render that asks for none (in a serial stage, its
    base) leaves the workers to the others, so none stands idle."""

    def __init__(self, count: int, want_s: float = WANT_S):
        super().__init__(count, shared=True, depth=1)  # one call per worker: a queued call would outlast a pre-emption
        self.want_s = want_s
        self.local = threading.local()  # the render this thread runs (its `priority` may change while it runs)
        self.wanting: dict[int, tuple[int, int, float]] = {}  # render -> (priority, id, when it last asked in vain)
        self.holder: dict[int, int] = {}  # worker -> the render holding it
        self.held: dict[int, int] = {}  # render -> how many workers it holds now

    def _rank(self, who: int, priority: int, order: int) -> tuple[int, int, int]:
        """Lower ranks first: priority (higher first), then workers held now, then submit order."""
        return (-priority, self.held.get(who, 0), order)

    def take(self) -> int | None:
        owner, now = getattr(self.local, "owner", None), time.monotonic()
        me = id(owner) if owner is not None else threading.get_ident()
        mine, order = getattr(owner, "priority", 0), getattr(owner, "render_id", 0)
        with self.lock:
            self.wanting = {who: w for who, w in self.wanting.items() if now - w[2] < self.want_s}
            rank = self._rank(me, mine, order)
            outranked = any(self._rank(who, p, o) < rank for who, (p, o, _) in self.wanting.items() if who != me)
            if self.idle and not outranked:
                self.wanting.pop(me, None)
                actor = self.idle.popleft()
                self.holder[actor] = me
                self.held[me] = self.held.get(me, 0) + 1
                return actor
            self.wanting[me] = (mine, order, now)
            return None

    def _release(self, actor: int) -> None:
        who = self.holder.pop(actor, None)
        if who is not None:
            self.held[who] -= 1
            if not self.held[who]:
                del self.held[who]

    def give(self, actor: int) -> None:
        with self.lock:
            self._release(actor)  # whichever thread gives it back (a probe of another render's loop)
            self.idle.append(actor)

    def died(self, actor: int, probe, max_failures: int, sent: float = math.inf) -> None:
        with self.lock:
            self._release(actor)  # a dead worker is no render's: it comes back through give, or never
        super().died(actor, probe, max_failures, sent)
