"""The render as one graph: each task waits for exactly the tiles it reads, whatever order they finish in, the
graph's stages equal the stage-by-stage ones, and a resumed graph runs only what it still needs."""

import random

import torch

from farm.executor import LocalExecutor
from pipeline.geometry.chess import cover_grid
from pipeline.graph.canvas import BLEND_GROUP, blend_cells
from pipeline.graph.checkpoint import Checkpointed
from pipeline.graph.stream import Fixed, Graph, Resized, add_tiled


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


def _encode_blend_decode(image, on_workers: bool = False, dtype: torch.dtype = torch.float16):
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
    decoded = add_tiled(graph, "decode", "halve", stepper, decode_grid, 1, 1, 4, dtype, on_workers=on_workers)
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


def test_blocks_blended_to_eight_bits_on_the_workers_give_the_levels_of_the_drivers_float16_composite():
    from pipeline.geometry.resize import IMAGE, eight_bit_image

    image = torch.rand(1, 4, 20, 28, generator=torch.Generator().manual_seed(4)) * 2  # past 1: clamped
    graph, reference = _encode_blend_decode(image)
    graph.run(LocalExecutor(Toy()))
    levels = eight_bit_image(reference.canvas)
    assert 0 < (levels == 255).float().mean() < 1  # both clamped and unclamped pixels
    for seed in range(2):
        graph, decoded = _encode_blend_decode(image, on_workers=True, dtype=IMAGE)
        graph.run(AnyOrder(Toy(), seed))
        assert decoded.canvas.dtype == IMAGE and torch.equal(decoded.canvas, levels)


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
    """The local executor, keeping each task graph it runs and its tasks' results by stage."""

    def __init__(self, worker):
        super().__init__(worker)
        self.graphs: list[list] = []
        self.results: dict[str, list] = {}

    def run(self, stage, tasks, on_result=None):
        self.graphs.append(tasks)

        def keep(task, value):
            self.results.setdefault(task.stage, []).append(value)
            if on_result:
                on_result(task, value)

        return super().run(stage, tasks, keep)


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
    assert image.shape[-2:] == (512, 1024) and image.float().std() > 0.01 * 255


def test_the_graph_decodes_to_the_eight_bit_image_a_float32_decode_makes_within_a_level(tiny_worker, small_spec):
    from dataclasses import replace

    import numpy as np

    from farm.executor import prepare
    from farm.output import to_rgb8
    from pipeline.geometry.resize import IMAGE, PIXELS
    from pipeline.render import decode_canvas, render

    plan = prepare(replace(small_spec, tiling="blend"))
    ex = Recording(tiny_worker)
    result = render(plan, ex)
    decodes = [t for g in ex.graphs for t in g if t.stage == "decode"]
    assert decodes and all(t.args({})[-1] == PIXELS for t in decodes)  # the workers round them on their device
    blocks = [cell for cells in ex.results["decode blend"] for cell in cells]
    assert blocks and all(cell.dtype == IMAGE == torch.uint8 for cell in blocks)  # and convert their blocks
    assert result.image.dtype == IMAGE and result.image.shape == (1, 3, plan.spec.height, plan.spec.width)
    # the stage-by-stage decode of the same latents keeps float32 throughout; float16 rounds each tile and the
    # composite by at most 2^-12 in [0, 1] (a sixteenth of an 8-bit level): a level apart where a value lies at
    # a level's edge
    exact = decode_canvas(plan, ex, result.canvas, ex.call("load", "facts").decode_tile)
    assert exact.dtype == torch.float32 and exact.std() > 0.01
    png, png_exact = (to_rgb8(x).astype(int) for x in (result.image, exact))
    assert np.abs(png - png_exact).max() <= 1 and (png == png_exact).mean() > 0.95
