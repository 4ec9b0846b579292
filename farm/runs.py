"""Where run folders live and how they are found again: `farm runs`, `--resume RUN`, `farm ledger RUN`.

Every render gets its own run folder, STATE/runs/RUN_ID/, out of the way of its output; STATE is
$TILEFARM_STATE_DIR, else $XDG_STATE_HOME/tilefarm, else ~/.local/state/tilefarm (the XDG base
directory rule for state that outlives a process but is not a user's document). A render given
`--run-dir DIR` keeps its folder there and STATE/runs/RUN_ID links to it, so it is found by id too.
A run is named by its id (or a unique start of it), its folder's path, or `last`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from farm.rundir import RunDir
from pipeline.errors import UserError
from pipeline.spec import RenderSpec

STATE_ENV = "TILEFARM_STATE_DIR"


def state_dir() -> Path:
    """$TILEFARM_STATE_DIR, else $XDG_STATE_HOME/tilefarm, else ~/.local/state/tilefarm."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "tilefarm"


def runs_root() -> Path:
    return state_dir() / "runs"


def new_run_id() -> str:
    """YYYYmmdd-HHMMSS-xxxxxx: sorts by start time, unique across renders started in the same second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def new_run(spec: RenderSpec, out: Path, run_dir: str | None = None, metadata: bool = True) -> RunDir:
    """A run folder for a new render: STATE/runs/RUN_ID, or `run_dir` with a link to it there."""
    root, run_id = runs_root(), new_run_id()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the run folders' home {root} ({err.strerror}); set {STATE_ENV} to a folder you can "
            "write to, or pass --run-dir DIR"
        ) from None
    path = Path(run_dir).expanduser() if run_dir else root / run_id
    run = RunDir.create(path, run_id, spec, out, metadata)
    if run_dir:
        (root / run_id).symlink_to(path.resolve(), target_is_directory=True)
    return run


def forget(run: RunDir) -> None:
    """Remove a run that did no work (refused before it started), and its link."""
    run.remove()
    link = runs_root() / run.run_id
    if link.is_symlink():
        link.unlink()


def _peek(folder: Path) -> RunDir | None:
    """A run folder with its spec.json read (not its ledger), or None for anything else."""
    run = RunDir(folder)
    try:
        run.info = json.loads((folder / "spec.json").read_text())
        run.run_id = str(run.info["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run


def recent_runs() -> list[RunDir]:
    """Every run in STATE/runs (links followed), the last started first."""
    root = runs_root()
    runs = [run for entry in (root.iterdir() if root.is_dir() else ()) if (run := _peek(entry))]
    return sorted(runs, key=lambda run: (run.info.get("started") or 0, run.run_id), reverse=True)


def find_run(text: str, flag: str, last: str | None = None) -> Path:
    """The run folder `text` names: a folder path, a run id (or its unique start), or 'last': the last
    started run whose status is `last` (any status when None)."""
    root = runs_root()
    if text == "last":
        runs = [run for run in recent_runs() if last is None or run.status == last]
        if not runs:
            raise UserError(
                f"{flag} last: no {last + ' ' if last else ''}run in {root}; `farm runs` lists the runs there"
            )
        return runs[0].path
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text and os.sep not in text and root.is_dir():
        matches = sorted(entry for entry in root.iterdir() if entry.name.startswith(text))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(entry.name for entry in matches[:5])
            raise UserError(f"{flag} {text}: {len(matches)} runs start with it ({names}); give more of the id")
    raise UserError(
        f"{flag} {text}: no run with that id in {root} and no run folder at that path; "
        "`farm runs` lists recent runs (pass an id, a run folder, or last)"
    )


def resumable(text: str) -> tuple[RunDir, RenderSpec, Path]:
    """(run, spec, output) of the run `text` names (see find_run), refused if finished or rendering now."""
    run, spec, out = RunDir.open(find_run(text, "--resume", last="interrupted"))
    if run.status == "finished":
        raise UserError(
            f"run {run.run_id} is finished: it wrote {out}; to render it again, "
            f"`farm render --from-png {out} --out PATH` (a new run)"
        )
    if run.status == "running":
        raise UserError(f"run {run.run_id} is rendering now ({run.owner()}); wait for it or stop it first")
    return run, spec, out


def progress(run: RunDir) -> str:
    """How far a run got: 'done in N s', or the stages done and the tasks stored in the current one."""
    if run.status == "finished":
        return f"done in {run.info['finished'] - run.info['started']:.1f} s" if run.info.get("finished") else "done"
    rows = run.read_ledger()
    stages = [r for r in rows if r["kind"] == "stage"]
    done_at = max((r["end"] for r in stages), default=0.0)
    current = [r for r in rows if r["kind"] == "task" and r["end"] > done_at]
    parts = [f"done: {', '.join(dict.fromkeys(r['stage'] for r in stages))}"] if stages else []
    if current:
        parts.append(f"{current[-1]['stage']}: {len(current)} task(s)")
    return "; ".join(parts) or "nothing finished yet"


def runs_table(limit: int = 20) -> str:
    """`farm runs`: the last `limit` runs (0 = all) as a markdown table, the newest first."""
    from farm.ledger import table

    runs = recent_runs()
    shown = runs[:limit] if limit else runs
    head = f"{len(runs)} run(s) in {runs_root()}" + (f", the last {len(shown)} shown" if len(shown) < len(runs) else "")
    rows = []
    for run in shown:
        spec = run.info.get("spec", {})
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.get("started") or 0))
        size = f"{spec.get('width')}x{spec.get('height')}"
        rows.append([run.run_id, run.status, run.info.get("out", ""), size, started, progress(run)])
    if not rows:
        return head
    text = "\n".join(table(["run", "status", "output", "size", "started", "progress"], rows))
    return f"{head}\n\n{text}\n\ncontinue an interrupted run with `farm render --resume RUN` (an id, or last)"
