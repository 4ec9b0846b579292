"""Prompts as ComfyUI and A1111 users write them: weight syntax, refused constructs, 77-token chunks.

Pure text and token-id work (the tokenizer is passed in); pipeline.text.text_encode runs the encoders.

- comfyui (comfy/sd1_clip.py `token_weights`, `tokenize_with_weights`): `(x)` is x1.1 per level,
  `(x:1.3)` *sets* the weight (`((x:1.3))` = 1.3), `\\(` and `\\)` escape; square brackets, BREAK
  and AND are plain text. Each weighted run shorter than 8 tokens stays in one 77-token window.
  Unbalanced parentheses are refused with their position: ComfyUI would keep them as text, and a
  stray `)` there silently turns every later group into text too.
- a1111 (modules/prompt_parser.py `parse_prompt_attention`, sd_hijack_clip.py `tokenize_line`):
  `(x)` x1.1, `[x]` /1.1, `(x:1.3)` x1.3, all multiplying when nested; `\\(`, `\\[`, `\\\\` escape;
  an unclosed bracket weights the rest of the prompt (as A1111); `BREAK` starts a new chunk; a full
  chunk moves the words after its last comma (at most 20 tokens back) to the next chunk.
- Both refuse what needs more than one conditioning or a network change: prompt editing
  `[a:b:0.5]`, alternation `[a|b]`, A1111's `AND`, `<lora:...>` tags (use --lora), and ComfyUI's
  `embedding:name`. Passing them through as text would render something the user did not write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import SpecError

STYLES = ("comfyui", "a1111")
WINDOW = 77  # CLIP's context: BOS + 75 content tokens + EOS
CONTENT = WINDOW - 2
UP = 1.1  # (x): both tools' emphasis step
COMFY_WORD = 8  # ComfyUI's max_word_length: shorter runs are never split across windows
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_A1111_TOKEN = re.compile(
    r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.I)
_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*:\s*[+-]?[\d.]+\s*(?<!\\)\]")
_ALTERNATION = re.compile(r"(?<!\\)\[[^\[\]]*\|[^\[\]]*(?<!\\)\]")
_AND = re.compile(r"\bAND\b")
_EMBEDDING = re.compile(r"(?:^|[\s,(])embedding:(\S+)")
_SQUARE = re.compile(r"(?<!\\)\[[^\[\]]*\]")


@dataclass(frozen=True)
class Parsed:
    """A prompt as weighted text runs, in sections (A1111's BREAK separates them), plus warnings."""

    sections: tuple[tuple[tuple[str, float], ...], ...]
    warnings: tuple[str, ...] = ()

    def has_weights(self) -> bool:
        return any(w != 1.0 for section in self.sections for _, w in section)

    def plain_text(self) -> str:
        """The text with weights and BREAKs dropped (what a model that ignores weights reads)."""
        return " ".join("".join(text for text, _ in section).strip() for section in self.sections).strip()


def _where(text: str, start: int) -> str:
    return f"at character {start + 1}"


def _refuse_unsupported(text: str, style: str, what: str) -> None:
    """SpecError for constructs neither encoder can honour, naming the construct and its position."""
    if m := _NETWORK_TAG.search(text):
        raise SpecError(
            f"{what}: {m.group(0)!r} {_where(text, m.start())} is an A1111 network tag; tilefarm does not load "
            "networks from the prompt: remove it and pass --lora FILE --lora-strength W"
        )
    for pattern, name in ((_EDITING, "prompt editing [from:to:when]"), (_ALTERNATION, "alternation [a|b]")):
        if m := pattern.search(text):
            raise SpecError(
                f"{what}: {m.group(0)!r} {_where(text, m.start())} is A1111 {name}, which changes the prompt "
                "during sampling; tilefarm encodes one prompt per render: write the words you want instead"
            )
    if style == "a1111" and (m := _AND.search(text)):
        raise SpecError(
            f"{what}: 'AND' {_where(text, m.start())} is A1111 composable diffusion (several prompts summed), "
            "which tilefarm does not run; join the parts into one prompt (or write 'and' in lower case)"
        )
    if style == "comfyui" and (m := _EMBEDDING.search(text)):
        raise SpecError(
            f"{what}: 'embedding:{m.group(1)}' {_where(text, m.start())} is a ComfyUI textual-inversion "
            "embedding, which tilefarm does not load; describe it in words instead"
        )


def parse_prompt(text: str, style: str, what: str = "prompt") -> Parsed:
    """Weighted runs of `text` by the rules of `style` ('comfyui' or 'a1111'); SpecError for what neither runs."""
    if style not in STYLES:
        raise SpecError(f"prompt_style {style!r}: choose one of {', '.join(STYLES)}")
    _refuse_unsupported(text, style, what)
    if style == "a1111":
        return _finite(Parsed(_parse_a1111(text, what)), what)
    warnings = []
    if m := _SQUARE.search(text):
        warnings.append(
            f"{what}: {m.group(0)!r} stays text in comfyui style (ComfyUI has no [x] de-emphasis); "
            "write (x:0.9), or pass --prompt-style a1111"
        )
    for word in ("BREAK", "AND"):
        if re.search(rf"\b{word}\b", text):
            warnings.append(f"{what}: {word} is plain text in comfyui style; pass --prompt-style a1111 for A1111's")
    return _finite(Parsed((_parse_comfy(text, what),), tuple(warnings)), what)


def _finite(parsed: Parsed, what: str) -> Parsed:
    for section in parsed.sections:
        for text, weight in section:
            if not math.isfinite(weight):
                raise SpecError(f"{what}: {text!r} has weight {weight}; write a finite number such as (x:1.2)")
    return parsed


def _parse_comfy(text: str, what: str) -> tuple[tuple[str, float], ...]:
    """ComfyUI's token_weights over `text`, with unbalanced parentheses refused instead of kept as text."""
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    open_at: list[int] = []
    for i, char in enumerate(escaped):
        if char == "(":
            open_at.append(i)
        elif char == ")" and not open_at:
            raise SpecError(
                f"{what}: ')' {_where(text, i)} closes no '('; remove it or write \\) for a literal parenthesis"
            )
        elif char == ")":
            open_at.pop()
    if open_at:
        raise SpecError(
            f"{what}: '(' {_where(text, open_at[-1])} is never closed; close it or write \\( for a literal parenthesis"
        )
    runs = [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in _comfy_weights(escaped, 1.0)]
    return tuple(_merge(runs))


def _comfy_groups(text: str) -> list[str]:
    """Top-level pieces: plain text and whole '(...)' groups (comfy/sd1_clip.py parse_parentheses)."""
    pieces, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                pieces.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")":
            depth -= 1
            current += char
            if depth == 0:
                pieces.append(current)
                current = ""
        else:
            current += char
    return pieces + [current] if current else pieces


def _comfy_weights(text: str, weight: float) -> list[tuple[str, float]]:
    """(x) multiplies by 1.1; (x:w) sets w, whatever encloses it (comfy/sd1_clip.py token_weights)."""
    out: list[tuple[str, float]] = []
    for piece in _comfy_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, inner_weight = piece[1:-1], weight * UP
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass  # "(a:b)" is text at x1.1, as in ComfyUI
            out += _comfy_weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def _parse_a1111(text: str, what: str) -> tuple[tuple[tuple[str, float], ...], ...]:
    """A1111's parse_prompt_attention; BREAK splits sections wherever it stands (A1111 loses a BREAK
    inside brackets to the bracket's weight and encodes the word)."""
    runs: list[list] = []  # [text, weight] or None for a BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run is not None:
                run[1] *= factor

    for m in _A1111_TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise SpecError(
                    f"{what}: weight {weight!r} {_where(text, m.start())} is not a number; write e.g. (x:1.2)"
                ) from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), UP)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / UP)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(None)
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, UP)
    for start in square_open:
        multiply(start, 1 / UP)
    sections: list[list[tuple[str, float]]] = [[]]
    for run in runs:
        if run is None:
            sections.append([])
        else:
            sections[-1].append((run[0], run[1]))
    return tuple(tuple(_merge(s)) for s in sections)


def _merge(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Neighbouring runs of equal weight as one run; empty runs dropped."""
    out: list[tuple[str, float]] = []
    for text, weight in runs:
        if not text:
            continue
        if out and out[-1][1] == weight:
            out[-1] = (out[-1][0] + text, weight)
        else:
            out.append((text, weight))
    return out


@dataclass(frozen=True)
class Chunk:
    """One 77-token CLIP window: BOS, content, EOS, padding, and each token's weight."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    tokens: int  # content tokens (no BOS, EOS or padding)


@dataclass(frozen=True)
class Specials:
    """A CLIP tokenizer's special ids (SDXL's second tokenizer pads with id 0, not EOS)."""

    bos: int
    eos: int
    pad: int
    comma: int | None = None  # the id of ',' as a word (A1111's comma backtrack)


def _window(content: list[tuple[int, float]], s: Specials) -> Chunk:
    pad = WINDOW - 2 - len(content)
    ids = (s.bos, *(t for t, _ in content), s.eos, *([s.pad] * pad))
    weights = (1.0, *(w for _, w in content), 1.0, *([1.0] * pad))
    return Chunk(ids, weights, len(content))


def empty_chunk(s: Specials) -> Chunk:
    """The window of the empty prompt: ComfyUI's gen_empty_tokens, A1111's empty chunk."""
    return _window([], s)


def chunk_prompt(parsed: Parsed, style: str, tokenize: Callable[[str], list[int]], s: Specials) -> list[Chunk]:
    """77-token windows of a parsed prompt, by the style's rule; a long prompt gives several, never cut."""
    if style == "comfyui":
        return _chunk_comfy([r for section in parsed.sections for r in section], tokenize, s)
    return _chunk_a1111(parsed.sections, tokenize, s)


def _chunk_comfy(runs, tokenize, s: Specials) -> list[Chunk]:
    """comfy/sd1_clip.py tokenize_with_weights: a run under 8 tokens that does not fit moves whole to
    the next window; a longer run is split where the window ends."""
    chunks, current = [], []
    for text, weight in runs:
        group = [(t, weight) for t in tokenize(text)]
        large = len(group) >= COMFY_WORD
        while group:
            if len(current) + len(group) > CONTENT:
                if large:
                    room = CONTENT - len(current)
                    current, group = current + group[:room], group[room:]
                chunks.append(_window(current, s))
                current = []
            else:
                current, group = current + group, []
    return chunks + [_window(current, s)]


def _chunk_a1111(sections, tokenize, s: Specials) -> list[Chunk]:
    """sd_hijack_clip.py tokenize_line: BREAK closes the chunk; a full chunk whose last comma is at most
    20 tokens back moves the tokens after that comma to the next chunk."""
    chunks: list[Chunk] = []
    current: list[tuple[int, float]] = []
    last_comma = -1
    for n, section in enumerate(sections):
        if n:
            chunks.append(_window(current, s))
            current, last_comma = [], -1
        for text, weight in section:
            for token in tokenize(text):
                if token == s.comma:
                    last_comma = len(current)
                elif len(current) == CONTENT and last_comma != -1 and len(current) - last_comma <= COMMA_BACKTRACK:
                    moved = current[last_comma + 1 :]
                    chunks.append(_window(current[: last_comma + 1], s))
                    current, last_comma = moved, -1
                if len(current) == CONTENT:
                    chunks.append(_window(current, s))
                    current, last_comma = [], -1
                current.append((token, weight))
    if current or not chunks:
        chunks.append(_window(current, s))
    return chunks


def describe_chunks(what: str, chunks: list[Chunk], style: str) -> str:
    """'prompt: 152 tokens in 3 chunks (comfyui style)'."""
    tokens = sum(c.tokens for c in chunks)
    return f"{what}: {tokens} tokens in {len(chunks)} chunk{'s' if len(chunks) != 1 else ''} ({style} style)"
