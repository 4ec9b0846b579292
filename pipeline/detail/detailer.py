"""The semantic detailer (seed 002): detections -> crops -> batched refine at native size -> mask composite.

Layers run in order (0 first); the crops of one layer all read the canvas the previous layer left,
are refined in batches (over the workers on a cluster), and are composited in detection order,
each through its own feathered mask. The stage returns the canvas and a refinement mask at
latent resolution (the largest weight any crop gave each latent pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from pipeline.detail.detection import Concept, Detection
from pipeline.geometry.crop import Crop, composite_crop, crop_for, crop_mask, crop_noise, feather_detection
from pipeline.geometry.resize import resize
from pipeline.graph.taskgraph import Executor, Task
from pipeline.sampling.chess_pass import RefineSettings
from pipeline.sampling.conditioning import PromptEmbeds


@dataclass(frozen=True)
class DetailJob:
    """One crop to refine: its detection, box and how it is refined."""

    detection: Detection
    crop: Crop
    denoise: float
    prompt: str  # the refinement prompt ("" = the render's)


def plan_jobs(
    detections: list[Detection], concepts: tuple[Concept, ...], latent_hw: tuple[int, int], native: int, padding: float
) -> list[DetailJob]:
    """A crop per detection, in detection order (layer first)."""
    by_name = {c.name: c for c in concepts}
    jobs = []
    for i, det in enumerate(detections):
        concept = by_name[det.concept]
        crop = crop_for(det, i, *latent_hw, native, padding)
        jobs.append(DetailJob(det, crop, concept.denoise, concept.prompt))
    return jobs


def job_batches(jobs: list[DetailJob], batch: int) -> list[tuple[DetailJob, ...]]:
    """Batches within a layer: crops that share a denoise (one schedule per sampler call), `batch` at a time."""
    groups: dict[float, list[DetailJob]] = {}
    for job in jobs:
        groups.setdefault(job.denoise, []).append(job)
    return [tuple(group[i : i + batch]) for group in groups.values() for i in range(0, len(group), batch)]


def _boxes(batch: tuple[DetailJob, ...]) -> tuple:
    return tuple((j.crop.id, j.crop.y, j.crop.x, j.crop.side, j.crop.side) for j in batch)


def _batch_args(canvas, scaffold, seed, native_px, f, conds, settings, batch, done):
    pixels = []
    for job in batch:
        c = job.crop
        box = canvas[..., c.y * f : (c.y + c.side) * f, c.x * f : (c.x + c.side) * f]
        pixels.append(resize(box, native_px, native_px))
    noise = torch.cat([crop_noise(scaffold, job.crop, seed) for job in batch])
    cond = PromptEmbeds.stack([conds[job.prompt] for job in batch])
    layer_settings = RefineSettings(settings.cfg, settings.steps, batch[0].denoise, settings.sampler)
    return torch.cat(pixels), noise, cond, layer_settings


def detail(
    ex: Executor,
    canvas: torch.Tensor,
    jobs: list[DetailJob],
    scaffold: torch.Tensor,
    conds: dict[str, PromptEmbeds],
    settings: RefineSettings,
    seed: int,
    native_px: int,
    f: int,
    tile_batch: int,
    log: Callable[[str], None] = lambda text: None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine every job's crop, layer by layer; return (canvas pixels, refinement mask [1, 1, h, w] latent)."""
    canvas = canvas.clone()
    height, width = canvas.shape[-2:]
    refined_mask = torch.zeros(1, 1, height // f, width // f)
    if not jobs:
        log("detail: no detections, the stage changes nothing")
        return canvas, refined_mask
    for layer in sorted({job.detection.layer for job in jobs}):
        mine = [job for job in jobs if job.detection.layer == layer]
        batches = job_batches(mine, tile_batch)
        # every crop of a layer reads the canvas as the layer found it: composites wait until all are refined
        args = partial(_batch_args, canvas, scaffold, seed, native_px, f, conds, settings)
        tasks = [
            Task(i, "detail", partial(args, batch), group=f"layer {layer}", units=len(batch), boxes=_boxes(batch))
            for i, batch in enumerate(batches)
        ]
        log(f"detail layer {layer}: {len(mine)} crop(s) in {len(batches)} batch(es)")
        done = ex.run("detail", tasks)
        results = {job.crop.id: done[i][j : j + 1] for i, batch in enumerate(batches) for j, job in enumerate(batch)}
        for job in mine:  # detection order, so overlapping crops always stack the same way
            c = job.crop
            refined = resize(results[c.id], c.side * f, c.side * f)
            mask = feather_detection(crop_mask(job.detection.mask, c, f, (height, width)), c, (height // f, width // f))
            composite_crop(canvas, refined, mask, c, f)
            box = refined_mask[..., c.y : c.y + c.side, c.x : c.x + c.side]
            box.copy_(torch.maximum(box, F.avg_pool2d(mask, f)))
    return canvas, refined_mask
