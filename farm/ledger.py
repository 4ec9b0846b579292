"""`farm ledger RUN`: where a render's time went, per stage and per worker, and what was retried."""

from __future__ import annotations

from collections import defaultdict

from farm.rundir import RunDir


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def summary(run: RunDir) -> str:
    """A markdown summary of the ledger: wall time, time per stage (adding up to the wall), per worker, retries."""
    rows = run.rows
    renders = [r for r in rows if r["kind"] == "render"]
    stages = [r for r in rows if r["kind"] == "stage"]
    tasks = [r for r in rows if r["kind"] == "task"]
    wall = sum(r["end"] - r["start"] for r in renders)
    out = [f"run {run.run_id} in {run.path}: {len(renders)} finished session(s), {len(tasks)} task row(s)"]
    if not renders:
        out.append(f"the render has not finished (resume it with `farm render --resume {run.run_id}`)")

    per_stage: dict[str, float] = defaultdict(float)
    for r in stages:
        per_stage[r["stage"]] += r["end"] - r["start"]
    task_count: dict[str, int] = defaultdict(int)
    for r in tasks:
        task_count[r["stage"]] += 1
    total = sum(per_stage.values())
    out += ["", "time per stage:"]
    out += table(
        ["stage", "seconds", "share of wall", "tasks"],
        [
            [s, f"{t:.2f}", f"{100 * t / wall:.1f}%" if wall else "-", task_count.get(s, 0)]
            for s, t in per_stage.items()
        ],
    )
    if wall:
        out.append(f"stages add up to {total:.2f} s of {wall:.2f} s wall ({100 * total / wall:.1f}%)")

    per_worker: dict[str, list] = defaultdict(lambda: [0, 0.0, 0, "", None])
    for r in tasks:
        w = per_worker[r["worker"]]
        w[0] += 1
        w[1] += r["end"] - r["start"]
        w[2] += r["attempts"] - 1
        w[3] = f"{r['host']} {r['device']}".strip()
        if r.get("peak_memory") is not None:
            w[4] = max(w[4] or 0, r["peak_memory"])
    out += ["", "per worker:"]
    out += table(
        ["worker", "where", "tasks", "busy seconds", "retries", "peak memory"],
        [
            [name, w[3], w[0], f"{w[1]:.2f}", w[2], "-" if w[4] is None else f"{w[4] / 2**30:.2f} GiB"]
            for name, w in sorted(per_worker.items())
        ],
    )
    retried = [r for r in tasks if r["attempts"] > 1 or r["outcome"] != "ok"]
    out += ["", f"retried or failed tasks: {len(retried)}"]
    out += [
        f"- {r['stage']} task {r['task']} ({r['pass']}, tiles {r['tiles']}): {r['outcome']} after "
        f"{r['attempts']} attempt(s) on {r['worker']}: {r['error']}"
        for r in retried
    ]
    return "\n".join(out)
