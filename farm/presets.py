"""Presets: the seed workflows as named render plans, the lowest layer of a spec (preset < TOML < flags).

`--preset NAME` picks one; `--preset NAME:VARIANT` one of its variants (seed 000's resolution
strategies, seed 001's quality tiers). A preset names the model family it is written for, and a
model of the other family is refused before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.loading.models import inspect_diffusion_model


@dataclass(frozen=True)
class Preset:
    """A named set of spec fields, with the seed it comes from and its variants (each a few fields more)."""

    name: str
    seed: str  # the seed workflow it implements
    family: str  # sdxl | flux | any
    description: str
    fields: dict
    variants: dict[str, dict] = field(default_factory=dict)
    default_variant: str = ""
    prefix: str = ""  # output name prefix with --out-dir (default: the preset's name)

    def values(self, variant: str = "") -> dict:
        """The preset's spec fields, with a variant's on top."""
        variant = variant or self.default_variant
        if variant and variant not in self.variants:
            choices = ", ".join(f"{self.name}:{v}" for v in self.variants) or "none"
            raise UserError(f"preset {self.name!r} has no variant {variant!r}; its variants: {choices}")
        return self.fields | self.variants.get(variant, {})

    def check_model(self, model: str) -> None:
        """Refuse a model of the other family before it loads (a Flux model on an SDXL preset, or the reverse)."""
        if self.family == "any" or not model or not Path(model).expanduser().exists():
            return  # a name under --comfy-models, or a missing path: render preparation resolves or names it
        family = inspect_diffusion_model(model).family
        if family != self.family:
            raise UserError(
                f"preset {self.name!r} is written for {self.family.upper()} models, but --model {model} is a "
                f"{family.upper()} model; pass a {self.family.upper()} model, or pick a preset for "
                f"{family.upper()} ({', '.join(p.name for p in PRESETS.values() if p.family in (family, 'any'))})"
            )


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "top-down",
            "002",
            "any",
            "plan at the target, base at native size, 4x model upscale, chess refine of 1024 px latent tiles",
            {"workflow": "top-down"},
        ),
        Preset(
            "sdxl-4k",
            "000",
            "sdxl",
            "base 960x544 (30 steps, CFG 5.5, DPM++ 2M Karras), latent upscale 2x, refine 20 steps at CFG 5, "
            "decode, 4x pixel upscale, exact 3840x2160",
            {
                "workflow": "two-pass",
                "width": 3840,
                "height": 2160,
                "base_width": 960,
                "base_height": 544,
                "base_steps": 30,
                "base_cfg": 5.5,
                "steps": 20,
                "cfg": 5.0,
                "denoise": 0.5,
                "sampler": "dpmpp_2m_karras",
                "pixel_upscale": 4,
            },
            variants={
                "exact-4k": {},
                "high-detail": {"base_width": 1024, "base_height": 576},
                "extreme-8k": {"base_width": 1536, "base_height": 864, "width": 12288, "height": 6912},
            },
            default_variant="exact-4k",
        ),
        Preset(
            "hires-fix",
            "003",
            "any",
            "base 1024x576, latent upscale to 2048x1152, second sampler at denoise 0.55",
            {
                "workflow": "two-pass",
                "width": 2048,
                "height": 1152,
                "base_width": 1024,
                "base_height": 576,
                "base_steps": 30,
                "steps": 20,
                "denoise": 0.55,
                "pixel_upscale": 1,
            },
        ),
        Preset(
            "upscale-enhance",
            "001",
            "flux",
            "input image, tiled 2x model upscale (512 px tiles, 32 px overlap), Flux img2img 12 steps, "
            "guidance 2.2, denoise 0.3, Euler, LoRA (--lora) at 0.5; output 2x the input",
            {
                "workflow": "enhance",
                "pixel_upscale": 2,
                "upscale_tile": 512,
                "steps": 12,
                "cfg": 2.2,
                "denoise": 0.3,
                "sampler": "flow_euler",
                "lora_strength": 0.5,
                "lora_text_strength": 0.5,
            },
            variants={
                "conservative": {"lora_strength": 0.3, "lora_text_strength": 0.3, "denoise": 0.15, "steps": 8},
                "balanced": {},
                "aggressive": {"lora_strength": 0.8, "lora_text_strength": 0.8, "denoise": 0.5, "steps": 20},
            },
            default_variant="balanced",
            prefix="upscale_enhanced",
        ),
    )
}


def find_preset(text: str) -> tuple[Preset, str]:
    """'NAME' or 'NAME:VARIANT' -> (preset, variant); an unknown name is a UserError listing the presets."""
    name, _, variant = text.partition(":")
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (`farm presets` lists them)")
    preset = PRESETS[name]
    preset.values(variant)  # an unknown variant fails here
    return preset, variant or preset.default_variant


def presets_table() -> str:
    """`farm presets`: every preset and variant with the fields it sets."""
    lines = ["| preset | seed | model | what it does |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.seed} | {p.family} | {p.description} |" for p in PRESETS.values()]
    for p in PRESETS.values():
        lines += ["", f"{p.name}: " + ", ".join(f"{k}={v}" for k, v in p.fields.items())]
        lines += [
            f"  {p.name}:{v}{' (default)' if v == p.default_variant else ''}: "
            + (", ".join(f"{k}={x}" for k, x in extra.items()) or "as above")
            for v, extra in p.variants.items()
        ]
    return "\n".join(lines)
