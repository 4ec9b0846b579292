"""Presets end to end with tiny models: the exact output size each promises, dry runs, layering, naming."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from farm.cli import _spec_for_render, build_parser, main
from farm.executor import prepare, run_local
from farm.presets import PRESETS, find_preset
from pipeline.errors import UserError
from pipeline.render import upscale_latents
from pipeline.spec import RenderSpec

FAST = ["--base-steps", "2", "--steps", "1", "--tile", "256", "--quiet"]


def _image(path):
    with Image.open(path) as image:
        return image.size, json.loads(image.info["tilefarm"])["spec"], np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 128x96 RGB input image."""
    path = tmp_path_factory.mktemp("inputs") / "harbour.png"
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_sdxl_4k_renders_exactly_3840x2160(tiny_sdxl, tiny_upscaler, tmp_path, capsys):
    # a tiny base keeps the diffusion cheap: 240x136 -> latent 2x -> 480x272 -> 4x model -> 1920x1088
    # -> exact 3840x2160 (resized to 3840x2176, 16 rows cropped and reported)
    out = tmp_path / "4k.png"
    args = ["render", "--preset", "sdxl-4k", "--model", str(tiny_sdxl), "--upscaler", str(tiny_upscaler)]
    args += ["--prompt", "a galaxy", "--base-size", "240x136", *FAST, "--out", str(out)]
    assert main(args) == 0
    size, spec, pixels = _image(out)
    assert size == (3840, 2160)
    assert (spec["workflow"], spec["base_cfg"], spec["cfg"], spec["sampler"]) == (
        "two-pass",
        5.5,
        5.0,
        "dpmpp_2m_karras",
    )
    assert spec["pixel_upscale"] == 4 and pixels.std() > 1


def test_hires_fix_renders_2048x1152(tiny_sdxl, tmp_path):
    out = tmp_path / "hires.png"
    args = ["render", "--preset", "hires-fix", "--model", str(tiny_sdxl), "--prompt", "a skyline"]
    assert main([*args, "--base-size", "256x144", *FAST, "--out", str(out)]) == 0
    size, spec, _ = _image(out)
    assert size == (2048, 1152) and spec["denoise"] == 0.55 and spec["pixel_upscale"] == 1


def test_upscale_enhance_doubles_the_input_with_a_lora(tiny_flux, tiny_upscaler, flux_lora, photo, tmp_path):
    args = ["render", "--preset", "upscale-enhance:aggressive", "--model", str(tiny_flux), "--lora", str(flux_lora)]
    args += ["--upscaler", str(tiny_upscaler), "--input", str(photo), "--steps", "2", "--quiet"]
    assert main([*args, "--out-dir", str(tmp_path), "--prefix", "enh"]) == 0
    (out,) = tmp_path.glob("*.png")
    assert re.fullmatch(r"enh_harbour_\d{8}-\d{6}\.png", out.name)
    size, spec, pixels = _image(out)
    assert size == (256, 192)  # 2x the 128x96 input, aspect kept
    assert (spec["lora_strength"], spec["lora_text_strength"], spec["denoise"]) == (0.8, 0.8, 0.5)
    assert (spec["cfg"], spec["sampler"], spec["input"]) == (2.2, "flow_euler", str(photo))
    assert pixels.std() > 1


def test_two_pass_noise_comes_from_the_scaffold_and_is_deterministic(tiny_sdxl):
    sizes = dict(base_width=128, base_height=128, width=256, height=256, tile=256, pixel_upscale=1)
    spec = RenderSpec(model=str(tiny_sdxl), workflow="two-pass", prompt="x", steps=1, base_steps=2, seed=5, **sizes)
    plan = prepare(spec)
    assert (plan.k, plan.latent_h, plan.latent_w, len(plan.grid.tiles)) == (2, 32, 32, 1)  # one refine fits
    first, second = run_local(plan).result, run_local(prepare(spec)).result
    assert first.image.shape == (1, 3, 256, 256) and torch.equal(first.image, second.image)
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert torch.equal(upscale_latents(x, 2), x.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_enhance_snaps_an_odd_input_size_and_says_so(tiny_flux, tmp_path):
    path = tmp_path / "odd.png"
    Image.new("RGBA", (100, 75), (10, 20, 30, 128)).save(path)
    plan = prepare(RenderSpec(model=str(tiny_flux), workflow="enhance", input=str(path), tile=256))
    assert (plan.spec.width, plan.spec.height) == (208, 144)  # 200x150 to multiples of 16
    text = plan.describe()
    assert "input 100x75 px x2 = 200x150 px, snapped to 208x144" in text and "nothing cropped" in text
    assert "alpha channel is dropped" in text


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_prints_the_plan_and_loads_nothing(preset, tiny_sdxl, tiny_flux, photo, tmp_path, capsys, monkeypatch):
    import farm.executor

    def no_loading(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(farm.executor, "TileWorker", no_loading)
    model = tiny_flux if PRESETS[preset].family == "flux" else tiny_sdxl
    args = ["render", "--preset", preset, "--model", str(model), "--prompt", "x", "--dry-run"]
    args += ["--input", str(photo)] if preset == "upscale-enhance" else ["--tile", "256"]
    if preset == "top-down":
        args += ["--size", "1024x1024"]
    assert main([*args, "--out", str(tmp_path / "never.png")]) == 0
    plan = capsys.readouterr().out
    assert f"{PRESETS[preset].fields['workflow']} workflow" in plan and "chess grid" in plan
    assert re.search(r"estimated (UNet|transformer) calls: .*= \d+", plan)
    expected = {"sdxl-4k": "3840x2160", "hires-fix": "2048x1152", "upscale-enhance": "256x192", "top-down": "1024x1024"}
    assert f"output {expected[preset]} px" in plan
    assert list(tmp_path.iterdir()) == []


def test_presets_command_lists_presets_and_variants(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert f"| {name} |" in text
    for variant in ("sdxl-4k:high-detail", "sdxl-4k:extreme-8k", "upscale-enhance:conservative"):
        assert variant in text


def test_preset_is_the_lowest_layer(tiny_sdxl, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('steps = 7\ndenoise = 0.4\nout = "x.png"\n')
    args = build_parser().parse_args(
        ["render", str(spec_file), "--preset", "sdxl-4k:high-detail", "--model", str(tiny_sdxl), "--denoise", "0.3"]
    )
    spec, preset, out = _spec_for_render(args)
    assert preset.name == "sdxl-4k" and out == "x.png"
    assert (spec.base_width, spec.base_height, spec.cfg) == (1024, 576, 5.0)  # from the preset and its variant
    assert (spec.steps, spec.denoise) == (7, 0.3)  # the file over the preset, the flag over the file


def test_variants(tmp_path):
    assert find_preset("upscale-enhance")[1] == "balanced"
    values = PRESETS["upscale-enhance"].values("conservative")
    assert (values["lora_strength"], values["denoise"], values["steps"]) == (0.3, 0.15, 8)
    assert PRESETS["sdxl-4k"].values("extreme-8k")["width"] == 12288
    with pytest.raises(UserError, match="no variant 'fast'.*sdxl-4k:exact-4k"):
        find_preset("sdxl-4k:fast")
