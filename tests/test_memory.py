"""The memory pre-flight: weights from the file headers, and a clear refusal with numbers and a fix."""

from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.memory import MemoryEstimate, check_fits, count_parameters, worker_estimate
from pipeline.models import ModelInfo
from pipeline.plan import make_plan
from pipeline.spec import RenderSpec

SDXL_PARAMS = 3_500_000_000  # UNet 2.57B + both text encoders 0.82B + VAE 0.08B


def test_parameters_are_counted_from_the_headers(tiny_sdxl, tiny_model):
    loaded = sum(
        p.numel()
        for m in (
            tiny_model.pipe.unet,
            tiny_model.pipe.vae,
            tiny_model.pipe.text_encoder,
            tiny_model.pipe.text_encoder_2,
        )
        for p in m.parameters()
    )
    assert count_parameters(Path(tiny_sdxl)) == loaded


def _plan(size: int, batch: int):
    spec = RenderSpec(model="m", width=size, height=size, tile=1024, tile_batch=batch, cfg=7.0).validate()
    return make_plan(spec, ModelInfo(Path("m"), "sdxl", 4, 8, 1024, False))


def test_an_8k_render_that_cannot_fit_a_16gb_card_is_refused_with_the_numbers_and_a_fix():
    plan = _plan(8192, 4)
    need = worker_estimate(plan, 2, SDXL_PARAMS)
    assert need.weights == 7_000_000_000
    with pytest.raises(SpecError) as err:
        check_fits(plan, need, 16 * 2**30, "GPU (RTX 4080)")
    message = str(err.value)
    assert "8192x8192" in message and "GPU (RTX 4080)" in message and "16.0 GiB free" in message
    assert "--tile-batch 2" in message
    fitted = worker_estimate(_plan(8192, 1), 2, SDXL_PARAMS)
    check_fits(_plan(8192, 1), fitted, 16 * 2**30, "GPU (RTX 4080)")  # batches of one fit
    assert fitted.total < need.total


def test_estimates_grow_with_batch_and_precision():
    plan = _plan(4096, 2)
    half, full = worker_estimate(plan, 2, SDXL_PARAMS), worker_estimate(plan, 4, SDXL_PARAMS)
    assert full.weights == 2 * half.weights and full.activations >= half.activations
    assert MemoryEstimate(10, 10).total == int(20 * 1.15)


def test_the_auto_tile_batch_is_the_largest_that_fits():
    from pipeline.memory import auto_tile_batch

    plan = _plan(8192, 1)
    assert auto_tile_batch(plan, 2, SDXL_PARAMS, 80 * 2**30) == 8  # an H100
    assert auto_tile_batch(plan, 2, SDXL_PARAMS, 16 * 2**30) in (1, 2)
    assert auto_tile_batch(plan, 2, SDXL_PARAMS, 4 * 2**30) == 1  # nothing fits: the smallest
    sizes = [auto_tile_batch(plan, 2, SDXL_PARAMS, g * 2**30) for g in (8, 16, 24, 40, 80)]
    assert sizes == sorted(sizes)


def test_tile_batch_zero_is_resolved_before_the_render(small_spec):
    from dataclasses import replace

    from farm.executor import prepare

    plan = prepare(replace(small_spec, tile_batch=0), "cpu")
    assert plan.spec.tile_batch == 4 and len(plan.even_batches) == 4
