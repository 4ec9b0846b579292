"""Progress sinks: what stages report their work to (farm/ draws them as bars; tests ignore them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

from pipeline.graph.taskgraph import Task


class Bar:
    """A progress sink: `update(n)` after n units of work."""

    def update(self, n: int = 1) -> None:
        pass


# progress(stage, total units, unit name) -> a context manager yielding a Bar
Progress = Callable[[str, int, str], AbstractContextManager[Bar]]


STEP_GROUPS = ("steps",)  # task groups that count sampler steps (the base's branch tasks), not tiles


def unit_of(label: str) -> str:
    """A bar's unit from its label ('base steps', 'encode'): 'step' for a group of sampler steps, else 'tile'."""
    return "step" if label.split()[-1] in STEP_GROUPS else "tile"


def no_progress(stage: str, total: int, unit: str) -> AbstractContextManager[Bar]:
    return nullcontext(Bar())


@contextmanager
def task_progress(progress: Progress, stage: str, tasks: list[Task]) -> Iterator[Callable[[Task], None]]:
    """One bar per task group of a stage (e.g. 'chess even', 'chess odd'); yields done(task) to report each.

    Groups whose tasks carry no units get no bar: their stage counts its progress itself (see stage_bar)."""
    totals: dict[str, int] = {}
    labels: dict[str, str] = {}
    for task in tasks:
        group = task.group or stage
        totals[group] = totals.get(group, 0) + task.units
        # a graph of several stages (task.stage set) names its bars by group alone
        labels[group] = group if group == stage or task.stage else f"{stage} {group}"
    with ExitStack() as stack:
        bars = {
            group: stack.enter_context(progress(labels[group], n, unit_of(labels[group])))
            for group, n in totals.items()
            if n
        }

        def done(task: Task) -> None:
            bar = bars.get(task.group or stage)
            if bar is not None:
                bar.update(task.units)

        yield done


class StageBar:
    """One bar over many task graphs of a stage (the blended sampler's steps): `tick(n)` after n tiles."""

    def __init__(self, bar: Bar):
        self.bar = bar
        self.count = 0

    def tick(self, n: int) -> None:
        self.count += n
        self.bar.update(n)

    def until(self, count: int) -> None:
        """Catch up to `count` (units replayed from a run folder report no results)."""
        if count > self.count:
            self.tick(count - self.count)


@contextmanager
def stage_bar(ex, stage: str, total: int) -> Iterator[StageBar]:
    """A bar from the executor's progress sink (none when it has no `progress`)."""
    progress: Progress = getattr(ex, "progress", None) or no_progress
    with progress(stage, total, "tile") as bar:
        yield StageBar(bar)
