"""DP choice of the statistics release's per-layer clip bounds (client/auto_clip.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from client.auto_clip import (
    NORM_BIN_EDGES, bounds_from_noisy_histograms, choose_layer_clips, noisy_norm_histograms, norm_histograms,
    record_block_norms,
)
from common.bnnet import BNNet, norm_layer_names
from common.data import load_dataset


def _net_and_data():
    torch.manual_seed(0)
    data = load_dataset("digits", "train")
    net = BNNet(1, 10, 8, 8, head_norm=True)
    return net, data


def test_bounds_sit_at_the_asked_quantile_of_the_true_norms() -> None:
    net, data = _net_and_data()
    norms = record_block_norms(net, data)
    assert set(norms) == set(norm_layer_names(net)) and all(len(v) == len(data) for v in norms.values())
    bounds = choose_layer_clips(net, data, noise_multiplier=10.0, quantile=0.9, seed=0)
    step = NORM_BIN_EDGES[1] / NORM_BIN_EDGES[0]  # one bin: the resolution of the grid
    for name, values in norms.items():
        true_q = float(np.quantile(values, 0.9))
        # 1437 records, noise std 20 per bin: the bound is the 0.9 quantile up to about one bin
        assert true_q / step <= bounds[name] <= true_q * step ** 2, (name, true_q, bounds[name])
        share_clipped = float(np.mean(values > bounds[name]))
        assert share_clipped <= 0.2, (name, share_clipped)


def test_histograms_count_every_record_once_per_layer_and_noise_is_filtered() -> None:
    norms = {"a": np.array([1e-9, 0.5, 0.5, 0.52, 3.0, 1e9])}  # outliers go to the end bins
    hist = norm_histograms(norms)["a"]
    assert hist.sum() == 6 and hist[0] == 1 and hist[-1] == 1
    # pure noise below 2 std everywhere but the true bin: the bound is that bin's upper edge
    counts = np.full(len(NORM_BIN_EDGES) - 1, 15.0)
    true_bin = int(np.searchsorted(NORM_BIN_EDGES, 4.0, side="right") - 1)
    counts[true_bin] = 500.0
    assert bounds_from_noisy_histograms({"a": counts}, noise_std=10.0, quantile=0.9)["a"] == NORM_BIN_EDGES[true_bin + 1]
    # nothing above the noise: the largest noisy bin
    small = np.zeros(len(NORM_BIN_EDGES) - 1)
    small[7] = 5.0
    assert bounds_from_noisy_histograms({"a": small}, noise_std=10.0)["a"] == NORM_BIN_EDGES[8]


def test_the_histogram_noise_has_the_accounted_scale() -> None:
    """One Gaussian mechanism of sensitivity sqrt(L): the noise must have std z * sqrt(L) in every bin."""
    net, data = _net_and_data()
    exact = norm_histograms(record_block_norms(net, data))
    z, layers = 3.0, len(exact)
    noise = []
    for seed in range(10):
        noisy, std = noisy_norm_histograms(net, data, noise_multiplier=z, seed=seed)
        assert std == z * math.sqrt(layers) and set(noisy) == set(exact)
        noise.append(np.concatenate([noisy[k] - exact[k] for k in exact]))
    noise = np.concatenate(noise)  # 10 x L x 80 draws
    assert abs(noise.mean()) < 0.1 * std
    assert abs(noise.std() / std - 1.0) < 0.05


def test_a_small_site_never_gets_an_absurd_bound_from_a_noise_bin() -> None:
    """280 records against noise std 20 in 80 bins x 4 layers: spurious bins must not set the bound."""
    net, data = _net_and_data()
    small = data.subset(np.arange(0, len(data), 5)[:280])
    norms = record_block_norms(net, small)
    for seed in range(20):
        bounds = choose_layer_clips(net, small, noise_multiplier=10.0, seed=seed)
        for name, values in norms.items():
            assert float(np.median(values)) / 2 < bounds[name] < 3 * float(values.max()), (seed, name, bounds[name])
