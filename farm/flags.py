"""The flags shared by `farm render`, `farm batch` and `farm demo`, and how they become spec layers.

One table per kind: SPEC_FLAGS set fields of the render spec (refused with --resume), EXEC_FLAGS say
how to run it. The CLI builds its parsers from them; `farm batch` reads each item's layers with
command_line_layers, as `farm render` does.
"""

from __future__ import annotations

import argparse

# flag -> (spec key, type, help)
SPEC_FLAGS = {
    "--model": ("model", str, "diffusers SDXL or Flux folder, or an SDXL/Flux .safetensors checkpoint"),
    "--upscaler": ("upscaler", str, "spandrel upscaler (.safetensors, or .pth loaded safely); default: bicubic"),
    "--prompt": ("prompt", str, "what to render"),
    "--negative": ("negative", str, "negative prompt"),
    "--prompt-style": (
        "prompt_style",
        str,
        "how prompts are read: comfyui (default; (word:1.2) sets a weight) or a1111 ([word], BREAK); "
        "long prompts run in 77-token chunks",
    ),
    "--seed": ("seed", int, "seed of the noise scaffold, 0 to 2^64-1 (default -1: a random one, printed and stored)"),
    "--steps": ("steps", int, "refine steps that run per tile (default 20)"),
    "--base-steps": ("base_steps", int, "steps of the native-size base (default 30)"),
    "--cfg": ("cfg", float, "SDXL: classifier-free guidance scale, 1 = off (default 7); Flux: its guidance"),
    "--denoise": ("denoise", float, "refine strength in (0, 1]: the last steps of a round(steps/denoise) schedule"),
    "--tile": ("tile", int, "chess tile size in px (default 1024)"),
    "--sampler": ("sampler", str, "auto (default), SDXL: dpmpp_2m_karras or euler, Flux: flow_euler"),
    "--native": ("native", int, "the model's native size in px (default: from the model)"),
    "--upscale-tile": ("upscale_tile", int, "upscaler input tile in px (default 512)"),
    "--model-config": ("model_config", str, "diffusers folder with configs for a single-file checkpoint"),
    "--vae": ("vae", str, "Flux from parts: its VAE file (ae.safetensors)"),
    "--clip-l": ("clip_l", str, "Flux from parts: its CLIP-L file (clip_l.safetensors)"),
    "--t5": ("t5", str, "Flux from parts: its T5 file (t5xxl_fp16.safetensors; fp8 and scaled fp8 too)"),
    "--t5-tokenizer": ("t5_tokenizer", str, "Flux from parts: T5's tokenizer.json (default: ComfyUI's copy)"),
    "--comfy-models": (
        "comfy_models",
        str,
        "a ComfyUI models/ folder: --model, --vae, --clip-l, --t5 may be names in it, or are found by kind",
    ),
    "--detector": ("detector", str, "SAM3 model folder for the semantic detailer (with --concept)"),
    "--detail-padding": ("detail_padding", float, "context around a detection per side, x its size (default 0.25)"),
    "--detail-chess-denoise": (
        "detail_chess_denoise",
        float,
        "chess denoise inside detailed areas, below --denoise (default 0: the same everywhere)",
    ),
    "--lora": ("lora", str, "LoRA .safetensors fused into the model (diffusers, PEFT or kohya keys)"),
    "--lora-strength": ("lora_strength", float, "LoRA strength on the UNet / Flux transformer (default 1)"),
    "--lora-text-strength": ("lora_text_strength", float, "LoRA strength on the text encoder(s) (default 1)"),
    "--tiling": (
        "tiling",
        str,
        "blend (one sampler, tile predictions blended every step), chess (odd tiles pinned to the even "
        "result) or chess-original (seed 002: odd tiles refined again, feathered)",
    ),
    "--decode-norm": (
        "decode_norm",
        str,
        "tile (default: each decode tile normalises with its own GroupNorm statistics: one pass) or exact (the "
        "image's statistics, found layer by layer as an untiled decode has them: a statistics pass per layer)",
    ),
    "--grid": ("grid", str, "chess (seed 002, default) or fit (fewer tiles, sized to the canvas)"),
    "--fit-overlap": ("fit_overlap", int, "with --grid fit: minimum overlap between tiles in px (default 128)"),
    "--workflow": ("workflow", str, "top-down (default), two-pass or enhance; presets set it"),
    "--input": ("input", str, "enhance workflow: the input image (PNG, JPEG, ...)"),
    "--base-cfg": ("base_cfg", float, "guidance of the base pass (default 0: the same as --cfg)"),
    "--pixel-upscale": (
        "pixel_upscale",
        int,
        "two-pass: upscale the decoded image this many times (1 = off); enhance: the output is this x the input",
    ),
}
EXEC_FLAGS = {
    "--tile-batch": ("tile_batch", int, "tiles per sampler batch (default 4; 0 = the largest that fits the GPU)"),
    "--precision": ("precision", str, "auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16"),
}


def add_exec_flags(parser: argparse.ArgumentParser) -> None:
    """How to run a render: EXEC_FLAGS, device, outputs, run folder, cluster."""
    for flag, (dest, kind, text) in EXEC_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, help=text)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    parser.add_argument("--out", help="output .png path")
    parser.add_argument("--out-dir", help="write the output into this folder as PREFIX_[INPUT-STEM_]TIMESTAMP.png")
    parser.add_argument("--prefix", help="output name prefix with --out-dir (default: the preset's, or 'render')")
    parser.add_argument(
        "--run-dir",
        help="run folder for checkpoints and the ledger (default: a new one per render in the state folder, "
        "$TILEFARM_STATE_DIR or ~/.local/state/tilefarm/runs; see `farm runs`)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--no-metadata",
        action="store_true",
        help="write the PNG with no text chunks (no spec for --from-png, no A1111 parameters)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--cluster",
        metavar="auto|ADDRESS",
        help="run on Ray: 'auto' joins a running cluster or starts one here; or HOST:PORT",
    )
    parser.add_argument("--workers", type=int, help="with --cluster: at most this many actors (default: one per GPU)")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="with --cluster: GPUs per actor, fractions allowed (default 1; 0 = CPU actors)",
    )


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """What to render: a preset, sizes, SPEC_FLAGS, concepts."""
    parser.add_argument(
        "--preset",
        metavar="NAME[:VARIANT]",
        help="start from a preset (`farm presets`), e.g. sdxl-4k:high-detail; the spec file and flags override it",
    )
    parser.add_argument("--size", help="target WIDTHxHEIGHT in px, multiples of 8 (e.g. 4096x4096)")
    parser.add_argument("--base-size", help="two-pass: the base WIDTHxHEIGHT in px (e.g. 960x544)")
    for flag, (dest, kind, text) in SPEC_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, help=text)
    parser.add_argument(
        "--concept",
        action="append",
        metavar="NAME[;KEY=VALUE...]",
        help="refine what the detector finds for NAME, e.g. 'face;layer=0;denoise=0.45;prompt=a detailed face' "
        "(keys: prompt, layer 0-5, selection largest|center|first|all, max_objects, threshold, denoise); repeatable",
    )


def flag_layer(args: argparse.Namespace, flags: dict) -> dict:
    """The spec fields of `flags` that were given on the command line."""
    return {dest: getattr(args, dest) for dest, _, _ in flags.values() if getattr(args, dest, None) is not None}


def command_line_layers(args: argparse.Namespace):
    """(spec layers in order: preset, spec file, PNG, flags; the preset or None; the spec file's out or None)."""
    from farm.presets import find_preset
    from farm.specfile import read_png_spec, read_toml
    from pipeline.detail.detection import parse_concept
    from pipeline.spec import parse_size

    layers, out, preset = [], None, None
    if args.preset:
        preset, variant = find_preset(args.preset)
        layers.append((preset.values(variant), f"preset {args.preset}"))
    if getattr(args, "spec", None):
        data, out = read_toml(args.spec)
        layers.append((data, args.spec))
    if getattr(args, "from_png", None):
        layers.append((read_png_spec(args.from_png), args.from_png))
    flags = flag_layer(args, SPEC_FLAGS) | flag_layer(args, EXEC_FLAGS)
    if args.concept:
        flags["concepts"] = [parse_concept(text) for text in args.concept]
    if args.size:
        flags["width"], flags["height"] = parse_size(args.size)
    if args.base_size:
        flags["base_width"], flags["base_height"] = parse_size(args.base_size)
    layers.append((flags, "command line"))
    return layers, preset, out
