"""Tiled VAE decode and encode with GroupNorm statistics shared by all tiles (pipeline.sampling.groupnorm): the encode
pools them with one barrier, the decode layer by layer (pipeline.geometry.tiling.run_tiled_exact_norm)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from vae_seams import even_odd, shifted_latent, texture_ratios  # noqa: E402

from farm.executor import LocalExecutor  # noqa: E402
from pipeline.geometry.chess import cover_grid  # noqa: E402
from pipeline.geometry.tiling import core_box, run_tiled, run_tiled_exact_norm, run_tiled_shared_norm  # noqa: E402
from pipeline.sampling import vae  # noqa: E402
from pipeline.sampling.groupnorm import combine_stats, core_moments  # noqa: E402

F = 8  # the tiny VAE's factor
SIZE, TILE, OVERLAP = 32, 14, 4  # latents: 256 px in 3 x 3 tiles of 112 px


def decode_shared(ex, latent, tile=TILE, overlap=OVERLAP):
    return run_tiled_shared_norm(ex, "decode", "decode_stats", "decode_tile", latent, tile, overlap, 1, F, 3)


def decode_exact(ex, latent, tile=TILE, overlap=OVERLAP):
    return run_tiled_exact_norm(ex, "decode", "decode_stats", "decode_tile", latent, tile, overlap, 1, F, 3)


def encode_shared(ex, pixels, tile=TILE, overlap=OVERLAP):
    return run_tiled_shared_norm(ex, "encode", "encode_stats", "encode_tile", pixels, tile, overlap, F, 1, 4)


def test_pooled_core_moments_are_the_whole_canvas_moments():
    """Cores partition the canvas, so pooling their (count, mean, M2) gives the canvas's mean and variance."""
    x = torch.randn(2, 8, 40, 56, generator=torch.Generator().manual_seed(0)) * 3 + 1
    grid = cover_grid(40, 56, 16, 5)
    tiles = [core_moments(x[..., t.y : t.y + t.h, t.x : t.x + t.w], 4, core_box(grid, t)) for t in grid.tiles]
    pooled = combine_stats([{"norm": m} for m in tiles])["norm"]
    var, mean = torch.var_mean(x.double().reshape(2, 4, -1), dim=-1, correction=0)
    assert torch.allclose(pooled[0], mean, atol=1e-6) and torch.allclose(pooled[1], var, rtol=1e-6)
    # a core counted twice (overlaps not split) would not give it
    assert int(sum(m[0, 0, 0] for m in tiles)) == 40 * 56 * 2


def test_one_tile_equals_the_untiled_forward(tiny_worker):
    ex, model = LocalExecutor(tiny_worker), tiny_worker.model.vae
    latent = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(2))
    whole = vae.decode(model, latent, tiled=False)
    assert torch.allclose(decode_shared(ex, latent, tile=64), whole, atol=1e-5)
    assert torch.allclose(encode_shared(ex, whole, tile=64), vae.encode(model, whole, tiled=False), atol=1e-5)


@pytest.fixture(scope="module")
def decoded(tiny_worker):
    """(untiled, per-tile GroupNorm, shared GroupNorm) decodes of a latent whose even tiles are offset in
    channel mean (tiles whose statistics differ, as a real image's do)."""
    ex = LocalExecutor(tiny_worker)
    latent = shifted_latent(SIZE, cover_grid(SIZE, SIZE, TILE, OVERLAP), 0.3)
    untiled = vae.decode(tiny_worker.model.vae, latent, tiled=False)
    old = run_tiled(ex, "decode", "decode_tile", latent, TILE, OVERLAP, F, 3)
    return untiled, old, decode_shared(ex, latent)


def spread(ratios: dict[int, float]) -> float:
    return max(ratios.values()) / min(ratios.values())


def test_shared_statistics_give_every_decode_tile_the_same_texture(decoded):
    untiled, old, new = decoded
    grid = cover_grid(SIZE, SIZE, TILE, OVERLAP)
    # per-tile statistics: each tile's texture moves by its own factor against the untiled decode
    assert spread(texture_ratios(old, untiled, grid, F)) > 1.10
    # shared statistics: all tiles move alike (within 5%), even and odd tiles keep the untiled balance
    assert spread(texture_ratios(new, untiled, grid, F)) < 1.05
    assert 0.95 < even_odd(new, grid, F) / even_odd(untiled, grid, F) < 1.05


def test_shared_statistics_are_deterministic(tiny_worker):
    ex = LocalExecutor(tiny_worker)
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    assert torch.equal(decode_shared(ex, latent, 14, 4), decode_shared(ex, latent, 14, 4))
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    assert torch.equal(encode_shared(ex, pixels, 6, 2), encode_shared(ex, pixels, 6, 2))


@pytest.fixture(scope="module")
def encoded(tiny_worker, decoded):
    """(untiled, per-tile GroupNorm, shared GroupNorm) encodes of the untiled decode above."""
    ex, pixels = LocalExecutor(tiny_worker), decoded[0]
    untiled = vae.encode(tiny_worker.model.vae, pixels, tiled=False)
    old = run_tiled(ex, "encode", "encode_tile", pixels, TILE, OVERLAP, 1, 4, scale_in=F)
    return untiled, old, encode_shared(ex, pixels, TILE, OVERLAP)


def test_shared_statistics_give_every_encode_tile_the_same_texture(encoded):
    untiled, old, new = encoded
    grid = cover_grid(SIZE, SIZE, TILE, OVERLAP)
    # the encoder's mid-block attention still sees one tile: tiles agree less closely than in the decode
    assert spread(texture_ratios(old, untiled, grid, 1)) > 1.25
    assert spread(texture_ratios(new, untiled, grid, 1)) < 1.10
    # per-tile statistics tilt even against odd tiles; shared ones keep the untiled balance
    assert not 0.95 < even_odd(old, grid, 1) / even_odd(untiled, grid, 1) < 1.05
    assert 0.95 < even_odd(new, grid, 1) / even_odd(untiled, grid, 1) < 1.05


def test_half_precision_activations_keep_float32_statistics():
    """A bf16 GroupNorm records float64 moments and normalises in float32, returning bf16."""
    from pipeline.sampling.groupnorm import apply_stats, record_stats

    norm = torch.nn.GroupNorm(4, 8).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(1, 8, 12, 12, generator=torch.Generator().manual_seed(5)) * 4 + 100).to(torch.bfloat16)
    with record_stats(norm, (0.0, 1.0, 0.0, 1.0)) as stats:
        norm(x)
    assert stats[""].dtype == torch.float64
    with apply_stats(norm, combine_stats([stats])):
        y = norm(x)
    reference = torch.nn.functional.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), norm.eps)
    assert y.dtype == torch.bfloat16 and (y.float() - reference).abs().max() < 0.05


def chess_like_latent(size: int, tile: int, overlap: int, seed: int = 6) -> torch.Tensor:
    """Seeded noise whose even tile cores are offset and twice as textured as the odd ones: tile-scale
    structure like a latent refined by independent chess tiles."""
    grid = cover_grid(size, size, tile, overlap)
    latent = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5
    for t in grid.even:
        box = core_box(grid, t)
        y0, y1 = t.y + round(box[0] * t.h), t.y + round(box[1] * t.h)
        x0, x1 = t.x + round(box[2] * t.w), t.x + round(box[3] * t.w)
        latent[..., y0:y1, x0:x1] = latent[..., y0:y1, x0:x1] * 2 + 0.3
    return latent


SMALL, SMALL_TILE, SMALL_OVERLAP = 24, 12, 4  # latents: 192 px in 3 x 3 tiles of 96 px


class Counting(LocalExecutor):
    """The local executor, noting each task graph it runs (stage, tasks)."""

    def __init__(self, worker):
        super().__init__(worker)
        self.graphs: list[tuple[str, int]] = []

    def run(self, stage, tasks, on_result=None):
        self.graphs.append((stage, len(tasks)))
        return super().run(stage, tasks, on_result)


@pytest.fixture(scope="module")
def exact_decoded(tiny_worker):
    """(latent, untiled, per-tile GroupNorm, layer-by-layer GroupNorm decodes, the latter's graphs) of a
    chess-like latent."""
    ex = Counting(tiny_worker)
    latent = chess_like_latent(SMALL, SMALL_TILE, SMALL_OVERLAP)
    untiled = vae.decode(tiny_worker.model.vae, latent, tiled=False)
    old = run_tiled(ex, "decode", "decode_tile", latent, SMALL_TILE, SMALL_OVERLAP, F, 3)
    ex.graphs.clear()
    return latent, untiled, old, decode_exact(ex, latent, SMALL_TILE, SMALL_OVERLAP), ex.graphs


def test_layer_by_layer_statistics_keep_every_decode_tile_as_textured_as_untiled(exact_decoded):
    _, untiled, old, new, _ = exact_decoded
    grid = cover_grid(SMALL, SMALL, SMALL_TILE, SMALL_OVERLAP)
    # per-tile statistics: some tiles move far from the untiled texture, and even against odd
    assert not all(0.95 < r < 1.05 for r in texture_ratios(old, untiled, grid, F).values())
    assert not 0.95 < even_odd(old, grid, F) / even_odd(untiled, grid, F) < 1.05
    # layer by layer: every tile interior within 5% of the untiled decode, even / odd balance kept
    assert all(0.95 < r < 1.05 for r in texture_ratios(new, untiled, grid, F).values())
    assert 0.95 < even_odd(new, grid, F) / even_odd(untiled, grid, F) < 1.05
    # and no colour step: per-tile mean offsets from the untiled decode smaller than per-tile statistics leave
    assert (new - untiled).abs().mean() < (old - untiled).abs().mean() / 2


def test_layer_by_layer_with_one_tile_is_the_untiled_decode(tiny_worker):
    latent = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(7))
    whole = vae.decode(tiny_worker.model.vae, latent, tiled=False)
    assert torch.allclose(decode_exact(LocalExecutor(tiny_worker), latent, tile=64), whole, atol=1e-5)


def test_layer_by_layer_runs_one_statistics_graph_per_group_norm(tiny_worker, exact_decoded):
    """A one-task probe names the layers; each graph then stops its tiles at the layer it settles; the decode
    graph comes last. Every statistics graph is the stage the checkpoint recomputes on resume."""
    graphs = exact_decoded[-1]
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_worker.model.vae.decoder.modules())
    assert graphs == [("decode stats", 1)] + [("decode stats", 9)] * norms + [("decode", 9)]


def test_layer_by_layer_decode_is_the_same_on_two_ray_actors(tiny_worker, exact_decoded):
    ray = pytest.importorskip("ray")
    from cluster.actor import start_actors
    from cluster.executor import ClusterExecutor

    latent, _, _, local, _ = exact_decoded
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        # the driver's thread count: CPU kernels split sums by it (as WorkerConfig.from_spec passes it on)
        config = replace(tiny_worker.config, cpu_threads=torch.get_num_threads())
        ex = ClusterExecutor(start_actors(config, 2, 0, max_restarts=0))
        assert torch.equal(decode_exact(ex, latent, SMALL_TILE, SMALL_OVERLAP), local)
        assert {d.actor for d in ex.scheduler.log} == {0, 1}  # both actors took tiles
    finally:
        ray.shutdown()
