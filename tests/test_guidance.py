"""The base's guidance branches as tasks: diffusers' txt2img, on any executor, resumable step by step."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from farm.executor import LocalExecutor
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.graph.checkpoint import Checkpointed
from pipeline.graph.progress import Bar
from pipeline.sampling.guidance import BRANCHES, guided, guided_base, task_id
from pipeline.sampling.schedule import make_scheduler

STEPS, CFG = 4, 5.0


def _base(worker, sampler, ex=None, decode=()):
    cond = worker.encode_prompt("a red fox", "blurry", CFG)
    native = pool_noise(make_scaffold(11, 4, 128, 128), 4)
    config = worker.facts().scheduler_config
    return guided_base(ex or LocalExecutor(worker), native, cond, CFG, STEPS, sampler, config, *decode), native


def test_guidance_mixes_the_branches_as_diffusers():
    negative, text = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(guided(negative, text, 1.0), text)
    assert torch.equal(guided(negative, text, 7.0), torch.tensor([15.0, 12.0]))
    assert [task_id(3, name) for name in BRANCHES] == [6, 7]


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler"])
def test_branch_tasks_give_diffusers_txt2img(tiny_worker, sampler):
    rows, bars = [], []

    @contextmanager
    def progress(label: str, total: int, unit: str):
        bars.append((label, total, unit))
        yield Bar()

    ex = LocalExecutor(tiny_worker, progress, record=rows.append)
    ours, native = _base(tiny_worker, sampler, ex)
    pipe = StableDiffusionXLPipeline(**tiny_worker.model.pipe.components)
    pipe.scheduler = make_scheduler(sampler, tiny_worker.model.denoiser.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt="a red fox",
        negative_prompt="blurry",
        latents=native,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        height=256,
        width=256,
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (1, 4, 32, 32)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - native).abs().mean() > 0.1  # it sampled
    # a task per branch and step, nothing else
    assert [(r["stage"], r["pass"], r["task"]) for r in rows] == [("base", "steps", i) for i in range(2 * STEPS)]
    assert bars == [("base steps", STEPS, "step")]  # the bar counts steps, one per pair of branches


def test_the_decoded_base_is_the_workers_own_base(tiny_worker):
    image, native = _base(tiny_worker, "euler", decode=("decode", 0))
    cond = tiny_worker.encode_prompt("a red fox", "blurry", CFG)
    theirs = tiny_worker.base(native, cond, CFG, STEPS, "euler")
    assert image.shape == theirs.shape == (1, 3, 256, 256)
    assert (image - theirs).abs().max().item() <= 1e-3


class _Store(dict):
    def load(self, key):
        return self.get(key)

    def save(self, key, value):
        self[key] = value


def test_a_base_resumed_from_its_stored_steps_is_the_same_base(tiny_worker):
    store = _Store()
    whole, _ = _base(tiny_worker, "dpmpp_2m_karras", Checkpointed(LocalExecutor(tiny_worker), store))
    assert len(store) == 2 * STEPS
    for key in [k for k in store if int(k.rsplit(".", 1)[1]) >= task_id(2, "text")]:
        del store[key]  # stopped during step 2: its negative branch and the steps before it are kept
    rows = []
    resumed, _ = _base(
        tiny_worker, "dpmpp_2m_karras", Checkpointed(LocalExecutor(tiny_worker, record=rows.append), store)
    )
    assert torch.equal(resumed, whole)
    ran = [r["task"] for r in rows if r["kind"] == "task"]
    assert ran == list(range(task_id(2, "text"), 2 * STEPS))
