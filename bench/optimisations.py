"""Before/after timings of the GPU optimisations, each on the model call it changes, with the real models.

Every measurement runs our own code path (Denoiser.predict, the loaded VAE, the prompt encoder)
with one thing switched: attention kernel, memory format, CFG batching, precision, compile,
prompt caching, tile batch. Those that need a GPU report None on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.sampling.conditioning import PromptEmbeds


@dataclass(frozen=True)
class Toggle:
    """One optimisation measured before and after (seconds per unit; None where it cannot run here)."""

    name: str
    unit: str
    before: float | None
    after: float | None
    note: str = ""

    @property
    def gain(self) -> float | None:
        return self.before / self.after if self.before and self.after else None


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() after `warmup` runs, synchronising CUDA around each."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Achieved FLOP/s of an n x n x n matmul (2 n^3 FLOPs), the practical peak the UNet is compared to."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats, warmup=3)
    return 2 * n**3 / seconds


@dataclass
class UnetCall:
    """One sampler step's model call on a batch of tiles, built with the Denoiser's own conditioning."""

    denoiser: object
    x: torch.Tensor
    t: torch.Tensor
    conditioning: tuple
    cfg: float

    @classmethod
    def make(cls, denoiser, cond: PromptEmbeds, batch: int, latent: int, cfg: float, channels: int = 4) -> UnetCall:
        x = torch.randn(batch, channels, latent, latent, generator=torch.Generator().manual_seed(0))
        x = x.to(denoiser.device, denoiser.dtype)
        t = torch.tensor(500.0, device=denoiser.device)
        return cls(denoiser, x, t, denoiser.conditioning(cond, x, cfg), cfg)

    @torch.no_grad()
    def predict(self) -> torch.Tensor:
        return self.denoiser.predict(self.x, self.t, self.conditioning, self.cfg)

    @torch.no_grad()
    def predict_split(self) -> torch.Tensor:
        """CFG as two calls (negative, then positive), the way a naive sampler does it."""
        embeds, pooled, time_ids = self.conditioning
        b = self.x.shape[0]
        outs = [
            self.denoiser.unet(
                self.x,
                self.t,
                encoder_hidden_states=embeds[i * b : (i + 1) * b],
                added_cond_kwargs={
                    "text_embeds": pooled[i * b : (i + 1) * b],
                    "time_ids": time_ids[i * b : (i + 1) * b],
                },
                return_dict=False,
            )[0]
            for i in range(2)
        ]
        return outs[0] + self.cfg * (outs[1] - outs[0])


def attention_toggle(call: UnetCall, repeats: int) -> Toggle:
    """diffusers' eager AttnProcessor (softmax(QK^T)V in three ops) vs PyTorch SDPA (AttnProcessor2_0)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet, device = call.denoiser.unet, call.denoiser.device
    unet.set_attn_processor(AttnProcessor())
    try:
        before = median_seconds(call.predict, device, repeats)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    after = median_seconds(call.predict, device, repeats)
    return Toggle("SDPA attention (vs eager)", "s per UNet call", before, after, "AttnProcessor -> AttnProcessor2_0")


def channels_last_toggle(call: UnetCall, repeats: int) -> Toggle:
    """NCHW vs NHWC weights and activations for the UNet's convolutions."""
    unet, device = call.denoiser.unet, call.denoiser.device
    unet.to(memory_format=torch.contiguous_format)
    before = median_seconds(call.predict, device, repeats)
    unet.to(memory_format=torch.channels_last)
    try:
        after = median_seconds(call.predict, device, repeats)
    finally:
        unet.to(memory_format=torch.contiguous_format)
    return Toggle("channels-last UNet", "s per UNet call", before, after, "unet.to(memory_format=channels_last)")


def cfg_batch_toggle(call: UnetCall, repeats: int) -> Toggle:
    """Negative and positive prompts as two UNet calls vs one call of twice the batch."""
    device = call.denoiser.device
    before = median_seconds(call.predict_split, device, repeats)
    after = median_seconds(call.predict, device, repeats)
    return Toggle("CFG in one batch", "s per sampler step", before, after, "2 calls of B vs 1 call of 2B")


def precision_toggle(call: UnetCall, repeats: int) -> Toggle:
    """The UNet in fp32 vs the render's half precision (GPU only: the CPU path is fp32)."""
    unet, device, dtype = call.denoiser.unet, call.denoiser.device, call.denoiser.dtype
    if device.type != "cuda" or dtype == torch.float32:
        return Toggle("half-precision UNet (vs fp32)", "s per UNet call", None, None, "needs a GPU")
    after = median_seconds(call.predict, device, repeats)
    unet.to(torch.float32)
    full = UnetCall(call.denoiser, call.x.float(), call.t, tuple(c.float() for c in call.conditioning), call.cfg)
    try:
        before = median_seconds(full.predict, device, repeats)
    finally:
        unet.to(dtype)
    return Toggle("half-precision UNet (vs fp32)", "s per UNet call", before, after, str(dtype).replace("torch.", ""))


def vae_precision_toggle(vae, latent: int, dtype: torch.dtype, repeats: int) -> Toggle:
    """One VAE decode of a tile in fp32 (SDXL's force_upcast) vs half precision (GPU only)."""
    from pipeline.sampling.vae import decode

    param = next(vae.parameters())
    device, upcast = param.device, param.dtype  # .to() below changes param in place
    if device.type != "cuda" or dtype == torch.float32:
        return Toggle("half-precision VAE decode (vs fp32 upcast)", "s per tile", None, None, "needs a GPU")
    z = torch.randn(1, vae.config.latent_channels, latent, latent)
    before = median_seconds(lambda: decode(vae, z, tiled=False), device, repeats)
    vae.to(dtype)
    try:
        after = median_seconds(lambda: decode(vae, z, tiled=False), device, repeats)
    finally:
        vae.to(upcast)
    note = "bf16; SDXL's released VAE overflows in fp16" if dtype == torch.bfloat16 else "fp16: needs an fp16-fixed VAE"
    return Toggle("half-precision VAE decode (vs fp32 upcast)", "s per tile", before, after, note)


def compile_toggle(call: UnetCall, repeats: int) -> tuple[Toggle, float]:
    """Eager vs torch.compile of the UNet; also returns the one-off compile seconds."""
    unet, device = call.denoiser.unet, call.denoiser.device
    before = median_seconds(call.predict, device, repeats)
    compiled = torch.compile(unet)
    call.denoiser.unet = compiled
    try:
        start = time.perf_counter()
        call.predict()
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        after = median_seconds(call.predict, device, repeats)
    finally:
        call.denoiser.unet = unet
    return Toggle("torch.compile UNet", "s per UNet call", before, after, f"compile {compile_s:.0f} s once"), compile_s


def prompt_once_toggle(worker, prompt: str, negative: str, cfg: float, batches: int, repeats: int) -> Toggle:
    """Prompt embeddings per tile batch vs once per render (what the farm does)."""
    once = median_seconds(lambda: worker.encode_prompt(prompt, negative, cfg), worker.device, repeats)
    return Toggle(
        "prompt embeddings once", "s per render", once * batches, once, f"{batches} tile batches share one encode"
    )


@dataclass(frozen=True)
class BatchPoint:
    """Per-tile cost of one sampler step at a tile batch size, and the GPU memory it needs above the weights."""

    batch: int
    seconds_per_tile: float
    extra_bytes: int | None


def batch_sweep(
    denoiser, cond: PromptEmbeds, latent: int, cfg: float, sizes: list[int], repeats: int
) -> list[BatchPoint]:
    """One sampler step's model call at each tile batch size: seconds per tile and memory above the weights."""
    points = []
    cuda = denoiser.device.type == "cuda"
    for size in sizes:
        if cuda:
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        call = UnetCall.make(denoiser, cond, size, latent, cfg)
        seconds = median_seconds(call.predict, denoiser.device, repeats)
        extra = torch.cuda.max_memory_allocated() - held if cuda else None
        points.append(BatchPoint(size, seconds / size, extra))
        del call
    return points


def pick_tile_batch(points: list[BatchPoint], free_bytes: int | None, headroom: float = 0.9) -> int:
    """The fastest batch per tile whose memory fits `headroom` x the free memory (any batch when unknown)."""
    fits = [p for p in points if free_bytes is None or p.extra_bytes is None or p.extra_bytes <= headroom * free_bytes]
    if not fits:
        return min(p.batch for p in points)
    best = min(p.seconds_per_tile for p in fits)
    # within 3% of the best, prefer the smaller batch: more batches spread better over GPUs
    return min(p.batch for p in fits if p.seconds_per_tile <= 1.03 * best)
