"""Whole-render scaling on a simulated farm (bench/scaling.py --whole-render).

A real top-down render (pipeline.plan.make_plan, pipeline.render.render, the ClusterExecutor, its
PullScheduler and the wire transport) over Ray actors whose model calls are sleeps of their FLOP-
derived cost (bench/sim_render.py, bench/flops.py). All the driver's own work is real: tile crops,
composites, resizes, GroupNorm pooling, the blended sampler's scheduler steps. Every task is
recorded through the executor's ledger rows (pipeline.graph.health.task_row), and every process's
CPU time is read from /proc around and during each render (cpu_seconds, CpuSampler).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flops import DEFAULT_TFLOPS, describe, load_table  # noqa: E402
from sim_render import SDXL, SimActor  # noqa: E402

from cluster.executor import ClusterExecutor  # noqa: E402
from cluster.inline import actor_env, inline_tile_payloads  # noqa: E402
from cluster.wire import to_wire  # noqa: E402
from pipeline.graph.clock import Clock  # noqa: E402
from pipeline.graph.health import stage_row  # noqa: E402
from pipeline.plan import RenderPlan, make_plan  # noqa: E402
from pipeline.render import render  # noqa: E402
from pipeline.spec import RenderSpec  # noqa: E402

DEFINITIONS = """\
Definitions: wall = render() from start to image, driver included. speedup = wall(1) / wall(N).
Karp-Flatt serial fraction e = (1/speedup - 1/N) / (1 - 1/N): the serial share Amdahl's law implies
from the measured speedup (Karp & Flatt 1990). "< N busy" = share of the wall during which fewer than
N actors run a task (ledger rows: from dispatch, or for a call queued behind another on its actor
from that one's result, to result accepted). "driver s" = wall outside the executor's task graphs
(composites, resizes, sampler steps between graphs): serial by construction.
Busy s per stage = sum of the stage's task durations in the ledger (as above).
Amdahl fit: the one s with wall(N) = wall(1) (s + (1 - s) / N) closest over all N (least squares).
Driver peak = high-water mark of the driver process's resident set (VmHWM, reset through
/proc/self/clear_refs before each render; tracemalloc would miss torch's tensor memory); in brackets
its resident set as the render started (imports, Ray, the previous render's leftovers).
CPU s = user + system time of every process during the render, from /proc: the driver (all its
threads), the simulated actors (their transport: arguments, results, checks; their simulated cost is
a sleep), Ray's other processes, everything else. machine busy = their sum / (wall x cores): near
100%, the bench machine's CPU, not the farm's design, sets the wall (on a farm each actor has its own
node's cores)."""


class TimedExecutor(ClusterExecutor):
    """The ClusterExecutor, counting the seconds the driver spends inside task graphs."""

    def __init__(self, actors: list, **kwargs):
        super().__init__(actors, **kwargs)
        self.graph_seconds = 0.0
        self.graphs = 0

    def run(self, stage: str, tasks: list, on_result=None) -> dict:
        start = time.perf_counter()
        try:
            return super().run(stage, tasks, on_result)
        finally:
            self.graph_seconds += time.perf_counter() - start
            self.graphs += 1


def whole_spec(size: int, steps: int, base_steps: int, tile_batch: int, tiling: str) -> RenderSpec:
    """A square top-down SDXL render with a 4x upscaler, 1024 px tiles and CFG 7 (no detailer)."""
    return RenderSpec(
        model=SDXL.path.name, upscaler="simulated-esrgan-4x", prompt="a lighthouse at dawn", negative="blurry",
        width=size, height=size, seed=1, steps=steps, base_steps=base_steps, cfg=7.0, denoise=0.35, tile=1024,
        tile_batch=tile_batch, tiling=tiling,
    ).validate()  # fmt: skip


def reset_peak_rss() -> bool:
    """Reset the process's VmHWM (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: VmHWM from /proc/self/status, else getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def busy_below(rows: list[dict], actors: int, start: float, end: float) -> float:
    """Seconds in [start, end] during which fewer than `actors` task rows are open (a sweep over their edges)."""
    edges = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows])
    below, running, last = 0.0, 0, start
    for t, step in edges:
        t = min(max(t, start), end)
        if running < actors:
            below += t - last
        running, last = running + step, t
    return below + (end - last if running < actors else 0.0)


@dataclass
class Measured:
    """One render on N simulated actors."""

    actors: int
    wall: float
    rows: list[dict]
    graph_seconds: float
    stage_wall: dict[str, float]
    peak_rss: int
    device_seconds: float  # simulated cost slept by all actors
    start_rss: int = 0  # the driver's resident set as the render started
    below_share: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] | None = None  # CPU seconds used during the render, by process group (cpu_seconds)
    phase_busy: dict[str, float | None] = field(default_factory=dict)  # machine busy share per phase (CpuSampler)

    @property
    def tasks(self) -> list[dict]:
        return [r for r in self.rows if r["kind"] == "task"]


# actors import the simulated worker by module path (a class pickled from __main__ was measured slower)
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}"}}


def start_actors(n: int, tflops: float, table: dict, runtime_env: dict | None = None) -> list:
    """N simulated actors, each warmed with one small call through the transport."""
    env = actor_env()  # as the farm starts its actors (cluster.actor.start_actors): tile payloads inline
    if runtime_env:  # joining a Ray started without our paths
        env["env_vars"] |= runtime_env["env_vars"]
    cls = ray.remote(num_cpus=1)(SimActor).options(runtime_env=env)
    actors = [cls.remote(tflops, table) for _ in range(n)]
    ray.get([a.run.remote("upscale_tile", *to_wire((torch.zeros(1, 3, 16, 16),))) for a in actors])
    return actors


_GROUPS: dict[tuple[int, bytes], str] = {}  # (pid, start time) -> its group: a command line is read once


def cpu_seconds() -> dict[str, float] | None:
    """CPU seconds (user + system, all threads) used so far by this driver, the simulated actors, Ray's other
    processes (raylet, GCS, agents, idle workers) and everything else on the machine, read from /proc; None
    where there is none. A process that exits between two readings loses its share. Each process is grouped by
    its command line when first seen (the actors are started and titled before any render is measured): reading
    every command line at every reading cost the driver ~0.4 s of CPU per 8K render, ~7% of its own."""
    if not os.path.exists("/proc/self/stat"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    groups: dict[str, float] = defaultdict(float)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # from the state, field 3 of proc(5)
            key = (int(name), fields[19])  # the start time, field 22: a pid used again is another process
            group = _GROUPS.get(key)
            if group is None:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    command = f.read().decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if group is None:
            if key[0] == me:
                group = "driver"
            elif "SimActor" in command:  # Ray titles an actor's process after its class
                group = "actors"
            else:
                group = "Ray" if "ray" in command else "other"
            _GROUPS[key] = group
        groups[group] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime, fields 14 and 15
    return dict(groups)


class CpuSampler:
    """cpu_seconds read as it starts, every `interval` s on a thread and as it ends, so that how busy the cores
    were can be told per phase of a render."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples = interval, []  # (time.time(), cpu_seconds()), none where there is no /proc
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        groups = cpu_seconds()
        if groups is not None:
            self.samples.append((time.time(), groups))

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def total(self) -> dict[str, float] | None:
        """CPU seconds per process group from the first reading to the last."""
        if not self.samples:
            return None
        (_, first), (_, last) = self.samples[0], self.samples[-1]
        return {group: last[group] - first.get(group, 0.0) for group in last}

    def busy(self, start: float, end: float) -> float | None:
        """Share of the cores busy from start to end (time.time()), between the samples nearest outside it."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after or end <= start:
            return None
        (t0, c0), (t1, c1) = before[-1], after[0]
        return (sum(c1.values()) - sum(c0.values())) / ((t1 - t0) * (os.cpu_count() or 1))


def render_phases(tasks: list[dict], end: float) -> dict[str, tuple[float, float]]:
    """(start, end) of a render's phases from its ledger rows: front = from the base's result to the first refine
    task, refine = to the last refine task's result, tail = to the image."""
    base = [r["end"] for r in tasks if r["stage"] == "base"]
    refine = [r for r in tasks if r["stage"] in ("blend", "chess")]  # the blended refine's tasks, or the chess passes'
    if not base or not refine:
        return {}
    first, last = min(r["start"] for r in refine), max(r["end"] for r in refine)
    return {"front": (max(base), first), "refine": (first, last), "tail": (last, end)}


def measure(plan: RenderPlan, actors: list, tflops: float) -> Measured:
    """Render the plan once on these warm simulated actors at `tflops`; ledger rows, timings, driver peak memory."""
    ray.get([a.set_throughput.remote(tflops) for a in actors])
    ray.get([a.take_busy.remote() for a in actors])
    ex = TimedExecutor(actors)
    rows: list[dict] = []
    ex.record = rows.append
    clock = Clock(on_stage=lambda name, s, e: rows.append(stage_row(name, s, e)))
    reset_peak_rss()
    start_rss = peak_rss()  # right after a reset the high-water mark is the current resident set
    t0 = time.time()
    start = time.perf_counter()
    with CpuSampler() as sampler:
        render(plan, ex, clock)
        finished = time.time()
    wall = time.perf_counter() - start
    peak = peak_rss()
    device = sum(ray.get([a.take_busy.remote() for a in actors]))
    n = len(actors)
    m = Measured(n, wall, rows, ex.graph_seconds, dict(clock.stages), peak, device, start_rss)
    m.below_share = busy_below(m.tasks, n, t0, t0 + wall) / wall
    busy: dict[str, float] = defaultdict(float)
    for r in m.tasks:
        busy[r["stage"]] += r["end"] - r["start"]
    m.busy = dict(busy)
    m.cpu = sampler.total()
    if m.cpu is not None:
        m.phase_busy = {name: sampler.busy(*span) for name, span in render_phases(m.tasks, finished).items()}
    return m


def karp_flatt(speedup: float, n: int) -> float | None:
    """(1/S - 1/N) / (1 - 1/N): the experimentally determined serial fraction (Karp & Flatt 1990)."""
    return None if n == 1 else (1 / speedup - 1 / n) / (1 - 1 / n)


def amdahl_fit(walls: dict[int, float]) -> float | None:
    """Least-squares s in wall(N) / wall(1) - 1/N = s (1 - 1/N) (Amdahl's law), over every N > 1."""
    xs = {n: 1 - 1 / n for n in walls if n > 1}
    if 1 not in walls or not xs:
        return None
    ys = {n: walls[n] / walls[1] - 1 / n for n in xs}
    return sum(xs[n] * ys[n] for n in xs) / sum(x * x for x in xs.values())


def plot(m: Measured, size: int, out_dir: Path) -> str:
    """A timeline PNG of the render's ledger rows, where farm.timeline exists."""
    try:
        from farm.timeline import plot_timeline
    except ImportError:
        return "timeline: skipped (farm.timeline.plot_timeline is not in this checkout)"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"whole-render-{size}px-{m.actors}-actors.png"
    plot_timeline(m.rows, path, title=f"{size} px whole render, {m.actors} simulated actors")
    return f"timeline: {path}"


def cpu_table(results: list[Measured]) -> list[str]:
    """Markdown lines: the CPU seconds each process group used during each render, and how busy that kept the
    machine's cores, over the render and in each of its phases (where /proc was there to read)."""
    measured = [m for m in results if m.cpu is not None]
    if not measured:
        return []
    cores = os.cpu_count() or 1
    groups, phases = ("driver", "actors", "Ray", "other"), ("front", "refine", "tail")
    header = " | ".join(groups) + " | machine busy | " + " | ".join(f"busy in {p}" for p in phases)
    lines = ["", f"CPU s per process group during the render (/proc; this machine has {cores} cores):", ""]
    lines += [f"| actors | wall s | {header} |", "|---:|" + "---:|" * (len(groups) + 2 + len(phases))]
    for m in measured:
        total = sum(m.cpu.values())
        cpu = " | ".join(f"{m.cpu.get(g, 0.0):.2f}" for g in groups)
        busy = " | ".join("-" if m.phase_busy.get(p) is None else f"{100 * m.phase_busy[p]:.0f}%" for p in phases)
        lines.append(f"| {m.actors} | {m.wall:.2f} | {cpu} | {100 * total / (m.wall * cores):.0f}% | {busy} |")
    return lines


def tables(results: list[Measured], zero: Measured) -> str:
    """The scaling table and the per-stage busy/wall table, as markdown."""
    base = results[0].wall if results[0].actors == 1 else None
    lines = [
        "| actors | wall s | speedup | speedup / N | Karp-Flatt e | < N busy | driver s | device s "
        "| driver peak GiB (at start) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        s = base / m.wall if base else float("nan")
        e = karp_flatt(s, m.actors)
        lines.append(
            f"| {m.actors} | {m.wall:.2f} | {s:.2f} | {s / m.actors:.2f} | {'-' if e is None else f'{e:.3f}'} | "
            f"{100 * m.below_share:.1f}% | {m.wall - m.graph_seconds:.2f} | {m.device_seconds:.2f} | "
            f"{m.peak_rss / 2**30:.2f} ({m.start_rss / 2**30:.2f}) |"
        )
    fit = amdahl_fit({m.actors: m.wall for m in results})
    if fit is not None:
        lines += ["", f"Amdahl fit over all actor counts: serial fraction s = {fit:.3f}"]
    stages = list(dict.fromkeys(r["stage"] for m in results for r in m.tasks))
    lines += ["", "busy s per ledger stage (sum of its task durations):", ""]
    lines += ["| actors | " + " | ".join(stages) + " |", "|---:|" + "---:|" * len(stages)]
    lines += [f"| {m.actors} | " + " | ".join(f"{m.busy.get(st, 0):.2f}" for st in stages) + " |" for m in results]
    walls = list(dict.fromkeys(st for m in results for st in m.stage_wall))
    lines += ["", "wall s per render stage (pipeline.graph.clock, driver's view):", ""]
    lines += ["| actors | " + " | ".join(walls) + " |", "|---:|" + "---:|" * len(walls)]
    lines += [f"| {m.actors} | " + " | ".join(f"{m.stage_wall.get(st, 0):.2f}" for st in walls) + " |" for m in results]
    lines += cpu_table(results)
    n_tasks = len(zero.tasks)
    lines += [
        "",
        f"dispatch overhead (1 actor, zero cost, {n_tasks} tasks): {1000 * zero.graph_seconds / n_tasks:.2f} ms per "
        f"task inside the task graphs (argument building, transport, scheduling); zero-cost render wall "
        f"{zero.wall:.2f} s, of which {zero.wall - zero.graph_seconds:.2f} s on the driver outside the graphs",
    ]
    return "\n".join(lines)


def run_whole_render(
    sizes: list[int],
    actor_counts: list[int],
    tflops: float = DEFAULT_TFLOPS,
    steps: int = 20,
    base_steps: int = 30,
    tile_batch: int = 1,
    tiling: str = "blend",
    out_dir: Path | None = None,
    recount: bool = False,
) -> dict:
    """Measure each size on each actor count; print the FLOP table and the scaling tables."""
    table = load_table(recount)
    print(describe(table, tflops, base_steps), "\n")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        inline_tile_payloads()  # as the farm's driver does (cluster.executor.connect)
        ray.init(
            num_cpus=max(actor_counts), include_dashboard=False, log_to_driver=False, configure_logging=False,
            runtime_env=RUNTIME_ENV,
        )  # fmt: skip
    figures: dict = {"flops": table, "sizes": {}}
    actors: list = []
    try:
        # one set of actors, warm, as in a running farm; a render on N uses the first N
        clock = time.perf_counter()
        actors = start_actors(max(actor_counts), tflops, table, None if started else RUNTIME_ENV)
        print(f"{len(actors)} simulated actors started in {time.perf_counter() - clock:.1f} s\n", flush=True)
        for size in sizes:
            plan = make_plan(whole_spec(size, steps, base_steps, tile_batch, tiling), SDXL)
            print(f"## {size} px: {tflops:g} TFLOP/s per actor\n\n{plan.describe()}\n", flush=True)
            # a farm's actors have rendered before: a fresh actor's first calls pay its imports and first
            # allocations (at 8K the first render on 16 fresh actors took 16.2-16.4 s, the next ones 12.9-13.2 s), so
            # every actor renders once first
            measure(plan, actors, float("inf"))
            zero = measure(plan, actors[:1], float("inf"))
            results = []
            for n in actor_counts:
                results.append(measure(plan, actors[:n], tflops))
                print(f"  {n} actor(s): {results[-1].wall:.2f} s", flush=True)
            print("\n" + tables(results, zero) + "\n")
            if out_dir is not None:
                for m in results:
                    print(plot(m, size, out_dir))
            figures["sizes"][size] = {"results": results, "zero": zero, "plan": plan}
        print("\n" + DEFINITIONS)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    return figures
