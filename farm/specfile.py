"""Render specs from TOML files, PNG metadata and command-line flags (flags win)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from pipeline.errors import SpecError, UserError
from pipeline.spec import RenderSpec

PNG_KEY = "tilefarm"


def read_toml(path: str | Path) -> tuple[dict, str | None]:
    """(spec fields, output path or None) from a TOML spec file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file {path} is not valid TOML: {err}") from None
    out = data.pop("out", None)
    if out is not None and not isinstance(out, str):
        raise SpecError(f"spec file {path}: out must be a path string")
    RenderSpec.from_dict(data, str(path))  # reject unknown keys and bad types now, naming the file
    return data, out


def read_png_spec(path: str | Path) -> dict:
    """The spec a tilefarm PNG was rendered from (its metadata)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--from-png {path} does not exist")
    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_KEY)
    except (UnidentifiedImageError, OSError):
        raise UserError(f"--from-png {path} is not a readable PNG image") from None
    if not text:
        raise UserError(
            f"--from-png {path} has no tilefarm metadata: it was written with --no-metadata, or not by farm "
            "render; render from its spec file or flags instead"
        )
    try:
        spec = json.loads(text)["spec"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--from-png {path}: its tilefarm metadata is damaged") from None
    RenderSpec.from_dict(spec, f"{path} metadata")
    return spec


def build_spec(layers: list[tuple[dict, str]]) -> RenderSpec:
    """Merge spec layers in order (later wins) into a validated RenderSpec."""
    merged: dict = {}
    for data, _source in layers:
        RenderSpec.from_dict(data, _source)
        merged.update(data)
    return RenderSpec.from_dict(merged, "spec").validate()
