"""End to end through the CLI and the local executor, with tiny SDXL and spandrel models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from farm.cli import main
from farm.executor import prepare, run_local
from pipeline.spec import RenderSpec


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _meta(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.info["tilefarm"])


def test_cli_renders_1024_from_a_256_base_and_reproduces_from_png(tiny_sdxl, tiny_upscaler, tmp_path):
    out = tmp_path / "render.png"
    args = [
        "render",
        "--model",
        str(tiny_sdxl),
        "--upscaler",
        str(tiny_upscaler),
        "--prompt",
        "a castle",
        "--negative",
        "fog",
        "--size",
        "1024x1024",
        "--seed",
        "3",
        "--steps",
        "2",
        "--base-steps",
        "3",
        "--cfg",
        "4",
        "--denoise",
        "0.4",
        "--tile",
        "256",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    with Image.open(out) as image:
        assert image.size == (1024, 1024) and image.mode == "RGB"
    spec = _meta(out)["spec"]
    assert (spec["width"], spec["height"], spec["seed"], spec["prompt"]) == (1024, 1024, 3, "a castle")
    pixels = _pixels(out)
    assert pixels.std() > 1  # not a flat image

    again = tmp_path / "again.png"
    assert main(["render", "--from-png", str(out), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(_pixels(again), pixels)


def test_same_spec_same_pixels_other_seed_other_pixels(small_spec):
    first = run_local(prepare(small_spec)).result.image
    second = run_local(prepare(small_spec)).result.image
    assert first.shape == (1, 3, 512, 512)
    assert (first == second).all()
    other = RenderSpec(**(small_spec.to_dict() | {"seed": small_spec.seed + 1}))
    assert (run_local(prepare(other)).result.image.float() - first.float()).abs().mean() > 1e-3 * 255


def test_toml_spec_with_flag_overrides(small_spec, tmp_path):
    lines = [f"{k} = {json.dumps(v)}" for k, v in small_spec.to_dict().items()]
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text("\n".join(lines + [f'out = "{tmp_path / "from-file.png"}"']) + "\n")
    assert main(["render", str(spec_file), "--seed", "99", "--quiet"]) == 0
    meta = _meta(tmp_path / "from-file.png")["spec"]
    assert meta["seed"] == 99 and meta["tile"] == small_spec.tile and meta["prompt"] == small_spec.prompt


def test_non_square_target(small_spec):
    spec = RenderSpec(**(small_spec.to_dict() | {"width": 768, "height": 512}))
    run = run_local(prepare(spec))
    assert run.plan.k == 4 and (run.plan.base_w, run.plan.base_h) == (192, 128)
    assert run.plan.grid.cols > run.plan.grid.rows
    assert run.result.image.shape == (1, 3, 512, 768)


def test_render_without_upscaler_resizes_the_base(small_spec):
    spec = RenderSpec(**(small_spec.to_dict() | {"upscaler": ""}))
    assert run_local(prepare(spec)).result.image.shape == (1, 3, 512, 512)


def test_farm_demo_console_script(tmp_path):
    out = tmp_path / "demo.png"
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    farm = Path(sys.executable).with_name("farm")
    proc = subprocess.run(
        [str(farm), "demo", "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "random weights" in proc.stderr
    with Image.open(out) as image:
        assert image.size == (1024, 1024)
    assert (tmp_path / "cache" / "tilefarm").is_dir()


def test_prefetching_the_next_tasks_inputs_changes_no_pixel(small_spec, tiny_worker):
    from farm.executor import LocalExecutor, prepare
    from pipeline.render import render

    plan = prepare(small_spec)
    ahead = LocalExecutor(tiny_worker, prefetch=True)
    assert ahead.prefetch and not LocalExecutor(tiny_worker).prefetch  # off by default on a CPU
    assert torch.equal(render(plan, ahead).image, render(plan, LocalExecutor(tiny_worker, prefetch=False)).image)
