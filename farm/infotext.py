"""A1111's "parameters" text (infotext), so image browsers, Civitai and sd-parsers read a tilefarm PNG.

The format is A1111's `create_infotext` (modules/processing.py): the prompt, a `Negative prompt:` line
when there is one, then one line of `key: value` pairs joined by ", ", values quoted by its `quote`
(modules/infotext_utils.py). `Seed` is tilefarm's scaffold seed: the same seed in A1111 draws other
noise, so the numbers describe the render, they do not replay it there (the `tilefarm` chunk does).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.sampling.schedule import resolve_sampler, schedule_length
from pipeline.spec import RenderSpec

# our sampler -> (A1111 sampler name, A1111 1.9+ "Schedule type"); None = the sampler's own (omitted)
A1111_SAMPLERS = {
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "euler": ("Euler", None),
    "flow_euler": ("Euler", "Simple"),  # Forge's names for Flux's flow-matching Euler
}


def quote(value) -> str:
    """A1111's quote(): a value holding ',', ':' or a newline is written as a JSON string, non-ASCII kept."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def model_name(path: str) -> str:
    """The model as A1111 names it: a checkpoint file's stem, or a diffusers folder's name."""
    model = Path(path).expanduser()
    return model.stem if model.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth") else model.name


def parameters(spec: RenderSpec, family: str, version: str) -> str:
    """The infotext of a render: base pass as A1111's txt2img, the tiled refine as its hires pass.

    A1111's Steps is the whole schedule of which only Steps x denoise run (img2img), so the refine's
    steps are written as the schedule tilefarm runs the last `steps` of (round(steps / denoise)).
    """
    sampler, schedule = A1111_SAMPLERS[resolve_sampler(spec.sampler, family)]
    refine_steps = schedule_length(spec.steps, spec.denoise)
    enhance = spec.workflow == "enhance"
    base_cfg = spec.cfg if enhance else spec.base_cfg or spec.cfg
    # Flux's guidance is distilled into the model: Forge writes it apart from a CFG scale of 1
    hires_cfg_key = "Hires Distilled CFG Scale" if family == "flux" else "Hires CFG Scale"
    params: dict[str, object] = {
        "Steps": refine_steps if enhance else spec.base_steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": 1.0 if family == "flux" else base_cfg,
        "Distilled CFG Scale": base_cfg if family == "flux" else None,
        "Seed": spec.seed,
        "Size": f"{spec.width}x{spec.height}",
        "Model": model_name(spec.model),
        "Denoising strength": spec.denoise,
        "Hires steps": None if enhance else refine_steps,
        hires_cfg_key: None if enhance or spec.cfg == base_cfg else spec.cfg,
        "Version": f"tilefarm {version}",
    }
    line = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {spec.negative}" if spec.negative else ""
    return f"{spec.prompt}{negative}\n{line}".strip()
