"""The `farm` command: render a spec or a preset, a batch of them, list presets and runs, or a demo with tiny models."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from farm.flags import EXEC_FLAGS, SPEC_FLAGS, add_exec_flags, add_spec_flags, command_line_layers, flag_layer
from pipeline.errors import RenderError, UserError

DEMO_PROMPT = "a lighthouse on a cliff above a stormy sea, golden hour, highly detailed"


def build_parser() -> argparse.ArgumentParser:
    from farm.farm_cli import add_commands, add_render_flags

    parser = argparse.ArgumentParser(prog="farm", description="tilefarm: top-down tiled diffusion renders")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="render a spec (TOML file and/or flags)")
    render.add_argument("spec", nargs="?", help="TOML spec file; flags override its values")
    render.add_argument("--from-png", help="reproduce the spec stored in a PNG tilefarm wrote")
    render.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a stopped render (same image as unstopped): a run id from `farm runs`, a run folder, "
        "or last (the last interrupted run)",
    )
    add_spec_flags(render)
    render.add_argument(
        "--dry-run", action="store_true", help="print the plan (stages, sizes, tiles, model calls) and stop"
    )
    add_exec_flags(render)
    add_render_flags(render)

    batch = sub.add_parser("batch", help="render many prompts or images: a CSV or Parquet table, or a folder")
    batch.add_argument("source", help="CSV/Parquet (columns: prompt, seed, any spec field) or a folder of images")
    add_spec_flags(batch)
    add_exec_flags(batch)
    batch.add_argument(
        "--in-flight",
        type=int,
        help="with --cluster: renders running at once on the same actors (default 2); locally always 1",
    )

    sub.add_parser("presets", help="list the presets and the spec fields each sets")

    ledger = sub.add_parser("ledger", help="summarise a render's run ledger: time per stage and worker, retries")
    ledger.add_argument("run", help="a run id from `farm runs`, a run folder, or last (the last started run)")
    ledger.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the timeline to this .png: one lane per worker, each task a bar coloured by stage",
    )

    runs = sub.add_parser("runs", help="list recent runs: id, status (finished, interrupted, running), output")
    runs.add_argument("-n", "--limit", type=int, default=20, help="show the last N runs (default 20; 0 = all)")

    add_commands(sub)

    demo = sub.add_parser("demo", help="a small render with tiny random-weight models (abstract image)")
    demo.add_argument("--size", default="1024x1024", help="target size (default 1024x1024)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the noise scaffold (default 0: the same picture)")
    add_exec_flags(demo)
    return parser


def _spec_for_render(args: argparse.Namespace):
    from farm.specfile import build_spec

    layers, preset, out = command_line_layers(args)
    spec = build_spec(layers)
    if preset:
        preset.check_model(spec.model)
    return spec, preset, args.out or out


def output_for(args: argparse.Namespace, spec, preset, out) -> Path:
    """The output path: --out (or the spec file's), else a timestamped name in --out-dir."""
    from farm.output import check_output_path, output_name

    if out and args.out_dir:
        raise UserError("pass --out PATH.png or --out-dir DIR, not both")
    if args.out_dir:
        prefix = args.prefix or (preset.prefix or preset.name if preset else "render")
        out = output_name(args.out_dir, prefix, Path(spec.input).stem if spec.input else "")
    if not out:
        raise UserError("no output path: pass --out PATH.png or --out-dir DIR (or set out in the spec file)")
    return check_output_path(out, args.overwrite)


def _spec_for_demo(args: argparse.Namespace):
    from farm.specfile import build_spec
    from farm.tiny_models import TINY_NATIVE_PX, ensure_tiny_models
    from pipeline.spec import parse_size

    if not args.out:
        raise UserError("no output path: pass --out PATH.png")
    width, height = parse_size(args.size)
    print("demo: tiny random-weight models; expect an abstract image, not a picture.", file=sys.stderr)
    model, upscaler = ensure_tiny_models()
    data = dict(
        model=str(model),
        upscaler=str(upscaler),
        prompt=DEMO_PROMPT,
        negative="blurry, low quality",
        width=width,
        height=height,
        seed=args.seed,
        steps=4,
        base_steps=8,
        cfg=5.0,
        denoise=0.4,
        tile=TINY_NATIVE_PX,
        native=TINY_NATIVE_PX,
        upscale_tile=128,
    )
    return build_spec([(data, "demo"), (flag_layer(args, EXEC_FLAGS), "command line")]), args.out


def _resumed(args: argparse.Namespace):
    """(run folder, spec, output) of a stopped render; the spec is the stored one, never changed by flags."""
    from farm.output import check_output_path
    from farm.runs import resumable

    changed = [flag for flag, (dest, _, _) in SPEC_FLAGS.items() if getattr(args, dest, None) is not None]
    if args.spec or args.from_png or args.size or args.base_size or args.concept or args.preset or changed:
        raise UserError(
            "--resume continues the stored spec as it was; drop the spec file and spec flags "
            f"({', '.join(changed) or 'spec file / --preset / --size / --concept'}), or start a new render"
        )
    run_dir, spec, out = resumable(args.resume)
    out = check_output_path(out, args.overwrite)  # something else may have been written there since
    run_dir.claim()
    return run_dir, spec, out


def run(args: argparse.Namespace) -> int:
    from farm.farm_cli import FARM_COMMANDS, run_farm_command

    if args.command in FARM_COMMANDS:  # first: asking the farm something needs no model libraries (a second or two)
        return run_farm_command(args)
    from farm.rundir import RunDir
    from farm.runs import find_run, runs_table

    if args.command == "ledger":
        from farm.ledger import summary
        from farm.timeline import check_plot_path, plot_timeline

        plot = check_plot_path(args.plot) if args.plot else None
        ledger_run = RunDir.open(find_run(args.run, "farm ledger"))[0]
        print(summary(ledger_run))
        if plot:
            lanes = plot_timeline(ledger_run.rows, plot, title=f"run {ledger_run.run_id}")
            print(f"\ntimeline: {plot} ({len(lanes)} lane(s): {', '.join(lanes)})")
        return 0
    if args.command == "runs":
        print(runs_table(args.limit))
        return 0
    if args.command == "presets":
        from farm.presets import presets_table

        print(presets_table())
        return 0
    from farm.executor import memory_report, prepare, run_local
    from farm.farm_cli import render_on_farm
    from farm.output import check_output_path, save_png
    from farm.progress import tqdm_progress
    from farm.runs import forget, new_run
    from pipeline.graph.health import now, stage_row

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {args.gpus_per_worker}: must be 0 or more")
    if getattr(args, "farm", None) and (args.cluster or args.resume or args.run_dir or args.dry_run):
        raise UserError("--farm renders on the farm: drop --cluster, --resume and --run-dir (`farm status ID`)")
    if (args.workers or args.gpus_per_worker is not None) and not args.cluster:
        raise UserError("--workers and --gpus-per-worker apply to cluster renders: add --cluster auto|ADDRESS")
    if args.command == "batch":
        from farm.batch import run_batch

        return run_batch(args)
    run_dir = None
    farm = getattr(args, "farm", None)
    device = "cpu" if args.cluster or farm else args.device  # where a tile batch of 0 is sized for
    metadata = not args.no_metadata
    if args.command == "render" and args.resume:
        run_dir, spec, out = _resumed(args)
        metadata = metadata and run_dir.info.get("metadata", True)
        plan = prepare(spec, device, cluster=bool(args.cluster))
    elif args.command == "render":
        spec, preset, out = _spec_for_render(args)
        on_cluster = bool(args.cluster or farm)
        plan = prepare(spec, device, cluster=on_cluster)  # no weights read; draws a seed if none
        if args.dry_run:
            print(f"seed: {plan.spec.seed}", file=sys.stderr)
            print(plan.describe())
            print(memory_report(plan, device, cluster=on_cluster))
            return 0
        out = output_for(args, plan.spec, preset, out)
        if farm:
            return render_on_farm(args, plan, out, metadata)
    else:
        spec, out = _spec_for_demo(args)
        out = check_output_path(out, args.overwrite)
        plan = prepare(spec, device, cluster=bool(args.cluster))
    spec = plan.spec  # seed and tile batch resolved; the enhance workflow's size comes from its input
    created = run_dir is None
    run_dir = run_dir or new_run(spec, out, args.run_dir, metadata)
    print(f"seed: {spec.seed}", file=sys.stderr)  # before any work: a stopped render's seed is known too
    if not args.quiet:
        print(plan.describe(), file=sys.stderr)
    wall = now()
    start = time.perf_counter()
    try:
        progress = tqdm_progress(not args.quiet)
        log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
        if args.cluster:
            from cluster.executor import run_cluster  # Ray is imported only on this path

            keep = run_dir.path / "partial.safetensors"
            run_ = run_cluster(
                plan,
                args.cluster,
                args.workers,
                args.gpus_per_worker,
                progress=progress,
                keep_path=keep,
                log=log,
                store=run_dir,
                record=run_dir.add,
            )
            where = f"{run_.workers} Ray worker(s)"
        else:
            run_ = run_local(plan, args.device, progress=progress, log=log, store=run_dir, record=run_dir.add)
            where = run_.device
        with run_.clock.stage("save"):
            save_png(run_.result.image, plan, out, metadata)
        run_dir.add(stage_row("render", wall, now(), kind="render"))
        run_dir.finished()
    except UserError:
        if created:  # refused before any work that could be resumed: leave nothing behind
            forget(run_dir)
        raise
    except RenderError as err:
        raise RenderError(
            f"{err}\nfinished work is kept in {run_dir.path}: continue with `farm render --resume {run_dir.run_id}`"
        ) from None
    except KeyboardInterrupt:
        print(
            f"farm: finished work is kept in {run_dir.path}: continue with `farm render --resume {run_dir.run_id}`",
            file=sys.stderr,
        )
        raise
    finally:
        run_dir.release()  # a failed render in a process that lives on (a notebook) is not 'running'
    seconds = time.perf_counter() - start
    print(
        f"wrote {out} ({spec.width}x{spec.height}, seed {spec.seed}) in {seconds:.1f} s on {where}, "
        f"run {run_dir.run_id}",
        file=sys.stderr,
    )
    if args.command == "demo":
        print(
            "random weights make an abstract image; point `farm render --model` at a real SDXL checkpoint.",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"farm: error: {err}", file=sys.stderr)
        return 2
    except RenderError as err:
        print(f"farm: error: {err}", file=sys.stderr)
        return 1
    except Exception:
        # a bug: keep the traceback, and say that the finished work is kept
        print("farm: internal error; finished work is kept in the run folder for --resume", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("farm: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
