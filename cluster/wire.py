"""How tensors travel between driver and actors: as numpy arrays, which Ray serialises out of band.

Ray pickles a torch tensor through its storage; a numpy array goes as a raw buffer (zero-copy
on the same node), which measured about 40% cheaper per call for tile-sized payloads here.
Plain numpy arrays (the shared scaffold) pass untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


class WireTensor:
    """A torch tensor in transit: its numpy array and dtype."""

    __slots__ = ("array", "dtype")

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        t = tensor.detach().cpu()
        self.array = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()

    def __reduce__(self):
        return (_rebuild, (self.array, self.dtype))

    def tensor(self) -> torch.Tensor:
        array = self.array if self.array.flags.writeable else self.array.copy()
        return torch.from_numpy(array).to(self.dtype)


def _rebuild(array: np.ndarray, dtype: torch.dtype) -> WireTensor:
    wire = WireTensor.__new__(WireTensor)
    wire.array, wire.dtype = array, dtype
    return wire


def _walk(value: Any, leaf) -> Any:
    """Apply `leaf` to every value inside tuples, lists, dicts and dataclasses; rebuild only what changed."""
    if isinstance(value, tuple):
        return tuple(_walk(v, leaf) for v in value)
    if isinstance(value, list):
        return [_walk(v, leaf) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {f.name: _walk(getattr(value, f.name), leaf) for f in dataclasses.fields(value)}
        if any(changed[k] is not getattr(value, k) for k in changed):
            return dataclasses.replace(value, **changed)
        return value
    return leaf(value)


def to_wire(value: Any) -> Any:
    """Replace every torch tensor inside tuples, lists, dicts and dataclasses with a WireTensor."""
    return _walk(value, lambda v: WireTensor(v) if isinstance(v, torch.Tensor) else v)


def from_wire(value: Any) -> Any:
    """The inverse of to_wire."""
    return _walk(value, lambda v: v.tensor() if isinstance(v, WireTensor) else v)
