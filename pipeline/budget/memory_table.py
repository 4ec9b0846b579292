"""The activation table: traced peak bytes per pixel of each network call, keyed by architecture.

memory_table.json is written by bench/memory_table.py (fake-device traces of the full-size SDXL
and FLUX.1-dev configs, the tiny test models and two upscalers, fitted over three sizes). An
entry matches a model when the config fields that shape its activations (ARCH_FIELDS) are equal,
so every fine-tune of SDXL finds the SDXL entry. An architecture the table does not hold is
scaled from its family's entry by the width of its full-resolution layers (the first block's
channels, or the transformer's inner width): those layers hold most of the activation peak, and
the scaled SDXL entry lands within 15% of the tiny SDXL's own trace (tests/test_memory.py).
Tracing an unknown model at planning time instead would import diffusers and take seconds to
minutes for a large network; the 1.2x margin of the pre-flight covers the scaling error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TABLE_PATH = Path(__file__).parents[1].joinpath("memory_table.json")

ARCH_FIELDS = {
    "unet": [
        "block_out_channels",
        "layers_per_block",
        "transformer_layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "down_block_types",
        "up_block_types",
    ],
    "transformer": ["num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "in_channels"],
    "vae_decode": ["block_out_channels", "layers_per_block", "latent_channels", "up_block_types"],
    "vae_encode": ["block_out_channels", "layers_per_block", "latent_channels", "down_block_types"],
    "upscaler": ["arch", "num_filters", "num_blocks", "num_feat", "num_conv", "scale"],
}

FAMILY_ENTRY = {"sdxl": "sdxl", "flux": "flux"}  # the entry an unknown architecture of a family scales from


def arch_match(stage: str, config: dict) -> dict:
    """The config fields that decide a network's activations (lists, so JSON and config files compare equal)."""
    return {k: list(v) if isinstance(v, tuple) else v for k in ARCH_FIELDS[stage] if (v := config.get(k)) is not None}


def width(stage: str, config: dict) -> int:
    """Channels of the full-resolution layers: what activations per pixel scale with."""
    if stage == "transformer":
        return config["num_attention_heads"] * config["attention_head_dim"]
    if stage == "upscaler":
        return config.get("num_filters") or config.get("num_feat") or 64
    return config["block_out_channels"][0]


@dataclass(frozen=True)
class Curve:
    """Peak activation bytes of one network call per batch item: a*px + c*px^2 + b (px: the item's pixels)."""

    a: float
    b: float
    c: float = 0.0
    source: str = ""  # which table entry, and how it was adapted

    def at(self, px: int) -> int:
        return max(0, int(self.a * px + self.c * px * px + self.b))

    def scaled(self, factor: float, why: str) -> Curve:
        return Curve(self.a * factor, self.b * factor, self.c * factor, f"{self.source}, {why}")


@cache
def table() -> tuple[dict, ...]:
    return tuple(json.loads(TABLE_PATH.read_text())["entries"])


def _entry(stage: str, name: str) -> dict:
    return next(e for e in table() if e["stage"] == stage and e["name"] == name)


def curve(stage: str, config: dict | None, family: str, dtype_bytes: int) -> Curve:
    """The activation curve of `stage` for a model config at `dtype_bytes` per element; the family's
    full-size entry when there is no config (a single-file checkpoint), scaled by width when unknown."""
    found = None
    if config is not None:
        want = arch_match(stage, config)
        found = next((e for e in table() if e["stage"] == stage and e["match"] == want), None)
    entry = found or _entry(stage, FAMILY_ENTRY.get(family, family))
    result = Curve(entry["a"], entry["b"], entry["c"], f"table entry {entry['name']} {stage}")
    if found is None and config is not None:
        ref, mine = width(stage, entry["match"]), width(stage, config)
        if mine != ref:
            result = result.scaled(mine / ref, f"scaled by width {mine}/{ref}")
    if dtype_bytes != entry["dtype_bytes"]:
        result = result.scaled(dtype_bytes / entry["dtype_bytes"], f"at {dtype_bytes} bytes per value")
    return result
