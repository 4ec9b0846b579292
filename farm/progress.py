"""Progress bars per stage and per tile batch (tqdm on stderr)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm.auto import tqdm


def tqdm_progress(enabled: bool = True):
    """A pipeline Progress that draws one tqdm bar per stage or pass."""

    @contextmanager
    def progress(stage: str, total: int, unit: str):
        with tqdm(total=total, desc=f"{stage:<11}", unit=unit, disable=not enabled, file=sys.stderr, leave=True) as bar:
            yield bar

    return progress
