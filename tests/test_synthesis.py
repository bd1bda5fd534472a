"""Sampling the DP-GAN mode's synthetic set: from the averaged generator, or class by class from the sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import protocol as P
from common.config import ConfigError, RunConfig
from common.models import GanShape, Generator
from server.synthesis import (MIN_CLASS_SHARE, allocate_by_census, balanced_class_sizes, class_sizes,
                              sample_generator, sample_site_generators)


def test_balanced_class_sizes_add_up():
    assert balanced_class_sizes(3, 10).tolist() == [4, 3, 3]
    assert balanced_class_sizes(10, 100).tolist() == [10] * 10


def test_the_census_mix_gives_each_class_its_share_of_the_noisy_counts_and_no_class_vanishes():
    census = np.array([[600.0, 290.0, 0.0, 4.0],    # class 2: one site's noise made it negative, the other none
                       [300.0, 110.0, -7.0, 2.0]])   # pooled: 900, 400, 0 (negative counts as 0), 6
    sizes = class_sizes(census, 1000, "census")
    assert sizes.sum() == 1000 and sizes[0] > sizes[1] > sizes[3] and sizes[2] > 0
    floor = MIN_CLASS_SHARE * 1000 / 4  # a tenth of a balanced share: 25 images
    assert sizes[2] >= floor - 1 and sizes[3] >= floor - 1
    assert abs(sizes[0] / sizes[1] - 900 / 400) < 0.02  # the well-counted classes keep the data's proportions
    # the balanced mix, and a census of equal counts (secure aggregation: the coordinator holds none), are balanced
    assert class_sizes(census, 1000, "balanced").tolist() == [250] * 4
    assert class_sizes(np.ones((1, 4)), 1000, "census").tolist() == [250] * 4
    assert class_sizes(np.full((2, 3), -1.0), 10, "census").tolist() == [4, 3, 3]  # nothing counted: balanced


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
    with pytest.raises(ConfigError, match="gan-sample-rounds must be >= 1"):
        RunConfig.from_mapping({"gan-sample-rounds": 0}).validate()


def _replies_by_site(tmp_path, **overrides) -> tuple[dict, list[list[dict]], dict]:
    """An in-process 2-site run of 3 rounds: (its report, each site's generators of rounds 1-3 read off the wire
    in site order, site_generators.pt)."""
    from client.app import app as client_app
    from fedsynth.localgrid import run_inprocess
    from server.app import run_coordinator
    from tests.spine_helpers import fast_config, nodes

    cfg = fast_config(tmp_path, num_rounds=3, gan_local_steps=2, synthetic_size=40, **overrides)
    seen = []
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2), tap=seen.append)
    by_site: dict[int, list[dict]] = {}
    for msg in seen:
        if msg.metadata.message_type == P.TRAIN_GAN:
            by_site.setdefault(msg.metadata.src_node_id, []).append(P.GanTrainReply.from_message(msg).generator)
    saved = torch.load(tmp_path / "out" / "site_generators.pt", weights_only=False)
    return report, [by_site[node] for node in sorted(by_site)], saved


def test_each_site_is_drawn_from_the_average_of_its_last_rounds_generators(tmp_path):
    """gan-sample-rounds = 2, gan-sample-combine = average, over 3 rounds: site_generators.pt holds, per site,
    the mean of the generators the site returned in rounds 2 and 3 (read off the wire), and the report says so."""
    report, rounds_of, saved = _replies_by_site(tmp_path, gan_sample_rounds=2, gan_sample_combine="average")
    assert saved["rounds_used"] == [2, 2] and len(saved["generators"]) == 2
    np.testing.assert_array_equal(saved["census"], saved["site_census"])
    for rounds, state in zip(rounds_of, saved["generators"]):
        assert len(rounds) == 3  # the site's replies in round order
        for key, value in state.items():
            np.testing.assert_allclose(value, (rounds[1][key] + rounds[2][key]) / 2, rtol=1e-5, atol=1e-6)
            assert not np.allclose(value, rounds[2][key])  # not the last round's alone
    made = report["synthetic"]["made"]
    assert list(made["rounds-per-site"].values()) == [2, 2] and made["combine"] == "average"
    assert "averaged" in made["why"]
    # the checkpoint keeps just the rounds it needs
    assert len(torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["recent"]) == 2


def test_by_default_each_of_a_sites_last_three_generators_draws_an_equal_part_of_its_share(tmp_path):
    """The default mixture (gan-sample-rounds = 3, gan-sample-combine = mixture): the set is drawn from every
    generator each site returned in rounds 1-3, exactly as sent, each with a third of the site's noisy counts,
    so each draws a third of the site's images of every class; the report counts them per site."""
    assert (RunConfig().gan_sample_rounds, RunConfig().gan_sample_combine) == (3, "mixture")
    report, rounds_of, saved = _replies_by_site(tmp_path)
    assert saved["rounds_used"] == [3, 3] and saved["combine"] == "mixture"
    names = saved["sites"]
    assert saved["owners"] == [names[0]] * 3 + [names[1]] * 3
    for component, (site, rnd) in enumerate([(s, r) for s in range(2) for r in range(3)]):
        for key, value in saved["generators"][component].items():
            np.testing.assert_array_equal(value, rounds_of[site][rnd][key])  # as sent, not averaged
        np.testing.assert_allclose(saved["census"][component], np.asarray(saved["site_census"][site]) / 3)
    made = report["synthetic"]["made"]
    per_site = np.array(list(made["images-per-site-and-class"].values()))  # (S, K) summed over a site's rounds
    assert per_site.sum() == 40 and per_site.shape == (2, len(made["class-mix"]["images-per-class"]))
    assert made["combine"] == "mixture" and "equal part" in made["why"]
    assert len(torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["recent"]) == 3


def test_a_mixture_splits_each_class_equally_among_a_sites_generators():
    """round_mixture's components and the allocation they get: a site with 3 rounds and one with 1 (it missed
    two rounds); class c's images of a site are shared equally among its generators (largest remainder)."""
    from types import SimpleNamespace

    from server.modes.dpgan import round_mixture

    g = lambda v: {"w": np.full((2,), v, dtype=np.float32)}  # noqa: E731
    recent = [{0: SimpleNamespace(generator=g(1.0))}, {0: SimpleNamespace(generator=g(2.0))},
              {0: SimpleNamespace(generator=g(3.0)), 1: SimpleNamespace(generator=g(9.0))}]
    census = np.array([[300.0, 30.0], [100.0, 270.0]])
    states, rows, owners, used = round_mixture(recent, [0, 1], census)
    assert [s["w"][0] for s in states] == [1.0, 2.0, 3.0, 9.0] and owners == [0, 0, 0, 1] and used == [3, 1]
    np.testing.assert_allclose(rows, [[100, 10], [100, 10], [100, 10], [100, 270]])
    alloc = allocate_by_census(rows, 700, np.array([400, 300]))
    assert alloc.sum(axis=0).tolist() == [400, 300]
    assert alloc[:3, 0].tolist() == [100, 100, 100] and alloc[3, 0] == 100  # class 0: 3/4 from site 0, in thirds
    assert max(alloc[:3, 1]) - min(alloc[:3, 1]) <= 1
