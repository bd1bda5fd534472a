"""Coordinator side of the BN-statistics mode: pooling the sites' releases and synthesizing images."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from client.bnstats import COUNT_KEY, SUM_PREFIX, record_class_statistics
from client.dpsgd import train_dpsgd_local
from common.bnnet import BNNet, capture_norm_inputs
from common.data import ImageDataset, load_dataset
from common.partition import partition_indices
from server.bnsynth import PooledStats, pool_statistics, synthesize

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def trained(digits: ImageDataset) -> tuple[BNNet, PooledStats]:
    """A net trained non-privately on digits (~2 s) and its exact class statistics."""
    torch.manual_seed(0)
    net = BNNet(1, 10, 8, width=16)
    train_dpsgd_local(net, digits, noise_multiplier=0.0, sample_rate=128 / len(digits), steps=150,
                      max_grad_norm=1.0, lr=0.3, seed=0)
    pooled = pool_statistics([record_class_statistics(net, digits, clip_bound=math.inf, noise_multiplier=0.0)])
    return net, pooled


def _direct_stats(net: BNNet, ds: ImageDataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-class channel mean and variance over (records, H, W), straight from the activations."""
    out = {}
    with torch.no_grad(), capture_norm_inputs(net) as inputs:
        net(torch.as_tensor(ds.images))
        for name, a in inputs.items():
            a = a.double().numpy()  # (N, C, H, W)
            per = [a[ds.labels == k].transpose(1, 0, 2, 3).reshape(a.shape[1], -1) for k in range(10)]
            out[name] = (np.stack([p.mean(1) for p in per]), np.stack([p.var(1) for p in per]))
    return out


def test_pooled_sites_equal_the_union(digits: ImageDataset) -> None:
    torch.manual_seed(1)
    net = BNNet(1, 10, 8, width=8).eval()
    shards = partition_indices(digits.labels, 3, scheme="dirichlet", alpha=0.5, seed=0)
    releases = [record_class_statistics(net, digits.subset(s), clip_bound=math.inf, noise_multiplier=0.0)
                for s in shards]
    pooled = pool_statistics(releases)
    union = pool_statistics([record_class_statistics(net, digits, clip_bound=math.inf, noise_multiplier=0.0)])
    direct = _direct_stats(net, digits)
    assert pooled.num_sites == 3 and pooled.clamped_classes == ()
    np.testing.assert_allclose(pooled.counts, np.bincount(digits.labels, minlength=10))
    for name, (mean, var) in direct.items():
        np.testing.assert_allclose(pooled.mean[name], union.mean[name], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(pooled.var[name], union.var[name], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(pooled.mean[name], mean, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(pooled.var[name], np.maximum(var, 1e-4), atol=1e-5, rtol=1e-4)


def test_pooling_clamps_noisy_counts_and_variances_with_a_warning() -> None:
    rel = {COUNT_KEY: np.array([10.0, -3.0], np.float32),
           SUM_PREFIX + "l": np.array([[5.0], [1.0]], np.float32),
           "sumsq/l": np.array([[1.0], [2.0]], np.float32)}  # class 0: E[x^2]=0.1 < mean^2=0.25
    with pytest.warns(RuntimeWarning, match=r"classes \[1\]"):
        pooled = pool_statistics([rel], min_count=2.0)
    assert pooled.counts.tolist() == [10.0, 2.0] and pooled.clamped_classes == (1,)
    assert pooled.mean["l"][1, 0] == pytest.approx(0.5)
    assert pooled.var["l"][0, 0] == pytest.approx(1e-4)  # negative variance raised to the floor
    assert np.all(np.isfinite(pooled.var["l"]))


def test_pooling_rejects_mismatched_or_broken_releases() -> None:
    good = {COUNT_KEY: np.ones(2, np.float32), "sum/l": np.ones((2, 3), np.float32), "sumsq/l": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match="same shared net"):
        pool_statistics([good, {**good, "sum/m": np.ones((2, 3), np.float32)}])
    with pytest.raises(ValueError, match="shape"):
        pool_statistics([good, {**good, "sum/l": np.ones((2, 4), np.float32)}])
    with pytest.raises(ValueError, match="NaN"):
        pool_statistics([good, {**good, COUNT_KEY: np.array([1.0, np.nan], np.float32)}])
    with pytest.raises(ValueError, match="at least one site"):
        pool_statistics([])


def _stats_distance(net: BNNet, ds: ImageDataset, pooled: PooledStats) -> float:
    """Mean relative distance of the set's class-wise statistics to the pooled ones."""
    d = []
    for name, (mean, var) in _direct_stats(net, ds).items():
        scale = np.linalg.norm(np.concatenate([pooled.mean[name], np.sqrt(pooled.var[name])], 1), axis=1)
        d.append((np.linalg.norm(mean - pooled.mean[name], axis=1)
                  + np.linalg.norm(np.sqrt(var) - np.sqrt(pooled.var[name]), axis=1)) / scale)
    return float(np.mean(d))


def test_synthesis_makes_images_of_the_target_class(trained: tuple[BNNet, PooledStats]) -> None:
    net, pooled = trained
    syn = synthesize(net, pooled, 10, iterations=120, batch_size=100, lr=0.1, w_stats=1.0, w_ce=1.0,
                     w_tv=1.0, w_l2=0.0, seed=0, progress=False)
    assert isinstance(syn, ImageDataset) and len(syn) == 100
    assert syn.images.shape == (100, 1, 8, 8) and syn.images.dtype == np.float32
    assert 0.0 <= syn.images.min() and syn.images.max() <= 1.0
    assert np.bincount(syn.labels, minlength=10).tolist() == [10] * 10
    with torch.no_grad():
        pred = net(torch.as_tensor(syn.images)).argmax(1).numpy()
    assert (pred == syn.labels).mean() >= 0.8
    # the statistics were matched: much closer to the targets than the starting noise is
    noise = ImageDataset(torch.sigmoid(torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))).numpy(),
                         syn.labels, syn.classes)
    assert _stats_distance(net, syn, pooled) < 0.5 * _stats_distance(net, noise, pooled)


def test_synthesis_is_deterministic_and_honours_per_class_counts(trained: tuple[BNNet, PooledStats]) -> None:
    net, pooled = trained
    counts = [3, 0, 1, 1, 1, 1, 1, 1, 1, 5]
    runs = [synthesize(net, pooled, counts, iterations=4, batch_size=20, seed=5, progress=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].images, runs[1].images)
    np.testing.assert_array_equal(runs[0].labels, runs[1].labels)
    assert np.bincount(runs[0].labels, minlength=10).tolist() == counts
    other = synthesize(net, pooled, counts, iterations=4, batch_size=20, seed=6, progress=False)
    assert not np.array_equal(other.images, runs[0].images)
    # the caller's net is left as it was: trainable parameters and no hooks
    assert all(p.requires_grad for p in net.parameters())
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_synthesis_rejects_mismatched_statistics(trained: tuple[BNNet, PooledStats]) -> None:
    net, pooled = trained
    with pytest.raises(ValueError, match="classes"):
        synthesize(BNNet(1, 5, 8, 16), pooled, 2, iterations=1, progress=False)
    with pytest.raises(ValueError, match="layers"):
        bad = PooledStats(pooled.counts, {"x": pooled.mean["block1.norm"]}, {"x": pooled.var["block1.norm"]}, 1)
        synthesize(net, bad, 2, iterations=1, progress=False)
    with pytest.raises(ValueError, match="num_per_class"):
        synthesize(net, pooled, [1, 2], iterations=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run warns about nothing
        synthesize(net, pooled, 1, iterations=1, progress=False)


def test_synthesis_options_layer_weights_schedule_init_threads(trained: tuple[BNNet, PooledStats]) -> None:
    net, pooled = trained
    threads = torch.get_num_threads()
    syn = synthesize(net, pooled, 2, iterations=5, batch_size=20, seed=1, progress=False, lr_schedule="cosine",
                     init_bias=-1.0, threads=1, layer_weights={"block1.norm": 2.0, "block3.norm": 0.0})
    assert len(syn) == 20 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="lr_schedule"):
        synthesize(net, pooled, 1, iterations=1, lr_schedule="step", progress=False)


def test_a_net_at_a_lower_resolution_sees_averaged_records_and_synthesizes_full_size_images(
        trained: tuple[BNNet, PooledStats]) -> None:
    """bn-resolution: a net for 16x16 records built at 8 pixels has the 8-pixel net's parameters, sees each
    record averaged 2x2, and its synthesis draws at 8 pixels and returns 16x16 images it still recognises."""
    net8, pooled = trained
    net16 = BNNet(1, 10, 16, width=16, resolution=8)
    net16.load_state_dict(net8.state_dict())  # same parameter shapes: the convolutions work at 8 pixels
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net16(x), net8(torch.nn.functional.avg_pool2d(x, 2)))
    syn = synthesize(net16, pooled, 10, iterations=120, batch_size=100, seed=0, progress=False)
    assert syn.images.shape == (100, 1, 16, 16) and 0.0 <= syn.images.min() and syn.images.max() <= 1.0
    with torch.no_grad():
        pred = net16(torch.as_tensor(syn.images)).argmax(1).numpy()
    assert (pred == syn.labels).mean() >= 0.8
    with pytest.raises(ValueError, match="bn-resolution"):
        BNNet(1, 10, 16, width=16, resolution=32)
