"""Input images for the enhance workflow: read and checked before any model loads.

Every refusal names the file, what is wrong with it and how to fix it. 8-bit grayscale, palette
and RGBA images are accepted (converted to RGB; an alpha channel is dropped, with a note).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16/32-bit single channel
_TO_8_BIT = "convert it to 8 bits per channel first, e.g. `magick IN -depth 8 OUT.png`"


def _raw_mode(image) -> str:
    """The decoder's raw mode (e.g. 'RGB;16B' for a 16-bit PNG that PIL would silently cut to 8 bits)."""
    tile = getattr(image, "tile", None) or []
    args = tile[0][3] if tile and len(tile[0]) > 3 else ""
    return args if isinstance(args, str) else str(args[0] if args else "")


def load_input_image(path: str | Path, max_side: int, note=lambda text: None) -> torch.Tensor:
    """The image at `path` as [1, 3, H, W] float32 in [0, 1]; a UserError for anything we cannot use."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    name = f"input {path}"
    if not path.exists():
        raise UserError(f"{name} does not exist; check the path")
    if path.is_dir():
        raise UserError(f"{name} is a folder; pass one image file, or render a folder with `farm batch FOLDER`")
    if path.stat().st_size == 0:
        raise UserError(f"{name} is empty (0 bytes); the file was not written completely, export it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{name} holds more than {Image.MAX_IMAGE_PIXELS} pixels (refused as a possible decompression "
            f"bomb); inputs may be at most {max_side} px per side"
        ) from None
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image tilefarm can read; pass a PNG or JPEG (or WebP, BMP, TIFF)") from None
    with image:
        width, height = image.size
        if max(width, height) > max_side:
            raise UserError(
                f"{name} is {width}x{height} px; inputs may be at most {max_side} px per side for this render "
                "(the output must stay within the size limit); downscale it first"
            )
        if image.mode == "CMYK":
            raise UserError(f"{name} is a CMYK image (print colours); convert it to RGB first: `magick IN OUT.png`")
        if image.mode in _HIGH_DEPTH_MODES or ";16" in _raw_mode(image):
            raise UserError(f"{name} has 16 or more bits per channel (mode {image.mode}); {_TO_8_BIT}")
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "1"):
            raise UserError(f"{name} has colour mode {image.mode}, which tilefarm does not read; convert it to RGB")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"{name} is damaged ({err}); export or download it again") from None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            note(f"{name}: its alpha channel is dropped (the render is RGB)")
        rgb = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    return pixels.float() / 255
