"""The run folder of a render: its spec, every finished unit of work, and the Parquet ledger.

    RUN/spec.json         the run id, the spec (with its resolved seed), the output path, when it started
                          and finished, and whether the PNG carries metadata
    RUN/owner.json        the process rendering it now (pid, host); gone once it has finished
    RUN/state/KEY.safetensors   one finished unit: a stage output or a tile batch's results
    RUN/ledger.parquet    one row per task (tile batch, crop batch, model call) and per stage

Every file is written to a temporary name and renamed, so a killed render leaves only whole files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.detail.detection import Detection
from pipeline.errors import UserError
from pipeline.spec import RenderSpec

if TYPE_CHECKING:  # `farm runs` and `farm ledger` read a run folder without loading torch
    import torch

LEDGER_COLUMNS = (
    "run_id",
    "kind",
    "stage",
    "pass",
    "task",
    "tiles",
    "boxes",
    "worker",
    "host",
    "device",
    "start",
    "end",
    "attempts",
    "outcome",
    "error",
)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of `value` with every tensor moved into `tensors` (tensors, dicts, lists, detections)."""
    import torch

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(value, Detection):
        return {"$detection": pack(asdict(value) | {"mask": value.mask}, tensors)}
    if isinstance(value, dict):
        return {"$dict": [[k, pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"$list": [pack(v, tensors) for v in value], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, int | float | str | bool):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a run folder")


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of pack."""
    if isinstance(skeleton, dict):
        if "$tensor" in skeleton:
            return tensors[skeleton["$tensor"]]
        if "$detection" in skeleton:
            fields = unpack(skeleton["$detection"], tensors)
            return Detection(**(fields | {"box": tuple(fields["box"])}))
        if "$dict" in skeleton:
            return {k: unpack(v, tensors) for k, v in skeleton["$dict"]}
        if "$list" in skeleton:
            items = [unpack(v, tensors) for v in skeleton["$list"]]
            return tuple(items) if skeleton["tuple"] else items
    return skeleton


class RunDir:
    """A render's run folder: a checkpoint store (pipeline.graph.checkpoint.Store) and the ledger."""

    def __init__(self, path: Path):
        import pyarrow.parquet  # noqa: F401  (imported now, not inside the first stage the ledger times)

        self.path = Path(path)
        self.state = self.path / "state"
        self.rows: list[dict] = []
        self.run_id = ""
        self.info: dict = {}  # spec.json: run_id, out, spec, started, finished, metadata

    @classmethod
    def create(cls, path: Path, run_id: str, spec: RenderSpec, out: Path, metadata: bool = True) -> RunDir:
        """A new run folder for a render of `spec` to `out`; a folder that holds a render already is refused."""
        run = cls(path)
        if (run.path / "spec.json").exists():
            raise UserError(
                f"run folder {run.path} already holds a render; continue it with `farm render --resume {run.path}`, "
                "or pass another --run-dir (without --run-dir every render gets its own run folder)"
            )
        run.state.mkdir(parents=True, exist_ok=True)
        run.run_id = run_id
        run.info = {
            "run_id": run_id,
            "out": str(out),
            "started": time.time(),
            "finished": None,
            "metadata": metadata,
            "spec": spec.to_dict(),
        }
        run._write_info()
        run.claim()
        return run

    @classmethod
    def open(cls, path: str | Path) -> tuple[RunDir, RenderSpec, Path]:
        """An existing run folder: (run, its spec, its output path)."""
        run = cls(Path(path).expanduser())
        spec_file = run.path / "spec.json"
        if not spec_file.is_file():
            raise UserError(f"{run.path} is not a run folder (no spec.json); pass the folder a render created")
        try:
            run.info = json.loads(spec_file.read_text())
            spec = RenderSpec.from_dict(run.info["spec"], str(spec_file)).validate()
            run.run_id, out = run.info["run_id"], Path(run.info["out"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{spec_file} is damaged; the render cannot be resumed from it") from None
        run.rows = run.read_ledger()
        return run, spec, out

    def _write_info(self) -> None:
        text = json.dumps(self.info, indent=2)
        _atomic(self.path / "spec.json", lambda tmp: tmp.write_text(text))

    @property
    def status(self) -> str:
        """finished, running (a live process holds it) or interrupted (stopped or failed: resumable)."""
        if self.info.get("finished") or ("finished" not in self.info and not self.state.exists()):
            return "finished"  # (a folder from before the finished time was recorded: its state is dropped)
        return "running" if self.owner() else "interrupted"

    def owner(self) -> str:
        """'pid N on HOST' of a live process rendering this run, or '' (none, or it died)."""
        try:
            data = json.loads((self.path / "owner.json").read_text())
            pid, host = int(data["pid"]), str(data["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                return ""
            except PermissionError:
                pass  # it exists, under another user
        return f"pid {pid} on {host}"

    def claim(self) -> None:
        """Mark this process as the one rendering the run (a killed process leaves a dead pid: interrupted)."""
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        _atomic(self.path / "owner.json", lambda tmp: tmp.write_text(data))

    # --- the checkpoint store ---

    def _file(self, key: str) -> Path:
        return self.state / f"{key}.safetensors"

    def load(self, key: str) -> Any | None:
        from safetensors import safe_open

        file = self._file(key)
        if not file.exists():
            return None
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            skeleton = json.loads(handle.metadata()["skeleton"])
        return unpack(skeleton, tensors)

    def save(self, key: str, value: Any) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        skeleton = json.dumps(pack(value, tensors))
        _atomic(self._file(key), lambda tmp: save_file(tensors, str(tmp), metadata={"skeleton": skeleton}))

    def remove(self) -> None:
        """Delete the whole folder (a render refused before it did any work)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        """This process no longer renders the run (it finished, failed or was interrupted)."""
        (self.path / "owner.json").unlink(missing_ok=True)

    def finished(self) -> None:
        """The render is written: record it, and drop the stored units (the spec and the ledger stay)."""
        self.info["finished"] = time.time()
        self._write_info()
        self.release()
        shutil.rmtree(self.state, ignore_errors=True)

    # --- the ledger ---

    def add(self, row: dict) -> None:
        """Append a ledger row and rewrite the Parquet file (small; atomic), so a kill loses no finished row."""
        self.rows.append({"run_id": self.run_id} | row)
        self.write_ledger()

    def write_ledger(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self.rows, schema=ledger_schema())
        _atomic(self.path / "ledger.parquet", lambda tmp: pq.write_table(table, str(tmp)))

    def read_ledger(self) -> list[dict]:
        import pyarrow.parquet as pq

        file = self.path / "ledger.parquet"
        return pq.read_table(str(file)).to_pylist() if file.exists() else []


def ledger_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("run_id", pa.string()),
            ("kind", pa.string()),  # task | stage | render
            ("stage", pa.string()),
            ("pass", pa.string()),  # e.g. even / odd / layer 0
            ("task", pa.int64()),
            ("tiles", pa.list_(pa.int64())),
            ("boxes", pa.list_(pa.list_(pa.int64()))),  # y, x, h, w per tile (latent px for chess)
            ("worker", pa.string()),
            ("host", pa.string()),
            ("device", pa.string()),
            ("start", pa.float64()),  # unix seconds
            ("end", pa.float64()),
            ("attempts", pa.int64()),
            ("outcome", pa.string()),  # ok | retried | failed
            ("error", pa.string()),
            ("peak_memory", pa.int64()),  # bytes: the worker's peak (CUDA max allocated; CPU peak RSS); null unknown
        ]
    )
