"""Seam bench: every tiling mode refines the same start canvas, measured against an untiled reference.

For each geometry, tiny random-weight models on the CPU (fp32) refine ONE start canvas (the real
top-down render up to the encode, or --start synthetic: a latent of flat patches, ramps and texture,
where seams are easiest to see but the raw band and parity figures also depend on which patches
fall where) with the same scaffold in every tiling mode of pipeline.spec.TILINGS (through the real
chess_stage and the local executor; a mode that is not built yet prints "not available"), with
the per-tile Ultimate SD Upscale baseline (bench/usdu_baseline.py), and with one tile covering
the whole canvas: the untiled reference. Metrics are in bench/seam_metrics.py (protocol:
research/seams.md section 12); pixels are decoded untiled so the VAE adds no seams of its own,
and the project's tiled decode is measured on its own against the untiled one.

Large canvases do not fit an untiled refine or decode on a CPU (a 4096 px untiled decode of the
tiny VAE takes minutes: its attention is quadratic in the latent area), so the reference refines
a --ref-window around a 4-tile corner (the same scaffold slice) and the comparisons run on the
--window at its centre, away from the reference's own borders. Where the canvas fits both windows
(the demo geometry), they are the whole canvas.

    python bench/seams.py                                   # demo, 4096, 3840x2160 (see below)
    python bench/seams.py --quick                           # the demo geometry, 2 steps
    python bench/seams.py --start synthetic                 # flat patches: seams easiest to see
    python bench/seams.py --geometries 4096 --steps 3 --denoise 0.35
    python bench/seams.py --geometries 512x512/128          # any WIDTHxHEIGHT/TILE in px

Time on a 2-core VM shared with other jobs (load 6-14), chess-original the only mode built: demo
about 3-5 min, 4096 18 min (the USDU baseline 8 min of it, chess-original 4 min, the 4096 tiled
encode of the start, the 2048 px reference and the decodes the rest), 3840x2160 4.5 min. The cost
is the tiny UNet's tile steps and per-tile VAE calls; --no-usdu and --geometries demo cut it most.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from seam_metrics import (  # noqa: E402  (grid_boundaries and seam_ratio are re-exported: their old home)
    SeamMasks,
    abutting_masks,
    band_core_error,
    band_core_ratio,
    error_map,
    error_profile,
    even_odd_ratio,
    grid_boundaries,
    grid_masks,
    ratio,
    region_step_mean,
    seam_ratio,  # noqa: F401
    texture_cv,
)
from seams_report import Row, print_tables, write_strip  # noqa: E402
from usdu_baseline import processing_size, usdu_refine, usdu_tiles  # noqa: E402

from farm.executor import LocalExecutor  # noqa: E402
from pipeline.geometry.chess import TileGrid, chess_grid, cover_grid  # noqa: E402
from pipeline.geometry.scaffold import pool_noise  # noqa: E402
from pipeline.geometry.tiling import core_bounds  # noqa: E402
from pipeline.graph.clock import Clock  # noqa: E402
from pipeline.graph.stream import Fixed, Graph  # noqa: E402
from pipeline.graph.worker import TileWorker, WorkerConfig  # noqa: E402
from pipeline.loading.models import inspect_diffusion_model  # noqa: E402
from pipeline.plan import RenderPlan, make_plan  # noqa: E402
from pipeline.render import (  # noqa: E402
    Start,
    blend_graph,
    chess_stage,
    decode_canvas,
    run_graph,
    start,
    upscale_to_target,
)
from pipeline.sampling.chess_pass import RefineSettings  # noqa: E402
from pipeline.spec import TILINGS, RenderSpec, parse_size  # noqa: E402

PX_BLOCK, LATENT_BLOCK = 64, 8  # texture CV block sizes (8 latent px = 64 px at VAE factor 8)
Window = tuple[int, int, int, int]  # (y, x, h, w) in latent px


@dataclass(frozen=True)
class Geometry:
    name: str
    width: int
    height: int
    tile: int
    steps: int  # default refine steps (few at 4K: the tiny UNet is slow on a CPU)


GEOMETRIES = {
    "demo": Geometry("demo", 1024, 1024, 256, 4),  # `farm demo`: 5x5 chess tiles of 256 px, 4 steps, denoise 0.4
    "4096": Geometry("4096", 4096, 4096, 1024, 2),
    "3840x2160": Geometry("3840x2160", 3840, 2160, 1024, 2),
}


def parse_geometry(text: str) -> Geometry:
    """A named geometry or WIDTHxHEIGHT/TILE in px."""
    if text in GEOMETRIES:
        return GEOMETRIES[text]
    size, _, tile = text.partition("/")
    width, height = parse_size(size)
    return Geometry(text.replace("/", "-t"), width, height, int(tile or 1024), 2)


def synthetic_latent(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """[1, C, h, w] start canvas where seams show (research/seams.md 12): flat patches, linear ramps and
    textured cells, in cells of about a fifth of the canvas, offset so they line up with no tile grid."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.linspace(0, 1, height)[:, None], torch.linspace(0, 1, width)[None, :]
    a, b, c = (torch.randn(channels, 1, 1, generator=g) * 0.8 for _ in range(3))
    ramp = a * ys + b * xs + c
    cell = max(3, round(min(height, width) / 5.3))
    cy = (torch.arange(height) + cell // 3) // cell
    cx = (torch.arange(width) + cell // 2) // cell
    flat = (torch.randn(channels, int(cy.max()) + 1, int(cx.max()) + 1, generator=g) * 0.8)[:, cy][:, :, cx]
    texture = ramp + 0.6 * torch.randn(channels, height, width, generator=g)
    kind = (cy[:, None] + 2 * cx[None, :]) % 3
    return torch.where(kind == 0, flat, torch.where(kind == 1, ramp, texture))[None]


def corner(grid: TileGrid) -> tuple[int, int]:
    """(y, x) latent px at the centre of the 4-tile overlap nearest the canvas centre."""

    def axis(origins: tuple[int, ...], size: int, length: int) -> int:
        if len(origins) < 2:
            return length // 2
        i = (len(origins) - 2) // 2
        return (origins[i + 1] + origins[i] + size) // 2

    return axis(grid.ys, grid.tile_h, grid.canvas_h), axis(grid.xs, grid.tile_w, grid.canvas_w)


def centred(cy: int, cx: int, side: int, bounds: Window) -> Window:
    """A square box of `side` around (cy, cx), shrunk and slid to lie inside `bounds`."""
    by, bx, bh, bw = bounds
    h, w = min(side, bh), min(side, bw)
    return (min(max(cy - h // 2, by), by + bh - h), min(max(cx - w // 2, bx), bx + bw - w), h, w)


def cut(t: torch.Tensor, box: Window, scale: int = 1) -> torch.Tensor:
    y, x, h, w = (v * scale for v in box)
    return t[..., y : y + h, x : x + w]


def reference_plan(plan: RenderPlan, height: int, width: int) -> RenderPlan:
    """The plan with one tile covering a whole height x width canvas: the untiled refine, same code path."""
    grid = chess_grid(height, width, max(height, width))
    spec = replace(plan.spec, tiling="chess-original")
    one = dict(latent_h=height, latent_w=width, grid=grid, even_batches=(grid.tiles,), odd_batches=())
    return replace(plan, spec=spec, **one)


@dataclass
class Outcome:
    """One way of refining the start canvas: its latent over the analysis window (None for a pixel-space
    baseline), its whole latent canvas (tiled modes), pixels decoded untiled and with the project's decode."""

    name: str
    latent: torch.Tensor | None = None
    canvas: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    tiled_pixels: torch.Tensor | None = None
    seconds: float = float("nan")
    seconds_decode: float = float("nan")
    work: float = float("nan")
    note: str = ""


def bench_spec(
    g: Geometry, model: str, upscaler: str, steps: int, denoise: float, seed: int, decode_norm: str = "exact"
) -> RenderSpec:
    """`farm demo`'s settings (CFG 5, 256 px native) at the geometry."""
    from farm.cli import DEMO_PROMPT
    from farm.tiny_models import TINY_NATIVE_PX

    return RenderSpec(
        model=model, upscaler=upscaler, prompt=DEMO_PROMPT, negative="blurry, low quality", width=g.width,
        height=g.height, seed=seed, steps=steps, base_steps=8, cfg=5.0, denoise=denoise, tile=g.tile,
        native=min(TINY_NATIVE_PX, g.width, g.height), upscale_tile=128, decode_norm=decode_norm,
    ).validate()  # fmt: skip


def start_canvas(plan: RenderPlan, ex: LocalExecutor, s: Start, how: str, untiled: bool):
    """(start latent canvas, its pixels for the pixel-space baseline, a note on how they were made)."""
    if how == "render":  # the top-down render up to the encode, as render_top_down runs it
        spec = plan.spec
        base = ex.call("base", "base", pool_noise(s.scaffold, plan.k), s.cond, spec.cfg, spec.base_steps, spec.sampler)
        pixels = upscale_to_target(plan, ex, base, s.facts.upscale)
        return ex.call("encode", "encode", pixels), pixels, "top-down render up to the encode"
    canvas = synthetic_latent(plan.model.latent_channels, plan.latent_h, plan.latent_w, plan.spec.seed)
    if untiled:
        return canvas, ex.call("decode", "decode_tile", canvas), "synthetic latent (USDU input: untiled decode)"
    pixels = decode_canvas(plan, ex, canvas, s.facts.decode_tile)
    return canvas, pixels, "synthetic latent (USDU input: the project's tiled decode; the canvas is too large)"


def run_mode(plan: RenderPlan, ex: LocalExecutor, s: Start, canvas: torch.Tensor, tiling: str) -> Outcome:
    """Refine the canvas with one tiling mode as the render does: the chess modes through chess_stage, blend
    through its graph (blend_graph)."""
    mode_plan = make_plan(replace(plan.spec, tiling=tiling), plan.model)
    began = time.perf_counter()
    if tiling == "blend":  # the render runs it as graph tasks, not as a chess stage
        graph, bar = Graph(), []
        stepper = blend_graph(mode_plan, graph, s, Fixed(canvas), None, bar)
        run_graph(mode_plan, ex, graph, stepper, bar)
        out = stepper.latents.float()
    else:
        out = chess_stage(mode_plan, ex, s, canvas)
    return Outcome(tiling, canvas=out, seconds=time.perf_counter() - began, work=mode_plan.grid.work_multiplier)


def run_reference(plan: RenderPlan, ex: LocalExecutor, s: Start, canvas: torch.Tensor, box: Window) -> Outcome:
    """The untiled refine of the box: one tile, the box's slice of the same scaffold."""
    scaffold = cut(s.scaffold, box).contiguous()
    sub = Start(s.facts, s.cond_value, s.cond, scaffold, ex.share(scaffold.numpy()))
    began = time.perf_counter()
    out = chess_stage(reference_plan(plan, box[2], box[3]), ex, sub, cut(canvas, box).contiguous())
    whole = box[2:] == (plan.latent_h, plan.latent_w)
    note = "" if whole else f"untiled over a {box[3] * plan.f}x{box[2] * plan.f} px window"
    return Outcome("reference", canvas=out, seconds=time.perf_counter() - began, work=1.0, note=note)


def run_usdu(plan: RenderPlan, worker: TileWorker, s: Start, pixels: torch.Tensor) -> Outcome:
    """The per-tile Ultimate SD Upscale baseline on the start pixels (USDU's padding 32 / blur 8 at 1024 px
    tiles, scaled down for smaller tiles)."""
    spec, h, w = plan.spec, *pixels.shape[-2:]
    padding = min(32, spec.tile // 4)
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler)
    began = time.perf_counter()
    image = usdu_refine(worker.model, pixels, s.cond_value, settings, spec.seed, spec.tile, padding, padding / 4)
    seconds = time.perf_counter() - began
    sizes = [(processing_size(t.crop[2] - padding, 0, plan.f), processing_size(t.crop[3] - padding, 0, plan.f))
             for t in usdu_tiles(h, w, spec.tile, padding)]  # fmt: skip
    work = sum(a * b for a, b in sizes) / (h * w)
    return Outcome("usdu", pixels=image, seconds=seconds, work=work, note=f"padding {padding} px")


def measure(o: Outcome, ref: Outcome | None, masks: SeamMasks, px_masks: SeamMasks, whole: SeamMasks | None) -> Row:
    """The table row of one outcome (window metrics; whole-canvas latent ones where it has a canvas)."""
    row = Row(o.name, o.work, o.seconds, o.note)
    if o.pixels is None:
        return row
    row.cv_px = texture_cv(o.pixels, PX_BLOCK)
    row.band_core_px = band_core_ratio(o.pixels, px_masks)
    row.even_odd_px = even_odd_ratio(o.pixels, px_masks)
    if o.latent is not None:
        row.cv_lat = texture_cv(o.latent, LATENT_BLOCK)
        row.band_core_lat = band_core_ratio(o.latent, masks)
        row.even_odd_lat = even_odd_ratio(o.latent, masks)
    if whole is not None and o.canvas is not None and o.name != "reference":
        row.band_core_canvas = band_core_ratio(o.canvas, whole)
        row.even_odd_canvas = even_odd_ratio(o.canvas, whole)
    if ref is not None and o.latent is not None and o.name not in ("reference", "start"):
        error = error_map(o.latent, ref.latent)
        row.error_bins = error_profile(error, masks.distance)
        row.error_band_core = band_core_error(error, masks)
    return row


DECODED = ("reference", "blend", "chess-original")  # latents the decode alone is measured on


def tile_texture_ratios(tiled: torch.Tensor, untiled: torch.Tensor, grid: TileGrid, f: int) -> list[float]:
    """Per decode tile: mean |step| in its core (its share of the canvas), tiled over untiled."""
    out = []
    for t in grid.tiles:
        y0, y1 = core_bounds(grid.ys, grid.tile_h, grid.canvas_h, t.row)
        x0, x1 = core_bounds(grid.xs, grid.tile_w, grid.canvas_w, t.col)
        mask = torch.zeros(grid.canvas_h * f, grid.canvas_w * f, dtype=torch.bool)
        mask[y0 * f : y1 * f, x0 * f : x1 * f] = True
        out.append(ratio(region_step_mean(tiled, mask, False), region_step_mean(untiled, mask, False)))
    return out


def decode_rows(outcomes: list[Outcome], grid: TileGrid, f: int) -> list[Row]:
    """The decode alone: each latent decoded untiled and with decode_canvas, on decode_canvas's tile grid."""
    masks = grid_masks(grid).upsample(f)
    rows = []
    for o in outcomes:
        note = f"{o.name} latent, {grid.rows}x{grid.cols} decode tiles"
        pair = []
        for name, pixels in (("untiled decode", o.pixels), ("tiled decode (decode_canvas)", o.tiled_pixels)):
            row = Row(f"{o.name}: {name}", float("nan"), float("nan"), note)
            row.cv_px, row.band_core_px, row.even_odd_px = (
                texture_cv(pixels, PX_BLOCK), band_core_ratio(pixels, masks), even_odd_ratio(pixels, masks)
            )  # fmt: skip
            pair.append(row)
        pair[1].core_texture_ratio = ratio(
            region_step_mean(o.tiled_pixels, masks.core, False), region_step_mean(o.pixels, masks.core, False)
        )
        per_tile = tile_texture_ratios(o.tiled_pixels, o.pixels, grid, f)
        offset = (o.tiled_pixels - o.pixels).mean(dim=(-1, -2)).abs().max()
        pair[1].note = (
            f"{note}; per tile {min(per_tile):.3f}-{max(per_tile):.3f}; decode {o.seconds_decode:.0f} s; "
            f"mean |diff| {float((o.tiled_pixels - o.pixels).abs().mean()):.4f}, colour offset {float(offset):.4f}"
        )
        rows += pair
    return rows


def bench_geometry(g: Geometry, args, worker: TileWorker, ex: LocalExecutor) -> dict:
    """Run every mode, the reference and USDU on one geometry; print its tables and write its PNG."""
    spec = bench_spec(g, args.model, args.upscaler, args.steps or g.steps, args.denoise, args.seed, args.decode_norm)
    plan = make_plan(spec, inspect_diffusion_model(spec.model))
    f, lh, lw = plan.f, plan.latent_h, plan.latent_w
    s = start(plan, ex, Clock())
    cy, cx = corner(plan.grid)
    ref_box = centred(cy, cx, args.ref_window // f, (0, 0, lh, lw))
    box = centred(cy, cx, args.window // f, ref_box)
    in_ref = (box[0] - ref_box[0], box[1] - ref_box[1], box[2], box[3])
    canvas, start_pixels, how = start_canvas(plan, ex, s, args.start, untiled=ref_box[2:] == (lh, lw))

    outcomes = [Outcome("start", canvas=canvas, seconds=0.0, work=0.0, note=how)]
    outcomes.append(run_reference(plan, ex, s, canvas, ref_box))
    outcomes += [run_mode(plan, ex, s, canvas, tiling) for tiling in TILINGS]
    if not args.no_usdu:
        outcomes.append(run_usdu(plan, worker, s, start_pixels))
    for o in outcomes:
        if o.canvas is None:
            continue
        o.latent = cut(o.canvas, in_ref if o.name == "reference" else box).contiguous()
        o.pixels = ex.call("decode", "decode_tile", o.latent)  # untiled: the whole window in one VAE call
        if o.name in DECODED:  # the tiled decode costs a statistics graph per GroupNorm layer
            began = time.perf_counter()
            o.tiled_pixels = decode_canvas(plan, ex, o.latent, s.facts.decode_tile)
            o.seconds_decode = time.perf_counter() - began
    for o in outcomes:
        if o.name == "usdu":
            o.pixels = cut(o.pixels, box, f)

    masks = grid_masks(plan.grid)
    window_masks = masks.crop(*box)
    usdu_masks = abutting_masks(lh * f, lw * f, spec.tile, min(32, spec.tile // 4)).crop(*(v * f for v in box))
    whole = None if box[2:] == (lh, lw) else masks
    ref = outcomes[1]
    rows = [
        measure(o, ref, window_masks, usdu_masks if o.name == "usdu" else window_masks.upsample(f), whole)
        for o in outcomes
    ]
    decode_grid = cover_grid(box[2], box[3], s.facts.decode_tile, max(1, s.facts.decode_tile // 4))
    rows_decode = decode_rows([o for o in outcomes if o.tiled_pixels is not None], decode_grid, f)
    title = (
        f"{g.name}: {spec.width}x{spec.height} px, {plan.grid.cols}x{plan.grid.rows} tiles of {spec.tile} px "
        f"(overlap {plan.grid.overlap[1] * f} px), {spec.steps} steps at denoise {spec.denoise}, CFG {spec.cfg}; "
        f"window {box[3] * f}x{box[2] * f} px at ({box[1] * f}, {box[0] * f}); start: {how}"
    )
    print_tables(title, rows, rows_decode, show_canvas=whole is not None)
    png = Path(args.out_dir) / f"seams_{g.name}.png"
    side = min(2 * plan.grid.tile_h, 2 * plan.grid.tile_w, box[2], box[3], 1024 // f)
    crop = centred(cy - box[0], cx - box[1], side, (0, 0, box[2], box[3]))
    rows_px, cols_px = grid_boundaries(plan.grid, f)
    y0, x0 = (box[0] + crop[0]) * f, (box[1] + crop[1]) * f
    edges = (
        [r - y0 for r in rows_px if 0 <= r - y0 < crop[2] * f],
        [c - x0 for c in cols_px if 0 <= c - x0 < crop[3] * f],
    )
    write_strip(png, [o for o in outcomes if o.pixels is not None], crop, f, title, edges)
    return {"rows": rows, "decode": rows_decode, "png": png, "plan": plan}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometries", default=",".join(GEOMETRIES), help="names or WxH/TILE, comma-separated")
    p.add_argument("--steps", type=int, help="refine steps (default: demo 4, others 2)")
    p.add_argument("--denoise", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0, help="scaffold and synthetic canvas seed")
    p.add_argument("--quick", action="store_true", help="the demo geometry only, 2 steps")
    p.add_argument("--start", default="render", choices=("render", "synthetic"), help="how the start canvas is made")
    p.add_argument("--window", type=int, default=1024, help="px side of the measured window (default 1024)")
    p.add_argument("--ref-window", type=int, default=2048, help="px side of the untiled reference (default 2048)")
    p.add_argument("--no-usdu", action="store_true", help="skip the Ultimate SD Upscale baseline")
    p.add_argument("--decode-norm", default="exact", choices=("exact", "tile"), help="the tiled decode measured")
    p.add_argument("--model", help="SDXL folder (default: the tiny random-weight one)")
    p.add_argument("--upscaler", help="upscaler file (default: the tiny 4x one)")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "out"), help="where the PNGs go")
    args = p.parse_args(argv)
    if args.quick:
        args.geometries, args.steps = "demo", args.steps or 2
    if not args.model:
        from farm.tiny_models import ensure_tiny_models

        model, upscaler = ensure_tiny_models()
        args.model, args.upscaler = str(model), args.upscaler or str(upscaler)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    geometries = [parse_geometry(name) for name in args.geometries.split(",")]
    worker = TileWorker(WorkerConfig(args.model, args.upscaler or "", "", "fp32", "cpu"))
    ex = LocalExecutor(worker)
    results = {}
    for g in geometries:
        began = time.perf_counter()
        results[g.name] = bench_geometry(g, args, worker, ex)
        print(f"\n{g.name}: {time.perf_counter() - began:.0f} s; strip: {results[g.name]['png']}\n", flush=True)
    return results


if __name__ == "__main__":
    main()
