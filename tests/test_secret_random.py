"""The site's secret randomness (client/secret_random.py): why it is a ChaCha20 stream, and that DP-SGD's noise and
the statistics release's noise are its draws."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client.nonfinite import FiniteDPOptimizer
from client.secret_random import poisson_mask, secret_gaussian, secret_generator


def test_a_cpu_torch_generator_keeps_32_bits_of_its_seed_so_no_secret_comes_from_one():
    # the reason for client/secret_random.py: two seeds that differ above bit 32 give one stream, so a CPU torch
    # generator has at most 2**32 streams, which a coordinator can search against a released DP-SGD step
    a, b = (torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (12345, 12345 + 7 * 2 ** 32))
    assert torch.equal(a, b)
    x, y = (secret_gaussian(secret_generator(s), (8,), "cpu") for s in (12345, 12345 + 7 * 2 ** 32))
    assert not torch.equal(x, y)
    assert secret_generator().bit_generator.seed_seq.entropy >= 2 ** 128  # a site's: 256 bits from the OS (whp)


def test_every_secret_stream_is_the_full_chacha20_cipher_children_included():
    """Review s61: PCG64 is not a cryptographic generator, and a coordinator can make a site publish its raw draws
    (below), from which its state has been recovered (Bouillaguet et al. 2020). Every stream a site draws secrets
    from, and every child it spawns for DP-SGD's batches, noise, latents and augmentations, is ChaCha20."""
    parent = secret_generator()
    for rng in (parent, *parent.spawn(4), parent.spawn(1)[0].spawn(1)[0]):
        assert type(rng.bit_generator).__name__ == "ChaCha" and rng.bit_generator.state["state"]["rounds"] == 20
        assert rng.bit_generator.seed_seq.pool_size == 8  # 256 bits of key material, not numpy's default 128

def test_a_provided_net_that_makes_a_statistic_pure_noise_shows_chacha20_draws_not_a_replayable_stream():
    """A provided net whose first convolution is zero gives every record a norm input of exactly 0 there, so those
    released class sums are the noise draws themselves (review s61 R2). They are the secret ChaCha20 stream's: with a
    seed (tests only) they are its normals, bit for bit; a site passes no seed, so they come from OS entropy."""
    from client.bnstats import exact_class_sums, record_class_statistics, release_noise_std
    from common.bnnet import BNNet, norm_layer_names
    from common.data import load_dataset

    data = load_dataset("digits", "train").subset(np.arange(64))
    torch.manual_seed(0)
    net = BNNet(1, 10, 8, 8).eval()
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    first = norm_layer_names(net)[0]
    release = record_class_statistics(net, data, clip_bound=2.0, noise_multiplier=0.8, count_weight=0.5,
                                      num_classes=10, seed=1234)
    std = release_noise_std(0.8, 2.0, 0.5)["sum"]
    rng = secret_generator(1234)  # the release's stream: every key but the (integer-noised) count, in order
    keys = [k for k in exact_class_sums(net, data, num_classes=10, clip_bound=2.0) if k != "count"]
    draws = {k: rng.normal(0.0, std, size=release[k].shape) for k in keys}
    assert np.array_equal(release["sum/" + first], draws["sum/" + first].astype(release["sum/" + first].dtype))


def test_dp_sgd_noise_is_the_secret_streams_draws_whatever_torchs_random_state():
    """One step with nothing sampled: the update is the noise alone, and it is exactly sigma*C times the secret
    stream's standard normals (divided by the expected batch), the same under any torch seed."""
    def noise_of_one_step(torch_seed: int, stream_seed: int) -> torch.Tensor:
        torch.manual_seed(torch_seed)
        layer = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            layer.weight.zero_()
        opt = FiniteDPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
                                expected_batch_size=4, loss_reduction="mean", noise_rng=secret_generator(stream_seed))
        layer.weight.grad_sample = torch.zeros((0, 2, 3))  # an empty Poisson batch: a noise-only step
        opt.step()
        return -layer.weight.detach().clone()  # lr 1 from 0: minus the noisy gradient

    expected = secret_gaussian(secret_generator(5), (2, 3), "cpu") * (2.0 * 0.5) / 4
    assert torch.allclose(noise_of_one_step(0, 5), expected)
    assert torch.equal(noise_of_one_step(0, 5), noise_of_one_step(99, 5))
    assert not torch.equal(noise_of_one_step(0, 5), noise_of_one_step(0, 6))


def test_the_poisson_mask_samples_at_the_accounted_rate():
    rng = secret_generator(0)
    masks = torch.stack([poisson_mask(rng, 10_000, 0.0128) for _ in range(20)])
    assert masks.dtype == torch.bool and masks.shape == (20, 10_000)
    rate = float(masks.float().mean())
    assert abs(rate - 0.0128) < 4 * np.sqrt(0.0128 / 200_000)
