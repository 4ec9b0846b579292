"""The render as one graph: canvases composited as their tiles arrive equal the stage-by-stage composites,
and a resumed graph runs only what it still needs."""

import random

import torch

from farm.executor import LocalExecutor
from pipeline.geometry.chess import cover_grid
from pipeline.geometry.feather import composite_pass
from pipeline.geometry.resize import Enlarge
from pipeline.graph.canvas import BLEND_GROUP, Blank, HeldCanvas, Patch, TiledCanvas, blend_cells
from pipeline.graph.checkpoint import Checkpointed
from pipeline.graph.stream import Enlarged, Fixed, Graph, Resized, add_tiled


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


class Doubler:
    """A worker whose one method doubles a crop: enough to see which tasks ran."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def double(self, crop):
        self.calls += 1
        return crop * 2


class Memory:
    def __init__(self):
        self.kept = {}

    def load(self, key):
        return self.kept.get(key)

    def save(self, key, value):
        self.kept[key] = value


def _two_stage_graph(image):
    """upscale-like stage (recomputed on resume, never stored) -> encode-like stage (stored), tile by tile."""
    graph = Graph()
    first = add_tiled(graph, "upscale", "double", Fixed(image), cover_grid(40, 40, 16, 4), 1, 1, 1)
    second = add_tiled(graph, "encode", "double", first, cover_grid(40, 40, 12, 4), 1, 1, 1)
    return graph, first, second


def test_tasks_wait_only_for_the_tiles_they_read():
    graph, first, _ = _two_stage_graph(torch.zeros(1, 1, 40, 40))
    boxes = {first.task_of[t.id]: (t.y, t.x, t.h, t.w) for t in first.grid.tiles}
    sizes = []
    for task in graph.tasks:
        if task.stage == "encode":
            _, y, x, h, w = task.boxes[0]
            over = {i for i, (by, bx, bh, bw) in boxes.items() if by < y + h < by + bh + h and bx < x + w < bx + bw + w}
            assert task.deps == over
            sizes.append(len(over))
    assert min(sizes) < len(boxes)  # a corner tile does not wait for the far side of the canvas


def test_a_resumed_graph_runs_only_what_it_still_needs():
    image = torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(2))
    graph, _, whole = _two_stage_graph(image)
    worker, store = Doubler(), Memory()
    graph.run(Checkpointed(LocalExecutor(worker), store))
    assert torch.allclose(whole.canvas, image * 4)
    encode = [t for t in graph.tasks if t.stage == "encode"]
    assert len(store.kept) == len(encode)  # upscale tiles are recomputed, never stored

    store.kept.pop(f"render.1.{encode[0].id}")  # one encode tile lost: only its upscale tiles run again
    graph, _, resumed = _two_stage_graph(image)
    worker = Doubler()
    graph.run(Checkpointed(LocalExecutor(worker), store))
    assert worker.calls == 1 + len(encode[0].deps)
    assert torch.equal(resumed.canvas, whole.canvas)


class Toy:
    """Worker methods whose results depend on their inputs, so a task that read its input too early shows."""

    device = torch.device("cpu")

    def halve(self, crop):
        return crop * 0.5

    def predict(self, tiles, latents, t, cond, cfg):
        return {tile.id: torch.tanh(latents[i : i + 1]) for i, tile in enumerate(tiles)}

    def blend_cells(self, grid, cells, dtype, *values):
        return blend_cells(grid, cells, values, dtype, {})  # what TileWorker.blend_cells runs, on its device


class AnyOrder:
    """An executor that runs any ready task, chosen at random: the orders a farm's timing can produce."""

    def __init__(self, worker, seed: int):
        self.worker, self.random = worker, random.Random(seed)

    def run(self, stage, tasks, on_result=None):
        results, todo = {}, list(tasks)
        while todo:
            task = self.random.choice([t for t in todo if t.deps <= results.keys()])
            todo.remove(task)
            value = getattr(self.worker, task.method)(*task.args(results))
            results[task.id] = value if task.keep else None
            if on_result:
                on_result(task, value)
        return results


def _encode_blend_decode(image, on_workers: bool = False):
    from diffusers import EulerDiscreteScheduler

    from pipeline.geometry.chess import batches, chess_grid
    from pipeline.sampling.blend import add_blend
    from pipeline.sampling.chess_pass import RefineSettings

    graph = Graph()
    small = add_tiled(graph, "upscale", "halve", Fixed(image), cover_grid(20, 28, 8, 2), 1, 1, 4)
    pixels = Resized(small, (20, 28), 2, 4, block=16)  # enlarged 2x block by block as the encode reads it
    latents = add_tiled(graph, "encode", "halve", pixels, cover_grid(40, 56, 12, 4), 1, 1, 4)
    grid = chess_grid(40, 56, 16)
    noise = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(5))
    config = dict(EulerDiscreteScheduler().config)
    settings = RefineSettings(1.0, 3, 0.5, "euler")
    stepper = add_blend(graph, grid, tuple(batches(grid.tiles, 2)), latents, noise, None, settings, "sdxl", config)
    decode_grid = cover_grid(40, 56, 10, 2)
    decoded = add_tiled(graph, "decode", "halve", stepper, decode_grid, 1, 1, 4, torch.float16, on_workers=on_workers)
    return graph, decoded


def test_every_task_waits_for_all_it_reads_in_any_order():
    image = torch.rand(1, 4, 20, 28, generator=torch.Generator().manual_seed(4)) * 2
    graph, reference = _encode_blend_decode(image)
    graph.run(LocalExecutor(Toy()))  # id order
    for seed in range(3):
        graph, decoded = _encode_blend_decode(image)
        graph.run(AnyOrder(Toy(), seed))
        assert torch.equal(decoded.canvas, reference.canvas)


def test_tiles_blended_on_the_workers_give_the_drivers_composite_in_any_order():
    image = torch.rand(1, 4, 20, 28, generator=torch.Generator().manual_seed(4)) * 2
    graph, reference = _encode_blend_decode(image)
    graph.run(LocalExecutor(Toy()))
    for seed in range(3):
        graph, decoded = _encode_blend_decode(image, on_workers=True)
        graph.run(AnyOrder(Toy(), seed))
        assert torch.equal(decoded.canvas, reference.canvas)  # float16, rounded from the same float32 sums
    tiles = [t for t in graph.tasks if t.stage == "decode"]
    blends = [t for t in graph.tasks if t.stage == "decode blend"]
    by_id = {t.id: t for t in graph.tasks}
    assert all(t.handle for t in tiles) and not any(t.handle for t in blends)
    # one block per 2 x 2 tiles (BLEND_GROUP) of the 5 x 7 grid, its task right after its square's last tile's
    assert BLEND_GROUP == 2 and len(blends) == 3 * 4
    assert all(by_id[blend.id - 1].stage == "decode" and blend.id - 1 in blend.deps for blend in blends)
    for last, cells in decoded.blocks.items():  # a block waits for exactly the tiles over its cells
        assert by_id[decoded.block_task[last]].deps == {decoded.task_of[t] for cell in cells for t in cell.tiles}
    assert {len(t.deps) for t in blends} == {4, 6, 9}  # corner, edge and inner squares: their tiles and the next
    cells = [c for block in decoded.blocks.values() for c in block]
    assert sum(c.h * c.w for c in cells) == 40 * 56  # the blocks cover the canvas once


def test_the_graphs_layer_by_layer_decode_equals_the_stage_by_stage_one(tiny_worker):
    from pipeline.geometry.tiling import run_tiled_exact_norm
    from pipeline.graph.stream import add_tiled_exact_norm

    latents = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(6))
    ex = LocalExecutor(tiny_worker)
    staged = run_tiled_exact_norm(ex, "decode", "decode_stats", "decode_tile", latents, 24, 6, 1, 8, 3)
    layers = list(ex.call("decode stats", "decode_stats", torch.zeros(1, 4, 2, 2), (0.0, 1.0, 0.0, 1.0)))
    graph = Graph()
    grid = cover_grid(40, 48, 24, 6)
    out = add_tiled_exact_norm(graph, "decode", "decode_stats", "decode_tile", Fixed(latents), grid, 1, 8, 3, layers)
    graph.run(ex)
    assert torch.equal(out.canvas, staged)
    per_layer = [t for t in graph.tasks if t.stage == "decode stats"]
    assert len(per_layer) == len(layers) * len(grid.tiles)


class Recording(LocalExecutor):
    """The local executor, keeping each task graph it runs."""

    def __init__(self, worker):
        super().__init__(worker)
        self.graphs: list[list] = []

    def run(self, stage, tasks, on_result=None):
        self.graphs.append(tasks)
        return super().run(stage, tasks, on_result)


def _ancestors(tasks) -> dict[int, set[int]]:
    """Task id -> every task it waits for, directly or not."""
    out: dict[int, set[int]] = {}
    for task in sorted(tasks, key=lambda t: t.id):
        out[task.id] = set(task.deps).union(*(out[d] for d in task.deps))
    return out


def test_the_renders_stages_wait_for_the_tiles_they_read_not_for_each_other(tiny_worker, small_spec):
    from dataclasses import replace

    from farm.executor import prepare
    from pipeline.render import render

    ex = Recording(tiny_worker)
    render(prepare(replace(small_spec, tiling="blend")), ex)
    tasks = next(g for g in ex.graphs if any(t.stage == "decode" for t in g))
    waits = _ancestors(tasks)

    def stage(name):
        return {t.id for t in tasks if t.stage == name}

    encode, blend, decode = stage("encode"), stage("blend"), stage("decode")
    assert encode and blend and decode
    # no barrier: a refine step may run while encode tiles remain, a decode tile while refine steps remain
    assert any(not encode <= waits[b] for b in blend)
    assert any(not blend <= waits[d] for d in decode)
    # and each does wait for what it reads
    assert all(stage("upscale") & waits[e] for e in encode) and all(blend & waits[d] for d in decode)


def test_a_resized_source_equals_resizing_the_whole_image_in_any_box():
    from pipeline.geometry.resize import resize

    rng = random.Random(0)
    for k, (h, w), block in [(2, (100, 77), 64), (4, (33, 50), 48)]:
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(k))
        whole = resize(image, h * k, w * k).half()
        resized = Resized(Fixed(image), (h, w), k, 3, block)
        enlarged = Enlarged(Resized(Fixed(image), (h, w), k, 3, block))
        for _ in range(12):
            y, x = rng.randrange(h * k), rng.randrange(w * k)
            box = (y, x, rng.randrange(1, h * k - y + 1), rng.randrange(1, w * k - x + 1))
            assert torch.equal(resized.read(box), whole[..., y : y + box[2], x : x + box[3]].float())
            # a worker enlarging the box's input span makes the same pixels from about 1/k^2 of them
            request = enlarged.read(box)
            assert request.shape == (1, 3, box[2], box[3])
            assert torch.equal(request.pixels(), whole[..., y : y + box[2], x : x + box[3]])
            assert enlarged.resized._canvas is None and not enlarged.resized.ready  # the driver resized nothing
        assert resized.read((0, 0, h * k, w * k)).equal(whole.float())


def test_an_upscale_short_of_the_target_by_two_is_resized_in_the_graph(tiny_worker, small_spec):
    from dataclasses import replace

    from farm.executor import prepare
    from pipeline.graph.clock import Clock
    from pipeline.render import render

    # a 128 x 64 base, the 4x model to 512 x 256, then 2x to 1024 x 512 block by block as the encode reads it
    plan = prepare(replace(small_spec, tiling="blend", width=1024, height=512, tile=256, steps=1))
    ex, clock = Recording(tiny_worker), Clock()
    image = render(plan, ex, clock).image
    assert "upscale" not in clock.stages  # no stage of its own: its tiles are the graph's
    tasks = next(g for g in ex.graphs if any(t.stage == "decode" for t in g))
    waits = _ancestors(tasks)
    upscale = {t.id for t in tasks if t.stage == "upscale"}
    encode = [t.id for t in tasks if t.stage == "encode stats"]
    assert upscale and any(not upscale <= waits[e] for e in encode)  # each reads the blocks over its tile
    assert image.shape[-2:] == (512, 1024) and image.std() > 0.01


def test_workers_that_enlarge_their_own_boxes_encode_what_the_drivers_resize_did(tiny_worker, small_spec):
    from dataclasses import replace

    from farm.executor import prepare
    from pipeline.graph.stream import add_tiled_shared_norm
    from pipeline.render import upscale_graph

    plan = prepare(replace(small_spec, tiling="blend", width=1024, height=512, tile=256, steps=1))
    ex = LocalExecutor(tiny_worker)
    scale = ex.call("load", "facts").upscale
    base = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(8))

    upscaled: list = []

    def encoded(on_workers: bool, per_task: int = 1, held: bool = False) -> tuple[torch.Tensor, list]:
        graph = Graph()
        # the 4x model to 256 x 512, then 2x to 512 x 1024
        pixels = upscale_graph(plan, graph, Fixed(base), (64, 128), scale, 512, 1024, held=held)
        assert isinstance(pixels, Resized)
        upscaled.append(pixels.source)
        source = Enlarged(pixels) if on_workers else pixels
        grid = cover_grid(64, 128, 24, 6)
        args = (graph, "encode", "encode_stats", "encode_tile", source, grid, 8, 1, 4)
        out = add_tiled_shared_norm(*args, share=None if held else ex.share, tiles_per_task=per_task)
        sent.clear()
        graph.run(Sent(ex))
        return out.canvas, graph.tasks

    sent: list = []

    class Sent(LocalExecutor):
        """The local executor, keeping the encode statistics tasks' first argument as it was sent."""

        def __init__(self, ex):
            super().__init__(ex.worker)

        def _run_task(self, stage, task, args, place):
            if task.stage == "encode stats":
                sent.extend(a for a in args if isinstance(a, Enlarge))
            return super()._run_task(stage, task, args, place)

    driver, _ = encoded(False)
    workers, tasks = encoded(True)
    assert torch.equal(workers, driver) and driver.std() > 0.01
    # and as the render runs them, tiles two to a task (TileWorker.each): the same latents, in half the tasks
    paired, paired_tasks = encoded(True, per_task=2)
    assert torch.equal(paired, driver)
    count = sum(t.stage == "encode" for t in tasks)
    assert sum(t.stage == "encode" for t in paired_tasks) == -(-count // 2) and count > 2
    encoded(True)
    composited = upscaled[-1]  # the upscale's tiles composited on the driver (TiledCanvas)
    # each task was sent its box's input span (a quarter of the box and a margin), not the box
    assert sent and all(s.span.shape[-2] * s.span.shape[-1] < s.height * s.width / 2 for s in sent)
    # with the upscale's tiles held where they were made, each span is a Patch of them, composited by the worker
    held, _ = encoded(True, per_task=2, held=True)
    assert torch.equal(held, driver)
    assert sent and all(isinstance(s.span, Patch) and s.span.values for s in sent)
    assert all(torch.equal(s.span.pixels(), composited.read(s.span.box)) for s in sent)


def test_the_graph_decodes_to_float16_pixels_that_make_the_png_a_float32_decode_makes(tiny_worker, small_spec):
    from dataclasses import replace

    import numpy as np

    from farm.executor import prepare
    from farm.output import to_rgb8
    from pipeline.geometry.resize import PIXELS
    from pipeline.render import decode_canvas, render

    plan = prepare(replace(small_spec, tiling="blend"))
    ex = Recording(tiny_worker)
    result = render(plan, ex)
    decodes = [t for g in ex.graphs for t in g if t.stage == "decode"]
    assert decodes and all(t.args({})[-1] == PIXELS for t in decodes)  # the workers round them on their device
    assert result.image.dtype == PIXELS == torch.float16
    # the stage-by-stage decode of the same latents keeps float32 throughout
    exact = decode_canvas(plan, ex, result.canvas, ex.call("load", "facts").decode_tile)
    assert exact.dtype == torch.float32 and exact.std() > 0.01
    # float16 rounds each tile and the composite by at most 2^-12 in [0, 1]: a sixteenth of an 8-bit level
    assert (result.image.float() - exact).abs().max() <= 2**-11
    png, png_exact = (to_rgb8(x).astype(int) for x in (result.image, exact))
    assert np.abs(png - png_exact).max() <= 1 and (png == png_exact).mean() > 0.95


def test_a_float16_image_makes_the_same_png_as_its_float32_values():
    import numpy as np

    from farm.output import to_rgb8

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).half()
    # x * 255 in float16 would round to an eighth of a level above 128: about 4% of pixels a level off
    assert np.array_equal(to_rgb8(image), to_rgb8(image.float()))


def test_an_image_converted_in_bands_equals_the_whole_image_converted_at_once():
    import numpy as np

    from farm.output import BAND_ROWS, to_rgb8

    g = torch.Generator().manual_seed(4)
    h = 3 * BAND_ROWS + 5  # a last band shorter than the others
    image = (torch.rand(1, 3, h, 37, generator=g) * 1.4 - 0.2).half()  # below 0 and above 1: clamped
    image[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # rounding at half a level
    whole = (image[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = to_rgb8(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (h, 37, 3)
    assert np.array_equal(pixels, whole)


def test_a_box_read_by_two_tasks_is_shared_once_and_let_go_after_the_second():
    from pipeline.graph.stream import SharedReads

    shared = []

    def share(value):
        shared.append(value)
        return f"handle {len(shared)}"

    image = torch.arange(48.0).reshape(1, 3, 4, 4)
    source = SharedReads(Fixed(image), share)
    box = (0, 1, 2, 3)
    assert source.read(box) == source.read(box) == "handle 1"  # the statistics task's read, then the tile's
    assert len(shared) == 1 and torch.equal(shared[0], image[..., 0:2, 1:4]) and not source.handles
    assert source.read(box) == "handle 2"  # a third read (a graph built again) shares it anew
    assert source.deps(box) == frozenset()
