"""GroupNorm statistics shared by all tiles of an image, so a tiled VAE normalises like an untiled one.

A VAE tile that normalises with its own statistics shifts its colour and texture a little against
its neighbours (a visible checkerboard). Instead, every tile first runs the network while each
GroupNorm records, per sample and group, the count, mean and squared deviations of its CORE region
(the tile's exclusive share of the canvas; cores partition it, so nothing is counted twice). The
driver pools them into one mean and variance per layer and group (exact pooling: Chan, Golub &
LeVeque 1979), and every tile runs again normalising with those. Tile results then agree wherever
they overlap. With one tile the result is the untiled forward.

One barrier makes the statistics approximate: the recording pass normalised each tile with its own
statistics, so from the second GroupNorm on it records activations that differ a little from an
untiled forward's. Every tile gets the same error, so no tile stands out, but the whole image can
drift from an untiled forward (on the tiny random VAE's decoder: texture 8-23% off for 32-latent
tiles; recording again under the pooled statistics overshoots instead of converging; bench/vae_seams.py).
Exact statistics need one barrier per GroupNorm: record_stats(known=..., until=...) normalises the
layers already settled with their pooled statistics and stops at the next one (pipeline.geometry.tiling.
run_tiled_exact_norm, which the decode uses).

Layers are named by module path (plus '#k' for a module's k-th further call in one forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

# (top, bottom, left, right) of a tile's core as fractions of the tile's height and width
Core = tuple[float, float, float, float]


def core_moments(x: torch.Tensor, groups: int, core: Core) -> torch.Tensor:
    """[B, C, H, W] -> [3, B, groups] float64 (count, mean, sum of squared deviations) over the core box."""
    b, c, h, w = x.shape
    top, bottom, left, right = (round(f * n) for f, n in zip(core, (h, h, w, w), strict=True))
    part = x[:, :, top:bottom, left:right].float().reshape(b, groups, -1)
    if part.shape[-1] == 0:
        raise ValueError(f"core {core} is empty at {h}x{w}")
    var, mean = torch.var_mean(part, dim=-1, correction=0)  # float32 Welford, not sum of squares minus square sum
    count = torch.full_like(mean, part.shape[-1])
    return torch.stack([count, mean, var * part.shape[-1]]).double()


def combine_stats(tiles: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-tile (count, mean, M2) by layer, in tile-id order -> pooled [2, B, G] (mean, variance), float64.

    Chan, Golub & LeVeque (1979): M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2, var = M2 / n."""
    if not tiles:
        raise ValueError("no tile statistics to combine")
    names = list(tiles[0])
    pooled = {}
    for i, t in enumerate(tiles):
        if list(t) != names:
            raise ValueError(f"tile {i} recorded layers {list(t)[:3]}... unlike tile 0's {names[:3]}...")
    for name in names:
        m = torch.stack([t[name].double() for t in tiles])  # [T, 3, B, G]
        n, mean, m2 = m[:, 0], m[:, 1], m[:, 2]
        total = n.sum(0)
        pooled_mean = (n * mean).sum(0) / total
        pooled[name] = torch.stack([pooled_mean, (m2 + n * (mean - pooled_mean) ** 2).sum(0) / total])
    return pooled


def group_norm_with(module: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x [B, C, ...] with given per-group mean and var [B, G]: (x - mean) / sqrt(var + eps) * w + b.

    Computed as x * scale + shift per channel in float32, as torch's own kernel does, then cast back."""
    b, c = x.shape[:2]
    g = module.num_groups
    if mean.shape != (b, g):
        raise ValueError(f"statistics for {tuple(mean.shape)} (batch, groups), activations are {b} x {g} groups")
    rstd = torch.rsqrt(var.to(x.device, torch.float32) + module.eps)
    scale = rstd.repeat_interleave(c // g, dim=1)  # [B, C]
    shift = -mean.to(x.device, torch.float32).repeat_interleave(c // g, dim=1) * scale
    if module.affine:
        weight, bias = module.weight.float(), module.bias.float()
        scale, shift = scale * weight, shift * weight + bias
    view = (b, c) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(x.dtype)


def _pooled(stats: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if key not in stats:
        raise KeyError(f"no shared statistics for GroupNorm {key}; were they recorded on this model?")
    mean, var = stats[key]
    return mean, var


def _group_norms(model: nn.Module) -> list[tuple[str, nn.GroupNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]


class _Calls:
    """Names each GroupNorm call: the module path, then '#k' for its k-th further call in one forward."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def key(self, name: str) -> str:
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        return name if k == 0 else f"{name}#{k}"


@contextmanager
def _patched(model: nn.Module, forward) -> Iterator[None]:
    """Every GroupNorm in `model` runs forward(name, module, x) instead of its own forward."""
    norms = _group_norms(model)
    before = {m: m.__dict__.get("forward") for _, m in norms}  # an instance forward set by someone else
    try:
        for name, m in norms:
            m.forward = lambda x, name=name, m=m: forward(name, m, x)
        yield
    finally:
        for m, previous in before.items():
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous


class StopForward(Exception):
    """Raised inside record_stats once the last layer asked for is recorded: the rest of the forward is not needed."""


@contextmanager
def record_stats(
    model: nn.Module, core: Core, known: dict[str, torch.Tensor] | None = None, until: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, every GroupNorm of `model` normalises with the pooled statistics in `known` where it has
    them (else with its own) and records core_moments of its input into the yielded dict (by layer);
    with `until`, the forward stops (StopForward) once that layer is recorded. A GroupNorm inside
    attention sees [B, C, H*W]; its H and W are taken from the 4-D input of the module that holds it."""
    stats: dict[str, torch.Tensor] = {}
    known = known or {}
    calls = _Calls()
    spatial: dict[nn.Module, tuple[int, int]] = {}

    def remember(norm: nn.GroupNorm):
        def hook(parent, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                spatial[norm] = tuple(x.shape[-2:])

        return hook

    def forward(name: str, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        x4 = x
        if x.ndim == 3:
            h, w = spatial.get(m, (0, 0))
            if h * w != x.shape[-1]:
                raise ValueError(f"GroupNorm {name} sees [B, C, {x.shape[-1]}] with no known 2-D shape")
            x4 = x.view(*x.shape[:2], h, w)
        elif x.ndim != 4:
            raise ValueError(f"GroupNorm {name} sees a {x.ndim}-D input; only images are supported")
        key = calls.key(name)
        stats[key] = core_moments(x4, m.num_groups, core)
        if key == until:
            raise StopForward(key)
        if key in known:
            return group_norm_with(m, x, *known[key])
        return nn.functional.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)

    with ExitStack() as stack:
        for _, parent in model.named_modules():
            for child in parent.children():
                if isinstance(child, nn.GroupNorm):
                    handle = parent.register_forward_pre_hook(remember(child), with_kwargs=True)
                    stack.callback(handle.remove)
        stack.enter_context(_patched(model, forward))
        yield stats


@contextmanager
def apply_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside, every GroupNorm of `model` normalises with the pooled (mean, var) of combine_stats."""
    calls = _Calls()

    def forward(name: str, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return group_norm_with(m, x, *_pooled(stats, calls.key(name)))

    with _patched(model, forward):
        yield
