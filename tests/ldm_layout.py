"""Test helper: diffusers-layout weights written back in the original layouts users' single files have.

SDXL: the SGM/A1111 checkpoint layout (model.diffusion_model., first_stage_model., conditioner.
embedders.0 CLIP-L, conditioner.embedders.1 OpenCLIP bigG), the inverse of diffusers'
convert_ldm_* converters (cf. diffusers' scripts/convert_diffusers_to_original_sdxl.py).
VAE: the same LDM keys, the layout of Flux's `ae.safetensors` too.
"""

from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET[name]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int, up_attention: list[bool]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM UNet keys (no prefix)."""
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem in UNET_TOP:
            out[f"{UNET_TOP[stem]}.{leaf}"] = value
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = 1 + i * (layers + 1) + j
            out[
                f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
            ] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"] = value
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            if m[1] == "resnets":
                out[f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"] = value
            else:
                out[f"middle_block.1.{m[3]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = i * (layers + 1) + j
            out[
                f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
            ] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            i = int(m[1])
            out[f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attention[i] else 1}.{m[2]}"] = value
        else:
            raise KeyError(key)
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM / `ae` VAE keys (no prefix)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}", new)
        new = re.sub(r"up\.(\d+)\.resnets\.(\d+)", r"up.\1.block.\2", new).replace("upsamplers.0", "upsample")
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".{a}.", f".{b}.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[new] = value
    return out


def clip_g_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP keys (fused in_proj, text_projection transposed)."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names["self_attn.out_proj"] = "attn.out_proj"
    for n in layers:
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for a, b in names.items():
                out[f"{dst}{b}.{leaf}"] = state[f"{src}{a}.{leaf}"]
    return out


def sdxl_pipeline_to_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """One SGM-layout SDXL checkpoint (what A1111/ComfyUI/Civitai users hold) from a diffusers SDXL pipeline."""
    unet = pipe.unet
    up_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    state = {
        "model.diffusion_model." + k: v
        for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, up_attention).items()
    }
    levels = len(pipe.vae.config.block_out_channels)
    state |= {"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), levels).items()}
    clip_l = pipe.text_encoder.state_dict()
    for key, value in clip_l.items():
        name = key if key.startswith("text_model.") else "text_model." + key  # real files keep text_model.
        state["conditioner.embedders.0.transformer." + name] = value
    state |= {
        "conditioner.embedders.1.model." + k: v for k, v in clip_g_to_openclip(pipe.text_encoder_2.state_dict()).items()
    }
    return {k: v.contiguous() for k, v in state.items()}


def flux_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in Black Forest Labs' keys (flux1-dev.safetensors)."""
    top = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    double = {
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
    }
    norms = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm"}
    norms |= {"norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
    out = {}
    for leaf in ("weight", "bias"):
        for ours, bfl in top.items():
            if f"{ours}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = state[f"{ours}.{leaf}"]
        scale, shift = state[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in doubles:
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            for ours, bfl in double.items():
                out[f"{dst}{bfl}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
            out[f"{dst}img_attn.qkv.{leaf}"] = torch.cat([state[f"{src}attn.to_{p}.{leaf}"] for p in "qkv"])
            out[f"{dst}txt_attn.qkv.{leaf}"] = torch.cat([state[f"{src}attn.add_{p}_proj.{leaf}"] for p in "qkv"])
        for ours, bfl in norms.items():
            out[f"{dst}{bfl}.scale"] = state[f"{src}attn.{ours}.weight"]
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}modulation.lin.{leaf}"] = state[f"{src}norm.linear.{leaf}"]
            out[f"{dst}linear2.{leaf}"] = state[f"{src}proj_out.{leaf}"]
            fused = [state[f"{src}attn.to_{p}.{leaf}"] for p in "qkv"] + [state[f"{src}proj_mlp.{leaf}"]]
            out[f"{dst}linear1.{leaf}"] = torch.cat(fused)
        out[f"{dst}norm.query_norm.scale"] = state[f"{src}attn.norm_q.weight"]
        out[f"{dst}norm.key_norm.scale"] = state[f"{src}attn.norm_k.weight"]
    return out
