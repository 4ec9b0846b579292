"""Outputs: a PNG with the full spec and A1111's parameters in its metadata, written atomically (never half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from farm import __version__
from farm.infotext import parameters
from farm.png import write_png
from farm.specfile import PNG_KEY
from pipeline.errors import UserError
from pipeline.geometry.resize import BAND_ROWS, eight_bit
from pipeline.plan import RenderPlan

A1111_KEY = "parameters"  # the text chunk A1111, Civitai and most image browsers read


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output we could not or should not write."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path}: the output must be a .png file (it carries the spec in its metadata)")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / 'render.png'}")
    if path.exists() and not overwrite:
        raise UserError(f"--out {path} already exists; pass --overwrite to replace it or choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {path}: folder {parent} does not exist; create it first")
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise UserError(
            f"--out {path}: folder {parent} is not writable ({err.strerror}); choose a folder you can write to"
        ) from None
    return path


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] 8-bit levels (a render's image), or pixels in [0, 1] -> [H, W, 3] uint8 (eight_bit), band by
    band: a band stays in the CPU's cache (bench/png_write.py)."""
    _, channels, height, width = image.shape
    array = torch.empty(height, width, channels, dtype=torch.uint8)
    for y in range(0, height, BAND_ROWS):
        array[y : y + BAND_ROWS].copy_(eight_bit(image[0, :, y : y + BAND_ROWS]).permute(1, 2, 0))
    return array.numpy()


def png_metadata(plan: RenderPlan):
    """The PNG text chunks: 'tilefarm' (the full spec, for --from-png), A1111's 'parameters', Software,
    Comment (the plan). Pillow writes tEXt, or iTXt for text beyond Latin-1 (a prompt in any script)."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text(PNG_KEY, json.dumps({"version": __version__, "spec": plan.spec.to_dict()}))
    meta.add_text(A1111_KEY, parameters(plan.spec, plan.model.family, __version__))
    meta.add_text("Software", f"tilefarm {__version__}")
    meta.add_text("Comment", plan.describe())
    return meta


def save_png(image: torch.Tensor, plan: RenderPlan, path: Path, metadata: bool = True) -> Path:
    """Write the image with png_metadata, or with no text chunks at all (--no-metadata)."""
    meta = png_metadata(plan) if metadata else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_png(handle, to_rgb8(image), [c[:2] for c in meta.chunks] if meta else [])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def output_name(out_dir: str | Path, prefix: str, stem: str = "", when: float | None = None) -> Path:
    """DIR/PREFIX_[STEM_]YYYYmmdd-HHMMSS.png (seed 001's naming); a name already taken gets _2, _3, ..."""
    import time

    folder = Path(out_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--out-dir {folder} is not a folder; create it first")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    base = "_".join(part for part in (prefix, stem, stamp) if part)
    path, n = folder / f"{base}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{base}_{n}.png"
    return path
