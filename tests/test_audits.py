"""Tests of common.audits: exact metric values on hand-made cases and canaries on sklearn digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from common import audits


@pytest.fixture(scope="module")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (N, 1, 8, 8) in [0, 1], split into members (600), non-members (600) and unseen (597).

    Members play the training set, non-members the held-out set; "unseen" images are real digits in
    neither, used to build synthetic sets that a perfect, non-memorizing generator could produce.
    """
    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[:600]], images[order[600:1200]], images[order[1200:]]


# --------------------------------------------------------------------------------------------------
# Nearest neighbours
# --------------------------------------------------------------------------------------------------


def test_nearest_neighbors_exact_values() -> None:
    reference = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    queries = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    d_mse, idx = audits.nearest_neighbors(queries, reference, metric="mse")
    d_l2, idx_l2 = audits.nearest_neighbors(queries, reference, metric="l2")
    # (1,1): squared distances 2, 1, 2 -> nearest is [1,0]; (0,3): nearest [0,2] at distance 1.
    assert idx.tolist() == [0, 1, 2] and idx_l2.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(d_mse, [0.0, 0.5, 0.5])  # squared distance / D with D = 2
    np.testing.assert_array_equal(d_l2, [0.0, 1.0, 1.0])


def test_exact_copy_has_distance_exactly_zero(digits_split) -> None:
    members, _, _ = digits_split
    d, idx = audits.nearest_neighbors(members[[5, 17]], members)
    assert d.tolist() == [0.0, 0.0]
    assert idx.tolist() == [5, 17]


def test_chunked_search_matches_brute_force(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    a = rng.random((300, 1, 6, 6)).astype(np.float32)
    b = rng.random((250, 1, 6, 6)).astype(np.float32)
    # Tiny blocks force many (query, reference) chunks, including ragged last ones.
    # The search reads the constant from the submodule it lives in (common/audits/neighbors.py).
    monkeypatch.setattr(audits.neighbors, "_BLOCK_ELEMENTS", 4096)
    full = cdist(a.reshape(300, -1).astype(np.float64), b.reshape(250, -1).astype(np.float64), "sqeuclidean") / 36
    d, idx = audits.nearest_neighbors(a, b)
    np.testing.assert_allclose(d, full.min(1), rtol=1e-9)
    np.testing.assert_array_equal(idx, full.argmin(1))
    d_a, d_b = audits.mutual_nearest_distances(a, b)
    np.testing.assert_allclose(d_a, full.min(1), rtol=1e-9)
    np.testing.assert_allclose(d_b, full.min(0), rtol=1e-9)
    # the whole matrix (what the memorization audit's bootstrap resamples) and the nearest read off it
    matrix = audits.neighbors.distance_matrix(a, b)
    np.testing.assert_allclose(matrix, full, rtol=1e-4, atol=1e-6)
    d_m, idx_m = audits.neighbors.nearest_in_matrix(a, b, matrix)
    np.testing.assert_allclose(d_m, full.min(1), rtol=1e-9)
    np.testing.assert_array_equal(idx_m, full.argmin(1))


def test_nearest_neighbors_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same image shape"):
        audits.nearest_neighbors(np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 6, 6)))
    with pytest.raises(ValueError, match="unknown distance metric"):
        audits.nearest_neighbors(np.zeros((2, 4)), np.zeros((2, 4)), metric="cosine")
    with pytest.raises(ValueError, match="non-empty"):
        audits.nearest_neighbors(np.zeros((0, 4)), np.zeros((2, 4)))


# --------------------------------------------------------------------------------------------------
# AUC, CI, TPR
# --------------------------------------------------------------------------------------------------


def test_auc_of_perfect_reversed_tied_and_random_scores() -> None:
    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert audits.roc_auc(pos, neg) == 1.0
    assert audits.roc_auc(neg, pos) == 0.0
    assert audits.roc_auc(np.ones(4), np.ones(7)) == 0.5
    rng = np.random.default_rng(0)
    p, n = rng.normal(size=4000), rng.normal(size=4000)
    assert abs(audits.roc_auc(p, n) - 0.5) < 0.02
    shifted = rng.normal(size=500) + 1.0
    assert audits.roc_auc(shifted, n[:500]) == pytest.approx(
        roc_auc_score(np.r_[np.ones(500), np.zeros(500)], np.r_[shifted, n[:500]]), abs=1e-12)


def test_bootstrap_ci_is_seeded_and_brackets_the_auc() -> None:
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.5, 1, 300), rng.normal(0, 1, 300)
    ci1 = audits.bootstrap_auc_ci(pos, neg, n_bootstrap=300, seed=7)
    ci2 = audits.bootstrap_auc_ci(pos, neg, n_bootstrap=300, seed=7)
    assert ci1 == ci2
    auc = audits.roc_auc(pos, neg)
    assert ci1[0] < auc < ci1[1]
    assert 0.02 < ci1[1] - ci1[0] < 0.15  # ~ +-1.96 * 0.016 for 300 vs 300


def test_tpr_at_fpr_hand_case() -> None:
    negatives = np.arange(100) / 100.0  # 0.00 .. 0.99
    positives = np.array([5.0, 4.0, 0.1])
    # One false positive (0.99) is allowed at 1% FPR: the threshold just below 0.99 catches 5 and 4.
    assert audits.tpr_at_fpr(positives, negatives, 0.01) == pytest.approx(2 / 3)
    assert audits.tpr_at_fpr(positives, negatives, 0.5) == pytest.approx(2 / 3)
    assert audits.tpr_at_fpr(positives, negatives, 0.95) == 1.0


# --------------------------------------------------------------------------------------------------
# SSIM / PSNR
# --------------------------------------------------------------------------------------------------


def test_psnr_of_known_noise() -> None:
    clean = np.full((1, 1, 16, 16), 0.5)
    noise = np.where(np.indices((16, 16)).sum(0) % 2 == 0, 0.1, -0.1)  # MSE exactly 0.01
    far = np.zeros((1, 1, 16, 16))
    res = audits.similarity_to_nearest(clean + noise, np.concatenate([far, clean]))
    assert res.nn_index.tolist() == [1]
    assert res.psnr[0] == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)
    assert res.identical == 0
    assert res.ssim[0] < 1.0


def test_ssim_of_identical_images_is_one_for_tiny_and_rgb_images(digits_split) -> None:
    members, _, _ = digits_split
    res = audits.similarity_to_nearest(members[:4], members[:50])  # 8x8 digits
    np.testing.assert_allclose(res.ssim, 1.0)
    assert res.identical == 4 and np.all(res.psnr == res.psnr_cap)
    assert res.win_size == 7
    rgb = np.random.default_rng(0).random((3, 3, 5, 5))
    res_rgb = audits.similarity_to_nearest(rgb, rgb)
    np.testing.assert_allclose(res_rgb.ssim, 1.0)
    assert res_rgb.win_size == 5
    summary = res.summary()
    assert summary["ssim"]["mean"] == pytest.approx(1.0) and "max" in summary["ssim"]


def test_ssim_window_sizes() -> None:
    assert audits.ssim_window(28, 28) == 7
    assert audits.ssim_window(8, 8) == 7
    assert audits.ssim_window(6, 9) == 5
    assert audits.ssim_window(3, 3) == 3
    with pytest.raises(ValueError, match="at least 3x3"):
        audits.ssim_window(2, 8)


# --------------------------------------------------------------------------------------------------
# Canaries: planted copies must be found, a clean set must not be flagged
# --------------------------------------------------------------------------------------------------


def test_memorization_flags_planted_copies(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    planted = np.arange(6)  # 1% of the 600 members
    synth = np.concatenate([members[planted], unseen[:54]])
    res = audits.memorization_test(synth, members, nonmembers)
    assert res.near_copies >= len(planted)
    assert res.near_copy_mask[: len(planted)].all()
    assert res.tests["mann_whitney"]["p_value"] < 0.05  # train distances significantly smaller
    assert res.d_train.mean() < res.d_heldout.mean()
    summary = res.summary()
    assert summary["flagged"] and "near_copies" in summary["flags"]
    assert summary["near_copies"]["fisher_p_value"] < 1e-3


def test_memorization_does_not_flag_clean_synthetic_set(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    res = audits.memorization_test(unseen[:200], members, nonmembers)
    summary = res.summary()
    assert res.near_copies <= 2
    assert summary["near_copies"]["expected_by_chance"] < 2
    assert not summary["flagged"], summary["flags"]
    assert abs(summary["closer_to_train_fraction"] - 0.5) < 0.1


def test_reference_sets_are_subsampled_to_equal_size(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    res = audits.memorization_test(unseen[:20], members, nonmembers[:150], seed=4)
    assert res.reference_size == 150
    assert len(res.train_index) == len(res.heldout_index) == 150
    assert res.train_size == 600  # near-copies still searched in every training record


def test_membership_inference_detects_copied_members(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    # 1% of members copied: each copied member scores 0 (the maximum), above every non-member.
    light = audits.membership_inference(np.concatenate([members[:6], unseen[:54]]), members, nonmembers,
                                        n_bootstrap=200)
    assert light.tpr_at_fpr >= 6 / 600
    assert np.all(light.scores_members[:6] == 0.0)
    assert np.all(light.scores_nonmembers < 0.0)
    # A fifth of the members copied: AUC well above 0.5 (at most 0.5 + 0.2 / 2 = 0.6 for this attack).
    heavy = audits.membership_inference(np.concatenate([members[:120], unseen[:80]]), members, nonmembers,
                                        n_bootstrap=200)
    assert heavy.auc_ci95[0] > 0.55
    assert heavy.tpr_at_fpr > 0.15


def test_membership_inference_clean_set_is_chance(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    res = audits.membership_inference(unseen[:200], members, nonmembers, n_bootstrap=300)
    lo, hi = res.auc_ci95
    assert lo <= 0.5 <= hi
    assert abs(res.auc - 0.5) < 0.05
    assert res.tpr_at_fpr < 0.05


# --------------------------------------------------------------------------------------------------
# Aggregate-only summary
# --------------------------------------------------------------------------------------------------


def _walk(value, path="") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _walk(v, f"{path}.{k}")]
    return [(path, value)]


def test_site_audit_summary_holds_aggregates_only(digits_split) -> None:
    members, nonmembers, unseen = digits_split
    synth = np.concatenate([members[:6], unseen[:94]])
    summary = audits.site_audit_summary(synth, members, nonmembers, bins=20, n_bootstrap=100)
    json.dumps(summary, allow_nan=False)  # plain JSON types only
    assert summary["kind"] == "diagnostic"
    assert set(summary) == {"kind", "space", "metric", "records", "memorization", "membership_inference",
                            "similarity"}
    for path, value in _walk(summary):
        assert not isinstance(value, np.ndarray), path
        if isinstance(value, list):  # only histogram bins and the CI are lists
            assert len(value) <= 21, path
    hist = summary["memorization"]["histogram"]
    np.testing.assert_allclose(hist["edges"], np.linspace(0.0, 0.25, 21))  # fixed bins, not data-driven
    assert sum(hist["train"]) + hist["overflow_train"] == 100
    assert sum(hist["heldout"]) + hist["overflow_heldout"] == 100
    assert summary["memorization"]["near_copies"]["count"] >= 6
    assert "max" not in summary["similarity"]["ssim"]  # extremes are single records: off by default


def test_site_audit_summary_feature_space_requires_no_similarity() -> None:
    x = np.random.default_rng(0).random((30, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="similarity=False"):
        audits.site_audit_summary(x, x, x, space="feature")
    out = audits.site_audit_summary(x[:10], x[10:20], x[20:], space="feature", metric="l2", similarity=False,
                                    n_bootstrap=50)
    assert "similarity" not in out and out["space"] == "feature"


def _faces(n: int, attribute: np.ndarray, carries: bool, seed: int):
    """8x8 'faces': noise, plus a bright patch where the sensitive attribute is 1 (if the images carry it)."""
    from common.data import ImageDataset

    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.5, size=(n, 1, 8, 8)).astype(np.float32)
    shown = attribute if carries else rng.integers(0, 2, size=n)  # replaced: drawn independently of the label
    images[shown == 1, :, :4, :4] += 0.5
    return ImageDataset(images=images, labels=attribute.astype(np.int64), classes=("no", "yes"), source="test")


@pytest.mark.parametrize("leaked", [True, False])
def test_the_attribute_adversary_sees_a_leak_and_only_chance_without_one(leaked):
    from common.audits.attribute import attribute_leakage
    from common.learner import LearnerConfig

    rng = np.random.default_rng(0)
    # the synthetic records claim the attribute as often as the real ones hold it (~70% "yes")
    synthetic = _faces(800, (rng.uniform(size=800) < 0.7).astype(np.int64), carries=leaked, seed=1)
    real_attr = (rng.uniform(size=600) < 0.7).astype(np.int64)  # imbalanced: the majority rate is ~0.7
    real = _faces(600, real_attr, carries=True, seed=2)
    result = attribute_leakage(synthetic, real, learner=LearnerConfig(name="logreg", epochs=5, lr=0.05))
    assert result.majority_rate == pytest.approx(max(real_attr.mean(), 1 - real_attr.mean()))
    assert result.chance == 0.5 and result.validation["records"] == 160
    assert result.balanced_accuracy == pytest.approx(np.mean(result.per_value_accuracy))
    if leaked:
        assert result.used_classifier and result.adversary_accuracy > 0.97 and result.advantage > 0.25
        assert result.balanced_accuracy > 0.95 and result.blind_rate < 0.65
    else:  # nothing to learn: the classifier does not beat the constant answer on held-out synthetic records,
        # so the adversary answers "yes" every time and scores exactly the majority rate
        assert not result.used_classifier
        assert result.validation["classifier"] <= result.validation["constant"] + result.validation["margin"]
        assert result.adversary_accuracy == pytest.approx(result.majority_rate) and result.advantage == pytest.approx(0)
        # the raw classifier's answers are independent of the truth: balanced accuracy at chance, plain accuracy
        # at what answers of the same frequencies would score blind
        assert abs(result.balanced_accuracy - 0.5) < 0.08
        assert abs(result.classifier_accuracy - result.blind_rate) < 0.06


def test_the_closer_to_training_flag_needs_a_gap_that_survives_resampling_the_reference():
    """Seen on 64x64 faces: synthetic features far off the real ones all share the one or two most extreme
    reference records as nearest neighbours (hubs), so the rank test sees thousands of 'closer to training'
    records where a single training record decides. A real gap (records near many training records) stays."""
    from common.audits.memorization import memorization_test

    rng = np.random.default_rng(0)
    train, heldout = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    train[0], heldout[0] = 0.0, 0.0
    train[0, 0], heldout[0, 0] = 4.0, 3.9  # the most extreme record of each side, the training one by chance
    off = rng.normal(scale=0.05, size=(500, 8))
    off[:, 0] += 10.0  # synthetic features far beyond it: every one's nearest training record is train[0]
    hub = memorization_test(off, train, heldout, metric="l2", seed=0)
    boot = hub.tests["reference_bootstrap"]
    assert hub.tests["mann_whitney"]["p_value"] < 0.05  # the rank test alone would call it memorization
    assert boot["distinct_nearest"]["train"] == 1 and boot["ci95"][0] <= 0 < boot["gap"]
    assert "train_closer" not in hub.summary()["flags"]
    near = train[:250] + rng.normal(scale=0.1, size=(250, 8))  # records close to many training records
    real = memorization_test(near, train, heldout, metric="l2", seed=0)
    assert real.tests["reference_bootstrap"]["ci95"][0] > 0 and "train_closer" in real.summary()["flags"]
    assert real.tests["reference_bootstrap"]["distinct_nearest"]["train"] > 150
