"""Ten small renders back to back: actors started per render (`farm render --cluster`) vs the warm farm.

(a) per-render actors: what `farm render --cluster` does for each render (cluster/executor.py run_cluster):
    start one actor per GPU, load the models in each, render, end the actors; the renders run one after another.
(b) warm farm: `farm up` once, then all renders submitted at once to its queue; its workers load the models
    for the first render and keep them (cluster/farm.py).

Per render: time to its first refined tile and to its end, counted from when it was started (a) or submitted
(b), and the model load it paid, measured with the tiny models on a local Ray with fake GPUs. The last columns add
what one load of the real models would cost each render that loads: SDXL fp16 6.9 GB and Flux.1-dev ~33.5 GB (incl.
T5) read from local NVMe at 3 GB/s, ~2.3 s and ~11 s (an estimate: a cold load is disk-bound, invoke-ai/InvokeAI#9548;
SATA would be ~13 s and ~61 s, 1 GbE NFS ~63 s and ~5 min). Workers load in parallel: a render's loads count once.

    python bench/warm_farm.py                  # 10 renders of 256 px, 2 fake GPUs
    python bench/warm_farm.py --renders 3 --size 128
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from farm.executor import prepare  # noqa: E402
from farm.tiny_models import ensure_tiny_models  # noqa: E402
from pipeline.graph.progress import Bar  # noqa: E402
from pipeline.spec import RenderSpec  # noqa: E402

# one load of the real models from local NVMe, seconds: 6.9 GB and 33.5 GB read at 3 GB/s
REAL_LOAD_S = {"SDXL": 2.3, "Flux": 11.0}
TILE_STAGE = "chess"  # progress groups of the refine pass ('chess even', 'chess odd'): its tiles


@dataclass
class Row:
    render: int
    first_tile: float  # seconds from start (a) or submit (b) to the first refined tile
    total: float  # seconds from start or submit to the render's end
    load: float  # seconds this render spent loading models (workers in parallel: one load's wall time)
    loads: int  # model loads it caused (one per worker that loaded)
    ends_at: float  # seconds from the first render's start or submit to this one's end


def specs(model: Path, upscaler: Path, count: int, size: int) -> list:
    """`count` plans of one small top-down render, seeds 1..count, one tile per task."""
    base = RenderSpec(
        model=str(model), upscaler=str(upscaler), prompt="a lighthouse at dawn", negative="blurry", width=size,
        height=size, native=64, tile=64, tile_batch=1, upscale_tile=64, steps=2, base_steps=2, cfg=1.0,
        denoise=0.5, tiling="chess",
    )  # fmt: skip
    from dataclasses import replace

    return [prepare(replace(base, seed=i + 1), "cpu", cluster=True) for i in range(count)]


class FirstTile(Bar):
    def __init__(self, seen: dict):
        self.seen = seen

    def update(self, n: int = 1) -> None:
        self.seen.setdefault("first", time.perf_counter())


def per_render_actors(plans: list, workers: int) -> list[Row]:
    """(a): the `--cluster` path, a pool of fresh actors per render, ended after it."""
    from cluster.executor import ActorPool, run_cluster
    from pipeline.graph.worker import WorkerConfig

    rows, first_start = [], time.perf_counter()
    for i, plan in enumerate(plans, 1):
        seen: dict = {}

        @contextmanager
        def progress(stage: str, total: int, unit: str, seen=seen):
            yield FirstTile(seen) if stage.startswith(TILE_STAGE) else Bar()

        start = time.perf_counter()
        pool = ActorPool("auto", workers, 1.0)
        try:
            with pool.using(WorkerConfig.from_spec(plan.spec)) as actors:  # actors start and load in __init__
                ray.get([a.info.remote() for a in actors])  # ... done when they answer
            load = time.perf_counter() - start
            run_cluster(plan, pool=pool, progress=progress)  # the same actors render it
        finally:
            pool.close()
        end = time.perf_counter()
        rows.append(Row(i, seen["first"] - start, end - start, load, len(actors), end - first_start))
        print(f"  (a) render {i}: {end - start:.2f} s", file=sys.stderr)
    return rows


def warm_farm(plans: list, state: Path) -> tuple[list[Row], float, float]:
    """(b): `farm up`, then every render submitted at once; returns the rows, the time `farm up` took and the wall
    time from `farm up` to the last render's end."""
    from cluster import farm_client

    start = time.perf_counter()
    farm_client.up("auto", str(state))
    up_s = time.perf_counter() - start
    ctl = farm_client.controller("auto")
    options = {"cpu_threads": torch.get_num_threads(), "metadata": True}
    submitted = {}
    for plan in plans:
        render_id = farm_client.call(ctl.submit, plan.spec.to_dict(), options, 0)
        submitted[render_id] = time.perf_counter()
    first: dict[int, float] = {}
    ended: dict[int, dict] = {}
    while len(ended) < len(plans):  # one `list` and a `status` per running render a look: the client's own load
        time.sleep(0.1)
        states = {r["id"]: r["state"] for r in farm_client.call(ctl.list, 2 * len(plans)) if r["id"] in submitted}
        for render_id, state in states.items():
            if render_id in ended or state == "queued":
                continue
            record = farm_client.call(ctl.status, render_id)
            now = time.perf_counter()
            tiles = [done for stage, (done, _) in record["progress"].items() if stage.startswith(TILE_STAGE)]
            if render_id not in first and any(tiles):
                first[render_id] = now
            if record["state"] in ("done", "failed", "canceled"):
                assert record["state"] == "done", record
                ended[render_id] = record | {"seen_end": now}
                first.setdefault(render_id, now)  # it went from none to all tiles between two looks
                print(f"  (b) render {render_id}: {now - submitted[render_id]:.2f} s", file=sys.stderr)
    wall = max(r["seen_end"] for r in ended.values()) - start
    rows = []
    for i, render_id in enumerate(submitted, 1):
        stats = ended[render_id]["stats"]
        loads = stats.get("loads", 0)
        t0 = submitted[render_id]
        load = stats.get("load_seconds", 0.0) / loads if loads else 0.0
        end = ended[render_id]["seen_end"]
        rows.append(Row(i, first[render_id] - t0, end - t0, load, loads, end - min(submitted.values())))
    farm_client.down("auto")
    return rows, up_s, wall


def table(title: str, rows: list[Row], wall: float, parallel: bool) -> list[str]:
    """Markdown rows. With real models each render that loads pays one load (its workers load in parallel); renders
    one after another (a) add up their loads, while on the warm farm (`parallel`) the workers load once, at the same
    time, before any render ends: every render ends that one load later."""
    real = list(REAL_LOAD_S)
    head = ["render", "first tile s", "total s", "ends at s", "load s (tiny)", "loads"]
    head += [f"+ {name} load s" for name in real] + [f"total with {name} s" for name in real]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    add = {name: 0.0 for name in real}
    wave = {name: REAL_LOAD_S[name] if any(r.loads for r in rows) else 0.0 for name in real}
    for r in rows:
        extra = {name: REAL_LOAD_S[name] if r.loads else 0.0 for name in real}
        for name in real:
            add[name] += extra[name]
        delay = wave if parallel else extra
        cells = [r.render, f"{r.first_tile:.2f}", f"{r.total:.2f}", f"{r.ends_at:.2f}", f"{r.load:.2f}", r.loads]
        cells += [f"{extra[n]:.1f}" for n in real] + [f"{r.total + delay[n]:.2f}" for n in real]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    loads = sum(r.loads for r in rows)
    totals = ["all", "", "", f"{wall:.2f} (wall)", f"{sum(r.load for r in rows):.2f}", loads]
    add = wave if parallel else add
    totals += [f"{add[n]:.1f}" for n in real] + [f"{wall + add[n]:.2f}" for n in real]
    lines.append("| " + " | ".join(str(c) for c in totals) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="square render in px (a 64 px base, 64 px tiles)")
    parser.add_argument("--gpus", type=int, default=2, help="fake GPUs of the local Ray (one worker each)")
    parser.add_argument("--state-dir", default="/tmp/tilefarm-bench-farm", help="the farm's queue and results")
    args = parser.parse_args(argv)

    model, upscaler = ensure_tiny_models()
    plans = specs(model, upscaler, args.renders, args.size)
    ray.init(
        num_cpus=2, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False, configure_logging=False
    )  # a Ray of its own: the farm is started and ended here
    load = [os.getloadavg()[0]]  # other work on the machine: the walls below move with it
    try:
        start = time.perf_counter()
        a = per_render_actors(plans, args.gpus)
        a_wall = time.perf_counter() - start
        load.append(os.getloadavg()[0])
        b, up_s, b_wall = warm_farm(plans, Path(args.state_dir) / time.strftime("%Y%m%d-%H%M%S"))
        load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
    print(f"{args.renders} renders of {args.size} px (tiny SDXL, 2 + 2 steps, 64 px tiles, one per task), "
          f"{args.gpus} fake GPUs, {platform.node()}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print()
    title = "(a) per-render actors (`farm render --cluster` path), one render after another"
    print("\n".join(table(title, a, a_wall, False)))
    print()
    print("\n".join(table("(b) warm farm: `farm up`, then all renders submitted at once", b, b_wall, True)))
    print()
    print(
        f"load s: (a) from the render's start until its actors answer (actor processes start, imports, models load); "
        f"(b) the render's model loads on the farm's workers (FarmWorker.loads; in parallel, one load's time). "
        f"`farm up` took {up_s:.2f} s (in the (b) wall time, which ends with the last render; (a)'s wall includes "
        f"ending its actors). Walls: (a) {a_wall:.2f} s, (b) {b_wall:.2f} s. Load average (1 min) at the start of "
        f"(a), of (b) and at the end: {', '.join(f'{x:.1f}' for x in load)}"
    )
    return {"a": a, "b": b, "a_wall": a_wall, "b_wall": b_wall, "up": up_s}


if __name__ == "__main__":
    main()
