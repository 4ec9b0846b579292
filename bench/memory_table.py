"""Fit the activation table the memory pre-flight reads (pipeline/memory_table.json) from traces.

Each network is built from its config on a fake CPU device (torch FakeTensorMode: shapes and
dtypes, no storage) and one forward is traced with torch's MemTracker; the peak minus the weights
is the activation peak of that call. On fake CPU tensors SDPA dispatches to the flash kernel
(no L x L matrix), the proxy for CUDA's flash / memory-efficient attention that a GPU runs
(research: real_models.md 3.1). Three sizes per stage are fitted to bytes = a*px + c*px^2 + b per
batch item (px: image pixels of one item); the px^2 term is kept only when a line misses a point
by more than 2%. Networks: the full-size SDXL and FLUX.1-dev configs in bench/configs/, the tiny
test models (farm/tiny_models.py), and two spandrel upscalers (ESRGAN 4x, Compact 4x).

    python bench/memory_table.py            # rewrites pipeline/memory_table.json (~15 min on 2 busy cores)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.budget.memory_table import ARCH_FIELDS, TABLE_PATH, arch_match  # noqa: E402

DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def activation_peak(model: torch.nn.Module, call) -> int:
    """Peak bytes of one no-grad forward on the fake device, less the weights and buffers (MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with torch.no_grad(), tracker:
        call()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    held = sum(v for k, v in peak.items() if str(k) in ("_MemRefType.PARAM", "_MemRefType.BUFFER"))
    return peak["Total"] - held


def unet_call(config: dict, latent: int, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    x = torch.randn(1, config["in_channels"], latent, latent)
    added = {
        "text_embeds": torch.randn(
            1, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        ),
        "time_ids": torch.randn(1, 6),
    }
    enc = torch.randn(1, 77, config["cross_attention_dim"])
    return unet, lambda: unet(x, torch.tensor([500.0]), encoder_hidden_states=enc, added_cond_kwargs=added)


def transformer_call(config: dict, latent: int, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    from pipeline.sampling.flux import image_ids

    model = FluxTransformer2DModel.from_config(config)
    tokens = torch.randn(1, (latent // 2) ** 2, config["in_channels"])
    text = torch.randn(1, 512, config["joint_attention_dim"])
    ids = image_ids(latent, latent, torch.device("cpu"), dtype)
    return model, lambda: model(
        hidden_states=tokens,
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]) if config.get("guidance_embeds") else None,
        pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
        encoder_hidden_states=text,
        txt_ids=torch.zeros(512, 3),
        img_ids=ids,
        return_dict=False,
    )


def _vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def decode_call(config: dict, latent: int, dtype: torch.dtype):
    vae = _vae(config)
    z = torch.randn(1, config["latent_channels"], latent, latent)
    return vae, lambda: vae.decode(z, return_dict=False)


def encode_call(config: dict, latent: int, dtype: torch.dtype):
    vae = _vae(config)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    x = torch.randn(1, 3, latent * f, latent * f)
    return vae, lambda: vae.encode(x).latent_dist.mode()


def upscaler_call(config: dict, size: int, dtype: torch.dtype):
    if config["arch"] == "ESRGAN":
        from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

        net = RRDBNet(num_filters=config["num_filters"], num_blocks=config["num_blocks"], scale=config["scale"])
    else:
        from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

        net = SRVGGNetCompact(num_feat=config["num_feat"], num_conv=config["num_conv"], upscale=config["scale"])
    x = torch.randn(1, 3, size, size)
    return net, lambda: net(x)


CALLS = {
    "unet": unet_call,
    "transformer": transformer_call,
    "vae_decode": decode_call,
    "vae_encode": encode_call,
    "upscaler": upscaler_call,
}


def trace(stage: str, config: dict, size: int, dtype: str) -> int:
    """Activation peak of one call of `stage` at `size` (latent px; input px for an upscaler), batch 1."""
    with FakeTensorMode(), torch.device("cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(DTYPE[dtype])  # fake modules cannot be cast after construction
        try:
            model, call = CALLS[stage](config, size, DTYPE[dtype])
            return activation_peak(model, call)
        finally:
            torch.set_default_dtype(previous)


def fit(px: list[int], peak: list[int]) -> dict:
    """bytes = a*px + b, or a*px + c*px^2 + b when the line misses a point by more than 2%."""
    p, y = np.array(px, float), np.array(peak, float)
    a, b = np.polyfit(p, y, 1)
    if np.max(np.abs(a * p + b - y) / y) <= 0.02:
        return {"a": float(a), "b": float(b), "c": 0.0}
    c, a, b = np.polyfit(p, y, 2)
    return {"a": float(a), "b": float(b), "c": float(c)}


def configs() -> list[tuple[str, str, dict, str, list[int], int]]:
    """(entry name, stage, config, trace dtype, sizes, px per size unit^2): every network the table covers."""
    from farm.tiny_models import build_tiny_flux, build_tiny_sdxl

    def load(folder: Path, part: str) -> dict:
        return json.loads((folder / part / "config.json").read_text())

    sdxl, flux = ROOT / "bench/configs/sdxl-base-1.0", ROOT / "bench/configs/flux1-dev"
    tmp = Path(tempfile.mkdtemp())
    tiny_sdxl, tiny_flux = build_tiny_sdxl(tmp / "sdxl"), build_tiny_flux(tmp / "flux")
    out = []
    for name, folder in (("sdxl", sdxl), ("tiny-sdxl", tiny_sdxl)):
        f = 2 ** (len(load(folder, "vae")["block_out_channels"]) - 1)
        out.append((name, "unet", load(folder, "unet"), "fp16", [64, 96, 128], f * f))
    for name, folder in (("flux", flux), ("tiny-flux", tiny_flux)):
        out.append((name, "transformer", load(folder, "transformer"), "bf16", [64, 96, 128], 64))
    for name, folder in (("sdxl", sdxl), ("flux", flux), ("tiny-sdxl", tiny_sdxl), ("tiny-flux", tiny_flux)):
        vae = load(folder, "vae")
        f = 2 ** (len(vae["block_out_channels"]) - 1)
        # the VAE runs in fp32 under half-precision models (force_upcast): trace what runs
        for stage in ("vae_decode", "vae_encode"):
            out.append((name, stage, vae, "fp32", [32, 64, 128], f * f))
    esrgan = {"arch": "ESRGAN", "num_filters": 64, "num_blocks": 23, "scale": 4}
    compact = {"arch": "Compact", "num_feat": 64, "num_conv": 16, "scale": 4}
    out.append(("esrgan-4x", "upscaler", esrgan, "fp16", [128, 256, 512], 1))
    out.append(("compact-4x", "upscaler", compact, "fp16", [128, 256, 512], 1))
    return out


def main() -> None:
    entries = []
    for name, stage, config, dtype, sizes, px_per in configs():
        start = time.perf_counter()
        peaks = [trace(stage, config, s, dtype) for s in sizes]
        px = [s * s * px_per for s in sizes]
        coef = fit(px, peaks)
        entries.append(
            {
                "name": name,
                "stage": stage,
                "dtype_bytes": DTYPE[dtype].itemsize,
                "match": arch_match(stage, config),
                "px": px,
                "traced": peaks,
                **coef,
            }
        )
        shown = ", ".join(f"{p**0.5:.0f}px {v / 2**30:.3f} GiB" for p, v in zip(px, peaks, strict=True))
        print(f"{name:10} {stage:12} {dtype}: {shown}  ({time.perf_counter() - start:.1f} s)", flush=True)
    doc = {
        "about": "peak activation bytes of one call per batch item = a*px + c*px^2 + b (px: image pixels of the "
        "item; input pixels for an upscaler) at dtype_bytes per element; written by bench/memory_table.py",
        "arch_fields": ARCH_FIELDS,
        "entries": entries,
    }
    TABLE_PATH.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()
