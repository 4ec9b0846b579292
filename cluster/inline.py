"""Which payloads travel inside a call (Ray's inline path) rather than through the object store.

A call's arguments and result up to INLINE_BYTES travel inside the call itself rather than through the
object store: Ray's own limit, 100 KiB, sends every tile-sized payload (a batch of two 1024 px SDXL
tiles' latents is 512 KiB) through the store, which costs the raylet and both processes more than the
bytes do. Each process reads the limit from its environment when Ray starts in it: the driver's from
`inline_tile_payloads` (before ray.init), the actors' from `actor_env` (their runtime_env). Light: a
client that only joins the cluster (`farm status`) imports it without torch.
"""

from __future__ import annotations

import os

# inline up to this: at 256 and 512 KiB an actor call and its result took 2.4 ms inline against 4.0-4.1 ms through
# the object store, at 1 MiB and more inline was slower (bench/inline_payloads.py; BENCHMARKS.md, "Tile-sized
# payloads inline")
INLINE_BYTES = 768 * 1024
INLINE_VAR = "RAY_max_direct_call_object_size"  # Ray's setting, read by each process as Ray starts in it


def inline_limit() -> str:
    """The inline limit in bytes, as Ray reads it: a value set in the environment stands."""
    return os.environ.get(INLINE_VAR, str(INLINE_BYTES))


def inline_tile_payloads() -> None:
    """This process (a driver, before ray.init) sends payloads up to the limit inside its calls; a Ray it starts
    here (raylet, workers) inherits the setting."""
    os.environ[INLINE_VAR] = inline_limit()


def actor_env() -> dict:
    """An actor's runtime_env: its results up to the limit go back inside the call's reply (merged with the
    job's runtime_env by Ray)."""
    return {"env_vars": {INLINE_VAR: inline_limit()}}
