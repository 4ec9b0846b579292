"""Top-down renders on one GPU at full SDXL size, against a per-tile (Ultimate SD Upscale) baseline.

For each size and grid it runs a whole render (prompt, scaffold, base, upscale, encode, chess,
decode) and prints per stage: seconds, model calls, model seconds, the UNet's achieved TFLOP/s
(FLOPs counted by torch's FlopCounterMode) against a bf16 matmul measured on the same GPU, and
peak GPU memory. Then: the render's wall time against the sum of its model calls replayed in
isolation, the USDU-style per-tile baseline on the same upscaled image (same model code, tile
size, steps, denoise, precision) and the speed ratio, seam ratios of both grids and of the
baseline, and before/after timings of the GPU optimisations.

Models: full-size SDXL-base architecture with random weights, built once from bench/configs/
(about 7 GB written under --models-dir; random weights time like trained ones), or --model DIR.

    python bench/gpu_render.py                         # GPU: 4096 and 8192 px, both grids (~15 min on an H100)
    python bench/gpu_render.py --sizes 4096 --json 4k.json                  # ~5 min: the 4K figures
    python bench/gpu_render.py --sizes 8192 --grids chess --no-optimisations  # ~8 min: 8K time and memory
    python bench/gpu_render.py --sizes 4096 --compile --channels-last       # render with the toggles on
    python bench/gpu_render.py --smoke                 # CPU, tiny models, 1-3 min: the same tables

Timings are medians of warm calls; the first render of a process is preceded by a 1-step warm-up
render so kernel selection and lazy initialisation are not billed to a stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import optimisations as opt  # noqa: E402
from record import CallLog, count_flops, record_worker, time_call  # noqa: E402
from report import GIB, print_optimisations, print_render, print_summary  # noqa: E402
from seams import grid_boundaries, seam_ratio  # noqa: E402
from stage_clock import StageClock  # noqa: E402
from usdu_baseline import usdu_boundaries, usdu_refine, usdu_tiles  # noqa: E402

import pipeline.render as render_module  # noqa: E402
from farm.executor import LocalExecutor, prepare  # noqa: E402
from pipeline.geometry.resize import PIXELS, resize  # noqa: E402
from pipeline.graph.canvas import HeldCanvas  # noqa: E402
from pipeline.graph.stream import Resized  # noqa: E402
from pipeline.graph.taskgraph import GRAPH_STAGE  # noqa: E402
from pipeline.graph.worker import TileWorker, WorkerConfig  # noqa: E402
from pipeline.render import render  # noqa: E402
from pipeline.sampling.chess_pass import RefineSettings  # noqa: E402
from pipeline.spec import RenderSpec  # noqa: E402

STAGES = ("prompt", "scaffold", "base", "upscale", "encode", "refine", "decode")
PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn, highly detailed", "blurry, low quality"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, small sizes: checks the bench runs")
    p.add_argument("--sizes", help="square target sizes in px, comma-separated (default 4096,8192; smoke 1024)")
    p.add_argument("--grids", default="chess,fit", help="tile grids to render: chess, fit or both (default both)")
    p.add_argument("--precision", default="fp16", choices=("fp16", "bf16"), help="UNet precision on the GPU")
    p.add_argument("--steps", type=int, help="refine steps per tile (default 20; smoke 2)")
    p.add_argument("--base-steps", type=int, help="steps of the native base (default 30; smoke 2)")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--denoise", type=float, default=0.35)
    p.add_argument("--tile", type=int, help="tile size in px (default 1024; smoke 256)")
    p.add_argument("--fit-overlap", type=int, help="fitted grid's minimum overlap in px (default 128; smoke 32)")
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--model", help="diffusers SDXL folder to use instead of the random full-size one")
    p.add_argument("--upscaler", help="upscaler file to use instead of the random 4x ESRGAN")
    p.add_argument("--native", type=int, default=0, help="the model's native size in px (default: from the model)")
    p.add_argument("--models-dir", default=str(Path.home() / ".cache" / "tilefarm" / "full-models"))
    p.add_argument("--no-baseline", action="store_true", help="skip the per-tile USDU baseline")
    p.add_argument("--usdu-padding", type=int, help="USDU tile_padding in px (default 32; smoke 8)")
    p.add_argument("--usdu-blur", type=float, help="USDU mask_blur in px (default 8; smoke 2)")
    p.add_argument("--usdu-mode", default="linear", choices=("linear", "chess"))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"), help="attention kernel for the renders")
    p.add_argument("--channels-last", action="store_true", help="render with a channels-last UNet")
    p.add_argument(
        "--compile",
        action="store_true",
        help="render with a torch.compile'd UNet (stage times then include compiling each new shape)",
    )
    p.add_argument("--batch-sweep", default="1,2,4,8", help="tile batch sizes for the per-tile cost sweep")
    p.add_argument("--repeat", type=int, help="timed repeats of each isolated call (default 3)")
    p.add_argument("--no-optimisations", action="store_true", help="skip the before/after table")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    small = args.smoke
    # smoke: 4K's geometry at a quarter of the size (canvas = 4 tiles, overlap = tile / 8)
    defaults = dict(
        sizes="1024" if small else "4096,8192",
        steps=2 if small else 20,
        base_steps=2 if small else 30,
        tile=256 if small else 1024,
        fit_overlap=32 if small else 128,
        usdu_padding=8 if small else 32,
        usdu_blur=2.0 if small else 8.0,
        repeat=3,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_models(args) -> tuple[str, str, int, str]:
    """(model folder, upscaler file, native px override, device name) for the chosen mode."""
    if args.smoke:
        from farm.tiny_models import TINY_NATIVE_PX, ensure_tiny_models

        model, upscaler = (args.model, args.upscaler) if args.model else ensure_tiny_models()
        return str(model), str(upscaler), args.native or TINY_NATIVE_PX, "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("gpu_render: torch sees no CUDA GPU; run with --smoke for the CPU structure check")
    from full_models import ensure_full_sdxl

    if args.model and args.upscaler:
        return args.model, args.upscaler, args.native, "cuda"
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    model, upscaler = ensure_full_sdxl(Path(args.models_dir), "cuda", dtype)
    return args.model or str(model), args.upscaler or str(upscaler), args.native, "cuda"


def apply_toggles(worker: TileWorker, args, compile_unet: bool = True) -> None:
    """Render-wide switches that need no pipeline change: attention kernel, memory format, compile."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = worker.model.pipe.unet  # the eager module, also under a compiled wrapper
    unet.set_attn_processor(AttnProcessor2_0() if args.attention == "sdpa" else AttnProcessor())
    unet.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.compile and compile_unet:
        worker.model.denoiser.unet = torch.compile(unet)


def measure_render(worker: TileWorker, spec: RenderSpec, repeats: int) -> dict:
    """One render with every model call logged; then each distinct call replayed alone and FLOP-counted."""
    plan = prepare(spec)
    clock = StageClock()
    worker.clock, worker.model.denoiser.clock = clock, clock.model
    log = CallLog(stage=lambda: clock.current)
    captured = {}
    encode_canvas, encode_graph = render_module.encode_canvas, render_module.encode_graph

    def keep_pixels(plan, ex, pixels, *args):
        captured["pixels"] = pixels  # the upscaled image: the baseline refines the same one
        return encode_canvas(plan, ex, pixels, *args)

    def keep_source(plan, graph, pixels, *args):
        captured["source"] = pixels  # the graph fills it as the upscale tiles arrive; read after the render
        return encode_graph(plan, graph, pixels, *args)

    undo = record_worker(worker, log)
    render_module.encode_canvas, render_module.encode_graph = keep_pixels, keep_source
    ex = StagedExecutor(worker, clock)
    captured["done"] = ex.done  # the graph's results: its upscale tiles stay there (HeldCanvas)
    try:
        result = render(plan, ex, clock)
    finally:
        undo()
        render_module.encode_canvas, render_module.encode_graph = encode_canvas, encode_graph
        worker.clock = worker.model.denoiser.clock = None
    if "source" in captured:
        captured["pixels"] = upscaled(captured["source"], captured["done"], spec.height, spec.width)
    isolated = {key: time_call(kind, repeats) for key, kind in log.kinds.items()}
    flops = {key: count_flops(kind) for key, kind in log.kinds.items() if kind.model == "unet"}
    stages = {}
    for stage in STAGES:
        calls = log.calls(stage=stage)
        unet_flops = sum(n * flops[k] for k, n in calls.items() if k in flops)
        unet_s = clock.stage_models[stage].get("unet", 0.0)
        stages[stage] = dict(
            seconds=clock.stages.get(stage, 0.0),
            calls=dict(clock.stage_calls[stage]),
            model_seconds=sum(clock.stage_models[stage].values()),
            isolated_seconds=sum(n * isolated[k] for k, n in calls.items()),
            unet_tflops=unet_flops / unet_s / 1e12 if unet_s else None,
            peak_gib=clock.peak[stage] / GIB if stage in clock.peak else None,
        )
    unet_calls = log.calls(model="unet")
    grid = plan.grid
    return dict(
        size=spec.width,
        grid=spec.grid,
        tiles=len(grid.tiles),
        tile_px=grid.tile_h * plan.f,
        work=grid.work_multiplier,
        batches=len(plan.even_batches) + len(plan.odd_batches),
        stages=stages,
        wall=clock.wall,
        in_render_model_seconds=sum(clock.models.values()),
        isolated_seconds=sum(s["isolated_seconds"] for s in stages.values()),
        unet_flops_per_tile_call=max((flops[k] for k in unet_calls), default=0),
        peak_gib=max((s["peak_gib"] or 0 for s in stages.values()), default=0) or None,
        seam_ratio=seam_ratio(result.image, *grid_boundaries(grid, plan.f)),
        input_seam_ratio=seam_ratio(captured["pixels"], *grid_boundaries(grid, plan.f)),
        pixels=captured["pixels"],
    )


# the render graph's task stages -> the stages this bench reports
TASK_STAGES = {
    "upscale": "upscale",
    "encode stats": "encode",
    "encode": "encode",
    "blend": "refine",
    "decode stats": "decode",
    "decode": "decode",
}


def upscaled(source, done: dict, height: int, width: int) -> torch.Tensor:
    """The upscaled image a render graph's encode read: its upscale tiles composited (a HeldCanvas keeps none) and,
    past the model's scale, resized as the graph's Resized blocks are (bit-equal to resizing the whole image)."""
    held = source.source if isinstance(source, Resized) else source
    if not isinstance(held, HeldCanvas):
        return source.read((0, 0, height, width))
    image = held.read((0, 0, held.grid.canvas_h, held.grid.canvas_w)).resolved(done).pixels()
    return image if image.shape[-2:] == (height, width) else resize(image.float(), height, width).to(PIXELS)


class StagedExecutor(LocalExecutor):
    """Times each task of a render graph (pipeline.graph.stream) under its stage, so the tables keep their
    per-stage rows when the tiled stages run as one graph."""

    def __init__(self, worker: TileWorker, clock: StageClock):
        super().__init__(worker)
        self.clock = clock
        self.done: dict = {}  # the last render graph's results

    def run(self, stage, tasks, on_result=None):
        results = super().run(stage, tasks, on_result)
        if stage == GRAPH_STAGE:
            self.done.update(results)
        return results

    def _run_task(self, stage, task, args, place):
        name = TASK_STAGES.get(task.stage)
        if not name:
            return super()._run_task(stage, task, args, place)
        outer = self.clock.current
        try:
            with self.clock.stage(name):
                return super()._run_task(stage, task, args, place)
        finally:
            self.clock.current = outer


def measure_baseline(worker: TileWorker, spec: RenderSpec, pixels: torch.Tensor, args) -> dict:
    """The USDU-style per-tile refine of the same upscaled pixels: seconds, model calls, peak memory, seams."""
    clock = StageClock()
    cond = worker.encode_prompt(spec.prompt, spec.negative, spec.cfg, spec.prompt_style)
    settings = RefineSettings(spec.cfg, spec.steps, spec.denoise, spec.sampler)
    worker.model.denoiser.clock = clock.model
    try:
        with clock.stage("usdu"):
            image = usdu_refine(
                worker.model,
                pixels,
                cond,
                settings,
                spec.seed,
                spec.tile,
                args.usdu_padding,
                args.usdu_blur,
                args.usdu_mode,
                clock=clock,
            )
    finally:
        worker.model.denoiser.clock = None
    return dict(
        seconds=clock.stages["usdu"],
        calls=dict(clock.stage_calls["usdu"]),
        model_seconds=dict(clock.stage_models["usdu"]),
        tiles=len(usdu_tiles(*pixels.shape[-2:], spec.tile, args.usdu_padding)),
        peak_gib=clock.peak["usdu"] / GIB if "usdu" in clock.peak else None,
        seam_ratio=seam_ratio(image, *usdu_boundaries(*pixels.shape[-2:], spec.tile)),
        input_seam_ratio=seam_ratio(pixels, *usdu_boundaries(*pixels.shape[-2:], spec.tile)),
    )


def measure_optimisations(worker: TileWorker, spec: RenderSpec, args, batches: int) -> tuple[list, list, int]:
    """The before/after table, the tile-batch sweep and the batch chosen from free memory (eager UNet)."""
    denoiser = worker.model.denoiser
    render_unet = denoiser.unet
    denoiser.unet = getattr(render_unet, "_orig_mod", render_unet)  # toggles switch one thing on the eager UNet
    cond = worker.encode_prompt(spec.prompt, spec.negative, spec.cfg, spec.prompt_style)
    latent = spec.tile // worker.model.info.vae_factor
    call = opt.UnetCall.make(denoiser, cond, spec.tile_batch, latent, spec.cfg)
    r = args.repeat
    try:
        toggles = [
            opt.precision_toggle(call, r),
            opt.vae_precision_toggle(worker.model.vae, latent, denoiser.dtype, r),
            opt.attention_toggle(call, r),
            opt.channels_last_toggle(call, r),
            opt.cfg_batch_toggle(call, r),
            opt.prompt_once_toggle(worker, spec.prompt, spec.negative, spec.cfg, batches, r),
        ]
        if args.compile:
            toggles.append(opt.compile_toggle(call, r)[0])
        else:
            toggles.append(opt.Toggle("torch.compile UNet", "s per UNet call", None, None, "run with --compile"))
        del call
        sizes = [int(s) for s in args.batch_sweep.split(",")]
        sweep = opt.batch_sweep(denoiser, cond, latent, spec.cfg, sizes, r)
    finally:
        denoiser.unet = render_unet
        apply_toggles(worker, args, compile_unet=False)  # the render's attention and memory format again
    free = None
    if denoiser.device.type == "cuda":  # free to the driver plus what torch's allocator holds unused
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return toggles, sweep, opt.pick_tile_batch(sweep, free)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, upscaler, native, device = load_models(args)
    precision = "fp32" if args.smoke else args.precision
    sizes = [int(s) for s in args.sizes.split(",")]
    grids = [g.strip() for g in args.grids.split(",")]
    spec0 = RenderSpec(
        model=model,
        upscaler=upscaler,
        prompt=PROMPT,
        negative=NEGATIVE,
        width=sizes[0],
        height=sizes[0],
        seed=1,
        steps=args.steps,
        base_steps=args.base_steps,
        cfg=args.cfg,
        denoise=args.denoise,
        tile=args.tile,
        tile_batch=args.tile_batch,
        native=native,
        upscale_tile=128 if args.smoke else 512,
        precision=precision,
        fit_overlap=args.fit_overlap,
    )
    worker = TileWorker(WorkerConfig.from_spec(spec0.validate(), device))
    apply_toggles(worker, args)
    half = torch.float32 if args.smoke else torch.bfloat16
    peak = opt.matmul_peak(worker.device, half, n=512 if args.smoke else 8192)
    where = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(
        f"## {where}, torch {torch.__version__}, {precision} UNet (VAE upcast as its config asks), "
        f"{torch.get_num_threads()} CPU threads\n\n{args.steps} refine steps at denoise {args.denoise}, "
        f"cfg {args.cfg}, tile {args.tile} px, batches of {args.tile_batch}; "
        f"matmul peak ({str(half)[6:]}): {peak / 1e12:.2f} TFLOP/s"
    )
    # warm-up: one cheap render at the first size, so kernel selection is not billed to a stage
    render(prepare(replace(spec0, steps=1, base_steps=1)), LocalExecutor(worker))

    renders, baselines = [], {}
    for size in sizes:
        for grid in grids:
            r = measure_render(worker, replace(spec0, width=size, height=size, grid=grid), args.repeat)
            renders.append(r)
            print_render(r, peak)
            sys.stdout.flush()
        if not args.no_baseline:
            pixels = renders[-1]["pixels"]
            baselines[size] = measure_baseline(worker, replace(spec0, width=size, height=size), pixels, args)
        for r in renders:
            r.pop("pixels", None)
    print_summary(renders, baselines)
    figures = dict(
        device=where,
        torch=torch.__version__,
        precision=precision,
        matmul_peak_tflops=peak / 1e12,
        args=vars(args),
        baselines=baselines,
        renders=renders,
    )
    if not args.no_optimisations:
        first = renders[0]
        toggles, sweep, chosen = measure_optimisations(worker, spec0, args, first["batches"])
        host_share = 1 - first["in_render_model_seconds"] / first["wall"]
        print_optimisations(toggles, sweep, chosen, host_share)
        figures |= dict(
            optimisations=[asdict(t) | {"gain": t.gain} for t in toggles],
            batch_sweep=[asdict(p) for p in sweep],
            chosen_tile_batch=chosen,
            host_share=host_share,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
