"""Record every model call a render makes (by argument shapes), then replay each shape in isolation.

"Sum of model forward times measured in isolation" = sum over distinct calls of
(times the render made it) x (median time of the same call run alone, warm). Only the shapes,
dtypes and devices of the arguments are kept, so recording costs no memory and no copies; the
replay feeds fresh tensors of the same shapes (values do not change the work these models do).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TensorShape:
    """A tensor argument without its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str


def describe(value: Any) -> Any:
    """The call's arguments with every tensor replaced by its shape, dtype and device."""
    if isinstance(value, torch.Tensor):
        return TensorShape(tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, list | tuple):
        return type(value)(describe(v) for v in value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


def materialise(value: Any, generator: torch.Generator) -> Any:
    """Fresh arguments for a described call: unit normals for float tensors, zeros for integer ones."""
    if isinstance(value, TensorShape):
        if value.dtype.is_floating_point:
            x = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.dtype)
        else:
            x = torch.zeros(value.shape, dtype=value.dtype)
        return x.to(value.device)
    if isinstance(value, list | tuple):
        return type(value)(materialise(v, generator) for v in value)
    if isinstance(value, dict):
        return {k: materialise(v, generator) for k, v in value.items()}
    return value


@dataclass
class CallKind:
    """One distinct model call: which model, the callable, its described arguments and module state."""

    model: str
    fn: Callable
    args: Any
    state: tuple  # (object, attribute, value) to restore before a replay, e.g. the VAE's tiling flag


@dataclass
class CallLog:
    """Distinct calls and how often each ran, per render stage."""

    kinds: dict[str, CallKind] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)  # (stage, key) -> calls
    stage: Callable[[], str] = lambda: ""
    _depth: Counter = field(default_factory=Counter)

    def wrap(self, model: str, fn: Callable, state: tuple | None = None) -> Callable:
        """`fn` that logs each outermost call of `model` before running it."""

        def recorded(*args, **kwargs):
            if self._depth[model]:
                return fn(*args, **kwargs)
            owner_state = (state[0], state[1], getattr(state[0], state[1])) if state else ()
            key = f"{model}|{describe((args, kwargs))!r}|{owner_state[2:]!r}"
            self.kinds.setdefault(key, CallKind(model, fn, describe((args, kwargs)), owner_state))
            self.counts[(self.stage(), key)] += 1
            self._depth[model] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[model] -= 1

        return recorded

    def calls(self, stage: str | None = None, model: str | None = None) -> Counter:
        """key -> calls, for one stage and/or model (all when None)."""
        out: Counter = Counter()
        for (s, key), n in self.counts.items():
            if (stage is None or s == stage) and (model is None or self.kinds[key].model == model):
                out[key] += n
        return out


class RecordedModule:
    """A module stand-in that logs calls and passes attribute reads through (safe under torch.compile)."""

    def __init__(self, module: torch.nn.Module, call: Callable):
        self.__dict__["_module"], self.__dict__["_call"] = module, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_call(kind: CallKind, repeats: int, warmup: int = 1, seed: int = 0) -> float:
    """Median seconds of one described call run alone (after `warmup` untimed runs)."""
    args, kwargs = materialise(kind.args, torch.Generator().manual_seed(seed))
    if kind.state:
        setattr(kind.state[0], kind.state[1], kind.state[2])
    device = _first_device(kind.args)
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        kind.fn(*args, **kwargs)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def count_flops(kind: CallKind, seed: int = 0) -> int:
    """FLOPs of one described call, counted by PyTorch's FlopCounterMode (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = materialise(kind.args, torch.Generator().manual_seed(seed))
    if kind.state:
        setattr(kind.state[0], kind.state[1], kind.state[2])
    fn = getattr(kind.fn, "_orig_mod", kind.fn)  # count on the eager module under a compiled wrapper
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _first_device(described: Any) -> str:
    if isinstance(described, TensorShape):
        return described.device
    items = (
        described.values() if isinstance(described, dict) else described if isinstance(described, list | tuple) else ()
    )
    for item in items:
        found = _first_device(item)
        if found:
            return found
    return ""


def record_worker(worker, log: CallLog) -> Callable[[], None]:
    """Log every model call of a TileWorker (UNet, VAE, text encoders, upscaler); returns an undo."""
    denoiser, pipe = worker.model.denoiser, worker.model.pipe
    unet = denoiser.unet
    undo = [lambda: setattr(denoiser, "unet", unet)]
    denoiser.unet = RecordedModule(unet, log.wrap("unet", unet))
    patches = [
        (pipe.vae, "encode", "vae", (pipe.vae, "use_tiling")),
        (pipe.vae, "decode", "vae", (pipe.vae, "use_tiling")),
        (pipe.text_encoder, "forward", "text encoders", None),
        (pipe.text_encoder_2, "forward", "text encoders", None),
    ]
    if worker.upscaler is not None:
        patches.append((worker.upscaler.descriptor.model, "forward", "upscaler", None))
    for owner, attr, model, state in patches:
        original = getattr(owner, attr)
        setattr(owner, attr, log.wrap(model, original, state))
        undo.append(lambda owner=owner, attr=attr: owner.__dict__.pop(attr, None))

    def restore() -> None:
        for fn in undo:
            fn()

    return restore
