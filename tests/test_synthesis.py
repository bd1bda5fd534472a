"""Sampling the DP-GAN mode's synthetic set: from the averaged generator, or class by class from the sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import protocol as P
from common.config import ConfigError, RunConfig
from common.models import GanShape, Generator
from server.synthesis import allocate_by_census, balanced_class_sizes, sample_generator, sample_site_generators


def test_balanced_class_sizes_add_up():
    assert balanced_class_sizes(3, 10).tolist() == [4, 3, 3]
    assert balanced_class_sizes(10, 100).tolist() == [10] * 10


def test_each_class_is_split_among_the_sites_by_their_noisy_counts():
    census = np.array([[900.0, 0.0, -12.0, 0.0],   # site 0: most of class 0, none of 3 (noise made one negative)
                       [100.0, 50.0, 30.0, -5.0],
                       [0.0, 150.0, 90.0, -3.0]])  # class 3: no site reports it -> equal split
    alloc = allocate_by_census(census, 400)  # 100 per class
    assert alloc.shape == (3, 4) and alloc.sum(axis=0).tolist() == [100] * 4
    assert alloc[:, 0].tolist() == [90, 10, 0]
    assert alloc[:, 1].tolist() == [0, 25, 75]
    assert alloc[:, 2].tolist() == [0, 25, 75]  # the negative noisy count counts as 0
    assert sorted(alloc[:, 3].tolist()) == [33, 33, 34]
    assert (alloc >= 0).all()


def _constant_generator(shape: GanShape, value: float) -> dict[str, np.ndarray]:
    """A generator state whose every image is ``value`` in [0, 1] (all weights 0, the last bias saturates tanh)."""
    gen = Generator(shape)
    with torch.no_grad():
        for p in gen.parameters():
            p.zero_()
        gen.upsample[-2].bias.fill_(20.0 if value > 0.5 else -20.0)
    return P.state_arrays(gen)


def test_class_c_comes_from_the_sites_that_hold_it():
    shape = GanShape(channels=1, image_size=8, num_classes=2, latent_dim=4, width=8)
    white, black = _constant_generator(shape, 1.0), _constant_generator(shape, 0.0)
    census = np.array([[50.0, 0.0], [0.0, 70.0]])  # site 0 holds class 0 only, site 1 class 1 only
    synth, alloc = sample_site_generators(Generator(shape), [white, black], census, ("a", "b"), 60, seed=0,
                                          device=torch.device("cpu"), batch_size=7, progress=False)
    assert alloc.tolist() == [[30, 0], [0, 30]]
    assert np.bincount(synth.labels).tolist() == [30, 30] and synth.images.shape == (60, 1, 8, 8)
    assert np.allclose(synth.images[synth.labels == 0], 1.0) and np.allclose(synth.images[synth.labels == 1], 0.0)
    # the averaged generator mixes them: every image is mid-grey whatever its class
    avg = Generator(shape)
    P.load_state(avg, {k: (white[k] + black[k]) / 2 for k in white})
    mixed = sample_generator(avg, ("a", "b"), 60, seed=0, device=torch.device("cpu"), progress=False)
    assert np.allclose(mixed.images, 0.5, atol=1e-3)


def test_gan_sample_from_is_validated():
    assert RunConfig().gan_sample_from == "sites"
    assert RunConfig.from_mapping({"gan-sample-from": "average"}).gan_sample_from == "average"
    with pytest.raises(ConfigError, match="gan-sample-from must be one of sites, average"):
        RunConfig.from_mapping({"gan-sample-from": "best"})
