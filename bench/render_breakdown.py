"""Where a render's time goes: wall time per stage and the share spent inside model forward calls.

Runs a whole top-down render with the tiny random-weight models (or your own, with --model and
--upscaler) through the local executor and prints a markdown table.

    python bench/render_breakdown.py                      # tiny models, 1024x1024 from a 256 px base
    python bench/render_breakdown.py --size 2048x2048 --repeat 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from farm.executor import prepare, run_local
from farm.tiny_models import TINY_NATIVE_PX, ensure_tiny_models
from pipeline.graph.clock import Clock
from pipeline.spec import RenderSpec, parse_size

STAGES = ("load", "prompt", "scaffold", "base", "upscale", "encode", "refine", "decode")


def one_run(spec: RenderSpec, device: str) -> tuple[Clock, float]:
    clock = Clock()
    start = time.perf_counter()
    run_local(prepare(spec), device, clock=clock)
    return clock, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--tile", type=int, default=TINY_NATIVE_PX)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--base-steps", type=int, default=8)
    parser.add_argument("--tile-batch", type=int, default=4)
    parser.add_argument("--model", help="diffusers SDXL folder (default: the tiny model)")
    parser.add_argument("--upscaler", help="upscaler file (default: the tiny 4x Compact)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    args = parser.parse_args()

    tiny_model, tiny_upscaler = ensure_tiny_models()
    width, height = parse_size(args.size)
    spec = RenderSpec(
        model=args.model or str(tiny_model),
        upscaler=args.upscaler or str(tiny_upscaler),
        prompt="a lighthouse on a cliff at dawn",
        negative="blurry",
        width=width,
        height=height,
        steps=args.steps,
        base_steps=args.base_steps,
        cfg=5.0,
        denoise=0.4,
        tile=args.tile,
        tile_batch=args.tile_batch,
        native=0 if args.model else TINY_NATIVE_PX,
        upscale_tile=128,
    ).validate()
    one_run(spec, args.device)  # warm-up: first-call allocations and lazy imports
    runs = [one_run(spec, args.device) for _ in range(args.repeat)]

    def median(values):
        return statistics.median(values)

    wall = median([w for _, w in runs])
    print(
        f"render {width}x{height}, tile {args.tile}, {args.steps} refine steps, batch {args.tile_batch}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeat} runs\n"
    )
    print("| stage | seconds | share of wall |")
    print("|---|---:|---:|")
    for stage in STAGES:
        seconds = median([c.stages.get(stage, 0.0) for c, _ in runs])
        print(f"| {stage} | {seconds:.3f} | {seconds / wall:.1%} |")
    print(f"| **wall** | {wall:.3f} | 100% |\n")
    print("| model forward | calls | seconds | share of wall |")
    print("|---|---:|---:|---:|")
    names = sorted({n for c, _ in runs for n in c.models})
    total = 0.0
    for name in names:
        seconds = median([c.models[name] for c, _ in runs])
        total += seconds
        print(f"| {name} | {runs[0][0].calls[name]} | {seconds:.3f} | {seconds / wall:.1%} |")
    load = median([c.stages["load"] for c, _ in runs])
    print(
        f"| **all models** | | {total:.3f} | {total / wall:.1%} (of wall without loading: "
        f"{total / (wall - load):.1%}) |"
    )


if __name__ == "__main__":
    main()
