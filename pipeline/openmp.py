"""The OpenMP wait policy of a process that drives a farm, set before torch loads its OpenMP runtime.

A driver runs many small tensor ops (crops, composites, sampler steps) between Ray calls. With OpenMP's
default policy its idle threads spin after each op, on the cores the object transfers, the raylet and
the actors on the same machine need: on a 2-core machine the driver of a 16-actor render burned 2.2x
the CPU it did with one thread, and PASSIVE (idle threads sleep) made the whole render 12% faster
(BENCHMARKS.md "Third round"). libgomp reads the policy once, when it is loaded (with torch), so the
packages whose code starts a driver (farm, cluster) set it on import, before anything imports torch.
"""

from __future__ import annotations

import os


def prefer_passive_waits() -> None:
    """OMP_WAIT_POLICY=PASSIVE, unless the environment already names a policy (the user's choice stands)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
