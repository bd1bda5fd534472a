"""Privacy audits of a synthetic image set: memorization, membership inference, similarity.

Pure functions on arrays (no file reading): they run at the coordinator in a simulation, and at a site
on its own private data, where :func:`site_audit_summary` reduces everything to aggregates.

Distances
    Images are flattened (N, C, H, W) -> (N, D) float vectors in [0, 1]. ``metric="mse"`` is the mean
    squared error ||a - b||^2 / D (seed 000 Table 2 uses MSE); ``metric="l2"`` is the Euclidean
    distance ||a - b||. Feature-space audits pass features (N, F) instead of images, e.g. from
    ``common.learner.extract_features``. The nearest-neighbour search is a chunked torch matmul
    (||a||^2 + ||b||^2 - 2 a.b in float32); the winning distance is then recomputed exactly in float64,
    so an exact copy reports a distance of exactly 0.

Memorization (:func:`memorization_test`, seed 000 Table 2)
    For each synthetic image: distance to its nearest *training* record and to its nearest *held-out*
    record. The two reference sets are subsampled to the same size first, because the nearest
    neighbour in a bigger set is closer by chance alone. Without memorization the two distance
    distributions are the same; a one-sided Mann-Whitney U test (train distances smaller), a
    two-sided Kolmogorov-Smirnov test and a paired one-sided Wilcoxon signed-rank test on
    d_train - d_heldout compare them.

Near-copies
    A synthetic image is a near-copy when its distance to the nearest record of the *whole* training
    set is <= a threshold. Default threshold: the ``near_copy_quantile`` (0.1%) quantile of the
    distances from held-out records to their nearest training record, i.e. "closer to a training record
    than all but 0.1% of genuinely unseen records are". A generator that never saw the training set
    therefore produces near-copies at about that chance rate (reported as ``expected_by_chance``);
    Fisher's exact test (synthetic vs held-out near-copy rates, one-sided) says whether the count
    exceeds it. An absolute bound (``near_copy_threshold``, in
    the metric's units, e.g. MSE 1e-3) replaces the quantile rule when given.

Membership inference (:func:`membership_inference`, seed 003's claim)
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

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import roc_curve

Metric = Literal["mse", "l2"]
_METRICS = ("mse", "l2")
# Elements of one (queries x references) distance block; 2^24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24
# Pixel-space MSE histogram range used by site summaries: fixed, so counts from several sites add up.
DEFAULT_MSE_HIST_RANGE = (0.0, 0.25)


# --------------------------------------------------------------------------------------------------
# Nearest neighbours
# --------------------------------------------------------------------------------------------------


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """(N, ...) array -> (N, D) float32 C-contiguous matrix, with a clear error for bad input."""
    arr = np.asarray(x)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty array of records shaped (N, ...) e.g. images (N, C, H, W) "
            f"or features (N, F); got shape {arr.shape}"
        )
    return np.ascontiguousarray(arr.reshape(arr.shape[0], -1), dtype=np.float32)


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"unknown distance metric '{metric}': use one of {_METRICS}")


def _finish_distance(sq: np.ndarray, dim: int, metric: str) -> np.ndarray:
    """Squared Euclidean distances (float64) -> the requested metric."""
    return sq / dim if metric == "mse" else np.sqrt(sq)


def _exact_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise squared Euclidean distance of two (N, D) arrays in float64 (no cancellation error)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return np.einsum("nd,nd->n", diff, diff)


def _nn_search(
    a: np.ndarray, b: np.ndarray, *, both_ways: bool, device: torch.device | str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunked nearest neighbour search on (Na, D) x (Nb, D) float32 matrices.

    Returns the index of the nearest b for every a (Na,) and, with ``both_ways``, the index of the
    nearest a for every b (Nb,); one pass over the distance matrix serves both directions.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    na, nb = a.shape[0], b.shape[0]
    ta = torch.from_numpy(a).to(dev)
    tb = torch.from_numpy(b).to(dev)
    a_sq = (ta * ta).sum(1)  # (Na,)
    b_sq = (tb * tb).sum(1)  # (Nb,)
    # Square-ish blocks keep the (qa x qb) distance block near _BLOCK_ELEMENTS.
    qb = min(nb, max(256, int(math.sqrt(_BLOCK_ELEMENTS))))
    qa = min(na, max(1, _BLOCK_ELEMENTS // qb))
    best_a = torch.full((na,), float("inf"), device=dev)
    arg_a = torch.zeros(na, dtype=torch.long, device=dev)
    best_b = torch.full((nb,), float("inf"), device=dev) if both_ways else None
    arg_b = torch.zeros(nb, dtype=torch.long, device=dev) if both_ways else None
    with torch.no_grad():
        for i in range(0, na, qa):
            blk_a = ta[i : i + qa]
            for j in range(0, nb, qb):
                # (qa, qb) squared distances; clamp the tiny negatives float32 cancellation produces.
                d2 = a_sq[i : i + qa, None] + b_sq[None, j : j + qb] - 2.0 * (blk_a @ tb[j : j + qb].T)
                d2.clamp_(min=0.0)
                row_min, row_arg = d2.min(dim=1)
                better = row_min < best_a[i : i + qa]
                best_a[i : i + qa] = torch.where(better, row_min, best_a[i : i + qa])
                arg_a[i : i + qa] = torch.where(better, row_arg + j, arg_a[i : i + qa])
                if both_ways:
                    col_min, col_arg = d2.min(dim=0)
                    better_b = col_min < best_b[j : j + qb]
                    best_b[j : j + qb] = torch.where(better_b, col_min, best_b[j : j + qb])
                    arg_b[j : j + qb] = torch.where(better_b, col_arg + i, arg_b[j : j + qb])
    return arg_a.cpu().numpy(), (arg_b.cpu().numpy() if both_ways else None)


def nearest_neighbors(
    queries: np.ndarray,
    reference: np.ndarray,
    *,
    metric: Metric = "mse",
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query record to its nearest reference record, and that record's index.

    ``queries`` (Nq, ...) and ``reference`` (Nr, ...) are images (N, C, H, W) in [0, 1] or features
    (N, F); both are flattened. Returns ``(distances (Nq,) float64, indices (Nq,) int64)``.
    """
    _check_metric(metric)
    q, r = _as_matrix(queries, "queries"), _as_matrix(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"queries have {q.shape[1]} values per record but the reference has {r.shape[1]}; "
            "both must be the same image shape (resize one set) or the same feature extractor"
        )
    idx, _ = _nn_search(q, r, both_ways=False, device=device)
    return _finish_distance(_exact_sq(q, r[idx]), q.shape[1], metric), idx


def mutual_nearest_distances(
    a: np.ndarray,
    b: np.ndarray,
    *,
    metric: Metric = "mse",
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour distances in both directions from one pass over the a x b distance matrix.

    Returns ``(d_a (Na,), d_b (Nb,))``: d_a[i] = distance from a[i] to its nearest b; d_b[j] =
    distance from b[j] to its nearest a.
    """
    _check_metric(metric)
    am, bm = _as_matrix(a, "a"), _as_matrix(b, "b")
    if am.shape[1] != bm.shape[1]:
        raise ValueError(f"record sizes differ ({am.shape[1]} vs {bm.shape[1]}); use the same image shape")
    idx_a, idx_b = _nn_search(am, bm, both_ways=True, device=device)
    assert idx_b is not None
    dim = am.shape[1]
    return (
        _finish_distance(_exact_sq(am, bm[idx_a]), dim, metric),
        _finish_distance(_exact_sq(bm, am[idx_b]), dim, metric),
    )


def _subsample(n_total: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted random indices of ``n_keep`` of ``n_total`` records (all of them when n_keep >= n_total)."""
    if n_keep >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, size=n_keep, replace=False))


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
        if self.tests["mann_whitney"]["p_value"] < self.alpha:
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
    if n_ref == len(tr):
        d_train = d_train_all
    else:
        d_train, _ = nearest_neighbors(s, tr[tr_idx], metric=metric, device=device)
    d_heldout, _ = nearest_neighbors(s, ho_sub, metric=metric, device=device)

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
        tests=_two_sample_tests(d_train, d_heldout),
    )


# --------------------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------------------


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties count one half.

    Computed from ranks (the Mann-Whitney U statistic / (n_pos * n_neg)).
    """
    pos, neg = np.asarray(scores_pos, float).ravel(), np.asarray(scores_neg, float).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def bootstrap_auc_ci(
    scores_pos: np.ndarray,
    scores_neg: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling positives and negatives separately (seeded)."""
    pos, neg = np.asarray(scores_pos, float).ravel(), np.asarray(scores_neg, float).ravel()
    rng = np.random.default_rng(seed)
    n_pos, n_neg = len(pos), len(neg)
    # Replicates in batches so the (batch, n_pos + n_neg) rank matrix stays ~ 8M entries.
    batch = max(1, min(n_bootstrap, (1 << 23) // (n_pos + n_neg)))
    aucs = []
    for start in range(0, n_bootstrap, batch):
        b = min(batch, n_bootstrap - start)
        p = pos[rng.integers(0, n_pos, size=(b, n_pos))]  # (b, n_pos)
        n = neg[rng.integers(0, n_neg, size=(b, n_neg))]  # (b, n_neg)
        ranks = stats.rankdata(np.concatenate([p, n], axis=1), axis=1)
        u = ranks[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2.0
        aucs.append(u / (n_pos * n_neg))
    all_aucs = np.concatenate(aucs)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(all_aucs, [tail, 100.0 - tail])
    return float(lo), float(hi)


def tpr_at_fpr(scores_pos: np.ndarray, scores_neg: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate of a threshold on the score whose false-positive rate is <= ``fpr``."""
    y = np.concatenate([np.ones(len(scores_pos)), np.zeros(len(scores_neg))])
    s = np.concatenate([np.asarray(scores_pos, float), np.asarray(scores_neg, float)])
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())


@dataclass
class MembershipResult:
    """Attack scores (minus distance to the nearest synthetic record) and the attack's quality."""

    scores_members: np.ndarray
    scores_nonmembers: np.ndarray
    auc: float
    auc_ci95: tuple[float, float]
    tpr_at_fpr: float
    fpr: float
    n_bootstrap: int

    def summary(self) -> dict:
        """Aggregates only."""
        return {
            "auc": self.auc,
            "auc_ci95": [self.auc_ci95[0], self.auc_ci95[1]],
            "tpr_at_fpr": self.tpr_at_fpr,
            "fpr": self.fpr,
            "members": int(len(self.scores_members)),
            "nonmembers": int(len(self.scores_nonmembers)),
            "n_bootstrap": self.n_bootstrap,
        }


def membership_inference(
    synth: np.ndarray,
    members: np.ndarray,
    nonmembers: np.ndarray,
    *,
    metric: Metric = "mse",
    fpr: float = 0.01,
    n_bootstrap: int = 1000,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> MembershipResult:
    """Distance-to-synthetic membership attack: score = -(distance to the nearest synthetic record).

    AUC members vs non-members (0.5 = no leakage), its bootstrap 95% CI, and TPR at ``fpr`` FPR. Use
    at least 1/fpr non-members, otherwise the FPR constraint can only be met by flagging nobody.
    """
    pool = np.concatenate([_as_matrix(members, "members"), _as_matrix(nonmembers, "non-members")])
    _, d = mutual_nearest_distances(_as_matrix(synth, "synthetic records"), pool, metric=metric, device=device)
    scores = -d
    pos, neg = scores[: len(members)], scores[len(members) :]
    return MembershipResult(
        scores_members=pos,
        scores_nonmembers=neg,
        auc=roc_auc(pos, neg),
        auc_ci95=bootstrap_auc_ci(pos, neg, n_bootstrap=n_bootstrap, seed=seed),
        tpr_at_fpr=tpr_at_fpr(pos, neg, fpr),
        fpr=fpr,
        n_bootstrap=n_bootstrap,
    )


# --------------------------------------------------------------------------------------------------
# Similarity (SSIM / PSNR)
# --------------------------------------------------------------------------------------------------


def ssim_window(height: int, width: int) -> int:
    """SSIM window: 7 (scikit-image's default) or the largest odd size that fits a tiny image."""
    side = min(7, height, width)
    side = side if side % 2 == 1 else side - 1
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    return side


def _as_images(x: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) -> (N, C, H, W) float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be images shaped (N, C, H, W) or (N, H, W); got shape {np.shape(x)}")
    return arr


@dataclass
class SimilarityResult:
    """SSIM and PSNR (dB, capped) of each synthetic image (S,) to its nearest private image."""

    ssim: np.ndarray
    psnr: np.ndarray
    nn_index: np.ndarray
    identical: int
    psnr_cap: float
    win_size: int

    def summary(self, *, include_extremes: bool = True) -> dict:
        """Means and stds (and maxima with ``include_extremes``)."""
        out: dict = {}
        for key, vals in (("ssim", self.ssim), ("psnr", self.psnr)):
            out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
            if include_extremes:
                out[key]["max"] = float(np.max(vals))
        out.update({"identical": self.identical, "psnr_cap": self.psnr_cap, "win_size": self.win_size})
        return out


def similarity_to_nearest(
    synth: np.ndarray,
    private: np.ndarray,
    *,
    nn_index: np.ndarray | None = None,
    psnr_cap: float = 100.0,
    device: torch.device | str | None = None,
) -> SimilarityResult:
    """SSIM and PSNR of each synthetic image to its nearest (MSE) private image; images in [0, 1].

    ``nn_index`` (S,) skips the search when the caller already knows the nearest private image.
    """
    s_img, p_img = _as_images(synth, "synthetic images"), _as_images(private, "private images")
    if s_img.shape[1:] != p_img.shape[1:]:
        raise ValueError(f"image shapes differ: synthetic {s_img.shape[1:]} vs private {p_img.shape[1:]}")
    if nn_index is None:
        _, nn_index = nearest_neighbors(s_img, p_img, metric="mse", device=device)
    channels, height, width = s_img.shape[1:]
    win = ssim_window(height, width)
    ssim = np.empty(len(s_img))
    psnr = np.empty(len(s_img))
    identical = 0
    for i, j in enumerate(nn_index):
        a, b = s_img[i], p_img[j]
        if channels == 1:
            ssim[i] = structural_similarity(b[0], a[0], win_size=win, data_range=1.0)
        else:
            ssim[i] = structural_similarity(b, a, win_size=win, data_range=1.0, channel_axis=0)
        if np.array_equal(a, b):
            # skimage would return inf (and warn about a division by zero).
            identical += 1
            psnr[i] = psnr_cap
        else:
            psnr[i] = min(psnr_cap, peak_signal_noise_ratio(b, a, data_range=1.0))
    return SimilarityResult(ssim=ssim, psnr=psnr, nn_index=np.asarray(nn_index), identical=identical,
                            psnr_cap=psnr_cap, win_size=win)


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
