"""Memorization test: nearest training vs nearest held-out distances, two-sample tests, near-copies.

The method and the summary layout are described in the package docstring (:mod:`common.audits`),
which is "the module docstring" the docstrings below refer to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from common.audits.neighbors import (Metric, _as_matrix, _check_metric, _subsample, distance_matrix, nearest_in_matrix,
                                     nearest_neighbors)


def _moments(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x))}


# --------------------------------------------------------------------------------------------------
# Memorization
# --------------------------------------------------------------------------------------------------


@dataclass
class MemorizationResult:
    """Per-synthetic-record distances (coordinator/simulation use) plus the test results.

    ``d_train``/``d_heldout`` (S,) are distances to the equal-size reference subsamples;
    ``d_train_all`` (S,) is the distance to the whole training set (used for near-copies);
    ``calibration`` (R,) are the held-out -> whole-train distances the quantile threshold comes from.
    """

    metric: str
    d_train: np.ndarray
    d_heldout: np.ndarray
    d_train_all: np.ndarray
    calibration: np.ndarray
    reference_size: int
    train_size: int
    threshold: float
    rule: str
    quantile: float | None
    near_copy_mask: np.ndarray
    hist_edges: np.ndarray
    alpha: float
    train_index: np.ndarray  # (reference_size,) rows of ``train`` in the equal-size subsample
    heldout_index: np.ndarray  # (reference_size,) rows of ``heldout`` in the equal-size subsample
    nearest_train: np.ndarray  # (S,) row of ``train`` nearest to each synthetic record
    tests: dict = field(default_factory=dict)

    @property
    def near_copies(self) -> int:
        """Number of synthetic records within the near-copy threshold of some training record."""
        return int(self.near_copy_mask.sum())

    def summary(self) -> dict:
        """Aggregates only (see the module docstring for the layout)."""
        edges = self.hist_edges
        hi = edges[-1]
        h_train, _ = np.histogram(self.d_train[self.d_train <= hi], bins=edges)
        h_held, _ = np.histogram(self.d_heldout[self.d_heldout <= hi], bins=edges)
        n = len(self.d_train)
        n_cal_close = int(np.sum(self.calibration <= self.threshold))
        chance_rate = n_cal_close / len(self.calibration)
        # Fisher's exact test, synthetic vs held-out near-copy rates: unlike a binomial test against
        # chance_rate it accounts for the threshold being estimated from few calibration records.
        table = [[self.near_copies, n - self.near_copies], [n_cal_close, len(self.calibration) - n_cal_close]]
        fisher_p = float(stats.fisher_exact(table, alternative="greater").pvalue)
        flags = []
        if fisher_p < self.alpha:
            flags.append("near_copies")
        boot = self.tests.get("reference_bootstrap") or {}
        # closer to training records by the rank test AND by a gap that survives resampling the reference
        # records: a few reference records nearest to many synthetic ones (hubs) make the rank test's
        # independence assumption fail, and a one-record accident look like a systematic gap
        if self.tests["mann_whitney"]["p_value"] < self.alpha and boot.get("ci95", [1.0])[0] > 0:
            flags.append("train_closer")
        return {
            "train": _moments(self.d_train),
            "heldout": _moments(self.d_heldout),
            "histogram": {
                "edges": [float(e) for e in edges],
                "train": [int(c) for c in h_train],
                "heldout": [int(c) for c in h_held],
                "overflow_train": int(np.sum(self.d_train > hi)),
                "overflow_heldout": int(np.sum(self.d_heldout > hi)),
            },
            **self.tests,
            "near_copies": {
                "count": self.near_copies,
                "fraction": self.near_copies / n,
                "threshold": float(self.threshold),
                "rule": self.rule,
                "quantile": self.quantile,
                "expected_by_chance": chance_rate * n,
                "fisher_p_value": fisher_p,
                "train_records_searched": self.train_size,
            },
            "alpha": self.alpha,
            "flagged": bool(flags),
            "flags": flags,
        }


def _two_sample_tests(d_train: np.ndarray, d_heldout: np.ndarray) -> dict:
    """Mann-Whitney (one-sided: train smaller), KS (two-sided), paired Wilcoxon (one-sided)."""
    mw = stats.mannwhitneyu(d_train, d_heldout, alternative="less")
    ks = stats.ks_2samp(d_train, d_heldout)
    diff = d_train - d_heldout
    if np.count_nonzero(diff) == 0:
        # Identical distances for every record: no evidence either way (scipy refuses all-zero input).
        wx_stat, wx_p = 0.0, 1.0
    else:
        wx = stats.wilcoxon(diff, alternative="less", zero_method="wilcox")
        wx_stat, wx_p = float(wx.statistic), float(wx.pvalue)
    closer = float(np.mean(d_train < d_heldout) + 0.5 * np.mean(d_train == d_heldout))
    return {
        "mann_whitney": {"statistic": float(mw.statistic), "p_value": float(mw.pvalue), "alternative": "less"},
        "ks": {"statistic": float(ks.statistic), "p_value": float(ks.pvalue)},
        "wilcoxon_paired": {"statistic": wx_stat, "p_value": wx_p, "alternative": "less"},
        "closer_to_train_fraction": closer,
    }


def _reference_bootstrap(d_tr: np.ndarray, d_ho: np.ndarray, rng: np.random.Generator, n_bootstrap: int = 200,
                         alpha: float = 0.05) -> dict:
    """How much the mean nearest-distance gap (held-out minus training) depends on which reference records were
    drawn: the reference records resampled with replacement ``n_bootstrap`` times (the synthetic records fixed),
    the gap recomputed each time; its (1 - alpha) interval, and how many distinct reference records are the
    nearest to some synthetic record (few = hubs: the distances hang on those few records). ``d_tr``, ``d_ho``:
    (S, n) distances of the synthetic records to the training and held-out reference records."""
    n_tr, n_ho = d_tr.shape[1], d_ho.shape[1]
    gaps = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        cols_tr, cols_ho = rng.integers(0, n_tr, n_tr), rng.integers(0, n_ho, n_ho)
        gaps[b] = d_ho[:, cols_ho].min(axis=1).mean() - d_tr[:, cols_tr].min(axis=1).mean()
    lo, hi = np.quantile(gaps, [alpha / 2, 1 - alpha / 2])
    return {"gap": float(d_ho.min(axis=1).mean() - d_tr.min(axis=1).mean()), "ci95": [float(lo), float(hi)],
            "n_bootstrap": n_bootstrap,
            "distinct_nearest": {"train": int(len(np.unique(d_tr.argmin(axis=1)))),
                                 "heldout": int(len(np.unique(d_ho.argmin(axis=1))))}}


def memorization_test(
    synth: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    metric: Metric = "mse",
    max_reference: int | None = None,
    near_copy_quantile: float = 0.001,
    near_copy_threshold: float | None = None,
    bins: int = 40,
    hist_range: tuple[float, float] | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MemorizationResult:
    """Distance of each synthetic record to the nearest training vs nearest held-out record.

    ``train`` and ``heldout`` are subsampled (seeded) to the same size, at most ``max_reference``,
    for the distribution comparison; near-copies are searched in the whole ``train``. Histograms
    share ``bins`` equal bins over ``hist_range`` (default: 0 to the largest distance seen; values
    above a given range are counted as overflow). See the module docstring for the threshold rule.
    """
    _check_metric(metric)
    if not 0.0 < near_copy_quantile < 1.0:
        raise ValueError(f"near_copy_quantile must be in (0, 1), got {near_copy_quantile}")
    s = _as_matrix(synth, "synthetic records")
    tr = _as_matrix(train, "training records")
    ho = _as_matrix(heldout, "held-out records")
    rng = np.random.default_rng(seed)
    n_ref = min(len(tr), len(ho), max_reference or len(tr))
    tr_idx = _subsample(len(tr), n_ref, rng)
    ho_idx = _subsample(len(ho), n_ref, rng)
    ho_sub = ho[ho_idx]

    # Whole training set: synthetic -> train (near-copies) and held-out -> train (calibration) at once.
    d_all, idx_all = nearest_neighbors(np.concatenate([s, ho_sub]), tr, metric=metric, device=device)
    d_train_all, calibration = d_all[: len(s)], d_all[len(s) :]
    # Synthetic x reference distance matrices, once: the nearest distances and the reference bootstrap read them.
    tr_sub = tr[tr_idx]
    matrix_tr = distance_matrix(s, tr_sub, metric=metric, device=device)  # (S, n_ref)
    matrix_ho = distance_matrix(s, ho_sub, metric=metric, device=device)  # (S, n_ref)
    d_train, _ = nearest_in_matrix(s, tr_sub, matrix_tr, metric=metric)
    d_heldout, _ = nearest_in_matrix(s, ho_sub, matrix_ho, metric=metric)

    if near_copy_threshold is not None:
        threshold, rule, quantile = float(near_copy_threshold), f"absolute: {metric} <= {near_copy_threshold:g}", None
    else:
        threshold = float(np.quantile(calibration, near_copy_quantile))
        quantile = near_copy_quantile
        rule = (
            f"{metric} to nearest training record <= the {near_copy_quantile:g} quantile of held-out -> "
            "training nearest-neighbour distances"
        )
    if hist_range is None:
        hist_range = (0.0, float(max(d_train.max(), d_heldout.max())) or 1.0)
    edges = np.linspace(hist_range[0], hist_range[1], bins + 1)
    return MemorizationResult(
        metric=metric,
        d_train=d_train,
        d_heldout=d_heldout,
        d_train_all=d_train_all,
        calibration=calibration,
        reference_size=n_ref,
        train_size=len(tr),
        threshold=threshold,
        rule=rule,
        quantile=quantile,
        near_copy_mask=d_train_all <= threshold,
        hist_edges=edges,
        alpha=alpha,
        train_index=tr_idx,
        heldout_index=ho_idx,
        nearest_train=idx_all[: len(s)],
        tests={**_two_sample_tests(d_train, d_heldout),
               "reference_bootstrap": _reference_bootstrap(matrix_tr, matrix_ho, rng, alpha=alpha)},
    )
