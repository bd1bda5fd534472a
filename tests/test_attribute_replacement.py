"""Seed 004's replacement of a sensitive attribute in the synthetic set (server/attribute_replacement.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import protocol as P
from common.data import DataError, ImageDataset, split_joint_labels
from common.models import GanShape, Generator
from server.attribute_replacement import claimed_labels, sample_with_replaced_attribute, sensitive_marginal

# joint classes (task x sensitive) = (2 genders) x (2 values); one site per joint class, whose generator
# paints every image in its own grey level: an image's grey level says which class it was generated for
CLASSES = ("m_a", "m_b", "f_a", "f_b")
GREYS = (0.2, 0.4, 0.6, 0.8)


def _grey_generator(shape: GanShape, grey: float) -> dict[str, np.ndarray]:
    gen = Generator(shape)
    with torch.no_grad():
        for p in gen.parameters():
            p.zero_()
        gen.upsample[-2].bias.fill_(math.atanh(2 * grey - 1))  # tanh(bias) = 2 * grey - 1 -> image = grey
    return P.state_arrays(gen)


def _shown_class(images: np.ndarray) -> np.ndarray:
    return np.abs(images.mean(axis=(1, 2, 3))[:, None] - np.array(GREYS)[None]).argmin(axis=1)


def _sample(strength: float, census: np.ndarray, total: int = 4000):
    shape = GanShape(channels=1, image_size=8, num_classes=4, latent_dim=4, width=8)
    states = [_grey_generator(shape, g) for g in GREYS]
    return sample_with_replaced_attribute(Generator(shape), states, census, CLASSES, total, values=2,
                                          strength=strength, seed=0, device=torch.device("cpu"), progress=False)


CENSUS = np.diag([400.0, 100.0, 400.0, 100.0])  # site c holds class c only; the sensitive value a is 80 %


def test_without_replacement_every_image_shows_the_labels_it_claims():
    synth, info = _sample(0.0, CENSUS)
    # the task balanced, the sensitive value as often as the census says within it (80 / 20)
    assert np.bincount(synth.labels).tolist() == [1600, 400, 1600, 400]
    assert (_shown_class(synth.images) == synth.labels).all() and info.replaced == 0 and info.agreement == 1.0


def test_full_replacement_keeps_the_task_and_draws_the_sensitive_value_independently():
    synth, info = _sample(1.0, CENSUS)
    shown = _shown_class(synth.images)
    assert (shown // 2 == synth.labels // 2).all()  # the task attribute (gender) is untouched
    # the value shown follows the census marginal (80 / 20) whatever the record claims
    assert info.marginal == [0.8, 0.2]
    for claimed in (0, 1):
        share_a = (shown[synth.labels % 2 == claimed] % 2 == 0).mean()
        assert abs(share_a - 0.8) < 0.03
    # so the image tells nothing about the claimed value: it agrees as often as two independent 80/20 draws
    assert abs(info.agreement - 0.68) < 0.03 and info.replaced == 4000


def test_which_site_drew_an_image_says_nothing_about_the_value_its_record_claims():
    # two sites holding every class alike, each painting all its images in its own grey: the grey says which
    # site drew the image and nothing else. The claims are laid out sorted (value a before b within a task
    # value); were each class's images placed site after site in that order, the site -- its generator's
    # style, visible in a real set -- would tell a claimed a from a claimed b, and an adversary trained on the
    # set would learn that instead of nothing
    shape = GanShape(channels=1, image_size=8, num_classes=4, latent_dim=4, width=8)
    states = [_grey_generator(shape, 0.2), _grey_generator(shape, 0.8)]
    census = np.full((2, 4), 100.0)
    synth, _ = sample_with_replaced_attribute(Generator(shape), states, census, CLASSES, 4000, values=2,
                                              strength=1.0, seed=0, device=torch.device("cpu"), progress=False)
    from_first = synth.images.mean(axis=(1, 2, 3)) < 0.5
    for claimed in (0, 1):
        assert abs(from_first[synth.labels % 2 == claimed].mean() - 0.5) < 0.04


def test_half_replacement_is_in_between():
    _, info = _sample(0.5, CENSUS)
    assert abs(info.replaced - 2000) < 120 and abs(info.agreement - 0.84) < 0.03


def test_the_marginal_ignores_negative_noise_and_falls_back_to_uniform():
    assert sensitive_marginal(np.array([[3.0, -2.0, 1.0, 0.0]]), 2).tolist() == [1.0, 0.0]
    assert sensitive_marginal(np.array([[-1.0, -2.0]]), 2).tolist() == [0.5, 0.5]


def test_claims_are_balanced_over_the_task_and_follow_the_census_within_it():
    labels = claimed_labels(np.array([[3.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), 2, 10)
    # task 0: (4, 0) pooled -> all 5 claim value 0; task 1: no counts -> split equally (3 and 2)
    assert np.bincount(labels, minlength=4).tolist() == [5, 0, 3, 2]


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="share of records"):
        _sample(1.5, CENSUS, total=8)
    shape = GanShape(channels=1, image_size=8, num_classes=4)
    with pytest.raises(ValueError, match="not \\(task values\\) x 3"):
        sample_with_replaced_attribute(Generator(shape), [], CENSUS, CLASSES, 8, values=3, strength=1.0, seed=0,
                                       device=torch.device("cpu"), progress=False)


def test_joint_labels_split_into_the_two_attributes():
    ds = ImageDataset(np.zeros((4, 1, 2, 2), np.float32), np.array([0, 1, 2, 3]), CLASSES)
    first, second = split_joint_labels(ds)
    assert first.classes == ("m", "f") and first.labels.tolist() == [0, 0, 1, 1]
    assert second.classes == ("a", "b") and second.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(DataError, match="not joint labels"):
        split_joint_labels(ImageDataset(ds.images, ds.labels, ("w", "x", "y", "z")))


def test_the_run_replaces_what_the_sites_declared_or_refuses_before_anything_is_spent():
    from common.config import ConfigError, RunConfig
    from server.attribute_replacement import run_sensitive_attribute
    from server.sites import RunFailed, SiteRecord

    joint = ("male_white", "male_black", "female_white", "female_black")
    sites = {1: SiteRecord(1, "a", sensitive_attribute="race"), 2: SiteRecord(2, "b")}
    assert run_sensitive_attribute(RunConfig(), sites, joint) == "race"  # one site's declaration binds the run
    assert run_sensitive_attribute(RunConfig(), {2: SiteRecord(2, "b")}, joint) == ""
    assert run_sensitive_attribute(RunConfig(sensitive_attribute="race"), {2: SiteRecord(2, "b")}, joint) == "race"
    with pytest.raises(RunFailed, match="sites' operators must agree"):
        run_sensitive_attribute(RunConfig(), {**sites, 2: SiteRecord(2, "b", sensitive_attribute="gender")}, joint)
    with pytest.raises(RunFailed, match="must agree"):  # the run cannot swap the declared attribute for another
        run_sensitive_attribute(RunConfig(sensitive_attribute="gender"), sites, joint)
    with pytest.raises(RunFailed, match="mode = dpgan"):
        run_sensitive_attribute(RunConfig(mode="bnstats"), sites, joint)
    with pytest.raises(RunFailed, match="label_from = utkface-<task>\\+race"):
        run_sensitive_attribute(RunConfig(), sites, ("male", "female"))
    # the run settings are checked in one place too
    with pytest.raises(ConfigError, match="label-from = utkface-gender\\+race"):
        RunConfig.from_mapping({"sensitive-attribute": "race", "label-from": "utkface-gender"})
    with pytest.raises(ConfigError, match="mode = dpgan"):
        RunConfig.from_mapping({"sensitive-attribute": "race", "label-from": "utkface-age+race", "mode": "bnstats"})
    with pytest.raises(ConfigError, match="one of gender, race, age"):
        RunConfig.from_mapping({"sensitive-attribute": "religion"})
    assert RunConfig.from_mapping({"sensitive-attribute": "age", "label-from": "utkface-gender+age"})


def test_a_site_declares_its_sensitive_attribute_in_site_yaml(tmp_path):
    from client.site import SiteSettings
    from fedsynth.ops.fields import DeployError
    from fedsynth.ops.site_cmd import load_site_config
    from tests.deployment_helpers import minimal_site_yaml

    def site_yaml(**extra) -> Path:
        return minimal_site_yaml(tmp_path, **{"epsilon": 5.0, "state_dir": "state", **extra})

    site = load_site_config(site_yaml(label_from="utkface-gender+race", sensitive_attribute="race")).settings
    assert site.sensitive_attribute == "race" and site.modes == ("dpgan",)  # the only mode that can replace it
    # the SuperNode's node config carries the declaration to the site's handlers
    assert SiteSettings.from_node_config(site.to_node_config(), {}).sensitive_attribute == "race"
    with pytest.raises(DeployError, match="label-from = utkface-gender\\+race"):
        load_site_config(site_yaml(label_from="utkface-gender", sensitive_attribute="race"))
    with pytest.raises(DeployError, match="allows only modes: \\[dpgan\\]"):
        load_site_config(site_yaml(label_from="utkface-age+race", sensitive_attribute="race",
                                   modes=["dpgan", "bnstats"]))
    with pytest.raises(DeployError, match="must be one of"):
        load_site_config(site_yaml(label_from="utkface-gender+race", sensitive_attribute="religion"))
