"""Aggregate-only summary of all audits, for a site handler and the report.

The summary layout is described in the package docstring (:mod:`common.audits`), which is "the module
docstring" the docstring below refers to.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from common.audits.membership import membership_inference
from common.audits.memorization import memorization_test
from common.audits.neighbors import Metric, _subsample
from common.audits.similarity import similarity_to_nearest

# Pixel-space MSE histogram range used by site summaries: fixed, so counts from several sites add up.
DEFAULT_MSE_HIST_RANGE = (0.0, 0.25)


# --------------------------------------------------------------------------------------------------
# Aggregate-only summary (site handler and report)
# --------------------------------------------------------------------------------------------------


def site_audit_summary(
    synth: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    space: Literal["pixel", "feature"] = "pixel",
    metric: Metric = "mse",
    max_records: int | None = 2000,
    near_copy_quantile: float = 0.001,
    near_copy_threshold: float | None = None,
    bins: int = 40,
    hist_range: tuple[float, float] | None = None,
    similarity: bool = True,
    include_extremes: bool = False,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict:
    """All audits of ``synth`` against a site's ``train`` (members) and ``heldout`` (non-members).

    Returns aggregates only, labelled ``"kind": "diagnostic"`` (layout in the module docstring).
    ``max_records`` caps the synthetic records audited and the equal-size reference subsamples
    (members / non-members); near-copies are still searched in the whole ``train``. Pixel-space MSE
    histograms use the fixed range ``DEFAULT_MSE_HIST_RANGE`` unless ``hist_range`` is given, so
    several sites' counts can be added. ``similarity`` (SSIM/PSNR) applies to images only.
    """
    if space == "feature" and similarity:
        raise ValueError("SSIM/PSNR are image metrics: pass similarity=False for feature-space audits")
    rng = np.random.default_rng(seed)
    cap = max_records or max(len(synth), len(train), len(heldout))
    synth_sub = np.asarray(synth)[_subsample(len(synth), cap, rng)]
    if hist_range is None and space == "pixel" and metric == "mse":
        hist_range = DEFAULT_MSE_HIST_RANGE
    mem = memorization_test(
        synth_sub, train, heldout, metric=metric, max_reference=cap, near_copy_quantile=near_copy_quantile,
        near_copy_threshold=near_copy_threshold, bins=bins, hist_range=hist_range, alpha=alpha, seed=seed,
        device=device,
    )
    # Same equal-size member / non-member subsamples for the attack as for the distance comparison.
    members = np.asarray(train)[mem.train_index]
    nonmembers = np.asarray(heldout)[mem.heldout_index]
    mia = membership_inference(synth_sub, members, nonmembers, metric=metric, n_bootstrap=n_bootstrap,
                               seed=seed, device=device)
    out = {
        "kind": "diagnostic",
        "space": space,
        "metric": metric,
        "records": {"synthetic": len(synth_sub), "train": len(train), "heldout": len(heldout),
                    "reference_per_side": mem.reference_size},
        "memorization": mem.summary(),
        "membership_inference": mia.summary(),
    }
    if similarity:
        # Nearest training image by pixel MSE (the memorization search found it when metric is mse).
        nn_index = mem.nearest_train if metric == "mse" else None
        sim = similarity_to_nearest(synth_sub, train, nn_index=nn_index, device=device)
        out["similarity"] = sim.summary(include_extremes=include_extremes)
    return out
