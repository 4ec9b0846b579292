"""The base's sampler as a task graph: each step's two guidance branches are two tasks, on two workers.

With classifier-free guidance every step runs the UNet on the negative and on the text prompt
(diffusers batches the two) and mixes them, eps = eps_neg + cfg (eps_text - eps_neg) (Ho & Salimans
2022, eq. 6). The base is the one model stage a farm cannot tile, so its steps are the render's serial
part; with each branch a task of its own, two workers run a step in the time of one branch (the CFG
parallelism of xDiT, Fang et al. 2024). The driver mixes the branches and steps the scheduler, as the
blended sampler does for the refine. Every executor runs the same tasks with the same batch of one, so
the base is the same on one worker or many, and a stopped render resumes from its stored branches.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.geometry.chess import Tile
from pipeline.graph.taskgraph import Executor, Task
from pipeline.sampling.conditioning import PromptEmbeds
from pipeline.sampling.sampler import guided
from pipeline.sampling.schedule import make_scheduler, resolve_sampler

BRANCHES = ("negative", "text")  # a step's tasks, in this order (diffusers' batch order)
WHOLE = 0  # the id of the one tile a branch task predicts: the whole base


def branch(cond: PromptEmbeds, name: str) -> PromptEmbeds:
    """One branch's conditioning, without guidance: the text prompt's embeddings or the negative's."""
    if name == "text":
        return PromptEmbeds(cond.embeds, cond.pooled, None, None)
    return PromptEmbeds(cond.negative_embeds, cond.negative_pooled, None, None)


def splits(family: str, cfg: float) -> bool:
    """Whether the base runs as branch tasks: an SDXL base with guidance (Flux's distilled guidance is one
    model input, not a second branch)."""
    return family == "sdxl" and cfg > 1.0


class GuidedLoop:
    """The base's latents and scheduler on the driver: Denoiser._run's loop, one step per pair of branch
    results. The state moves forward only, each step once, whenever a task's arguments need a later step."""

    def __init__(self, scheduler, noise: torch.Tensor, cfg: float, share=lambda value: value):
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps
        self.latents = noise.float() * scheduler.init_noise_sigma  # x_T, as StableDiffusionXLPipeline
        self.cfg = cfg
        self.share = share  # Executor.share: both branches of a step read one copy of its input
        self.stepped = 0  # steps applied to self.latents
        self.inputs: dict[int, torch.Tensor] = {}  # step -> its scaled model input
        self.shared: dict[int, Any] = {}  # step -> the same, shared

    def model_input(self, step: int, done: dict[int, Any]) -> Any:
        """Step `step`'s model input (shared), after applying every earlier step from its branch results in `done`."""
        self.advance(step, done)
        if step not in self.shared:
            self.shared = {step: self.share(self._scaled(step))}
        return self.shared[step]

    def _scaled(self, step: int) -> torch.Tensor:
        if step not in self.inputs:
            self.inputs = {step: self.scheduler.scale_model_input(self.latents, self.timesteps[step])}
        return self.inputs[step]

    def advance(self, steps: int, done: dict[int, Any]) -> torch.Tensor:
        """The latents after `steps` steps."""
        while self.stepped < steps:
            i = self.stepped
            self._scaled(i)  # scale_model_input starts some schedulers' step index: call it as the loop does
            negative, text = (done[task_id(i, name)][WHOLE] for name in BRANCHES)
            eps = guided(negative, text, self.cfg)
            self.latents = self.scheduler.step(eps, self.timesteps[i], self.latents, return_dict=False)[0]
            self.stepped += 1
        return self.latents


def task_id(step: int, name: str) -> int:
    """The id of a step's branch task: the negative then the text branch, step by step."""
    return 2 * step + BRANCHES.index(name)


def guided_tasks(
    ex: Executor, noise: torch.Tensor, cond: PromptEmbeds, cfg: float, steps: int, sampler: str, scheduler_config: dict
) -> tuple[list[Task], GuidedLoop]:
    """The base's branch tasks (2 per step) and the loop that reads them; the caller adds what reads the
    final latents (loop.advance(steps, done)) with id 2 * steps."""
    scheduler = make_scheduler(resolve_sampler(sampler, "sdxl"), scheduler_config)
    scheduler.set_timesteps(steps)
    loop = GuidedLoop(scheduler, noise, cfg, ex.share)
    _, _, h, w = noise.shape
    whole = (Tile(WHOLE, 0, 0, 0, 0, h, w),)
    conds = {name: ex.share(branch(cond, name)) for name in BRANCHES}
    tasks = []
    for i in range(steps):
        deps = frozenset(task_id(i - 1, name) for name in BRANCHES) if i else frozenset()
        for name in BRANCHES:

            def args(done, i=i, name=name):
                return whole, loop.model_input(i, done), loop.timesteps[i], conds[name], 1.0

            units = int(name == "text")  # the bar counts steps
            tasks.append(Task(task_id(i, name), "predict", args, deps, group="steps", units=units))
    return tasks, loop


def guided_base(
    ex: Executor,
    noise: torch.Tensor,
    cond: PromptEmbeds,
    cfg: float,
    steps: int,
    sampler: str,
    scheduler_config: dict,
    decode: str = "",
    *decode_args: Any,
) -> torch.Tensor:
    """The base's latents, or with `decode` (a worker method: latents, *decode_args -> pixels) its image."""
    tasks, loop = guided_tasks(ex, noise, cond, cfg, steps, sampler, scheduler_config)
    last = frozenset(task_id(steps - 1, name) for name in BRANCHES)
    out = 2 * steps
    if decode:
        tasks.append(Task(out, decode, lambda done: (loop.advance(steps, done), *decode_args), last, group="decode"))
        return ex.run("base", tasks)[out]
    return loop.advance(steps, ex.run("base", tasks))
