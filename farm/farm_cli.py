"""The warm farm's commands: `farm up`, `farm down`, `farm ls`, `farm status`, `farm cancel`, `farm prio`,
and `farm render --farm ADDRESS` (validated here, rendered by the farm, the PNG written here)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import RenderError, UserError

FARM_COMMANDS = ("up", "down", "ls", "status", "cancel", "prio")
FOLLOW_S = 0.25  # how often a client asks the farm how its render is going


def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default="auto", help="the Ray cluster's HOST:PORT, or auto (the one running on this machine)"
    )


def add_commands(sub) -> None:
    up = sub.add_parser("up", help="start the warm farm on a Ray cluster (models stay loaded across renders)")
    _address(up)
    up.add_argument("--state-dir", help="the farm's queue and results on this node (default: STATE/farm)")
    up.add_argument("--workers", type=int, help="at most this many worker actors (default: one per GPU)")
    up.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 1; 0 = CPU workers)")
    up.add_argument("--max-running", type=int, default=2, help="renders running at once on the workers (default 2)")
    up.add_argument(
        "--models-per-worker",
        type=int,
        default=2,
        help="model sets a worker keeps loaded, least recently used dropped first (default 2)",
    )
    up.add_argument(
        "--result-ttl",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="delete a finished render's PNG this many hours after it finished (default 24; 0 = keep them)",
    )
    up.add_argument("--http-port", type=int, help="also serve the HTTP API on this port (Ray Serve)")
    up.add_argument("--http-host", default="127.0.0.1", help="the HTTP API's address (default 127.0.0.1)")
    up.add_argument("--api-key-file", help="a file holding the key HTTP clients must send (needed off 127.0.0.1)")
    up.add_argument(
        "--model-root",
        action="append",
        default=[],
        metavar="DIR",
        help="HTTP clients' specs may name model files under DIR only (repeatable; default: none)",
    )
    down = sub.add_parser("down", help="drain the farm (running renders go back to the queue) and end its actors")
    _address(down)
    ls = sub.add_parser("ls", help="the farm's renders, newest first: id, state, priority, size, progress")
    _address(ls)
    ls.add_argument("-n", "--limit", type=int, default=20, help="show the last N renders (default 20)")
    for name, text in (("status", "one render's state, progress and timings"), ("cancel", "cancel a render")):
        command = sub.add_parser(name, help=text)
        command.add_argument("id", type=int, help="render id (from `farm ls` or `farm render --farm`)")
        _address(command)
    prio = sub.add_parser("prio", help="change a queued render's priority (higher starts first)")
    prio.add_argument("id", type=int)
    prio.add_argument("priority", type=int)
    _address(prio)


def add_render_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--farm", metavar="auto|ADDRESS", help="render on the warm farm of this Ray cluster (`farm up`) instead"
    )
    parser.add_argument("--priority", type=int, default=0, help="with --farm: higher starts first (default 0)")
    # a Ray job's client (python -m cluster.job): `ray job stop` ends the job with SIGTERM, and the render with it
    parser.add_argument("--cancel-on-stop", action="store_true", help=argparse.SUPPRESS)


def _default_state_dir() -> Path:
    from farm.runs import state_dir

    return state_dir() / "farm"


def run_farm_command(args: argparse.Namespace) -> int:
    from cluster import farm_client

    if args.command == "up":
        for flag, value in (("--max-running", args.max_running), ("--models-per-worker", args.models_per_worker)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be at least 1")
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers {args.workers}: must be at least 1")
        if not args.result_ttl >= 0:  # NaN too
            raise UserError(f"--result-ttl {args.result_ttl:g}: must be 0 (keep images) or more hours")
        state = Path(args.state_dir or _default_state_dir()).expanduser().resolve()
        key = _read_key(args.api_key_file) if args.api_key_file else ""
        ready = farm_client.up(
            args.address,
            str(state),
            args.workers,
            args.gpus_per_worker,
            args.max_running,
            args.models_per_worker,
            args.result_ttl,
        )
        was = "was already up" if ready["already"] else "is up"
        print(
            f"farm {was}: {ready['workers']} worker(s) of {ready['gpus_per_worker']:g} GPU(s), "
            f"{ready['max_running']} render(s) at once, queue in {ready['state_dir']}"
            + (f"; renders {', '.join(map(str, ready['resumed']))} are queued" if ready["resumed"] else "")
        )
        if args.http_port:
            url = farm_client.start_api(args.http_host, args.http_port, key, args.model_root)
            print(f"HTTP API at {url}" + (" (API key required)" if key else ""))
        return 0
    if args.command == "down":
        requeued = farm_client.down(args.address)
        again = f"; renders {', '.join(map(str, requeued))} go back to the queue" if requeued else ""
        print(f"farm is down{again}; `farm up` resumes what is queued")
        return 0
    ctl = farm_client.controller(args.address)
    if args.command == "ls":
        print(renders_table(farm_client.call(ctl.list, args.limit)))
        return 0
    if args.command == "status":
        record = _known(farm_client.call(ctl.status, args.id), args.id)
        print(describe(record))
        if record.get("expired"):
            from cluster.queue import expired_message

            raise UserError(expired_message(record))
        return 0 if record["state"] != "failed" else 1
    if args.command == "cancel":
        was = _known(farm_client.call(ctl.cancel, args.id), args.id)
        if was in ("done", "failed", "canceled"):
            print(f"render {args.id} had already ended ({was}); nothing to cancel")
        else:
            print(f"render {args.id} canceled (it was {was}; a running one stops at its next task)")
        return 0
    was = _known(farm_client.call(ctl.prio, args.id, args.priority), args.id)
    print(f"render {args.id} ({was}) has priority {args.priority}")
    return 0


def _read_key(path: str) -> str:
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise UserError(f"--api-key-file {path}: cannot read it ({err.strerror})") from None
    if len(key) < 16:
        raise UserError(f"--api-key-file {path}: the key must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    return key


def _known(value, render_id: int):
    if value is None:
        raise UserError(f"the farm has no render {render_id}; `farm ls` lists them")
    return value


def _progress_text(progress: dict) -> str:
    return ", ".join(f"{stage} {done}/{total}" for stage, (done, total) in progress.items())


def renders_table(records: list[dict]) -> str:
    """One line per render: id, state, priority, size, age, seconds run, prompt."""
    if not records:
        return "the farm has no renders yet"
    lines = [f"{'id':>5}  {'state':<8}  {'prio':>4}  {'size':>11}  {'submitted':>19}  {'seconds':>7}  prompt"]
    for r in records:
        spec, end = r["spec"], r["finished"] or (time.time() if r["started"] else None)
        seconds = f"{end - r['started']:.1f}" if r["started"] and end else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["submitted"]))
        size = f"{spec['width']}x{spec['height']}"
        lines.append(
            f"{r['id']:>5}  {r['state']:<8}  {r['priority']:>4}  {size:>11}  {when:>19}  {seconds:>7}  "
            f"{spec['prompt'][:40]}"
        )
    return "\n".join(lines)


def describe(record: dict) -> str:
    spec, stats = record["spec"], record["stats"]
    lines = [
        f"render {record['id']}: {record['state']}, priority {record['priority']}",
        f"  {spec['width']}x{spec['height']}, seed {spec['seed']}, model {spec['model']}",
    ]
    if progress := record.get("progress"):  # live, or how far an ended render got
        lines.append(f"  progress: {_progress_text(progress)}")
    if stats.get("stages"):
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in stats.get("stages", {}).items())
        lines.append(f"  stages: {stages}")
        lines.append(f"  model loads: {stats.get('loads', 0)} ({stats.get('load_seconds', 0.0):.2f} s)")
    if record["result"]:
        lines.append(f"  image (on the farm's node): {record['result']}")
    if record.get("expired"):
        lines.append("  image: expired (deleted by the farm)")
    if record["error"]:
        lines.append(f"  error: {record['error']}")
    return "\n".join(lines)


def render_on_farm(args: argparse.Namespace, plan, out: Path, metadata: bool) -> int:
    """Submit a prepared plan's spec, follow its progress, write the farm's PNG to `out`."""
    import torch

    from cluster import farm_client

    ctl = farm_client.controller(args.farm, "--farm")
    # the farm's workers use this machine's CPU thread count, so a CPU render matches a local one bit for bit
    options = {"cpu_threads": torch.get_num_threads(), "metadata": metadata}
    render_id = farm_client.call(ctl.submit, plan.spec.to_dict(), options, args.priority)
    print(f"farm: render {render_id} submitted (seed {plan.spec.seed})", file=sys.stderr)
    if getattr(args, "cancel_on_stop", False):
        signal.signal(signal.SIGTERM, _stopped)
    try:
        record = follow(ctl, render_id, not args.quiet)
    except JobStopped:
        farm_client.call(ctl.cancel, render_id)
        print(f"farm: the job was stopped; render {render_id} is cancelled", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(
            f"farm: render {render_id} goes on on the farm: `farm status {render_id}`, `farm cancel {render_id}`",
            file=sys.stderr,
        )
        return 130
    if record["state"] != "done":
        reason = f": {record['error']}" if record["error"] else ""
        raise RenderError(f"render {render_id} was {record['state']} on the farm{reason}")
    write_bytes(out, farm_client.call(ctl.image, render_id))
    stats = record["stats"]
    print(
        f"wrote {out} ({plan.spec.width}x{plan.spec.height}, seed {plan.spec.seed}) in "
        f"{record['finished'] - record['submitted']:.1f} s on the farm (render {render_id}, "
        f"{stats.get('loads', 0)} model load(s))",
        file=sys.stderr,
    )
    return 0


class JobStopped(Exception):
    """SIGTERM reached a job's client (`ray job stop`)."""


def _stopped(signum, frame) -> None:
    raise JobStopped


def follow(ctl, render_id: int, bars: bool = True) -> dict:
    """Poll the render until it ends, with a tqdm bar per stage; returns its final record."""
    from tqdm.auto import tqdm

    from cluster.farm_client import call
    from pipeline.graph.progress import unit_of

    shown: dict = {}
    try:
        while True:
            record = call(ctl.status, render_id)
            for stage, (done, total) in record.get("progress", {}).items():
                bar = shown.get(stage)
                if bar is None:
                    bar = shown[stage] = tqdm(
                        total=total, desc=f"{stage:<11}", unit=unit_of(stage), file=sys.stderr, disable=not bars
                    )
                bar.total = total
                bar.update(done - bar.n)
            if record["state"] in ("done", "failed", "canceled"):
                return record
            time.sleep(FOLLOW_S)
    finally:
        for bar in shown.values():
            bar.close()


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically, as save_png writes: never half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
