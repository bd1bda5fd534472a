"""Privacy audits of a synthetic image set: memorization, membership inference, similarity.

Pure functions on arrays (no file reading): they run at the coordinator in a simulation, and at a site
on its own private data, where :func:`site_audit_summary` reduces everything to aggregates.

Where each part lives (every name below is re-exported here, so ``from common.audits import X`` works)
    ``common.audits.neighbors``     distance metrics, chunked nearest-neighbour search:
                                    :func:`nearest_neighbors`, :func:`mutual_nearest_distances`
    ``common.audits.memorization``  :class:`MemorizationResult`, :func:`memorization_test`
    ``common.audits.membership``    :func:`roc_auc`, :func:`bootstrap_auc_ci`, :func:`tpr_at_fpr`,
                                    :class:`MembershipResult`, :func:`membership_inference`
    ``common.audits.similarity``    :func:`ssim_window`, :class:`SimilarityResult`,
                                    :func:`similarity_to_nearest`
    ``common.audits.summary``       :func:`site_audit_summary`, ``DEFAULT_MSE_HIST_RANGE``
    ``common.audits.attribute``     :class:`AttributeLeakage`, :func:`attribute_leakage` (seed 004's
                                    privacy loss of a sensitive attribute; imported from there: it
                                    trains a learner)
    The block size of the nearest-neighbour search, ``_BLOCK_ELEMENTS``, lives in (and is read from)
    ``common.audits.neighbors``; patch it there.

Distances
    Images are flattened (N, C, H, W) -> (N, D) float vectors in [0, 1]. ``metric="mse"`` is the mean
    squared error ||a - b||^2 / D (the GAN-surrogate memorization test of facial data this project grew from uses MSE); ``metric="l2"`` is the Euclidean
    distance ||a - b||. Feature-space audits pass features (N, F) instead of images, e.g. from
    ``common.learner.extract_features``. The nearest-neighbour search is a chunked torch matmul
    (||a||^2 + ||b||^2 - 2 a.b in float32); the winning distance is then recomputed exactly in float64,
    so an exact copy reports a distance of exactly 0.

Memorization (:func:`memorization_test`: nearest-neighbour distances to training vs held-out records)
    For each synthetic image: distance to its nearest *training* record and to its nearest *held-out*
    record. The two reference sets are subsampled to the same size first, because the nearest
    neighbour in a bigger set is closer by chance alone. Without memorization the two distance
    distributions are the same; a one-sided Mann-Whitney U test (train distances smaller), a
    two-sided Kolmogorov-Smirnov test and a paired one-sided Wilcoxon signed-rank test on
    d_train - d_heldout compare them. Those tests take the synthetic records as independent, which fails
    when many of them share a few nearest reference records (hubs: synthetic features off the real ones,
    seen on 64x64 faces, where one training record then decides thousands of comparisons). So the
    reference records are also resampled with replacement (200 times, synthetic records fixed) and the
    mean gap recomputed; "train_closer" is flagged only when the rank test says so *and* the gap's 95%
    interval stays above 0. How many distinct reference records are nearest to some synthetic record is
    reported beside it.

Near-copies
    A synthetic image is a near-copy when its distance to the nearest record of the *whole* training
    set is <= a threshold. Default threshold: the ``near_copy_quantile`` (0.1%) quantile of the
    distances from held-out records to their nearest training record, i.e. "closer to a training record
    than all but 0.1% of genuinely unseen records are". A generator that never saw the training set
    therefore produces near-copies at about that chance rate (reported as ``expected_by_chance``);
    Fisher's exact test (synthetic vs held-out near-copy rates, one-sided) says whether the count
    exceeds it. An absolute bound (``near_copy_threshold``, in
    the metric's units, e.g. MSE 1e-3) replaces the quantile rule when given.

Membership inference (:func:`membership_inference`: does closeness to the synthetic set give members away?)
    Each candidate record is scored by minus its distance to the nearest synthetic image (closer =
    more likely a member). Reported: ROC AUC members vs non-members with a seeded, stratified bootstrap
    95% CI, and the true-positive rate at 1% false-positive rate. AUC 0.5 = the attack learns nothing.

Similarity (:func:`similarity_to_nearest`, seeds 001/002)
    SSIM and PSNR (scikit-image, data_range 1) of each synthetic image to its nearest private image
    (nearest by MSE). SSIM uses a 7x7 window, shrunk to the largest odd size that fits tiny images
    (8x8 digits keep 7). PSNR of identical images is infinite; it is capped at ``psnr_cap`` dB and
    the identical pairs are counted separately.

Summary layout (:func:`site_audit_summary`; also used under ``report["audits"]``)::

    {"kind": "diagnostic", "space": "pixel"|"feature", "metric": "mse"|"l2",
     "records": {"synthetic", "train", "heldout", "reference_per_side"},
     "memorization": {
        "train": {"mean", "std", "median"}, "heldout": {"mean", "std", "median"},
        "histogram": {"edges": [B+1], "train": [B], "heldout": [B],
                      "overflow_train", "overflow_heldout"},
        "mann_whitney": {"statistic", "p_value", "alternative": "less"},
        "ks": {"statistic", "p_value"},
        "wilcoxon_paired": {"statistic", "p_value", "alternative": "less"},
        "closer_to_train_fraction",
        "reference_bootstrap": {"gap", "ci95": [lo, hi], "n_bootstrap",
                                "distinct_nearest": {"train", "heldout"}},
        "near_copies": {"count", "fraction", "threshold", "rule", "quantile",
                        "expected_by_chance", "fisher_p_value", "train_records_searched"},
        "alpha", "flagged", "flags": [..]},
     "membership_inference": {"auc", "auc_ci95": [lo, hi], "tpr_at_fpr", "fpr", "members",
                              "nonmembers", "n_bootstrap"},
     "similarity": {"ssim": {"mean", "std"}, "psnr": {"mean", "std"}, "identical", "psnr_cap",
                    "win_size"}}   # "max" added to ssim/psnr only with include_extremes=True

No per-record value appears in a summary (means, stds, medians, fixed-bin histogram counts, test
statistics, AUC, TPR and counts only). The near-copy threshold is itself a low quantile of real
distances, which is why the whole summary is labelled a diagnostic rather than a DP release.
"""

from __future__ import annotations

from common.audits.membership import (
    MembershipResult,
    bootstrap_auc_ci,
    membership_inference,
    roc_auc,
    tpr_at_fpr,
)
from common.audits.memorization import MemorizationResult, memorization_test
from common.audits.neighbors import Metric, mutual_nearest_distances, nearest_neighbors
from common.audits.similarity import SimilarityResult, similarity_to_nearest, ssim_window
from common.audits.summary import DEFAULT_MSE_HIST_RANGE, site_audit_summary

__all__ = [
    "DEFAULT_MSE_HIST_RANGE",
    "MembershipResult",
    "MemorizationResult",
    "Metric",
    "SimilarityResult",
    "bootstrap_auc_ci",
    "membership_inference",
    "memorization_test",
    "mutual_nearest_distances",
    "nearest_neighbors",
    "roc_auc",
    "site_audit_summary",
    "similarity_to_nearest",
    "ssim_window",
    "tpr_at_fpr",
]
