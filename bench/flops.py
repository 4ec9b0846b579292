"""FLOPs of every model call a render makes, and the seconds a worker task takes at a stated throughput.

Counted once with `torch.utils.flop_counter.FlopCounterMode` on the full-size SDXL-base configs in
bench/configs/ and a 4x ESRGAN (spandrel's RRDBNet, 23 blocks, 64 features: the 4x-UltraSharp
architecture), all built on the meta device: shapes only, no memory, no weights. A multiply-add
counts as 2 FLOPs (FlopCounterMode's convention for matmuls, convolutions and attention).

Convolutions cost in proportion to pixels, self-attention in proportion to pixels squared, so each
network's FLOPs per image are fitted exactly as c0 + c1 n + c2 n^2 (n = pixels, or latent pixels
for the UNet) from three sizes, and the fit is checked against a count at a fourth size. The table
is cached in bench/configs/flops.json; `--recount` counts again (about a minute on 2 CPU cores).

    python bench/flops.py                 # the table, and seconds at the default throughput
    python bench/flops.py --recount --tflops 250
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from full_models import CONFIGS, build  # noqa: E402

TABLE = CONFIGS / "flops.json"
# effective fp16 throughput of an H100-class GPU on these networks (about 40% of its ~990 TFLOP/s dense peak)
DEFAULT_TFLOPS = 400.0
UNET_SIDES = (64, 96, 128)  # latent px per side: fit
UNET_CHECK = 80
VAE_SIDES = (512, 768, 1024)  # px per side: fit
VAE_CHECK = 640
UPSCALER_SIDE, UPSCALER_CHECK = 64, 96  # input px per side: all convolutions, so linear
TEXT_TOKENS = 77
UPSCALER = "ESRGAN 4x (spandrel RRDBNet: 23 blocks, 64 features, 32 growth channels)"

# worker method -> what it runs (pipeline.graph.worker.TileWorker)
UNET_METHODS = ("refine", "predict", "base_latents")
ENCODE_METHODS = ("encode", "encode_stats", "encode_tile")
DECODE_METHODS = ("decode", "decode_stats", "decode_tile")
FREE_METHODS = ("facts", "detect", "info")


def fit_quadratic(ns: list[float], flops: list[float]) -> list[float]:
    """(c0, c1, c2) with c0 + c1 n + c2 n^2 through three (n, flops) points (a Vandermonde solve)."""
    a = torch.tensor([[1.0, n, n * n] for n in ns], dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(flops, dtype=torch.float64)).tolist()


def evaluate(coeffs: list[float], n: float) -> float:
    """c0 + c1 n + c2 n^2."""
    return coeffs[0] + coeffs[1] * n + coeffs[2] * n * n


def counted(fn) -> int:
    """FLOPs of calling fn(), counted by FlopCounterMode without autograd."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A shape-only tensor: no memory, no values."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def unet_flops(unet, side: int, batch: int = 2) -> int:
    """One SDXL UNet forward on [batch, 4, side, side] latents with 77 tokens (batch 2: a CFG pair)."""
    added = {"text_embeds": meta(batch, 1280), "time_ids": meta(batch, 6)}
    t = meta(batch)
    return counted(lambda: unet(meta(batch, 4, side, side), t, encoder_hidden_states=meta(batch, 77, 2048),
                               added_cond_kwargs=added))  # fmt: skip


def vae_flops(vae, px: int) -> tuple[int, int]:
    """(encoder, decoder) FLOPs for one px x px image (the decoder from its px / 8 latent)."""
    encode = counted(lambda: vae.encode(meta(1, 3, px, px)))
    decode = counted(lambda: vae.decode(meta(1, 4, px // 8, px // 8)))
    return encode, decode


def build_upscaler():
    """The 4x ESRGAN on the meta device, from spandrel's own architecture class."""
    from spandrel.architectures.ESRGAN import ESRGAN

    with torch.device("meta"):
        return ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)


def _fitted(ns: list[int], flops: list[int], check_n: int, check_flops: int, unit: str) -> dict:
    coeffs = fit_quadratic(ns, flops)
    fitted = evaluate(coeffs, check_n)
    return {
        "n": unit,
        "sizes": ns,
        "flops": flops,
        "coeffs": coeffs,
        "check": {"n": check_n, "counted": check_flops, "fitted": fitted, "error": fitted / check_flops - 1},
    }


def count_table() -> dict:
    """Count every network on the meta device: the table bench/configs/flops.json caches."""
    unet = build("sdxl-base-1.0/unet", "meta")
    per_image = [unet_flops(unet, s) // 2 for s in (*UNET_SIDES, UNET_CHECK)]
    tile_cfg = unet_flops(unet, 128, batch=2)
    del unet
    vae = build("sdxl-base-1.0/vae", "meta")
    enc, dec = zip(*(vae_flops(vae, px) for px in (*VAE_SIDES, VAE_CHECK)), strict=True)
    del vae
    net = build_upscaler()
    up = counted(lambda: net(meta(1, 3, UPSCALER_SIDE, UPSCALER_SIDE)))
    up_check = counted(lambda: net(meta(1, 3, UPSCALER_CHECK, UPSCALER_CHECK)))
    text = 0
    for name in ("text_encoder", "text_encoder_2"):
        encoder = build(f"sdxl-base-1.0/{name}", "meta")
        text += counted(lambda e=encoder: e(meta(1, TEXT_TOKENS, dtype=torch.long), output_hidden_states=True))
    unet_ns, vae_ns = [s * s for s in UNET_SIDES], [px * px for px in VAE_SIDES]
    per_px = up / UPSCALER_SIDE**2
    return {
        "configs": "bench/configs/sdxl-base-1.0",
        "upscaler": UPSCALER,
        "torch": torch.__version__,
        "unet": _fitted(unet_ns, per_image[:3], UNET_CHECK**2, per_image[3], "latent pixels, one image (no CFG)"),
        "unet_tile_128_cfg": tile_cfg,
        "vae_encoder": _fitted(vae_ns, list(enc[:3]), VAE_CHECK**2, enc[3], "image pixels"),
        "vae_decoder": _fitted(vae_ns, list(dec[:3]), VAE_CHECK**2, dec[3], "image pixels"),
        "upscaler_4x": {
            "n": "input pixels",
            "sizes": [UPSCALER_SIDE**2],
            "flops": [up],
            "coeffs": [0.0, per_px, 0.0],
            "check": {
                "n": UPSCALER_CHECK**2,
                "counted": up_check,
                "fitted": per_px * UPSCALER_CHECK**2,
                "error": per_px * UPSCALER_CHECK**2 / up_check - 1,
            },
        },  # fmt: skip
        "text_encoders": text,  # CLIP-L + OpenCLIP-bigG, one 77-token prompt
    }


def load_table(recount: bool = False, path: Path = TABLE) -> dict:
    """The cached FLOP table, counted (and written) when missing or when `recount`."""
    if path.exists() and not recount:
        return json.loads(path.read_text())
    table = count_table()
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


def task_flops(method: str, shape: tuple[int, ...], table: dict, steps: int = 1, cfg: bool = True) -> float:
    """FLOPs of one worker call, from the [B, C, H, W] shape of the image or latents it is given.

    UNet calls run `steps` forwards of the batch, doubled by CFG; `base` adds the VAE decode of its
    image; `detail` encodes, refines and decodes its crops; `encode_prompt` runs both text encoders
    (twice with CFG: the negative prompt)."""
    if method in FREE_METHODS:
        return 0.0
    if method == "encode_prompt":
        return table["text_encoders"] * (2 if cfg else 1)
    b, _, h, w = shape
    unet = steps * b * (2 if cfg else 1) * evaluate(table["unet"]["coeffs"], h * w)
    if method in UNET_METHODS:
        return unet
    if method == "base":
        return unet + b * evaluate(table["vae_decoder"]["coeffs"], 64 * h * w)
    if method in ENCODE_METHODS:
        return b * evaluate(table["vae_encoder"]["coeffs"], h * w)
    if method in DECODE_METHODS:
        return b * evaluate(table["vae_decoder"]["coeffs"], 64 * h * w)
    if method == "upscale_tile":
        return b * evaluate(table["upscaler_4x"]["coeffs"], h * w)
    if method == "detail":  # pixels in: encode, refine the px / 8 latents, decode
        vae = evaluate(table["vae_encoder"]["coeffs"], h * w) + evaluate(table["vae_decoder"]["coeffs"], h * w)
        return b * vae + steps * b * (2 if cfg else 1) * evaluate(table["unet"]["coeffs"], h * w // 64)
    raise ValueError(f"no FLOP model for worker method {method!r}")


def task_seconds(
    method: str, shape: tuple[int, ...], throughput_tflops: float, table: dict, steps: int = 1, cfg: bool = True
) -> float:
    """Simulated seconds of one worker call on a device sustaining `throughput_tflops` (FLOPs / throughput)."""
    if math.isinf(throughput_tflops):
        return 0.0
    return task_flops(method, shape, table, steps, cfg) / (throughput_tflops * 1e12)


def describe(table: dict, tflops: float = DEFAULT_TFLOPS, base_steps: int = 30) -> str:
    """The FLOP table as markdown, with seconds at `tflops`."""
    unet, enc, dec, up = (table[k] for k in ("unet", "vae_encoder", "vae_decoder", "upscaler_4x"))
    tile = table["unet_tile_128_cfg"]
    base = task_flops("base", (1, 4, 128, 128), table, base_steps)

    def check(fit: dict) -> str:
        c = fit["check"]
        return f"fit {100 * c['error']:+.3f}% at {math.isqrt(c['n'])}^2"

    rows = [
        ("UNet per tile-step: 128x128 latents (1024 px), batch 2 (CFG pair)", tile, check(unet)),
        ("UNet per image-step at 64x64 latents (512 px), batch 1", unet["flops"][0], ""),
        ("VAE encoder per pixel, at 512 px / 1024 px", enc["flops"][0] / 512**2, f"{enc['flops'][2] / 1024**2:.3g} "
         f"at 1024 px; {check(enc)}"),
        ("VAE decoder per pixel, at 512 px / 1024 px", dec["flops"][0] / 512**2, f"{dec['flops'][2] / 1024**2:.3g} "
         f"at 1024 px; {check(dec)}"),
        ("VAE encoder, one 1024 px tile", enc["flops"][2], ""),
        ("VAE decoder, one 1024 px tile (128x128 latents)", dec["flops"][2], ""),
        (f"{UPSCALER} per input pixel", up["coeffs"][1], check(up)),
        ("upscaler, one 512 px input tile (2048 px out)", up["coeffs"][1] * 512**2, ""),
        ("text encoders (CLIP-L + bigG), one 77-token prompt", table["text_encoders"], ""),
        (f"base: {base_steps} steps x UNet 128x128 CFG pair + VAE decode 1024 px", base, ""),
    ]  # fmt: skip
    lines = [
        f"FLOPs counted by torch.utils.flop_counter.FlopCounterMode on the meta device ({table['configs']}, "
        f"torch {table['torch']}); seconds at {tflops:g} TFLOP/s effective",
        "",
        "| call | FLOPs | seconds | note |",
        "|---|---:|---:|---|",
    ]
    for name, flops, note in rows:
        seconds = f"{flops / (tflops * 1e12):.4g}" if flops > 1e9 else "-"
        lines.append(f"| {name} | {flops:.4g} | {seconds} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recount", action="store_true", help="count again and rewrite bench/configs/flops.json")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="effective device TFLOP/s")
    parser.add_argument("--base-steps", type=int, default=30)
    args = parser.parse_args(argv)
    table = load_table(args.recount)
    print(describe(table, args.tflops, args.base_steps))
    return table


if __name__ == "__main__":
    main()
