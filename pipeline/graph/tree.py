"""Walking the values a task returns: tensors nested in tuples, lists, dicts and dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def walk(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply `leaf` to every value inside tuples, lists, dicts and dataclasses; rebuild only what changed."""
    if isinstance(value, tuple):
        return tuple(walk(v, leaf) for v in value)
    if isinstance(value, list):
        return [walk(v, leaf) for v in value]
    if isinstance(value, dict):
        return {k: walk(v, leaf) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {f.name: walk(getattr(value, f.name), leaf) for f in dataclasses.fields(value)}
        if any(changed[k] is not getattr(value, k) for k in changed):
            return dataclasses.replace(value, **changed)
        return value
    return leaf(value)


def leaves(value: Any) -> list:
    """Every leaf value inside tuples, lists, dicts and dataclasses, in order."""
    found: list = []
    walk(value, lambda v: found.append(v) or v)
    return found
