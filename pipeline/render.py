"""The top-down render of seed 002, stage by stage: plan at the target size, sample at native size.

scaffold -> pooled native noise -> base -> detections on the base -> model upscale (tiles)
-> semantic detailer (crops) -> encode (the canvas) -> chess refine (even, odd) -> decode (tiles)
-> exact size.

Every stage hands its work to an executor (local: one device in-process; cluster: Ray actors)
as worker calls and task graphs fixed by the plan, so both executors produce the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from pipeline.chess_pass import RefineSettings, chess_refine
from pipeline.clock import Clock
from pipeline.detailer import detail, plan_jobs
from pipeline.detection import choose
from pipeline.plan import RenderPlan
from pipeline.resize import fit_exact, resize
from pipeline.scaffold import make_scaffold, pool_noise
from pipeline.taskgraph import Executor, Task
from pipeline.tiling import run_tiled

UPSCALE_OVERLAP = 32  # px of input shared by neighbouring upscaler tiles


class Bar:
    """A progress sink: `update(n)` after n units of work."""

    def update(self, n: int = 1) -> None:
        pass


# progress(stage, total units, unit name) -> a context manager yielding a Bar
Progress = Callable[[str, int, str], AbstractContextManager[Bar]]


def no_progress(stage: str, total: int, unit: str) -> AbstractContextManager[Bar]:
    return nullcontext(Bar())


@contextmanager
def task_progress(progress: Progress, stage: str, tasks: list[Task]) -> Iterator[Callable[[Task], None]]:
    """One bar per task group of a stage (e.g. 'chess even', 'chess odd'); yields done(task) to report each."""
    totals: dict[str, int] = {}
    for task in tasks:
        totals[task.group or stage] = totals.get(task.group or stage, 0) + task.units
    with ExitStack() as stack:
        bars = {
            group: stack.enter_context(progress(f"{stage} {group}" if group != stage else group, n, "tile"))
            for group, n in totals.items()
        }
        yield lambda task: bars[task.group or stage].update(task.units)


@dataclass
class RenderResult:
    """The final image ([1, 3, H, W] in [0, 1], CPU), the latent canvas it was decoded from, and the
    detailer's refinement mask (latent resolution; all zero without detections)."""

    image: torch.Tensor
    canvas: torch.Tensor
    refined_mask: torch.Tensor | None = None
    notes: tuple[str, ...] = ()


def upscale_to_target(plan: RenderPlan, ex: Executor, base: torch.Tensor, scale: int) -> torch.Tensor:
    """Base pixels -> target pixels: the upscale model over tiles, then an exact resize if its scale differs."""
    target = (plan.spec.height, plan.spec.width)
    if not scale or plan.k == 1:
        return resize(base, *target)
    image = run_tiled(ex, "upscale", "upscale_tile", base, plan.spec.upscale_tile, UPSCALE_OVERLAP, scale, 3)
    return resize(image, *target)


def decode_canvas(plan: RenderPlan, ex: Executor, canvas: torch.Tensor, tile: int) -> torch.Tensor:
    """Latent canvas -> pixels, decoded in overlapping latent tiles the VAE handles in one call."""
    return run_tiled(ex, "decode", "decode_tile", canvas, tile, max(1, tile // 4), plan.f, 3)


def detail_stage(plan: RenderPlan, ex: Executor, base, pixels, scaffold, cond, log) -> tuple:
    """Detect the spec's concepts on the base image and refine each selection's crop on the target pixels."""
    spec = plan.spec
    candidates = ex.call("detect", "detect", base, spec.concepts)
    detections = choose(candidates, spec.concepts)
    for c in spec.concepts:
        kept, found = (sum(d.concept == c.name for d in ds) for ds in (detections, candidates))
        log(f"detect {c.name!r} (layer {c.layer}): kept {kept} of {found} candidate(s) at threshold {c.threshold}")
    jobs = plan_jobs(detections, spec.concepts, (plan.latent_h, plan.latent_w), plan.native_latent, spec.detail_padding)
    conds = {"": cond}
    for prompt in sorted({job.prompt for job in jobs} - {""}):
        conds[prompt] = ex.call("prompt", "encode_prompt", prompt, spec.negative, spec.cfg)
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler)
    return detail(
        ex,
        pixels,
        jobs,
        scaffold,
        conds,
        settings,
        spec.seed,
        plan.native_latent * plan.f,
        plan.f,
        spec.tile_batch,
        log,
    )


def render(plan: RenderPlan, ex: Executor, clock: Clock | None = None, log=lambda text: None) -> RenderResult:
    """Run every stage of the plan in order; `log(text)` receives notes on what a stage found."""
    spec, clock, notes = plan.spec, clock or Clock(), []

    def note(text: str) -> None:
        notes.append(text)
        log(text)

    with clock.stage("load"):
        facts = ex.call("load", "facts")  # on a cluster this waits for the actors' models

    with clock.stage("prompt"):
        cond_value = ex.call("prompt", "encode_prompt", spec.prompt, spec.negative, spec.cfg)
        cond = ex.share(cond_value)

    with clock.stage("scaffold"):
        scaffold = make_scaffold(spec.seed, plan.model.latent_channels, plan.latent_h, plan.latent_w)
        native_noise = pool_noise(scaffold, plan.k)
        shared_scaffold = ex.share(scaffold.numpy())

    with clock.stage("base"):
        base = ex.call("base", "base", native_noise, cond, spec.cfg, spec.base_steps, spec.sampler)

    with clock.stage("upscale"):
        pixels = upscale_to_target(plan, ex, base, facts.upscale)

    refined_mask = None
    if spec.concepts:
        with clock.stage("detail"):
            pixels, refined_mask = detail_stage(plan, ex, base, pixels, scaffold, cond_value, note)

    with clock.stage("encode"):
        canvas = ex.call("encode", "encode", pixels)
    del pixels

    with clock.stage("chess"):
        settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler, spec.detail_chess_denoise)
        grid, even, odd = plan.grid, plan.even_batches, plan.odd_batches
        mask = refined_mask if spec.detail_chess_denoise and refined_mask is not None else None
        canvas = chess_refine(ex, grid, even, odd, canvas, shared_scaffold, cond, settings, mask)

    with clock.stage("decode"):
        image = decode_canvas(plan, ex, canvas, facts.decode_tile)
    return RenderResult(fit_exact(image, spec.height, spec.width), canvas, refined_mask, tuple(notes))
