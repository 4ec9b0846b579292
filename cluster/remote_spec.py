"""What the farm accepts from a remote client (the HTTP API): only files under its model roots, a size it
can hold, no output path (results stay in the farm's results folder). No Ray here."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from pipeline.errors import SpecError, UserError
from pipeline.spec import RenderSpec

PATH_FIELDS = ("model", "upscaler", "model_config", "vae", "clip_l", "t5", "t5_tokenizer", "comfy_models")
PATH_FIELDS += ("detector", "lora", "input")
MAX_REMOTE_SIDE = 16384  # the farm's largest target side for remote specs (the product's 16K)


class Forbidden(UserError):
    """A remote spec names a file the farm does not serve (outside its model roots)."""


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()  # symlinks and '..' resolved: a link out of a root is outside it
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def check_remote_spec(data, roots: list[Path], max_side: int = MAX_REMOTE_SIDE) -> RenderSpec:
    """The validated spec of a remote request, or SpecError (bad values) / Forbidden (files outside the roots)."""
    if not isinstance(data, dict):
        raise SpecError("the request's 'spec' must be an object of spec fields (e.g. model, prompt, width, height)")
    if "out" in data:
        raise SpecError("a remote spec cannot name an output file: the farm keeps the image, download it by id")
    spec = RenderSpec.from_dict(data, "request spec")
    if spec.width > max_side or spec.height > max_side:
        raise SpecError(
            f"size {spec.width}x{spec.height}: this farm renders at most {max_side} px per side for remote clients"
        )
    named = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name in PATH_FIELDS and getattr(spec, f.name)}
    if named and not roots:
        raise Forbidden(
            "this farm serves no model files to remote clients: start it with `farm up --model-root DIR` "
            f"(the request names {', '.join(named)})"
        )
    where = ", ".join(str(r) for r in roots)
    for name, value in named.items():
        path = Path(value)
        if ".." in path.parts:
            raise Forbidden(f"{name} {value!r}: '..' is not allowed in a remote spec; give a path under {where}")
        absolute = path.is_absolute()
        comfy_name = name in ("model", "vae", "clip_l", "t5") and spec.comfy_models and not absolute
        if not absolute and not comfy_name:
            raise Forbidden(f"{name} {value!r}: give an absolute path under the farm's model roots ({where})")
        if absolute and not _inside(path, roots):
            raise Forbidden(f"{name} {value!r} is outside the farm's model roots ({where})")
    spec = spec.validate()
    from pipeline.loading.flux_parts import resolve_spec_files

    resolved = resolve_spec_files(spec)  # names under comfy_models become paths: check those too
    for name in PATH_FIELDS:
        value = getattr(resolved, name)
        if value and not _inside(Path(value), roots):
            raise Forbidden(f"{name} {value!r} is outside the farm's model roots ({where})")
    return spec
