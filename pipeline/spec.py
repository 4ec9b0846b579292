"""RenderSpec: everything that decides a render's pixels, as plain data you can save, diff and replay."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields, replace

from pipeline.detail.detection import Concept
from pipeline.errors import SpecError
from pipeline.sampling.samplers import SAMPLERS
from pipeline.text.prompt import STYLES as PROMPT_STYLES
from pipeline.text.prompt import parse_prompt

MAX_SIDE = 65536  # beyond this no machine we target holds the pixel buffers
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
MAX_LORA_STRENGTH = 10.0  # beyond this a LoRA's delta swamps the weights it is added to
GRIDS = ("chess", "fit")
# how tiles become one picture (DESIGN rule 6): blend = one sampler over the canvas with the tiles'
# predictions blended at every step; chess = even tiles, then odd tiles whose overlaps stay pinned to
# the even result; chess-original = seed 002's even/odd passes, odd tiles refined again and feathered
DECODE_NORMS = ("tile", "exact")  # the tiled decode's GroupNorm statistics: each tile's own, or the image's
TILINGS = ("blend", "chess", "chess-original")  # seed 002's round(canvas/tile) + 1 tiles, or tiles sized to the canvas
MAX_PIXEL_UPSCALE = 8
# top-down: seed 002 (plan at the target, refine in chess tiles); two-pass: seeds 000 and 003 (base,
# latent upscale 2x, refine, decode, pixel upscale); enhance: seed 001 (an input image upscaled, then refined)
WORKFLOWS = ("top-down", "two-pass", "enhance")
_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string"}
RANDOM_SEED = -1  # draw a seed when the render is planned (A1111's -1)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2^64 - 1; 2^64 overflows
DRAWN_SEEDS = 4294967294  # A1111 draws random.randrange(4294967294): the value fits its and Civitai's fields


@dataclass
class RenderSpec:
    """A render: workflow, target size, prompts, models and sampling settings (pixels unless noted)."""

    workflow: str = "top-down"  # one of WORKFLOWS
    model: str = ""
    prompt: str = ""
    negative: str = ""
    prompt_style: str = "comfyui"  # how prompts are weighted and chunked: one of PROMPT_STYLES (pipeline.text.prompt)
    width: int = 4096
    height: int = 4096
    seed: int = RANDOM_SEED  # -1: drawn by with_seed when the render is planned, then recorded
    steps: int = 20  # refine steps that run per tile (see pipeline.sampling.schedule)
    base_steps: int = 30
    cfg: float = 7.0
    denoise: float = 0.35
    tile: int = 1024
    tile_batch: int = 4  # 0 = the largest batch whose memory estimate fits the device (4 on a CPU or cluster)
    sampler: str = "auto"  # auto = the model family's default (SDXL: dpmpp_2m_karras, Flux: flow_euler)
    upscaler: str = ""  # spandrel model file; empty = bicubic resize of the base
    upscale_tile: int = 512
    native: int = 0  # the model's native size in px; 0 = read from the model
    model_config: str = ""  # diffusers folder with configs, for single-file checkpoints
    vae: str = ""  # Flux from parts: the ae.safetensors VAE (a path, or a name under comfy_models)
    clip_l: str = ""  # Flux from parts: the CLIP-L text encoder file
    t5: str = ""  # Flux from parts: the T5 text encoder file (fp16, fp8 or scaled fp8)
    t5_tokenizer: str = ""  # Flux from parts: T5's tokenizer.json
    comfy_models: str = ""  # a ComfyUI models/ folder to find the model and its parts in
    precision: str = "auto"
    detector: str = ""  # SAM3 folder for the semantic detailer
    concepts: tuple[Concept, ...] = ()  # what the detailer looks for; none = no detail stage
    detail_padding: float = 0.25  # context around a detection, per side, as a fraction of its longer side
    detail_chess_denoise: float = 0.0  # chess denoise inside detailed areas; 0 = the same as elsewhere
    lora: str = ""  # LoRA .safetensors fused into the model; empty = none
    lora_strength: float = 1.0  # LoRA strength on the denoiser (UNet or Flux transformer)
    lora_text_strength: float = 1.0  # LoRA strength on the text encoder(s)
    tiling: str = "blend"  # one of TILINGS
    decode_norm: str = "tile"  # one of DECODE_NORMS
    grid: str = "chess"  # "fit": fewest tiles near `tile` px, sized to the canvas (less tile area)
    fit_overlap: int = 128  # with grid "fit": minimum overlap between neighbouring tiles, px
    base_cfg: float = 0.0  # guidance of the base pass; 0 = the same as cfg
    base_width: int = 0  # two-pass: the base size (px) the first pass samples at
    base_height: int = 0
    pixel_upscale: int = 2  # two-pass: x the decoded size (1 = off); enhance: x the input size
    input: str = ""  # enhance: the input image (PNG, JPEG, ...)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, source: str) -> RenderSpec:
        """Build a spec from a mapping (TOML, PNG metadata), naming `source` for unknown keys or bad types."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
        values = {}
        for key, value in data.items():
            if key == "concepts":
                if not isinstance(value, list | tuple):
                    raise SpecError(f"{source}: concepts must be a list of tables ([[concepts]] in TOML)")
                values[key] = tuple(
                    c if isinstance(c, Concept) else Concept.from_dict(c, f"{source} concepts[{i}]")
                    for i, c in enumerate(value)
                )
                continue
            kind = type(getattr(cls(), key))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise SpecError(f"{source}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> RenderSpec:
        """Check every value against its rule before any model is loaded; raise SpecError naming the fix."""
        if self.workflow not in WORKFLOWS:
            raise SpecError(f"workflow {self.workflow!r}: choose one of {', '.join(WORKFLOWS)}")
        _check_size(self.width, self.height)
        if not self.model:
            raise SpecError("no model given: pass --model PATH (a diffusers SDXL or Flux folder or .safetensors file)")
        self._validate_prompts()
        if self.steps < 1:
            raise SpecError(f"steps {self.steps}: must be at least 1 (steps that run per tile)")
        if self.base_steps < 1:
            raise SpecError(f"base_steps {self.base_steps}: must be at least 1")
        if not 0 < self.denoise <= 1:
            raise SpecError(f"denoise {self.denoise}: must be in (0, 1]; 0.2-0.5 keeps the upscaled image's layout")
        if not 1 <= self.cfg <= 30:
            raise SpecError(f"cfg {self.cfg}: must be in [1, 30]; 1 turns classifier-free guidance off")
        if self.base_cfg and not 1 <= self.base_cfg <= 30:
            raise SpecError(f"base_cfg {self.base_cfg}: must be in [1, 30], or 0 for the same as cfg")
        if self.tile < 64 or self.tile % 8:
            raise SpecError(f"tile {self.tile}: must be a multiple of 8 and at least 64 (e.g. 1024)")
        if self.workflow == "top-down" and (self.tile > self.width or self.tile > self.height):
            raise SpecError(
                f"tile {self.tile} is larger than the target {self.width}x{self.height}; "
                f"use a tile of at most {min(self.width, self.height) // 8 * 8}"
            )
        if self.tile_batch < 0:
            raise SpecError(f"tile_batch {self.tile_batch}: must be at least 1 (or 0 to pick it from free memory)")
        if self.sampler not in SAMPLERS:
            raise SpecError(f"sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.upscale_tile < 64:
            raise SpecError(f"upscale_tile {self.upscale_tile}: must be at least 64 px")
        if self.native and (self.native < 64 or self.native % 8):
            raise SpecError(f"native {self.native}: must be a multiple of 8 and at least 64 (0 = from the model)")
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.seed != RANDOM_SEED and not 0 <= self.seed < SEED_LIMIT:
            raise SpecError(
                f"seed {self.seed}: must be in [0, 2^64 - 1] (18446744073709551615), or -1 for a random seed"
            )
        for name in ("lora_strength", "lora_text_strength"):
            if not -MAX_LORA_STRENGTH <= getattr(self, name) <= MAX_LORA_STRENGTH:
                raise SpecError(
                    f"{name} {getattr(self, name)}: must be in [-{MAX_LORA_STRENGTH:g}, {MAX_LORA_STRENGTH:g}] "
                    "(1 = as trained, 0 = off, negative inverts it)"
                )
        self._validate_detail()
        if self.tiling not in TILINGS:
            raise SpecError(f"tiling {self.tiling!r}: choose one of {', '.join(TILINGS)}")
        if self.decode_norm not in DECODE_NORMS:
            raise SpecError(f"decode_norm {self.decode_norm!r}: choose one of {', '.join(DECODE_NORMS)}")
        if self.grid not in GRIDS:
            raise SpecError(f"grid {self.grid!r}: choose one of {', '.join(GRIDS)}")
        if self.grid == "fit" and (self.fit_overlap % 8 or not 0 <= self.fit_overlap < self.tile):
            raise SpecError(
                f"fit_overlap {self.fit_overlap}: must be a multiple of 8 in [0, tile {self.tile}) (e.g. 128)"
            )
        self._validate_workflow()
        return self

    def _validate_prompts(self) -> None:
        """Refuse, before any model loads, a prompt style we do not know and syntax the style cannot run."""
        if self.prompt_style not in PROMPT_STYLES:
            raise SpecError(
                f"prompt_style {self.prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)} "
                "(how the prompt's weights, e.g. (word:1.2), are read)"
            )
        parse_prompt(self.prompt, self.prompt_style, "prompt")
        parse_prompt(self.negative, self.prompt_style, "negative")
        for concept in self.concepts:
            parse_prompt(concept.prompt, self.prompt_style, f"concept {concept.name!r} prompt")

    def _validate_workflow(self) -> None:
        if not 1 <= self.pixel_upscale <= MAX_PIXEL_UPSCALE:
            raise SpecError(f"pixel_upscale {self.pixel_upscale}: must be in [1, {MAX_PIXEL_UPSCALE}] (1 = off)")
        if self.workflow == "two-pass":
            if self.base_width <= 0 or self.base_height <= 0:
                raise SpecError(
                    f"base size {self.base_width}x{self.base_height}: the two-pass workflow samples its first "
                    "pass at --base-size WxH (e.g. 960x544); give it, or use --preset sdxl-4k / hires-fix"
                )
            _check_size(self.base_width, self.base_height, "base size")
        elif self.base_width or self.base_height:
            raise SpecError(
                f"base size {self.base_width}x{self.base_height} is used by the two-pass workflow only; "
                f"the {self.workflow} workflow decides its own base (drop --base-size or pass --workflow two-pass)"
            )
        if self.workflow == "enhance" and not self.input:
            raise SpecError("the enhance workflow refines an input image: pass --input PATH (a PNG or JPEG)")
        if self.input and self.workflow != "enhance":
            raise SpecError(
                f"input {self.input}: input images are read by the enhance workflow only; "
                "pass --preset upscale-enhance (or --workflow enhance), or drop --input"
            )
        if self.concepts and self.workflow != "top-down":
            raise SpecError(f"the semantic detailer (concepts) runs in the top-down workflow, not {self.workflow}")

    def _validate_detail(self) -> None:
        names = [c.validate().name for c in self.concepts]
        if len(set(names)) != len(names):
            raise SpecError(f"concepts {names}: each concept name may appear once (it is the detector's prompt)")
        if self.concepts and not self.detector:
            raise SpecError("the spec lists concepts but no detector: pass --detector PATH (a SAM3 model folder)")
        if not 0 <= self.detail_chess_denoise <= self.denoise:
            raise SpecError(
                f"detail_chess_denoise {self.detail_chess_denoise}: must be in [0, denoise {self.denoise}] "
                "(a lower denoise where the detailer refined; 0 = no difference)"
            )
        if not 0 <= self.detail_padding <= 2:
            raise SpecError(f"detail_padding {self.detail_padding}: must be in [0, 2] (0.25 = a quarter per side)")


def with_seed(spec: RenderSpec) -> RenderSpec:
    """The spec with a random seed drawn if it has none (-1), as A1111's get_fixed_seed does."""
    if spec.seed != RANDOM_SEED:
        return spec
    return replace(spec, seed=secrets.randbelow(DRAWN_SEEDS))


def _check_size(width: int, height: int, what: str = "size") -> None:
    if width <= 0 or height <= 0:
        raise SpecError(f"{what} {width}x{height}: width and height must be positive (e.g. 4096x4096)")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise SpecError(f"{what} {width}x{height}: each side must be at most {MAX_SIDE} px")
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            low, high = value // 8 * 8, value // 8 * 8 + 8
            raise SpecError(
                f"{what} {width}x{height}: {name} {value} must be a multiple of 8 (the VAE factor); "
                f"try {low or high} or {high}"
            )


def parse_size(text: str) -> tuple[int, int]:
    """'4096x2304' -> (4096, 2304)."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2:
        raise SpecError(f"size {text!r}: write it as WIDTHxHEIGHT, e.g. 4096x4096")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise SpecError(f"size {text!r}: write it as WIDTHxHEIGHT with whole numbers, e.g. 4096x4096") from None
