"""Bad input: a clear message naming the input, exit code 2, no traceback, and no output file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from farm.cli import main


def bad_images(folder: Path) -> dict[str, str]:
    """Input images tilefarm must refuse, and one good one, made cheaply."""
    from PIL import Image

    folder.mkdir()
    good = folder / "good.png"
    Image.new("RGB", (64, 48), (200, 100, 50)).save(good)
    files = {"image": good, "text": folder / "notes.png", "empty": folder / "empty.png"}
    files["text"].write_text("these are notes, not pixels")
    files["empty"].write_bytes(b"")
    files["truncated"] = folder / "truncated.png"
    files["truncated"].write_bytes(good.read_bytes()[:60])
    files["cmyk"] = folder / "print.jpg"
    Image.new("CMYK", (64, 48)).save(files["cmyk"])
    files["deep"] = folder / "deep.png"
    Image.new("I;16", (64, 48)).save(files["deep"])
    files["tall"] = folder / "tall.png"
    Image.new("L", (1, 70000)).save(files["tall"])  # a side beyond the limit in a 70 kB file
    return {f"{name}_image": str(path) for name, path in files.items()}


def single_files(folder: Path, tiny_flux: Path) -> dict[str, str]:
    """Single model files tilefarm must refuse or check: an SD1.5 checkpoint, non-safetensors, Flux parts."""
    import torch
    from ldm_layout import flux_to_bfl, vae_to_ldm
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    out = {name: folder / name for name in ("sd15.safetensors", "fake.safetensors", "model.ckpt", "odd.safetensors")}
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
        },
        str(out["sd15.safetensors"]),
    )
    out["fake.safetensors"].write_text("not tensors at all")
    out["model.ckpt"].write_bytes(b"x")
    save_file({"foo.bar.weight": torch.zeros(2)}, str(out["odd.safetensors"]))
    weights = {
        name: load_file(str(next((tiny_flux / name).glob("*.safetensors"))))
        for name in os.listdir(tiny_flux)
        if (tiny_flux / name).is_dir() and any((tiny_flux / name).glob("*.safetensors"))
    }
    parts = {
        "flux1-tiny.safetensors": flux_to_bfl(weights["transformer"]),
        "ae.safetensors": vae_to_ldm(weights["vae"], 4),
        "clip_l.safetensors": {
            f"text_model.{k.removeprefix('text_model.')}": v for k, v in weights["text_encoder"].items()
        },
        "t5.safetensors": weights["text_encoder_2"],
        "t5_scaled_no_scales.safetensors": weights["text_encoder_2"] | {"scaled_fp8": torch.empty(0)},
    }
    for name, state in parts.items():
        out[name] = folder / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(out[name]))
    names = dict(sd15="sd15.safetensors", fake_st="fake.safetensors", ckpt="model.ckpt", odd="odd.safetensors")
    names |= dict(flux_bfl="flux1-tiny.safetensors", flux_ae="ae.safetensors", flux_clip="clip_l.safetensors")
    names |= dict(flux_t5="t5.safetensors", t5_noscale="t5_scaled_no_scales.safetensors")
    return {key: str(out[name]) for key, name in names.items()} | {
        "t5_tok": str(tiny_flux / "tokenizer_2" / "tokenizer.json")
    }


@pytest.fixture
def files(tmp_path, tiny_sdxl, tiny_upscaler, tiny_sam3, evil_pickle, tiny_flux, flux_lora):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny_upscaler.read_bytes()[:100])
    evil, _ = evil_pickle
    existing = tmp_path / "out" / "exists.png"
    existing.parent.mkdir()
    existing.write_bytes(b"keep me")
    return (
        bad_images(tmp_path / "images")
        | single_files(tmp_path / "single", tiny_flux)
        | {
            "flux": str(tiny_flux),
            "flux_lora": str(flux_lora),
            "model": str(tiny_sdxl),
            "sam3": str(tiny_sam3),
            "upscaler": str(tiny_upscaler),
            "corrupt": str(corrupt),
            "evil": str(evil),
            "missing": str(tmp_path / "no-such-model"),
            "existing": str(existing),
            "tmp": tmp_path,
        }
    )


FLUX_PARTS = {"--model": "{flux_bfl}", "--vae": "{flux_ae}", "--clip-l": "{flux_clip}", "--t5": "{flux_t5}"}
FLUX_PARTS["--t5-tokenizer"] = "{t5_tok}"
# (case id, flags replacing the good ones, text the message must contain)
CASES = [
    ("tiling-unknown", {"--tiling": "mosaic"}, ["tiling 'mosaic'", "blend, chess, chess-original"]),
    ("decode-norm-unknown", {"--decode-norm": "pooled"}, ["decode_norm 'pooled'", "tile, exact"]),
    ("sd15-checkpoint", {"--model": "{sd15}"}, ["{sd15}", "Stable Diffusion 1.x/2.x", "SDXL and Flux models only"]),
    ("model-not-safetensors", {"--model": "{fake_st}"}, ["{fake_st}", "not a readable .safetensors"]),
    ("model-pickle-checkpoint", {"--model": "{ckpt}"}, ["{ckpt}", "not .safetensors", "can run code"]),
    ("unknown-single-file", {"--model": "{odd}"}, ["{odd}", "neither an SDXL nor a Flux", "foo.bar"]),
    ("flux-without-its-parts", {"--model": "{flux_bfl}"}, ["needs --vae", "--comfy-models"]),
    (
        "sdxl-vae-as-flux-vae",
        FLUX_PARTS | {"--vae": "{model}/vae/diffusion_pytorch_model.safetensors"},
        ["{model}/vae/diffusion_pytorch_model.safetensors", "4-channel", "16-channel"],
    ),
    ("clip-file-as-t5", FLUX_PARTS | {"--t5": "{flux_clip}"}, ["--t5 {flux_clip}", "CLIP-L", "not a T5"]),
    (
        "scaled-fp8-without-scales",
        FLUX_PARTS | {"--t5": "{t5_noscale}"},
        ["{t5_noscale}", "scaled fp8", "scale_weight"],
    ),
    ("flux-part-on-sdxl", {"--vae": "{flux_ae}"}, ["--vae", "for a Flux transformer file", "{model} is a folder"]),
    (
        "comfy-models-missing",
        FLUX_PARTS | {"--comfy-models": "{missing}", "--vae": "ae2.safetensors"},
        ["{missing}", "not a folder"],
    ),
    ("size-not-multiple-of-8", {"--size": "1030x1024"}, ["1030", "multiple of 8", "1024 or 1032"]),
    ("size-zero", {"--size": "0x1024"}, ["0x1024", "positive"]),
    ("size-negative", {"--size": "-512x512"}, ["-512x512", "positive"]),
    ("size-garbage", {"--size": "big"}, ["'big'", "WIDTHxHEIGHT"]),
    ("size-absurd-side", {"--size": "100000x8"}, ["100000x8", "at most"]),
    ("size-absurd-memory", {"--size": "65536x65536"}, ["65536x65536", "GiB of host memory"]),
    ("missing-model", {"--model": "{missing}"}, ["{missing}", "does not exist"]),
    ("model-not-diffusers", {"--model": "{tmp}"}, ["{tmp}", "model_index.json"]),
    ("model-wrong-architecture", {"--model": "{upscaler}"}, ["{upscaler}", "neither an SDXL nor a Flux"]),
    (
        "upscaler-wrong-architecture",
        {"--upscaler": "{model}/unet/diffusion_pytorch_model.safetensors"},
        ["{model}/unet/diffusion_pytorch_model.safetensors", "not an architecture spandrel knows"],
    ),
    ("missing-upscaler", {"--upscaler": "{missing}.pth"}, ["{missing}.pth", "does not exist"]),
    ("corrupt-safetensors", {"--upscaler": "{corrupt}"}, ["{corrupt}", "not a readable .safetensors"]),
    ("pickle-with-code", {"--upscaler": "{evil}"}, ["{evil}", "could run code", ".safetensors"]),
    ("denoise-zero", {"--denoise": "0"}, ["denoise 0.0", "(0, 1]"]),
    ("denoise-above-one", {"--denoise": "1.5"}, ["denoise 1.5", "(0, 1]"]),
    ("steps-zero", {"--steps": "0"}, ["steps 0", "at least 1"]),
    ("tile-larger-than-target", {"--tile": "1024"}, ["tile 1024", "larger than the target 512x512"]),
    ("tile-not-multiple", {"--tile": "100"}, ["tile 100", "multiple of 8"]),
    ("cfg-below-one", {"--cfg": "0.5"}, ["cfg 0.5", "[1, 30]"]),
    ("unknown-sampler", {"--sampler": "magic"}, ["'magic'", "dpmpp_2m_karras"]),
    ("flux-sampler-on-sdxl", {"--sampler": "flow_euler"}, ["'flow_euler'", "FLUX sampler", "dpmpp_2m_karras"]),
    ("missing-lora", {"--lora": "{missing}.safetensors"}, ["{missing}.safetensors", "does not exist"]),
    ("lora-strength-absurd", {"--lora-strength": "50"}, ["lora_strength 50.0", "[-10, 10]"]),
    ("existing-output", {"--out": "{existing}"}, ["{existing}", "--overwrite"]),
    ("output-not-png", {"--out": "{tmp}/x.jpg"}, ["x.jpg", ".png"]),
    ("output-folder-missing", {"--out": "{tmp}/nowhere/x.png"}, ["nowhere", "does not exist"]),
    ("output-folder-unwritable", {"--out": "/sys/render.png"}, ["/sys/render.png", "not writable"]),
    ("unreachable-cluster", {"--cluster": "127.0.0.1:9"}, ["127.0.0.1:9", "cannot reach a Ray cluster"]),
    ("cluster-address-garbage", {"--cluster": "nowhere"}, ["'nowhere'", "HOST:PORT"]),
    ("workers-zero", {"--cluster": "auto", "--workers": "0"}, ["--workers 0", "at least 1"]),
    ("workers-without-cluster", {"--workers": "2"}, ["--cluster"]),
    (
        "concept-unknown-selection",
        {"--detector": "{sam3}", "--concept": "face;selection=biggest"},
        ["'face'", "'biggest'", "largest, center, first, all"],
    ),
    (
        "concept-threshold-above-one",
        {"--detector": "{sam3}", "--concept": "face;threshold=1.5"},
        ["'face'", "threshold 1.5", "[0, 1]"],
    ),
    (
        "concept-layer-out-of-range",
        {"--detector": "{sam3}", "--concept": "eyes;layer=7"},
        ["'eyes'", "layer 7", "0..5"],
    ),
    ("concept-without-name", {"--detector": "{sam3}", "--concept": ";layer=1"}, ["no name", 'name = "face"']),
    ("concept-bad-key", {"--detector": "{sam3}", "--concept": "face;strength=2"}, ["'strength=2'", "denoise"]),
    ("concepts-without-detector", {"--concept": "face"}, ["no detector", "--detector"]),
    (
        "detector-not-sam3",
        {"--detector": "{model}/text_encoder", "--concept": "face"},
        ["{model}/text_encoder", "not SAM3"],
    ),
    ("detector-missing", {"--detector": "{missing}", "--concept": "face"}, ["{missing}", "does not exist"]),
    ("half-precision-on-cpu", {"--precision": "fp16", "--device": "cpu"}, ["fp16", "GPU"]),
    ("unknown-preset", {"--preset": "sdxl-8k"}, ["'sdxl-8k'", "sdxl-4k", "upscale-enhance", "farm presets"]),
    ("unknown-preset-variant", {"--preset": "upscale-enhance:wild"}, ["'wild'", "upscale-enhance:aggressive"]),
    ("flux-model-on-sdxl-preset", {"--preset": "sdxl-4k", "--model": "{flux}"}, ["'sdxl-4k'", "{flux}", "FLUX model"]),
    (
        "sdxl-model-on-flux-preset",
        {"--preset": "upscale-enhance", "--input": "{image_image}"},
        ["'upscale-enhance'", "FLUX models", "{model} is a SDXL model"],
    ),
    ("lora-of-the-other-family", {"--lora": "{flux_lora}"}, ["{flux_lora}", "does not fit the SDXL model"]),
    ("unknown-workflow", {"--workflow": "three-pass"}, ["'three-pass'", "two-pass"]),
    ("two-pass-without-base-size", {"--workflow": "two-pass"}, ["two-pass", "--base-size"]),
    ("input-on-top-down", {"--input": "{image_image}"}, ["{image_image}", "--preset upscale-enhance"]),
    ("enhance-without-input", {"--workflow": "enhance"}, ["--input"]),
    ("input-missing", {"--workflow": "enhance", "--input": "{missing}.png"}, ["{missing}.png", "does not exist"]),
    ("input-not-an-image", {"--workflow": "enhance", "--input": "{text_image}"}, ["{text_image}", "not an image"]),
    ("input-empty", {"--workflow": "enhance", "--input": "{empty_image}"}, ["{empty_image}", "empty (0 bytes)"]),
    ("input-truncated", {"--workflow": "enhance", "--input": "{truncated_image}"}, ["{truncated_image}", "damaged"]),
    ("input-cmyk", {"--workflow": "enhance", "--input": "{cmyk_image}"}, ["{cmyk_image}", "CMYK", "RGB"]),
    ("input-16-bit", {"--workflow": "enhance", "--input": "{deep_image}"}, ["{deep_image}", "16", "8 bits"]),
    ("input-huge", {"--workflow": "enhance", "--input": "{tall_image}"}, ["{tall_image}", "1x70000", "at most 32768"]),
    ("out-and-out-dir", {"--out-dir": "{tmp}"}, ["--out", "--out-dir", "not both"]),
    ("unknown-prompt-style", {"--prompt-style": "webui"}, ["prompt_style 'webui'", "comfyui, a1111"]),
    ("prompt-editing-comfyui", {"--prompt": "a [cat:dog:0.5]"}, ["prompt: '[cat:dog:0.5]'", "prompt editing"]),
    ("and-in-a1111", {"--prompt-style": "a1111", "--prompt": "a cat AND a dog"}, ["prompt: 'AND'", "composable"]),
    ("lora-tag-comfyui", {"--prompt": "a <lora:x:1> cat"}, ["prompt: '<lora:x:1>'", "--lora FILE"]),
    ("lora-tag-a1111", {"--prompt-style": "a1111", "--negative": "<lora:x:1>"}, ["negative: '<lora:x:1>'", "--lora"]),
    ("unbalanced-comfyui", {"--prompt": "a (fox"}, ["prompt: '(' at character 3", "never closed"]),
    ("seed-2-to-the-64", {"--seed": "18446744073709551616"}, ["seed 18446744073709551616", "[0, 2^64 - 1]"]),
    ("seed-negative", {"--seed": "-5"}, ["seed -5", "-1 for a random seed"]),
]


@pytest.mark.parametrize("case,flags,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(files, case, flags, expect, capsys):
    out = files["tmp"] / "out" / "render.png"
    good = {
        "--model": files["model"],
        "--upscaler": files["upscaler"],
        "--prompt": "x",
        "--size": "512x512",
        "--tile": "128",
        "--native": "128",
        "--steps": "1",
        "--base-steps": "1",
        "--out": str(out),
    }
    args = ["render", "--quiet"]
    for flag, value in (good | flags).items():
        args += [f"{flag}={value.format(**files)}"]
    before = sorted(p.name for p in out.parent.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    err = re.sub(r"\Aseed: \d+\n", "", err)  # a refusal while loading models comes after the render's seed
    assert err.startswith("farm: error: ") and "Traceback" not in err
    for text in expect:
        assert text.format(**files) in err, err
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no partial files either
    assert not (files["tmp"] / "pwned").exists()
    if case == "existing-output":
        assert Path(files["existing"]).read_bytes() == b"keep me"


def test_spec_file_errors_name_the_file(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('prompt = "x"\nwidht = 1024\n')
    assert main(["render", str(spec), "--out", str(tmp_path / "a.png")]) == 2
    assert "widht" in capsys.readouterr().err
    spec.write_text('prompt = "x\n')
    assert main(["render", str(spec), "--out", str(tmp_path / "a.png")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    spec.write_text('steps = "many"\n')
    assert main(["render", str(spec), "--out", str(tmp_path / "a.png")]) == 2
    assert "steps must be a whole number" in capsys.readouterr().err
    not_png = tmp_path / "fake.png"
    not_png.write_text("hello")
    assert main(["render", "--from-png", str(not_png), "--out", str(tmp_path / "b.png")]) == 2
    assert str(not_png) in capsys.readouterr().err
    assert sorted(tmp_path.glob("*.png")) == [not_png]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    farm = Path(sys.executable).with_name("farm")
    proc = subprocess.run(
        [
            str(farm),
            "render",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
            "--size",
            "1024x1024",
            "--out",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_resume_of_an_unknown_run_or_of_last_with_none_interrupted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TILEFARM_STATE_DIR", str(tmp_path / "state"))
    assert main(["render", "--resume", "20991231-nosuchrun"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("farm: error: --resume 20991231-nosuchrun: no run with that id") and "farm runs" in err
    assert main(["render", "--resume", "last"]) == 2
    err = capsys.readouterr().err
    assert "--resume last: no interrupted run in" in err and str(tmp_path / "state") in err
    assert main(["ledger", "nosuchrun"]) == 2
    assert "farm ledger nosuchrun: no run with that id" in capsys.readouterr().err


def test_a_folder_that_would_hide_a_package_from_the_actors_is_refused(tiny_sdxl, tmp_path, monkeypatch, capsys):
    # Ray runs the actors a driver starts in the driver's folder, first on their path: a `pipeline/` or `farm/`
    # there (a project's own, or a state folder) would be imported instead of tilefarm's
    (tmp_path / "farm").mkdir()
    (tmp_path / "pipeline").mkdir()
    monkeypatch.chdir(tmp_path)
    render = ["render", "--model", str(tiny_sdxl), "--prompt", "x", "--size", "128x128", "--native", "64"]
    render += ["--tile", "128"]
    for argv in (["up"], [*render, "--out", "x.png", "--cluster", "auto"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "holds `farm/` and `pipeline/`" in err and "Run the command from another folder" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
