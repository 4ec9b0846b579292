"""`farm batch`: many renders in one command, from a CSV or Parquet table or a folder of images.

Each table row is a spec layer on top of the preset and the flags (preset < flags < row); each image
of a folder is one render's `input`. The models load once (on a cluster: the actors start once). Locally
the renders run one after another; on a cluster `--in-flight N` renders (2 by default) run at once on the
same actors, so one render's tiles keep the actors busy while another is in a single-call stage (base,
encode). A row or image that is refused is reported and skipped;
the others still render. DIR/batch-ledger.parquet gets one row per item, rewritten atomically after
each. Exit code 0 when every item rendered, 1 when some were skipped or failed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.errors import RenderError, SpecError, UserError
from pipeline.graph.progress import no_progress
from pipeline.inputs import IMAGE_SUFFIXES
from pipeline.spec import RenderSpec

LEDGER_NAME = "batch-ledger.parquet"
OUT_COLUMN = "out"  # a table may name each row's output file; otherwise it is named in --out-dir


@dataclass(frozen=True)
class Item:
    """One render of a batch: a label for messages and the ledger, and its own spec fields."""

    label: str
    values: dict
    problem: str = ""  # a cell that cannot be read: the item is skipped with this message


def _convert(name: str, value, kind: type, where: str):
    """A table cell as the spec field's type (CSV cells are text; Parquet cells are typed already)."""
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value.strip())
        except ValueError:
            raise SpecError(f"{where}: {name} must be {'a whole number' if kind is int else 'a number'}") from None
    return value


def read_table(path: Path) -> list[Item]:
    """Rows of a CSV (with a header) or Parquet file; relative `input` paths are read from the table's folder."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(str(path)).to_pylist()
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            raise UserError(f"batch table {path} is not a readable Parquet file ({err})") from None
    else:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as err:
            raise UserError(f"batch table {path} is not a readable CSV file ({err})") from None
    kinds = {f.name: type(getattr(RenderSpec(), f.name)) for f in fields(RenderSpec) if f.name != "concepts"}
    columns = set(rows[0]) if rows else set()
    unknown = sorted(columns - set(kinds) - {OUT_COLUMN})
    if unknown:
        raise UserError(
            f"batch table {path}: unknown column(s) {', '.join(unknown)}; columns are spec fields "
            f"(e.g. prompt, seed, input, denoise) or {OUT_COLUMN}"
        )
    items = []
    for i, row in enumerate(rows, start=1):
        label = f"{path.name} row {i}"
        values = {k: v for k, v in row.items() if v is not None and v != ""}
        try:
            values = {k: _convert(k, v, kinds.get(k, str), label) for k, v in values.items()}
        except SpecError as err:
            items.append(Item(label, {}, str(err)))
            continue
        if "input" in values and not Path(values["input"]).expanduser().is_absolute():
            values["input"] = str(path.parent / values["input"])
        items.append(Item(label, values))
    return items


def read_folder(folder: Path) -> list[Item]:
    """Every image file of a folder (by suffix, sorted by name), each the input of one render."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = len(files) - len(images)
    if ignored:
        print(f"farm batch: {ignored} file(s) in {folder} without an image suffix are ignored", file=sys.stderr)
    return [Item(str(p), {"input": str(p)}) for p in images]


def read_items(source: str) -> list[Item]:
    path = Path(source).expanduser()
    if path.is_dir():
        items = read_folder(path)
    elif path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
        items = read_table(path)
    elif path.is_file():
        raise UserError(f"batch source {path}: give a .csv or .parquet table, or a folder of images")
    else:
        raise UserError(f"batch source {path} does not exist")
    if not items:
        raise UserError(f"batch source {path} holds nothing to render (no rows, or no images)")
    return items


def write_ledger(path: Path, rows: list[dict]) -> None:
    """The batch ledger: one row per item (input, output, seed, seconds, outcome ok|skipped|failed, error)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("input", pa.string()),
            ("output", pa.string()),
            ("seed", pa.uint64()),  # the seed rendered with (a row without one gets a drawn seed)
            ("seconds", pa.float64()),
            ("start", pa.float64()),  # unix seconds: with renders in flight together, their spans overlap
            ("end", pa.float64()),
            ("outcome", pa.string()),
            ("error", pa.string()),
        ]
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp))
    os.replace(tmp, path)


class Renderer:
    """Renders plans on models loaded once: a local worker, or a pool of Ray actors started once."""

    def __init__(self, args: argparse.Namespace, in_flight: int = 1):
        self.args = args
        self.worker = None
        self.pool = None
        if args.cluster:
            from cluster.executor import ActorPool  # Ray is imported only on this path

            self.pool = ActorPool(args.cluster, args.workers, args.gpus_per_worker, shared=in_flight > 1)

    def render(self, plan, progress, log):
        if self.pool is not None:
            from cluster.executor import run_cluster

            return run_cluster(plan, progress=progress, log=log, pool=self.pool).result
        from farm.executor import run_local
        from pipeline.graph.worker import TileWorker, WorkerConfig

        config = WorkerConfig.from_spec(plan.spec, self.args.device)
        if self.worker is None or self.worker.config != config:
            self.worker = None  # release the previous models before loading others
            self.worker = TileWorker(config)
        return run_local(plan, progress=progress, log=log, worker=self.worker).result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def run_batch(args: argparse.Namespace) -> int:
    from farm.executor import prepare
    from farm.flags import command_line_layers
    from farm.output import check_output_path, output_name, save_png
    from farm.progress import tqdm_progress
    from farm.specfile import build_spec

    if args.out:
        raise UserError("farm batch writes one file per item: pass --out-dir DIR instead of --out")
    if not args.out_dir:
        raise UserError("farm batch needs --out-dir DIR for its outputs and batch-ledger.parquet")
    out_dir = Path(args.out_dir).expanduser()
    if not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is not a folder; create it first")
    layers, preset, _ = command_line_layers(args)
    items = read_items(args.source)
    prefix = args.prefix or (preset.prefix or preset.name if preset else "render")
    progress = tqdm_progress(not args.quiet)
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    in_flight = args.in_flight or (2 if args.cluster else 1)
    if in_flight < 1:
        raise UserError(f"--in-flight {in_flight}: must be at least 1")
    if in_flight > 1 and not args.cluster:
        raise UserError(f"--in-flight {in_flight}: renders run at once only on a cluster; add --cluster auto|ADDRESS")
    if in_flight > 1:
        progress = no_progress  # bars of renders running at once would interleave; the log says what runs
    ledger, rows, lock = out_dir / LEDGER_NAME, {}, threading.Lock()
    renderer = Renderer(args, in_flight)

    def render_item(n: int, item: Item) -> None:
        start, wall = time.perf_counter(), time.time()
        row = {"input": item.label, "output": "", "seed": None, "seconds": 0.0, "outcome": "ok", "error": ""}
        try:
            if item.problem:
                raise SpecError(item.problem)
            values = dict(item.values)
            out = values.pop(OUT_COLUMN, None)
            spec = build_spec([*layers, (values, item.label)])
            if preset:
                preset.check_model(spec.model)
            # draws a seed for a row without one
            plan = prepare(spec, "cpu" if args.cluster else args.device, cluster=bool(args.cluster))
            row["seed"] = plan.spec.seed
            stem = Path(spec.input).stem if spec.input else f"{n:04d}"
            with lock:  # names are checked for collisions: one at a time
                out = check_output_path(out or output_name(out_dir, prefix, stem), args.overwrite)
            print(f"farm batch: {n}/{len(items)} {item.label}, seed: {plan.spec.seed}", file=sys.stderr)
            if not args.quiet:
                print(plan.describe(), file=sys.stderr)
            image = renderer.render(plan, progress, log).image
            save_png(image, plan, out, not args.no_metadata)
            row["output"] = str(out)
        except (UserError, RenderError) as err:
            row["outcome"] = "skipped" if isinstance(err, UserError) else "failed"
            row["error"] = str(err)
            print(f"farm batch: {row['outcome']} {item.label}: {err}", file=sys.stderr)
        row |= {"seconds": time.perf_counter() - start, "start": wall, "end": time.time()}
        with lock:
            rows[n] = row
            write_ledger(ledger, [rows[k] for k in sorted(rows)])

    try:
        with ThreadPoolExecutor(in_flight) as pool:
            for future in [pool.submit(render_item, n, item) for n, item in enumerate(items, start=1)]:
                future.result()  # a bug in one render surfaces here
    finally:
        renderer.close()
    rows = [rows[k] for k in sorted(rows)]
    done = sum(r["outcome"] == "ok" for r in rows)
    print(f"farm batch: {done} of {len(rows)} rendered into {out_dir}; ledger {ledger}", file=sys.stderr)
    return 0 if done == len(rows) else 1
