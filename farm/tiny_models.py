"""Tiny random-weight models built from the real classes, for the demo, the tests and the CPU benches.

Random weights make abstract images; these exist so the real loading and render code can run
end to end on a machine with no model weights and no GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_NATIVE_PX = 256  # the tiny models' "native" size: SDXL's UNet sample_size 32 latents x VAE factor 8
_VERSION = "v1"  # bump when a tiny config changes, so cached models are rebuilt


def _byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: enough for CLIPTokenizer to tokenize offline."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def build_tiny_sdxl(path: Path, seed: int = 0, release_rules: bool = False) -> Path:
    """Save a tiny SDXL-architecture diffusers folder (UNet with text_time embeddings, 8x VAE, two CLIPs).

    `release_rules`: follow what SDXL's released configs fix and shapes cannot show (64-wide heads,
    32 norm groups, CLIP's vocabulary and activations), as a single file saved from it must.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1) if release_rules else (2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=32 if release_rules else 8,
        sample_size=128 if release_rules else 32,
    )
    vae = AutoencoderKL(
        sample_size=1024 if release_rules else TINY_NATIVE_PX,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32,) * 4 if release_rules else (8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32 if release_rules else 8,
        scaling_factor=0.13025,
    )
    text_config = dict(
        bos_token_id=len(_byte_vocab()) - 2,
        eos_token_id=len(_byte_vocab()) - 1,
        pad_token_id=len(_byte_vocab()) - 1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_byte_vocab()),
        projection_dim=32,
        hidden_act="gelu",
        max_position_embeddings=77,
    )
    tokenizers = _tiny_tokenizer(), _tiny_tokenizer()
    if release_rules:
        from pipeline.loading.single_file_configs import CLIP_VOCAB, clip_tokenizer

        ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the released configs' (see clip_config)
        text_config.update(vocab_size=CLIP_VOCAB, num_attention_heads=1, **ids)
        tokenizers = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_act = "quick_gelu" if release_rules else "gelu"  # CLIP-L's activation; OpenCLIP bigG's is gelu
    text_encoder = CLIPTextModel(CLIPTextConfig(**(text_config | dict(hidden_act=text_act))))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    )
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _tiny_t5_tokenizer():
    """A T5 unigram tokenizer over single printable characters: builds offline, no sentencepiece file."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # T5's ids: pad 0, eos 1, unk 2
    pieces += [(c, -3.0) for c in string.printable.strip()]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux(path: Path, seed: int = 0) -> Path:
    """Save a tiny Flux-architecture diffusers folder (MMDiT with guidance embedding, 16-channel VAE, CLIP + T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        sample_size=TINY_NATIVE_PX,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.3611,  # the factors of Flux's own VAE (ae.safetensors)
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vocab = len(_byte_vocab())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab,
            projection_dim=32,
            hidden_act="gelu",
            max_position_embeddings=77,
        )
    )
    t5_tokenizer = _tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    # FLUX.1-dev's scheduler config: the shift grows with the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_upscaler(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """Save a tiny spandrel-detectable Compact (SRVGGNet) upscaler as .safetensors."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(seed)
    net = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=scale)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


TINY_SAM3_PX = 112  # the tiny SAM3's input size (8 x 8 patches of 14 px)


def build_tiny_sam3(path: Path, seed: int = 0) -> Path:
    """Save a tiny SAM3 (Sam3Model + Sam3Processor) folder: the real architecture, a few layers of width 32."""
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor
    from transformers.utils import logging as tlog

    torch.manual_seed(seed)
    patches = TINY_SAM3_PX // 14
    vocab = len(_byte_vocab())
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    config = Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                num_hidden_layers=2,
                image_size=TINY_SAM3_PX,
                pretrain_image_size=TINY_SAM3_PX,
                patch_size=14,
                window_size=4,
                global_attn_indexes=[1],
                **small,
            ),
            fpn_hidden_size=32,
            backbone_feature_sizes=[[patches * 4] * 2, [patches * 2] * 2, [patches] * 2],
        ),
        text_config=dict(
            vocab_size=vocab,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            projection_dim=32,
            num_hidden_layers=1,
            max_position_embeddings=32,
            **small,
        ),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=1, **small),
        detr_decoder_config=dict(num_layers=1, num_queries=8, **small),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )
    tokenizer = _tiny_tokenizer()
    tokenizer.model_max_length = 32  # SAM3 pads text to 32 tokens
    processor = Sam3Processor(
        image_processor=Sam3ImageProcessor(size={"height": TINY_SAM3_PX, "width": TINY_SAM3_PX}), tokenizer=tokenizer
    )
    tlog.disable_progress_bar()
    Sam3Model(config).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def demo_cache_dir() -> Path:
    """Where the demo keeps its tiny models: $XDG_CACHE_HOME/tilefarm (default ~/.cache/tilefarm)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tilefarm" / f"tiny-models-{_VERSION}"


def ensure_tiny_flux(root: Path | None = None) -> Path:
    """Build (once) and return the tiny Flux folder."""
    root = root or demo_cache_dir()
    model = root / "tiny-flux"
    if not (model / "model_index.json").exists():
        tmp = root / "tiny-flux.partial"
        build_tiny_flux(tmp)
        os.replace(tmp, model)
    return model


def ensure_tiny_models(root: Path | None = None) -> tuple[Path, Path]:
    """Build (once) and return the tiny SDXL folder and tiny 4x upscaler file."""
    root = root or demo_cache_dir()
    model, upscaler = root / "tiny-sdxl", root / "tiny-compact-4x.safetensors"
    if not (model / "model_index.json").exists():
        tmp = root / "tiny-sdxl.partial"
        build_tiny_sdxl(tmp)
        os.replace(tmp, model)
    if not upscaler.exists():
        tmp = root / "tiny-compact-4x.partial.safetensors"
        build_tiny_upscaler(tmp)
        os.replace(tmp, upscaler)
    return model, upscaler
