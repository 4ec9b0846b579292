"""What a sampler is given besides noise and latents: the prompt's embeddings, and the holds that start
masked pixels later.

Both denoiser families (pipeline.sampling.sampler's SDXL one, pipeline.sampling.flux's) take these, so they live here,
below both: the sampler module knows the Flux denoiser, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def repeat_tokens(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T, D] repeated along the tokens to `length` (a multiple of T): cross-attention over k copies of
    every key gives exactly the same output, so this equals running it unrepeated (ComfyUI comfy/conds.py
    CONDCrossAttn.concat batches conds of different lengths this way)."""
    return embeds if embeds.shape[1] == length else embeds.repeat(1, length // embeds.shape[1], 1)


@dataclass
class PromptEmbeds:
    """Text conditioning for one render, computed once: token and pooled embeddings (SDXL: CLIPs; Flux: T5, CLIP)."""

    embeds: torch.Tensor  # [1, T, D]; SDXL: T = 77 x chunks
    pooled: torch.Tensor  # [1, P]
    negative_embeds: torch.Tensor | None  # None when CFG is off; else as long as embeds
    negative_pooled: torch.Tensor | None
    notes: tuple[str, ...] = ()  # what encoding found (token counts, warnings), for the render's log

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeds:
        """The same conditioning with `fn` applied to each tensor."""
        return PromptEmbeds(
            *(
                None if t is None else fn(t)
                for t in (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled)
            ),
            self.notes,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptEmbeds:
        """The same embeddings on the sampling device and dtype."""
        return self.map(lambda t: t.to(device, dtype))

    @staticmethod
    def stack(items: list[PromptEmbeds]) -> PromptEmbeds:
        """One batch of per-item conditionings (e.g. a different prompt per crop), in order. Token sequences
        of different lengths are repeated to a common multiple, which leaves each item's result unchanged
        (repeat_tokens)."""
        length = math.lcm(*(t.shape[1] for e in items for t in (e.embeds, e.negative_embeds) if t is not None))
        items = [e.map(lambda t: repeat_tokens(t, length) if t.ndim == 3 else t) for e in items]
        first = items[0]
        return PromptEmbeds(
            *(
                None if getattr(first, k) is None else torch.cat([getattr(e, k) for e in items])
                for k in ("embeds", "pooled", "negative_embeds", "negative_pooled")
            )
        )

    def for_batch(self, batch: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeds, pooled) for `batch` items; with CFG the negatives come first, as in diffusers."""
        embeds, pooled = self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1)
        if not cfg:
            return embeds, pooled
        neg = self.negative_embeds.expand(batch, -1, -1)
        neg_pooled = self.negative_pooled.expand(batch, -1)
        return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])


@dataclass(frozen=True)
class Hold:
    """Masked pixels stay on the noised input for the first `steps` steps, so they start later: a lower
    denoise there (per-pixel strength as in Differential Diffusion, Levin & Fried 2023)."""

    mask: torch.Tensor  # [B, 1, h, w] in [0, 1]; 1 = held the full `steps`
    steps: int
    original: torch.Tensor | None = None  # the clean latents (set by refine)
    noise: torch.Tensor | None = None


def holds(hold: Hold | tuple[Hold, ...] | None) -> tuple[Hold, ...]:
    """Every hold of a refine (the detailer's lower denoise, the chess pass's pinned overlaps), in order."""
    if hold is None:
        return ()
    return hold if isinstance(hold, tuple) else (hold,)
