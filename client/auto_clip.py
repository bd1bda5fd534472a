"""DP choice of the statistics release's per-layer clip bounds (``bn-layer-clips = "auto"``).

A layer's bound c_l should sit just above most records' block norms ||f_il|| (``client.bnstats``):
much lower and the clipped sums are biased (the synthesized images match shrunken statistics); much
higher and the noise, proportional to c_l, buries them. Those norms depend on the data and on the net
the federation just trained (on MNIST the head layer's are ~70, on PneumoniaMNIST the third conv
layer's ~25 with one net and ~110 with another), so nobody can fix the bounds in advance without
looking at private data. The site estimates them itself, privately, just before the release:

For every record and every norm layer l, the block norm falls into one bin of a public,
data-independent log-spaced grid (``NORM_BIN_EDGES``; norms outside it count in the first/last bin).
The per-layer bin counts H_l form H = concat_l H_l. One record adds 1 to exactly one bin of each
of the L layers, so under add/remove-one adjacency ||dH||_2 = sqrt(L), and
    H~ = H + N_Z(0, (z sqrt(L))^2 I)   (exact integer noise: ``client.discrete_gaussian``)
is ONE Gaussian mechanism with noise multiplier z = ``AUTO_CLIP_NOISE_MULTIPLIER``: account it as
``DPEvent(z, sample_rate=1.0, steps=1)``. Everything after is post-processing: per layer, bins whose
noisy count is under ``4 z sqrt(L)`` are dropped as noise (with 80 bins x L layers a lower cut lets a
pure-noise bin through now and then, and a spurious bin far out sets an absurd bound), and c_l is the upper edge of the bin where
the kept counts' cumulative share reaches ``quantile`` (if no bin survives, the largest noisy bin's
upper edge). The bounds never leave the site except through the release's noise scale, itself
DP post-processing.

Cost: z = 10 adds alpha / 200 to the RDP of every order, next to alpha / (2 sigma^2) for the
statistics release (sigma ~ 1.5 at epsilon 10, ~ 5 at epsilon 1); the site's plan calibrates the
statistics noise with this release included, so the run still ends within its epsilon.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from client.discrete_gaussian import noisy_counts
from common.bnnet import norm_layer_names, record_block_norms  # noqa: F401 (re-export)

if TYPE_CHECKING:
    from common.data import ImageDataset

AUTO_CLIP_NOISE_MULTIPLIER = 10.0
AUTO_CLIP_QUANTILE = 0.9
NOISE_CUT = 4.0  # bins under NOISE_CUT noise stds are taken for noise: P(N(0,1) > 4) ~ 3e-5 per bin
# 1e-3 .. 1e5 in 80 bins of ratio 10^0.1 ~ 1.26: covers every norm seen on these nets with room to spare
NORM_BIN_EDGES = np.logspace(-3.0, 5.0, 81)


def norm_histograms(norms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact per-layer counts over ``NORM_BIN_EDGES`` (len(edges) - 1 bins each; outliers in the end bins)."""
    bins = len(NORM_BIN_EDGES) - 1
    out = {}
    for name, values in norms.items():
        idx = np.clip(np.searchsorted(NORM_BIN_EDGES, values, side="right") - 1, 0, bins - 1)
        out[name] = np.bincount(idx, minlength=bins).astype(np.float64)
    return out


def bounds_from_noisy_histograms(noisy: dict[str, np.ndarray], noise_std: float,
                                 quantile: float = AUTO_CLIP_QUANTILE) -> dict[str, float]:
    """Post-processing: one bound per layer from its noisy histogram (module docstring)."""
    bounds = {}
    for name, counts in noisy.items():
        kept = np.where(counts >= NOISE_CUT * noise_std, counts, 0.0)
        if kept.sum() <= 0:
            bin_index = int(np.argmax(counts))
        else:
            cdf = np.cumsum(kept) / kept.sum()
            bin_index = int(np.searchsorted(cdf, quantile - 1e-12))
        bounds[name] = float(NORM_BIN_EDGES[bin_index + 1])
    return bounds


def noisy_norm_histograms(model: nn.Module, dataset: "ImageDataset", *, noise_multiplier: float,
                          seed: int | None = None, device: torch.device | str | None = None,
                          ) -> tuple[dict[str, np.ndarray], float]:
    """The Gaussian mechanism of the module docstring: (noisy per-layer histograms, noise std per bin)."""
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier}")
    hists = norm_histograms(record_block_norms(model, dataset, device=device))
    noise_std = noise_multiplier * math.sqrt(len(hists))  # sensitivity sqrt(L): one bin per layer per record
    # integer noise, exact (client.discrete_gaussian); one stream over the layers in order, so a seed fixes them all
    names = list(hists)
    flat = noisy_counts(np.concatenate([hists[name] for name in names]), noise_std, seed)
    sizes = np.cumsum([len(hists[name]) for name in names])[:-1]
    return dict(zip(names, np.split(flat, sizes))), noise_std


def choose_layer_clips(model: nn.Module, dataset: "ImageDataset", *,
                       noise_multiplier: float = AUTO_CLIP_NOISE_MULTIPLIER, quantile: float = AUTO_CLIP_QUANTILE,
                       seed: int | None = None, device: torch.device | str | None = None) -> dict[str, float]:
    """The DP per-layer clip bounds of this site's data under ``model``.

    Account ``DPEvent(noise_multiplier, 1.0, 1)`` before calling. ``seed=None`` draws the noise from OS
    entropy (production); a fixed seed is for tests.
    """
    noisy, noise_std = noisy_norm_histograms(model, dataset, noise_multiplier=noise_multiplier, seed=seed,
                                             device=device)
    return bounds_from_noisy_histograms(noisy, noise_std, quantile)
