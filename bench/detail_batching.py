"""Detail crops refined in batches vs one by one: wall time per crop of the whole detail stage.

Runs the semantic detailer (crop, resize, encode, refine, decode, mask composite) on a canvas with
a fixed set of detections (the same boxes and masks for every batch size, so only batching
differs), with the tiny random-weight models through the local executor, and prints a table.

    python bench/detail_batching.py                    # 8 crops on a 1024 px canvas, batches 1, 2, 4, 8
    python bench/detail_batching.py --crops 12 --batches 1 4 --repeat 5
    python bench/detail_batching.py --model /models/sdxl --device cuda --size 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from farm.executor import LocalExecutor
from farm.tiny_models import TINY_NATIVE_PX, ensure_tiny_models
from pipeline.detail.detailer import detail, plan_jobs
from pipeline.detail.detection import Concept, Detection
from pipeline.geometry.scaffold import make_scaffold
from pipeline.graph.worker import TileWorker, WorkerConfig
from pipeline.loading.models import inspect_diffusion_model
from pipeline.sampling.chess_pass import RefineSettings


def detections(n: int, size: int = 128) -> list[Detection]:
    """n boxes of a few sizes spread over the canvas, each with an elliptic mask."""
    g = torch.Generator().manual_seed(0)
    found = []
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for _ in range(n):
        w = (torch.rand(1, generator=g).item() * 0.15 + 0.08) * size
        cx, cy = (torch.rand(2, generator=g) * (size - w) + w / 2).tolist()
        mask = ((((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (w / 2)) ** 2) <= 1).float()
        box = ((cx - w / 2) / size, (cy - w / 2) / size, (cx + w / 2) / size, (cy + w / 2) / size)
        found.append(Detection("face", 0, box, mask, 0.9))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="square canvas in px")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per batch size after one warm-up")
    parser.add_argument("--model", help="diffusers SDXL or Flux folder (default: the tiny SDXL)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()

    tiny, _ = ensure_tiny_models()
    info = inspect_diffusion_model(args.model or tiny)
    worker = TileWorker(WorkerConfig(str(info.path), "", "", "auto", args.device))
    ex = LocalExecutor(worker)
    f = info.vae_factor
    native = (info.native_px if args.model else TINY_NATIVE_PX) // f
    pixels = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    scaffold = make_scaffold(0, info.latent_channels, args.size // f, args.size // f)
    conds = {"": worker.encode_prompt("a portrait", "blurry", 5.0)}
    settings = RefineSettings(5.0, args.steps, 0.45, "dpmpp_2m_karras")
    jobs = plan_jobs(detections(args.crops), (Concept("face"),), (args.size // f,) * 2, native, 0.25)
    sides = sorted({j.crop.side * f for j in jobs})

    def stage(batch: int) -> float:
        start = time.perf_counter()
        detail(ex, pixels, jobs, scaffold, conds, settings, 0, native * f, f, batch)
        return time.perf_counter() - start

    print(
        f"{args.crops} crops (sides {', '.join(map(str, sides))} px) on a {args.size} px canvas, refined at "
        f"{native * f} px, {args.steps} steps, CFG 5, on {worker.device}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeat}"
    )
    stage(max(args.batches))  # warm-up
    rows = {b: statistics.median(stage(b) for _ in range(args.repeat)) for b in args.batches}
    base = rows[min(args.batches)]
    print("\n| crops per batch | stage s | ms per crop | speedup vs one by one |")
    print("|---:|---:|---:|---:|")
    for b, seconds in rows.items():
        print(f"| {b} | {seconds:.3f} | {1000 * seconds / args.crops:.1f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
