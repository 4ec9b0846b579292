import pytest
import torch

from pipeline.geometry.scaffold import make_scaffold, noise_slice, pool_noise


@pytest.mark.parametrize("k", [2, 4, 8])
def test_pooled_noise_keeps_unit_variance(k):
    scaffold = make_scaffold(seed=1234, channels=4, latent_h=512, latent_w=512)
    pooled = pool_noise(scaffold, k)
    assert pooled.shape == (1, 4, 512 // k, 512 // k)
    assert abs(pooled.std().item() - 1) < 0.02
    assert abs(pooled.mean().item()) < 0.02


def test_uncorrected_pooling_would_lose_variance():
    # the bug this rule guards against: area pooling alone gives std 1/k, and sqrt(k) is not enough
    scaffold = make_scaffold(seed=5, channels=4, latent_h=512, latent_w=512)
    pooled = pool_noise(scaffold, 4)
    assert abs((pooled / 4).std().item() - 0.25) < 0.01
    assert abs((pooled / 4 * 2).std().item() - 0.5) < 0.01


def test_pooled_noise_is_the_block_mean_of_the_scaffold():
    scaffold = make_scaffold(seed=3, channels=4, latent_h=16, latent_w=24)
    pooled = pool_noise(scaffold, 4)
    block = scaffold[0, 2, 4:8, 8:12]
    assert torch.allclose(pooled[0, 2, 1, 2], block.mean() * 4, atol=1e-6)


def test_scaffold_is_seeded_and_has_model_channels():
    a = make_scaffold(7, 16, 32, 48)
    assert a.shape == (1, 16, 32, 48) and a.dtype == torch.float32
    assert torch.equal(a, make_scaffold(7, 16, 32, 48))
    assert not torch.equal(a, make_scaffold(8, 16, 32, 48))


def test_pool_factor_must_divide_the_field():
    with pytest.raises(ValueError, match="must divide"):
        pool_noise(make_scaffold(0, 4, 30, 32), 4)


def test_noise_slice_is_a_copy_of_the_box():
    scaffold = make_scaffold(0, 4, 64, 64)
    tile = noise_slice(scaffold, 8, 16, 32, 24)
    assert torch.equal(tile, scaffold[..., 8:40, 16:40])
    tile += 1
    assert not torch.equal(tile, scaffold[..., 8:40, 16:40])
    with pytest.raises(ValueError, match="leaves the scaffold"):
        noise_slice(scaffold, 40, 0, 32, 32)
