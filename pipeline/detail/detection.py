"""Detections for the semantic detailer: what to look for (concepts), what was found, and which to keep.

A detector turns the base image and a list of concepts into candidates; `select` then applies each
concept's selection rule. Any detector that implements `Detector` plugs in (SAM3 is in
pipeline.detail.sam3); the detailer sees only `Detection`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import SpecError

if TYPE_CHECKING:  # a spec's concepts are checked without loading torch
    import torch

SELECTIONS = ("largest", "center", "first", "all")
MAX_LAYER = 5  # layers 0..5, as in seed 002's detection pipe: 0 structural (faces), 1+ details (eyes)


@dataclass(frozen=True)
class Concept:
    """One thing to find and refine: the detector's text prompt and how its crops are refined."""

    name: str  # the detector's text prompt, e.g. "face"
    prompt: str = ""  # refinement prompt; empty = the render's prompt
    layer: int = 0  # layers run in order; a layer's crops read the canvas the layer before left
    selection: str = "largest"  # largest | center | first (most confident) | all
    max_objects: int = 1  # kept per concept (ignored by "all")
    threshold: float = 0.25  # detector confidence to keep a candidate
    denoise: float = 0.45

    @classmethod
    def from_dict(cls, data: dict, source: str) -> Concept:
        """A concept from a TOML table / JSON object, naming `source` for unknown keys or bad types."""
        if not isinstance(data, dict):
            raise SpecError(f"{source}: each concept must be a table with at least a name, got {data!r}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SpecError(f"{source}: unknown concept key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if not data.get("name"):
            raise SpecError(f'{source}: a concept has no name; give the detector\'s text prompt, e.g. name = "face"')
        values = {}
        for key, value in data.items():
            kind = type(getattr(cls("x"), key))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise SpecError(f"{source}: concept {data['name']!r}: {key} must be a {kind.__name__}, got {value!r}")
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> Concept:
        """Check each value before any model loads; raise SpecError naming the concept and the fix."""
        where = f"concept {self.name!r}"
        if not self.name.strip():
            raise SpecError('a concept has an empty name; give the detector\'s text prompt, e.g. "face"')
        if self.selection not in SELECTIONS:
            raise SpecError(f"{where}: selection {self.selection!r} is unknown; choose one of {', '.join(SELECTIONS)}")
        if not 0 <= self.layer <= MAX_LAYER:
            raise SpecError(f"{where}: layer {self.layer} must be in 0..{MAX_LAYER} (0 = structural, e.g. faces)")
        if not 0 <= self.threshold <= 1:
            raise SpecError(f"{where}: threshold {self.threshold} must be a confidence in [0, 1] (e.g. 0.25)")
        if self.max_objects < 1:
            raise SpecError(f"{where}: max_objects {self.max_objects} must be at least 1")
        if not 0 < self.denoise <= 1:
            raise SpecError(f"{where}: denoise {self.denoise} must be in (0, 1]; 0.3-0.5 keeps the object's shape")
        return self


def parse_concept(text: str) -> dict:
    """'face;layer=0;denoise=0.5;prompt=a detailed face' -> concept fields (the --concept flag)."""
    name, *pairs = [part.strip() for part in text.split(";")]
    data: dict = {"name": name}
    kinds = {f.name: type(getattr(Concept("x"), f.name)) for f in fields(Concept)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise SpecError(
                f"--concept {text!r}: {pair!r} is not KEY=VALUE with a known key ({', '.join(list(kinds)[1:])})"
            )
        try:
            data[key] = kinds[key](value.strip())
        except ValueError:
            raise SpecError(f"--concept {text!r}: {key} must be a {kinds[key].__name__}, got {value!r}") from None
    return data


@dataclass
class Detection:
    """One object found on the detection image: a normalised box, its mask there, and where it came from."""

    concept: str
    layer: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image width / height
    mask: torch.Tensor  # [h, w] float in [0, 1] over the whole detection image
    score: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


class Detector(Protocol):
    """Finds concepts on an image: every candidate at or above each concept's threshold, most confident first."""

    def detect(self, image: torch.Tensor, concepts: Sequence[Concept]) -> list[Detection]: ...


def select(candidates: list[Detection], concept: Concept) -> list[Detection]:
    """Apply a concept's selection rule to its candidates (most confident first) and cap the count."""
    mine = [d for d in candidates if d.concept == concept.name and d.score >= concept.threshold]
    if concept.selection == "all":
        return mine
    if concept.selection == "largest":
        mine = sorted(mine, key=lambda d: -d.area)
    elif concept.selection == "center":
        mine = sorted(mine, key=lambda d: (d.center[0] - 0.5) ** 2 + (d.center[1] - 0.5) ** 2)
    return mine[: concept.max_objects]


def choose(candidates: list[Detection], concepts: Sequence[Concept]) -> list[Detection]:
    """The detections the detailer refines, ordered by layer, then by concept order, then by selection."""
    chosen = [(c.layer, i, d) for i, c in enumerate(concepts) for d in select(candidates, c)]
    return [d for _, _, d in sorted(chosen, key=lambda item: (item[0], item[1]))]
