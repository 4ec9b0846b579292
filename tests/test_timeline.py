"""`farm ledger RUN --plot timeline.png`: one lane per worker, each task a bar coloured by its stage."""

import pytest
from PIL import Image

from farm.cli import main
from farm.rundir import RunDir
from farm.timeline import plot_timeline
from pipeline.errors import UserError

TINY_TWO_PASS = ["--workflow", "two-pass", "--base-size", "128x128", "--size", "256x256", "--pixel-upscale", "1"]
TINY_TWO_PASS += ["--tile", "128", "--steps", "1", "--base-steps", "1", "--quiet"]


def _row(kind: str, stage: str, worker: str, start: float, end: float, outcome: str = "ok") -> dict:
    return {"kind": kind, "stage": stage, "worker": worker, "start": start, "end": end, "outcome": outcome}


def test_one_lane_per_worker_in_natural_order(tmp_path):
    t0 = 1000.0
    rows = [
        _row("render", "render", "driver", t0, t0 + 10),
        _row("stage", "upscale", "driver", t0, t0 + 2),
        _row("stage", "refine", "driver", t0 + 2, t0 + 10),
        _row("task", "upscale", "actor 10", t0, t0 + 2),
        _row("task", "refine", "actor 2", t0 + 2, t0 + 6),
        _row("task", "refine", "actor 10", t0 + 2, t0 + 9, outcome="retried"),
        _row("task", "refine", "actor 2", t0 + 6, t0 + 10),
    ]
    path = tmp_path / "timeline.png"
    lanes = plot_timeline(rows, path, title="two actors")
    assert lanes == ["actor 2", "actor 10"]  # one per distinct worker; the driver draws no lane
    assert not [p for p in tmp_path.iterdir() if p.name != "timeline.png"]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 100
        colours = set(image.convert("RGB").getdata())
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # C0 (upscale), C1 (refine): a colour per stage


@pytest.mark.parametrize("name", ["timeline.jpg", "timeline", "missing/timeline.png"])
def test_a_path_that_is_not_a_png_in_an_existing_folder_is_refused(tmp_path, name):
    rows = [_row("task", "refine", "local", 0.0, 1.0)]
    with pytest.raises(UserError, match="--plot"):
        plot_timeline(rows, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_a_ledger_without_tasks_is_refused(tmp_path):
    with pytest.raises(UserError, match="no task rows"):
        plot_timeline([_row("stage", "base", "driver", 0.0, 1.0)], tmp_path / "t.png")


def test_farm_ledger_plot_draws_a_real_run(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "castle.png"
    args = ["render", "--model", str(tiny_sdxl), "--prompt", "a castle", "--seed", "3", *TINY_TWO_PASS]
    assert main([*args, "--out", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    run = RunDir.open(tmp_path / "run")[0]
    workers = {r["worker"] for r in run.rows if r["kind"] == "task"}
    assert workers == {"local"}
    capsys.readouterr()

    assert main(["ledger", run.run_id, "--plot", str(tmp_path / "timeline.txt")]) == 2
    err = capsys.readouterr()
    assert ".png" in err.err and not err.out  # refused before the summary is printed

    plot = tmp_path / "timeline.png"
    assert main(["ledger", run.run_id, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "time per stage" in text  # the summary is still printed
    assert f"timeline: {plot} (1 lane(s): local)" in text
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 600
        colours = set(image.convert("RGB").getdata())
    stages = list(dict.fromkeys(r["stage"] for r in run.rows if r["kind"] in ("stage", "task")))
    assert len(stages) >= 3 and (31, 119, 180) in colours and (255, 127, 14) in colours  # C0, C1: stage colours
