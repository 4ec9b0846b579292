"""Scaling of the refine over Ray actors, with the tile cost simulated (a sleep per tile).

Runs the real scheduler and the real chess task graph (dependencies, region composites, final
composites) of an 8K canvas with 1024 px tiles (9 x 9 = 81 tiles) on a local Ray, for 1, 2, 4
and 8 actors, and for 8 actors with one 3x slower. Prints speedups against 1 actor, the slow
actor's share of tiles, and the driver's dispatch overhead per batch (measured with zero cost).
Then the blended sampler on the same grid and actors: the same tile work split into `--steps`
steps (a tile-step costs cost / steps), one task graph and one canvas step on the driver per step.

    python bench/scaling.py                    # 0.2 s per tile, batches of 1
    python bench/scaling.py --tile-batch 4 --cost 0.1
    python bench/scaling.py --tile-batch 4 --steps 20 --only-tiling

With --whole-render: a whole top-down SDXL render (plan, base, upscale, encode, refine, decode; the
real render, executor, scheduler and transport) at each of --sizes on each of --actors simulated
actors whose model calls cost their FLOPs at --tflops (bench/whole_render.py, bench/flops.py).

    python bench/scaling.py --whole-render                      # 8192 px; 1, 2, 4, 8, 16 actors
    python bench/scaling.py --whole-render --sizes 8192,16384
    python bench/scaling.py --whole-render --quick              # 4096 px; 1, 2, 4 actors; 8 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cluster  # noqa: F401  first: the driver's OpenMP wait policy, as the farm sets it (pipeline/openmp.py)

# isort: split
import numpy as np
import ray
import torch

from cluster.executor import ClusterExecutor
from cluster.wire import to_wire
from pipeline.geometry.chess import batches, chess_grid
from pipeline.sampling.blend import blend_refine
from pipeline.sampling.chess_pass import RefineSettings, chess_refine
from pipeline.spec import TILINGS

sys.path.insert(0, str(Path(__file__).parent))
from flops import DEFAULT_TFLOPS  # noqa: E402
from sim_worker import SimWorker  # noqa: E402
from whole_render import run_whole_render  # noqa: E402


def measure(actors: list, grid, even, odd, canvas, scaffold) -> tuple[float, float, list]:
    """(seconds the scheduler ran the graph, seconds including the final composites, dispatch log)."""
    ex = ClusterExecutor(actors)
    inner = {}
    run = ex.scheduler.run

    def timed_run(stage, tasks, on_done=None, on_result=None):
        start = time.perf_counter()
        try:
            return run(stage, tasks, on_done, on_result)
        finally:
            inner["s"] = time.perf_counter() - start

    ex.scheduler.run = timed_run
    start = time.perf_counter()
    chess_refine(ex, grid, even, odd, canvas, scaffold, None, RefineSettings(1.0, 1, 0.5, "euler"))
    return inner["s"], time.perf_counter() - start, ex.scheduler.log


def measure_blend(actors: list, grid, tile_batches, canvas, steps: int) -> float:
    """Seconds the blended sampler takes for `steps` steps over the actors (graphs, blends and canvas steps)."""
    from diffusers import EulerDiscreteScheduler

    config = dict(EulerDiscreteScheduler().config)
    settings = RefineSettings(1.0, steps, 0.35, "euler")
    start = time.perf_counter()
    blend_refine(ClusterExecutor(actors), grid, tile_batches, canvas, canvas, None, settings, "sdxl", config)
    return time.perf_counter() - start


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", type=float, default=0.2, help="simulated seconds per tile")
    parser.add_argument("--tile-batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=8192, help="square canvas in px")
    parser.add_argument(
        "--steps", type=int, default=None, help="blended sampler: steps the tile work is split into (20; --quick: 8)"
    )
    parser.add_argument("--only-tiling", action="store_true", help="only the chess vs blend table")
    parser.add_argument("--tiling-actors", type=_ints, default=[1, 2, 4, 8], help="actor counts of that table")
    whole = parser.add_argument_group("whole render (--whole-render)")
    whole.add_argument("--whole-render", action="store_true", help="the whole render on simulated actors")
    whole.add_argument("--sizes", type=_ints, default=[8192], help="square target sizes in px, comma-separated")
    whole.add_argument("--actors", type=_ints, default=[1, 2, 4, 8, 16], help="actor counts, comma-separated")
    whole.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="effective TFLOP/s of each actor")
    whole.add_argument("--base-steps", type=int, default=30)
    whole.add_argument("--tiling", default="blend", choices=TILINGS)
    whole.add_argument("--quick", action="store_true", help="4096 px on 1, 2 and 4 actors, 8 steps")
    whole.add_argument("--timeline-dir", type=Path, default=Path("bench/out/whole-render"))
    whole.add_argument("--recount-flops", action="store_true", help="count the FLOP table again (bench/flops.py)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 20)
    if args.whole_render:
        if args.quick:
            args.sizes, args.actors = [4096], [1, 2, 4]
        return run_whole_render(
            args.sizes, args.actors, args.tflops, args.steps, args.base_steps, args.tile_batch, args.tiling,
            args.timeline_dir, args.recount_flops,
        )  # fmt: skip

    # workers import the simulated actor by module (a class pickled from __main__ was measured slower)
    paths = {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}"}
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": paths},
    )
    latent = args.size // 8
    grid = chess_grid(latent, latent, 128)
    even, odd = tuple(batches(grid.even, args.tile_batch)), tuple(batches(grid.odd, args.tile_batch))
    canvas = torch.randn(1, 4, latent, latent)
    scaffold = ray.put(np.random.default_rng(0).standard_normal((1, 4, latent, latent), dtype=np.float32))
    n_tiles, n_batches = len(grid.tiles), len(even) + len(odd)
    remote = ray.remote(num_cpus=1)(SimWorker)

    def actors(n: int, cost: float, slow: int = 0):
        made = [remote.remote(0.0, 3.0 if i < slow else 1.0) for i in range(n)]
        # warm-up: a first tensor argument imports torch in the actor, and the first graph run in a
        # session is slower (fresh object-store memory); time the steady state of a running farm
        warm = to_wire((grid.tiles[:1], canvas[..., :128, :128]))
        ray.get([a.run.remote("refine", *warm) for a in made])
        first = measure(made, grid, even, odd, canvas, scaffold)[0]
        ray.get([a.set_cost.remote(cost) for a in made])
        return made, first

    def measure_and_stop(made_first):
        made, _ = made_first
        try:
            return measure(made, grid, even, odd, canvas, scaffold)
        finally:
            for a in made:
                ray.kill(a)

    def tiling_table() -> None:
        every = tuple(batches(grid.tiles, args.tile_batch))
        print(f"\nblended sampler: {args.steps} steps of {len(every)} batches; a tile-step costs cost / steps")
        print("| actors | chess span s | blend s | blend / chess | target <= 1.10 |")
        print("|---:|---:|---:|---:|---:|")
        for n in args.tiling_actors:
            span, _, _ = measure_and_stop(actors(n, args.cost))
            made, _ = actors(n, args.cost / args.steps)
            try:
                blend = measure_blend(made, grid, every, canvas, args.steps)
            finally:
                for a in made:
                    ray.kill(a)
            print(f"| {n} | {span:.2f} | {blend:.2f} | {blend / span:.3f} | {'yes' if blend / span <= 1.1 else 'no'} |")

    if args.only_tiling:
        tiling_table()
        ray.shutdown()
        return

    print(
        f"{args.size} px canvas, {grid.rows}x{grid.cols} = {n_tiles} tiles ({len(grid.even)} even + "
        f"{len(grid.odd)} odd), batches of {args.tile_batch}: {n_batches} batches; {args.cost} s per tile\n"
    )

    made = actors(1, 0.0)
    first = made[1]
    span, total, log = measure_and_stop(made)
    print(
        f"dispatch overhead (1 actor, zero cost): {1000 * span / n_batches:.2f} ms per batch in the scheduler, "
        f"{1000 * total / n_batches:.2f} ms per batch with the final composites "
        f"(first graph run of a fresh session: {1000 * first / n_batches:.2f} ms per batch)\n"
    )

    print("| actors | chess span s | speedup | target 0.9 N | with composites s | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    base_span = base_total = None
    for n in (1, 2, 4, 8):
        span, total, _ = measure_and_stop(actors(n, args.cost))
        base_span, base_total = base_span or span, base_total or total
        ok = "yes" if base_span / span >= 0.9 * n else "no"
        print(f"| {n} | {span:.2f} | {base_span / span:.2f} | {ok} | {total:.2f} | {base_total / total:.2f} |")

    span, total, log = measure_and_stop(actors(8, args.cost, slow=1))
    speed = 7 + 1 / 3  # tiles per cost unit of 7 normal actors and one 3x slower
    ideal = n_tiles * args.cost / speed
    one_batch = 3 * args.cost * args.tile_batch  # one batch on the slow actor
    slow_tiles = sum(len(b) for d in log for b in [(*even, *odd)[d.task]] if d.actor == 0)
    print(
        f"\n8 actors, one 3x slower: chess span {span:.2f} s; ideal speed-proportional {ideal:.2f} s; "
        f"excess {span - ideal:.2f} s vs one slow batch {one_batch:.2f} s "
        f"({'within' if span - ideal <= one_batch else 'over'}); slow actor took {slow_tiles} of {n_tiles} tiles "
        f"(proportional share {n_tiles / speed / 3:.1f})"
    )
    tiling_table()
    ray.shutdown()


if __name__ == "__main__":
    main()
