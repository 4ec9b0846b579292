"""Samplers and what `steps` and `denoise` mean (DESIGN rule 4).

`steps` is the number of denoising steps that actually run (model calls per tile, doubled by
CFG), as in ComfyUI's KSampler. `denoise d` builds the sampler's schedule for
N = round(steps / d) steps and runs the last `steps` of it, so a refine starts at sigma_start =
sigmas[N - steps] of that schedule. The start sigma depends on the schedule: under Karras sigmas
a low denoise starts at a much lower sigma than under a uniform one, so plans report it.

diffusers' img2img with num_inference_steps = N and strength = steps / N runs the same steps.

Samplers belong to a model family: SDXL's are noise-prediction samplers over a discrete DDPM
schedule, Flux's is the flow-matching Euler step over a resolution-shifted schedule, and neither
runs the other's models. `auto` (the default) picks the family's first sampler; naming another
family's sampler is a spec error, never a silent swap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.errors import SpecError
from pipeline.sampling.samplers import AUTO, FAMILY_SAMPLERS, SAMPLERS


def resolve_sampler(name: str, family: str) -> str:
    """The sampler a render runs: `auto` is the family's first; another family's sampler is refused."""
    own = FAMILY_SAMPLERS[family]
    if name == AUTO:
        return own[0]
    if name not in own:
        other = next((fam for fam, names in FAMILY_SAMPLERS.items() if name in names), None)
        what = f"a {other.upper()} sampler" if other else "not a sampler"
        raise SpecError(
            f"sampler {name!r} is {what}; this {family.upper()} model runs {', '.join(own)}: "
            f"pass --sampler {own[0]} (or auto)"
        )
    return name


def make_scheduler(name: str, base_config: dict) -> SchedulerMixin:
    """A fresh scheduler (they are stateful) for a sampler name, from the model's scheduler config."""
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def schedule_length(steps: int, denoise: float) -> int:
    """N, the length of the full schedule whose last `steps` steps a refine at `denoise` runs."""
    return max(steps, round(steps / denoise))


def held_steps(steps: int, denoise: float, masked_denoise: float) -> int:
    """Steps a pixel refined at `masked_denoise` waits inside a refine at `denoise`: it runs the last
    round(masked_denoise * N) steps of the same schedule of length N."""
    return steps - min(steps, round(masked_denoise * schedule_length(steps, denoise)))


@dataclass(frozen=True)
class Schedule:
    """The steps a sampler will run: their timesteps, where they begin and the sigma they start at."""

    timesteps: torch.Tensor
    begin_index: int
    start_sigma: float
    length: int


def refine_schedule(
    scheduler: SchedulerMixin, steps: int, denoise: float, device=None, **set_timesteps_kwargs
) -> Schedule:
    """Set `scheduler` to run the last `steps` steps of a schedule of length round(steps / denoise).

    `set_timesteps_kwargs` go to the scheduler's set_timesteps (Flux: its sigmas and shift mu).
    """
    if steps < 1 or not 0 < denoise <= 1:
        raise ValueError(f"need steps >= 1 and 0 < denoise <= 1, got steps={steps} denoise={denoise}")
    length = schedule_length(steps, denoise)
    scheduler.set_timesteps(length, device=device, **set_timesteps_kwargs)
    begin = (length - steps) * scheduler.order
    scheduler.set_begin_index(begin)
    return Schedule(scheduler.timesteps[begin:], begin, float(scheduler.sigmas[begin]), length)


def start_sigma(sampler: str, base_config: dict, steps: int, denoise: float) -> float:
    """The noise level a refine starts from, for plans and logs."""
    return refine_schedule(make_scheduler(sampler, base_config), steps, denoise).start_sigma
