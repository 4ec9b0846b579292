"""The pixels a render graph passes on: resized block by block, enlarged by the workers, read from tiles held on the
workers, shared once between two readers; and the 8-bit conversion of the image it ends with."""

import random

import torch

from farm.executor import LocalExecutor
from pipeline.geometry.chess import cover_grid
from pipeline.geometry.resize import Enlarge
from pipeline.graph.canvas import Patch
from pipeline.graph.stream import Enlarged, Fixed, Graph, Resized


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


def test_a_box_of_held_tiles_is_not_shared_but_sent_as_its_patch():
    from pipeline.graph.canvas import HeldCanvas
    from pipeline.graph.stream import SharedReads

    grid = cover_grid(40, 40, 16, 4)
    held = HeldCanvas(grid, 3, torch.float16)
    held.task_of.update({t.id: t.id for t in grid.tiles})
    shared = []
    source = SharedReads(Enlarged(Resized(held, (40, 40), 2, 3)), shared.append)
    box = (10, 20, 30, 40)
    reads = [source.read(box), source.read(box)]
    # each read is the span's handles, taken from the finished tasks as its task is sent: nothing to share
    assert not shared and not source.handles
    assert all(isinstance(r.span, Patch) and not r.span.values and r.span.tasks for r in reads)


def test_eight_bit_levels_leave_the_pixels_they_are_made_from_as_they_were():
    from pipeline.geometry.resize import IMAGE, eight_bit, eight_bit_image

    image = torch.tensor([[[[-0.5, 0.2, 1.5]]]]).expand(1, 3, 20, 3).contiguous()  # float32: .float() is itself
    before = image.clone()
    levels = eight_bit_image(image)
    assert levels.dtype == IMAGE and levels[0, :, :, :].unique().tolist() == [0, 51, 255]
    assert torch.equal(image, before) and eight_bit(levels) is levels
