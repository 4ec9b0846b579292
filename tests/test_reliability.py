"""Reliability: run folders, resume after SIGKILL, the Parquet ledger, NaN results retried then refused."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm.cli import main
from farm.executor import prepare, run_local
from farm.rundir import RunDir
from farm.runs import recent_runs
from pipeline.errors import RenderError

FARM = str(Path(sys.executable).with_name("farm"))


def _flags(spec, **extra) -> list[str]:
    flags = {
        "--model": spec.model,
        "--upscaler": spec.upscaler,
        "--prompt": spec.prompt,
        "--negative": spec.negative,
        "--size": f"{spec.width}x{spec.height}",
        "--seed": str(spec.seed),
        "--steps": "2",
        "--base-steps": "3",
        "--cfg": str(spec.cfg),
        "--denoise": str(spec.denoise),
        "--tile": str(spec.tile),
        "--native": str(spec.native),
        "--upscale-tile": str(spec.upscale_tile),
        "--tile-batch": "1",
        "--tiling": spec.tiling,
    } | extra
    args = []
    for flag, value in flags.items():
        args += [flag] if value is None else [flag, value]
    return args


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _kill_when(args: list[str], marker, timeout: float = 240) -> None:
    """Start `farm render ARGS`, SIGKILL it as soon as marker() is true."""
    proc = subprocess.Popen([FARM, "render", *args, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not marker():
        assert proc.poll() is None, f"the render ended before the kill point: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_of(out: Path) -> RunDir:
    """The run folder (in the state folder) of the render that wrote `out`."""
    (folder,) = [run.path for run in recent_runs() if run.info["out"] == str(out)]
    return RunDir.open(folder)[0]


@pytest.fixture(scope="module")
def reference(small_spec, tmp_path_factory):
    """The uninterrupted render (PNG) and its run folder."""
    out = tmp_path_factory.mktemp("reference") / "ref.png"
    assert main(["render", *_flags(small_spec), "--out", str(out), "--quiet"]) == 0
    return out


def test_a_render_killed_in_the_odd_pass_resumes_to_the_same_image(small_spec, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFARM_STATE_DIR", str(tmp_path / "state"))  # the killed render is the only run
    out = tmp_path / "killed.png"
    plan = prepare(small_spec)
    first_odd = len(plan.grid.even)  # batches of 1: task ids of the odd pass start after the even ones
    runs = tmp_path / "state" / "runs"
    _kill_when([*_flags(small_spec), "--out", str(out)], lambda: any(runs.glob(f"*/state/chess.1.{first_odd}.*")))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # nothing beside the output
    (folder,) = runs.iterdir()
    kept = {p.name for p in (folder / "state").iterdir()}
    assert f"chess.1.{first_odd}.safetensors" in kept
    # the encode's tiles and GroupNorm statistics are kept; the decode's statistics are recomputed
    assert {"encode.1.0.safetensors", "encode stats.1.0.safetensors"} <= kept
    assert len([k for k in kept if k.startswith("chess.")]) < len(plan.grid.tiles)  # stopped mid-pass
    assert RunDir.open(folder)[0].status == "interrupted"
    assert main(["render", "--resume", "last", "--quiet"]) == 0
    assert np.array_equal(_pixels(out), _pixels(reference))
    run, _, _ = RunDir.open(folder)
    chess = [r for r in run.rows if r["kind"] == "task" and r["stage"] == "chess"]
    assert {r["task"] for r in chess} == set(range(len(plan.grid.tiles)))  # every batch ran once, across both runs
    assert not (folder / "state").exists() and run.status == "finished"  # the stored units are dropped


def test_a_blended_render_killed_mid_step_resumes_to_the_same_image(small_spec, tmp_path):
    spec = replace(small_spec, tiling="blend")
    ref = tmp_path / "ref.png"
    assert main(["render", *_flags(spec), "--out", str(ref), "--run-dir", str(tmp_path / "ref.run"), "--quiet"]) == 0
    tiles = len(prepare(spec).grid.tiles)  # batches of 1: one task per tile and step
    ids = sorted(r["task"] for r in RunDir.open(tmp_path / "ref.run")[0].rows if r.get("stage") == "blend")
    first, second = ids[:tiles], ids[tiles:]  # the graph's blend tasks, step by step
    out = tmp_path / "killed.png"
    state = tmp_path / "killed.run" / "state"
    flags = [*_flags(spec), "--out", str(out), "--run-dir", str(tmp_path / "killed.run")]
    _kill_when(flags, lambda: (state / f"render.1.{second[3]}.safetensors").exists())
    kept = {p.name for p in state.iterdir()}
    assert {f"render.1.{i}.safetensors" for i in first} <= kept  # step 1 finished, step 2 had begun
    assert len({f"render.1.{i}.safetensors" for i in second} & kept) < tiles
    assert main(["render", "--resume", str(tmp_path / "killed.run"), "--quiet"]) == 0
    assert np.array_equal(_pixels(out), _pixels(ref))
    run, _, _ = RunDir.open(tmp_path / "killed.run")
    blend = [r for r in run.rows if r["kind"] == "task" and r["stage"] == "blend"]
    assert len(blend) == 2 * tiles  # each tile of each step predicted once, across both runs


def test_a_render_killed_in_the_detailer_resumes_to_the_same_image(small_spec, tiny_sam3, tmp_path):
    concept = ["--detector", str(tiny_sam3), "--concept", "face;threshold=0;selection=all;max_objects=6"]
    ref = tmp_path / "ref.png"
    assert main(["render", *_flags(small_spec), *concept, "--out", str(ref), "--quiet"]) == 0
    out = tmp_path / "killed.png"
    state = tmp_path / "killed.run" / "state"  # an explicit --run-dir, resumed by its path
    flags = [*_flags(small_spec), *concept, "--out", str(out), "--run-dir", str(tmp_path / "killed.run")]
    _kill_when(flags, lambda: (state / "detail.1.1.safetensors").exists())
    assert not out.exists() and not (state / "encode.1.0.safetensors").exists()
    assert main(["render", "--resume", str(tmp_path / "killed.run"), "--quiet"]) == 0
    assert np.array_equal(_pixels(out), _pixels(ref))


def test_the_ledger_has_every_batch_and_adds_up_to_the_wall_time(small_spec, reference, capsys):
    from farm.ledger import summary

    run = _run_of(reference)
    plan = prepare(small_spec)
    rows = run.rows
    by_stage = {}
    for r in rows:
        if r["kind"] == "task":
            by_stage.setdefault(r["stage"], []).append(r)
    assert len(by_stage["chess"]) == len(plan.grid.tiles)  # batches of 1
    assert {tuple(t) for r in by_stage["chess"] for t in zip(r["tiles"], map(tuple, r["boxes"]), strict=True)} == {
        (t.id, (t.y, t.x, t.h, t.w)) for t in plan.grid.tiles
    }
    assert by_stage["upscale"] and by_stage["decode"] and len(by_stage["base"]) == 2 * small_spec.base_steps + 1
    assert all(r["outcome"] == "ok" and r["attempts"] == 1 and r["end"] >= r["start"] for r in rows)
    wall = sum(r["end"] - r["start"] for r in rows if r["kind"] == "render")
    stages = sum(r["end"] - r["start"] for r in rows if r["kind"] == "stage")
    assert 0.95 * wall <= stages <= wall
    assert main(["ledger", run.run_id]) == 0
    text = capsys.readouterr().out
    assert "time per stage" in text and "| refine |" in text and "retried or failed tasks: 0" in text
    assert summary(run) in text


def test_a_nan_tile_is_retried_once_and_the_image_is_unchanged(small_spec, tmp_path):
    clean = run_local(prepare(small_spec)).result.image
    rows = []
    run = run_local(prepare(small_spec), faults=[("chess", 3)], record=rows.append)
    assert torch.equal(run.result.image, clean)
    retried = [r for r in rows if r["kind"] == "task" and r["outcome"] == "retried"]
    assert [(r["stage"], r["task"], r["attempts"]) for r in retried] == [("chess", 3, 2)]
    assert "NaN/Inf" in retried[0]["error"]


def test_a_tile_that_stays_nan_stops_the_render_naming_it(small_spec):
    with pytest.raises(RenderError) as err:
        run_local(prepare(small_spec), faults=[("chess", 5), ("chess", 5)])
    message = str(err.value)
    plan = prepare(small_spec)
    tiles = ", ".join(str(t.id) for t in (*plan.even_batches, *plan.odd_batches)[5])
    assert "chess task 5" in message and f"tiles {tiles}" in message and "local (cpu)" in message
    assert "NaN/Inf on 2 attempts" in message


def test_resume_refuses_spec_changes_and_finished_renders(reference, tmp_path, capsys):
    run = _run_of(reference)
    assert main(["render", "--resume", run.run_id, "--steps", "9"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["render", "--resume", str(run.path)]) == 2
    assert "is finished" in capsys.readouterr().err
    assert main(["render", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_a_result_is_nonfinite_exactly_when_a_value_is_nan_or_inf():
    from pipeline.graph.health import nonfinite

    finite = [torch.rand(2, 3, 8, 8), torch.full((64,), 3e38), torch.full((64,), 6e4).half(), torch.ones(4).bfloat16()]
    assert not any(nonfinite({"a": (t,)}) for t in finite)  # values whose sum would overflow are finite
    assert not nonfinite(torch.zeros(0, 3))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.rand(1, 3, 16, 16).to(dtype)
            t[0, 2, 15, 15] = bad
            assert nonfinite([torch.zeros(2), t]), (dtype, bad)
    assert not nonfinite((torch.zeros(3, dtype=torch.int64), "text", None))
