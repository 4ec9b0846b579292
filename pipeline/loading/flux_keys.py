"""Flux transformer weights from Black Forest Labs' layout (flux1-dev.safetensors, ComfyUI) to diffusers'.

diffusers' own converter (`convert_flux_transformer_checkpoint_to_diffusers`) hard-codes FLUX.1's
width (3072) to split the fused single-block projection, so it cannot convert any other size. Here
the plan is read from the header: every diffusers tensor is a row range of one BFL tensor, and the
final AdaLN projection has its (shift, scale) halves swapped to diffusers' (scale, shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

TOP = {  # BFL stem -> diffusers stem, for the weight and the bias alike
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
DOUBLE_QKV["txt_attn.qkv"] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from: rows [start, stop) of a BFL tensor, halves swapped or not."""

    key: str
    start: int = 0
    stop: int | None = None
    swap_halves: bool = False


def _blocks(shapes: dict, name: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(rf"{name}\.(\d+)\.", k))})


def bfl_plan(shapes: dict[str, tuple[int, ...]]) -> dict[str, Source]:
    """diffusers key -> its BFL source, for a BFL-layout Flux transformer of any width (keys unprefixed)."""
    inner = shapes["img_in.weight"][0]
    plan: dict[str, Source] = {}
    for leaf in ("weight", "bias"):
        for bfl, ours in TOP.items():
            if f"{bfl}.{leaf}" in shapes:
                plan[f"{ours}.{leaf}"] = Source(f"{bfl}.{leaf}")
        plan[f"norm_out.linear.{leaf}"] = Source(f"final_layer.adaLN_modulation.1.{leaf}", swap_halves=True)
        for i in _blocks(shapes, "double_blocks"):
            src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            for bfl, ours in DOUBLE.items():
                plan[f"{dst}{ours}.{leaf}"] = Source(f"{src}{bfl}.{leaf}")
            for bfl, parts in DOUBLE_QKV.items():
                for n, ours in enumerate(parts):
                    plan[f"{dst}{ours}.{leaf}"] = Source(f"{src}{bfl}.{leaf}", n * inner, (n + 1) * inner)
        for i in _blocks(shapes, "single_blocks"):
            src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            for bfl, ours in SINGLE.items():
                plan[f"{dst}{ours}.{leaf}"] = Source(f"{src}{bfl}.{leaf}")
            # linear1 fuses q, k, v (inner rows each) and the MLP input (the rest)
            for n, ours in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                plan[f"{dst}{ours}.{leaf}"] = Source(f"{src}linear1.{leaf}", n * inner, (n + 1) * inner)
            plan[f"{dst}proj_mlp.{leaf}"] = Source(f"{src}linear1.{leaf}", 3 * inner)
    for i in _blocks(shapes, "double_blocks"):
        for bfl, ours in DOUBLE_NORMS.items():
            plan[f"transformer_blocks.{i}.{ours}"] = Source(f"double_blocks.{i}.{bfl}")
    for i in _blocks(shapes, "single_blocks"):
        for bfl, ours in SINGLE_NORMS.items():
            plan[f"single_transformer_blocks.{i}.{ours}"] = Source(f"single_blocks.{i}.{bfl}")
    return plan


def apply_plan(state: dict[str, torch.Tensor], plan: dict[str, Source]) -> dict[str, torch.Tensor]:
    """The diffusers state dict the plan describes; a BFL tensor the plan names but `state` lacks raises KeyError."""
    out = {}
    for key, source in plan.items():
        value = state[source.key][source.start : source.stop]
        if source.swap_halves:
            shift, scale = value.chunk(2, dim=0)
            value = torch.cat([scale, shift], dim=0)
        out[key] = value
    return out


def flux_transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """FluxTransformer2DModel config from BFL keys: widths and depths from shapes, FLUX.1's 128-wide heads."""
    inner, in_channels = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.key_norm.scale"][0]
    rope_first = head // 8  # FLUX.1's rotary split of a 128-wide head: 16 (index) + 56 + 56 (height, width)
    return dict(
        patch_size=1,
        in_channels=in_channels,
        num_layers=len(_blocks(shapes, "double_blocks")),
        num_single_layers=len(_blocks(shapes, "single_blocks")),
        attention_head_dim=head,
        num_attention_heads=inner // head,
        joint_attention_dim=shapes["txt_in.weight"][1],
        pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
        axes_dims_rope=(rope_first, (head - rope_first) // 2, (head - rope_first) // 2),
    )
