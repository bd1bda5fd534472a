"""gan-augment: DiffAugment of every image a site's discriminator judges.

The transformations must act on each row alone (so record i's per-sample gradient stays a function of record i and
its fake: the sensitivity, and so the charge, are unchanged), let G's gradient through, and reach the site's round;
a request naming anything else is refused before anything is charged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.app import app as client_app
from common import protocol as P
from common.config import ConfigError, RunConfig
from common.gan_augment import FILL, augment, cutout, parse_augment, translate
from fedsynth.localgrid import LocalGrid
from tests.spine_helpers import charges, fast_config, nodes, spent
from tests.test_faults import gan_request, send


def _images(b: int = 6, side: int = 16) -> torch.Tensor:
    return torch.rand(b, 1, side, side) + 1.0  # (b, 1, side, side) in [1, 2): a FILL (0) pixel can only come from the op


def test_translation_shifts_each_image_by_at_most_an_eighth_of_its_side_with_zeros_coming_in() -> None:
    x = _images(64)
    out = translate(x, np.random.default_rng(0))
    assert out.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        rows = (out[i, 0] != FILL).any(1).nonzero().squeeze(1)  # rows still holding image content
        cols = (out[i, 0] != FILL).any(0).nonzero().squeeze(1)
        dy = int(rows[0]) if rows[0] > 0 else -(15 - int(rows[-1]))  # where the content went
        dx = int(cols[0]) if cols[0] > 0 else -(15 - int(cols[-1]))
        assert abs(dy) <= 2 and abs(dx) <= 2  # 16 / 8
        src = x[i, 0, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)]
        dst = out[i, 0, max(0, dy):16 - max(0, -dy), max(0, dx):16 - max(0, -dx)]
        assert torch.equal(src, dst)  # the same pixels, moved
        shifts.add((dy, dx))
    assert len(shifts) > 5  # each image draws its own shift


def test_cutout_blanks_one_square_of_half_the_side_clipped_at_the_border() -> None:
    x = _images(64)
    out = cutout(x, np.random.default_rng(1))
    for i in range(len(x)):
        zero = out[i, 0] == FILL
        rows, cols = zero.any(1).nonzero().squeeze(1), zero.any(0).nonzero().squeeze(1)
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert int(zero.sum()) == len(rows) * len(cols)  # one rectangle
        assert len(rows) == 8 or rows[0] == 0 or rows[-1] == 15  # a smaller one only where the border cut it
        assert torch.equal(out[i, 0][~zero], x[i, 0][~zero])


def test_each_row_is_transformed_alone_and_gradients_reach_the_input() -> None:
    """Row i's output depends on row i only (the per-sample argument), and G's fakes keep their gradient."""
    x = _images(5).requires_grad_(True)
    names = ("translation", "cutout")
    out = augment(x, names, np.random.default_rng(2))
    changed = x.detach().clone()
    changed[3] = 0.5
    again = augment(changed, names, np.random.default_rng(2))
    rows = [0, 1, 2, 4]
    assert torch.equal(out.detach()[rows], again[rows]) and not torch.equal(out.detach()[3], again[3])
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert augment(x, (), np.random.default_rng()) is x  # none: the images themselves


def test_only_the_known_transformations_are_accepted() -> None:
    assert parse_augment("") == ()
    assert parse_augment("translation, cutout") == ("translation", "cutout")
    for bad in ("flip", "translation,translation"):
        with pytest.raises(ValueError):
            parse_augment(bad)
    with pytest.raises(ConfigError, match="gan-augment"):
        RunConfig(gan_augment="colour").validate()


def test_a_site_trains_with_the_augmentation_asked_for_with_the_same_releases_and_refuses_an_unknown_one(tmp_path):
    cfg = fast_config(tmp_path, epsilon=10.0, num_rounds=1)
    # a budget for both runs: each fills its epsilon 10 (the ledger's order leaves no slack a second run's census used
    # to fit in by chance: client.ledger_order)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "epsilon": 30.0}], cfg.to_flwr())
    hostile = send(grid, 1000, gan_request(cfg, experiment="odd", augment="translation,mixup"))
    assert hostile.has_error() and hostile.error.code == P.REFUSED_BAD_REQUEST and "augment" in hostile.error.reason
    assert all(e == 0.0 for e in spent(tmp_path))  # refused before anything was charged, not even the census

    plain = P.GanTrainReply.from_message(send(grid, 1000, gan_request(cfg, experiment="plain")))
    augmented = P.GanTrainReply.from_message(send(grid, 1000, gan_request(cfg, experiment="aug",
                                                                           augment="translation,cutout")))
    assert set(augmented.generator) == set(plain.generator)
    assert any(not np.array_equal(augmented.generator[k], plain.generator[k]) for k in plain.generator)
    # the same releases, planned the same way: a census and the round's D steps, nothing more for the augmentation
    by_run: dict[str, list] = {}
    for entry in charges(tmp_path)[0]:
        by_run.setdefault(entry["run"], []).append((entry["purpose"], [ev["steps"] for ev in entry["events"]]))
    assert by_run["aug"] == by_run["plain"] == [("dpgan-census", [1]), ("dpgan", [cfg.gan_local_steps])]


def test_the_transformations_randomness_is_the_sites_secret(tmp_path, monkeypatch) -> None:
    """How many draws a D step makes follows its Poisson batch size (private), so, like the fakes' latents, the
    shifts and squares must come from the site's secret stream, never from the coordinator's seed."""
    import client.dpgan as dpgan
    from tests.test_dpgan_step import _one_round

    seeds: list[tuple] = []

    def recording(x, names, rng):  # which secret stream (its root entropy and spawn key) each call draws from
        seeds.append((rng.bit_generator.seed_seq.entropy, rng.bit_generator.seed_seq.spawn_key))
        return augment(x, names, rng)

    monkeypatch.setattr(dpgan, "augment", recording)

    def stream(noise_seed) -> tuple:
        seeds.clear()
        _one_round(tmp_path, "r", noise_multiplier=1.0, sample_rate=0.05, steps=2, noise_seed=noise_seed,
                   augment=("translation", "cutout"))
        # each of 2 steps: D's real and fake rows of each 64-row chunk (about 90 rows: one or two chunks), G's fakes
        assert 6 <= len(seeds) <= 12 and len(set(seeds)) == 1
        return seeds[0]

    assert stream(1) != stream(2)  # the same coordinator seed (7), two secrets: two streams
    assert stream(3) == stream(3)
