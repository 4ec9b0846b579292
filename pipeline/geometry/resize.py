"""The output image: exact sizes (resize pixels to cover the requested size, then centre-crop the excess) and the
pixels' dtypes (float16 canvases, the 8-bit image)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing (a plain bicubic downscale aliases), clamped to [0, 1]; computed in
    float32 (PyTorch's CPU kernel has no float16) and returned in the image's dtype."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1).to(image.dtype)


# the dtype of the graph's pixel canvases (upscaled, decoded), as their tiles travel and as the driver keeps them:
# an image's worth (float16 rounds a value in [0, 1] by at most 2^-12, a sixteenth of an 8-bit level) in half
# the bytes of float32
PIXELS = torch.float16

# the final image's dtype: the 8-bit levels a PNG stores (a quarter of float32's bytes)
IMAGE = torch.uint8
BAND_ROWS = 16  # rows converted to 8 bits at a time: a band's float32 copy stays in the CPU's cache


def eight_bit(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> 8-bit levels round(255 * clamp(x, 0, 1)) (sample depth scaling, W3C PNG 12.5), scaled in
    float32 (float16 cannot hold x * 255 exactly) on the pixels' device; 8-bit levels are returned as they are."""
    if pixels.dtype == IMAGE:
        return pixels
    return pixels.float().clamp(0, 1).mul_(255).round_().to(IMAGE)  # whole numbers in 0-255: the cast is exact


def eight_bit_image(image: torch.Tensor) -> torch.Tensor:
    """eight_bit over a whole [B, C, H, W] image, band by band: at 8K the whole image at once was five passes over
    805 MB of float32, 1.3 s on a 2-core VM against 0.34 s in bands, for the same bytes (bench/png_write.py)."""
    if image.dtype == IMAGE:
        return image
    out = torch.empty(image.shape, dtype=IMAGE, device=image.device)
    for y in range(0, image.shape[-2], BAND_ROWS):
        out[..., y : y + BAND_ROWS, :] = eight_bit(image[..., y : y + BAND_ROWS, :])
    return out


RESIZE_MARGIN = 4  # input px read beyond a span: the bicubic kernel's support is 2 px when enlarging


def doubling_factor(src: int, dst: int) -> int:
    """k when dst = k x src for a power of two k >= 2 (an enlargement a crop reproduces bit for bit: every
    sample position (i + 0.5) / k - 0.5 is exact in binary), else 0."""
    k = dst // src if src and dst % src == 0 else 0
    return k if k >= 2 and k & (k - 1) == 0 else 0


def source_span(start: int, length: int, k: int, size: int) -> tuple[int, int]:
    """The input rows [a, b) a k-times bicubic enlargement reads for its output rows [start, start + length),
    with the kernel's support (PyTorch's upsample_bicubic2d_aa) and a margin; clipped to the input's size."""
    return max(0, start // k - RESIZE_MARGIN), min(size, -(-(start + length) // k) + RESIZE_MARGIN)


@dataclass
class Enlarge:
    """A box of a k-times enlargement, sent as the input span it is made from (1/k^2 of the pixels): the worker
    enlarges the span and crops the box, which equals the same box of the whole image enlarged (source_span's
    margin), rounded to PIXELS as the graph's pixel canvases are."""

    span: torch.Tensor  # [B, C, ih, iw]: the input rows and columns source_span gives for the box (or a Patch of them)
    factor: int
    top: int  # the box's offset in the enlarged span
    left: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the pixels it stands for."""
        return (*self.span.shape[:2], self.height, self.width)

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The box's pixels [B, C, height, width] in PIXELS, enlarged on `device`."""
        k, (ih, iw) = self.factor, self.span.shape[-2:]
        out = resize(as_pixels(self.span, device).to(device).float(), ih * k, iw * k)
        return out[..., self.top : self.top + self.height, self.left : self.left + self.width].to(PIXELS)


def as_pixels(pixels, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixels a worker was sent: a tensor as it is; an Enlarge enlarged, or a Patch of a canvas
    (pipeline.graph.canvas) composited, on the worker's device."""
    return pixels if isinstance(pixels, torch.Tensor) else pixels.pixels(device)


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The smallest size with the input's aspect ratio that covers the target on both axes."""
    scale = max(target_h / height, target_w / width)
    return max(target_h, math.ceil(height * scale - 1e-6)), max(target_w, math.ceil(width * scale - 1e-6))


def fit_exact(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, H, W] -> exactly [B, 3, height, width]: aspect kept, excess cropped from the centre."""
    ch, cw = cover_size(image.shape[-2], image.shape[-1], height, width)
    image = resize(image, ch, cw)
    top, left = (ch - height) // 2, (cw - width) // 2
    return image[..., top : top + height, left : left + width]


def describe_fit(src_h: int, src_w: int, height: int, width: int) -> str:
    """What fit_exact does to a src_w x src_h image, in words: the resize and the rows or columns cropped."""
    ch, cw = cover_size(src_h, src_w, height, width)
    resized = "no resize" if (ch, cw) == (src_h, src_w) else f"resize {src_w}x{src_h} -> {cw}x{ch}"
    if (ch, cw) == (height, width):
        return f"{resized}, no crop" if resized != "no resize" else f"{width}x{height}, unchanged"
    cut = [f"{ch - height} rows ({(ch - height) // 2} top)"] if ch > height else []
    cut += [f"{cw - width} columns ({(cw - width) // 2} left)"] if cw > width else []
    return f"{resized}, centre crop of {' and '.join(cut)} -> {width}x{height}"
