"""Text encoders driven by pipeline.text.prompt: chunked, weighted SDXL embeddings, and Flux's T5 + CLIP-L.

SDXL, both styles: each 77-token window goes through CLIP-L and OpenCLIP-G (hidden layer -2, as
diffusers, ComfyUI and A1111), windows are concatenated on the token axis, the two encoders on the
feature axis, and the pooled vector is OpenCLIP-G's of the first window (A1111 `zs[0].pooled`,
ComfyUI `pooled[0:1]`). Weights follow the style; the empty negative too (A1111: zeros, as its
`force_zero_negative_prompt`; ComfyUI: the encoding of "").
"""

from __future__ import annotations

import math

import torch

from pipeline.sampling.conditioning import PromptEmbeds, repeat_tokens
from pipeline.text.prompt import (
    WINDOW,
    Chunk,
    Parsed,
    Specials,
    chunk_prompt,
    describe_chunks,
    empty_chunk,
    parse_prompt,
)


def comfy_weighting(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z' = (z - z_empty) w + z_empty where w != 1: ComfyUI's interpolation from the empty prompt's
    embedding at the same position (comfy/sd1_clip.py encode_token_weights). z [n, 77, D], weights [n, 77]."""
    w = weights[..., None].float()
    moved = (z.float() - z_empty.float()) * w + z_empty.float()
    return torch.where(w != 1, moved, z.float()).to(z.dtype)


def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's default "Original" emphasis (modules/sd_emphasis.py): z w, then rescaled so each
    window keeps the mean it had unweighted. z [n, 77, D], weights [n, 77]."""
    scaled = z.float() * weights[..., None].float()
    ratio = z.float().mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True)
    return (scaled * ratio).to(z.dtype)


def clip_specials(tokenizer) -> Specials:
    """BOS, EOS, padding and comma ids of a CLIP tokenizer (SDXL's second one pads with '!', id 0)."""
    return Specials(
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tokenizer.get_vocab().get(",</w>"),
    )


def _tokenize(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _run_encoder(encoder, chunks: list[Chunk], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden layer -2 of every window [n, 77, D] and the projected pooled vectors [n, P] (None for CLIP-L)."""
    ids = torch.tensor([c.ids for c in chunks], device=device)
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None
    return out.hidden_states[-2], pooled


def _encode_windows(tokenizer, encoder, parsed: Parsed, style: str, device):
    """One encoder over a prompt's windows: ([1, 77n, D] weighted, pooled of the first window, the windows)."""
    specials = clip_specials(tokenizer)
    chunks = chunk_prompt(parsed, style, _tokenize(tokenizer), specials)
    weights = torch.tensor([c.weights for c in chunks], device=device)
    weighted = parsed.has_weights()
    if style == "comfyui" and weighted:
        z, pooled = _run_encoder(encoder, [*chunks, empty_chunk(specials)], device)
        z = comfy_weighting(z[:-1], z[-1:], weights)
    else:
        z, pooled = _run_encoder(encoder, chunks, device)
        if style == "a1111" and weighted:
            z = a1111_emphasis(z, weights)
    return z.reshape(1, -1, z.shape[-1]), None if pooled is None else pooled[:1], chunks


def encode_sdxl_prompt(pipe, text: str, style: str, device, what: str = "prompt") -> tuple[PromptEmbeds, list[str]]:
    """(embeds [1, 77n, D1+D2], pooled [1, P]) of one prompt, and notes: token count and warnings."""
    parsed = parse_prompt(text, style, what)
    encoders = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)) if e]
    outputs = [_encode_windows(t, e, parsed, style, device) for t, e in encoders]
    length = min(z.shape[1] for z, _, _ in outputs)  # ComfyUI cuts the encoders to the shorter one
    embeds = torch.cat([z[:, :length] for z, _, _ in outputs], dim=-1)
    pooled = outputs[-1][1]
    notes = [describe_chunks(what, outputs[0][2], style), *parsed.warnings]
    return PromptEmbeds(embeds, pooled, None, None), notes


def encode_sdxl(pipe, prompt: str, negative: str, cfg: float, style: str, device) -> PromptEmbeds:
    """The render's SDXL conditioning; with CFG the negative is repeated with the prompt to a common length."""
    positive, notes = encode_sdxl_prompt(pipe, prompt, style, device)
    if cfg <= 1.0:
        return PromptEmbeds(positive.embeds, positive.pooled, None, None, tuple(notes))
    if style == "a1111" and negative == "":
        window = positive.embeds[:, :WINDOW]
        neg = PromptEmbeds(torch.zeros_like(window), torch.zeros_like(positive.pooled), None, None)
        notes.append("negative: empty, encoded as zeros (a1111 style)")
    else:
        neg, neg_notes = encode_sdxl_prompt(pipe, negative, style, device, "negative")
        notes += neg_notes
    a, b = positive.embeds.shape[1], neg.embeds.shape[1]
    length = math.lcm(a, b)
    if a != b:
        notes.append(
            f"prompt ({a // WINDOW} chunks) and negative ({b // WINDOW}) repeated to {length // WINDOW} chunks "
            "for CFG, "
            "which gives the same result as separate passes"
        )
    return PromptEmbeds(
        repeat_tokens(positive.embeds, length),
        positive.pooled,
        repeat_tokens(neg.embeds, length),
        neg.pooled,
        tuple(notes),
    )


def encode_flux(pipe, prompt: str, style: str, device, max_tokens: int) -> PromptEmbeds:
    """Flux reads no weights: the prompt's plain text goes to T5 (up to `max_tokens`, padded to it as
    FluxPipeline does) and CLIP-L (pooled, first 77 tokens), through diffusers' own encode_prompt."""
    parsed = parse_prompt(prompt, style)
    notes = list(parsed.warnings)
    text = parsed.plain_text()
    if parsed.has_weights() or len(parsed.sections) > 1:
        notes.append(f"prompt: Flux ignores prompt weights and BREAK; it reads the plain text {text!r}")
    t5 = len(pipe.tokenizer_2(text)["input_ids"])
    clip = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
    if t5 > max_tokens:
        notes.append(f"prompt: {t5} T5 tokens, but Flux reads {max_tokens}: the last {t5 - max_tokens} are cut")
    cut = f"; CLIP-L's pooled vector reads its first {77 - 2} of {clip}" if clip > 75 else ""
    notes.append(f"prompt: {min(t5, max_tokens)} T5 tokens (of {max_tokens}){cut}")
    embeds, pooled, _ = pipe.encode_prompt(text, prompt_2=None, device=device, max_sequence_length=max_tokens)
    return PromptEmbeds(embeds, pooled, None, None, tuple(notes))
