"""Distance-to-synthetic membership inference: ROC AUC, bootstrap CI, TPR at a fixed FPR.

The method and the summary layout are described in the package docstring (:mod:`common.audits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_curve

from common.audits.neighbors import Metric, _as_matrix, mutual_nearest_distances


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
