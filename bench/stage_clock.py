"""A Clock that also knows the current stage: model calls and peak GPU memory per stage."""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import contextmanager

import torch

from pipeline.graph.clock import Clock


def cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class StageClock(Clock):
    """Clock's stage and model seconds, plus per stage: calls per model, model seconds, peak GPU bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.current = ""
        self.stage_calls: dict[str, Counter] = defaultdict(Counter)
        self.stage_models: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.peak: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        self.current = name
        if cuda_active():
            torch.cuda.reset_peak_memory_stats()
        try:
            with super().stage(name):
                yield
        finally:
            if cuda_active():
                self.peak[name] = torch.cuda.max_memory_allocated()
            self.current = ""

    @contextmanager
    def model(self, name: str):
        before = self.models[name]
        with super().model(name):
            yield
        self.stage_calls[self.current][name] += 1
        self.stage_models[self.current][name] += self.models[name] - before

    @property
    def wall(self) -> float:
        return sum(self.stages.values())
