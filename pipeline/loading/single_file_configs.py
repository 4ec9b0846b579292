"""Diffusers/transformers configs for single model files, read from their header shapes; the CLIP tokenizer.

A bare checkpoint holds weights, not configs. The sizes (widths, depths, channels) are in the
tensor shapes; what shapes cannot tell (attention heads, GroupNorm groups, activations,
scheduler) follows the SDXL and FLUX.1 releases' own rules: 64-wide attention heads, 32 norm
groups, CLIP-L's quick-GELU. A full-size file therefore yields exactly the released configs, and
a small file built by the same rules loads too.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from importlib.resources import files

HEAD_WIDTH = 64  # SDXL's UNet, CLIP-L, OpenCLIP bigG and T5-XXL all use 64-wide attention heads
NORM_GROUPS = 32
CLIP_VOCAB = 49408
SDXL_TIME_IDS = 6  # original size, crop, target size: two numbers each
SDXL_SCHEDULER = dict(  # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
    _class_name="EulerDiscreteScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
    clip_sample=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)
FLUX_SCHEDULER = dict(  # black-forest-labs/FLUX.1-dev scheduler_config.json (schnell: no dynamic shift)
    _class_name="FlowMatchEulerDiscreteScheduler",
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
VAE_FACTORS = {  # scaling (and shift) of the released VAEs' latents
    "sdxl": dict(scaling_factor=0.13025, force_upcast=True),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True),
}


def _count(shapes: dict, pattern: str) -> int:
    """How many distinct indices N make keys matching `pattern` (a regex with one (\\d+) group)."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def heads(width: int) -> int:
    """Attention heads of a layer `width` wide under the 64-wide-head rule (at least one)."""
    return max(1, width // HEAD_WIDTH)


def sdxl_unet_config(shapes: dict[str, tuple[int, ...]], pooled_dim: int) -> dict:
    """UNet2DConditionModel config from SGM/LDM UNet keys (prefix stripped) and the pooled text width."""
    conv_in = shapes["input_blocks.0.0.weight"]
    levels: list[dict] = [dict(channels=conv_in[0], resnets=0, depth=0)]
    index = 1
    while any(k.startswith(f"input_blocks.{index}.") for k in shapes):
        block = f"input_blocks.{index}."
        if block + "0.op.weight" in shapes:
            levels.append(dict(channels=0, resnets=0, depth=0))
        else:
            level = levels[-1]
            level["channels"] = shapes[block + "0.out_layers.3.weight"][0]
            level["resnets"] += 1
            level["depth"] = _count(shapes, re.escape(block) + r"1\.transformer_blocks\.(\d+)\.")
        index += 1
    attention = [lvl["depth"] > 0 for lvl in levels]
    first_attn = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in shapes if k.endswith(".proj_in.weight")), None)
    label_in = shapes["label_emb.0.0.weight"][1]
    return dict(
        sample_size=128,
        in_channels=conv_in[1],
        out_channels=shapes["out.2.weight"][0],
        block_out_channels=[lvl["channels"] for lvl in levels],
        layers_per_block=levels[0]["resnets"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=[max(1, lvl["depth"]) for lvl in levels],
        attention_head_dim=[heads(lvl["channels"]) for lvl in levels],  # diffusers' name for the head count
        cross_attention_dim=shapes[first_attn][1] if first_attn else 2048,
        use_linear_projection=proj_in is not None and len(shapes[proj_in]) == 2,
        addition_embed_type="text_time",
        addition_time_embed_dim=(label_in - pooled_dim) // SDXL_TIME_IDS,
        projection_class_embeddings_input_dim=label_in,
        norm_num_groups=NORM_GROUPS,
    )


def vae_config(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    """AutoencoderKL config from original (LDM / `ae`) VAE keys, prefix stripped."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    return dict(
        sample_size=1024,
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        block_out_channels=[shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=shapes["decoder.conv_in.weight"][1],
        norm_num_groups=NORM_GROUPS,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        **VAE_FACTORS[family],
    )


def clip_config(shapes: dict[str, tuple[int, ...]], layout: str, big: bool) -> dict:
    """CLIPTextConfig kwargs from HF (`text_model.*`) or OpenCLIP (`transformer.resblocks.*`) keys."""
    if layout == "openclip":
        vocab, width = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        layers = _count(shapes, r"transformer\.resblocks\.(\d+)\.")
        inner = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes["text_projection"][1] if "text_projection" in shapes else width
    else:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        layers = _count(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
        inner = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        projection = shapes["text_projection.weight"][0] if "text_projection.weight" in shapes else width
    return dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads(width),
        max_position_embeddings=positions,
        projection_dim=projection,
        hidden_act="gelu" if big else "quick_gelu",  # OpenCLIP bigG uses exact GELU, OpenAI's CLIP-L quick GELU
        layer_norm_eps=1e-5,
        bos_token_id=0,  # the released configs' ids; eos 2 makes transformers pool at the highest id (<|endoftext|>)
        eos_token_id=2,
        pad_token_id=1,
    )


def t5_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """T5Config kwargs (encoder only, v1.1 gated-GELU) from transformers' T5EncoderModel keys."""
    vocab, width = shapes["shared.weight"] if "shared.weight" in shapes else shapes["encoder.embed_tokens.weight"]
    inner = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    projection = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    buckets, n_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return dict(
        vocab_size=vocab,
        d_model=width,
        d_ff=inner,
        d_kv=projection // n_heads,
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."),
        num_heads=n_heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges, rebuilt from its BPE file the way CLIP's simple_tokenizer.py does."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = gzip.decompress(files("pipeline").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode()
    merges = [tuple(line.split()) for line in text.split("\n")[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """SDXL's / Flux's CLIP tokenizer (77 tokens); SDXL's second one pads with "!" (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)
