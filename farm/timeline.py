"""A render's timeline as a PNG: one lane per worker, each task a bar coloured by its stage.

Gaps in a lane are time that worker sat idle (waiting on the driver, a barrier, a slower worker).
Drawn with matplotlib's Agg canvas on a bare Figure: no pyplot state, no display needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import UserError


def check_plot_path(path: str | Path) -> Path:
    """Refuse, before any work, a timeline path we could not write as a PNG."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the timeline is drawn as a PNG; give a file name ending in .png")
    if path.is_dir():
        raise UserError(f"--plot {path} is a folder; give a file name such as {path / 'timeline.png'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--plot {path}: folder {parent} does not exist; create it first")
    return path


def lane_order(workers: set[str]) -> list[str]:
    """Workers in natural order: 'actor 2' before 'actor 10'."""
    return sorted(workers, key=lambda w: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", w)])


def plot_timeline(rows: list[dict], path: str | Path, title: str = "") -> list[str]:
    """Draw the ledger's task rows as one lane per worker over seconds since the render started; return the lanes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = check_plot_path(path)
    tasks = [r for r in rows if r["kind"] == "task"]
    if not tasks:
        raise UserError(
            f"--plot {path}: the ledger holds no task rows yet, so there is nothing to draw; "
            "plot a run that has finished at least one task"
        )
    origin = min(r["start"] for r in rows)  # the render's start: its first row (a stage or a task)
    wall = max(r["end"] for r in rows) - origin
    lanes = lane_order({r["worker"] for r in tasks})
    stages = list(dict.fromkeys(r["stage"] for r in rows if r["kind"] in ("stage", "task")))

    palette = [f"C{i}" for i in range(10)]  # matplotlib's default cycle (tab10): distinct, colour-blind aware
    colour = {s: palette[i % len(palette)] for i, s in enumerate(stages)}
    fig = Figure(figsize=(12, 1.4 + 0.45 * len(lanes)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:  # the driver's stage spans, faint, behind the lanes: which stage a gap falls in
        if r["kind"] == "stage":
            ax.axvspan(r["start"] - origin, r["end"] - origin, color=colour[r["stage"]], alpha=0.08, lw=0)
    busy = dict.fromkeys(lanes, 0.0)
    for r in tasks:
        y = lanes.index(r["worker"])
        start, seconds = r["start"] - origin, r["end"] - r["start"]
        busy[r["worker"]] += seconds
        failed = r["outcome"] != "ok"
        ax.broken_barh(
            [(start, seconds)],
            (y - 0.4, 0.8),
            facecolors=colour[r["stage"]],
            edgecolors="black" if failed else "none",
            hatch="//" if failed else None,
            linewidth=0.8 if failed else 0,
        )
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{w} ({100 * busy[w] / wall:.0f}% busy)" if wall else w for w in lanes])
    ax.set_ylim(len(lanes) - 0.5, -0.5)  # the first lane on top
    ax.set_xlim(0, wall or 1)
    ax.set_xlabel("seconds since the render started")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"{len(tasks)} tasks on {len(lanes)} worker(s) in {wall:.1f} s")
    handles = [Patch(facecolor=colour[s], label=s) for s in stages]
    if any(r["outcome"] != "ok" for r in tasks):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="retried / failed"))
    ax.legend(handles=handles, title="stage", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return lanes
