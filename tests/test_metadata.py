"""Seeds (random by default, 64-bit, recorded) and PNG metadata others can read (A1111's `parameters`)."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm.cli import build_parser, main
from farm.executor import prepare
from farm.infotext import parameters, quote
from farm.output import save_png
from pipeline.errors import SpecError
from pipeline.geometry.scaffold import make_scaffold
from pipeline.spec import DRAWN_SEEDS, RenderSpec, with_seed

# A1111 modules/infotext_utils.py: re_param_code, re_imagesize and parse_generation_parameters, as written there
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
TINY_TWO_PASS = ["--workflow", "two-pass", "--base-size", "128x128", "--size", "256x256", "--pixel-upscale", "1"]
TINY_TWO_PASS += ["--tile", "256", "--steps", "1", "--base-steps", "1", "--quiet"]


def a1111_parse(text: str) -> dict:
    """A1111's parse_generation_parameters: prompt lines, a 'Negative prompt:' line, then key: value pairs."""
    res, prompt, negative, done_with_prompt = {}, "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)  # A1111's unquote
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def text_chunks(path: Path) -> dict[str, bytes]:
    """PNG chunk type of each text chunk, by keyword (tEXt, iTXt, zTXt), read from the file's bytes."""
    data, found, at = path.read_bytes(), {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            found[data[at + 8 : at + 8 + length].split(b"\0")[0].decode("latin-1")] = kind
        at += 12 + length
    return found


def _seed_printed(err: str) -> int:
    (seed,) = re.findall(r"^seed: (\d+)$", err, re.MULTILINE)
    return int(seed)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_infotext_is_a1111s_format_with_its_quoting():
    spec = RenderSpec(
        model="/models/sd_xl_base_1.0.safetensors",
        prompt="a castle, at dawn: golden",
        negative="fog",
        width=4096,
        height=2304,
        seed=2**64 - 1,
        steps=20,
        base_steps=30,
        cfg=6.5,
        denoise=0.4,
    )
    assert parameters(spec, "sdxl", "0.1.0") == (
        "a castle, at dawn: golden\nNegative prompt: fog\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 18446744073709551615, "
        "Size: 4096x2304, Model: sd_xl_base_1.0, Denoising strength: 0.4, Hires steps: 50, Version: tilefarm 0.1.0"
    )
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote("plain") == "plain"
    assert quote('say "hi",\nbye') == '"say \\"hi\\",\\nbye"' and quote("é, ü") == '"é, ü"'  # non-ASCII kept
    flux = RenderSpec(model="/models/my, flux", prompt="x", workflow="enhance", steps=12, denoise=0.3, cfg=2.2)
    text = parameters(flux, "flux", "0.1.0")
    assert "Negative prompt" not in text and text.startswith("x\nSteps: 40, Sampler: Euler, Schedule type: Simple")
    assert "CFG scale: 1.0, Distilled CFG Scale: 2.2" in text and 'Model: "my, flux"' in text
    assert a1111_parse(text)["Model"] == "my, flux" and "Hires steps" not in text


@pytest.mark.parametrize("prompt", ["a castle, in fog: at dawn", "日本の城、霧の中"], ids=["latin-1", "unicode"])
def test_png_metadata_reads_back_with_a1111s_rule_and_sd_parsers(small_spec, prompt, tmp_path):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    spec = RenderSpec(**(small_spec.to_dict() | {"prompt": prompt, "seed": 2**64 - 2}))
    plan = prepare(spec)
    out = save_png(torch.rand(1, 3, 64, 64), plan, tmp_path / "meta.png")
    chunks = text_chunks(out)
    assert chunks["parameters"] == (b"tEXt" if prompt.isascii() else b"iTXt") and "tilefarm" in chunks
    with Image.open(out) as image:
        text = image.info["parameters"]
        assert RenderSpec.from_dict(json.loads(image.info["tilefarm"])["spec"], "png") == plan.spec
    got = a1111_parse(text)
    expect = {"Prompt": prompt, "Negative prompt": "blurry", "Steps": "3", "Sampler": "DPM++ 2M"}
    expect |= {"Schedule type": "Karras", "CFG scale": "3.0", "Seed": str(2**64 - 2), "Size-1": "512", "Size-2": "512"}
    expect |= {"Model": Path(spec.model).name, "Denoising strength": "0.5", "Hires steps": "4"}
    assert {k: got.get(k) for k in expect} == expect

    info = ParserManager().parse(out)
    assert info is not None and info.generator == Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    assert [p.value for p in sampler.prompts] == [prompt] and [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert sampler.name == "DPM++ 2M" and sampler.model.name == Path(spec.model).name
    assert {k: sampler.parameters[k] for k in ("seed", "steps", "cfg_scale", "scheduler")} == {
        "seed": str(2**64 - 2),
        "steps": "3",
        "cfg_scale": "3.0",
        "scheduler": "Karras",
    }
    assert info.metadata["Size"] == "512x512"


def test_seeds_are_drawn_in_a1111s_range_and_64_bit_seeds_are_taken():
    assert RenderSpec().seed == -1 and build_parser().parse_args(["demo", "--out", "x.png"]).seed == 0
    drawn = {with_seed(RenderSpec(model="m")).seed for _ in range(20)}
    assert len(drawn) > 1 and all(0 <= s < DRAWN_SEEDS for s in drawn)
    assert with_seed(RenderSpec(model="m", seed=5)).seed == 5
    RenderSpec(model="m", seed=2**64 - 1).validate()
    for bad in (2**64, -5):
        with pytest.raises(SpecError, match=f"seed {bad}: must be in"):
            RenderSpec(model="m", seed=bad).validate()
    assert torch.equal(make_scaffold(7, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)))
    # torch's CPU generator keeps a seed's low 32 bits: 7 + 2^32 would draw 7's noise unless the seed is hashed
    assert torch.equal(
        torch.randn(4, generator=torch.Generator().manual_seed(7 + 2**32)), make_scaffold(7, 1, 2, 2).flatten()
    )
    fields = [make_scaffold(s, 4, 8, 8) for s in (0, 7, 7 + 2**32, 2**63, 2**64 - 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(fields) for b in fields[i + 1 :])
    assert torch.equal(fields[-1], make_scaffold(2**64 - 1, 4, 8, 8)) and 0.5 < fields[-1].std() < 1.5
    with pytest.raises(ValueError, match="scaffold seed -1"):
        make_scaffold(-1, 4, 8, 8)  # torch would take -1 as 2^64 - 1: an unresolved seed never reaches it


def test_a_random_seed_is_printed_recorded_and_reproduces_the_image(tiny_sdxl, tmp_path, capsys):
    base = ["render", "--model", str(tiny_sdxl), "--prompt", "a tower, at night", *TINY_TWO_PASS]
    first = tmp_path / "first.png"
    assert main([*base, "--out", str(first)]) == 0  # no --seed: a drawn one
    seed = _seed_printed(capsys.readouterr().err)
    with Image.open(first) as image:
        assert json.loads(image.info["tilefarm"])["spec"]["seed"] == seed
        assert a1111_parse(image.info["parameters"])["Seed"] == str(seed)

    again = tmp_path / "again.png"
    assert main(["render", "--from-png", str(first), "--out", str(again), "--quiet"]) == 0
    assert _seed_printed(capsys.readouterr().err) == seed
    assert np.array_equal(_pixels(again), _pixels(first))

    bare = tmp_path / "bare.png"
    assert main([*base, "--seed", str(seed), "--no-metadata", "--out", str(bare)]) == 0
    assert np.array_equal(_pixels(bare), _pixels(first))
    assert text_chunks(bare) == {}
    with Image.open(bare) as image:
        assert not image.info.get("parameters") and not image.info.get("tilefarm")
    capsys.readouterr()
    assert main(["render", "--from-png", str(bare), "--out", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and "no tilefarm metadata" in err and "--no-metadata" in err

    dry = [*base, "--seed", "-1", "--out", str(tmp_path / "dry.png"), "--dry-run"]
    seeds = set()
    for _ in range(2):
        assert main(dry) == 0
        seeds.add(_seed_printed(capsys.readouterr().err))
    assert len(seeds) == 2  # -1 draws a seed each time (a repeat has chance 1 in 4e9)
