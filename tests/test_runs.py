"""Run folders out of the way: one per render in the state folder, `farm runs`, `--resume ID|PATH|last`."""

import json
import os
from pathlib import Path

import pytest

from farm.cli import main
from farm.rundir import RunDir
from farm.runs import find_run, forget, new_run, recent_runs, runs_root, state_dir
from pipeline.errors import UserError

TINY_TWO_PASS = ["--workflow", "two-pass", "--base-size", "128x128", "--size", "256x256", "--pixel-upscale", "1"]
TINY_TWO_PASS += ["--tile", "256", "--steps", "1", "--base-steps", "1", "--quiet"]


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """An empty state folder of this test's own."""
    monkeypatch.setenv("TILEFARM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_the_state_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TILEFARM_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "tilefarm"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "tilefarm"
    monkeypatch.setenv("TILEFARM_STATE_DIR", str(tmp_path / "mine"))
    assert runs_root() == tmp_path / "mine" / "runs"


def test_rendering_again_to_the_same_output_gets_a_run_of_its_own(tiny_sdxl, state, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "castle.png"
    args = ["render", "--model", str(tiny_sdxl), "--prompt", "a castle", "--seed", "3", *TINY_TWO_PASS]
    assert main([*args, "--out", str(out)]) == 0
    first = out.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["castle.png"]  # nothing beside the output
    assert main([*args, "--out", str(out)]) == 2  # an existing image is kept without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--overwrite"]) == 0  # the finished run does not block it
    assert out.read_bytes() == first and sorted(p.name for p in out_dir.iterdir()) == ["castle.png"]
    capsys.readouterr()

    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    runs = recent_runs()
    assert len(runs) == 2 and all(run.status == "finished" for run in runs)
    assert f"2 run(s) in {state / 'runs'}" in listing
    lines = [line for line in listing.splitlines() if line.startswith(f"| {runs[0].run_id[:8]}")]
    assert len(lines) == 2 and all(f"| finished | {out} | 256x256 |" in line and "done in" in line for line in lines)
    assert listing.index(runs[0].run_id) < listing.index(runs[1].run_id)  # the newest first

    assert main(["ledger", "last"]) == 0
    assert f"run {runs[0].run_id} in {runs[0].path}: 1 finished session(s)" in capsys.readouterr().out
    assert main(["ledger", runs[1].run_id[:-2]]) == 0  # a unique start of an id
    assert f"run {runs[1].run_id}" in capsys.readouterr().out


def test_runs_are_found_by_id_path_or_last_and_an_explicit_run_dir_is_linked(small_spec, state, tmp_path):
    out = tmp_path / "o.png"
    done = new_run(small_spec, out)
    done.finished()
    stopped = new_run(small_spec, out)
    (stopped.path / "owner.json").unlink()  # as a killed render leaves it: no live owner
    elsewhere = new_run(small_spec, out, run_dir=str(tmp_path / "mine"))
    assert (state / "runs" / elsewhere.run_id).resolve() == (tmp_path / "mine").resolve()
    statuses = {run.run_id: run.status for run in recent_runs()}
    assert statuses == {done.run_id: "finished", stopped.run_id: "interrupted", elsewhere.run_id: "running"}

    assert find_run("last", "--resume", last="interrupted") == stopped.path
    assert find_run(done.run_id, "--resume") == done.path
    assert find_run(str(done.path), "--resume") == done.path
    assert find_run(elsewhere.run_id, "--resume").resolve() == (tmp_path / "mine").resolve()
    spec = json.loads((done.path / "spec.json").read_text())
    assert spec["run_id"] == done.run_id and spec["out"] == str(out) and spec["spec"]["seed"] == small_spec.seed
    with pytest.raises(UserError, match="runs start with it"):
        find_run(done.run_id[:4], "--resume")  # three runs started this year

    forget(elsewhere)  # a render refused before any work leaves nothing, here or there
    assert not (tmp_path / "mine").exists() and not os.path.lexists(state / "runs" / elsewhere.run_id)


def test_resume_refuses_a_run_that_is_rendering_now(small_spec, state, tmp_path, capsys):
    live = new_run(small_spec, tmp_path / "o.png")  # owned by this (live) process
    assert main(["render", "--resume", live.run_id]) == 2
    err = capsys.readouterr().err
    assert live.run_id in err and "rendering now" in err and f"pid {os.getpid()}" in err
    assert RunDir.open(live.path)[0].status == "running"
