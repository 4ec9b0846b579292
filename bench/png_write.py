"""Writing the output PNG: a float16 image to 8-bit pixels (the whole image at once against farm/output.py's
bands), a render's 8-bit image (its channels first) to the PNG's rows, then Pillow's encoder against
farm/png.py's banded one, on a photo-like image.

The image is smooth gradients plus Gaussian noise of 3% (an all-zero or pure-noise image would flatter or
punish any compressor); both writers get the same uint8 pixels. Prints seconds and megabytes per size, and
checks that both conversions give the same pixels and that each file reads back as them.

    python bench/png_write.py                 # 4096 and 8192 px
    python bench/png_write.py --sizes 8192 --threads 1,2
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from farm.output import to_rgb8  # noqa: E402
from farm.png import LEVEL, write_png  # noqa: E402
from pipeline.geometry.resize import eight_bit_image  # noqa: E402


def photo_like(size: int, seed: int = 0) -> np.ndarray:
    """[size, size, 3] uint8: three smooth gradients plus noise of sd 0.03."""
    y, x = np.linspace(0, 1, size)[:, None], np.linspace(0, 1, size)[None]
    smooth = np.stack([(y + x) / 2, (np.sin(6 * x) * np.cos(4 * y) + 1) / 2, y * (1 - x)], -1)
    noisy = smooth + 0.03 * np.random.default_rng(seed).standard_normal(smooth.shape)
    return np.clip(noisy * 255, 0, 255).round().astype(np.uint8)


def timed(write) -> tuple[float, bytes]:
    out = io.BytesIO()
    start = time.perf_counter()
    write(out)
    return time.perf_counter() - start, out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,8192")
    parser.add_argument("--threads", default="", help="thread counts for farm/png.py (default: 1 and all cores)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    print(f"zlib level {LEVEL} for both; this machine has {cores} cores\n")
    print("| size | step | s | MB | same pixels |\n|---:|---|---:|---:|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        pixels = photo_like(size)
        image = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255).half()  # as a render returns it
        start = time.perf_counter()
        whole = (image[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        seconds = time.perf_counter() - start
        print(f"| {size} | to 8 bits, whole image at once | {seconds:.2f} | | {np.array_equal(whole, pixels)} |")
        start = time.perf_counter()
        banded = to_rgb8(image)
        seconds = time.perf_counter() - start
        print(f"| {size} | to 8 bits, in bands (to_rgb8) | {seconds:.2f} | | {np.array_equal(banded, pixels)} |")
        levels = eight_bit_image(image)  # a render's image: 8-bit levels, channels first
        start = time.perf_counter()
        rows8 = to_rgb8(levels)
        seconds = time.perf_counter() - start
        same = np.array_equal(rows8, pixels)
        print(f"| {size} | 8-bit image to rows, in bands (to_rgb8) | {seconds:.2f} | | {same} |")
        del whole, banded, levels, rows8
        rows = [("PNG, Pillow", lambda out, p=pixels: Image.fromarray(p).save(out, format="PNG", compress_level=LEVEL))]
        rows += [
            (f"PNG, farm/png.py, {n} thread(s)", lambda out, p=pixels, n=n: write_png(out, p, [], n)) for n in threads
        ]
        for name, write in rows:
            seconds, data = timed(write)
            same = np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
            print(f"| {size} | {name} | {seconds:.2f} | {len(data) / 1e6:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
