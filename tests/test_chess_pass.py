"""The chess task graph: odd batches wait only for the even batches under them."""

import torch

from pipeline.geometry.chess import batches, chess_grid
from pipeline.geometry.feather import composite_pass
from pipeline.graph.taskgraph import check_graph
from pipeline.sampling.chess_pass import RefineSettings, chess_tasks


def _graph(batch):
    grid = chess_grid(1024, 1024, 128)  # 8K canvas: 9 x 9 tiles
    even, odd = tuple(batches(grid.even, batch)), tuple(batches(grid.odd, batch))
    canvas = torch.randn(1, 4, 1024, 1024)
    tasks = chess_tasks(grid, even, odd, canvas, None, None, RefineSettings(1.0, 1, 0.5, "euler"))
    return grid, even, odd, canvas, tasks


def test_odd_batches_depend_only_on_overlapping_even_batches():
    grid, even, odd, _, tasks = _graph(1)
    check_graph(tasks)
    assert [t.group for t in tasks] == ["even"] * len(even) + ["odd"] * len(odd)
    first_odd = tasks[len(even)]  # tile (0, 1): its even neighbours are (0, 0), (0, 2), (1, 1)
    neighbours = {(t.row, t.col) for i in first_odd.deps for t in even[i]}
    assert neighbours == {(0, 0), (0, 2), (1, 1)}
    assert max(len(t.deps) for t in tasks[len(even) :]) <= 4  # never a barrier on all 41 even tiles


def test_odd_inputs_from_partial_even_results_equal_the_finished_even_canvas():
    grid, even, odd, canvas, tasks = _graph(4)
    results = {i: {t.id: torch.randn(1, 4, t.h, t.w) for t in batch} for i, batch in enumerate(even)}
    full_even = composite_pass(canvas, grid, {k: v for r in results.values() for k, v in r.items()}, "paste")
    for task in tasks[len(even) :]:
        partial = {i: results[i] for i in task.deps}  # only what this task waited for
        tiles, crops, *_ = task.args(partial)
        for i, t in enumerate(tiles):
            assert torch.equal(crops[i : i + 1], full_even[..., t.y : t.y + t.h, t.x : t.x + t.w])
