"""A simulated tile actor for bench/scaling.py: the real transport, a sleep for the model."""

from __future__ import annotations

import time

from cluster.wire import from_wire, reply


class SimWorker:
    """An actor that refines (or predicts) tiles by returning them unchanged after `cost` seconds per tile."""

    def __init__(self, cost: float, slowdown: float = 1.0):
        self.cost, self.slowdown = cost, slowdown

    def run(self, method: str, *args, crash: str = ""):
        tiles, latents = from_wire(args[:2])  # the same transport as the real actor
        time.sleep(self.cost * self.slowdown * len(tiles))
        return reply({t.id: latents[i : i + 1] for i, t in enumerate(tiles)}, crash)

    def set_cost(self, cost: float) -> None:
        self.cost = cost

    def info(self) -> dict:
        return {}
