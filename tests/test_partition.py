"""Tests for common/partition.py."""

from __future__ import annotations

import numpy as np
import pytest

from common.partition import parse_partition, partition_indices

# 10 balanced classes of 100 records, in a fixed shuffled order.
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 100))


def _check_partition(parts: list[np.ndarray], n: int, num_sites: int) -> None:
    """Disjoint, covering 0..n-1, each sorted int64."""
    assert len(parts) == num_sites
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over sites of the largest class's share of that site's records."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("iid", ("iid", None)), (" IID ", ("iid", None)), ("dirichlet:0.5", ("dirichlet", 0.5)),
     ("Dirichlet:1e-1", ("dirichlet", 0.1)), ("dirichlet:100", ("dirichlet", 100.0))],
)
def test_parse_partition_accepts(spec: str, expected: tuple[str, float | None]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize("spec", ["", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
                                  "dirichlet:inf", "dirichlet:abc", "iid:0.5", "shards:2"])
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="dirichlet:<alpha>"):
        parse_partition(spec)


def test_iid_sizes_and_determinism() -> None:
    parts = partition_indices(LABELS, 3, "iid", seed=3)
    _check_partition(parts, len(LABELS), 3)
    assert sorted(len(p) for p in parts) == [333, 333, 334]
    again = partition_indices(LABELS, 3, "iid", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(LABELS, 3, "iid", seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert _max_class_share(LABELS, parts) < 0.2  # roughly 10 % per class at every site


def test_dirichlet_reproducible_disjoint_and_skewed() -> None:
    parts = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=0, min_size=20)
    _check_partition(parts, len(LABELS), 5)
    assert min(len(p) for p in parts) >= 20
    again = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=0, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(LABELS, 5, "dirichlet", alpha=0.1, seed=1, min_size=20)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    # Small alpha: sites are dominated by few classes; large alpha: close to IID.
    assert _max_class_share(LABELS, parts) > 0.4
    flat = partition_indices(LABELS, 5, "dirichlet", alpha=1000.0, seed=0)
    _check_partition(flat, len(LABELS), 5)
    assert _max_class_share(LABELS, flat) < 0.2


def test_dirichlet_min_size_forces_resampling() -> None:
    # With 20 sites and alpha=0.1 most single draws leave some site nearly empty; the bound
    # must still hold after resampling.
    parts = partition_indices(LABELS, 20, "dirichlet", alpha=0.1, seed=5, min_size=10)
    _check_partition(parts, len(LABELS), 20)
    assert min(len(p) for p in parts) >= 10


def test_impossible_requests() -> None:
    with pytest.raises(ValueError, match="cannot give 20 sites at least 60"):
        partition_indices(LABELS, 20, "iid", min_size=60)
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(LABELS, 50, "dirichlet", alpha=0.01, min_size=19)
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(LABELS, 2, "dirichlet")
    with pytest.raises(ValueError, match="alpha=None"):
        partition_indices(LABELS, 2, "iid", alpha=0.5)
    with pytest.raises(ValueError, match="scheme"):
        partition_indices(LABELS, 2, "shards")
    with pytest.raises(ValueError, match="num_sites"):
        partition_indices(LABELS, 0)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(LABELS.reshape(10, 100), 2)


def test_single_site_gets_everything() -> None:
    for scheme, alpha in (("iid", None), ("dirichlet", 0.3)):
        (only,) = partition_indices(LABELS, 1, scheme, alpha=alpha)
        np.testing.assert_array_equal(only, np.arange(len(LABELS)))
