"""Flux from ComfyUI's split files: a BFL-layout transformer, the `ae` VAE, CLIP-L and T5 (fp16, fp8 or scaled fp8).

`--model flux1-dev.safetensors --vae ae.safetensors --clip-l clip_l.safetensors --t5 t5xxl_fp16.safetensors`,
or `--comfy-models DIR` to find them in a ComfyUI models/ folder (unet/ or diffusion_models/, vae/,
clip/ or text_encoders/). Each part is classified from its header first, so a wrong file is named
before any weights load. T5's tokenizer cannot ship with tilefarm: it comes from `--t5-tokenizer`
(a tokenizer.json), from the ComfyUI install around `--comfy-models`, or from beside the T5 file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ModelFileError
from pipeline.loading.flux_keys import apply_plan, bfl_plan, flux_transformer_config
from pipeline.loading.model_file import FileKind, inspect_file
from pipeline.loading.single_file import build, clip_l_model, dequantise, part, read_tensors, shapes_of
from pipeline.loading.single_file_configs import FLUX_SCHEDULER, clip_tokenizer, t5_config, vae_config

PART_FOLDERS = {  # ComfyUI models/ sub-folders, current name first
    "model": ("diffusion_models", "unet"),
    "vae": ("vae",),
    "clip_l": ("text_encoders", "clip"),
    "t5": ("text_encoders", "clip"),
}
PART_KINDS = {"vae": "vae", "clip_l": "clip-l", "t5": "t5"}
PART_FLAGS = {"model": "--model", "vae": "--vae", "clip_l": "--clip-l", "t5": "--t5", "t5_tokenizer": "--t5-tokenizer"}
COMFY_T5_TOKENIZER = Path("comfy") / "text_encoders" / "t5_tokenizer" / "tokenizer.json"


@dataclass(frozen=True)
class FluxParts:
    """The files beside a Flux transformer; empty = look in `comfy_models` (or not given)."""

    vae: str = ""
    clip_l: str = ""
    t5: str = ""
    t5_tokenizer: str = ""
    comfy_models: str = ""

    def given(self) -> bool:
        return any((self.vae, self.clip_l, self.t5, self.t5_tokenizer, self.comfy_models))


def _candidates(root: Path, role: str) -> list[Path]:
    return sorted(p for sub in PART_FOLDERS[role] for p in (root / sub).glob("*.safetensors"))


def find_in_comfy(name: str, role: str, comfy_models: str) -> Path:
    """A part's path: as given if it exists, else by name (or, when unnamed, by kind) under a ComfyUI models/."""
    if name and (Path(name).expanduser().exists() or not comfy_models):
        return Path(name).expanduser()
    flag = PART_FLAGS[role]
    if not comfy_models:
        raise ModelFileError(f"a Flux transformer file needs {flag} (or --comfy-models DIR to find it)")
    root = Path(comfy_models).expanduser()
    if not root.is_dir():
        raise ModelFileError(f"--comfy-models {root} is not a folder; pass ComfyUI's models/ folder")
    if name:
        for sub in PART_FOLDERS[role]:
            if (root / sub / name).exists():
                return root / sub / name
        folders = " or ".join(f"{root / sub}" for sub in PART_FOLDERS[role])
        raise ModelFileError(f"{flag} {name} is neither a file nor in {folders}")
    wanted = PART_KINDS[role]
    found = [p for p in _candidates(root, role) if _kind_or_none(p) == wanted]
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ModelFileError(
            f"{flag} not given and {len(found)} {wanted} files in {root} ({listed}); name one with {flag} FILE"
        )
    return found[0]


def _kind_or_none(path: Path) -> str | None:
    try:
        return inspect_file(path).kind
    except ModelFileError:
        return None


def check_part(path: Path, role: str) -> FileKind:
    """The part's kind, refused with its name when it is not what the flag says (an SDXL VAE as Flux's, ...)."""
    flag = PART_FLAGS[role]
    if not path.is_file():
        raise ModelFileError(f"{flag} {path} does not exist; check the path")
    kind = inspect_file(path)
    if role == "vae" and kind.kind == "vae" and kind.family != "flux":
        raise ModelFileError(
            f"{flag} {path} is {kind.describe()}; Flux needs its 16-channel VAE (ae.safetensors from FLUX.1)"
        )
    if kind.kind != PART_KINDS[role]:
        wanted = FileKind(PART_KINDS[role], "flux" if role == "vae" else "")
        raise ModelFileError(f"{flag} {path} is {kind.describe()}, not {wanted.describe()}")
    if kind.missing_scales:
        dequantise({}, path, kind)  # refuses, naming the file
    if kind.kind == "vae" and kind.layout != "ldm":
        raise ModelFileError(f"{flag} {path} is a VAE in diffusers layout; pass the original ae.safetensors")
    return kind


def t5_tokenizer_file(parts: FluxParts, t5: Path) -> Path:
    """tokenizer.json for T5: the flag, ComfyUI's copy next to its models/, or one beside the T5 file."""
    if parts.t5_tokenizer:
        given = Path(parts.t5_tokenizer).expanduser()
        path = given / "tokenizer.json" if given.is_dir() else given
        if not path.is_file():
            raise ModelFileError(f"--t5-tokenizer {given} is not a tokenizer.json file (or a folder holding one)")
        return path
    options = [t5.parent / "tokenizer.json"]
    if parts.comfy_models:
        options.insert(0, Path(parts.comfy_models).expanduser().resolve().parent / COMFY_T5_TOKENIZER)
    for path in options:
        if path.is_file():
            return path
    raise ModelFileError(
        f"no T5 tokenizer for {t5}: pass --t5-tokenizer FILE (tokenizer.json of google/t5-v1_1-xxl, of "
        "FLUX.1's tokenizer_2/, or ComfyUI's comfy/text_encoders/t5_tokenizer/); tilefarm cannot download it"
    )


def _t5_model(path: Path, kind: FileKind, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    state = part(read_tensors(path, kind), kind.prefix)
    # the embedding is tied: files keep one name or both
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a in state and b not in state:
            state[b] = state[a]
    config = T5Config(**t5_config(shapes_of(state)))
    return build(lambda: T5EncoderModel(config), state, dtype, "T5 text encoder", path)


def load_flux_parts(path: Path, kind: FileKind, parts: FluxParts, dtype: torch.dtype):
    """FluxPipeline from a BFL-layout transformer file and its VAE, CLIP-L and T5 files."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import T5TokenizerFast

    from pipeline.loading.single_file import on_meta

    files = {role: find_in_comfy(getattr(parts, role), role, parts.comfy_models) for role in PART_KINDS}
    kinds = {role: check_part(file, role) for role, file in files.items()}
    tokenizer_file = t5_tokenizer_file(parts, files["t5"])

    state = part(read_tensors(path, kind), kind.prefix)
    shapes = shapes_of(state)
    config = flux_transformer_config(shapes)
    try:
        converted = apply_plan(state, bfl_plan(shapes))
    except KeyError as err:
        raise ModelFileError(f"{path}: a Flux transformer without tensor {err}; the file is damaged") from None
    transformer = build(lambda: FluxTransformer2DModel(**config), converted, dtype, "Flux transformer", path)

    vae_state = part(read_tensors(files["vae"], kinds["vae"]), kinds["vae"].prefix)
    vae_cfg = vae_config(shapes_of(vae_state), "flux")
    vae_state = convert_ldm_vae_checkpoint(vae_state, dict(on_meta(lambda: AutoencoderKL(**vae_cfg)).config))
    vae = build(lambda: AutoencoderKL(**vae_cfg), vae_state, dtype, "VAE", files["vae"])

    clip_state = part(read_tensors(files["clip_l"], kinds["clip_l"]), kinds["clip_l"].prefix)
    text_encoder = clip_l_model(clip_state, dtype, files["clip_l"])
    text_encoder_2 = _t5_model(files["t5"], kinds["t5"], dtype)
    tokenizer_2 = T5TokenizerFast(tokenizer_file=str(tokenizer_file), extra_ids=0, model_max_length=512)
    if len(tokenizer_2) > text_encoder_2.config.vocab_size:
        raise ModelFileError(
            f"T5 tokenizer {tokenizer_file} has {len(tokenizer_2)} tokens but {files['t5']} embeds only "
            f"{text_encoder_2.config.vocab_size}; pass the tokenizer that belongs to this T5 (--t5-tokenizer)"
        )
    scheduler = dict(FLUX_SCHEDULER)
    if kind.variant == "schnell":  # FLUX.1-schnell's scheduler: a fixed shift of 1, no resolution-dependent shift
        scheduler.update(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def resolve_spec_files(spec):
    """The spec with the model and Flux part names found (under comfy_models) and each part checked."""
    from dataclasses import replace

    from pipeline.errors import SpecError

    if spec.comfy_models and spec.model and not Path(spec.model).expanduser().exists():
        spec = replace(spec, model=str(find_in_comfy(spec.model, "model", spec.comfy_models)))
    model = Path(spec.model).expanduser()
    kind = inspect_file(model) if model.is_file() and not spec.model_config else None
    if kind is None or kind.kind != "flux-transformer" or kind.layout != "bfl":
        given = [PART_FLAGS[role] for role in ("vae", "clip_l", "t5", "t5_tokenizer") if getattr(spec, role)]
        if given:
            what = kind.describe() if kind else "a folder" if model.is_dir() else "loaded with --model-config"
            raise SpecError(
                f"{', '.join(given)}: these are for a Flux transformer file in BFL layout (flux1-dev.safetensors); "
                f"model {model} is {what}"
            )
        return spec
    parts = FluxParts(spec.vae, spec.clip_l, spec.t5, spec.t5_tokenizer, spec.comfy_models)
    files = {role: find_in_comfy(getattr(parts, role), role, parts.comfy_models) for role in PART_KINDS}
    for role, file in files.items():
        check_part(file, role)
    tokenizer = t5_tokenizer_file(parts, files["t5"])
    return replace(
        spec, vae=str(files["vae"]), clip_l=str(files["clip_l"]), t5=str(files["t5"]), t5_tokenizer=str(tokenizer)
    )
