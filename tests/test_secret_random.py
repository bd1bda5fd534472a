"""The site's secret randomness (client/secret_random.py): why it is numpy's PCG64 and that DP-SGD's noise is it."""

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
    assert secret_generator().bit_generator.seed_seq.entropy >= 0  # a site's: 128 bits from the OS


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
