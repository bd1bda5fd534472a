"""The exact discrete Gaussian of the site's counting releases (client/discrete_gaussian.py).

Golden checks: the sampler's frequencies against the exact probabilities, its Renyi divergence against the
continuous Gaussian's (the accounting charges the continuous curve), and every counting release a site makes
coming out as whole numbers, so that no floating-point bits carry more than the noisy value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_digits

from client.auto_clip import noisy_norm_histograms
from client.bnstats import record_class_statistics
from client.census import draw_census
from client.discrete_gaussian import discrete_gaussian, exact_variance, noisy_counts
from client.evaluation import _gaussian
from common.bnnet import BNNet
from common.data import ImageDataset
from common.protocol import STATS_COUNT


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """Exact N_Z(0, sigma^2) probabilities on ``support`` (normalised over +-40 sigma, the rest is < 1e-300)."""
    wide = np.arange(-int(40 * sigma) - 1, int(40 * sigma) + 2)
    norm = np.exp(-wide.astype(float) ** 2 / (2 * sigma ** 2)).sum()
    return np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2)) / norm


@pytest.mark.parametrize("sigma", [0.7, 2.0, 10.0])
def test_the_frequencies_are_the_discrete_gaussians(sigma):
    draws = discrete_gaussian(sigma, 40_000, seed=11)
    assert draws.dtype == np.int64
    support = np.arange(-3 * math.ceil(sigma), 3 * math.ceil(sigma) + 1)
    freq = np.array([(draws == y).mean() for y in support])
    # 40,000 draws: each frequency within ~4 standard errors of the exact probability. A sampler off in its
    # Laplace scale or acceptance step (e.g. sigma instead of sigma^2 in the exponent) misses by 10x this.
    assert np.abs(freq - _pmf(sigma, support)).max() < 4 * math.sqrt(0.25 / 40_000)
    exact_var = float((_pmf(sigma, np.arange(-200, 201)) * np.arange(-200, 201) ** 2).sum())
    assert draws.var() == pytest.approx(exact_var, rel=0.03)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("alpha", [2.0, 8.0, 64.0])
def test_its_renyi_divergence_is_at_most_the_continuous_gaussians(sigma, alpha):
    """D_alpha(N_Z(0, s^2) || N_Z(1, s^2)) <= alpha / (2 s^2): the ledger's charge for DPEvent(s, 1.0, 1) covers it."""
    ys = np.arange(-int(60 * sigma) - 60, int(60 * sigma) + 61)
    log_p = -ys.astype(float) ** 2 / (2 * sigma ** 2)
    log_q = -(ys - 1.0) ** 2 / (2 * sigma ** 2)
    log_p -= np.logaddexp.reduce(log_p)
    log_q -= np.logaddexp.reduce(log_q)
    divergence = np.logaddexp.reduce(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1)
    assert divergence <= alpha / (2 * sigma ** 2) * (1 + 1e-9)


def test_the_variance_is_exact_and_never_below_the_one_asked_for():
    for std in (10.0, 20.0, 0.1, 3.35, 1.5 * math.sqrt(1.25) / 0.5):
        assert float(exact_variance(std)) >= std * std
    with pytest.raises(ValueError, match="positive"):
        exact_variance(0.0)
    with pytest.raises(ValueError, match="positive"):
        exact_variance(math.nan)


def test_noisy_counts_adds_integer_noise_to_whole_numbers_only():
    exact = np.array([0.0, 3.0, 120.0])
    noisy = noisy_counts(exact, 10.0)
    assert np.array_equal(noisy, np.round(noisy)) and not np.array_equal(noisy, exact)
    assert np.array_equal(noisy_counts(exact, 0.0), exact)  # a non-private run: the exact counts
    a, b = noisy_counts(exact, 10.0, seed=3), noisy_counts(exact, 10.0, seed=3)
    assert np.array_equal(a, b)  # a seed (tests only) reproduces
    with pytest.raises(ValueError, match="whole-number"):
        noisy_counts(np.array([0.5]), 10.0)
    with pytest.raises(ValueError, match="whole-number"):
        noisy_counts(np.array([np.inf]), 10.0)


def _digits(n: int = 300) -> ImageDataset:
    d = load_digits()
    return ImageDataset((d.images[:n] / 16.0).astype(np.float32)[:, None], d.target[:n].astype(np.int64),
                        [str(c) for c in range(10)])


def _whole(x) -> bool:
    x = np.asarray(x, dtype=np.float64)
    return bool(np.all(np.isfinite(x)) and np.array_equal(x, np.round(x)))


def test_every_counting_release_of_a_site_is_whole_numbers(tmp_path):
    data = _digits()
    census = draw_census(data, 20.0, tmp_path)  # the per-run census (sent with every reply of the run)
    assert _whole(census) and not np.array_equal(census, data.class_counts())
    table = _gaussian(np.array([[3.0, 1.0], [0.0, 7.0]]), 10.0)  # the evaluation table and the audit histograms
    assert table.dtype == np.float32 and _whole(table)
    net = BNNet(1, 10, 8, 4)
    hists, std = noisy_norm_histograms(net, data, noise_multiplier=10.0, seed=1)  # auto clip bounds (stay on site)
    assert all(_whole(h) for h in hists.values()) and std == pytest.approx(10.0 * math.sqrt(len(hists)))
    release = record_class_statistics(net, data, clip_bound=2.0, noise_multiplier=1.5)
    assert _whole(release[STATS_COUNT]) and not np.array_equal(release[STATS_COUNT], data.class_counts())
    # a share of the noise for a secure sum stays continuous: a sum of discrete Gaussians is not one
    share = record_class_statistics(net, data, clip_bound=2.0, noise_multiplier=1.5, integer_counts=False)
    assert not _whole(share[STATS_COUNT])


def test_a_sites_draws_end_at_a_fixed_deadline_whatever_the_noise():
    """The sampler's loops run longer for larger noise; a site's draws return DRAW_SECONDS per count after they
    began, so their time says nothing of the noise (a seeded draw, tests only, returns at once)."""
    import time

    from client.discrete_gaussian import DRAW_SECONDS

    for shape in ((5,), (40,)):
        began = time.monotonic()
        discrete_gaussian(20.0, shape)
        took = time.monotonic() - began
        assert shape[0] * DRAW_SECONDS <= took < shape[0] * DRAW_SECONDS + 0.05
    slept: list[float] = []
    discrete_gaussian(20.0, (8,), sleep=slept.append)
    assert len(slept) == 1 and 0 < slept[0] <= 8 * DRAW_SECONDS  # the wait makes up the rest of the deadline
