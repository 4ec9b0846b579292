"""Where the time goes: wall time per stage and time inside model forward calls."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch


class Clock:
    """Accumulates seconds per stage and per model; syncs CUDA so GPU time lands where it was spent."""

    def __init__(self, on_stage=None) -> None:
        self.on_stage = on_stage  # on_stage(name, start, end) in unix seconds, as each stage ends (the ledger)
        self.stages: dict[str, float] = defaultdict(float)
        self.models: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str):
        start, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self._sync()
            self.stages[name] += time.perf_counter() - start
            if self.on_stage:
                self.on_stage(name, wall, time.time())

    @contextmanager
    def model(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.models[name] += time.perf_counter() - start
            self.calls[name] += 1
