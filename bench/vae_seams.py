"""Tiled VAE decode and encode against an untiled one: per-tile texture, per-tile GroupNorm vs shared
(pooled with one barrier; for the decode also layer by layer, one barrier per GroupNorm: what decode_canvas runs).

texture of a region = mean |I(x) - I(x-1)| along rows. For every tile of the grid, its interior
(its core: its share of the canvas, overlaps split at their middle) is measured on the tiled result
and on the untiled one; the table gives the ratio tiled / untiled (min and max over tiles: a
checkerboard spreads them apart), the even / odd ratio of interior texture, and the mean
|tiled - untiled|. The latent is seeded noise with a channel-mean offset on the even tiles' cores
(tiles whose statistics differ, as a real image's do); the encode input is the untiled decode of that latent.

    python bench/vae_seams.py                        # 64x64 latent (512 px), 24-latent tiles, overlap 6
    python bench/vae_seams.py --latent 96 --tile 32 --overlap 8 --shift 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from farm.executor import LocalExecutor  # noqa: E402
from farm.tiny_models import ensure_tiny_models  # noqa: E402
from pipeline.geometry.chess import TileGrid, cover_grid  # noqa: E402
from pipeline.geometry.tiling import core_bounds, run_tiled, run_tiled_exact_norm, run_tiled_shared_norm  # noqa: E402
from pipeline.graph.worker import TileWorker, WorkerConfig  # noqa: E402
from pipeline.sampling import vae  # noqa: E402


def interior(grid: TileGrid, tile, scale: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) in output px of the tile's core (the cores partition the canvas)."""
    y0, y1 = core_bounds(grid.ys, grid.tile_h, grid.canvas_h, tile.row)
    x0, x1 = core_bounds(grid.xs, grid.tile_w, grid.canvas_w, tile.col)
    return y0 * scale, y1 * scale, x0 * scale, x1 * scale


def texture(image: torch.Tensor, box: tuple[int, int, int, int]) -> float:
    """Mean absolute horizontal step inside box ([.., H, W])."""
    y0, y1, x0, x1 = box
    region = image[..., y0:y1, x0:x1].float()
    return float((region[..., 1:] - region[..., :-1]).abs().mean())


def texture_ratios(tiled: torch.Tensor, untiled: torch.Tensor, grid: TileGrid, scale: int) -> dict[int, float]:
    """Tile id -> interior texture of the tiled result over the untiled one's."""
    boxes = {t.id: interior(grid, t, scale) for t in grid.tiles}
    return {i: texture(tiled, box) / texture(untiled, box) for i, box in boxes.items()}


def even_odd(image: torch.Tensor, grid: TileGrid, scale: int) -> float:
    """Mean interior texture of even tiles over that of odd tiles."""
    by = {"even": [], "odd": []}
    for t in grid.tiles:
        by[t.parity].append(texture(image, interior(grid, t, scale)))
    return statistics.mean(by["even"]) / statistics.mean(by["odd"])


def shifted_latent(size: int, grid: TileGrid, shift: float, seed: int = 1, channels: int = 4) -> torch.Tensor:
    """Seeded N(0, 1) latents with `shift` added to every channel inside the even tiles' cores."""
    latent = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
    for t in grid.even:
        y0, y1, x0, x1 = interior(grid, t, 1)
        latent[..., y0:y1, x0:x1] += shift
    return latent


def compare(worker: TileWorker, latent: torch.Tensor, tile: int, overlap: int) -> list[dict]:
    """Rows of the table: decode and encode, untiled / per-tile GroupNorm / shared GroupNorm (one barrier) /
    for the decode, layer by layer."""
    ex, f = LocalExecutor(worker), worker.model.info.vae_factor
    grid = cover_grid(latent.shape[-2], latent.shape[-1], tile, overlap)
    pixels = vae.decode(worker.model.vae, latent, tiled=False)
    runs = {
        "decode": (
            pixels,
            run_tiled(ex, "decode", "decode_tile", latent, tile, overlap, f, 3),
            run_tiled_shared_norm(ex, "decode", "decode_stats", "decode_tile", latent, tile, overlap, 1, f, 3),
            f,
            run_tiled_exact_norm(ex, "decode", "decode_stats", "decode_tile", latent, tile, overlap, 1, f, 3),
        ),
        "encode": (
            vae.encode(worker.model.vae, pixels, tiled=False),
            run_tiled(ex, "encode", "encode_tile", pixels, tile, overlap, 1, latent.shape[1], scale_in=f),
            run_tiled_shared_norm(
                ex, "encode", "encode_stats", "encode_tile", pixels, tile, overlap, f, 1, latent.shape[1]
            ),
            1,
            None,
        ),
    }
    rows = []
    for what, (untiled, old, new, scale, exact) in runs.items():
        paths = [("untiled", untiled), ("per-tile GroupNorm", old), ("shared GroupNorm", new)]
        paths += [("layer-by-layer", exact)] if exact is not None else []
        for path, image in paths:
            ratios = texture_ratios(image, untiled, grid, scale).values()
            rows.append(
                {
                    "stage": what,
                    "path": path,
                    "tiles": len(grid.tiles),
                    "ratio min": min(ratios),
                    "ratio max": max(ratios),
                    "even/odd": even_odd(image, grid, scale),
                    "mean |diff|": float((image - untiled).abs().mean()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent canvas side (px = x8)")
    parser.add_argument("--tile", type=int, default=24, help="tile side in latents")
    parser.add_argument("--overlap", type=int, default=6, help="minimum overlap in latents")
    parser.add_argument("--shift", type=float, default=0.3, help="channel-mean offset on even tile interiors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, upscaler = ensure_tiny_models()
    worker = TileWorker(WorkerConfig(str(model), str(upscaler), "", "fp32", "cpu"))
    grid = cover_grid(args.latent, args.latent, args.tile, args.overlap)
    latent = shifted_latent(args.latent, grid, args.shift)
    print(
        f"tiny SDXL VAE, {args.latent * 8} px ({args.latent} latents), {len(grid.tiles)} tiles of {args.tile} "
        f"latents, overlap >= {args.overlap}, even-tile shift {args.shift}"
    )
    print(f"{'stage':7} {'path':20} {'tile/untiled min':>16} {'max':>6} {'even/odd':>9} {'mean |diff|':>12}")
    for r in compare(worker, latent, args.tile, args.overlap):
        print(
            f"{r['stage']:7} {r['path']:20} {r['ratio min']:16.3f} {r['ratio max']:6.3f} "
            f"{r['even/odd']:9.3f} {r['mean |diff|']:12.4f}"
        )


if __name__ == "__main__":
    main()
