"""Canvases of a tiled stage: composited as tiles arrive, read as Patches of tiles held on the workers, and their
zeros written ahead of need."""

import random

import torch

from pipeline.geometry.chess import cover_grid
from pipeline.geometry.feather import composite_pass
from pipeline.graph.canvas import Blank, HeldCanvas, TiledCanvas


def test_a_canvas_composited_as_tiles_arrive_equals_the_whole_composite():
    grid = cover_grid(70, 90, 24, 6)
    g = torch.Generator().manual_seed(0)
    results = {t.id: torch.randn(1, 3, t.h, t.w, generator=g) for t in grid.tiles}
    whole = composite_pass(torch.zeros(1, 3, 70, 90), grid, results, mode="paste")
    order = list(results)
    random.Random(1).shuffle(order)
    canvas = TiledCanvas(grid, 3, torch.float32)
    for i, tile_id in enumerate(order):
        canvas.add(tile_id, results[tile_id])
        if i < len(order) - 1:
            assert canvas.results, "a tile is dropped only once every cell under it is composited"
    assert torch.equal(canvas.canvas, whole)  # same sums in the same tile-id order, whatever the arrival order
    assert not canvas.results and not canvas.pending  # nothing held after the last tile


def test_a_patch_of_held_tiles_is_the_same_box_of_the_drivers_composite():
    grid = cover_grid(70, 90, 24, 6)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        results = {t.id: torch.randn(1, 3, t.h, t.w, generator=g).to(dtype) for t in grid.tiles}
        canvas = TiledCanvas(grid, 3, dtype)
        for tile_id, value in results.items():
            canvas.add(tile_id, value)
        held = HeldCanvas(grid, 3, dtype)
        held.task_of.update({t.id: 100 + t.id for t in grid.tiles})  # task ids need not be tile ids
        done = {100 + i: v for i, v in results.items()}
        for box in [(0, 0, 70, 90), (5, 7, 30, 41), (20, 60, 50, 30), (69, 89, 1, 1), (18, 18, 6, 6)]:
            patch = held.read(box)
            assert set(patch.tasks) == held.deps(box) and len(patch.ids) < len(grid.tiles) or box[2:] == (70, 90)
            assert torch.equal(patch.resolved(done).pixels(), canvas.read(box))


def test_a_blank_canvas_is_all_zeros_whether_read_at_once_or_after_its_thread():
    # read at once, the reader writes the chunks the thread has not; a chunk is smaller than the tensor here
    for wait in (False, True):
        garbage = torch.full((1, 3, 700, 900), 7.0, dtype=torch.float16)  # freed memory the next empty may reuse
        del garbage
        blank = Blank((1, 3, 700, 900), torch.float16)
        if wait:
            blank.thread.join()
        canvas = blank.ready()
        assert canvas.shape == (1, 3, 700, 900) and canvas.dtype == torch.float16
        assert not canvas.any() and not blank.thread.is_alive()
        assert blank.ready() is canvas


def test_a_process_ends_cleanly_while_its_canvases_are_still_being_zeroed():
    import subprocess
    import sys

    # a render that fails right after building its graph exits with its canvases' zeros half written: the process
    # must end with its own exit code, not abort (a daemon thread stopped inside torch at exit kills it: SIGABRT)
    script = (
        "import torch\n"
        "from pipeline.graph.canvas import Blank\n"
        "canvases = [Blank((1, 3, 8192, 8192), torch.float16) for _ in range(2)]\n"
        "raise SystemExit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "terminate called" not in done.stderr
