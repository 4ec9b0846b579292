"""How tensors travel between driver and actors: as numpy arrays, which Ray serialises out of band.

Ray pickles a torch tensor through its storage; a numpy array goes as a raw buffer (zero-copy
on the same node), which measured about 40% cheaper per call for tile-sized payloads here.
Plain numpy arrays (the shared scaffold) pass untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.graph.tree import walk


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


def to_wire(value: Any) -> Any:
    """Replace every torch tensor inside tuples, lists, dicts and dataclasses with a WireTensor."""
    return walk(value, lambda v: WireTensor(v) if isinstance(v, torch.Tensor) else v)


def from_wire(value: Any) -> Any:
    """The inverse of to_wire."""
    return walk(value, lambda v: v.tensor() if isinstance(v, WireTensor) else v)
