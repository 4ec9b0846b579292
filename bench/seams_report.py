"""The seam bench's output: markdown tables of its rows and a side-by-side PNG of the same crop per mode."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from seam_metrics import DISTANCE_BINS, ratio

TARGETS = "targets (DESIGN rule 6): CV / reference <= 1.25, band / core <= 1.05, even / odd in 0.95-1.05"
LABEL_H, GAP = 14, 6


@dataclass
class Row:
    """One line of a table: a refine mode (or a decode) and its measures; NaN where it does not apply."""

    name: str
    work: float
    seconds: float
    note: str = ""
    cv_px: float = math.nan
    cv_lat: float = math.nan
    band_core_lat: float = math.nan
    band_core_px: float = math.nan
    even_odd_lat: float = math.nan
    even_odd_px: float = math.nan
    band_core_canvas: float = math.nan
    even_odd_canvas: float = math.nan
    error_band_core: float = math.nan
    error_bins: list[float] = field(default_factory=list)
    core_texture_ratio: float = math.nan


def fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def print_tables(title: str, rows: list[Row], decode: list[Row], show_canvas: bool) -> None:
    """The geometry's tables: modes, error by distance to a tile edge, the decode alone."""
    print(f"\n### {title}\n\n{TARGETS}; lat = refined latent, px = pixels decoded untiled\n")
    header = ["mode", "work x", "refine s", "CV px", "CV lat", "band/core lat", "band/core px", "even/odd lat",
              "even/odd px", "error band/core", "note"]  # fmt: skip
    lines = [
        [r.name, fmt(r.work, 2), fmt(r.seconds, 1), fmt(r.cv_px), fmt(r.cv_lat), fmt(r.band_core_lat),
         fmt(r.band_core_px), fmt(r.even_odd_lat), fmt(r.even_odd_px), fmt(r.error_band_core), r.note]
        for r in rows
    ]  # fmt: skip
    print(table(header, lines))
    ref = next((r for r in rows if r.name == "reference"), None)
    if ref is not None:
        print("\nthe same measures over the reference's (1.00 = as untiled; raw values above also depend on the "
              "content under the bands and cores, these do not):\n")  # fmt: skip
        keys = ("cv_px", "cv_lat", "band_core_lat", "band_core_px", "even_odd_lat", "even_odd_px")
        lines = [[r.name] + [fmt(ratio(getattr(r, k), getattr(ref, k)), 2) for k in keys] + [""]
                 for r in rows if r is not ref and not math.isnan(r.cv_px)]  # fmt: skip
        print(table(["mode", "CV px", "CV lat", "band/core lat", "band/core px", "even/odd lat", "even/odd px", ""],
                    lines))  # fmt: skip
    bins = [f"{lo}-{hi - 1}" for lo, hi in zip(DISTANCE_BINS, DISTANCE_BINS[1:], strict=False)]
    bins.append(f">={DISTANCE_BINS[-1]}")
    measured = [r for r in rows if r.error_bins]
    if measured:
        print("\nmean latent error |tiled - reference| by distance to the nearest tile edge (latent px):\n")
        lines = [[r.name] + [fmt(e) for e in r.error_bins] + [fmt(r.error_band_core), ""] for r in measured]
        print(table(["mode", *bins, "band/core", ""], lines))
    if show_canvas:
        print("\nwhole latent canvas (the tables above measure the window):\n")
        lines = [[r.name, fmt(r.band_core_canvas), fmt(r.even_odd_canvas), ""] for r in rows
                 if not math.isnan(r.band_core_canvas)]  # fmt: skip
        print(table(["mode", "band/core lat", "even/odd lat", ""], lines))
    print("\nthe decode alone (bands and cores of the decode's tile grid):\n")
    lines = [[r.name, fmt(r.cv_px), fmt(r.band_core_px), fmt(r.even_odd_px), fmt(r.core_texture_ratio), r.note]
             for r in decode]  # fmt: skip
    print(table(["decode", "CV px", "band/core px", "even/odd px", "core texture / untiled", "note"], lines))


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [0, 1] -> an RGB PIL image."""
    array = (pixels[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


def write_strip(
    path: Path, outcomes: list, crop: tuple[int, int, int, int], f: int, title: str, edges=((), ())
) -> Path:
    """The same crop (latent box inside the window) from each outcome, labelled; top row decoded untiled,
    bottom row with the project's tiled decode (blank where there is no latent). Red ticks beside each
    panel mark the refine grid's tile edges (`edges`: rows and columns in px of the crop)."""
    y, x, h, w = (v * f for v in crop)
    cols = len(outcomes)
    sheet = Image.new("RGB", (cols * (w + GAP) + GAP, LABEL_H + 2 * (h + LABEL_H + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    note = "Top: decoded untiled; bottom: the project's tiled decode; red ticks: tile edges"
    draw.text((2, 1), f"{title}. {note}", fill="black")
    for i, o in enumerate(outcomes):
        left = GAP + i * (w + GAP)
        for j, pixels in enumerate((o.pixels, o.tiled_pixels)):
            top = LABEL_H + j * (h + LABEL_H + GAP)
            label = o.name if pixels is not None else f"{o.name}: " + ("no latent" if j == 0 else "not decoded tiled")
            label = label if j == 0 or pixels is None else f"{label} (tiled decode)"
            draw.text((left + 2, top + 1), label, fill="black")
            if pixels is None:
                continue
            sheet.paste(to_image(pixels[..., y : y + h, x : x + w]), (left, top + LABEL_H))
            for r in edges[0]:
                draw.line((left - GAP, top + LABEL_H + r, left - 1, top + LABEL_H + r), fill="red")
            for c in edges[1]:
                draw.line((left + c, top + LABEL_H - 4, left + c, top + LABEL_H - 1), fill="red")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
