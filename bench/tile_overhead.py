"""Per-tile overhead of the chess path on the CPU: everything a tile costs except the model itself.

Runs the real chess refine (task graph, local executor dispatch, canvas crops, scaffold slices,
odd-tile region composites, the two pass composites, the sampler loop and scheduler steps) with
the real tiny TileWorker whose UNet is swapped for a zero-cost stand-in, so what is timed is the
tile path alone. Split per tile into: the sampler's arithmetic (scheduler steps, CFG combine,
noise), and dispatch + slicing + compositing (the target: <= 10 ms per tile at batch 4).

    python bench/tile_overhead.py                      # 4096 px canvas, 1024 px tiles, 20 steps, batch 1 and 4
    python bench/tile_overhead.py --size 8192 --repeat 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from farm.executor import LocalExecutor  # noqa: E402
from farm.tiny_models import ensure_tiny_models  # noqa: E402
from pipeline.geometry.chess import batches, chess_grid, fit_grid  # noqa: E402
from pipeline.geometry.scaffold import make_scaffold  # noqa: E402
from pipeline.graph.worker import TileWorker, WorkerConfig  # noqa: E402
from pipeline.sampling.chess_pass import RefineSettings, chess_refine  # noqa: E402


class NullUNet(torch.nn.Module):
    """A UNet stand-in that predicts zero noise at no cost: same call signature, dtype and device."""

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (torch.zeros_like(sample),)


def measure(worker: TileWorker, grid, batch: int, cond, settings: RefineSettings, repeat: int) -> dict:
    """Median seconds of one chess refine over `grid` at tile batch `batch`, split into sampler vs the rest."""
    canvas = torch.randn(1, 4, grid.canvas_h, grid.canvas_w, generator=torch.Generator().manual_seed(0))
    scaffold = make_scaffold(0, 4, grid.canvas_h, grid.canvas_w).numpy()
    even, odd = tuple(batches(grid.even, batch)), tuple(batches(grid.odd, batch))
    refine = worker.refine
    inside = []

    def timed_refine(*args):
        start = time.perf_counter()
        try:
            return refine(*args)
        finally:
            inside[-1] += time.perf_counter() - start

    worker.refine = timed_refine
    totals = []
    try:
        for _ in range(repeat + 1):  # the first run warms allocators and lazy imports
            inside.append(0.0)
            start = time.perf_counter()
            chess_refine(LocalExecutor(worker), grid, even, odd, canvas, scaffold, cond, settings)
            totals.append(time.perf_counter() - start)
    finally:
        del worker.refine
    total, sampler = statistics.median(totals[1:]), statistics.median(inside[1:])
    n = len(grid.tiles)
    return dict(batch=batch, tiles=n, batches=len(even) + len(odd), total=total, sampler=sampler, per_tile=total / n)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="square canvas in px")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--grid", default="chess", choices=("chess", "fit"))
    parser.add_argument("--fit-overlap", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--batches", default="1,4", help="tile batch sizes")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--model", help="tiny SDXL folder (default: built once under ~/.cache/tilefarm)")
    args = parser.parse_args(argv)

    model = args.model or ensure_tiny_models()[0]
    worker = TileWorker(WorkerConfig(str(model), "", "", "fp32", "cpu", torch.get_num_threads()))
    worker.model.denoiser.unet = NullUNet()
    cond = worker.encode_prompt("a lighthouse on a cliff at dawn", "blurry", args.cfg)
    # the stand-in takes no text: the tiny encoder's embeddings only have to be the right kind of tensors
    settings = RefineSettings(args.cfg, args.steps, 0.35, "dpmpp_2m_karras")
    latent, tile = args.size // 8, args.tile // 8
    grid = (
        chess_grid(latent, latent, tile)
        if args.grid == "chess"
        else fit_grid(latent, latent, tile, args.fit_overlap // 8)
    )

    rows = [measure(worker, grid, int(b), cond, settings, args.repeat) for b in args.batches.split(",")]
    print(
        f"{args.size} px canvas, {args.grid} grid {grid.rows}x{grid.cols} = {len(grid.tiles)} tiles of "
        f"{grid.tile_h * 8} px, {args.steps} steps, cfg {args.cfg}, zero-cost UNet; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeat}\n"
    )
    print(
        "| tile batch | batches | chess s | ms per tile | sampler arithmetic ms/tile | "
        "dispatch + slicing + compositing ms/tile | target <= 10 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        rest = (r["total"] - r["sampler"]) / r["tiles"] * 1000
        r["rest_ms"] = rest
        print(
            f"| {r['batch']} | {r['batches']} | {r['total']:.3f} | {r['per_tile'] * 1000:.2f} | "
            f"{r['sampler'] / r['tiles'] * 1000:.2f} | {rest:.2f} | {'yes' if rest <= 10 else 'no'} |"
        )
    return rows


if __name__ == "__main__":
    main()
